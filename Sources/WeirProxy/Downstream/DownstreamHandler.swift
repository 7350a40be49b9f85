import Logging
import NIOCore
import NIOHTTP1
import WeirCore

/// The proxy for one downstream HTTP/1.1 connection, over raw bytes.
///
/// This type is the **HTTP/1.1 framing**: one cumulation buffer,
/// `HTTP1RequestParser` for heads, content-length slices or
/// `HTTP1ChunkedDecoder` for bodies; responses written as bytes
/// (`HTTP1HeadWriter` for forwarded heads, chunk framing when re-chunked).
/// **The exchange** (routing, plugins, upstream attempts, retries,
/// timeouts, response relay) is `ExchangeDownstream`'s extension
/// (`Exchange/ExchangeDownstream.swift`), shared with HTTP/2 streams: it
/// sees a `RequestHead` and body slices and answers through the write
/// functions this type implements (`MARK: - HTTP/1.1 framing: output`).
///
/// One request at a time goes through: while a request is in flight the
/// client is read only to stream that request's body (and only as fast as
/// the upstream accepts it); pipelined requests wait unparsed in the
/// buffer until the response before them is done, so responses stay in order.
///
/// Pipeline: just this handler (after the TLS handler on https listeners).
/// When it is the only one, its writes, flushes and read requests go
/// straight to the channel's core (`SoleHandlerIO`). The upstream side of
/// each exchange is an `UpstreamConnection` from the loop's pool, on this loop.
final class DownstreamHandler: ChannelDuplexHandler, RemovableChannelHandler, ExchangeDownstream {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let loopContext: LoopContext
    let listener: ListenerRuntime
    /// `loopContext.clock`, held directly: read through `loopContext` it
    /// was retained and released around every client read.
    private let clock: LoopClock
    var context: ChannelHandlerContext!
    /// Writes, flushes and reads: straight to the channel's core on plain
    /// listeners, where this is the pipeline's only handler. Every write
    /// and flush of this connection must go through it (a plain
    /// `context.write` would overtake a buffer it holds until the flush).
    private let io = SoleHandlerIO()
    private let soleHandler: Bool
    /// `context.channel.isWritable` as of the last writability event (NIO
    /// fires one in the same call that crosses a watermark): read per body
    /// part, where reaching the channel through the context costs two
    /// retain/release pairs and an existential call.
    private var channelWritable = true
    /// The channel's allocator, looked up once (not per write through the
    /// `Channel` existential).
    private(set) var allocator = ByteBufferAllocator()
    /// A forwarded response head is in `responseHeadBuffer` and not written
    /// yet: the first body bytes join it (one write instead of two for a
    /// small response).
    private var responseHeadPending = false
    /// Forwarded response heads (with a small body joined) are written into
    /// this one buffer, kept across the connection's responses: by the next
    /// response NIO has usually written and released it, so `clear()` finds
    /// it unshared and reuses its memory instead of a new storage object and
    /// malloc/free per response. A write still pending just makes `clear()`
    /// allocate, as before. Not kept above `keptResponseBufferCapacity`, so
    /// an idle keep-alive connection holds at most that much.
    private var responseHeadBuffer = ByteBuffer()
    private static let keptResponseBufferCapacity = 4096
    /// Storage for the proxy's added response fields, reused (see relayWireResponseHead).
    private var responseAddedFields: [HTTP1AddedField] = []
    /// See ExchangeDownstream.noPluginChanges.
    var noPluginChanges: ResponseHeadChanges? = nil
    var peerAddress: SocketAddress?
    var clientIP = ""
    private(set) var peerTrusted = false

    /// The request in flight, if any.
    var exchange: Exchange?
    /// The connection's last finished exchange, cleared, for its next
    /// request (`keepForReuse`).
    private var spareExchange: Exchange?
    /// The plugin side of this connection's last request, finished and kept
    /// for its next one (`ExchangePlugins.endScope`, `beginRequestPlugins`). It
    /// holds this handler: the cycle is broken when the connection ends
    /// (`channelInactive`, `handlerRemoved`) or a reload replaces its
    /// generation (`LoopContext.plugins`; one retired meanwhile is not kept).
    var sparePlugins: ExchangePlugins?
    /// Bytes read from the client and not parsed yet: the rest of a head,
    /// body bytes, pipelined requests waiting for their turn.
    private var inbound = ByteBuffer()
    private var parser: HTTP1RequestParser
    private let limits: HTTP1Limits
    /// How the current request's body is delimited on the wire.
    private enum RequestBodyFraming {
        case none
        case contentLength(remaining: Int)
        case chunked(HTTP1ChunkedDecoder)
    }
    private var requestFraming = RequestBodyFraming.none
    private var processingInbound = false
    /// While a response is in flight the client is still read, so that NIO
    /// need not drop and re-add read interest (two epoll_ctl per request),
    /// but only while pipelined input stays this small.
    private static let maxPipelinedBytes = 64 * 1024
    /// A `read()` was held back; issue it when reading is allowed again.
    private var pendingRead = false
    /// Idle keep-alive or header timeout for the connection.
    private var connectionTimer = LazyTimer()
    private var connectionTimerIsHeader = false
    /// Read/write/whole-request deadlines of the exchange in flight. Per
    /// connection (not per exchange) so keep-alive requests reuse its task.
    var exchangeTimer = LazyTimer()
    private var sawHeadBytes = false
    private var closing = false
    private(set) var draining = false
    private(set) var registered = false
    /// The parser saw an error; nothing more will be parsed.
    private var decoderFailed = false
    /// After an Upgrade request no further head is parsed, so the connection
    /// cannot carry another HTTP request unless it becomes a tunnel (bytes
    /// that arrive meanwhile are kept for the tunnel).
    private var decoderStopped = false
    /// The client shut down its write side: no more requests will come.
    private var inputClosed = false
    /// The connection-phase plugin scope (see ExchangeDownstream+Plugins).
    var connectionPlugins: ConnectionPlugins?
    var spareUpstreamFields: [HTTP1AddedField] = []
    let upstreamOwnLinesMemo = UpstreamOwnLinesMemo()
    /// The last request's Host value as a String (`HostValueMemo`).
    private var hostMemo = HostValueMemo()
    /// No request yet on an http listener with `http2.enabled` (or an https
    /// one whose ALPN chose h2): the first bytes may be the HTTP/2 client
    /// preface, and then the connection becomes an HTTP/2 one.
    private var mayStartHTTP2: Bool
    /// The TLS session of an https connection (set before this handler is
    /// added; see TLS/ListenerTLS.swift); nil on plain connections.
    var tls: TLSConnectionInfo?

    /// `soleHandler`: nothing else is or will be in the pipeline while this
    /// handler is in it (a plain listener; not behind a TLS handler).
    init(loopContext: LoopContext, listener: ListenerRuntime, soleHandler: Bool) {
        self.loopContext = loopContext
        self.listener = listener
        self.clock = loopContext.clock
        self.soleHandler = soleHandler
        self.limits = HTTP1Limits(listener.config.limits)
        self.parser = HTTP1RequestParser(limits: limits)
        self.mayStartHTTP2 = listener.config.protocol == .http && listener.config.http2.enabled
    }

    // MARK: - Channel lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        io.attach(context, soleHandler: soleHandler)
        // https: writes, flushes and reads straight to NIOSSLHandler / the core.
        if tls != nil { io.attachBehindTLS(context) }
        allocator = context.channel.allocator
        channelWritable = context.channel.isWritable
        // Strong captures, let go of in handlerRemoved (which NIO calls on
        // close and on removal): a weak one would give this handler a side
        // table, making each of its retains and releases the slow path.
        connectionTimer.setUp(loop: context.eventLoop) { self.connectionTimerFired() }
        exchangeTimer.setUp(loop: context.eventLoop) { self.exchangeTimerFired() }
        if context.channel.isActive { connectionStarted(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        connectionStarted(context: context)
        context.fireChannelActive()
    }

    private func connectionStarted(context: ChannelHandlerContext) {
        guard !registered else { return }
        registered = true
        peerAddress = context.channel.remoteAddress
        clientIP = peerAddress?.clientIPText ?? ""
        if !clientIP.isEmpty {
            peerTrusted = loopContext.runtime.trustedProxies.contains { $0.contains(clientIP) }
        }
        loopContext.register(self)
        if tls?.alpn == "h2" && listener.config.http2.enabled { mayStartHTTP2 = true }
        listener.observer?.connectionOpened(listener: listener.name)
        armConnectionTimer(header: true)
        if let plugins = loopContext.plugins { startConnectionPlugins(plugins) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closing = true
        connectionTimer.cancel()
        exchangeTimer.cancel()
        if let exchange {
            abortExchange(exchange, reason: "client closed the connection")
        }
        connectionPlugins?.close()
        sparePlugins = nil
        if registered {
            registered = false
            loopContext.unregister(self)
            listener.connectionClosed()
            listener.observer?.connectionClosed(listener: listener.name)
        }
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        io.detach()
        connectionTimer.tearDown()
        exchangeTimer.tearDown()
        // The handler and its context hold each other (NIO's context keeps
        // its handler): without this a closed connection's handler, with its
        // buffers and spare exchange, was never freed (DownstreamLifetimeTests).
        if context.channel.isActive {
            // Removed from a live channel (a tunnel after a 101, or HTTP/2):
            // the calls that removed it are still on the stack and may use
            // `context`; let go once they are done, on the next loop tick.
            context.eventLoop.execute { self.context = nil }
        } else {
            self.context = nil
        }
        connectionPlugins?.close()   // a tunnel runs no more plugins
        sparePlugins = nil           // it holds this handler
        if registered {
            // Removed for a tunnel: the connection lives on, now counted and
            // closed by the tunnel (see switchToTunnel).
            registered = false
            loopContext.unregister(self)
        }
    }

    // MARK: - Reading from the client

    func read(context: ChannelHandlerContext) {
        if shouldReadDownstream {
            io.read(context: context)
        } else {
            pendingRead = true
        }
    }

    private var shouldReadDownstream: Bool {
        if closing || inputClosed { return false }
        if connectionPlugins?.phasePending == true { return false }
        guard let exchange else { return true }
        if exchange.requestEnded {
            return inbound.readableBytes < Self.maxPipelinedBytes
        }
        if exchange.discardingBody { return true }
        guard let connection = exchange.connection else { return exchange.plugins?.bodyWaiter != nil }
        return connection.channel.isWritable
    }

    func resumeReadingIfAllowed() {
        if pendingRead && shouldReadDownstream {
            pendingRead = false
            io.read(context: context)
        }
    }

    // MARK: - HTTP/1.1 framing: input

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if closing || decoderFailed { return }
        // A client read event: one clock read serves everything it triggers.
        clock.enterEvent()
        defer { clock.leaveEvent() }
        var buffer = unwrapInboundIn(data)
        // The usual case, nothing left over: the read's buffer and the
        // empty `inbound` change places (no copy).
        let swapped = inbound.readableBytes == 0
        if swapped { swap(&inbound, &buffer) } else { inbound.writeBuffer(&buffer) }
        processInbound()
        // Drained: let go of the read's storage. Holding it (even empty)
        // makes NIOSSL copy its whole 32 KB plaintext buffer on the next
        // decode (copy-on-write), once per request on https listeners.
        // A storage-less empty buffer swapped out above just comes back
        // (the read's storage goes with `buffer`): `ByteBuffer()` is NIO's
        // shared zero-capacity storage, a retain and a release per read.
        if inbound.readableBytes == 0 {
            if swapped && buffer.capacity == 0 { swap(&inbound, &buffer) } else { inbound = ByteBuffer() }
        }
    }

    /// Parses what is buffered: heads (only while no exchange is in flight,
    /// so pipelined requests wait their turn) and the current request's body.
    /// Re-entrant calls (an exchange finishing inside a callback) return at
    /// once: the outer loop picks up where the state now is.
    private func processInbound() {
        guard !processingInbound else { return }
        processingInbound = true
        defer { processingInbound = false }
        while !closing && !decoderFailed {
            switch requestFraming {
            case .none:
                guard exchange == nil, !decoderStopped, inbound.readableBytes > 0 else { return }
                if mayStartHTTP2 {
                    switch HTTP2Preface.match(inbound) {
                    case .incomplete: headBytesArrived(); return
                    case .http2: headBytesArrived(); return switchToHTTP2()
                    case .other: mayStartHTTP2 = false
                    }
                }
                let head: HTTP1RequestHead
                do {
                    guard let parsed = try parser.parse(&inbound) else {
                        headBytesArrived()
                        return
                    }
                    head = parsed
                } catch {
                    headBytesArrived()
                    return rejectMalformed(error)
                }
                // A whole head in the bytes at hand: the header timeout is
                // not armed for it (`beginRequest` would clear it at once:
                // a timer set per request for nothing).
                beginRequest(consume head)
            case .contentLength(let remaining):
                guard let exchange, inbound.readableBytes > 0 else { return }
                let n = min(remaining, inbound.readableBytes)
                let slice = inbound.readSlice(length: n)!
                if n == remaining {
                    requestFraming = .none
                    requestBody(slice, exchange: exchange)
                    if self.exchange === exchange { requestEnd(nil, exchange: exchange) }
                } else {
                    requestFraming = .contentLength(remaining: remaining - n)
                    requestBody(slice, exchange: exchange)
                }
            case .chunked(var decoder):
                guard let exchange else { return }
                let event: HTTP1ChunkedEvent
                do {
                    event = try decoder.next(&inbound)
                } catch {
                    requestFraming = .none
                    return rejectMalformed(error)
                }
                switch event {
                case .needMoreData:
                    requestFraming = .chunked(decoder)
                    return
                case .data(let slice):
                    requestFraming = .chunked(decoder)
                    requestBody(slice, exchange: exchange)
                case .end(let trailers):
                    requestFraming = .none
                    requestEnd(trailers.map(Self.trailerHeaders), exchange: exchange)
                }
            }
        }
    }

    /// Trailer fields as NIO headers (rare; plugins' pending parts use them).
    private static func trailerHeaders(_ fields: HTTP1Fields) -> HTTPHeaders {
        var headers = HTTPHeaders()
        for (i, e) in fields.entries.enumerated() where e.known.forwardedInTrailers {
            headers.add(name: fields.name(at: i), value: fields.value(at: i))
        }
        return headers
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushUpstreamIfNeeded()
        // The next read, asked for here when wanted (see SoleHandlerIO.rearmRead).
        io.rearmRead(if: shouldReadDownstream, context: context)
        // Direct (the only handler, or behind TLS) it is the last handler:
        // the pipeline's tail would discard the event.
        if !io.isDirect { context.fireChannelReadComplete() }
    }

    private func flushUpstreamIfNeeded() {
        if let exchange, exchange.upstreamNeedsFlush, let connection = exchange.connection {
            exchange.upstreamNeedsFlush = false
            connection.flush()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        channelWritable = context.channel.isWritable
        if channelWritable, let connection = exchange?.connection {
            connection.handler.resumeReading()
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            inputClosed = true
            if let exchange, !exchange.finished {
                // Answer the request in flight, then close.
                exchange.keepAlive = false
                if !exchange.requestEnded && !exchange.discardingBody {
                    // The body was cut short: the request can never complete.
                    if exchange.responseStarted {
                        abortExchange(exchange, reason: "client closed its side mid-request")
                        context.close(promise: nil)
                    } else {
                        exchange.requestEnded = true
                        failBeforeResponse(exchange, .badRequest, "request body incomplete: the client closed its side")
                    }
                }
            } else if exchange == nil {
                // Nothing in flight (at most part of a head): done.
                closing = true
                context.close(promise: nil)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // I/O errors (reset by peer and friends): just close.
        context.close(promise: nil)
    }

    /// The parser refused the input: its status (400, 414, 431, 501, 505).
    private func rejectMalformed(_ error: Error) {
        decoderFailed = true
        let parseError = error as? HTTP1ParseError ?? .invalidRequestLine
        let kind = parseError.proxyErrorKind
        rejectMalformed(kind, message: "malformed request: \(parseError)")
    }

    /// A malformed request: 400 (or 431) and close; anything already sent
    /// upstream for it is abandoned, since the upstream's view may differ.
    private func rejectMalformed(_ kind: ProxyErrorKind, message: String) {
        loopContext.logger.debug("malformed request", metadata: ["client": "\(clientIP)", "message": "\(message)"])
        if let exchange {
            if exchange.responseStarted {
                abortExchange(exchange, reason: message)
                context.close(promise: nil)
                return
            }
            exchange.connection?.close()
            exchange.connection = nil
            exchange.discardingBody = true
            exchange.requestEnded = true
            sendLocalResponse(exchange, kind: kind, message: message, close: true)
        } else {
            let exchange = makeExchange(head: nil)
            self.exchange = exchange
            exchange.requestEnded = true
            sendLocalResponse(exchange, kind: kind, message: message, close: true)
        }
    }

    /// Bytes of a new head arrived: the header timeout runs from here.
    private func headBytesArrived() {
        if !sawHeadBytes {
            sawHeadBytes = true
            if !connectionTimerIsHeader { armConnectionTimer(header: true) }
        }
    }

    // MARK: - Timers

    private func armConnectionTimer(header: Bool) {
        let limits = listener.config.limits
        let span = header ? limits.headerTimeout : limits.keepAliveTimeout
        connectionTimerIsHeader = header
        connectionTimer.set(loopContext.clock.now + .nanoseconds(span.nanoseconds))
    }

    private func connectionTimerFired() {
        guard connectionTimer.fired(now: .now()) else { return }
        guard exchange == nil, !closing else { return }
        if sawHeadBytes {
            let exchange = makeExchange(head: nil)
            self.exchange = exchange
            exchange.requestEnded = true
            sendLocalResponse(exchange, kind: .headerTimeout, message: "request head not received in time", close: true)
        } else {
            // Idle keep-alive connection: close quietly.
            closing = true
            context.close(promise: nil)
        }
    }

    // MARK: - Request start

    /// A parsed HTTP/1.1 head: sets up how its body is read, then hands the
    /// request to the exchange logic.
    /// `consuming`: the head moves into the `RequestHead` (see its init).
    private func beginRequest(_ wire: consuming HTTP1RequestHead) {
        connectionTimer.set(nil)
        sawHeadBytes = false
        // The parser has already refused every smuggling shape (CL+TE,
        // differing/duplicate CL, TE not ending in a single chunked, bare
        // CR/LF, obs-fold), missing/duplicate Host, and the 414/431 limits.
        var framing = HeaderRewriting.RequestFraming()
        switch wire.framing {
        case .contentLength(let length):
            framing.contentLength = length
            if length > 0 { requestFraming = .contentLength(remaining: length) }
        case .chunked:
            framing.chunked = true
            requestFraming = .chunked(HTTP1ChunkedDecoder(limits: limits))
        case .none, .untilClose:
            break
        }
        framing.expectsContinue = wire.expectsContinue
        framing.teTrailers = wire.facts.teTrailers
        let keepAlive = wire.keepAlive, wantsUpgrade = wire.wantsUpgrade
        let head = RequestHead(consume wire, hostMemo: &hostMemo)
        var spare: Exchange? = nil
        swap(&spare, &spareExchange)
        let exchange = makeExchange(head: head, reusing: spare)
        self.exchange = exchange
        exchange.keepAlive = keepAlive && !draining
        exchange.framing = framing
        exchange.isUpgrade = wantsUpgrade
        if exchange.isUpgrade { decoderStopped = true; exchange.keepAlive = false }
        if !framing.hasBody {
            exchange.bodyless = true
            // No body to wait for: the request is complete with its head.
            requestEnd(nil, exchange: exchange)
            guard self.exchange === exchange, !exchange.finished else { return }
        }
        routeRequest(exchange, head: head)
    }

    /// The upstream's head forwarded by range copy with the proxy's edits
    /// (hop-by-hop fields and what Connection names removed, Via extended,
    /// framing and Connection added), on top of the plugins' edits if any
    /// (their added lines go through the same rewriting: hop-by-hop ones
    /// are dropped, a Via joins the chain). The proxy's own lines are
    /// written as bytes (literals, the upstream's Via values copied from its
    /// head): no String or `HTTP1AddedField` per response without plugins.
    func relayWireResponseHead(_ head: HTTP1ResponseHead, pluginChanges: inout ResponseHeadChanges?, exchange: Exchange) {
        let code = pluginChanges?.status?.code ?? head.status
        let isUpgrade = code == 101
        let fields = head.fields
        let request = exchange.head!
        let clientIs11 = !request.isHTTP10
        // Hop-by-hop fields are found in the same loop as Via and Date
        // (`hopByHopFields` only when Connection names other fields: it
        // compares those names); TE goes whatever its value.
        var removed = fields.connectionNamesOtherFields ? fields.hopByHopFields(keepUpgrade: isUpgrade) : HTTP1FieldSet()
        var hasLength = false
        if case .contentLength = head.framing { hasLength = true }
        // Read in place (`pluginChanges!`): a bound copy retains its arrays.
        if case .some = pluginChanges {
            removed.formUnion(pluginChanges!.edits.removed)
            // Without a plugin change of Content-Length the upstream's own
            // lines decide (`hasLengthLine`, from the pass below).
            if pluginChanges!.touchesContentLength {
                hasLength = pluginChanges!.edits.hasField(named: "content-length", in: fields)
            }
        }
        var hasLengthLine = false
        // The upstream's Via values (and a plugin's) are chained before ours:
        // `viaValueBytes` counts each with its ", ".
        var upstreamVias = HTTP1FieldSet()
        var viaValueBytes = 0
        var hasDate = false
        fields.entries.withUnsafeBufferPointer { entries in
            for i in entries.indices {
                switch entries[i].known {
                case .other:
                    break
                case .upgrade where isUpgrade:
                    break
                case .te, .connection, .keepAlive, .proxyConnection, .trailer, .transferEncoding, .upgrade:
                    removed.insert(i)
                case .via where !removed.contains(i):
                    removed.insert(i)
                    upstreamVias.insert(i)
                    viaValueBytes += Int(entries[i].valueLength) + 2
                case .date where !removed.contains(i):
                    hasDate = true
                case .contentLength:
                    hasLengthLine = true
                default:
                    break
                }
            }
        }
        if case .some = pluginChanges, !pluginChanges!.touchesContentLength { hasLength = hasLengthLine }
        // Plugins' added lines, minus hop-by-hop ones and Via (chained);
        // written as they are when none is one of those (or a Date). The
        // filtered array's storage is kept across responses (swapped back,
        // emptied, after writing): no allocation per response.
        var added: [HTTP1AddedField] = []
        var pluginVias: [String] = []
        var addedFiltered = false
        if case .some = pluginChanges, !pluginChanges!.edits.added.isEmpty, !pluginChanges!.addedNeedReview {
            added = pluginChanges!.edits.added
        } else if case .some = pluginChanges, !pluginChanges!.edits.added.isEmpty {
            addedFiltered = true
            swap(&added, &responseAddedFields)
            for field in pluginChanges!.edits.added {
                switch HTTP1KnownField.classify(field.name) {
                case .via: pluginVias.append(field.value); viaValueBytes += field.value.utf8.count + 2
                case let kind where kind.isHopByHop: continue
                case .date: hasDate = true; added.append(field)
                default: added.append(field)
                }
            }
        }
        // RFC 9110 §6.6.1: an origin without a clock sends no Date; the
        // proxy adds one (the loop's per-second cached string).
        let date: String? = hasDate ? nil : loopContext.dateCache.current()
        var mustClose = !(exchange.keepAlive && !draining)
        var framingLine: StaticString? = nil
        if isUpgrade {
            framingLine = "connection: upgrade\r\n"
        } else if bodyAllowed(exchange, status: code) && !hasLength {
            if clientIs11 {
                framingLine = "transfer-encoding: chunked\r\n"
                exchange.responseChunked = true
            } else {
                // HTTP/1.0 client and no length: the body ends at close.
                mustClose = true
            }
        }
        var connectionLine: StaticString? = nil
        if !isUpgrade {
            if mustClose {
                connectionLine = "connection: close\r\n"
            } else if !clientIs11 {
                connectionLine = "connection: keep-alive\r\n"
            }
        }
        // An HTTP/2 upstream's response reaches us as a rebuilt HTTP/1.1 head.
        let viaEntry = HeaderRewriting.viaEntryLiteral(http2: exchange.connection?.http2Stream != nil,
                                                       http10: head.version.minor == 0)
        if mustClose { exchange.keepAlive = false }
        exchange.responseStarted = true
        exchange.status = code
        // Room for a small body too: it usually arrives in the same read.
        var bodyRoom = 0
        if case .contentLength(let length) = head.framing, length <= Self.coalescedBodyLimit { bodyRoom = length }
        let needed = head.bytes.readableBytes + 96 + bodyRoom
        if responseHeadBuffer.capacity >= needed {
            responseHeadBuffer.clear()
        } else {
            responseHeadBuffer = allocator.buffer(capacity: needed)
        }
        // A prepared set's lines as written (rate-limiting's), after the
        // added ones: copied in one go.
        let pluginWireBytes = pluginChanges?.wireLines.count ?? 0
        let tailBytes = pluginWireBytes + (date.map { 8 + $0.utf8.count } ?? 0) + (framingLine?.utf8CodeUnitCount ?? 0)
            + (connectionLine?.utf8CodeUnitCount ?? 0) + 5 + viaValueBytes + viaEntry.utf8CodeUnitCount + 2
        HTTP1HeadWriter.writeResponse(head, removed: removed, added: added, status: pluginChanges?.status,
                                      tailBytes: tailBytes, into: &responseHeadBuffer) { w, src in
            if pluginWireBytes > 0 {
                pluginChanges!.wireLines.withUnsafeBytes { w.copy($0.baseAddress!, $0.count) }
            }
            if let date { w.copy("date: "); w.copy(date); w.copy("\r\n") }
            if let framingLine { w.copy(framingLine) }
            if let connectionLine { w.copy(connectionLine) }
            w.copy("via: ")
            if viaValueBytes > 0 {
                for (i, e) in fields.entries.enumerated() where upstreamVias.contains(i) {
                    w.copy(src + Int(e.valueStart), Int(e.valueLength))
                    w.copy(", ")
                }
                for value in pluginVias { w.copy(value); w.copy(", ") }
            }
            w.copy(viaEntry)
            w.copy("\r\n")
        }
        responseHeadPending = true
        if addedFiltered {
            added.removeAll(keepingCapacity: true)
            swap(&added, &responseAddedFields)
        }
        if isUpgrade {
            exchange.upgraded = true
        }
    }

    // MARK: - HTTP/1.1 framing: output

    /// Bodies up to this size are copied behind their head (one write).
    private static let coalescedBodyLimit = 16 * 1024

    /// Writes a head `relayWireResponseHead` held back, if any.
    private func writePendingResponseHead() {
        if responseHeadPending { writeResponseHeadBuffer() }
    }

    private func writeResponseHeadBuffer() {
        responseHeadPending = false
        io.write(responseHeadBuffer, context: context, promise: nil)
        if responseHeadBuffer.capacity > Self.keptResponseBufferCapacity { responseHeadBuffer = ByteBuffer() }
    }

    /// Response body bytes, chunk-framed when the response is re-chunked.
    func writeResponseBody(_ data: ByteBuffer, exchange: Exchange) {
        let length = data.readableBytes
        guard length > 0 else { return }
        if responseHeadPending {
            if !exchange.responseChunked && length <= Self.coalescedBodyLimit {
                responseHeadBuffer.writeReadableBytes(of: data)
                writeResponseHeadBuffer()
                return
            }
            writeResponseHeadBuffer()
        }
        guard exchange.responseChunked else {
            io.write(data, context: context, promise: nil)
            return
        }
        if length <= 4096 {
            // Small chunks: one buffer (a write costs more than the copy).
            var out = allocator.buffer(capacity: length + 24)
            HTTP1ChunkedEncoder.writeChunk(data, into: &out)
            io.write(out, context: context, promise: nil)
        } else {
            var header = allocator.buffer(capacity: 24)
            HTTP1ChunkedEncoder.writeChunkHeader(length: length, into: &header)
            io.write(header, context: context, promise: nil)
            io.write(data, context: context, promise: nil)
            var crlf = allocator.buffer(capacity: 2)
            HTTP1ChunkedEncoder.writeChunkEnd(into: &crlf)
            io.write(crlf, context: context, promise: nil)
        }
    }

    /// The end of a response: the last chunk (with trailers) when chunked.
    /// `promise` completes when it is written (to close after it).
    func writeResponseEnd(_ trailers: HTTP1Fields?, exchange: Exchange, promise: EventLoopPromise<Void>?) {
        writePendingResponseHead()
        if exchange.responseChunked {
            var out = allocator.buffer(capacity: 5)
            out.writeStaticString("0\r\n")
            if let trailers { HeadSerialization.writeTrailers(trailers, into: &out) }
            out.writeStaticString("\r\n")
            io.write(out, context: context, promise: promise)
        } else if let promise {
            io.write(allocator.buffer(capacity: 0), context: context, promise: promise)
        }
    }

    /// An informational head (100 Continue, 103 Early Hints), relayed as is.
    func relayInterimResponseHead(_ head: HTTP1ResponseHead, exchange: Exchange) {
        var out = allocator.buffer(capacity: head.bytes.readableBytes)
        HTTP1HeadWriter.writeResponse(head, edits: HTTP1HeadEdits(removed: head.fields.hopByHopFields()), into: &out)
        io.write(out, context: context, promise: nil)
        io.flush(context: context)
    }

    func writeLocalResponse(_ head: HTTPResponseHead, body: ByteBuffer?, exchange: Exchange, promise: EventLoopPromise<Void>?) {
        // Head and body in one buffer: one write.
        var out = allocator.buffer(capacity: 256 + (body?.readableBytes ?? 0))
        HeadSerialization.writeResponse(head, into: &out)
        if var body { out.writeBuffer(&body) }
        io.write(out, context: context, promise: promise)
        io.flush(context: context)
    }

    var eventLoop: EventLoop { context.eventLoop }
    var localAddress: SocketAddress? { context.channel.localAddress }
    var downstreamIsWritable: Bool { channelWritable }
    func closeDownstream() { context.close(promise: nil) }

    /// Writes a head held back for coalescing, then flushes.
    func flushDownstream() {
        writePendingResponseHead()
        io.flush(context: context)
    }

    // MARK: - After an exchange

    /// The upstream's parts go to the exchange logic (`relayUpstreamPart`).
    /// The end of a response usually finishes the exchange: when nothing
    /// else holds it then, it is kept for the connection's next request.
    func upstreamRead(_ part: UpstreamResponsePart, on connection: UpstreamConnection) {
        guard case .end = part else { return relayUpstreamPart(part, on: connection) }
        var ending = exchange
        relayUpstreamPart(part, on: connection)
        keepForReuse(&ending)
    }

    /// Keeps `candidate` as `spareExchange` when it finished, had no plugin
    /// scope, and `candidate` is its last reference: no timer, log phase,
    /// access record or async plugin work holds it, so none can see it
    /// reused (a plugin-less exchange is known only to this handler and the
    /// calls on its stack; the access record is a copy of its values).
    /// Cleared here, at once: the request head's bytes (a slice of the
    /// read buffer NIO wants back), the route and the upstream connection
    /// are released now, as a release of the exchange would have.
    private func keepForReuse(_ candidate: inout Exchange?) {
        guard let finished = candidate?.finished, finished, candidate?.plugins == nil,
              isKnownUniquelyReferenced(&candidate) else { return }
        candidate?.clearForReuse()
        swap(&candidate, &spareExchange)
    }

    func exchangeFinished(_ exchange: Exchange, afterWrite: EventLoopFuture<Void>?) {
        if closesAfter(exchange) {
            closing = true
            io.flush(context: context)
            if let afterWrite {
                let channel = context.channel
                afterWrite.whenComplete { _ in channel.close(promise: nil) }
            } else {
                context.close(promise: nil)
            }
            return
        }
        // Ready for the next request on this connection.
        io.flush(context: context)
        // The next request's upstream edits reuse this one's array storage.
        recycleUpstreamFields(of: exchange, into: &spareUpstreamFields)
        armConnectionTimer(header: false)
        // Pipelined requests already read are parsed now (re-entrant calls
        // from inside processInbound return: its loop carries on).
        processInbound()
        flushUpstreamIfNeeded()
        resumeReadingIfAllowed()
    }

    func exchangeAborted(_ exchange: Exchange) {
        closing = true
    }

    /// Whether the connection closes once this exchange's response is out.
    func closesAfter(_ exchange: Exchange) -> Bool {
        !exchange.keepAlive || draining || decoderFailed || decoderStopped || (inputClosed && inbound.readableBytes == 0)
    }

    // MARK: - WebSocket / Upgrade tunnel

    func switchToTunnel(_ exchange: Exchange, connection: UpstreamConnection) {
        exchange.finished = true
        exchangeTimer.set(nil)
        exchange.connection = nil
        let now = loopContext.clock.now
        record(exchange, now: now)
        exchange.plugins?.requestDone(at: now)
        self.exchange = nil
        endBalancerAttempt(exchange)
        connection.handler.delegate = nil
        let downstream = context.channel
        let upstream = connection.channel
        // Deferred: we are inside the upstream handler's read callback.
        context.eventLoop.execute {
            let (down, up) = TunnelHandler.makePair()
            // The tunnel keeps counting as an open connection until it closes,
            // so drain waits for it (and force-closes it at the timeout).
            let listener = self.listener
            let loopContext = self.loopContext
            loopContext.registerTunnel(downstream)
            down.onClose = {
                loopContext.unregisterTunnel(downstream)
                listener.connectionClosed()
                listener.observer?.connectionClosed(listener: listener.name)
            }
            do {
                let downOps = downstream.pipeline.syncOperations
                let upOps = upstream.pipeline.syncOperations
                try downOps.addHandler(down)
                try upOps.addHandler(up)
                // Bytes that arrived after the upgrade head on either side
                // (kept unparsed) go to the other side first.
                let fromClient = self.takeTunnelBytes()
                let fromUpstream = connection.handler.takeTunnelBytes()
                _ = downOps.removeHandler(self)
                _ = upOps.removeHandler(connection.handler)
                if let fromClient { upstream.writeAndFlush(fromClient, promise: nil) }
                if let fromUpstream { downstream.writeAndFlush(fromUpstream, promise: nil) }
                // The connection now belongs to the tunnel; it closes when either side does.
                connection.reusable = false
            } catch {
                loopContext.logger.warning("could not switch to a tunnel after 101", metadata: ["error": "\(error)"])
                if self.registered {
                    // Still in the pipeline: this handler does the accounting on close.
                    down.onClose = nil
                    loopContext.unregisterTunnel(downstream)
                }
                downstream.close(promise: nil)
                upstream.close(promise: nil)
            }
        }
    }

    private func takeTunnelBytes() -> ByteBuffer? {
        guard inbound.readableBytes > 0 else { return nil }
        let rest = inbound
        inbound = ByteBuffer()
        return rest
    }

    // MARK: - HTTP/2 (h2c with prior knowledge, or h2 chosen by ALPN)

    /// The client sent the HTTP/2 preface: the connection becomes an HTTP/2
    /// one (HTTP2DownstreamConnection takes over the accounting and the
    /// connection-phase scope) and this handler leaves the pipeline.
    private func switchToHTTP2() {
        closing = true
        connectionTimer.cancel()
        let bytes = inbound
        inbound = ByteBuffer()
        let plugins = connectionPlugins
        connectionPlugins = nil
        if registered {
            registered = false
            loopContext.unregister(self)
        }
        let channel = context.channel
        do {
            try HTTP2DownstreamConnection.configure(channel: channel, loopContext: loopContext, listener: listener,
                                                    peerAddress: peerAddress, clientIP: clientIP,
                                                    peerTrusted: peerTrusted, tls: tls, connectionPlugins: plugins)
        } catch {
            loopContext.logger.warning("could not switch to HTTP/2", metadata: ["error": "\(error)"])
            plugins?.close()
            listener.connectionClosed()
            listener.observer?.connectionClosed(listener: listener.name)
            channel.close(promise: nil)
            return
        }
        // The preface and whatever followed it go to the HTTP/2 handler.
        context.fireChannelRead(NIOAny(bytes))
        context.fireChannelReadComplete()
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        channel.read()
    }

    // MARK: - Drain

    /// Stop taking requests: idle connections close now, busy ones after
    /// their current response.
    func beginDrain() {
        draining = true
        if exchange == nil && !closing {
            closing = true
            context.close(promise: nil)
        }
    }

    func forceClose() {
        context.close(promise: nil)
    }
}
