#!/usr/bin/env python3
"""Read `perf script -F ip,sym,dso` of a `perf record -g` run (bench/cpusplit.sh)
and say, as shares of all samples, which syscall each kernel sample runs
under (the frame under do_syscall_64 on its stack), how many of them are in the
network receive softirq (net_rx_action: on loopback the writer's CPU
delivers the packet to the peer socket) and how many wake another task
(try_to_wake_up)."""
import collections
import sys

MARKERS = {"net_rx_action": "in net_rx_action (loopback delivery to the peer)",
           "sock_def_readable": "in sock_def_readable (waking the peer reading the socket)",
           "try_to_wake_up": "in try_to_wake_up",
           "ep_poll_callback": "in ep_poll_callback (epoll readiness of the peer)"}


def main():
    total = kernel = 0
    by_syscall, by_marker = collections.Counter(), collections.Counter()
    frames = []

    def flush():
        nonlocal total, kernel
        if not frames:
            return
        total += 1
        if frames[0][0]:            # the leaf is in the kernel
            kernel += 1
            names = [name for _, name in frames]
            # The frame just under do_syscall_64 is the syscall's handler
            # (ksys_write, ksys_read, do_epoll_wait, ...).
            if "do_syscall_64" in names and names.index("do_syscall_64") > 0:
                by_syscall[names[names.index("do_syscall_64") - 1]] += 1
            else:
                by_syscall["(not in a syscall: " + names[-1] + ")"] += 1
            for marker in MARKERS:
                if marker in names:
                    by_marker[marker] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            frames.clear()
            continue
        parts = line.split()
        if len(parts) >= 2 and all(c in "0123456789abcdef" for c in parts[0]):
            frames.append(("[kernel.kallsyms]" in line, parts[1]))
    flush()
    share = lambda n: 100.0 * n / max(total, 1)
    print(f"  kernel: {share(kernel):6.2f}% of {total} samples")
    for name, n in by_syscall.most_common(12):
        print(f"    {share(n):6.2f}%  {name}")
    for marker, text in MARKERS.items():
        print(f"  {share(by_marker[marker]):6.2f}%  {text}")


if __name__ == "__main__":
    main()
