import Foundation
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

        XCTAssertEqual(try OpsTestHTTP.request(port: port, path: "/upstreams", group: group).status, 404,
                       "not wired here")

        let post = try OpsTestHTTP.request(port: port, method: .POST, path: "/healthz", group: group)
        XCTAssertEqual(post.status, 405)
        XCTAssertTrue(post.body.contains("method not allowed"))
    }

    func testUpstreamsReportShowsEachTargetsHealth() throws {
        var upstream = UpstreamConfig()
        upstream.name = "orders"
        upstream.targets = [TargetConfig(address: HostPort(host: "127.0.0.1", port: 9001), weight: 3),
                            TargetConfig(address: HostPort(host: "127.0.0.1", port: 9002)),
                            TargetConfig(address: HostPort(host: "127.0.0.1", port: 9003))]
        var active = ActiveHealthCheck()
        active.unhealthy = 1
        upstream.healthCheck.active = active
        var passive = PassiveHealthCheck()
        passive.consecutiveFailures = 1
        upstream.healthCheck.passive = passive
        let health = UpstreamHealth(upstream: upstream)
        health.recordProbe(1, healthy: false)
        health.recordFailure(2, now: MonotonicClock.now())
        var other = UpstreamConfig()
        other.name = "plain"
        other.targets = [TargetConfig(address: HostPort(host: "::1", port: 80))]

        let configured = [upstream, other]
        let endpoints = AdminEndpoints(
            isReady: { true }, metricsText: { "" }, configText: { "" },
            upstreamsJSON: { UpstreamStatusReport.json(upstreams: configured, health: { $0 == "orders" ? health : nil }) })
        let server = AdminServer(listen: HostPort(host: "127.0.0.1", port: 0), group: group, endpoints: endpoints,
                                 logger: Logger(label: "test"))
        try server.start().wait()
        defer { try? server.stop().wait() }
        let response = try OpsTestHTTP.request(port: try XCTUnwrap(server.boundAddress?.port), path: "/upstreams",
                                               group: group)
        XCTAssertEqual(response.status, 200)
        let root = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any])
        let upstreams = try XCTUnwrap(root["upstreams"] as? [[String: Any]])
        XCTAssertEqual(upstreams.map { $0["name"] as? String }, ["orders", "plain"])
        XCTAssertEqual(upstreams[0]["healthy_targets"] as? Int, 1)
        let targets = try XCTUnwrap(upstreams[0]["targets"] as? [[String: Any]])
        XCTAssertEqual(targets.map { $0["status"] as? String }, ["healthy", "unhealthy", "ejected"])
        XCTAssertEqual(targets.map { $0["address"] as? String }, ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"])
        XCTAssertEqual(targets[0]["weight"] as? Int, 3)
        XCTAssertEqual(targets[2]["ejections"] as? Int, 1)
        let plainTargets = try XCTUnwrap(upstreams[1]["targets"] as? [[String: Any]])
        XCTAssertEqual(plainTargets.first?["address"] as? String, "[::1]:80")
        XCTAssertEqual(plainTargets.first?["status"] as? String, "healthy")
    }

    func testExtraRoutesGetTheBodyAndMayAnswerLater() throws {
        struct Broken: Error {}
        let echo = AdminRoute(method: .POST, path: "/echo") { request, loop in
            // Answer from another moment (and loop) than the request's, like a reload would.
            loop.scheduleTask(in: .milliseconds(20)) {
                AdminResponse.json(.ok, #"{"query":"\#(request.query ?? "")","bytes":\#(request.body.readableBytes)}"#)
            }.futureResult
        }
        let failing = AdminRoute(method: .POST, path: "/fail") { _, loop in loop.makeFailedFuture(Broken()) }
        let endpoints = AdminEndpoints(isReady: { true }, metricsText: { "" }, configText: { "" },
                                       routes: [echo, failing])
        let server = AdminServer(listen: HostPort(host: "127.0.0.1", port: 0), group: group, endpoints: endpoints,
                                 logger: Logger(label: "test"))
        try server.start().wait()
        defer { try? server.stop().wait() }
        let address = HostPort(host: "127.0.0.1", port: try XCTUnwrap(server.boundAddress?.port))

        let posted = try AdminClient.send(method: .POST, to: address, path: "/echo?x=1", body: String(repeating: "a", count: 5000))
        XCTAssertEqual(posted.status, 200)
        XCTAssertEqual(posted.body, "{\"query\":\"x=1\",\"bytes\":5000}\n")

        let wrongMethod = try AdminClient.send(method: .GET, to: address, path: "/echo")
        XCTAssertEqual(wrongMethod.status, 405)
        XCTAssertTrue(wrongMethod.body.contains(#""allowed":["POST"]"#), wrongMethod.body)

        let tooBig = try AdminClient.send(method: .POST, to: address, path: "/echo",
                                          body: String(repeating: "b", count: AdminServer.maxBodyBytes + 1))
        XCTAssertEqual(tooBig.status, 413)

        let failed = try AdminClient.send(method: .POST, to: address, path: "/fail")
        XCTAssertEqual(failed.status, 500)
        XCTAssertTrue(failed.body.contains("error"), failed.body)

        XCTAssertEqual(try AdminClient.send(method: .GET, to: address, path: "/healthz").status, 200,
                       "built-in endpoints still answer")
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
