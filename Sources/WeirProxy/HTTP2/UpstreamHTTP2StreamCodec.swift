import NIOCore
import NIOHTTP1
import NIOHPACK
import NIOHTTP2

/// One request over an HTTP/2 upstream stream, presented to the exchange as
/// an ordinary `UpstreamConnection`.
///
/// The exchange is protocol-neutral towards its upstream only down to bytes:
/// it writes a serialised HTTP/1.1 request head (fast path or plugin path,
/// with every edit already applied) and its `UpstreamHandler` parses an
/// HTTP/1.1 response. This handler sits under `UpstreamHandler` in the
/// stream's child channel and translates:
///
/// - request: the head written by `UpstreamConnection.writeHead` → HEADERS
///   (`:method :scheme :authority :path`, connection-specific fields
///   dropped, `te: trailers` kept or added for gRPC); body slices → DATA;
///   the end → empty DATA or trailer HEADERS with END_STREAM;
/// - response: HEADERS → an HTTP/1.1 head (chunked unless the upstream sent
///   a content-length, so trailers such as `grpc-status` pass through as
///   chunked trailers); DATA → chunks; trailers → the last chunk's trailer
///   section. A trailers-only response (HEADERS with END_STREAM, the gRPC
///   error shape) becomes a head with `content-length: 0`.
///
/// Backpressure is HTTP/2 flow control: the stream channel turns unwritable
/// when the stream's send window is used up (the exchange stops reading the
/// client), and `UpstreamHandler.pauseReading` holds back `read()`, so no
/// WINDOW_UPDATE goes out while the client is slow.
final class UpstreamHTTP2StreamCodec: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = HTTP2Frame.FramePayload

    /// `http` for prior knowledge, `https` over TLS.
    private let scheme: String
    private var context: ChannelHandlerContext?
    /// The request's HEADERS carried END_STREAM (no body): later body and
    /// end writes from the exchange are ignored.
    private var requestClosed = false
    /// HEADERS went out: the stream exists on the wire.
    private(set) var requestStarted = false
    private var requestMethod: HTTP1Method = .get

    private enum ResponseBody {
        case awaitingHead
        /// Body bytes pass through; the upstream's content-length frames them.
        case identity
        /// Body bytes are chunk-framed so trailers can follow.
        case chunked
        case done
    }
    private var response = ResponseBody.awaitingHead

    init(scheme: String) {
        self.scheme = scheme
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    // MARK: - Request (exchange → upstream)

    /// Parses the head the exchange serialised and sends it as HEADERS.
    /// A head that does not parse (never expected: the exchange wrote it)
    /// resets the stream, which the exchange sees as a failed upstream.
    func writeHead(_ head: ByteBuffer, method: HTTP1Method, bodyless: Bool) {
        guard let context else { return }
        requestMethod = method
        requestStarted = true
        var buffer = head
        var parser = HTTP1RequestParser(limits: Self.headLimits)
        guard let parsed = try? parser.parse(&buffer) else {
            context.close(promise: nil)
            return
        }
        let headers = Self.requestHeaders(parsed, scheme: scheme)
        let noBody: Bool
        switch parsed.framing {
        case .none, .contentLength(0): noBody = bodyless
        default: noBody = false
        }
        requestClosed = noBody
        let frame = HTTP2Frame.FramePayload.headers(.init(headers: headers, endStream: noBody))
        context.write(wrapOutboundOut(frame), promise: nil)
    }

    func writeBody(_ data: ByteBuffer) {
        guard let context, !requestClosed, data.readableBytes > 0 else { return }
        context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(data)))), promise: nil)
    }

    func writeEnd(trailers: HTTPHeaders?) {
        guard let context, !requestClosed else { return }
        requestClosed = true
        if let trailers, !trailers.isEmpty {
            var block = HPACKHeaders()
            for (name, value) in trailers where !Self.isConnectionSpecific(name.lowercased()) {
                block.add(name: name.lowercased(), value: value)
            }
            context.write(wrapOutboundOut(.headers(.init(headers: block, endStream: true))), promise: nil)
        } else {
            context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true))), promise: nil)
        }
    }

    /// The exchange's heads can be larger than a client's (plugins add
    /// fields); the listener's limits were applied when the client sent it.
    private static let headLimits = HTTP1Limits(maxStartLineBytes: 1 << 20, maxFieldBytes: 1 << 22, maxFieldCount: 100_000)

    /// RFC 9113 §8.2.2: connection-specific fields must not be sent over
    /// HTTP/2 (`te` only as `te: trailers`, checked by the caller).
    static func isConnectionSpecific(_ lowercasedName: String) -> Bool {
        switch lowercasedName {
        case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te":
            return true
        default:
            return false
        }
    }

    static func requestHeaders(_ head: HTTP1RequestHead, scheme: String) -> HPACKHeaders {
        var headers = HPACKHeaders()
        headers.reserveCapacity(head.fields.count + 4)
        headers.add(name: ":method", value: head.methodString)
        headers.add(name: ":scheme", value: scheme)
        if let host = head.host { headers.add(name: ":authority", value: host) }
        headers.add(name: ":path", value: head.target)
        var grpc = false
        for i in 0..<head.fields.count {
            let name = head.fields.name(at: i).lowercased()
            if isConnectionSpecific(name) { continue }
            let value = head.fields.value(at: i)
            if name == "content-type" && GRPCRequestInfo.isGRPC(contentType: value) { grpc = true }
            headers.add(name: name, value: value)
        }
        // The exchange drops TE as hop-by-hop; gRPC servers require
        // `te: trailers` (the only TE value HTTP/2 allows).
        if grpc { headers.add(name: "te", value: "trailers") }
        return headers
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        // Every request write goes through writeHead/writeBody/writeEnd
        // (UpstreamConnection routes them here); raw bytes are a bug.
        assertionFailure("raw bytes written to an HTTP/2 upstream stream")
        promise?.fail(ChannelError.operationUnsupported)
    }

    // MARK: - Response (upstream → exchange)

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let frame):
            receivedHeaders(frame.headers, endStream: frame.endStream, context: context)
        case .data(let frame):
            receivedData(frame, context: context)
        default:
            // RST_STREAM closes the stream channel (the exchange sees the
            // close); WINDOW_UPDATE, PRIORITY and the rest are not ours.
            break
        }
    }

    private func receivedHeaders(_ headers: HPACKHeaders, endStream: Bool, context: ChannelHandlerContext) {
        switch response {
        case .awaitingHead:
            guard let status = headers.first(name: ":status").flatMap({ Int($0) }), (100...999).contains(status) else {
                return protocolError(context)
            }
            var out = context.channel.allocator.buffer(capacity: 256)
            let reason = HTTPResponseStatus(statusCode: status).reasonPhrase
            out.writeString("HTTP/1.1 \(status) \(reason.isEmpty ? "Unknown" : reason)\r\n")
            var contentLength = false
            for (name, value, _) in headers where !name.hasPrefix(":") {
                guard Self.isSafeField(name: name, value: value) else { continue }
                if Self.isConnectionSpecific(name) { continue }
                if name == "content-length" { contentLength = true }
                Self.writeField(name, value, into: &out)
            }
            let interim = status >= 100 && status < 200
            let bodyless = interim || status == 204 || status == 304 || requestMethod == .head
            if interim {
                // Interim heads are relayed and a final one follows.
            } else if endStream {
                // Trailers-only (gRPC errors) or an empty body.
                if !contentLength && !bodyless { out.writeStaticString("content-length: 0\r\n") }
                response = .done
            } else if contentLength || bodyless {
                response = .identity
            } else {
                out.writeStaticString("transfer-encoding: chunked\r\n")
                response = .chunked
            }
            out.writeStaticString("\r\n")
            context.fireChannelRead(wrapInboundOut(out))
        case .identity, .chunked:
            // Trailers (RFC 9113 §8.1): END_STREAM must be set.
            guard endStream else { return protocolError(context) }
            var out = context.channel.allocator.buffer(capacity: 64)
            if case .chunked = response {
                out.writeStaticString("0\r\n")
                for (name, value, _) in headers where !name.hasPrefix(":") {
                    guard Self.isSafeField(name: name, value: value), !Self.isConnectionSpecific(name) else { continue }
                    Self.writeField(name, value, into: &out)
                }
                out.writeStaticString("\r\n")
            }
            // With a content-length body the trailers have no HTTP/1.1 place.
            response = .done
            if out.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(out)) }
        case .done:
            protocolError(context)
        }
    }

    private func receivedData(_ frame: HTTP2Frame.FramePayload.Data, context: ChannelHandlerContext) {
        guard case .byteBuffer(let data) = frame.data else { return }
        switch response {
        case .identity:
            if data.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(data)) }
            if frame.endStream { response = .done }
        case .chunked:
            if data.readableBytes > 0 {
                var out = context.channel.allocator.buffer(capacity: data.readableBytes + 16)
                HTTP1ChunkedEncoder.writeChunk(data, into: &out)
                if frame.endStream { out.writeStaticString("0\r\n\r\n") }
                context.fireChannelRead(wrapInboundOut(out))
            } else if frame.endStream {
                var out = context.channel.allocator.buffer(capacity: 5)
                out.writeStaticString("0\r\n\r\n")
                context.fireChannelRead(wrapInboundOut(out))
            }
            if frame.endStream { response = .done }
        case .awaitingHead, .done:
            protocolError(context)
        }
    }

    /// A response HTTP/1.1 could not carry: reset the stream; the exchange
    /// sees its upstream close (502 before a response, a cut after).
    private func protocolError(_ context: ChannelHandlerContext) {
        response = .done
        context.close(promise: nil)
    }

    /// HPACK allows bytes HTTP/1.1 field lines must not carry.
    private static func isSafeField(name: String, value: String) -> Bool {
        guard !name.isEmpty, name.utf8.allSatisfy({ HTTP1Bytes.isTChar($0) }) else { return false }
        return !value.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0x00 })
    }

    private static func writeField(_ name: String, _ value: String, into out: inout ByteBuffer) {
        out.writeString(name)
        out.writeStaticString(": ")
        out.writeString(value)
        out.writeStaticString("\r\n")
    }
}
