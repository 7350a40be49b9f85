import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import WeirCore

/// One gRPC health probe (`health_check.active.type: grpc`): a fresh
/// HTTP/2 (prior knowledge) connection, one `grpc.health.v1.Health/Check`
/// call with the configured service name, then close. The request and
/// response messages are tiny protobufs encoded by hand:
/// `HealthCheckRequest { string service = 1; }` and
/// `HealthCheckResponse { ServingStatus status = 1; }` (SERVING = 1).
public enum GRPCHealthProbe {
    public struct Answer: CustomStringConvertible, Sendable {
        /// grpc-status of the call (nil when the server sent none).
        public var grpcStatus: Int?
        /// The ServingStatus in the reply (nil without a reply message).
        public var servingStatus: Int?
        public var isServing: Bool { grpcStatus == 0 && servingStatus == 1 }
        public var description: String {
            "grpc-status \(grpcStatus.map(String.init) ?? "none"), serving status \(servingStatus.map(String.init) ?? "none")"
        }
    }

    /// `tls`: for TLS upstreams, the context to probe with (its ALPN offers
    /// h2); a TLS upstream whose context is missing is probed as failed.
    public static func run(on eventLoop: EventLoop, address: HostPort, service: String,
                           timeout: TimeAmount, tls: (@Sendable () -> UpstreamTLSContext?)? = nil) -> EventLoopFuture<Answer> {
        let promise = eventLoop.makePromise(of: Answer.self)
        let tlsContext = tls?()
        if tls != nil && tlsContext == nil {
            promise.fail(UpstreamTLSError(target: address.description, reason: "no TLS context loaded"))
            return promise.futureResult
        }
        let deadline = eventLoop.scheduleTask(in: timeout) { promise.fail(HealthProbe.TimedOut()) }
        promise.futureResult.whenComplete { _ in deadline.cancel() }
        ClientBootstrap(group: eventLoop)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try tlsContext?.addClientHandler(to: channel, targetHost: address.host)
                    try sync.addHandler(NIOHTTP2Handler(mode: .client))
                    try sync.addHandler(HTTP2StreamMultiplexer(mode: .client, channel: channel, inboundStreamInitializer: nil))
                }
            }
            .connect(host: address.host, port: address.port)
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    promise.fail(error)
                case .success(let channel):
                    promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
                    channel.closeFuture.whenComplete { _ in promise.fail(HealthProbe.ConnectionClosedEarly()) }
                    do {
                        let multiplexer = try channel.pipeline.syncOperations.handler(type: HTTP2StreamMultiplexer.self)
                        multiplexer.createStreamChannel(promise: nil) { stream in
                            stream.eventLoop.makeCompletedFuture {
                                try stream.pipeline.syncOperations.addHandler(
                                    GRPCHealthCallHandler(authority: address.description, scheme: tlsContext == nil ? "http" : "https",
                                                          service: service, promise: promise))
                            }
                        }
                    } catch {
                        promise.fail(error)
                    }
                }
            }
        return promise.futureResult
    }

    /// `HealthCheckRequest { service = 1 }` in a gRPC length-prefixed frame.
    static func requestMessage(service: String) -> ByteBuffer {
        var message = ByteBuffer()
        if !service.isEmpty {
            message.writeInteger(UInt8(0x0A))   // field 1, length-delimited
            writeVarint(UInt64(service.utf8.count), into: &message)
            message.writeString(service)
        }
        var framed = ByteBuffer()
        framed.writeInteger(UInt8(0))
        framed.writeInteger(UInt32(message.readableBytes))
        framed.writeBuffer(&message)
        return framed
    }

    static func writeVarint(_ value: UInt64, into buffer: inout ByteBuffer) {
        var v = value
        while v >= 0x80 {
            buffer.writeInteger(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        buffer.writeInteger(UInt8(v))
    }

    /// The `status` field (1, varint) of a HealthCheckResponse; unknown
    /// fields are skipped. Nil when the message does not parse.
    static func servingStatus(in message: ByteBuffer) -> Int? {
        var m = message
        var status = 0   // proto3 default: UNKNOWN
        while m.readableBytes > 0 {
            guard let key = readVarint(&m) else { return nil }
            switch key & 0x7 {
            case 0:
                guard let value = readVarint(&m) else { return nil }
                if key >> 3 == 1 { status = Int(truncatingIfNeeded: value) }
            case 1: guard m.readSlice(length: 8) != nil else { return nil }
            case 2:
                guard let n = readVarint(&m), n <= UInt64(m.readableBytes), m.readSlice(length: Int(n)) != nil else { return nil }
            case 5: guard m.readSlice(length: 4) != nil else { return nil }
            default: return nil
            }
        }
        return status
    }

    static func readVarint(_ buffer: inout ByteBuffer) -> UInt64? {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while shift < 64, let byte = buffer.readInteger(as: UInt8.self) {
            result |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return result }
            shift += 7
        }
        return nil
    }
}

/// The probe's one stream: sends the call, collects the reply and status.
private final class GRPCHealthCallHandler: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private let authority: String
    private let scheme: String
    private let service: String
    private let promise: EventLoopPromise<GRPCHealthProbe.Answer>
    private var body = ByteBuffer()
    private var answer = GRPCHealthProbe.Answer()
    private var httpStatus: String?

    init(authority: String, scheme: String, service: String, promise: EventLoopPromise<GRPCHealthProbe.Answer>) {
        self.authority = authority
        self.scheme = scheme
        self.service = service
        self.promise = promise
    }

    func channelActive(context: ChannelHandlerContext) {
        let headers = HPACKHeaders([
            (":method", "POST"), (":scheme", scheme), (":authority", authority),
            (":path", "/grpc.health.v1.Health/Check"),
            ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", "weir-health-check"),
        ])
        context.write(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
        let message = GRPCHealthProbe.requestMessage(service: service)
        context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(message), endStream: true))), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let frame):
            if httpStatus == nil { httpStatus = frame.headers.first(name: ":status") }
            if let status = frame.headers.first(name: "grpc-status") { answer.grpcStatus = Int(status) }
            if frame.endStream { finish() }
        case .data(let frame):
            if case .byteBuffer(var data) = frame.data { body.writeBuffer(&data) }
            if frame.endStream { finish() }
        default:
            break
        }
    }

    private func finish() {
        if httpStatus != "200" { answer.grpcStatus = answer.grpcStatus ?? -1 }
        if body.readableBytes >= 5, let length = body.getInteger(at: body.readerIndex + 1, as: UInt32.self),
           body.readableBytes >= 5 + Int(length), let message = body.getSlice(at: body.readerIndex + 5, length: Int(length)) {
            answer.servingStatus = GRPCHealthProbe.servingStatus(in: message)
        }
        promise.succeed(answer)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(HealthProbe.ConnectionClosedEarly())
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
