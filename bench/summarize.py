#!/usr/bin/env python3
"""Summarise a bench/run.sh results file.

Input lines (written by run.sh):
  RESULT run=1 proxy=nginx conns=32 requests=... rps=... p50_us=... p99_us=...
         cpu_ticks=... err_status=... ...
  UNAVAILABLE proxy=weir reason=free text to the end of the line
  REDIS run=1 proxy=weir-auth-redis conns=32 requests=... redis_calls=... redis_evalsha=... redis_eval=...

`--pool FILE...`: only the paired-by-run ratios, pooled over several files,
each with a 95 % bootstrap interval of its median, and the paired capacity
ratio by proxy CPU per request (B's CPU µs/req over A's).

Output: a Markdown table of medians per proxy and connection count, then
the ratios Weir/nginx and Weir/HAProxy (and nginx+Lua/nginx), computed from
the medians of this one file, so they come from one run on one machine
state. Medians, not means: the machine is shared and noisy, and a median of
interleaved runs is robust to one disturbed run.
"""
import random
import statistics
import sys
from collections import OrderedDict

# Display order and labels; unknown proxies are appended after these.
LABELS = OrderedDict([
    ("nginx", "nginx proxy_pass (keepalive)"),
    ("nginx-fwd", "nginx proxy_pass (keepalive) + Weir's forwarding lines"),
    ("haproxy", "HAProxy (http-reuse always)"),
    ("nginx-lua", "nginx + Lua (key-auth-like + shared counter + header)"),
    ("weir", "Weir (no plugins)"),
    ("weir-noop", "Weir + 1 no-op Lua plugin"),
    ("weir-lua", "Weir + Lua chain (key check + shared counter + header)"),
    ("nginx-lua-auth", "nginx + Lua (key-auth + sliding-window rate limit, ngx.shared)"),
    ("weir-auth-local", "Weir + key-auth + rate-limiting (policy local)"),
    ("weir-auth-redis", "Weir + key-auth + rate-limiting (policy redis)"),
])
CLOCK_TICKS_PER_SECOND = 100
# Below this median CPU % the proxy was not the bottleneck (the load core or
# other processes on the machine held it back); such rows get a mark.
SATURATED_CPU_PERCENT = 90


def parse(path):
    results, unavailable, redis = [], OrderedDict(), []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("RESULT "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                results.append(fields)
            elif line.startswith("REDIS "):
                redis.append(dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv))
            elif line.startswith("UNAVAILABLE "):
                rest = line[len("UNAVAILABLE "):]
                proxy_part, _, reason_part = rest.partition(" reason=")
                unavailable[proxy_part.split("=", 1)[1]] = reason_part
    return results, unavailable, redis


def median(values):
    return statistics.median(values) if values else None


def summarise(results):
    """{(proxy, conns): {metric: median}} plus run counts and error totals."""
    groups = OrderedDict()
    for r in results:
        groups.setdefault((r["proxy"], int(r["conns"])), []).append(r)
    summary = OrderedDict()
    for key, rows in groups.items():
        errors = sum(int(r.get(k, 0)) for r in rows
                     for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
        cpu_us_per_req = [int(r["cpu_ticks"]) * 1e6 / CLOCK_TICKS_PER_SECOND / int(r["requests"])
                          for r in rows if "cpu_ticks" in r and int(r.get("requests", 0)) > 0]
        cpu_percent = [int(r["cpu_ticks"]) * 100.0 / CLOCK_TICKS_PER_SECOND / float(r["seconds"])
                       for r in rows if "cpu_ticks" in r and float(r.get("seconds", 0)) > 0]
        summary[key] = {
            "runs": len(rows),
            "rps": median([float(r["rps"]) for r in rows]),
            "rps_all": [float(r["rps"]) for r in rows],
            "rps_by_run": {r["run"]: float(r["rps"]) for r in rows if "run" in r},
            "cpu_us_by_run": {r["run"]: int(r["cpu_ticks"]) * 1e6 / CLOCK_TICKS_PER_SECOND / int(r["requests"])
                              for r in rows if "run" in r and "cpu_ticks" in r and int(r.get("requests", 0)) > 0},
            "p50_ms": median([int(r["p50_us"]) / 1000.0 for r in rows]),
            "p99_ms": median([int(r["p99_us"]) / 1000.0 for r in rows]),
            "cpu_percent": median(cpu_percent),
            "cpu_us_per_req": median(cpu_us_per_req),
            "errors": errors,
        }
    return summary


# The A/B ratios reported, in order.
RATIO_PAIRS = [("weir", "nginx"), ("weir", "nginx-fwd"), ("nginx-fwd", "nginx"), ("weir", "haproxy"), ("nginx-lua", "nginx"),
               ("weir-lua", "nginx-lua"), ("weir-noop", "weir"), ("weir-lua", "weir"),
               ("nginx-lua-auth", "nginx"), ("weir-auth-local", "weir"), ("weir-auth-redis", "weir"),
               ("weir-auth-local", "nginx-lua-auth")]
# The issues' req/s targets for some of them (A/B at least this).
TARGETS = {("weir", "nginx"): 1.0, ("weir-lua", "nginx-lua"): 1.0,
           ("weir-lua", "weir"): 0.90, ("weir-auth-local", "weir"): 0.85}


def per_run_ratios(top, bottom):
    """top/bottom of one figure within each run (the two measured seconds
    apart, so slow drifts of the shared machine cancel), for the runs that
    measured both."""
    return [top[run] / bottom[run] for run in top if run in bottom and bottom[run] > 0]


def paired_ratios(sa, sb):
    """A/B req/s within each run."""
    return per_run_ratios(sa["rps_by_run"], sb["rps_by_run"])


def paired_capacity_ratios(sa, sb):
    """B's proxy CPU µs per request over A's within each run: A's capacity
    relative to B's, whatever share of the core each got."""
    return per_run_ratios(sb["cpu_us_by_run"], sa["cpu_us_by_run"])


def bootstrap_interval(values, resamples=5000):
    """95 % interval of the median by resampling with replacement (seeded:
    the same files give the same interval)."""
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def ordered_proxies(summary, unavailable):
    seen = [p for p, _ in summary.keys()] + list(unavailable.keys())
    known = [p for p in LABELS if p in seen]
    return known + [p for p in OrderedDict.fromkeys(seen) if p not in LABELS]


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def render(path):
    results, unavailable, redis = parse(path)
    summary = summarise(results)
    conns_list = sorted({c for _, c in summary.keys()})
    out = []
    starved = False
    out.append("| proxy | conns | req/s (median) | p50 ms | p99 ms | proxy CPU % | proxy CPU µs/req | runs | errors |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for proxy in ordered_proxies(summary, unavailable):
        label = LABELS.get(proxy, proxy)
        if proxy in unavailable and not any(p == proxy for p, _ in summary):
            out.append(f"| {label} | - | not available ({unavailable[proxy]}) | | | | | | |")
            continue
        for conns in conns_list:
            s = summary.get((proxy, conns))
            if s is None:
                continue
            mark = ""
            if s["cpu_percent"] is not None and s["cpu_percent"] < SATURATED_CPU_PERCENT:
                mark, starved = " †", True
            out.append(
                f"| {label} | {conns} | {fmt(s['rps'], ',.0f')}{mark} | {fmt(s['p50_ms'], '.2f')} | "
                f"{fmt(s['p99_ms'], '.2f')} | {fmt(s['cpu_percent'], '.0f')} | "
                f"{fmt(s['cpu_us_per_req'], '.1f')} | {s['runs']} | {s['errors']} |")
    if starved:
        out.append("")
        out.append(f"† the proxy used less than {SATURATED_CPU_PERCENT}% of its core: something else (the load "
                   "core, or other processes on the shared machine) limited it, so this figure understates it.")
    out.append("")
    out.append("Ratios (from the medians above; req/s ratio > 1 means faster, p99 ratio < 1 means lower tail "
               "latency, CPU per request: the difference and ratio of proxy CPU µs/req, the figure least "
               "affected by a busy machine):")
    for a, b in RATIO_PAIRS:
        for conns in conns_list:
            sa, sb = summary.get((a, conns)), summary.get((b, conns))
            if sa is None or sb is None:
                if a in unavailable and (b, conns) in summary:
                    out.append(f"- {a}/{b} @ {conns} conns: not available ({a}: {unavailable[a]})")
                continue
            line = (f"- {a}/{b} @ {conns} conns: req/s x{sa['rps'] / sb['rps']:.2f}, "
                    f"p99 x{sa['p99_ms'] / sb['p99_ms']:.2f}")
            if sa["cpu_us_per_req"] is not None and sb["cpu_us_per_req"] is not None:
                delta = sa["cpu_us_per_req"] - sb["cpu_us_per_req"]
                line += (f", CPU per request {delta:+.1f} µs "
                         f"(x{sa['cpu_us_per_req'] / sb['cpu_us_per_req']:.2f})")
            paired = paired_ratios(sa, sb)
            if len(paired) > 1:
                line += (f"; paired by run: median x{median(paired):.2f} "
                         f"(x{min(paired):.2f}..x{max(paired):.2f}, {len(paired)} runs)")
            out.append(line)
    if len(out) and out[-1].startswith("Ratios"):
        out.append("- none (a ratio needs both proxies measured)")
    if redis:
        # The redis policy's Redis traffic over the measured runs (INFO
        # commandstats deltas): script calls are the round trips; the
        # commands a script runs inside Redis are counted too.
        requests = sum(int(r.get("requests", 0)) for r in redis)
        calls = sum(int(r.get("redis_calls", 0)) for r in redis)
        evalsha = sum(int(r.get("redis_evalsha", 0)) for r in redis)
        evals = sum(int(r.get("redis_eval", 0)) for r in redis)
        if requests > 0:
            out.append("")
            out.append(f"Redis round trips during the measured weir-auth-redis runs: EVALSHA {evalsha:,} + EVAL {evals:,} "
                       f"for {requests:,} requests = {(evalsha + evals) / requests:.3f} per request (INFO commandstats "
                       f"also counts the INCR/GET/EXPIRE run inside the script: {calls:,} commands in all)")
    spread = []
    for (proxy, conns), s in summary.items():
        if len(s["rps_all"]) > 1:
            lo, hi = min(s["rps_all"]), max(s["rps_all"])
            spread.append(f"{proxy}@{conns}: {lo:,.0f}..{hi:,.0f}")
    if spread:
        out.append("")
        out.append("Spread of req/s across runs (min..max): " + "; ".join(spread))
    return "\n".join(out)


def render_pooled(paths):
    """The paired-by-run ratios of several results files together: one
    run's A/B is one sample whatever file it is in, so runs made at
    different times of a noisy shared host can be judged together."""
    pooled, capacity = OrderedDict(), OrderedDict()
    for path in paths:
        summary = summarise(parse(path)[0])
        for a, b in RATIO_PAIRS:
            for (proxy, conns) in summary:
                if proxy != a or (b, conns) not in summary:
                    continue
                pooled.setdefault((a, b, conns), []).extend(paired_ratios(summary[(a, conns)], summary[(b, conns)]))
                capacity.setdefault((a, b, conns), []).extend(
                    paired_capacity_ratios(summary[(a, conns)], summary[(b, conns)]))
    out = [f"Paired-by-run req/s ratios pooled over {len(paths)} results files:"]
    for (a, b, conns), ratios in pooled.items():
        if not ratios:
            continue
        low, high = bootstrap_interval(ratios)
        line = (f"- {a}/{b} @ {conns} conns: median x{median(ratios):.3f} "
                f"(x{min(ratios):.2f}..x{max(ratios):.2f}, {len(ratios)} runs; "
                f"95 % interval of the median x{low:.3f}..x{high:.3f})")
        target = TARGETS.get((a, b))
        if target is not None:
            line += f"; {sum(r >= target for r in ratios)} of {len(ratios)} at or above x{target:.2f}"
        cpu = capacity.get((a, b, conns)) or []
        if cpu:
            low, high = bootstrap_interval(cpu)
            line += f"; by CPU per request x{median(cpu):.3f} (x{low:.3f}..x{high:.3f})"
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--pool":
        print(render_pooled(sys.argv[2:]))
    elif len(sys.argv) == 2:
        print(render(sys.argv[1]))
    else:
        sys.exit("usage: summarize.py RESULTS_FILE | summarize.py --pool RESULTS_FILE...")
