#!/usr/bin/env python3
"""Reference-counting calls per request, from a callgrind raw file.

    bench/rc_calls.py RAW REQUESTS [--callers N] [--binary WEIR_BIN] [--sites N]

Counts the calls into the Swift runtime's reference counting
(swift_retain, swift_release, their bridgeObject / _n / unknownObject
variants, swift_weakLoadStrong, swift_isUniquelyReferenced*) and divides by
the requests of the run. Each of these is an atomic read-modify-write on a
shared cache line (or a check for one), so their count is the figure to cut
when the instruction count hides their cost (cpusplit in BENCHMARKS.md).

--callers N: for each function, its N most frequent direct callers
(demangled). A bridgeObject retain/release calls swift_retain/release
itself, so those appear as callers too: the bridgeObject lines say which
Swift String/Array values cost them.

--binary + --sites N: the N most frequent call *sites* (file:line, with the
inlining chain), when the raw file was recorded with `--dump-instr=yes`
(`bench/callgrind.sh --call-sites`) and WEIR_BIN is the unstripped binary
the run stripped (same addresses). Answers "which line retains what".
"""
import argparse
import collections
import re
import signal
import subprocess
import sys

RC_FUNCTIONS = [
    "swift_retain", "swift_release", "swift_retain_n", "swift_release_n",
    "swift_bridgeObjectRetain", "swift_bridgeObjectRelease",
    "swift_bridgeObjectRetain_n", "swift_bridgeObjectRelease_n",
    "swift_unknownObjectRetain", "swift_unknownObjectRelease",
    "swift_weakLoadStrong", "swift_isUniquelyReferenced_nonNull_native",
]

NAME = re.compile(r"\((\d+)\)(?: (.*))?")


def parse(path):
    """Calls per (callee, caller) and per (callee, call-site address)."""
    names = {}

    def name(token):
        m = NAME.match(token)
        if not m:
            return token
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), token)

    objects = {}

    def object_name(token):
        m = NAME.match(token)
        if not m:
            return token
        if m.group(2) is not None:
            objects[m.group(1)] = m.group(2)
        return objects.get(m.group(1), token)

    by_caller = collections.defaultdict(collections.Counter)
    by_site = collections.defaultdict(collections.Counter)
    positions = ["line"]
    current, callee, pending_calls = None, None, None
    current_object = ""
    last_address = 0
    for line in open(path, errors="replace"):
        if line.startswith("positions:"):
            positions = line.split()[1:]
            continue
        if line.startswith("ob="):
            current_object = object_name(line[3:].strip())
            continue
        if line.startswith("cob="):
            object_name(line[4:].strip())
            continue
        if line.startswith("fn="):
            current = name(line[3:].strip())
            continue
        if line.startswith("cfn="):
            callee = name(line[4:].strip())
            continue
        if line.startswith("calls="):
            pending_calls = int(line[6:].split()[0])
            continue
        first = line[:1]
        if first.isdigit() or first in "+-*":
            # A cost line: its first column is the instruction address when
            # the run dumped instructions (absolute, or relative to the last).
            if "instr" in positions:
                token = line.split(None, 1)[0]
                if token.startswith("0x"):
                    last_address = int(token, 16)
                elif token[0] in "+-":
                    last_address += int(token, 0)
                elif token != "*":
                    last_address = int(token, 0)
            if pending_calls is not None:
                by_caller[callee][current] += pending_calls
                # Sites in the binary only (not the runtime's own calls,
                # e.g. swift_bridgeObjectRelease's to swift_release).
                if "instr" in positions and "libswift" not in current_object:
                    by_site[callee][last_address] += pending_calls
                pending_calls = None
    return names, by_caller, by_site


def demangle(symbols):
    symbols = sorted(set(symbols))
    if not symbols:
        return {}
    out = subprocess.run(["/opt/swift/usr/bin/swift-demangle", "--simplified"], input="\n".join(symbols),
                         capture_output=True, text=True).stdout.split("\n")
    return dict(zip(symbols, out))


def locate(binary, addresses, readable):
    """The inlining chain of each call site. Retains and releases mostly
    carry no line of their own: the nearest instruction before the call
    that has one stands in (marked `~N bytes before`)."""
    backs = list(range(1, 97, 3))
    queries = [a - back for a in addresses for back in backs]
    out = subprocess.run(["addr2line", "-a", "-i", "-f", "-e", binary], input="\n".join(hex(q) for q in queries),
                         capture_output=True, text=True).stdout.split("\n")
    frames_of = {}
    query, frames = None, []
    i = 0
    while i < len(out):
        line = out[i]
        if line.startswith("0x"):
            if query is not None:
                frames_of[query] = frames
            query, frames = int(line, 16), []
            i += 1
            continue
        if i + 1 < len(out):
            frames.append((line, out[i + 1]))
        i += 2
    if query is not None:
        frames_of[query] = frames
    chains = {}
    for a in addresses:
        chosen, distance = frames_of.get(a - 1, []), 1
        for back in backs:
            frames = frames_of.get(a - back, [])
            if frames and not frames[0][1].endswith(":?") and "<compiler-generated>" not in frames[0][1]:
                chosen, distance = frames, back
                break
        lines = [] if distance == 1 else [f"~{distance} bytes before the call:"]
        for symbol, location in chosen:
            fn = readable.get(symbol) or symbol
            location = re.sub(r"^.*/(Sources|\.build[^/]*/checkouts)/", "", location)
            lines.append(f"{location} {fn[:90]}")
        chains[a] = lines
    return chains


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `| head` ends the output quietly
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw")
    parser.add_argument("requests", type=float)
    parser.add_argument("--callers", type=int, default=0)
    parser.add_argument("--binary")
    parser.add_argument("--sites", type=int, default=0)
    args = parser.parse_args()

    names, by_caller, by_site = parse(args.raw)
    readable = demangle(names.values())
    per = lambda n: n / args.requests
    keyed = {readable.get(k, k): k for k in by_caller}
    pairs = 0
    rows = []
    for function in RC_FUNCTIONS:
        key = keyed.get(function)
        if key is None:
            continue
        total = sum(by_caller[key].values())
        if function in ("swift_retain", "swift_release"):
            pairs += total
        rows.append((function, key, total))
    print(f"swift_retain + swift_release calls per request: {per(pairs):.1f}")
    for function, key, total in rows:
        print(f"  {function}: {per(total):.2f}")
        for caller, n in by_caller[key].most_common(args.callers):
            print(f"      {per(n):7.2f}  {readable.get(caller, caller)[:180]}")

    if args.sites and args.binary:
        if not any(by_site.values()):
            print("(no call sites: record with --dump-instr=yes, bench/callgrind.sh --call-sites)", file=sys.stderr)
            return
        print()
        print(f"## top {args.sites} call sites of swift_retain / swift_release (per request; innermost frame first)")
        counter = collections.Counter()
        for function in ("swift_retain", "swift_release", "swift_bridgeObjectRetain", "swift_bridgeObjectRelease"):
            key = keyed.get(function)
            if key is None:
                continue
            for address, n in by_site[key].items():
                counter[(function, address)] += n
        top = counter.most_common(args.sites)
        addresses = sorted({a for (_, a), _ in top})
        # addr2line -i prints a variable number of (function, file:line)
        # pairs per address: one address at a time keeps them apart.
        chains = locate(args.binary, addresses, readable)
        for (function, address), n in top:
            print(f"{per(n):6.2f}  {function}  {hex(address)}")
            for frame in chains.get(address, [])[:4]:
                print(f"          {frame}")


if __name__ == "__main__":
    main()
