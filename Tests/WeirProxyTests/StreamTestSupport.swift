// Helpers for the tcp/tls listener tests: a real TCP server with scripted
// behaviours, a proxy harness that binds tcp/tls listeners, and a raw
// client that can tell a clean EOF from a timeout.

import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// A real TCP server on loopback. Each connection:
/// - gets `greeting` first if set (a server-speaks-first protocol),
/// - has what it sends echoed back,
/// - on the client's FIN: after `lateReplyDelay`, gets `lateReply` (data
///   sent after the client stopped sending), then a FIN.
final class TCPTestServer: @unchecked Sendable {
    let channel: Channel
    private let received = NIOLockedValueBox<[UInt8]>([])
    private let accepted = NIOLockedValueBox<Int>(0)

    var port: Int { channel.localAddress!.port! }
    var address: HostPort { HostPort(host: "127.0.0.1", port: port) }
    var receivedBytes: [UInt8] { received.withLockedValue { $0 } }
    var connections: Int { accepted.withLockedValue { $0 } }

    init(group: EventLoopGroup, greeting: String? = nil, lateReply: String = "<eof>",
         lateReplyDelay: TimeAmount = .milliseconds(50)) throws {
        let received = self.received
        let accepted = self.accepted
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                accepted.withLockedValue { $0 += 1 }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        Handler(greeting: greeting, lateReply: lateReply, delay: lateReplyDelay, received: received))
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    func stop() { try? channel.close().wait() }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let greeting: String?
        let lateReply: String
        let delay: TimeAmount
        let received: NIOLockedValueBox<[UInt8]>

        init(greeting: String?, lateReply: String, delay: TimeAmount, received: NIOLockedValueBox<[UInt8]>) {
            self.greeting = greeting; self.lateReply = lateReply; self.delay = delay; self.received = received
        }

        func channelActive(context: ChannelHandlerContext) {
            if let greeting { context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: greeting)), promise: nil) }
            context.fireChannelActive()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            received.withLockedValue { $0.append(contentsOf: buffer.readableBytesView) }
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            guard let event = event as? ChannelEvent, case .inputClosed = event else { return }
            let channel = context.channel
            let reply = lateReply
            context.eventLoop.scheduleTask(in: delay) {
                channel.writeAndFlush(ByteBuffer(string: reply)).whenComplete { _ in channel.close(promise: nil) }
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }
}

/// A ProxyServer with tcp/tls listeners, metrics and an access log file.
final class StreamHarness {
    let group: MultiThreadedEventLoopGroup
    let server: ProxyServer
    let metrics = MetricsRegistry()
    let accessLog: AccessLogWriter
    let accessLogPath: String
    let config: WeirConfig

    init(config: WeirConfig, loops: Int = 2) throws {
        self.config = config
        group = MultiThreadedEventLoopGroup(numberOfThreads: loops)
        accessLogPath = NSTemporaryDirectory() + "weir-l4-access-\(UUID().uuidString).log"
        accessLog = try AccessLogWriter(path: accessLogPath)
        var logger = Logger(label: "weir.test.l4")
        logger.logLevel = .critical
        server = ProxyServer(config: config, group: group,
                             observer: GatewayObserver(metrics: metrics, accessLog: accessLog), logger: logger)
        do {
            try server.start()
        } catch {
            // A failed start (e.g. a port taken, retried by `withUnusedPort`) leaves no threads behind.
            try? group.syncShutdownGracefully()
            try? FileManager.default.removeItem(atPath: accessLogPath)
            throw error
        }
    }

    func port(_ listener: String) -> Int { server.boundAddresses[listener]!.port! }

    func connect(_ listener: String, timeoutSeconds: Int = 10) throws -> StreamClient {
        try StreamClient(port: port(listener), timeoutSeconds: timeoutSeconds)
    }

    /// The access log's JSON lines for tcp/tls connections, parsed.
    func streamLogLines() -> [[String: Any]] {
        accessLog.flush()
        let text = (try? String(contentsOfFile: accessLogPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
        }.filter { $0["protocol"] != nil }
    }

    func stop() {
        _ = try? server.waitForDrain(timeout: .seconds(2)).wait()
        server.shutdown()
        accessLog.shutdown()
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: accessLogPath)
    }

    /// One tcp listener `tcp` -> upstream `backend` (plus whatever `configure` adds).
    static func tcpConfig(targets: [HostPort], configure: (inout WeirConfig) -> Void = { _ in }) -> WeirConfig {
        var config = WeirConfig()
        var listener = ListenerConfig()
        listener.name = "tcp"
        listener.listen = HostPort(host: "127.0.0.1", port: 0)
        listener.protocol = .tcp
        listener.upstream = "backend"
        config.listeners = [listener]
        var upstream = UpstreamConfig()
        upstream.name = "backend"
        upstream.targets = targets.map { TargetConfig(address: $0) }
        upstream.timeouts.connect = .seconds(2)
        config.upstreams = [upstream]
        config.accessLog = .off
        configure(&config)
        return config
    }
}

/// A blocking client socket that reports EOF, reset and timeout apart.
final class StreamClient {
    let fd: Int32
    private(set) var buffered: [UInt8] = []

    enum ReadEnd: Equatable { case eof, reset, timeout }

    init(port: Int, timeoutSeconds: Int = 10) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr)
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw BlockingSocket.POSIXFailure(call: "connect") }
    }

    deinit { close(fd) }

    func send(_ text: String) throws { try send(Array(text.utf8)) }

    func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { throw BlockingSocket.POSIXFailure(call: "send") }
            offset += n
        }
    }

    /// One recv into the buffer; nil while data arrived, else how reading ended.
    private func fill() -> ReadEnd? {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n > 0 { buffered.append(contentsOf: chunk[0..<n]); return nil }
        if n == 0 { return .eof }
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? .timeout : .reset
    }

    func read(_ count: Int) -> [UInt8]? {
        while buffered.count < count { if fill() != nil { return nil } }
        let out = Array(buffered[0..<count])
        buffered.removeFirst(count)
        return out
    }

    func readString(_ count: Int) -> String? { read(count).map { String(decoding: $0, as: UTF8.self) } }

    /// Reads until the peer ends the stream; returns what came and how it ended.
    func readToEnd() -> (bytes: [UInt8], end: ReadEnd) {
        while true {
            if let end = fill() {
                let out = buffered
                buffered.removeAll()
                return (out, end)
            }
        }
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }
}
