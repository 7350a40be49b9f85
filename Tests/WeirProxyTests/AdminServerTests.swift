import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WeirAdmin
import WeirCore
import WeirProxy
import XCTest

/// The admin listener over a real loopback socket.
final class AdminServerTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!

    override func setUp() { group = MultiThreadedEventLoopGroup(numberOfThreads: 1) }
    override func tearDown() { try? group.syncShutdownGracefully() }

    func testEndpoints() throws {
        let ready = NIOLockedValueBox(false)
        let metrics = MetricsRegistry()
        metrics.recordRequest(AdminMetricsTests.record(route: "api", upstream: "orders", status: 200))
        let endpoints = AdminEndpoints(
            isReady: { ready.withLockedValue { $0 } },
            metricsText: { metrics.renderPrometheus() },
            configText: { "listeners:\n  - name: web\n" })
        let server = AdminServer(listen: HostPort(host: "127.0.0.1", port: 0), group: group, endpoints: endpoints,
                                 logger: Logger(label: "test"))
        try server.start().wait()
        defer { try? server.stop().wait() }
        let port = try XCTUnwrap(server.boundAddress?.port)

        let health = try OpsTestHTTP.request(port: port, path: "/healthz", group: group)
        XCTAssertEqual(health.status, 200)
        XCTAssertEqual(health.body, "{\"status\":\"ok\"}\n")
        XCTAssertEqual(health.headers.first(name: "content-type"), "application/json")

        XCTAssertEqual(try OpsTestHTTP.request(port: port, path: "/ready", group: group).status, 503)
        ready.withLockedValue { $0 = true }
        let readyResponse = try OpsTestHTTP.request(port: port, path: "/ready", group: group)
        XCTAssertEqual(readyResponse.status, 200)
        XCTAssertEqual(readyResponse.body, "{\"status\":\"ready\"}\n")

        let metricsResponse = try OpsTestHTTP.request(port: port, path: "/metrics", group: group)
        XCTAssertEqual(metricsResponse.status, 200)
        XCTAssertEqual(metricsResponse.headers.first(name: "content-type"), "text/plain; version=0.0.4; charset=utf-8")
        XCTAssertTrue(metricsResponse.body.contains(
            #"weir_requests_total{route="api",upstream="orders",status_class="2xx"} 1"#), metricsResponse.body)
        try AdminMetricsTests.assertValidExposition(metricsResponse.body)

        let config = try OpsTestHTTP.request(port: port, path: "/config", group: group)
        XCTAssertEqual(config.status, 200)
        XCTAssertEqual(config.body, "listeners:\n  - name: web\n")

        let missing = try OpsTestHTTP.request(port: port, path: "/nope?x=1", group: group)
        XCTAssertEqual(missing.status, 404)
        XCTAssertEqual(missing.body, "{\"error\":\"not found\",\"path\":\"/nope\"}\n")

        let post = try OpsTestHTTP.request(port: port, method: .POST, path: "/healthz", group: group)
        XCTAssertEqual(post.status, 405)
        XCTAssertTrue(post.body.contains("method not allowed"))
    }

    func testBindFailureIsReported() throws {
        let endpoints = AdminEndpoints(isReady: { true }, metricsText: { "" }, configText: { "" })
        let first = AdminServer(listen: HostPort(host: "127.0.0.1", port: 0), group: group, endpoints: endpoints,
                                logger: Logger(label: "test"))
        try first.start().wait()
        defer { try? first.stop().wait() }
        let port = try XCTUnwrap(first.boundAddress?.port)
        let second = AdminServer(listen: HostPort(host: "127.0.0.1", port: port), group: group, endpoints: endpoints,
                                 logger: Logger(label: "test"))
        XCTAssertThrowsError(try second.start().wait())
    }
}
