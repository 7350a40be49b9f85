#!/usr/bin/env python3
"""Summarise a bench/run-protocols.sh results file: medians per case and
proxy, then Weir's ratio to the peer of each case (nginx for HTTPS and
HTTP/2, HAProxy for TCP), all from the one file. Lines are the RESULT /
UNAVAILABLE lines described in summarize.py, with a `case=` field."""
import statistics
import sys
from collections import OrderedDict

CLOCK_TICKS_PER_SECOND = 100
CASES = OrderedDict([
    ("https-keepalive", ("HTTPS, 32 keep-alive connections", "nginx", "weir-https")),
    ("http-keepalive", ("HTTP/1.1 without TLS, same processes, 32 keep-alive connections", "nginx", "weir-https")),
    ("https-handshake", ("HTTPS, new TLS handshake per request (req/s = handshakes/s)", "nginx", "weir-https")),
    ("h2c", ("HTTP/2 cleartext, 4 connections x 100 streams (h2load)", "nginx", "weir-h2c")),
    ("tcp-rps", ("TCP proxy, HTTP requests over 64 connections", "haproxy", "weir-tcp")),
    ("tcp-bulk-1", ("TCP proxy, 16 MB downloads over 1 connection", "haproxy", "weir-tcp")),
    ("tcp-bulk-64", ("TCP proxy, 16 MB downloads over 64 connections", "haproxy", "weir-tcp")),
    ("h2-upstream", ("HTTP/1.1 clients, HTTP/2 (h2c) to the origin, 32 connections", "nginx", "weir-h2up")),
])


def main(path):
    rows, unavailable = [], {}
    for line in open(path):
        if line.startswith("RESULT "):
            rows.append(dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv))
        elif line.startswith("UNAVAILABLE "):
            head, _, reason = line[len("UNAVAILABLE "):].rstrip("\n").partition(" reason=")
            unavailable[head.split("=", 1)[1]] = reason
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["case"], r["proxy"]), []).append(r)

    def med(values):
        return statistics.median(values) if values else None

    summary = {}
    for key, rs in groups.items():
        secs = [float(r["seconds"]) for r in rs]
        summary[key] = {
            "runs": len(rs),
            "rps": med([float(r["rps"]) for r in rs]),
            "mbps": med([int(r["bytes"]) / float(r["seconds"]) / 1e6 for r in rs]),
            "p99_ms": med([int(r["p99_us"]) / 1000 for r in rs if "p99_us" in r]),
            "cpu_us": med([int(r["cpu_ticks"]) * 1e6 / CLOCK_TICKS_PER_SECOND / int(r["requests"])
                           for r in rs if int(r.get("requests", 0)) > 0]),
            "cpu_pct": med([int(r["cpu_ticks"]) * 100 / CLOCK_TICKS_PER_SECOND / s for r, s in zip(rs, secs)]),
            "errors": sum(int(r.get(k, 0)) for r in rs
                          for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")),
        }

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    print("| case | proxy | req/s | MB/s | p99 ms | proxy CPU % | proxy CPU µs/req | runs | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for case, (label, peer, weir) in CASES.items():
        for proxy in (peer, weir):
            s = summary.get((case, proxy))
            if s is None:
                reason = unavailable.get(proxy, "not measured")
                print(f"| {label} | {proxy} | not available ({reason}) | | | | | | |")
                continue
            print(f"| {label} | {proxy} | {f(s['rps'], ',.0f')} | {f(s['mbps'], ',.0f')} | {f(s['p99_ms'], '.2f')} | "
                  f"{f(s['cpu_pct'], '.0f')} | {f(s['cpu_us'], '.1f')} | {s['runs']} | {s['errors']} |")
        a, b = summary.get((case, weir)), summary.get((case, peer))
        if a and b:
            ratios.append(f"- {case}: {weir}/{peer} req/s x{a['rps'] / b['rps']:.2f}, MB/s x{a['mbps'] / b['mbps']:.2f}")
    print()
    print("Ratios (medians of this run):")
    print("\n".join(ratios) if ratios else "- none (no Weir variant measured)")
    # What TLS adds per keep-alive request: the same process over HTTPS and
    # over plain HTTP, in this run.
    added = []
    for proxy in ("nginx", "weir-https"):
        tls, plain = summary.get(("https-keepalive", proxy)), summary.get(("http-keepalive", proxy))
        if tls and plain and tls["cpu_us"] is not None and plain["cpu_us"] is not None:
            added.append(f"{proxy} +{tls['cpu_us'] - plain['cpu_us']:.1f} µs ({plain['cpu_us']:.1f} -> {tls['cpu_us']:.1f})")
    if added:
        print()
        print("CPU per request that TLS adds on keep-alive connections (https-keepalive minus http-keepalive): "
              + "; ".join(added))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: summarize_protocols.py RESULTS_FILE")
    main(sys.argv[1])
