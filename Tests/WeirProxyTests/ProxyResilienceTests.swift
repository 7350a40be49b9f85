import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import WeirTestSupport
import XCTest

/// Retries, balancing over targets, stale pooled connections, pool limits
/// and graceful drain.
final class ProxyResilienceTests: XCTestCase {
    var upstreamGroup: MultiThreadedEventLoopGroup!
    var proxy: ProxyHarness?

    override func setUpWithError() throws {
        upstreamGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        proxy?.stop()
        try? upstreamGroup?.syncShutdownGracefully()
    }

    /// An upstream that answers every request with 503.
    private func failingUpstream() throws -> RawUpstream {
        try RawUpstream(group: upstreamGroup) { channel, buffer in
            let text = String(decoding: buffer.readableBytesView, as: UTF8.self)
            guard let end = text.range(of: "\r\n\r\n") else { return }
            buffer.moveReaderIndex(forwardBy: text.utf8.distance(from: text.startIndex, to: end.upperBound))
            channel.writeAndFlush(ByteBuffer(string: "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"), promise: nil)
        }
    }

    func testRoundRobinSpreadsOverTargets() throws {
        let a = try TestUpstream(name: "a", group: upstreamGroup)
        let b = try TestUpstream(name: "b", group: upstreamGroup)
        defer { a.stop(); b.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [a.address, b.address]), loops: 1)
        self.proxy = proxy
        let client = try proxy.connect()
        var names: [String] = []
        for _ in 0..<6 { names.append(try client.request("GET", "/").header("x-upstream") ?? "?") }
        XCTAssertEqual(names.filter { $0 == "a" }.count, 3, "\(names)")
        XCTAssertEqual(names.filter { $0 == "b" }.count, 3, "\(names)")
    }

    func testConsistentHashOnHeaderKeepsAKeyOnOneTarget() throws {
        let a = try TestUpstream(name: "a", group: upstreamGroup)
        let b = try TestUpstream(name: "b", group: upstreamGroup)
        let c = try TestUpstream(name: "c", group: upstreamGroup)
        defer { a.stop(); b.stop(); c.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [a.address, b.address, c.address]) {
            $0.upstreams[0].balancer = .consistentHash
            $0.upstreams[0].hashOn = .header("x-user")
        })
        self.proxy = proxy
        var seenTargets = Set<String>()
        for user in 0..<12 {
            var targets = Set<String>()
            for _ in 0..<3 {
                let client = try proxy.connect()   // new connections may land on either loop
                targets.insert(try client.request("GET", "/", headers: [("X-User", "user-\(user)")]).header("x-upstream") ?? "?")
            }
            XCTAssertEqual(targets.count, 1, "user-\(user) went to \(targets)")
            seenTargets.formUnion(targets)
        }
        XCTAssertGreaterThan(seenTargets.count, 1, "keys spread over targets")
    }

    func testConnectFailureIsRetriedOnAnotherTarget() throws {
        let good = try TestUpstream(name: "good", group: upstreamGroup)
        defer { good.stop() }
        let dead = HostPort(host: "127.0.0.1", port: try refusingPort())
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [dead, good.address]) { $0.upstreams[0].retries = 1 }, loops: 1)
        self.proxy = proxy
        let client = try proxy.connect()
        for i in 0..<6 {
            // POST too: nothing was sent on a failed connect, so even a body is safe to retry.
            let response = i % 2 == 0 ? try client.request("GET", "/r\(i)") : try client.request("POST", "/sink", body: "abc")
            XCTAssertEqual(response.status, 200)
            XCTAssertEqual(response.header("x-upstream"), "good")
        }
        XCTAssertTrue(proxy.observer.records.contains { $0.attempts == 2 })
    }

    func testIdempotentRequestIsRetriedOn503ButPostIsNot() throws {
        let good = try TestUpstream(name: "good", group: upstreamGroup)
        let bad = try failingUpstream()
        defer { good.stop(); bad.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [bad.address, good.address]) { $0.upstreams[0].retries = 1 }, loops: 1)
        self.proxy = proxy
        let client = try proxy.connect()
        for i in 0..<4 {
            let response = try client.request("GET", "/g\(i)")
            XCTAssertEqual(response.status, 200, "GET must be retried away from the 503")
        }
        var statuses: [Int] = []
        for _ in 0..<4 {
            statuses.append(try client.request("POST", "/sink", body: "x").status)
        }
        XCTAssertTrue(statuses.contains(503), "a POST with a body is never retried: \(statuses)")
        XCTAssertTrue(statuses.contains(200))
    }

    func testStalePooledConnectionIsReplacedTransparently() throws {
        let upstream = try TestUpstream(name: "u", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) { $0.upstreams[0].retries = 0 }, loops: 1)
        self.proxy = proxy
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/one").status, 200)
        // The upstream closes its keep-alive connection behind the proxy's back
        // (the next request may hit it before the close is noticed).
        XCTAssertEqual(try client.request("GET", "/close").status, 200)
        for i in 0..<5 {
            XCTAssertEqual(try client.request("GET", "/after/\(i)").status, 200)
        }
    }

    func testMaxRequestsPerUpstreamConnection() throws {
        let upstream = try TestUpstream(name: "u", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) { $0.upstreams[0].pool.maxRequests = 2 }, loops: 1)
        self.proxy = proxy
        let client = try proxy.connect()
        for i in 0..<6 { XCTAssertEqual(try client.request("GET", "/m\(i)").status, 200) }
        XCTAssertEqual(upstream.connectionsAccepted, 3)
    }

    func testIdleUpstreamConnectionsExpire() throws {
        let upstream = try TestUpstream(name: "u", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) {
            $0.upstreams[0].pool.idleTimeout = .milliseconds(200)
        }, loops: 1)
        self.proxy = proxy
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/1").status, 200)
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(try client.request("GET", "/2").status, 200)
        XCTAssertEqual(upstream.connectionsAccepted, 2, "the idle connection was closed after idle_timeout")
    }

    func testDrainLetsInFlightRequestFinishAndClosesIdleConnections() throws {
        let upstream = try TestUpstream(name: "u", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]))
        self.proxy = proxy
        let idle = try proxy.connect()
        XCTAssertEqual(try idle.request("GET", "/warm").status, 200)
        let busy = try proxy.connect()
        try busy.send("GET /slow/400 HTTP/1.1\r\nHost: a\r\n\r\n")
        // Drain must begin while that request is in flight.
        XCTAssertTrue(waitUntil { upstream.requests.count == 2 })
        XCTAssertEqual(proxy.server.activeConnections, 2)
        let drained = proxy.server.waitForDrain(timeout: .seconds(5))
        // The in-flight request completes, marked as the last on its connection.
        let response = try busy.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "slow from u")
        XCTAssertEqual(response.header("connection"), "close")
        XCTAssertTrue(busy.waitForClose())
        XCTAssertTrue(idle.waitForClose())
        try drained.wait()
        XCTAssertEqual(proxy.server.activeConnections, 0)
        // No longer accepting.
        XCTAssertThrowsError(try proxy.connect())
    }

    func testDrainTimeoutForceClosesStuckRequests() throws {
        let upstream = try TestUpstream(name: "u", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) { $0.upstreams[0].timeouts.read = .seconds(30) })
        self.proxy = proxy
        let stuck = try proxy.connect()
        try stuck.send("GET /slow/20000 HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertTrue(waitUntil { upstream.requests.count == 1 })
        try proxy.server.waitForDrain(timeout: .milliseconds(300)).wait()
        XCTAssertTrue(stuck.waitForClose())
        XCTAssertEqual(proxy.server.activeConnections, 0)
    }

    func testObserverSeesConnectionsAndRequests() throws {
        let upstream = try TestUpstream(name: "u", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]))
        self.proxy = proxy
        do {
            let client = try proxy.connect()
            XCTAssertEqual(try client.request("POST", "/sink", body: "12345").status, 200)
            let record = try XCTUnwrap(proxy.observer.records.first)
            XCTAssertEqual(record.method, "POST")
            XCTAssertEqual(record.path, "/sink")
            XCTAssertEqual(record.upstream, "backend")
            XCTAssertEqual(record.upstreamTarget, upstream.address.description)
            XCTAssertEqual(record.bytesIn, 5)
            XCTAssertEqual(record.bytesOut, 1)
            XCTAssertEqual(record.attempts, 1)
            XCTAssertEqual(record.listener, "web")
            XCTAssertEqual(record.clientAddress, "127.0.0.1")
            XCTAssertGreaterThan(record.startTime, 1_600_000_000)
        }
        XCTAssertEqual(proxy.observer.opened, 1)
    }
}
