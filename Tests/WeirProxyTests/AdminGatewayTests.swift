import Foundation
import Logging
import NIOCore
import NIOPosix
import WeirAdmin
import WeirCore
import WeirProxy
import XCTest

/// The observer wired to the real proxy in-process: what a request through
/// the data path leaves in /metrics and in the access log.
final class AdminGatewayTests: XCTestCase {
    /// A demo origin (100-byte bodies) behind a proxy with `observer`; route
    /// `api` strips /api. Stopped when the test ends. Returns the proxy's port.
    private func startProxy(observer: GatewayObserver) throws -> (port: Int, originPort: Int, group: EventLoopGroup) {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        addTeardownBlock { try? group.syncShutdownGracefully() }
        let origin = DemoUpstream(listen: HostPort(host: "127.0.0.1", port: 0), bodySize: 100, group: group)
        try origin.start().wait()
        addTeardownBlock { _ = try? origin.stop().wait() }
        let originPort = try XCTUnwrap(origin.boundAddress?.port)
        let config = try ConfigLoader.parse(yaml: """
            listeners:
              - { name: web, listen: "127.0.0.1:0" }
            upstreams:
              - { name: demo, targets: [{ address: "127.0.0.1:\(originPort)" }] }
            routes:
              - { name: api, match: { paths: [/api] }, upstream: demo, strip_path: true }
            """)
        let proxy = ProxyServer(config: config, group: group, observer: observer, logger: Logger(label: "test"))
        try proxy.start()
        addTeardownBlock { proxy.shutdown() }
        return (try XCTUnwrap(proxy.boundAddresses["web"]?.port), originPort, group)
    }

    /// 200 and 503 through route `api`, 404 for no route.
    private func sendThreeRequests(port: Int, group: EventLoopGroup) throws {
        XCTAssertEqual(try OpsTestHTTP.request(port: port, path: "/api/x", group: group).status, 200)
        XCTAssertEqual(try OpsTestHTTP.request(port: port, path: "/api/status/503", group: group).status, 503)
        XCTAssertEqual(try OpsTestHTTP.request(port: port, path: "/elsewhere", group: group).status, 404)
    }

    func testProxiedRequestsShowUpInMetricsAndAccessLog() throws {
        let logPath = FileManager.default.temporaryDirectory.appendingPathComponent("weir-gw-\(UUID().uuidString).log").path
        defer { try? FileManager.default.removeItem(atPath: logPath) }
        let observer = GatewayObserver(accessLog: try AccessLogWriter.make(target: .file(logPath)))
        let (port, originPort, group) = try startProxy(observer: observer)
        try sendThreeRequests(port: port, group: group)

        // Records are reported when the response is done; connections close just after.
        OpsTestHTTP.eventually("three requests recorded, connections closed") {
            let snapshot = observer.metrics.snapshot()
            return snapshot.requestCount(route: "api") + snapshot.requestCount(route: "") == 3
                && snapshot.connections["web"].map { $0.opened == 3 && $0.closed == 3 } == true
        }
        let text = observer.metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"weir_requests_total{route="api",upstream="demo",status_class="2xx"} 1"#), text)
        XCTAssertTrue(text.contains(#"weir_requests_total{route="api",upstream="demo",status_class="5xx"} 1"#), text)
        XCTAssertTrue(text.contains(#"weir_requests_total{route="",upstream="",status_class="4xx"} 1"#), text)
        XCTAssertTrue(text.contains(#"weir_upstream_duration_seconds_count{upstream="demo"} 2"#), text)
        XCTAssertTrue(text.contains(#"weir_active_connections{listener="web"} 0"#), text)
        try AdminMetricsTests.assertValidExposition(text)

        observer.accessLog?.flush()
        let lines = try String(contentsOfFile: logPath, encoding: .utf8).split(separator: "\n")
        // Lines from different event loops are batched separately: order by path.
        let entries = try lines.map { try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]) }
            .sorted { ($0["path"] as? String ?? "") < ($1["path"] as? String ?? "") }
        XCTAssertEqual(entries.map { $0["path"] as? String }, ["/api/status/503", "/api/x", "/elsewhere"])
        XCTAssertEqual(entries.map { $0["status"] as? Int }, [503, 200, 404])
        XCTAssertEqual(entries[1]["upstream_target"] as? String, "127.0.0.1:\(originPort)")
        XCTAssertEqual(entries[1]["bytes_out"] as? Int, 100)
        XCTAssertTrue(entries[2]["route"] is NSNull)
        XCTAssertTrue(entries.allSatisfy { ($0["request_id"] as? String)?.isEmpty == false })
    }

    /// Without an access log the data path reports a `RequestSample` per
    /// request instead of an `AccessRecord`: metrics must count the same.
    func testMetricsWithoutAccessLogCountFromSamples() throws {
        let observer = GatewayObserver(accessLog: nil)
        XCTAssertFalse(observer.wantsAccessRecords)
        let (port, _, group) = try startProxy(observer: observer)
        try sendThreeRequests(port: port, group: group)
        OpsTestHTTP.eventually("three requests recorded") {
            let snapshot = observer.metrics.snapshot()
            return snapshot.requestCount(route: "api") + snapshot.requestCount(route: "") == 3
        }
        let text = observer.metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"weir_requests_total{route="api",upstream="demo",status_class="2xx"} 1"#), text)
        XCTAssertTrue(text.contains(#"weir_requests_total{route="api",upstream="demo",status_class="5xx"} 1"#), text)
        XCTAssertTrue(text.contains(#"weir_requests_total{route="",upstream="",status_class="4xx"} 1"#), text)
        XCTAssertTrue(text.contains(#"weir_upstream_duration_seconds_count{upstream="demo"} 2"#), text)
        try AdminMetricsTests.assertValidExposition(text)
    }
}
