// Consumer credential lookup at scale: what 100,000 consumers cost at
// config load (YAML parse + credential index) and per lookup, against a
// handful of consumers. Same shape as bench/consumers/gen_config.py writes:
// consumer-<i> with one key-auth key and a group.
//
// Run in release:  swift run -c release --scratch-path <scratch> weir-consumer-bench [consumers] [lookups]
// It prints numbers; it never fails on them (not a timed test).

import Foundation
import WeirCore
import WeirLua

#if canImport(Glibc)
import Glibc
#endif

/// CPU time of this process, not wall time: on a machine shared with other
/// builds a starved process's wall time says little (seen here: 34 s of wall
/// time for 4 s of CPU).
@inline(__always) func nowNs() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}

/// Resident set size in MiB (from /proc/self/status).
func rssMiB() -> Double {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let kb = Double(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
        return kb / 1024
    }
    return 0
}

func yaml(consumers: Int) -> String {
    var text = """
    listeners:
      - { name: web, listen: 127.0.0.1:0 }
    upstreams:
      - { name: backend, targets: [{ address: 127.0.0.1:9 }] }
    routes:
      - { name: all, match: { paths: [/] }, upstream: backend, plugins: [{ name: key-auth }] }
    consumers:

    """
    text.reserveCapacity(consumers * 90)
    for i in 0..<consumers {
        text += "  - { name: consumer-\(i), groups: [tier-\(i % 4)], credentials: { key-auth: [{ key: key-\(i)-9f3c2a }] } }\n"
    }
    return text
}

let count = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 100_000 : 100_000
let lookups = CommandLine.arguments.count > 2 ? Int(CommandLine.arguments[2]) ?? 1_000_000 : 1_000_000

for n in [10, count] {
    let text = yaml(consumers: n)
    let rss0 = rssMiB()
    let t0 = nowNs()
    let config = try ConfigLoader.parse(yaml: text)
    let t1 = nowNs()
    let credentials = ConsumerCredentials(consumers: config.consumers)
    let t2 = nowNs()
    let rss1 = rssMiB()

    // Hits spread over the whole table, then misses; keys built up front so
    // only the lookup is timed.
    let hitKeys = (0..<1024).map { "key-\(($0 &* 7919) % n)-9f3c2a" }
    let missKeys = (0..<1024).map { "nokey-\($0)" }
    var found = 0
    let t3 = nowNs()
    for i in 0..<lookups where credentials.find(plugin: "key-auth", field: "key", value: hitKeys[i & 1023]) != nil { found += 1 }
    let t4 = nowNs()
    for i in 0..<lookups where credentials.find(plugin: "key-auth", field: "key", value: missKeys[i & 1023]) != nil { found += 1 }
    let t5 = nowNs()
    precondition(found == lookups, "every hit key must be found, no miss key")

    print(String(format: "consumers=%d yaml_parse_cpu_ms=%.1f index_build_cpu_ms=%.1f rss_growth_mib=%.1f hit_cpu_ns=%.0f miss_cpu_ns=%.0f",
                 n, Double(t1 - t0) / 1e6, Double(t2 - t1) / 1e6, rss1 - rss0,
                 Double(t4 - t3) / Double(lookups), Double(t5 - t4) / Double(lookups)))
}
