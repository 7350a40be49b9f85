#!/usr/bin/env python3
"""Attribute perf samples to the code that caused them.

    perf script -F tid,ip,sym,dso -i perf.data | python3 perf_attribution.py BINARY_NAME

`perf report --no-children` says *that* swift_retain, malloc or the kernel
is hot, not *who* calls them. This reads the sampled call stacks (leaf
first, as `perf script` prints them) and prints, as plain text:

1. inclusive time of functions in BINARY_NAME (the proxy's own code plus
   the statically linked NIO): the share of samples with that function
   anywhere on the stack, i.e. the cost of everything it does or calls
   (event-loop scaffolding present in over 90% of samples is left out);
2. the same restricted to Weir's own modules (mangled names mention
   "Weir"), the part the Weir engineers can change directly;
3. for the hottest leaf symbols outside BINARY_NAME (Swift runtime, libc,
   kernel), the nearest caller inside BINARY_NAME: who retains, allocates
   or enters the kernel.

Symbols are printed as perf gives them (mangled); pipe the output through
`swift-demangle --simplified` to read them.
"""
import collections
import sys


def samples(stream):
    """Yield each sample's stack as a list of (symbol, dso), leaf first."""
    stack = []
    for line in stream:
        if not line.strip():
            if stack:
                yield stack
            stack = []
            continue
        if not line[0].isspace():
            continue  # the sample header (tid)
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        rest = parts[1]
        dso = ""
        if rest.endswith(")") and " (" in rest:
            rest, dso = rest.rsplit(" (", 1)
            dso = dso[:-1].rsplit("/", 1)[-1]
        stack.append((rest.strip() or "[unknown]", dso))
    if stack:
        yield stack


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: perf script -F tid,ip,sym,dso | perf_attribution.py BINARY_NAME")
    binary = sys.argv[1]
    total = 0
    inclusive = collections.Counter()
    leaf_callers = collections.defaultdict(collections.Counter)
    leaf_totals = collections.Counter()
    for stack in samples(sys.stdin):
        total += 1
        seen = set()
        for symbol, dso in stack:
            if dso == binary and symbol not in seen:
                seen.add(symbol)
                inclusive[symbol] += 1
        leaf_symbol, leaf_dso = stack[0]
        if leaf_dso != binary:
            leaf = f"{leaf_symbol} [{leaf_dso}]"
            leaf_totals[leaf] += 1
            caller = next((s for s, d in stack[1:] if d == binary), "(no caller in " + binary + ")")
            leaf_callers[leaf][caller] += 1
    if total == 0:
        sys.exit("no samples in the input")

    def pct(n):
        return f"{100.0 * n / total:5.1f}%"

    print(f"samples: {total}")
    print()
    print(f"## inclusive time of functions in {binary} (top 40 below 90%; share of samples with the function on the stack)")
    shown = 0
    for symbol, n in inclusive.most_common():
        if n >= 0.9 * total:
            continue
        print(f"{pct(n)}  {symbol}")
        shown += 1
        if shown == 40:
            break
    print()
    if binary == "weir":
        print("## inclusive time of Weir's own functions (top 30)")
        weir_own = [(s, n) for s, n in inclusive.most_common() if "Weir" in s]
        for symbol, n in weir_own[:30]:
            print(f"{pct(n)}  {symbol}")
        if not weir_own:
            print("(none: no symbol mentions a Weir module)")
        print()
    print(f"## hottest leaf symbols outside {binary}, with their nearest callers in {binary}")
    for leaf, n in leaf_totals.most_common(10):
        print(f"{pct(n)}  {leaf}")
        for caller, m in leaf_callers[leaf].most_common(8):
            print(f"          {pct(m)}  <- {caller}")


if __name__ == "__main__":
    main()
