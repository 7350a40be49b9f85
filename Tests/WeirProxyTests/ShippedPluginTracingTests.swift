// plugins/tracing through a running proxy with a real upstream and a real
// OTLP/HTTP collector on loopback (ScriptedHTTPServer) that parses the
// exported JSON: W3C traceparent/tracestate handling, span contents,
// sampling, batching, a dead collector.

import Foundation
import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginTracingTests: UpstreamTestCase {
    var collector: ScriptedHTTPServer!

    override func setUpWithError() throws {
        try super.setUpWithError()
        collector = try ScriptedHTTPServer(group: group)
    }

    override func tearDownWithError() throws {
        collector.stop()
        try super.tearDownWithError()
    }

    private func start(_ extra: String = "") throws -> ShippedPluginProxy {
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: traced
            match: { paths: [/] }
            upstream: backend
            plugins:
              - name: tracing
                config: { endpoint: "\(collector.url)/v1/traces", flush_interval: 0.05,
                          service_name: orders-gw, resource_attributes: { deployment.environment: test } \(extra) }
        access_log: off
        """
        return try startShippedPluginProxy(yaml: yaml, upstream: upstream)
    }

    /// Every span the collector received, from OTLP/JSON ResourceSpans.
    private func spans(_ requests: [ScriptedRequest]) -> [[String: Any]] {
        requests.flatMap { request -> [[String: Any]] in
            guard let root = request.json as? [String: Any],
                  let resourceSpans = root["resourceSpans"] as? [[String: Any]] else { return [] }
            return resourceSpans.flatMap { rs in
                ((rs["scopeSpans"] as? [[String: Any]]) ?? []).flatMap { ($0["spans"] as? [[String: Any]]) ?? [] }
            }
        }
    }

    private func attributes(_ span: [String: Any]) -> [String: Any] {
        var out: [String: Any] = [:]
        for entry in (span["attributes"] as? [[String: Any]]) ?? [] {
            guard let key = entry["key"] as? String, let value = entry["value"] as? [String: Any] else { continue }
            out[key] = value["stringValue"] ?? value["intValue"] ?? value["doubleValue"]
        }
        return out
    }

    /// "00-<trace>-<span>-<flags>" split in its parts.
    private func parts(_ traceparent: String?) throws -> [String] {
        let parts = try XCTUnwrap(traceparent).split(separator: "-").map(String.init)
        XCTAssertEqual(parts.count, 4)
        XCTAssertNotNil(try XCTUnwrap(traceparent).range(of: "^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$", options: .regularExpression))
        return parts
    }

    func testNewTraceSpanExportedInOTLPShape() throws {
        let proxy = try start()
        defer { proxy.stop() }
        XCTAssertEqual(try proxy.connect().request("GET", "/orders/7?x=1").status, 200)
        let sent = try parts(upstream.lastRequest?.header("traceparent"))
        XCTAssertEqual(sent[3], "01", "sample_ratio 1")
        let seen = collector.waitForRequests { self.spans($0).count >= 1 }
        XCTAssertEqual(seen.first?.uri, "/v1/traces")
        XCTAssertEqual(seen.first?.header("content-type"), "application/json")
        let root = try XCTUnwrap(seen.first?.json as? [String: Any])
        let resource = try XCTUnwrap(((root["resourceSpans"] as? [[String: Any]])?.first?["resource"]) as? [String: Any])
        let resourceAttributes = attributes(resource)
        XCTAssertEqual(resourceAttributes["service.name"] as? String, "orders-gw")
        XCTAssertEqual(resourceAttributes["deployment.environment"] as? String, "test")

        let span = try XCTUnwrap(spans(seen).first)
        XCTAssertEqual(span["traceId"] as? String, sent[1], "the upstream's traceparent carries our trace")
        XCTAssertEqual(span["spanId"] as? String, sent[2], "and our span as its parent")
        XCTAssertNil(span["parentSpanId"], "a new trace has no parent")
        XCTAssertEqual(span["kind"] as? Int, 2, "SPAN_KIND_SERVER")
        XCTAssertEqual(span["name"] as? String, "GET traced")
        let start = try XCTUnwrap(UInt64(span["startTimeUnixNano"] as? String ?? ""))
        let end = try XCTUnwrap(UInt64(span["endTimeUnixNano"] as? String ?? ""))
        XCTAssertGreaterThanOrEqual(end, start)
        XCTAssertLessThan(abs(Double(start) / 1e9 - Date().timeIntervalSince1970), 60, "wall clock nanoseconds")
        let a = attributes(span)
        XCTAssertEqual(a["http.request.method"] as? String, "GET")
        XCTAssertEqual(a["url.path"] as? String, "/orders/7")
        XCTAssertEqual(a["http.route"] as? String, "traced")
        XCTAssertEqual(a["http.response.status_code"] as? String, "200", "OTLP/JSON int64 as a string")
        XCTAssertEqual(a["weir.upstream"] as? String, "backend")
        XCTAssertEqual(a["weir.upstream.target"] as? String, "127.0.0.1:\(upstream.port)")
        XCTAssertNotNil(a["weir.upstream.duration_ms"] as? Double)
        XCTAssertNil(span["status"], "not an error")
    }

    func testContinuesValidParentAndKeepsTracestate() throws {
        let proxy = try start()
        defer { proxy.stop() }
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        XCTAssertEqual(try proxy.connect().request("GET", "/status/502", headers: [
            ("traceparent", incoming), ("tracestate", "vendor=abc,other=1")]).status, 502)
        let sent = try parts(upstream.lastRequest?.header("traceparent"))
        XCTAssertEqual(sent[1], "4bf92f3577b34da6a3ce929d0e0e4736")
        XCTAssertNotEqual(sent[2], "00f067aa0ba902b7", "the upstream's parent is our span")
        XCTAssertEqual(sent[3], "01")
        XCTAssertEqual(upstream.lastRequest?.header("tracestate"), "vendor=abc,other=1")
        let span = try XCTUnwrap(spans(collector.waitForRequests { self.spans($0).count >= 1 }).first)
        XCTAssertEqual(span["traceId"] as? String, "4bf92f3577b34da6a3ce929d0e0e4736")
        XCTAssertEqual(span["parentSpanId"] as? String, "00f067aa0ba902b7")
        XCTAssertEqual(span["spanId"] as? String, sent[2])
        XCTAssertEqual(span["traceState"] as? String, "vendor=abc,other=1")
        XCTAssertEqual((span["status"] as? [String: Any])?["code"] as? Int, 2, "5xx is STATUS_CODE_ERROR")
    }

    /// Malformed parents restart the trace (and drop the orphan tracestate).
    func testMalformedTraceparentRestartsTrace() throws {
        let proxy = try start()
        defer { proxy.stop() }
        let client = try proxy.connect()
        let bad = [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",   // upper case
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",   // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",   // zero parent id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   // forbidden version
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",    // short trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // version 00 has no more fields
            "garbage",
        ]
        for value in bad {
            XCTAssertEqual(try client.request("GET", "/m", headers: [("traceparent", value), ("tracestate", "a=b")]).status, 200)
            let sent = try parts(upstream.lastRequest?.header("traceparent"))
            XCTAssertNotEqual(sent[1], "4bf92f3577b34da6a3ce929d0e0e4736", value)
            XCTAssertNotEqual(sent[1], String(repeating: "0", count: 32), value)
            XCTAssertNil(upstream.lastRequest?.header("tracestate"), value)
        }
        // A future version with extra fields is accepted (W3C: parse what we know).
        XCTAssertEqual(try client.request("GET", "/m", headers: [
            ("traceparent", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future")]).status, 200)
        XCTAssertEqual(try parts(upstream.lastRequest?.header("traceparent"))[1], "4bf92f3577b34da6a3ce929d0e0e4736")
    }

    /// The parent's sampled flag wins over sample_ratio, both ways; with
    /// ratio 0 new traces are propagated but not exported.
    func testSamplingFollowsParentAndRatio() throws {
        let never = try start(", sample_ratio: 0")
        let client = try never.connect()
        XCTAssertEqual(try client.request("GET", "/unsampled").status, 200)
        XCTAssertEqual(try parts(upstream.lastRequest?.header("traceparent"))[3], "00")
        XCTAssertEqual(try client.request("GET", "/parent-sampled", headers: [
            ("traceparent", "00-11111111111111111111111111111111-2222222222222222-01")]).status, 200)
        XCTAssertEqual(try parts(upstream.lastRequest?.header("traceparent"))[3], "01")
        let exported = spans(collector.waitForRequests { self.spans($0).count >= 1 })
        XCTAssertEqual(exported.compactMap { attributes($0)["url.path"] as? String }, ["/parent-sampled"])
        never.stop()

        let always = try start(", sample_ratio: 1")
        defer { always.stop() }
        let second = try always.connect()
        XCTAssertEqual(try second.request("GET", "/parent-unsampled", headers: [
            ("traceparent", "00-33333333333333333333333333333333-4444444444444444-00")]).status, 200)
        XCTAssertEqual(try parts(upstream.lastRequest?.header("traceparent"))[3], "00")
        XCTAssertEqual(try second.request("GET", "/marker").status, 200)
        let all = spans(collector.waitForRequests { self.spans($0).count >= 2 })
        XCTAssertEqual(all.compactMap { attributes($0)["url.path"] as? String }, ["/parent-sampled", "/marker"],
                       "the unsampled parent's request was not exported")
    }

    func testSpansAreBatched() throws {
        let proxy = try start(", batch_size: 5, flush_interval: 3600")
        defer { proxy.stop() }
        let client = try proxy.connect()
        for i in 0..<10 { XCTAssertEqual(try client.request("GET", "/b\(i)").status, 200) }
        let seen = collector.waitForRequests { $0.count >= 2 }
        XCTAssertEqual(seen.count, 2)
        XCTAssertEqual(seen.map { spans([$0]).count }, [5, 5])
    }

    func testCollectorDownDoesNotAffectRequests() throws {
        collector.stop()
        let proxy = try start(", retries: 0, timeout: 0.2")
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<10 { XCTAssertEqual(try client.request("GET", "/down").status, 200) }
        XCTAssertEqual(upstream.requests.count, 10)
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        for (extra, expected) in [(", sample_ratio: 1.5", "config.sample_ratio"), (", batch_size: 0", "config.batch_size"),
                                  (", resource_attributes: { a: [b] }", "config.resource_attributes.a")] {
            XCTAssertThrowsError(try start(extra), extra) { error in
                XCTAssertTrue("\(error)".contains("routes[0].plugins[0]." + expected), "\(extra): \(error)")
            }
        }
    }
}
