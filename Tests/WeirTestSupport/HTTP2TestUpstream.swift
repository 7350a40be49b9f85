// A real HTTP/2 (prior knowledge) origin on swift-nio-http2 with a small
// hand-framed gRPC echo service, for the HTTP/2-upstream and gRPC tests.
// gRPC messages are 5-byte length-prefixed (flag, UInt32 length) raw bytes;
// no protobuf compiler involved.

import NIOConcurrencyHelpers
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix

/// Paths:
/// - `/grpc.Echo/Unary`, `/grpc.Echo/Bidi`: every request message is echoed
///   back as it arrives; trailers `grpc-status: 0` when the client ends.
/// - `/grpc.Echo/ServerStream`: the request message is a count N (ASCII);
///   N messages `"reply i"` follow.
/// - `/grpc.Echo/ClientStream`: one reply `"count=N"` after the client ends.
/// - `/grpc.Echo/Fail`: trailers-only answer, `grpc-status: 7`, `grpc-message: denied`.
/// - `/grpc.Echo/FailAfterReply`: one reply `"partial"`, then trailers
///   `grpc-status: 13`, `grpc-message: boom`.
/// - `/grpc.Echo/Sleep`: answers after `x-delay-ms` milliseconds.
/// - `/grpc.health.v1.Health/Check`: SERVING or NOT_SERVING (`serving`).
/// - `/hold`: answered only after `releaseHeld()`.
/// - `/echo`: the request body back (content-length when the client sent one).
/// - `/trailers`: body then trailer `x-checksum: abc123`.
/// - anything else: 200 `"h2 ok from <name>"` with content-length.
public final class HTTP2TestUpstream: @unchecked Sendable {
    public let name: String
    private var channel: Channel!
    private let state = NIOLockedValueBox(State())
    private let connections = NIOLockedValueBox<[Channel]>([])

    struct State {
        var accepted = 0
        var streams = 0
        var activeStreams = 0
        var maxActiveStreams = 0
        var serving = true
        var held: [() -> Void] = []
        var heldCount = 0
        var requestHeaders: [[(String, String)]] = []
    }

    public var port: Int { channel.localAddress!.port! }
    public var connectionsAccepted: Int { state.withLockedValue { $0.accepted } }
    public var streamsSeen: Int { state.withLockedValue { $0.streams } }
    public var maxConcurrentStreamsSeen: Int { state.withLockedValue { $0.maxActiveStreams } }
    public var heldCount: Int { state.withLockedValue { $0.heldCount } }
    /// Header lists of the requests seen, in arrival order.
    public var requestHeaders: [[(String, String)]] { state.withLockedValue { $0.requestHeaders } }
    public var serving: Bool {
        get { state.withLockedValue { $0.serving } }
        set { state.withLockedValue { $0.serving = newValue } }
    }

    /// `maxConcurrentStreams`: the SETTINGS value this server announces.
    /// `tlsHandler`: makes the server-side TLS handler of each connection
    /// (the caller's NIOSSL context, ALPN `h2`); nil = cleartext h2c.
    public init(name: String = "h2", group: EventLoopGroup, maxConcurrentStreams: Int = 100,
                tlsHandler: (@Sendable () throws -> ChannelHandler)? = nil) throws {
        self.name = name
        let settings: HTTP2Settings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: maxConcurrentStreams),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 16),
        ]
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] channel in
                state.withLockedValue { $0.accepted += 1 }
                connections.withLockedValue { $0.append(channel) }
                do {
                    let sync = channel.pipeline.syncOperations
                    if let tlsHandler { try sync.addHandler(tlsHandler()) }
                    try sync.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: settings))
                    try sync.addHandler(GoAwayOnRequest())
                    try sync.addHandler(HTTP2StreamMultiplexer(mode: .server, channel: channel, inboundStreamInitializer: { stream in
                        do {
                            try stream.pipeline.syncOperations.addHandler(HTTP2TestStreamHandler(upstream: self))
                            return stream.eventLoop.makeSucceededVoidFuture()
                        } catch {
                            return stream.eventLoop.makeFailedFuture(error)
                        }
                    }))
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    /// Sends GOAWAY (last stream id = the highest seen) on every open
    /// connection; each closes once its remaining streams are done.
    public func goAwayAll() {
        for connection in connections.withLockedValue({ $0 }) where connection.isActive {
            connection.pipeline.fireUserInboundEventTriggered(GoAwayOnRequest.Trigger())
        }
    }

    /// Answers every `/hold` request seen so far.
    public func releaseHeld() {
        let held = state.withLockedValue { s -> [() -> Void] in
            let h = s.held
            s.held = []
            s.heldCount = 0
            return h
        }
        for answer in held { answer() }
    }

    public func stop() {
        try? channel.close().wait()
        for connection in connections.withLockedValue({ $0 }) { connection.close(promise: nil) }
    }

    fileprivate func streamStarted(headers: HPACKHeaders) {
        state.withLockedValue {
            $0.streams += 1
            $0.activeStreams += 1
            $0.maxActiveStreams = max($0.maxActiveStreams, $0.activeStreams)
            $0.requestHeaders.append(headers.map { ($0.name, $0.value) })
        }
    }

    fileprivate func streamEnded() {
        state.withLockedValue { $0.activeStreams -= 1 }
    }

    fileprivate func hold(_ answer: @escaping () -> Void) {
        state.withLockedValue {
            $0.held.append(answer)
            $0.heldCount += 1
        }
    }
}

/// On a `Trigger` event: GOAWAY with the highest stream id seen, then
/// close once no stream is open.
private final class GoAwayOnRequest: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame
    struct Trigger {}

    private var highestStream = HTTP2StreamID(0)
    private var open = 0
    private var goingAway = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if case .headers = frame.payload, frame.streamID > highestStream { highestStream = frame.streamID }
        context.fireChannelRead(data)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is NIOHTTP2StreamCreatedEvent { open += 1 }
        if event is StreamClosedEvent {
            open -= 1
            if goingAway && open == 0 { context.close(promise: nil) }
        }
        if event is Trigger {
            goingAway = true
            let frame = HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: highestStream, errorCode: .noError, opaqueData: nil))
            context.writeAndFlush(wrapOutboundOut(frame), promise: nil)
            if open == 0 { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// One stream of the test origin.
private final class HTTP2TestStreamHandler: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private let upstream: HTTP2TestUpstream
    private var path = ""
    private var headers = HPACKHeaders()
    private var body = ByteBuffer()
    private var messages = 0
    private var sentHead = false
    private var started = false

    init(upstream: HTTP2TestUpstream) {
        self.upstream = upstream
    }

    func channelInactive(context: ChannelHandlerContext) {
        if started { upstream.streamEnded() }
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let frame):
            if !started {
                started = true
                headers = frame.headers
                path = frame.headers.first(name: ":path") ?? ""
                upstream.streamStarted(headers: frame.headers)
                if path == "/grpc.Echo/Bidi" { sendHead(context) }
            }
            if frame.endStream { requestEnded(context, trailers: started ? nil : frame.headers) }
        case .data(let frame):
            if case .byteBuffer(var data) = frame.data {
                body.writeBuffer(&data)
                if path == "/grpc.Echo/Bidi" { echoMessages(context) }
            }
            if frame.endStream { requestEnded(context, trailers: nil) }
        default:
            break
        }
    }

    private func sendHead(_ context: ChannelHandlerContext, status: String = "200", extra: [(String, String)] = [], endStream: Bool = false) {
        sentHead = true
        var h = HPACKHeaders([(":status", status)])
        if path.hasPrefix("/grpc") { h.add(name: "content-type", value: "application/grpc") }
        for (n, v) in extra { h.add(name: n, value: v) }
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: h, endStream: endStream))), promise: nil)
    }

    /// Sends every complete message in `body` back (Bidi).
    private func echoMessages(_ context: ChannelHandlerContext) {
        while let message = Self.takeMessage(&body) {
            messages += 1
            context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(Self.frame(message))))), promise: nil)
        }
    }

    private func sendMessage(_ context: ChannelHandlerContext, _ text: String) {
        context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(Self.frame(ByteBuffer(string: text)))))), promise: nil)
    }

    private func sendTrailers(_ context: ChannelHandlerContext, status: Int = 0, message: String? = nil) {
        var trailers = HPACKHeaders([("grpc-status", String(status))])
        if let message { trailers.add(name: "grpc-message", value: message) }
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: trailers, endStream: true))), promise: nil)
    }

    private func requestEnded(_ context: ChannelHandlerContext, trailers: HPACKHeaders?) {
        switch path {
        case "/grpc.Echo/Unary":
            sendHead(context)
            while let message = Self.takeMessage(&body) { context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(Self.frame(message))))), promise: nil) }
            sendTrailers(context)
        case "/grpc.Echo/Bidi":
            echoMessages(context)
            sendTrailers(context)
        case "/grpc.Echo/ServerStream":
            sendHead(context)
            let count = Self.takeMessage(&body).flatMap { Int(String(buffer: $0)) } ?? 0
            for i in 0..<count { sendMessage(context, "reply \(i)") }
            sendTrailers(context)
        case "/grpc.Echo/ClientStream":
            var count = 0
            while Self.takeMessage(&body) != nil { count += 1 }
            sendHead(context)
            sendMessage(context, "count=\(count)")
            sendTrailers(context)
        case "/grpc.Echo/Fail":
            sendHead(context, extra: [("grpc-status", "7"), ("grpc-message", "denied")], endStream: true)
        case "/grpc.Echo/FailAfterReply":
            sendHead(context)
            sendMessage(context, "partial")
            sendTrailers(context, status: 13, message: "boom")
        case "/grpc.Echo/Sleep":
            let ms = Int64(headers.first(name: "x-delay-ms") ?? "0") ?? 0
            context.eventLoop.scheduleTask(in: .milliseconds(ms)) {
                self.sendHead(context)
                self.sendMessage(context, "slept")
                self.sendTrailers(context)
            }
        case "/grpc.health.v1.Health/Check":
            sendHead(context)
            // HealthCheckResponse { status = 1 SERVING | 2 NOT_SERVING }: field 1, varint.
            var message = ByteBuffer()
            message.writeBytes([0x08, upstream.serving ? 1 : 2])
            context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(Self.frame(message))))), promise: nil)
            sendTrailers(context)
        case "/hold":
            let loop = context.eventLoop
            upstream.hold {
                loop.execute { self.answerPlain(context, "held") }
            }
        case "/echo":
            var h = [(String, String)]()
            if headers.first(name: "content-length") != nil { h.append(("content-length", String(body.readableBytes))) }
            sendHead(context, extra: h)
            context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(body), endStream: true))), promise: nil)
        case "/trailers":
            sendHead(context)
            context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(ByteBuffer(string: "hello trailers"))))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: HPACKHeaders([("x-checksum", "abc123")]), endStream: true))), promise: nil)
        default:
            answerPlain(context, "h2 ok from \(upstream.name)")
        }
    }

    private func answerPlain(_ context: ChannelHandlerContext, _ text: String) {
        sendHead(context, extra: [("content-length", String(text.utf8.count)), ("x-upstream", upstream.name)])
        context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(ByteBuffer(string: text)), endStream: true))), promise: nil)
    }

    /// gRPC framing: flag byte, big-endian UInt32 length, message.
    static func frame(_ message: ByteBuffer) -> ByteBuffer {
        var out = ByteBuffer()
        out.writeInteger(UInt8(0))
        out.writeInteger(UInt32(message.readableBytes))
        out.writeImmutableBuffer(message)
        return out
    }

    static func takeMessage(_ buffer: inout ByteBuffer) -> ByteBuffer? {
        guard buffer.readableBytes >= 5, let length = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt32.self),
              buffer.readableBytes >= 5 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 5)
        return buffer.readSlice(length: Int(length))
    }
}

/// gRPC length-prefixed message framing for test clients.
public enum GRPCTestFraming {
    public static func frame(_ text: String) -> [UInt8] {
        let bytes = Array(text.utf8)
        let n = UInt32(bytes.count)
        return [0, UInt8(n >> 24), UInt8((n >> 16) & 0xFF), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)] + bytes
    }

    /// Splits a body into its messages (as text).
    public static func messages(_ body: [UInt8]) -> [String] {
        var out: [String] = []
        var i = 0
        while i + 5 <= body.count {
            let n = Int(body[i + 1]) << 24 | Int(body[i + 2]) << 16 | Int(body[i + 3]) << 8 | Int(body[i + 4])
            guard i + 5 + n <= body.count else { break }
            out.append(String(decoding: body[(i + 5)..<(i + 5 + n)], as: UTF8.self))
            i += 5 + n
        }
        return out
    }
}
