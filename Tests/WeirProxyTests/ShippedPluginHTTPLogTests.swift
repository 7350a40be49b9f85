// plugins/http-log through a running proxy with a real upstream and a real
// collector on loopback (ScriptedHTTPServer): records arrive with the access
// log's fields, batching, retries, and a dead collector that neither
// delays requests nor loses count of what it drops.

import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginHTTPLogTests: UpstreamTestCase {
    var collector: ScriptedHTTPServer!

    override func setUpWithError() throws {
        try super.setUpWithError()
        collector = try ScriptedHTTPServer(group: group)
    }

    override func tearDownWithError() throws {
        collector.stop()
        try super.tearDownWithError()
    }

    /// One route `logged` with `plugins` (YAML list items, one per line).
    private func yaml(plugins: [String]) -> String {
        """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: logged
            match: { paths: [/] }
            upstream: backend
            plugins:
        \(plugins.map { "      - " + $0 }.joined(separator: "\n"))
        consumers:
          - name: alice
            credentials:
              key-auth: [{ key: alice-key }]
        access_log: off
        """
    }

    private func start(_ config: String, metrics: PluginMetrics? = nil) throws -> ShippedPluginProxy {
        let yaml = yaml(plugins: ["{ name: key-auth, config: { anonymous: guest } }", "{ name: http-log, config: \(config) }"])
        return try startShippedPluginProxy(yaml: yaml, upstream: upstream, metrics: metrics)
    }

    /// All records sent so far, in arrival order.
    private func records(_ requests: [ScriptedRequest]) -> [[String: Any]] {
        requests.flatMap { ($0.json as? [[String: Any]]) ?? [] }
    }

    func testRecordsArriveWithAccessLogFields() throws {
        let proxy = try start("{ endpoint: \"\(collector.url)/logs\", flush_interval: 0.05, headers: { Authorization: token } }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/a?x=1", headers: [("apikey", "alice-key")]).status, 200)
        XCTAssertEqual(try client.request("POST", "/status/404", body: "hello").status, 404)
        let seen = collector.waitForRequests { self.records($0).count >= 2 }
        let all = records(seen)
        XCTAssertEqual(all.count, 2)
        XCTAssertEqual(seen.first?.method, "POST")
        XCTAssertEqual(seen.first?.uri, "/logs")
        XCTAssertEqual(seen.first?.header("content-type"), "application/json")
        XCTAssertEqual(seen.first?.header("authorization"), "token")
        let first = try XCTUnwrap(all.first)
        XCTAssertEqual(first["method"] as? String, "GET")
        XCTAssertEqual(first["path"] as? String, "/a")
        XCTAssertEqual(first["route"] as? String, "logged")
        XCTAssertEqual(first["upstream"] as? String, "backend")
        XCTAssertEqual(first["upstream_target"] as? String, "127.0.0.1:\(upstream.port)")
        XCTAssertEqual(first["status"] as? Int, 200)
        XCTAssertEqual(first["consumer"] as? String, "alice")
        XCTAssertEqual(first["listener"] as? String, "web")
        XCTAssertEqual(first["client"] as? String, "127.0.0.1")
        XCTAssertEqual(first["attempts"] as? Int, 1)
        XCTAssertEqual((first["request_id"] as? String)?.isEmpty, false)
        XCTAssertNotNil(first["duration_ms"] as? Double)
        XCTAssertNotNil(first["upstream_duration_ms"] as? Double)
        XCTAssertGreaterThan(first["bytes_out"] as? Int ?? 0, 0)
        let time = try XCTUnwrap(first["time"] as? String)
        XCTAssertNotNil(time.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"#, options: .regularExpression), time)
        let second = try XCTUnwrap(all.last)
        XCTAssertEqual(second["status"] as? Int, 404)
        XCTAssertEqual(second["consumer"] as? String, "guest")
        XCTAssertEqual(second["bytes_in"] as? Int ?? 0 > 0, true)
    }

    /// One connection stays on one event loop, so its records share one
    /// queue: 9 requests with batch_size 3 and no timer flush in sight make
    /// exactly three POSTs of three.
    func testFullBatchesAreSentAtOnce() throws {
        let proxy = try start("{ endpoint: \"\(collector.url)/logs\", batch_size: 3, flush_interval: 3600, format: json_array }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        for i in 0..<9 { XCTAssertEqual(try client.request("GET", "/r\(i)").status, 200) }
        let seen = collector.waitForRequests { $0.count >= 3 }
        XCTAssertEqual(seen.count, 3)
        XCTAssertEqual(seen.map { ($0.json as? [Any])?.count ?? -1 }, [3, 3, 3])
        XCTAssertEqual(records(seen).compactMap { $0["path"] as? String }, (0..<9).map { "/r\($0)" })
    }

    func testNDJSONAndRetryAfterFailure() throws {
        let attempts = NIOLockedValueBox(0)
        collector.setScript { _ in
            let n = attempts.withLockedValue { $0 += 1; return $0 }
            return ScriptedReply(status: n == 1 ? 503 : 200)
        }
        let proxy = try start("{ endpoint: \"\(collector.url)/logs\", format: ndjson, flush_interval: 0.05, retry_delay: 0.05 }")
        defer { proxy.stop() }
        XCTAssertEqual(try proxy.connect().request("GET", "/once").status, 200)
        let seen = collector.waitForRequests { $0.count >= 2 }
        XCTAssertEqual(seen.count, 2, "one failure, one retry")
        XCTAssertEqual(seen[0].bodyText, seen[1].bodyText, "the same batch is retried")
        XCTAssertEqual(seen[1].header("content-type"), "application/x-ndjson")
        let lines = seen[1].bodyText.split(separator: "\n")
        XCTAssertEqual(lines.count, 1)
        let record = try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any]
        XCTAssertEqual(record?["path"] as? String, "/once")
    }

    /// The collector is down: requests are served as usual, and every record
    /// ends up counted as dropped (queue full or retries exhausted) on the
    /// plugin metrics /metrics shows.
    func testCollectorDownDropsAndCounts() throws {
        collector.stop()
        let metrics = PluginMetrics()
        let proxy = try start("""
        { endpoint: "\(collector.url)/logs", queue_size: 5, flush_interval: 0.05, retries: 1, retry_delay: 0.01, timeout: 0.5 }
        """, metrics: metrics)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for i in 0..<20 { XCTAssertEqual(try client.request("GET", "/d\(i)").status, 200) }
        let expected = #"weir_plugin_events_total{plugin="http-log",event="records_dropped"} 20"#
        let deadline = Date().addingTimeInterval(10)
        while !metrics.renderPrometheus().contains(expected), Date() < deadline { usleep(20_000) }
        let text = metrics.renderPrometheus()
        XCTAssertTrue(text.contains(expected), text)
        XCTAssertFalse(text.contains(#"event="records_sent""#))
        XCTAssertEqual(upstream.requests.count, 20)
    }

    /// A reload retires the generation whose queues hold the records (and
    /// spans) of the requests just served: it sends them before it is
    /// dropped. Flush interval an hour and batches of 1000, so nothing is
    /// sent before the reload; two event loops, so both retiring states flush.
    func testReloadSendsWhatTheRetiredGenerationStillQueued() throws {
        let yaml = yaml(plugins: [
            "{ name: http-log, config: { endpoint: \"\(collector.url)/logs\", flush_interval: 3600, batch_size: 1000 } }",
            "{ name: tracing, config: { endpoint: \"\(collector.url)/v1/traces\", flush_interval: 3600, batch_size: 1000 } }",
        ])
        let proxy = try startShippedPluginProxy(yaml: yaml, upstream: upstream, loops: 2)
        defer { proxy.stop() }
        var paths: Set<String> = []
        for client in [try proxy.connect(), try proxy.connect()] {
            for _ in 0..<6 {
                let path = "/r\(paths.count)"
                XCTAssertEqual(try client.request("GET", path).status, 200)
                paths.insert(path)
            }
        }
        XCTAssertEqual(collector.requests.count, 0, "nothing is sent before the reload (an hour's flush interval)")

        var config = try ConfigLoader.parse(yaml: yaml.replacingOccurrences(of: "UPSTREAM", with: "127.0.0.1:\(upstream.port)"))
        config.pluginPaths = [shippedPluginsRepoRoot + "/plugins"]
        XCTAssertNoThrow(try proxy.generations.reload(config: config).get())

        func spans(_ requests: [ScriptedRequest]) -> [[String: Any]] {
            requests.filter { $0.uri == "/v1/traces" }.flatMap { request -> [[String: Any]] in
                let resourceSpans = (request.json as? [String: Any])?["resourceSpans"] as? [[String: Any]] ?? []
                return resourceSpans.flatMap { ($0["scopeSpans"] as? [[String: Any]] ?? []).flatMap { $0["spans"] as? [[String: Any]] ?? [] } }
            }
        }
        let seen = collector.waitForRequests(timeout: 10) { self.records($0.filter { $0.uri == "/logs" }).count >= 12 && spans($0).count >= 12 }
        let logged = records(seen.filter { $0.uri == "/logs" }).compactMap { $0["path"] as? String }
        XCTAssertEqual(Set(logged), paths, "every record queued before the reload arrived")
        XCTAssertEqual(logged.count, 12, "each once")
        XCTAssertEqual(spans(seen).count, 12, "every span queued before the reload arrived")
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        let cases: [(String, String)] = [
            ("{ }", "routes[0].plugins[1].config.endpoint: required field missing"),
            ("{ endpoint: \"http://a:1/\", batch_size: 0 }", "routes[0].plugins[1].config.batch_size"),
            ("{ endpoint: \"http://a:1/\", queue_size: many }", "routes[0].plugins[1].config.queue_size"),
            ("{ endpoint: \"http://a:1/\", format: xml }", "routes[0].plugins[1].config.format"),
        ]
        for (config, expected) in cases {
            XCTAssertThrowsError(try start(config), config) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(config): \(error)")
            }
        }
    }
}
