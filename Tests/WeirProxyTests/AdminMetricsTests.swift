import NIOCore
import NIOPosix
import WeirCore
import WeirLua
@testable import WeirProxy
import XCTest

/// The metrics registry and its Prometheus text, fed from real event loops.
final class AdminMetricsTests: XCTestCase {
    static func record(route: String?, upstream: String?, status: Int, total: Double = 0.003,
                       upstreamDuration: Double? = 0.002, bytesIn: Int = 10, bytesOut: Int = 100,
                       path: String = "/") -> AccessRecord {
        AccessRecord(startTime: 1_795_000_000.25, requestID: "req-1", listener: "web", clientAddress: "127.0.0.1:5555",
                     method: "GET", path: path, route: route, upstream: upstream,
                     upstreamTarget: upstream == nil ? nil : "127.0.0.1:9001", status: status,
                     bytesIn: bytesIn, bytesOut: bytesOut, totalDuration: total,
                     upstreamDuration: upstreamDuration, attempts: 1)
    }

    func testCountsFromSeveralEventLoopsAreMergedAtScrape() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { try? group.syncShutdownGracefully() }
        let metrics = MetricsRegistry()
        let loops = Array(group.makeIterator())
        XCTAssertEqual(loops.count, 2)

        var futures: [EventLoopFuture<Void>] = []
        for (i, loop) in loops.enumerated() {
            futures.append(loop.submit {
                for n in 0..<1000 {
                    let status = n % 10 == 0 ? 503 : 200
                    metrics.recordRequest(Self.record(route: "api", upstream: "orders", status: status))
                }
                metrics.recordRequest(Self.record(route: nil, upstream: nil, status: 404, upstreamDuration: nil))
                metrics.connectionOpened(listener: "web")
                metrics.connectionOpened(listener: "web")
                if i == 0 { metrics.connectionClosed(listener: "web") }
            })
        }
        try EventLoopFuture.andAllSucceed(futures, on: group.next()).wait()

        let snapshot = metrics.snapshot()
        let api = snapshot.requests[RouteUpstreamKey(route: "api", upstream: "orders")]
        XCTAssertEqual(api?.byStatusClass, [0, 1800, 0, 0, 200])
        XCTAssertEqual(api?.total.count, 2000)
        XCTAssertEqual(api?.bytesOut, 200_000)
        XCTAssertEqual(snapshot.requestCount(route: ""), 2)
        XCTAssertEqual(snapshot.connections["web"]?.opened, 4)
        XCTAssertEqual(snapshot.connections["web"]?.closed, 1)

        let text = metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"weir_requests_total{route="api",upstream="orders",status_class="2xx"} 1800"#), text)
        XCTAssertTrue(text.contains(#"weir_requests_total{route="api",upstream="orders",status_class="5xx"} 200"#))
        XCTAssertTrue(text.contains(#"weir_requests_total{route="",upstream="",status_class="4xx"} 2"#))
        XCTAssertTrue(text.contains(#"weir_active_connections{listener="web"} 3"#))
        XCTAssertTrue(text.contains(#"weir_connections_total{listener="web"} 4"#))
        // 3 ms lands in the 5 ms bucket, not in 2.5 ms.
        XCTAssertTrue(text.contains(#"weir_request_duration_seconds_bucket{route="api",le="0.0025"} 0"#))
        XCTAssertTrue(text.contains(#"weir_request_duration_seconds_bucket{route="api",le="0.005"} 2000"#))
        XCTAssertTrue(text.contains(#"weir_request_duration_seconds_bucket{route="api",le="+Inf"} 2000"#))
        XCTAssertTrue(text.contains(#"weir_request_duration_seconds_count{route="api"} 2000"#))
        XCTAssertTrue(text.contains(#"weir_upstream_duration_seconds_count{upstream="orders"} 2000"#))
        try Self.assertValidExposition(text)
    }

    /// The shard remembers the previous request's names to skip the key
    /// lookup: changing routes, changing only the upstream, and a nil
    /// route (counted as "") must each land in their own cell.
    func testConsecutiveSamplesOfDifferentRoutesKeepSeparateCells() throws {
        let metrics = MetricsRegistry()
        let sequence: [(String?, String?)] = [("a", "x"), ("a", "x"), ("b", "x"), ("a", "x"), ("a", "y"),
                                              (nil, nil), ("", ""), ("a", "x"), (nil, "x")]
        for (route, upstream) in sequence {
            metrics.recordRequest(RequestSample(route: route, upstream: upstream, status: 200, bytesIn: 1, bytesOut: 1,
                                                totalDuration: 0.001, upstreamDuration: nil))
        }
        let requests = metrics.snapshot().requests
        let count = { (route: String, upstream: String) in requests[RouteUpstreamKey(route: route, upstream: upstream)]?.total.count }
        XCTAssertEqual(count("a", "x"), 4)
        XCTAssertEqual(count("b", "x"), 1)
        XCTAssertEqual(count("a", "y"), 1)
        XCTAssertEqual(count("", ""), 2)
        XCTAssertEqual(count("", "x"), 1)
        XCTAssertEqual(requests.count, 5)
    }

    /// The data path's counts are written without a lock by their loop
    /// (`RequestCellCounters`): scrapes taken while a loop records see each
    /// count only grow and never a torn value, and the last one is exact.
    func testScrapesWhileALoopRecordsSeeGrowingCountsAndEndExact() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let metrics = MetricsRegistry()
        let total = 20_000
        let recorded = group.next().submit {
            let counter = metrics.requestCounter(route: "api", upstream: "orders")
            for n in 0..<total {
                counter.add(status: 200, bytesIn: 3, bytesOut: 1 << 20, totalDuration: 0.001 * Double(n % 3),
                            upstreamDuration: 0.0001)
            }
        }
        let key = RouteUpstreamKey(route: "api", upstream: "orders")
        var lastCount = 0, lastBytesOut = 0
        for _ in 0..<200 {
            guard let cell = metrics.snapshot().requests[key] else { continue }
            XCTAssertGreaterThanOrEqual(cell.byStatusClass[1], lastCount)
            XCTAssertGreaterThanOrEqual(cell.bytesOut, lastBytesOut)
            XCTAssertEqual(cell.bytesOut % (1 << 20), 0, "a whole number of adds")
            XCTAssertLessThanOrEqual(cell.byStatusClass[1], total)
            lastCount = cell.byStatusClass[1]
            lastBytesOut = cell.bytesOut
        }
        try recorded.wait()
        let cell = try XCTUnwrap(metrics.snapshot().requests[key])
        XCTAssertEqual(cell.byStatusClass, [0, total, 0, 0, 0])
        XCTAssertEqual(cell.bytesIn, 3 * total)
        XCTAssertEqual(cell.bytesOut, total << 20)
        XCTAssertEqual(cell.total.count, total)
        XCTAssertEqual(cell.total.counts.reduce(0, +), total)
        XCTAssertEqual(cell.upstream.count, total)
        XCTAssertEqual(cell.upstream.counts[0], total, "0.1 ms: the first bucket")
    }

    /// A `RequestCounter` (kept by the data path per loop and route) adds
    /// to the same (route, upstream) cell as samples do; counters taken on
    /// two event loops are merged at scrape like their shards.
    func testRequestCountersAddToTheirPairsCellOnEachLoop() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { try? group.syncShutdownGracefully() }
        let metrics = MetricsRegistry()
        let loops = Array(group.makeIterator())
        var futures: [EventLoopFuture<Void>] = []
        for loop in loops {
            futures.append(loop.submit {
                let counter = metrics.requestCounter(route: "api", upstream: "orders")
                let other = metrics.requestCounter(route: "api", upstream: "billing")
                for n in 0..<100 {
                    counter.add(status: n % 4 == 0 ? 502 : 200, bytesIn: 5, bytesOut: 50,
                                totalDuration: 0.003, upstreamDuration: n % 2 == 0 ? 0.002 : nil)
                }
                other.add(status: 404, bytesIn: 1, bytesOut: 1, totalDuration: 0.02, upstreamDuration: nil)
                // A sample for the same pair on the same loop lands in the same cell.
                metrics.recordRequest(RequestSample(route: "api", upstream: "orders", status: 301, bytesIn: 0, bytesOut: 0,
                                                    totalDuration: 0.001, upstreamDuration: 0.001))
            })
        }
        try EventLoopFuture.andAllSucceed(futures, on: group.next()).wait()

        let requests = metrics.snapshot().requests
        let orders = try XCTUnwrap(requests[RouteUpstreamKey(route: "api", upstream: "orders")])
        XCTAssertEqual(orders.byStatusClass, [0, 150, 2, 0, 50])
        XCTAssertEqual(orders.bytesIn, 1000)
        XCTAssertEqual(orders.bytesOut, 10_000)
        XCTAssertEqual(orders.total.count, 202)
        XCTAssertEqual(orders.upstream.count, 102)
        XCTAssertEqual(requests[RouteUpstreamKey(route: "api", upstream: "billing")]?.byStatusClass, [0, 0, 0, 2, 0])
        XCTAssertEqual(requests.count, 2)
        let text = metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"weir_request_duration_seconds_bucket{route="api",le="0.005"} 202"#), text)
        try Self.assertValidExposition(text)
    }

    func testHistogramBucketsAreCumulativeAndCoverTheRange() throws {
        let metrics = MetricsRegistry()
        for seconds in [0.0001, 0.0005, 0.0007, 0.04, 3.0, 60.0] {
            metrics.recordRequest(Self.record(route: "r", upstream: "u", status: 200, total: seconds))
        }
        let text = metrics.renderPrometheus()
        let buckets = Self.samples(in: text, named: "weir_request_duration_seconds_bucket")
        XCTAssertEqual(buckets.count, MetricsRegistry.latencyBuckets.count + 1)
        XCTAssertEqual(buckets.first?.labels, #"{route="r",le="0.0005"}"#)
        XCTAssertEqual(buckets.first?.value, 2) // 0.1 ms and exactly 0.5 ms (upper bounds are inclusive)
        XCTAssertEqual(buckets.last?.labels, #"{route="r",le="+Inf"}"#)
        XCTAssertEqual(buckets.last?.value, 6)
        let values = buckets.map(\.value)
        XCTAssertEqual(values, values.sorted(), "buckets must be cumulative")
        XCTAssertEqual(buckets.first(where: { $0.labels.contains(#"le="10.0""#) })?.value, 5) // 60 s only in +Inf
        try Self.assertValidExposition(text)
    }

    /// The chain runner buckets plugin call durations in C by integer
    /// nanosecond bounds (CLuaShims.h): they must be the registry's.
    func testPluginCallCellsBucketAsTheRegistryDoes() throws {
        XCTAssertEqual(PluginCallCell.boundsNanoseconds,
                       MetricsRegistry.latencyBuckets.map { UInt64(($0 * 1e9).rounded()) })
        let metrics = PluginMetrics()
        let recorder = try XCTUnwrap(metrics.recorder(plugin: "p", phase: .request, eventLoop: nil))
        XCTAssertNotNil(recorder.cell)
        for seconds in [0.0001, 0.0005, 0.0007, 0.04, 3.0, 60.0] {
            recorder.record(nanoseconds: UInt64(seconds * 1e9), outcome: .completed)
        }
        recorder.record(nanoseconds: 1_000, outcome: .failed)
        let text = metrics.renderPrometheus()
        let buckets = Self.samples(in: text, named: "weir_plugin_duration_seconds_bucket")
        XCTAssertEqual(buckets.count, MetricsRegistry.latencyBuckets.count + 1)
        XCTAssertEqual(buckets.first?.value, 3) // 1 us, 0.1 ms and exactly 0.5 ms (upper bounds are inclusive)
        XCTAssertEqual(buckets.last?.value, 7)
        XCTAssertEqual(buckets.first(where: { $0.labels.contains(#"le="10.0""#) })?.value, 6)
        let sum = Self.samples(in: text, named: "weir_plugin_duration_seconds_sum").first?.value ?? 0
        XCTAssertEqual(sum, 63.041301, accuracy: 1e-6)
        let calls = Self.samples(in: text, named: "weir_plugin_calls_total")
        XCTAssertEqual(calls.map(\.value), [6, 0, 1])
        try Self.assertValidExposition(text)
    }

    func testLabelValuesAreEscapedAndHealthIsReported() throws {
        let metrics = MetricsRegistry()
        metrics.recordRequest(Self.record(route: "we\"ird\\route\nname", upstream: "u", status: 200))
        metrics.setHealthSource {
            [.init(upstream: "orders", target: "127.0.0.1:9001", healthy: true),
             .init(upstream: "orders", target: "127.0.0.1:9002", healthy: false)]
        }
        metrics.addExternalCounter(name: "weir_test_dropped_total", help: "Test counter.", read: { 7 })
        let text = metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"route="we\"ird\\route\nname""#), text)
        XCTAssertTrue(text.contains(#"weir_upstream_target_healthy{upstream="orders",target="127.0.0.1:9001"} 1"#))
        XCTAssertTrue(text.contains(#"weir_upstream_target_healthy{upstream="orders",target="127.0.0.1:9002"} 0"#))
        XCTAssertTrue(text.contains("# TYPE weir_test_dropped_total counter\nweir_test_dropped_total 7\n"))
        try Self.assertValidExposition(text)
    }

    // MARK: exposition format checks

    struct Sample: Equatable { var name: String; var labels: String; var value: Double }

    static func samples(in text: String, named name: String) -> [Sample] {
        (try? parseExposition(text))?.filter { $0.name == name } ?? []
    }

    /// A strict-enough parser for text format 0.0.4: HELP/TYPE comments,
    /// `name{label="value",...} number` samples, every sample's family declared.
    static func parseExposition(_ text: String) throws -> [Sample] {
        struct Bad: Error, CustomStringConvertible { var description: String }
        guard text.hasSuffix("\n") else { throw Bad(description: "must end with a newline") }
        var declared = Set<String>()
        var samples: [Sample] = []
        let sampleRegex = try NSRegularExpression(
            pattern: #"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,|(?=\})))*\})? (\S+)$"#)
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
            let line = String(line)
            if line.hasPrefix("# HELP ") { continue }
            if line.hasPrefix("# TYPE ") {
                let parts = line.split(separator: " ")
                guard parts.count == 4, ["counter", "gauge", "histogram", "summary", "untyped"].contains(parts[3]) else {
                    throw Bad(description: "bad TYPE line: \(line)")
                }
                guard declared.insert(String(parts[2])).inserted else { throw Bad(description: "TYPE twice: \(line)") }
                continue
            }
            let range = NSRange(line.startIndex..., in: line)
            guard let m = sampleRegex.firstMatch(in: line, range: range) else { throw Bad(description: "bad sample: \(line)") }
            let name = String(line[Range(m.range(at: 1), in: line)!])
            let labels = m.range(at: 2).location == NSNotFound ? "" : String(line[Range(m.range(at: 2), in: line)!])
            let valueText = String(line[Range(m.range(at: 3), in: line)!])
            guard let value = Double(valueText) else { throw Bad(description: "bad value: \(line)") }
            let family = ["_bucket", "_sum", "_count"].reduce(name) { n, suffix in
                n.hasSuffix(suffix) && declared.contains(String(n.dropLast(suffix.count))) ? String(n.dropLast(suffix.count)) : n
            }
            guard declared.contains(family) else { throw Bad(description: "sample before its TYPE: \(line)") }
            samples.append(Sample(name: name, labels: labels, value: value))
        }
        return samples
    }

    static func assertValidExposition(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertNoThrow(try parseExposition(text), file: file, line: line)
    }
}
