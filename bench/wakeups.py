#!/usr/bin/env python3
"""Which of a proxy's writes wake a sleeping peer, from a perf trace of the
proxy's event-loop thread (bench/wakeups.sh records it):

    perf record -t TID -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit \\
        -e sched:sched_waking -e sched:sched_switch
    perf script -F tid,time,event,trace > trace.txt
    wakeups.py trace.txt

A write (write/writev/sendto/sendmsg) "woke a peer" when a sched_waking
event falls between its entry and exit: the loopback delivery runs inside
the write and wakes the reader if it sleeps in epoll_wait. Writes are told
apart by size: > 500 bytes is a response to the client (wrk), smaller is a
request to the origin. For each kind the report gives the share of writes
that woke the peer, by the time since the proxy's previous write of the
same kind: the peer sleeps when it has finished the previous one before the
next arrives, so the share rises sharply once the gap exceeds the peer's
own work per message. Also: epoll_wait calls that returned events and
their mean size, and how often the proxy itself slept or was preempted.
"""
import collections
import re
import sys

WRITES = {1, 20, 44, 46}        # write, writev, sendto, sendmsg (x86-64)
READS = {0, 19, 45, 47}         # read, readv, recvfrom, recvmsg
EPOLL_WAIT = {232, 281}         # epoll_wait, epoll_pwait
GAP_BUCKET_US = 10
GAP_LAST_US = 100

LINE = re.compile(r'\s*(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)')


def analyse(path):
    writing = False              # inside a write's syscall
    woke = False                 # a sched_waking happened inside it
    last_write = {}              # kind -> time of the previous write's end
    writes = collections.Counter()
    writes_waking = collections.Counter()
    by_gap = collections.defaultdict(lambda: [0, 0])     # (kind, bucket) -> [writes, woke]
    wakees = collections.Counter()
    batches = []
    reads = sleeps = preemptions = 0
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        t, event, rest = float(m.group(2)), m.group(3), m.group(4)
        if event == "raw_syscalls:sys_enter":
            if int(rest.split()[1]) in WRITES:
                writing, woke = True, False
        elif event == "raw_syscalls:sys_exit":
            fields = rest.split()
            nr, ret = int(fields[1]), int(rest.rsplit("=", 1)[1])
            if nr in EPOLL_WAIT and ret > 0:
                batches.append(ret)
            elif nr in READS and ret > 0:
                reads += 1
            elif nr in WRITES and writing:
                writing = False
                if ret <= 0:
                    continue
                kind = "response" if ret > 500 else "request"
                writes[kind] += 1
                writes_waking[kind] += woke
                if kind in last_write:
                    gap_us = (t - last_write[kind]) * 1e6
                    bucket = min(int(gap_us // GAP_BUCKET_US) * GAP_BUCKET_US, GAP_LAST_US)
                    by_gap[(kind, bucket)][0] += 1
                    by_gap[(kind, bucket)][1] += woke
                last_write[kind] = t
        elif event == "sched:sched_waking":
            if writing:
                woke = True
            found = re.search(r"comm=(\S+)", rest)
            wakees[found.group(1) if found else "?"] += 1
        elif event == "sched:sched_switch":
            state = re.search(r"prev_state=(\S+)", rest)
            if state and state.group(1).startswith("S"):
                sleeps += 1
            else:
                preemptions += 1

    requests = max(writes["request"], writes["response"], 1)
    print(f"## {path}")
    print(f"requests (writes of each kind): ~{requests}")
    if batches:
        print(f"epoll_wait returning events: {len(batches)} ({len(batches) / requests:.3f}/request), "
              f"mean {sum(batches) / len(batches):.1f} events")
    print(f"event-loop thread slept {sleeps} times ({sleeps / requests:.3f}/request), "
          f"was preempted {preemptions} times")
    for kind in ("request", "response"):
        n = writes[kind]
        print(f"{kind} writes: {n}, woke a peer: {writes_waking[kind]} ({writes_waking[kind] / max(n, 1):.3f})")
    print("tasks woken while the thread ran, per request: "
          + ", ".join(f"{name} {count / requests:.3f}" for name, count in wakees.most_common(5)))
    print(f"share of writes that woke a peer, by the gap since the previous write of the same kind "
          f"(µs bucket: writes / share):")
    for kind in ("request", "response"):
        cells = []
        for bucket in range(0, GAP_LAST_US + GAP_BUCKET_US, GAP_BUCKET_US):
            n, w = by_gap.get((kind, bucket), (0, 0))
            if n:
                label = f">={bucket}" if bucket == GAP_LAST_US else f"{bucket}-{bucket + GAP_BUCKET_US}"
                cells.append(f"{label}: {n} / {w / n:.2f}")
        print(f"  {kind:8} " + "; ".join(cells))
    print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: wakeups.py TRACE.txt...")
    for trace in sys.argv[1:]:
        analyse(trace)
