import CNghttp2
import NIOCore
import NIOHTTP1
import WeirCore

/// One downstream HTTP/2 stream: a request in, a response out, through the
/// same exchange logic as an HTTP/1.1 request (`ExchangeDownstream`).
/// Not a channel handler: `HTTP2DownstreamConnection`'s nghttp2 callbacks
/// hand it header fields and body chunks, and it submits its response to
/// the connection's nghttp2 session.
///
/// The request's header list is made an HTTP/1.1 head with its field
/// index in one pass (`HTTP2RequestHead`: what `HTTP1RequestParser` would
/// make of those bytes, refused for the same reasons), so the exchange gets
/// the same `RequestHead` (and the same upstream fast path, field checks
/// and limits) as for HTTP/1.1: `:authority` becomes Host, split `cookie`
/// fields are joined (RFC 9113 §8.2.3), and a body without a length is
/// sent upstream chunked. What RFC 9113 §8.1.1-8.2 calls malformed (pseudo-header
/// errors, uppercase names, connection-specific fields, `te` other than
/// `trailers`, CR/LF/NUL in values, a body that disagrees with
/// content-length, trailers over max_header_list_size) is refused first
/// with a stream error PROTOCOL_ERROR (HTTP2RequestFields, checked in the
/// pass that writes the head). A request head over max_header_list_size is
/// answered 431 (the proxy's JSON error with its request id), the
/// connection kept.
///
/// Backpressure: body bytes are consumed from the stream's receive window
/// (nghttp2_session_consume_stream, which sends WINDOW_UPDATE) only while
/// the upstream connection is writable, so a client sending faster than the
/// upstream takes waits on its window. The other way, the response body is
/// queued here and read by nghttp2 as the client's windows allow (the data
/// provider, `readResponseBody`); the upstream is paused while more than
/// `outboundHighWater` bytes are queued or the socket is not writable.
final class HTTP2ServerStream: ExchangeDownstream {
    let connection: HTTP2DownstreamConnection
    let streamID: Int32
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
    /// See ExchangeDownstream.noPluginChanges.
    var noPluginChanges: ResponseHeadChanges? = nil
    /// HEADERS seen: what follows is body and trailers.
    private var headSeen = false
    /// The client sent END_STREAM.
    private var clientEnded = false
    /// The response's end was queued (or the stream is gone): nothing more goes out.
    private var responseEnded = false
    /// The stream was reset (by us) or closed by nghttp2.
    private var gone = false
    /// Body bytes still to come under the request's content-length (nil:
    /// no length). A body that disagrees with it makes the request
    /// malformed (RFC 9113 §8.1.1).
    private var bodyBytesExpected: Int?
    /// Request body bytes received but not yet given back to the client's
    /// stream window (held while the upstream cannot take more).
    private var unconsumedBytes = 0
    /// The response HEADERS were submitted (with the body's data provider
    /// unless the response has no body).
    private var headSubmitted = false
    /// Response body queued for the data provider (one buffer: chunks that
    /// arrive before nghttp2 took the previous ones are appended to it).
    private var responseBody: ByteBuffer?
    private var responseBodyBytes: Int { responseBody?.readableBytes ?? 0 }
    /// The response body is complete (what is queued is all of it).
    private var responseBodyEnded = false
    /// Trailers to send after the body (submitted when the provider ends it).
    private var responseTrailers: HTTP2FieldList?
    /// The data provider answered NGHTTP2_ERR_DEFERRED: new bytes resume it.
    private var bodyDeferred = false
    /// The frame with END_STREAM has been handed to the socket.
    private var endSent = false
    /// Completed when the response's last frame is written (or the stream goes).
    private var endPromise: EventLoopPromise<Void>?
    /// A reset to send once the response's last frame is out (a reset
    /// submitted earlier would overtake the queued DATA).
    private var resetAfterEnd: nghttp2_error_code?
    private static let outboundHighWater = 64 * 1024

    init(connection: HTTP2DownstreamConnection, streamID: Int32) {
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
    var localAddress: SocketAddress? { connection.localAddress }
    var connectionPlugins: ConnectionPlugins? {
        get { connection.connectionPlugins }
        set { connection.connectionPlugins = newValue }
    }
    var allocator: ByteBufferAllocator { connection.allocator }
    var eventLoop: EventLoop { connection.eventLoop }
    /// The connection's one spare array, for whichever stream starts next.
    var spareUpstreamFields: [HTTP1AddedField] {
        get { connection.spareUpstreamFields }
        set { connection.spareUpstreamFields = newValue }
    }
    var upstreamOwnLinesMemo: UpstreamOwnLinesMemo { connection.upstreamOwnLinesMemo }
    var downstreamIsWritable: Bool {
        responseBodyBytes < Self.outboundHighWater && connection.isWritable
    }
    private var session: OpaquePointer? { connection.session }

    // MARK: - Stream lifecycle (called by the connection)

    /// The stream is closed (both ends done, reset by either side, or the
    /// connection went).
    func streamClosed() {
        gone = true
        responseBody = nil
        let cut = !responseEnded
        responseEnded = true
        exchangeDeadline.set(nil)
        if let endPromise {
            self.endPromise = nil
            endPromise.succeed(())
        }
        // An exchange whose response end was queued finishes on its own;
        // any other was cut by the client.
        if cut, let exchange, !exchange.finished {
            abortExchange(exchange, reason: "the client reset the HTTP/2 stream")
        }
    }

    /// nghttp2 handed the frame carrying END_STREAM to the socket.
    func responseEndSent() {
        endSent = true
        if let endPromise {
            self.endPromise = nil
            endPromise.succeed(())
        }
        if let code = resetAfterEnd {
            resetAfterEnd = nil
            resetStream(code)
        }
    }

    // MARK: - Reading from the client

    private var shouldRead: Bool {
        guard let exchange, !clientEnded else { return true }
        if exchange.requestEnded || exchange.discardingBody { return true }
        guard let connection = exchange.connection else { return exchange.plugins?.bodyWaiter != nil }
        return connection.channel.isWritable
    }

    func resumeReadingIfAllowed() {
        guard unconsumedBytes > 0, shouldRead else { return }
        consumeReceived()
        connection.flushSoon()
    }

    /// Gives the received body bytes back to the client's stream window
    /// (nghttp2 sends WINDOW_UPDATE once half of the window is used).
    private func consumeReceived() {
        guard let session, !gone else { return }
        nghttp2_session_consume_stream(session, streamID, unconsumedBytes)
        unconsumedBytes = 0
    }

    /// The header block is complete (the connection's `receivingFields`):
    /// the request's head, or its trailers.
    func headerBlockEnded(endStream: Bool) {
        guard !gone else { return }
        if connection.receivingTooLarge {
            // Trailers cannot be answered (the response may be under way).
            if headSeen { return rejectMalformedStream(HTTP2RequestFields.Malformed.headerListTooLarge) }
            headSeen = true
            if endStream { clientEnded = true }
            // nghttp2 decoded the whole block (the HPACK table stays in step
            // with the client's); only the fields past the limit were not
            // kept. A request refused with a status, as nginx and Envoy do.
            connection.receivedMalformedRequest(on: streamID, error: HTTP2RequestFields.Malformed.headerListTooLarge)
            return refuseRequest(.headersTooLarge, message:
                "request header list over max_header_list_size (\(connection.settings.maxHeaderListSize) bytes)")
        }
        let receivedFields = connection.receivingFields
        if !headSeen {
            headSeen = true
            if endStream { clientEnded = true }
            beginRequest(receivedFields, endStream: endStream)
        } else {
            // Trailers: they end the stream (RFC 9113 §8.1).
            clientEnded = true
            do {
                if !endStream { throw HTTP2RequestFields.Malformed.trailersWithoutEndStream }
                try HTTP2RequestFields.checkTrailers(receivedFields)
                if let expected = bodyBytesExpected, expected != 0 { throw HTTP2RequestFields.Malformed.bodyShorterThanContentLength }
            } catch {
                return rejectMalformedStream(error)
            }
            guard let exchange, !exchange.requestEnded else { return }
            var trailers = HTTPHeaders()
            receivedFields.forEach { name, value in
                trailers.add(name: HTTP2RequestFields.text(name), value: HTTP2RequestFields.text(value))
            }
            requestEnd(trailers.isEmpty ? nil : trailers, exchange: exchange)
        }
    }

    /// A chunk of a DATA frame's payload (valid during the call only).
    func receivedData(_ bytes: UnsafeRawBufferPointer) {
        guard !gone, !clientEnded else { return }
        let length = bytes.count
        if let expected = bodyBytesExpected {
            if length > expected { return rejectMalformedStream(HTTP2RequestFields.Malformed.bodyLongerThanContentLength) }
            bodyBytesExpected = expected - length
        }
        unconsumedBytes += length
        if let exchange, !exchange.requestEnded, length > 0 {
            var buffer = allocator.buffer(capacity: length)
            buffer.writeBytes(bytes)
            requestBody(buffer, exchange: exchange)
        }
        if shouldRead { consumeReceived() }
    }

    /// A DATA frame with END_STREAM (after its payload's chunks).
    func receivedEndOfStream() {
        guard !gone, !clientEnded else { return }
        clientEnded = true
        if let expected = bodyBytesExpected, expected != 0 {
            return rejectMalformedStream(HTTP2RequestFields.Malformed.bodyShorterThanContentLength)
        }
        if let exchange, !exchange.requestEnded {
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

    func upstreamRead(_ part: UpstreamResponsePart, on connection: UpstreamConnection) {
        relayUpstreamPart(part, on: connection)
    }

    // MARK: - Request start

    /// The request's header list checked (RFC 9113) and made an HTTP/1.1
    /// head (`HTTP2RequestHead`: the HTTP/1.1 head rules and limits), then routed.
    private func beginRequest(_ headers: HTTP2FieldList, endStream: Bool) {
        let fields: HTTP2RequestFields
        do {
            fields = try HTTP2RequestFields(headers)
        } catch {
            return rejectMalformedStream(error)
        }
        let wire: HTTP1RequestHead
        do {
            wire = try HTTP2RequestHead.make(headers, fields, endStream: endStream, limits: connection.parserLimits,
                                             allocator: allocator)
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
        framing.teTrailers = wire.facts.teTrailers
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
        resetStream(NGHTTP2_PROTOCOL_ERROR)
        if let exchange, !exchange.finished {
            if exchange.status == 0 { exchange.status = 400 }
            abortExchange(exchange, reason: "malformed HTTP/2 request: \(error)")
        }
    }

    /// The header list does not make a valid HTTP/1.1 head for Weir's
    /// parser: its status, in the proxy's error shape, on this stream only.
    /// Counted against max_glitches like a reset malformed request: a
    /// client that only sends such requests is cut off the same way.
    private func rejectMalformed(_ error: Error) {
        let parseError = error as? HTTP1ParseError ?? .invalidRequestLine
        connection.receivedMalformedRequest(on: streamID, error: parseError)
        refuseRequest(parseError.proxyErrorKind, message: "malformed request: \(parseError)")
    }

    /// Answers the request with the proxy's error (JSON body, request id)
    /// without routing it. The connection goes on; a request body still to
    /// come is not read (the stream is reset NO_ERROR after the response,
    /// `exchangeFinished`).
    private func refuseRequest(_ kind: ProxyErrorKind, message: String) {
        let exchange = makeExchange(head: nil)
        self.exchange = exchange
        exchange.requestEnded = true
        sendLocalResponse(exchange, kind: kind, message: message, close: true)
    }

    // MARK: - Writing the response as HEADERS and DATA frames

    /// The upstream's HTTP/1 head (with the plugins' edits, if any) as a
    /// HEADERS frame: lower-case names, no connection-specific fields, Via
    /// extended. Names and values are copied from the head's bytes straight
    /// into the list nghttp2 takes (no Strings), the connection's reused one.
    func relayWireResponseHead(_ head: HTTP1ResponseHead, pluginChanges: inout ResponseHeadChanges?, exchange: Exchange) {
        let fields = head.fields
        var dropped = fields.hopByHopFields()
        if case .some = pluginChanges { dropped.formUnion(pluginChanges!.edits.removed) }
        let status = pluginChanges?.status?.code ?? head.status
        connection.withSendingFields { headers in
            headers.add(name: ":status", value: Self.statusValue(status))
            var via: String? = nil
            // For a gRPC trailers-only answer (writeHead): grpc-status, and whether the first content-length is 0.
            var grpcStatus = false
            var contentLengthZero: Bool? = nil
            var hasDate = false
            fields.bytes.withUnsafeReadableBytes { raw in
                let base = raw.bindMemory(to: UInt8.self).baseAddress!
                for (i, e) in fields.entries.enumerated() where !dropped.contains(i) {
                    let name = base + Int(e.nameStart), nameLength = Int(e.nameLength)
                    let value = base + Int(e.valueStart), valueLength = Int(e.valueLength)
                    switch e.known {
                    case .te, .keepAlive, .proxyConnection, .transferEncoding, .upgrade, .connection:
                        continue
                    case .via:
                        let text = String(decoding: UnsafeBufferPointer(start: value, count: valueLength), as: UTF8.self)
                        via = via.map { $0 + ", " + text } ?? text
                        continue
                    case .contentLength:
                        if contentLengthZero == nil { contentLengthZero = valueLength == 1 && value[0] == UInt8(ascii: "0") }
                    case .date:
                        hasDate = true
                    default:
                        if nameLength == 11 && HTTP1Bytes.equalsLower(name, nameLength, "grpc-status") { grpcStatus = true }
                    }
                    headers.add(lowercasingName: name, nameLength, value: value, valueLength)
                }
            }
            // A prepared set's wire lines: names the proxy gives no meaning
            // to (PendingResponseHeaders.wireLines), lower-case already.
            pluginChanges?.forEachWireLine { name, value in
                if name.count == 11 && HTTP1Bytes.equalsLower(name.baseAddress!.assumingMemoryBound(to: UInt8.self), 11, "grpc-status") {
                    grpcStatus = true
                }
                headers.add(lowercasingName: name.baseAddress!.assumingMemoryBound(to: UInt8.self), name.count,
                            value: value.baseAddress!.assumingMemoryBound(to: UInt8.self), value.count)
            }
            for field in pluginChanges?.edits.added ?? [] {
                switch HTTP1KnownField.classify(field.name) {
                case .via: via = via.map { $0 + ", " + field.value } ?? field.value
                case let kind where kind.isHopByHop: continue
                case let kind:
                    let name = field.name.lowercased()
                    if kind == .contentLength && contentLengthZero == nil { contentLengthZero = field.value == "0" }
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
            writeHead(headers, status: status, grpcTrailersOnly: grpcStatus && contentLengthZero == true, exchange: exchange)
        }
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

    func relayInterimResponseHead(_ head: HTTP1ResponseHead, exchange: Exchange) {
        guard !responseEnded, !headSubmitted, let session else { return }
        var headers = HTTP2FieldList(capacity: head.fields.count + 1)
        headers.add(name: ":status", value: String(head.status))
        let dropped = head.fields.hopByHopFields()
        for i in 0..<head.fields.count where !dropped.contains(i) {
            headers.add(name: head.fields.name(at: i).lowercased(), value: head.fields.value(at: i))
        }
        _ = headers.withNameValues { nvs, count in
            nghttp2_submit_headers(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), streamID, nil, nvs, count, nil)
        }
        connection.flushSoon()
    }

    /// Submits the response HEADERS: with END_STREAM when `bodyless`,
    /// else with the data provider that reads `responseBody`.
    private func submitResponse(_ headers: HTTP2FieldList, bodyless: Bool) {
        guard let session, !gone else { return }
        headSubmitted = true
        let rv: Int32
        if bodyless {
            rv = headers.withNameValues { nvs, count in nghttp2_submit_response(session, streamID, nvs, count, nil) }
        } else {
            var provider = nghttp2_data_provider(
                source: nghttp2_data_source(ptr: Unmanaged.passUnretained(self).toOpaque()),
                read_callback: http2ResponseBodyRead)
            rv = headers.withNameValues { nvs, count in nghttp2_submit_response(session, streamID, nvs, count, &provider) }
        }
        if rv != 0 {
            // The stream is already closed on nghttp2's side (a client reset in the same read).
            loopContext.logger.debug("HTTP/2 response not submitted", metadata: [
                "stream": "\(streamID)", "error": "\(HTTP2DownstreamConnection.SessionError(call: "nghttp2_submit_response", code: Int(rv)))"])
        }
    }

    private func writeHead(_ headers: HTTP2FieldList, status: Int, grpcTrailersOnly: Bool, exchange: Exchange) {
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
            responseBodyEnded = true
        }
        // The HEADERS frame goes out with the body's first DATA (or its
        // END_STREAM) when they are queued before the next flush.
        submitResponse(headers, bodyless: bodyless)
    }

    /// HTTP/1 fields as HTTP/2 ones: lower-case names, no connection-specific fields.
    private static func appendFields(_ fields: HTTPHeaders, to headers: inout HTTP2FieldList) {
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
        if responseBody == nil || responseBody!.readableBytes == 0 {
            responseBody = data
        } else {
            responseBody!.writeImmutableBuffer(data)
        }
        resumeBody()
    }

    /// The data provider is waiting for bytes (or the end): wake it.
    private func resumeBody() {
        guard bodyDeferred, let session, !gone else { return }
        bodyDeferred = false
        nghttp2_session_resume_data(session, streamID)
    }

    /// nghttp2 asks for up to `length` bytes of the response body for one
    /// DATA frame (from nghttp2_session_mem_send). Copies what is queued;
    /// nothing queued and not ended: NGHTTP2_ERR_DEFERRED until more comes.
    func readResponseBody(into buffer: UnsafeMutablePointer<UInt8>, length: Int, flags: UnsafeMutablePointer<UInt32>) -> Int {
        let wasFull = responseBodyBytes >= Self.outboundHighWater
        var copied = 0
        if var body = responseBody {
            copied = min(length, body.readableBytes)
            if copied > 0 {
                body.withUnsafeReadableBytes { raw in
                    UnsafeMutableRawPointer(buffer).copyMemory(from: raw.baseAddress!, byteCount: copied)
                }
            }
            body.moveReaderIndex(forwardBy: copied)
            responseBody = body.readableBytes > 0 ? body : nil
        }
        if responseBodyBytes == 0 && responseBodyEnded {
            flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
            if let trailers = responseTrailers, let session {
                responseTrailers = nil
                flags.pointee |= NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
                _ = trailers.withNameValues { nvs, count in nghttp2_submit_trailer(session, streamID, nvs, count) }
            }
        } else if copied == 0 {
            bodyDeferred = true
            return Int(NGHTTP2_ERR_DEFERRED.rawValue)
        }
        if wasFull && responseBodyBytes < Self.outboundHighWater { writabilityMayHaveChanged() }
        return copied
    }

    func writeResponseEnd(_ trailers: HTTP1Fields?, exchange: Exchange, promise: EventLoopPromise<Void>?) {
        guard !responseEnded, !gone else {
            promise?.succeed(())
            return
        }
        responseEnded = true
        responseBodyEnded = true
        endPromise = promise
        if let trailers, trailers.count > 0 {
            var headers = HTTP2FieldList(capacity: trailers.count)
            for (i, e) in trailers.entries.enumerated() where e.known.forwardedInTrailers {
                headers.add(name: trailers.name(at: i).lowercased(), value: trailers.value(at: i))
            }
            if headers.count > 0 { responseTrailers = headers }
        }
        resumeBody()
        connection.flushSoon()
    }

    func writeLocalResponse(_ head: HTTPResponseHead, body: ByteBuffer?, exchange: Exchange, promise: EventLoopPromise<Void>?) {
        guard !responseEnded, !headSubmitted, !gone else {
            promise?.succeed(())
            return
        }
        responseEnded = true
        responseBodyEnded = true
        endPromise = promise
        var headers = HTTP2FieldList(capacity: head.headers.count + 1)
        headers.add(name: ":status", value: String(head.status.code))
        Self.appendFields(head.headers, to: &headers)
        if let body, body.readableBytes > 0 {
            responseBody = body
            submitResponse(headers, bodyless: false)
        } else {
            submitResponse(headers, bodyless: true)
        }
        connection.flushSoon()
    }

    func flushDownstream() { connection.flushSoon() }

    func endGRPCResponseWithStatus(_ status: GRPCStatusCode, message: String) -> Bool {
        guard !responseEnded, !gone else { return false }
        responseEnded = true
        responseBodyEnded = true
        var trailers = HTTP2FieldList(capacity: 2)
        trailers.add(name: "grpc-status", value: String(status.rawValue))
        trailers.add(name: "grpc-message", value: GRPCErrorResponse.percentEncoded(message))
        if headSubmitted {
            responseTrailers = trailers
            resumeBody()
        } else {
            // No head yet: a trailers-only response.
            var headers = HTTP2FieldList(capacity: 4)
            headers.add(name: ":status", value: "200")
            headers.add(name: "content-type", value: "application/grpc")
            headers.add(name: "grpc-status", value: String(status.rawValue))
            headers.add(name: "grpc-message", value: GRPCErrorResponse.percentEncoded(message))
            submitResponse(headers, bodyless: true)
        }
        connection.flushSoon()
        return true
    }

    /// Resets the stream (the connection and its other streams go on); a
    /// response whose end is queued goes out first.
    func closeDownstream() {
        if responseBodyEnded && headSubmitted && !endSent && !gone {
            resetAfterEnd = NGHTTP2_CANCEL
            return
        }
        resetStream(NGHTTP2_CANCEL)
    }

    private func resetStream(_ code: nghttp2_error_code) {
        responseEnded = true
        responseBody = nil
        guard !gone else { return }
        gone = true
        connection.submitReset(streamID, code: code)
    }

    // MARK: - Lifecycle hooks

    /// A stream carries one exchange. When the client has ended its side,
    /// the response's END_STREAM closes the stream by itself. Otherwise the
    /// stream is reset once the response is out (`exchangeFinished`).
    func closesAfter(_ exchange: Exchange) -> Bool { !clientEnded }

    func exchangeFinished(_ exchange: Exchange, afterWrite: EventLoopFuture<Void>?) {
        connection.flushSoon()
        if connection.spareUpstreamFields.capacity == 0 {
            recycleUpstreamFields(of: exchange, into: &connection.spareUpstreamFields)
        }
        guard !clientEnded else { return }   // both sides ended: the stream closes by itself
        // The response is out before the request's end: reset the rest
        // (RFC 9113 §8.1: NO_ERROR, the client stops sending), after the
        // response's last frame (nghttp2 sends a reset ahead of queued DATA).
        if endSent || !headSubmitted {
            resetStream(NGHTTP2_NO_ERROR)
        } else {
            resetAfterEnd = NGHTTP2_NO_ERROR
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
