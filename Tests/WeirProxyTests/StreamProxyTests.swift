// tcp listeners through real loopback sockets: echo, a real
// server-speaks-first protocol (redis-server), half-close, idle timeout,
// balancing, a dead target, max_connections, metrics and the access log.

import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import WeirTestSupport
import XCTest

final class StreamProxyTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!

    override func setUp() {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        try? group.syncShutdownGracefully()
    }

    func testEchoSmallAndLargeThroughTCPListener() throws {
        let echo = try TCPTestServer(group: group)
        defer { echo.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [echo.address]))
        defer { proxy.stop() }

        let client = try proxy.connect("tcp")
        try client.send("hello")
        XCTAssertEqual(client.readString(5), "hello")

        // 4 MiB each way at once: the relay must keep both directions moving
        // (the client reads while it writes, so backpressure is exercised).
        let size = 4 << 20
        let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        let sender = Thread { try? client.send(payload) }
        sender.start()
        let echoed = client.read(size)
        XCTAssertEqual(echoed?.count, size)
        XCTAssertTrue(echoed == payload, "echoed bytes differ")
    }

    func testClientThatStopsReadingStopsTheUpstreamBeingRead() throws {
        // The upstream sends as fast as its socket takes bytes; the client
        // reads nothing. With backpressure the proxy stops reading the
        // upstream once the client side is full, so the upstream stalls after
        // what the socket buffers on the way hold (tens of MB at most with
        // this machine's tcp_rmem/tcp_wmem); without it the proxy would read
        // all 128 MiB into memory.
        let total = 128 << 20
        let source = try FloodServer(group: group, total: total)
        defer { source.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [source.address]))
        defer { proxy.stop() }

        let client = try proxy.connect("tcp")
        XCTAssertTrue(waitUntil { source.written > 0 }, "the upstream never started sending")
        let stalled = source.writtenOnceSteady()
        XCTAssertLessThan(stalled, total / 2, "the upstream was read while the client read nothing")

        // Reading resumes the flow, and what arrives is the upstream's stream in order.
        let first = client.read(8 << 20)
        XCTAssertEqual(first.map { Array($0.prefix(4096)) }, FloodServer.bytes(from: 0, count: 4096))
        XCTAssertTrue(waitUntil { source.written > stalled }, "reads did not resume after the client read")
    }

    func testRedisThroughTCPListener() throws {
        try XCTSkipUnless(RedisServerProcess.isAvailable, "redis-server not installed")
        let redis = try RedisServerProcess()
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [HostPort(host: "127.0.0.1", port: redis.port)]))
        defer { proxy.stop() }

        let client = try proxy.connect("tcp")
        try client.send("*1\r\n$4\r\nPING\r\n")
        XCTAssertEqual(client.readString(7), "+PONG\r\n")
        try client.send("*3\r\n$3\r\nSET\r\n$6\r\nweir:k\r\n$7\r\nthrough\r\n")
        XCTAssertEqual(client.readString(5), "+OK\r\n")
        try client.send("*2\r\n$3\r\nGET\r\n$6\r\nweir:k\r\n")
        XCTAssertEqual(client.readString(13), "$7\r\nthrough\r\n")
        // The value really is in the server (read with redis-cli, not through us).
        XCTAssertEqual(try redis.cli("GET", "weir:k"), "through")
    }

    func testServerSpeaksFirst() throws {
        let server = try TCPTestServer(group: group, greeting: "220 ready\r\n")
        defer { server.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [server.address]))
        defer { proxy.stop() }
        let client = try proxy.connect("tcp")
        XCTAssertEqual(client.readString(11), "220 ready\r\n")
    }

    func testHalfCloseFromClientStillReceivesServerData() throws {
        // The server answers 200 ms after the client's FIN: that data must
        // still reach the client, then the server's FIN ends the stream.
        let server = try TCPTestServer(group: group, lateReply: "late reply", lateReplyDelay: .milliseconds(200))
        defer { server.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [server.address]))
        defer { proxy.stop() }

        let client = try proxy.connect("tcp")
        try client.send("abc")
        XCTAssertEqual(client.readString(3), "abc")
        client.shutdownWrite()
        let (rest, end) = client.readToEnd()
        XCTAssertEqual(String(decoding: rest, as: UTF8.self), "late reply")
        XCTAssertEqual(end, StreamClient.ReadEnd.eof)
        XCTAssertEqual(server.receivedBytes, Array("abc".utf8))

        XCTAssertTrue(waitUntil { proxy.streamLogLines().count == 1 })
        let line = proxy.streamLogLines()[0]
        XCTAssertEqual(line["outcome"] as? String, "closed")
        XCTAssertEqual(line["bytes_in"] as? Int, 3)
        XCTAssertEqual(line["bytes_out"] as? Int, 3 + "late reply".utf8.count)
        XCTAssertEqual(line["upstream"] as? String, "backend")
        XCTAssertEqual(line["upstream_target"] as? String, server.address.description)
        XCTAssertEqual(line["protocol"] as? String, "tcp")
    }

    func testHalfCloseFromServerKeepsClientToServerFlowing() throws {
        // A server that sends a banner and FINs its side at once but keeps
        // reading: what the client sends afterwards must still arrive.
        let received = NIOLockedValueBox<[UInt8]>([])
        let server = try ServerBootstrap(group: group)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(BannerThenFIN(received: received))
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? server.close().wait() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [HostPort(host: "127.0.0.1", port: server.localAddress!.port!)]))
        defer { proxy.stop() }

        let client = try proxy.connect("tcp")
        let (banner, end) = client.readToEnd()
        XCTAssertEqual(String(decoding: banner, as: UTF8.self), "bye")
        XCTAssertEqual(end, StreamClient.ReadEnd.eof)
        try client.send("still here")
        XCTAssertTrue(waitUntil { received.withLockedValue { $0 } == Array("still here".utf8) })
    }

    func testIdleTimeoutClosesBothSides() throws {
        let echo = try TCPTestServer(group: group)
        defer { echo.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [echo.address]) {
            $0.listeners[0].stream.idleTimeout = .milliseconds(200)
        })
        defer { proxy.stop() }

        let client = try proxy.connect("tcp")
        try client.send("x")
        XCTAssertEqual(client.readString(1), "x")
        let (_, end) = client.readToEnd()          // nothing is sent: the proxy closes
        XCTAssertEqual(end, StreamClient.ReadEnd.eof)
        XCTAssertTrue(waitUntil { proxy.streamLogLines().first?["outcome"] as? String == "idle_timeout" })
    }

    func testTrafficKeepsTheIdleTimerAway() throws {
        // The idle timer sees activity only through the relayed byte counts:
        // a connection that keeps talking for well past the timeout stays
        // open, and every byte is in the access record. (The timeout is 10
        // gaps long, so a test thread stalled on a busy machine is no close.)
        let echo = try TCPTestServer(group: group)
        defer { echo.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [echo.address]) {
            $0.listeners[0].stream.idleTimeout = .seconds(1)
        })
        defer { proxy.stop() }

        let client = try proxy.connect("tcp")
        let rounds = 25                             // 2.5 s of traffic, 100 ms apart
        for i in 0..<rounds {
            try client.send("\(i % 10)")
            XCTAssertEqual(client.readString(1), "\(i % 10)", "round \(i): the busy connection was closed")
            Thread.sleep(forTimeInterval: 0.1)
        }
        client.shutdownWrite()
        _ = client.readToEnd()
        XCTAssertTrue(waitUntil { !proxy.streamLogLines().isEmpty })
        let line = proxy.streamLogLines()[0]
        XCTAssertEqual(line["outcome"] as? String, "closed")
        XCTAssertEqual(line["bytes_in"] as? Int, rounds)
        XCTAssertEqual(line["bytes_out"] as? Int, rounds + "<eof>".utf8.count)
    }

    func testRoundRobinAcrossTwoTargets() throws {
        let a = try TCPTestServer(group: group, greeting: "A")
        let b = try TCPTestServer(group: group, greeting: "B")
        defer { a.stop(); b.stop() }
        // One loop, so the balancer's rotation is observable from one client.
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [a.address, b.address]), loops: 1)
        defer { proxy.stop() }
        var seen: [String] = []
        for _ in 0..<4 {
            let client = try proxy.connect("tcp")
            seen.append(client.readString(1) ?? "?")
        }
        XCTAssertEqual(seen.sorted(), ["A", "A", "B", "B"])
        XCTAssertNotEqual(seen[0], seen[1])
    }

    func testConsistentHashOnClientIPSticksToOneTarget() throws {
        let a = try TCPTestServer(group: group, greeting: "A")
        let b = try TCPTestServer(group: group, greeting: "B")
        defer { a.stop(); b.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [a.address, b.address]) {
            $0.upstreams[0].balancer = .consistentHash
        })
        defer { proxy.stop() }
        var seen = Set<String>()
        for _ in 0..<6 { seen.insert(try proxy.connect("tcp").readString(1) ?? "?") }
        XCTAssertEqual(seen.count, 1, "one client IP, one target")
    }

    func testDeadTargetIsSkipped() throws {
        let live = try TCPTestServer(group: group, greeting: "L")
        defer { live.stop() }
        let dead = HostPort(host: "127.0.0.1", port: try refusingPort())
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [dead, live.address]) {
            $0.upstreams[0].retries = 1
            var passive = PassiveHealthCheck()
            passive.consecutiveFailures = 1
            $0.upstreams[0].healthCheck.passive = passive
        }, loops: 1)
        defer { proxy.stop() }
        for _ in 0..<4 {
            XCTAssertEqual(try proxy.connect("tcp").readString(1), "L")
        }
        XCTAssertEqual(proxy.server.upstreamHealth(named: "backend")?.isHealthy(0, now: MonotonicClock.now()), false)
        XCTAssertTrue(waitUntil { proxy.streamLogLines().count == 4 })
        XCTAssertTrue(proxy.streamLogLines().contains { $0["attempts"] as? Int == 2 }, "one connection retried past the dead target")
    }

    func testActiveTCPCheckTakesADeadTargetOutBeforeAnyClientTriesIt() throws {
        let live = try TCPTestServer(group: group, greeting: "L")
        defer { live.stop() }
        let dead = HostPort(host: "127.0.0.1", port: try refusingPort())
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [dead, live.address]) {
            var active = ActiveHealthCheck()
            active.type = .tcp
            // The dead target refuses at once; a generous timeout keeps a
            // slow connect on a loaded machine from marking the live one down.
            active.interval = .milliseconds(50)
            active.timeout = .seconds(2)
            active.unhealthy = 1
            $0.upstreams[0].healthCheck.active = active
            $0.upstreams[0].retries = 0
        }, loops: 1)
        defer { proxy.stop() }
        var logger = Logger(label: "weir.test.l4.health")
        logger.logLevel = .critical
        let checker = ActiveHealthChecker(upstreams: proxy.config.upstreams, eventLoop: group.next(), logger: logger) {
            proxy.server.upstreamHealth(named: $0)
        }
        checker.start()
        defer { checker.stop() }
        let health = proxy.server.upstreamHealth(named: "backend")!
        XCTAssertTrue(waitUntil { !health.isHealthy(0, now: MonotonicClock.now()) })
        XCTAssertTrue(health.isHealthy(1, now: MonotonicClock.now()), "the listening target passes the connect check")
        // With no retries, a connection sent to the dead target would fail:
        // every one reaches the live target.
        for _ in 0..<4 { XCTAssertEqual(try proxy.connect("tcp").readString(1), "L") }
    }

    func testAllTargetsDeadClosesTheClient() throws {
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [HostPort(host: "127.0.0.1", port: try refusingPort())]))
        defer { proxy.stop() }
        let client = try proxy.connect("tcp")
        XCTAssertEqual(client.readToEnd().end, StreamClient.ReadEnd.eof)
        XCTAssertTrue(waitUntil { proxy.streamLogLines().first?["outcome"] as? String == "connect_failed" })
    }

    func testMaxConnections() throws {
        let echo = try TCPTestServer(group: group)
        defer { echo.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [echo.address]) {
            $0.listeners[0].maxConnections = 1
        }, loops: 1)
        defer { proxy.stop() }
        let first = try proxy.connect("tcp")
        try first.send("1")
        XCTAssertEqual(first.readString(1), "1")
        let second = try proxy.connect("tcp")
        XCTAssertNotEqual(second.readToEnd().end, StreamClient.ReadEnd.timeout, "refused at once")
        try first.send("2")
        XCTAssertEqual(first.readString(1), "2", "the admitted connection is unaffected")
    }

    func testMetricsCountConnectionsAndBytes() throws {
        let echo = try TCPTestServer(group: group)
        defer { echo.stop() }
        let proxy = try StreamHarness(config: StreamHarness.tcpConfig(targets: [echo.address]))
        defer { proxy.stop() }
        for _ in 0..<3 {
            let client = try proxy.connect("tcp")
            try client.send("12345")
            XCTAssertEqual(client.readString(5), "12345")
            client.shutdownWrite()
            _ = client.readToEnd()
        }
        let open = try proxy.connect("tcp")        // still open at scrape time
        try open.send("ab")
        XCTAssertEqual(open.readString(2), "ab")
        let expectedIn = 3 * 5 + 2
        let expectedOut = 3 * (5 + "<eof>".utf8.count) + 2
        XCTAssertTrue(waitUntil { proxy.metrics.snapshot().streams.values.first?.outcomes[.closed] == 3 })
        let text = proxy.metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"weir_stream_connections_total{listener="tcp",upstream="backend",outcome="closed"} 3"#), text)
        XCTAssertTrue(text.contains(#"weir_stream_active_connections{listener="tcp",upstream="backend"} 1"#), text)
        XCTAssertTrue(text.contains(#"weir_stream_received_bytes_total{listener="tcp",upstream="backend"} \#(expectedIn)"#), text)
        XCTAssertTrue(text.contains(#"weir_stream_sent_bytes_total{listener="tcp",upstream="backend"} \#(expectedOut)"#), text)
        XCTAssertTrue(text.contains(#"weir_active_connections{listener="tcp"} 1"#), text)
    }
}

/// Sends "bye", FINs its output, and records what it reads afterwards.
private final class BannerThenFIN: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let received: NIOLockedValueBox<[UInt8]>
    init(received: NIOLockedValueBox<[UInt8]>) { self.received = received }

    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "bye"))).whenComplete { _ in
            channel.close(mode: .output, promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        received.withLockedValue { $0.append(contentsOf: buffer.readableBytesView) }
    }
}

/// Writes `total` bytes (a known 256 KiB pattern, repeated) to whoever
/// connects, as fast as the socket takes them (only while NIO says the
/// channel is writable), and counts the bytes whose writes completed.
private final class FloodServer: @unchecked Sendable {
    let channel: Channel
    private let completed = NIOLockedValueBox<Int>(0)

    var address: HostPort { HostPort(host: "127.0.0.1", port: channel.localAddress!.port!) }
    var written: Int { completed.withLockedValue { $0 } }

    static func bytes(from offset: Int, count: Int) -> [UInt8] {
        (offset..<offset + count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11) }
    }

    init(group: EventLoopGroup, total: Int) throws {
        let completed = self.completed
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Writer(total: total, completed: completed))
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    func stop() { try? channel.close().wait() }

    /// The count once it has not moved for a second (polled, at most 30 s).
    func writtenOnceSteady() -> Int {
        var last = written
        var unchangedPolls = 0
        for _ in 0..<300 where unchangedPolls < 10 {
            Thread.sleep(forTimeInterval: 0.1)
            let now = written
            unchangedPolls = now == last ? unchangedPolls + 1 : 0
            last = now
        }
        return last
    }

    private final class Writer: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let total: Int
        let completed: NIOLockedValueBox<Int>
        var offset = 0
        let pattern = ByteBuffer(bytes: FloodServer.bytes(from: 0, count: 256 << 10))

        init(total: Int, completed: NIOLockedValueBox<Int>) { self.total = total; self.completed = completed }

        func channelActive(context: ChannelHandlerContext) { writeWhileWritable(context) }

        func channelWritabilityChanged(context: ChannelHandlerContext) { writeWhileWritable(context) }

        private func writeWhileWritable(_ context: ChannelHandlerContext) {
            let completed = self.completed
            while context.channel.isWritable && offset < total {
                let count = min(pattern.readableBytes, total - offset)
                let chunk = pattern.getSlice(at: pattern.readerIndex, length: count)!
                offset += count
                context.writeAndFlush(wrapOutboundOut(chunk)).whenSuccess { completed.withLockedValue { $0 += count } }
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }
}
