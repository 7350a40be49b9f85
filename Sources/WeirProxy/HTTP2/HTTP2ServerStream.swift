import NIOCore
import NIOHPACK
import NIOHTTP1
import NIOHTTP2
import WeirCore

/// One downstream HTTP/2 stream: a request in, a response out, through the
/// same exchange logic as an HTTP/1.1 request (`ExchangeDownstream`).
/// Not a channel handler: `HTTP2DownstreamConnection` hands it its frames
/// and writes the ones it sends.
///
/// The request's header list is written as an HTTP/1.1 head and parsed by
/// Weir's own `HTTP1RequestParser`, so the exchange gets the same
/// `RequestHead` (and the same upstream fast path, field checks and limits)
/// as for HTTP/1.1: `:authority` becomes Host, split `cookie` fields are
/// joined (RFC 9113 §8.2.3), and a body without a length is sent upstream
/// chunked. What RFC 9113 §8.1.1-8.2 calls malformed (pseudo-header
/// errors, uppercase names, connection-specific fields, `te` other than
/// `trailers`, CR/LF/NUL in values, a body that disagrees with
/// content-length) is refused first with a stream error PROTOCOL_ERROR
/// (HTTP2RequestFields, checked in the pass that writes the head).
///
/// Backpressure: the stream's receive window is only reopened
/// (WINDOW_UPDATE) while the upstream connection is writable, so a client
/// sending faster than the upstream takes waits on its window. The other
/// way, the upstream is paused while more than `outboundHighWater` bytes
/// written to this stream are not on the socket yet (its send window used
/// up, or the connection not writable).
final class HTTP2ServerStream: ExchangeDownstream {
    let connection: HTTP2DownstreamConnection
    let streamID: HTTP2StreamID
    var exchange: Exchange?
    /// The exchange's deadline (read/write/whole request). Only kept here:
    /// the connection times all its streams with one scheduled task
    /// (`HTTP2DownstreamConnection.streamDeadlineSet`), where a task per
    /// stream cost a schedule and a cancel (~9 k instructions) per request.
    private var exchangeDeadline = LazyTimer()
    var exchangeTimer: LazyTimer {
        get { exchangeDeadline }
        set {
            let changed = newValue.deadline != exchangeDeadline.deadline
            exchangeDeadline = newValue
            if changed, let deadline = newValue.deadline { connection.streamDeadlineSet(deadline) }
        }
    }
    /// HEADERS seen: what follows is body and trailers.
    private var headSeen = false
    /// The client sent END_STREAM.
    private var clientEnded = false
    /// END_STREAM was written (or the stream is gone): nothing more goes out.
    private var responseEnded = false
    /// nio-http2 closed the stream (both ends, or a reset).
    private var gone = false
    /// Body bytes still to come under the request's content-length (nil:
    /// no length). A body that disagrees with it makes the request
    /// malformed (RFC 9113 §8.1.1), checked here as nio-http2's content
    /// length validation is off downstream (HTTP2RequestFields).
    private var bodyBytesExpected: Int?
    /// The receive window as nio-http2 last reported it, and whether an
    /// update is held back until the upstream takes more.
    private var inboundWindow = 0
    private var windowUpdateHeld = false
    /// Response bytes written, and how many of them are known to be on the
    /// socket: a DATA write every `checkpointBytes` carries a promise, and
    /// its completion confirms everything before it (one stream's frames
    /// go out in order). Small responses never allocate one.
    private var outboundWritten = 0
    private var outboundConfirmed = 0
    private var lastCheckpoint = 0
    private static let checkpointBytes = 16 * 1024
    private static let outboundHighWater = 64 * 1024
    /// A frame not written yet, to carry END_STREAM if the response ends
    /// next (HEADERS or DATA + END_STREAM instead of an extra empty DATA).
    /// Written before the connection's next flush at the latest. Kept as
    /// its parts: the nio-http2 payload is made once, with its END_STREAM
    /// flag (setting it afterwards copied a DATA payload's storage).
    private var heldFrame: HeldFrame?

    private enum HeldFrame {
        case headers(HPACKHeaders)
        case data(ByteBuffer)

        func payload(endStream: Bool) -> HTTP2Frame.FramePayload {
            switch self {
            case .headers(let headers): return .headers(.init(headers: headers, endStream: endStream))
            case .data(let data): return .data(.init(data: .byteBuffer(data), endStream: endStream))
            }
        }
    }

    init(connection: HTTP2DownstreamConnection, streamID: HTTP2StreamID) {
        self.connection = connection
        self.streamID = streamID
    }

    // MARK: - ExchangeDownstream: the connection's facts

    var loopContext: LoopContext { connection.loopContext }
    var listener: ListenerRuntime { connection.listener }
    var peerAddress: SocketAddress? { connection.peerAddress }
    var clientIP: String { connection.clientIP }
    var peerTrusted: Bool { connection.peerTrusted }
    var draining: Bool { connection.draining }
    var tls: TLSConnectionInfo? { connection.tls }
    var localAddress: SocketAddress? { connection.context.channel.localAddress }
    var connectionPlugins: ConnectionPlugins? {
        get { connection.connectionPlugins }
        set { connection.connectionPlugins = newValue }
    }
    var allocator: ByteBufferAllocator { connection.context.channel.allocator }
    var eventLoop: EventLoop { connection.context.eventLoop }
    /// The connection's one spare array, for whichever stream starts next.
    var spareUpstreamFields: [HTTP1AddedField] {
        get { connection.spareUpstreamFields }
        set { connection.spareUpstreamFields = newValue }
    }
    var downstreamIsWritable: Bool {
        outboundWritten - outboundConfirmed < Self.outboundHighWater && connection.isWritable
    }

    // MARK: - Stream lifecycle (called by the connection)

    /// The stream is closed (both ends done, reset by either side, or the
    /// connection went).
    func streamClosed() {
        gone = true
        heldFrame = nil
        let cut = !responseEnded
        responseEnded = true
        exchangeDeadline.set(nil)
        // An exchange whose response end was written finishes on its own;
        // any other was cut by the client.
        if cut, let exchange, !exchange.finished {
            abortExchange(exchange, reason: "the client reset the HTTP/2 stream")
        }
    }

    private func send(_ payload: HTTP2Frame.FramePayload, promise: EventLoopPromise<Void>? = nil) {
        connection.write(HTTP2Frame(streamID: streamID, payload: payload), promise: promise)
    }

    /// Writes the held frame, if any (before any other frame of this stream,
    /// and before the connection flushes).
    func releaseHeldFrame() {
        guard let frame = heldFrame else { return }
        heldFrame = nil
        send(frame.payload(endStream: false))
    }

    private func hold(_ frame: HeldFrame) {
        if heldFrame == nil { connection.holdingFrame(self) } else { releaseHeldFrame() }
        heldFrame = frame
    }

    // MARK: - Reading from the client

    private var shouldRead: Bool {
        guard let exchange, !clientEnded else { return true }
        if exchange.requestEnded || exchange.discardingBody { return true }
        guard let connection = exchange.connection else { return exchange.plugins?.bodyWaiter != nil }
        return connection.channel.isWritable
    }

    func inboundWindowChanged(_ window: Int) {
        inboundWindow = window
        reopenWindowIfAllowed()
    }

    func resumeReadingIfAllowed() {
        if windowUpdateHeld { reopenWindowIfAllowed() }
    }

    private func reopenWindowIfAllowed() {
        guard !clientEnded, !gone,
              let increment = HTTP2DownstreamConnection.windowIncrement(window: inboundWindow,
                                                                        target: connection.settings.initialWindowSize) else {
            windowUpdateHeld = false
            return
        }
        guard shouldRead else {
            windowUpdateHeld = true
            return
        }
        windowUpdateHeld = false
        inboundWindow += increment
        send(.windowUpdate(windowSizeIncrement: increment))
        connection.flushSoon()
    }

    func receivedHeaders(_ headers: HTTP2Frame.FramePayload.Headers) {
        if !headSeen {
            headSeen = true
            if headers.endStream { clientEnded = true }
            beginRequest(headers.headers, endStream: headers.endStream)
        } else {
            // Trailers (nio-http2 has checked they end the stream).
            clientEnded = true
            do {
                try HTTP2RequestFields.checkTrailers(headers.headers)
                if let expected = bodyBytesExpected, expected != 0 { throw HTTP2RequestFields.Malformed.bodyShorterThanContentLength }
            } catch {
                return rejectMalformedStream(error)
            }
            guard let exchange, !exchange.requestEnded else { return }
            var trailers = HTTPHeaders()
            for (name, value, _) in headers.headers where !name.hasPrefix(":") {
                trailers.add(name: name, value: value)
            }
            requestEnd(trailers.isEmpty ? nil : trailers, exchange: exchange)
        }
    }

    func receivedData(_ data: HTTP2Frame.FramePayload.Data) {
        if data.endStream { clientEnded = true }
        if let expected = bodyBytesExpected {
            let length = data.data.readableBytes
            if length > expected { return rejectMalformedStream(HTTP2RequestFields.Malformed.bodyLongerThanContentLength) }
            if data.endStream && length != expected {
                return rejectMalformedStream(HTTP2RequestFields.Malformed.bodyShorterThanContentLength)
            }
            bodyBytesExpected = expected - length
        }
        guard let exchange, !exchange.requestEnded else { return }
        if case .byteBuffer(let buffer) = data.data, buffer.readableBytes > 0 {
            requestBody(buffer, exchange: exchange)
        }
        if data.endStream, self.exchange === exchange, !exchange.requestEnded {
            requestEnd(nil, exchange: exchange)
        }
    }

    /// Body bytes went to the upstream during the read: one flush for them.
    func flushUpstream() {
        if let exchange, exchange.upstreamNeedsFlush, let connection = exchange.connection {
            exchange.upstreamNeedsFlush = false
            connection.flush()
        }
    }

    /// The response may go on: resume the upstream if it was paused for us.
    func writabilityMayHaveChanged() {
        if downstreamIsWritable, let connection = exchange?.connection {
            connection.handler.resumeReading()
        }
    }

    // MARK: - Request start

    /// The request's header list as an HTTP/1.1 head, parsed by Weir's
    /// parser (limits and field checks as for HTTP/1.1), then routed.
    private func beginRequest(_ headers: HPACKHeaders, endStream: Bool) {
        let fields: HTTP2RequestFields
        do {
            fields = try HTTP2RequestFields(headers)
        } catch {
            return rejectMalformedStream(error)
        }
        let method = fields.method, authority = fields.authority, size = fields.headSize
        var path = fields.path
        if path.isEmpty { path = method == "OPTIONS" ? "*" : "/" }   // CONNECT has none: refused by the exchange
        var hasContentLength = false
        var cookies: [String] = []
        // One reservation and plain copies (a ByteBuffer write per piece
        // cost ~5 k instructions per request).
        var head = allocator.buffer(capacity: size)
        head.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { raw in
            var w = HTTP1HeadWriter.RawWriter(raw.baseAddress!)
            w.copy(method)
            w.copy(" ")
            w.copy(path)
            w.copy(" HTTP/1.1\r\n")
            if let authority {
                w.copy("host: ")
                w.copy(authority)
                w.copy("\r\n")
            }
            for (name, value, _) in headers where name.utf8.first != UInt8(ascii: ":") {
                switch name {
                case "host":
                    // :authority wins (RFC 9113 §8.3.1); Host only stands in for a missing one.
                    if authority != nil { continue }
                case "cookie":
                    cookies.append(value)
                    continue
                case "content-length":
                    hasContentLength = true
                default:
                    break
                }
                w.copy(name)
                w.copy(": ")
                w.copy(value)
                w.copy("\r\n")
            }
            // Split cookie fields are joined again (RFC 9113 §8.2.3).
            for (i, cookie) in cookies.enumerated() {
                w.copy(i == 0 ? "cookie: " : "; ")
                w.copy(cookie)
            }
            if !cookies.isEmpty { w.copy("\r\n") }
            // A body without a length: HTTP/2 frames delimit it, HTTP/1.1 needs chunks.
            if !endStream && !hasContentLength { w.copy("transfer-encoding: chunked\r\n") }
            w.copy("\r\n")
            precondition(w.offset <= size, "HTTP/2 request head size miscounted")
            return w.offset
        }

        var parser = HTTP1RequestParser(limits: connection.parserLimits)
        let wire: HTTP1RequestHead
        do {
            guard let parsed = try parser.parse(&head) else { throw HTTP1ParseError.invalidRequestLine }
            wire = parsed
        } catch {
            return rejectMalformed(error)
        }
        var framing = HeaderRewriting.RequestFraming()
        switch wire.framing {
        case .contentLength(let length):
            if endStream && length != 0 { return rejectMalformedStream(HTTP2RequestFields.Malformed.bodyShorterThanContentLength) }
            bodyBytesExpected = length
            framing.contentLength = length
        case .chunked:
            framing.chunked = true
        case .none, .untilClose:
            break
        }
        framing.expectsContinue = wire.expectsContinue
        framing.teTrailers = wire.facts.teTrailersOnly && wire.fields.entries.contains { $0.known == .te }
        let requestHead = RequestHead(wire, receivedOverHTTP2: true)
        let exchange = makeExchange(head: requestHead)
        self.exchange = exchange
        exchange.framing = framing
        if endStream || !framing.hasBody {
            exchange.bodyless = true
            requestEnd(nil, exchange: exchange)
            guard self.exchange === exchange, !exchange.finished else { return }
        }
        routeRequest(exchange, head: requestHead)
    }

    /// RFC 9113 §8.1.1: a malformed request (HTTP2RequestFields) is a
    /// stream error PROTOCOL_ERROR; nothing of it reaches an upstream (an
    /// exchange already under way, on bad trailers or body length, is cut).
    private func rejectMalformedStream(_ error: Error) {
        guard !gone else { return }
        clientEnded = true
        connection.receivedMalformedRequest(on: streamID, error: error)
        resetStream(.protocolError)
        if let exchange, !exchange.finished {
            if exchange.status == 0 { exchange.status = 400 }
            abortExchange(exchange, reason: "malformed HTTP/2 request: \(error)")
        }
    }

    /// The header list does not make a valid HTTP/1.1 head for Weir's
    /// parser: its status, in the proxy's error shape, on this stream only.
    private func rejectMalformed(_ error: Error) {
        let parseError = error as? HTTP1ParseError ?? .invalidRequestLine
        let kind = parseError.proxyErrorKind
        let exchange = makeExchange(head: nil)
        self.exchange = exchange
        exchange.requestEnded = true
        sendLocalResponse(exchange, kind: kind, message: "malformed request: \(parseError)", close: true)
    }

    // MARK: - Writing the response as HEADERS and DATA frames

    /// The upstream's HTTP/1 head (with the plugins' edits, if any) as a
    /// HEADERS frame: lower-case names, no connection-specific fields, Via
    /// extended. Names and values are made from the head's bytes in one
    /// copy each (a String and then its lower-cased copy cost ~2 k
    /// instructions per response).
    func relayWireResponseHead(_ head: HTTP1ResponseHead, pluginChanges: ResponseHeadChanges?, exchange: Exchange) {
        let fields = head.fields
        var dropped = fields.hopByHopFields()
        if let pluginChanges { dropped.formUnion(pluginChanges.edits.removed) }
        let status = pluginChanges?.status?.code ?? head.status
        var headers = HPACKHeaders()
        headers.reserveCapacity(fields.count + 2 + (pluginChanges?.edits.added.count ?? 0))
        headers.add(name: ":status", value: Self.statusValue(status))
        var via: String? = nil
        // For a gRPC trailers-only answer (writeHead): grpc-status, and the first content-length.
        var grpcStatus = false
        var contentLength: String? = nil
        var hasDate = false
        fields.bytes.withUnsafeReadableBytes { raw in
            let base = raw.bindMemory(to: UInt8.self).baseAddress!
            for (i, e) in fields.entries.enumerated() where !dropped.contains(i) {
                let value = String(decoding: UnsafeBufferPointer(start: base + Int(e.valueStart), count: Int(e.valueLength)),
                                   as: UTF8.self)
                switch e.known {
                case .te, .keepAlive, .proxyConnection, .transferEncoding, .upgrade, .connection:
                    continue
                case .via:
                    via = via.map { $0 + ", " + value } ?? value
                case .contentLength:
                    if contentLength == nil { contentLength = value }
                    headers.add(name: "content-length", value: value)
                case .date:
                    hasDate = true
                    headers.add(name: "date", value: value)
                default:
                    let name = base + Int(e.nameStart), length = Int(e.nameLength)
                    if HTTP1Bytes.equalsLower(name, length, "grpc-status") { grpcStatus = true }
                    headers.add(name: Self.lowercasedName(name, length), value: value)
                }
            }
        }
        for field in pluginChanges?.edits.added ?? [] {
            switch HTTP1KnownField.classify(field.name) {
            case .via: via = via.map { $0 + ", " + field.value } ?? field.value
            case let kind where kind.isHopByHop: continue
            case let kind:
                let name = field.name.lowercased()
                if kind == .contentLength && contentLength == nil { contentLength = field.value }
                if kind == .date { hasDate = true }
                if name == "grpc-status" { grpcStatus = true }
                headers.add(name: name, value: field.value)
            }
        }
        // RFC 9110 §6.6.1: the proxy dates a response its origin did not.
        if !hasDate { headers.add(name: "date", value: loopContext.dateCache.current()) }
        // An HTTP/2 upstream's response reaches us as a rebuilt HTTP/1.1 head.
        let viaEntry = HeaderRewriting.viaEntry(http2: exchange.connection?.http2Stream != nil, http10: head.version.minor == 0)
        headers.add(name: "via", value: via.map { $0 + ", " + viaEntry } ?? viaEntry)
        writeHead(headers, status: status, grpcTrailersOnly: grpcStatus && contentLength == "0", exchange: exchange)
    }

    /// `:status` as text: the common ones without formatting an Int.
    static func statusValue(_ status: Int) -> String {
        switch status {
        case 200: return "200"
        case 201: return "201"
        case 204: return "204"
        case 206: return "206"
        case 301: return "301"
        case 302: return "302"
        case 304: return "304"
        case 400: return "400"
        case 401: return "401"
        case 403: return "403"
        case 404: return "404"
        case 429: return "429"
        case 500: return "500"
        case 502: return "502"
        case 503: return "503"
        case 504: return "504"
        default: return String(status)
        }
    }

    /// A field name (a token: ASCII) lower-cased into a new String in one pass.
    static func lowercasedName(_ bytes: UnsafePointer<UInt8>, _ count: Int) -> String {
        String(unsafeUninitializedCapacity: count) { out in
            for i in 0..<count {
                let byte = bytes[i]
                out[i] = byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte
            }
            return count
        }
    }

    func relayInterimResponseHead(_ head: HTTP1ResponseHead, exchange: Exchange) {
        guard !responseEnded else { return }
        var headers = HPACKHeaders()
        headers.add(name: ":status", value: String(head.status))
        let dropped = head.fields.hopByHopFields()
        for i in 0..<head.fields.count where !dropped.contains(i) {
            headers.add(name: head.fields.name(at: i).lowercased(), value: head.fields.value(at: i))
        }
        send(.headers(.init(headers: headers)))
        connection.flushSoon()
    }

    private func writeHead(_ headers: HPACKHeaders, status: Int, grpcTrailersOnly: Bool, exchange: Exchange) {
        exchange.responseStarted = true
        exchange.status = status
        guard !responseEnded else { return }
        // No body for HEAD, 204, 304: the HEADERS frame ends the stream.
        // A gRPC trailers-only answer (grpc-status in the head, which the
        // HTTP/1 side carries as `content-length: 0`) must be one HEADERS
        // frame with END_STREAM too: gRPC clients read a HEADERS frame
        // without it as response headers and then miss the trailers.
        let bodyless = exchange.head?.method == .HEAD || status == 204 || status == 304 || grpcTrailersOnly
        if bodyless {
            responseEnded = true
            send(.headers(.init(headers: headers, endStream: true)))
        } else {
            // Held: an empty body's end becomes this frame's END_STREAM.
            hold(.headers(headers))
        }
    }

    /// HTTP/1 fields as HTTP/2 ones: lower-case names, no connection-specific fields.
    private static func appendFields(_ fields: HTTPHeaders, to headers: inout HPACKHeaders) {
        var listed: Set<String> = []
        for value in fields["connection"] {
            for token in value.split(separator: ",") { listed.insert(token.trimmingCharacters(in: .whitespaces).lowercased()) }
        }
        for (name, value) in fields {
            let lower = name.lowercased()
            switch lower {
            case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer":
                continue
            default:
                if listed.contains(lower) { continue }
                headers.add(name: lower, value: value)
            }
        }
    }

    func writeResponseBody(_ data: ByteBuffer, exchange: Exchange) {
        guard !responseEnded, data.readableBytes > 0 else { return }
        outboundWritten += data.readableBytes
        if outboundWritten - lastCheckpoint >= Self.checkpointBytes {
            // Large responses: learn when this much is on the socket.
            lastCheckpoint = outboundWritten
            releaseHeldFrame()
            let mark = outboundWritten
            let promise = eventLoop.makePromise(of: Void.self)
            send(.data(.init(data: .byteBuffer(data))), promise: promise)
            promise.futureResult.whenComplete { [weak self] _ in self?.outboundConfirmed(upTo: mark) }
            return
        }
        // Held: if the response ends next, this frame carries END_STREAM.
        hold(.data(data))
    }

    private func outboundConfirmed(upTo mark: Int) {
        guard mark > outboundConfirmed else { return }
        outboundConfirmed = mark
        writabilityMayHaveChanged()
    }

    func writeResponseEnd(_ trailers: HTTP1Fields?, exchange: Exchange, promise: EventLoopPromise<Void>?) {
        guard !responseEnded else {
            promise?.succeed(())
            return
        }
        responseEnded = true
        if let trailers, trailers.count > 0 {
            releaseHeldFrame()
            var headers = HPACKHeaders()
            for (i, e) in trailers.entries.enumerated() where e.known.forwardedInTrailers {
                headers.add(name: trailers.name(at: i).lowercased(), value: trailers.value(at: i))
            }
            send(.headers(.init(headers: headers, endStream: true)), promise: promise)
        } else if let held = heldFrame {
            // HEADERS or the last DATA carries END_STREAM: no extra frame.
            heldFrame = nil
            send(held.payload(endStream: true), promise: promise)
        } else {
            send(.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true)), promise: promise)
        }
        connection.flushSoon()
    }

    func writeLocalResponse(_ head: HTTPResponseHead, body: ByteBuffer?, exchange: Exchange, promise: EventLoopPromise<Void>?) {
        guard !responseEnded else {
            promise?.succeed(())
            return
        }
        responseEnded = true
        releaseHeldFrame()
        var headers = HPACKHeaders()
        headers.add(name: ":status", value: String(head.status.code))
        Self.appendFields(head.headers, to: &headers)
        if let body, body.readableBytes > 0 {
            send(.headers(.init(headers: headers)))
            send(.data(.init(data: .byteBuffer(body), endStream: true)), promise: promise)
        } else {
            send(.headers(.init(headers: headers, endStream: true)), promise: promise)
        }
        connection.flushSoon()
    }

    func flushDownstream() { connection.flushSoon() }

    func endGRPCResponseWithStatus(_ status: GRPCStatusCode, message: String) -> Bool {
        guard !responseEnded else { return false }
        responseEnded = true
        releaseHeldFrame()
        let trailers = HPACKHeaders([
            ("grpc-status", String(status.rawValue)),
            ("grpc-message", GRPCErrorResponse.percentEncoded(message)),
        ])
        send(.headers(.init(headers: trailers, endStream: true)))
        connection.flushSoon()
        return true
    }

    /// Resets the stream (the connection and its other streams go on).
    func closeDownstream() {
        resetStream(.cancel)
    }

    private func resetStream(_ code: HTTP2ErrorCode) {
        responseEnded = true
        heldFrame = nil
        guard !gone else { return }
        gone = true
        send(.rstStream(code))
        connection.flushSoon()
    }

    // MARK: - Lifecycle hooks

    /// A stream carries one exchange. When the client has ended its side,
    /// the response's END_STREAM closes the stream by itself: nothing to do
    /// after that write, so no promise to learn when it is done (one per
    /// response cost ~2 k instructions). Otherwise the stream is reset once
    /// the response is out (`exchangeFinished`), which needs that promise.
    func closesAfter(_ exchange: Exchange) -> Bool { !clientEnded }

    func exchangeFinished(_ exchange: Exchange, afterWrite: EventLoopFuture<Void>?) {
        connection.flushSoon()
        if connection.spareUpstreamFields.capacity == 0 {
            recycleUpstreamFields(of: exchange, into: &connection.spareUpstreamFields)
        }
        guard !clientEnded else { return }   // both sides ended: the stream closes by itself
        // The response is out before the request's end: reset the rest
        // (RFC 9113 §8.1: NO_ERROR, the client stops sending). After the
        // response's last frame: a reset drops frames still queued.
        if let afterWrite {
            afterWrite.whenComplete { [weak self] _ in self?.resetStream(.noError) }
        } else {
            resetStream(.noError)
        }
    }

    func exchangeAborted(_ exchange: Exchange) {
        closeDownstream()
    }

    func switchToTunnel(_ exchange: Exchange, connection: UpstreamConnection) {
        // Upgrade fields never reach the upstream from an HTTP/2 stream, so
        // a 101 is refused before this; reset the stream if one gets here.
        connection.close()
        closeDownstream()
    }
}
