#!/usr/bin/env python3
"""Print the user+system CPU time, in clock ticks, used so far by a process
and all its descendants (e.g. an nginx master and its worker). bench/run.sh
samples it before and after each wrk run to report how busy the proxy's
core was: a proxy well below 100% is held back by something else (the
load core, the origin), and its number should be read with that in mind."""
import os
import sys


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # The command name is in parentheses and may contain spaces.
    return data[data.rindex(")") + 2:].split()


def main():
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: cpu_ticks.py PID")
    root = int(sys.argv[1])
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(stat_fields(entry)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            fields = stat_fields(pid)
        except OSError:
            continue
        # fields[11], fields[12] are utime and stime (stat fields 14 and 15).
        total += int(fields[11]) + int(fields[12])
        stack.extend(children.get(pid, []))
    print(total)


if __name__ == "__main__":
    main()
