// Route-table lookup micro-benchmark. Builds 10,000 routes shaped like a
// multi-tenant gateway (exact hosts with versioned APIs, wildcard tenant
// hosts, host-less service prefixes, exact health paths, some regexes),
// then times lookups that hit and lookups that miss.
//
// Run in release:  swift run -c release --scratch-path .build-core weir-route-bench [routes] [rounds]
// Instruction counts (stable on a busy machine):
//   valgrind --tool=callgrind <binary> 10000 2   then callgrind_annotate --inclusive=yes
// It prints numbers; it never fails on them (not a timed test).

import Foundation
import WeirCore

#if canImport(Glibc)
import Glibc
#endif

@inline(__always) func nowNs() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}

/// Deterministic PRNG so every run builds the same table.
struct Rng {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

struct Request {
    let method: String
    let host: String
    let path: String
}

struct NoHeaders: RouteHeaderLookup {
    func firstValue(forLowercasedName name: String) -> String? { nil }
}

struct OneHeader: RouteHeaderLookup {
    let name: String
    let value: String
    func firstValue(forLowercasedName name: String) -> String? { name == self.name ? value : nil }
}

let targetRoutes = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 10_000 : 10_000
let roundsArgument = CommandLine.arguments.count > 2 ? Int(CommandLine.arguments[2]) ?? 400 : 400
let resources = ["orders", "users", "items", "carts", "payments", "invoices", "reports", "search", "auth", "files",
                 "events", "products", "reviews", "shipments", "coupons", "tenants", "metrics", "logs", "jobs", "teams"]
var rng = Rng(state: 7)
var routes: [RouteConfig] = []
var hits: [Request] = []

func addRoute(_ name: String, hosts: [String] = [], paths: [PathPattern], methods: [String] = [], headers: [HeaderMatch] = []) {
    var route = RouteConfig()
    route.name = name
    route.upstream = "u"
    route.match.hosts = hosts
    route.match.paths = paths
    route.match.methods = methods
    route.match.headers = headers
    routes.append(route)
}

// 60%: exact API hosts, each with versioned resource prefixes, some method-split, some exact status paths.
let apiHosts = targetRoutes * 6 / 10 / 20
for h in 0..<apiHosts {
    let host = "api-\(h).example.com"
    for r in 0..<20 {
        let resource = resources[r]
        switch r % 5 {
        case 0: addRoute("h\(h)-\(resource)-get", hosts: [host], paths: [.prefix("/v1/\(resource)")], methods: ["GET"])
        case 1: addRoute("h\(h)-\(resource)-exact", hosts: [host], paths: [.exact("/v1/\(resource)/status")])
        default: addRoute("h\(h)-\(resource)", hosts: [host], paths: [.prefix("/v\(1 + r % 3)/\(resource)")])
        }
    }
    hits.append(Request(method: "GET", host: host, path: "/v1/orders/\(rng.below(100000))/lines"))
}
// 10%: wildcard tenant hosts.
let tenants = targetRoutes / 10 / 20
for t in 0..<tenants {
    for r in 0..<20 {
        addRoute("t\(t)-\(resources[r])", hosts: ["*.tenant\(t).example.net"], paths: [.prefix("/\(resources[r])")])
    }
    hits.append(Request(method: "GET", host: "shop-\(rng.below(50)).tenant\(t).example.net", path: "/\(resources[rng.below(20)])/\(rng.below(1000))"))
}
// The rest: host-less service routes; 2% regex, 10% exact, some header-gated.
var serviceIndex = 0
while routes.count < targetRoutes {
    let service = "svc\(serviceIndex)"
    let kind = serviceIndex % 50
    if kind == 0 {
        addRoute("\(service)-regex", paths: [.regex("^/\(service)/items/(\\d+)$")])
        hits.append(Request(method: "GET", host: "gw.internal", path: "/\(service)/items/\(rng.below(9999))"))
    } else if kind < 6 {
        addRoute("\(service)-exact", paths: [.exact("/\(service)/health")])
        hits.append(Request(method: "GET", host: "gw.internal", path: "/\(service)/health"))
    } else if kind == 6 {
        addRoute("\(service)-canary", paths: [.prefix("/\(service)")], headers: [HeaderMatch(name: "x-canary", values: ["1"])])
    } else {
        addRoute(service, paths: [.prefix("/\(service)/api/")])
        hits.append(Request(method: ["GET", "POST"][serviceIndex % 2], host: "gw.internal",
                            path: "/\(service)/api/\(resources[rng.below(20)])/\(rng.below(100000))"))
    }
    serviceIndex += 1
}

var misses: [Request] = []
for i in 0..<2000 {
    switch i % 4 {
    case 0: misses.append(Request(method: "GET", host: "unknown-\(i).example.org", path: "/nothing/here/\(i)"))
    case 1: misses.append(Request(method: "GET", host: "api-\(i % max(apiHosts, 1)).example.com", path: "/v9/unknown/\(i)"))
    case 2: misses.append(Request(method: "GET", host: "gw.internal", path: "/svc\(i)x/api/v1"))     // near-miss of a prefix
    default: misses.append(Request(method: "DELETE", host: "api-1.example.com", path: "/v1/orders/\(i)"))  // method mismatch falls to... none
    }
}

let buildStart = nowNs()
let table = try RouteTable(routes: routes)
let buildMs = Double(nowNs() - buildStart) / 1e6

// Sanity: every "hit" finds a route and every "miss" finds none.
let headers = NoHeaders()
let hitFound = hits.filter { table.match(method: $0.method, host: $0.host, path: $0.path, headers: headers) != nil }.count
let missFound = misses.filter { table.match(method: $0.method, host: $0.host, path: $0.path, headers: headers) != nil }.count

func percentile(_ sorted: [Double], _ p: Double) -> Double { sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }

/// Times batches of `batch` lookups; per-lookup ns = batch time / batch.
/// Batching keeps the clock's own cost (~20-30 ns) out of the figure.
func measure(_ label: String, _ requests: [Request], rounds: Int = roundsArgument, batch: Int = 64) {
    var sink = 0
    var samples: [Double] = []
    samples.reserveCapacity(rounds * (requests.count / batch + 1))
    // Warm-up.
    for request in requests { sink &+= table.match(method: request.method, host: request.host, path: request.path, headers: headers)?.routeIndex ?? 1 }
    for _ in 0..<rounds {
        var start = 0
        while start < requests.count {
            let end = min(start + batch, requests.count)
            let t0 = nowNs()
            for index in start..<end {
                let request = requests[index]
                sink &+= table.match(method: request.method, host: request.host, path: request.path, headers: headers)?.routeIndex ?? 1
            }
            samples.append(Double(nowNs() - t0) / Double(end - start))
            start = end
        }
    }
    samples.sort()
    let mean = samples.reduce(0, +) / Double(samples.count)
    print(String(format: "%-6@ lookups: median %6.0f ns  p99 %6.0f ns  mean %6.0f ns  (%d requests x %d rounds, batches of %d)  [sink %d]",
                 label, percentile(samples, 0.5), percentile(samples, 0.99), mean, requests.count, rounds, batch, sink & 1))
}

/// Single-lookup latencies with the clock overhead subtracted: shows the tail.
func measureSingle(_ label: String, _ requests: [Request], rounds: Int = max(1, roundsArgument / 4)) {
    var overhead: [UInt64] = []
    for _ in 0..<10_000 { let a = nowNs(); overhead.append(nowNs() - a) }
    overhead.sort()
    let clock = Double(overhead[overhead.count / 2])
    var samples: [Double] = []
    var sink = 0
    for _ in 0..<rounds {
        for request in requests {
            let t0 = nowNs()
            sink &+= table.match(method: request.method, host: request.host, path: request.path, headers: headers)?.routeIndex ?? 1
            samples.append(max(0, Double(nowNs() - t0) - clock))
        }
    }
    samples.sort()
    print(String(format: "%-6@ single: median %6.0f ns  p99 %6.0f ns  p99.9 %6.0f ns  (clock overhead %.0f ns subtracted) [sink %d]",
                 label, percentile(samples, 0.5), percentile(samples, 0.99), percentile(samples, 0.999), clock, sink & 1))
}

let regexCount = routes.filter { $0.match.paths.contains { if case .regex = $0 { return true }; return false } }.count
print("routes: \(routes.count) (\(apiHosts) exact hosts, \(tenants) wildcard tenants, \(regexCount) regex routes); table built in \(String(format: "%.1f", buildMs)) ms")
print("sanity: \(hitFound)/\(hits.count) hit requests matched, \(missFound)/\(misses.count) miss requests matched")
func isRegexHit(_ request: Request) -> Bool { request.host == "gw.internal" && request.path.contains("/items/") && !request.path.contains("/api/") }
let regexHits = hits.filter(isRegexHit)
let plainHits = hits.filter { !isRegexHit($0) }
measure("hit", hits)
measure("miss", misses)
measure("nonre", plainHits)
measure("regex", regexHits)
measureSingle("hit", hits)
measureSingle("miss", misses)
