import NIOCore
import NIOEmbedded
import NIOPosix
@testable import WeirProxy
import WeirCore
import XCTest

/// The upstream connection pool keeps connections through a burst (beyond
/// `max_idle`) and trims the excess once it has been idle for a sweep.
final class UpstreamPoolTests: XCTestCase {
    /// The sweeper's rule, on NIO's EmbeddedChannel (no sockets, no clock).
    func testSweepTrimsOnlyExcessThatStayedIdleThroughAnInterval() throws {
        let loop = EmbeddedEventLoop()
        var poolConfig = ConnectionPoolConfig()
        poolConfig.maxIdle = 1
        let pool = TargetPool(targetIndex: 0, target: TargetConfig(address: HostPort(host: "127.0.0.1", port: 9)),
                              pool: poolConfig, connectTimeout: .seconds(1), loop: loop)
        var channels: [EmbeddedChannel] = []
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
        for _ in 0..<4 {
            let handler = UpstreamHandler()
            let channel = EmbeddedChannel(handler: handler, loop: loop)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
            channels.append(channel)
            pool.release(UpstreamConnection(channel: channel, handler: handler, targetIndex: 0, pool: pool), now: t0)
        }
        XCTAssertEqual(pool.idleCount, 4, "released in a burst: all kept, beyond max_idle")
        // First sweep after the burst: they were idle for less than an interval.
        pool.sweep(now: t0 + .milliseconds(10))
        XCTAssertEqual(pool.idleCount, 4)
        // Next sweep: still idle since before the previous one: trimmed to max_idle.
        pool.sweep(now: t0 + .seconds(5))
        XCTAssertEqual(pool.idleCount, 1)
        XCTAssertEqual(channels.filter { !$0.isActive }.count, 3, "the three oldest were closed")
        XCTAssertTrue(channels[3].isActive, "the most recently released (warmest) stays")
        // The one kept is handed out again.
        XCTAssertNotNil(pool.takeIdle(now: t0 + .seconds(5)))
        for channel in channels where channel.isActive { _ = try? channel.finish() }
    }

    func testMaxIdleZeroKeepsNothing() throws {
        let loop = EmbeddedEventLoop()
        var poolConfig = ConnectionPoolConfig()
        poolConfig.maxIdle = 0
        let pool = TargetPool(targetIndex: 0, target: TargetConfig(address: HostPort(host: "127.0.0.1", port: 9)),
                              pool: poolConfig, connectTimeout: .seconds(1), loop: loop)
        let handler = UpstreamHandler()
        let channel = EmbeddedChannel(handler: handler, loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
        pool.release(UpstreamConnection(channel: channel, handler: handler, targetIndex: 0, pool: pool), now: .now())
        XCTAssertEqual(pool.idleCount, 0)
        XCTAssertFalse(channel.isActive)
    }

    /// Through the proxy on real sockets: a second burst as wide as the first
    /// reuses every connection although `max_idle` is 1.
    func testBurstWiderThanMaxIdleReusesConnections() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let upstream = try TestUpstream(name: "u", group: group)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) {
            $0.upstreams[0].pool.maxIdle = 1
        }, loops: 1)
        defer { proxy.stop() }
        let clients = try (0..<4).map { _ in try proxy.connect() }
        func burst() throws {
            for client in clients { try client.send("GET /slow/300 HTTP/1.1\r\nHost: a\r\n\r\n") }
            for client in clients { XCTAssertEqual(try client.readResponse().status, 200) }
        }
        try burst()
        XCTAssertEqual(upstream.connectionsAccepted, 4, "four requests at once: four upstream connections")
        try burst()
        XCTAssertEqual(upstream.connectionsAccepted, 4, "the second burst reused them (none closed at release)")
    }
}
