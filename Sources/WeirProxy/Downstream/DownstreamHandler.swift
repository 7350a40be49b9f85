import Logging
import NIOCore
import NIOHTTP1
import WeirCore

/// The proxy for one downstream HTTP/1.1 connection, over raw bytes.
///
/// Two layers live here, kept apart so an HTTP/2 stream can later drive the
/// same exchange logic with its own framing (see docs/http1-codec.md):
/// - **HTTP/1.1 framing** (`MARK: - HTTP/1.1 framing`): one cumulation
///   buffer, `HTTP1RequestParser` for heads, content-length slices or
///   `HTTP1ChunkedDecoder` for bodies; responses written as bytes
///   (`HTTP1HeadWriter` for forwarded heads, chunk framing when re-chunked).
/// - **The exchange** (`beginRequest` → routing, plugins, upstream attempts,
///   retries, timeouts, response relay → `finishExchange`), which sees a
///   `RequestHead` and body slices and answers through the `writeResponse*`
///   functions.
///
/// One request at a time goes through: while a request is in flight the
/// client is read only to stream that request's body (and only as fast as
/// the upstream accepts it); pipelined requests wait unparsed in the
/// buffer until the response before them is done, so responses stay in order.
///
/// Pipeline: just this handler. The upstream side of each exchange is an
/// `UpstreamConnection` from the loop's pool, on this loop.
final class DownstreamHandler: ChannelDuplexHandler, RemovableChannelHandler, UpstreamConnectionDelegate {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let loopContext: LoopContext
    let listener: ListenerRuntime
    var context: ChannelHandlerContext!
    /// The channel's allocator, looked up once (not per write through the
    /// `Channel` existential).
    private(set) var allocator = ByteBufferAllocator()
    /// A forwarded response head not written yet: the first body bytes join
    /// it in one buffer (one write instead of two for a small response).
    private var pendingResponseHead: ByteBuffer?
    var peerAddress: SocketAddress?
    var clientIP = ""
    private var peerTrusted = false

    /// The request in flight, if any.
    var exchange: Exchange?
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
    private var exchangeTimer = LazyTimer()
    private var sawHeadBytes = false
    private var closing = false
    private var draining = false
    private var registered = false
    /// The parser saw an error; nothing more will be parsed.
    private var decoderFailed = false
    /// After an Upgrade request no further head is parsed, so the connection
    /// cannot carry another HTTP request unless it becomes a tunnel (bytes
    /// that arrive meanwhile are kept for the tunnel).
    private var decoderStopped = false
    /// The client shut down its write side: no more requests will come.
    private var inputClosed = false
    /// The connection-phase plugin scope (see DownstreamHandler+Plugins).
    var connectionPlugins: ConnectionPlugins?
    /// The TLS session of an https connection (set before this handler is
    /// added; see TLS/ListenerTLS.swift); nil on plain connections.
    var tls: TLSConnectionInfo?

    init(loopContext: LoopContext, listener: ListenerRuntime) {
        self.loopContext = loopContext
        self.listener = listener
        self.limits = HTTP1Limits(listener.config.limits)
        self.parser = HTTP1RequestParser(limits: limits)
    }

    // MARK: - Channel lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        allocator = context.channel.allocator
        connectionTimer.setUp(loop: context.eventLoop) { [weak self] in self?.connectionTimerFired() }
        exchangeTimer.setUp(loop: context.eventLoop) { [weak self] in self?.exchangeTimerFired() }
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
        clientIP = peerAddress?.ipAddress ?? ""
        if !clientIP.isEmpty {
            peerTrusted = loopContext.runtime.trustedProxies.contains { $0.contains(clientIP) }
        }
        loopContext.register(self)
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
        if registered {
            registered = false
            loopContext.unregister(self)
            listener.connectionClosed()
            listener.observer?.connectionClosed(listener: listener.name)
        }
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        connectionTimer.cancel()
        exchangeTimer.cancel()
        connectionPlugins?.close()   // a tunnel runs no more plugins
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
            context.read()
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
            context.read()
        }
    }

    // MARK: - HTTP/1.1 framing: input

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if closing || decoderFailed { return }
        let buffer = unwrapInboundIn(data)
        if inbound.readableBytes == 0 {
            inbound = buffer   // the usual case: nothing left over, no copy
        } else {
            var buffer = buffer
            inbound.writeBuffer(&buffer)
        }
        processInbound()
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
                headBytesArrived()
                let head: HTTP1RequestHead
                do {
                    guard let parsed = try parser.parse(&inbound) else { return }
                    head = parsed
                } catch {
                    return rejectMalformed(error)
                }
                beginRequest(head)
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
        for (i, e) in fields.entries.enumerated() where e.known == .other {
            headers.add(name: fields.name(at: i), value: fields.value(at: i))
        }
        return headers
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushUpstreamIfNeeded()
        context.fireChannelReadComplete()
    }

    private func flushUpstreamIfNeeded() {
        if let exchange, exchange.upstreamNeedsFlush, let connection = exchange.connection {
            exchange.upstreamNeedsFlush = false
            connection.flush()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, let connection = exchange?.connection {
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
        let kind: ProxyErrorKind
        switch parseError.requestStatus {
        case 414: kind = .uriTooLong
        case 431: kind = .headersTooLarge
        case 501: kind = .notImplemented
        case 505: kind = .versionNotSupported
        default: kind = .badRequest
        }
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
        connectionTimer.set(.now() + .nanoseconds(span.nanoseconds))
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

    private func makeExchange(head: RequestHead?) -> Exchange {
        let exchange = Exchange(id: loopContext.requestIDs.next(), head: head)
        if listener.observer != nil { exchange.wallStart = wallClockSeconds() }
        return exchange
    }

    /// A parsed HTTP/1.1 head: sets up how its body is read, then hands the
    /// request to the exchange logic.
    private func beginRequest(_ wire: HTTP1RequestHead) {
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
        framing.teTrailers = wire.facts.teTrailersOnly && wire.fields.entries.contains { $0.known == .te }
        let head = RequestHead(wire)
        let exchange = makeExchange(head: head)
        self.exchange = exchange
        exchange.keepAlive = wire.keepAlive && !draining
        exchange.framing = framing
        exchange.isUpgrade = wire.wantsUpgrade
        if exchange.isUpgrade { decoderStopped = true; exchange.keepAlive = false }
        if !framing.hasBody {
            exchange.bodyless = true
            // No body to wait for: the request is complete with its head.
            requestEnd(nil, exchange: exchange)
            guard self.exchange === exchange, !exchange.finished else { return }
        }
        routeRequest(exchange, head: head)
    }

    /// The exchange starts here: a complete head (any wire protocol), its
    /// body still to come through `requestBody` / `requestEnd`.
    private func routeRequest(_ exchange: Exchange, head: RequestHead) {
        if head.method == .CONNECT {
            // A reverse proxy does not open tunnels to arbitrary authorities.
            exchange.keepAlive = false
            return rejectHead(exchange, .notImplemented, "CONNECT is not supported: Weir is a reverse proxy")
        }
        // Request target: origin-form (`/path?q`), absolute-form
        // (`http://host/path`, whose authority replaces Host), or `*`
        // (OPTIONS only: routed as `/`, forwarded as `*`).
        var target = Substring(head.uri)
        var hostHeader = head.host
        let asterisk = target == "*"
        if asterisk {
            target = "/"
        } else if target.utf8.first != UInt8(ascii: "/") {
            let lower = target.prefix(8).lowercased()
            let schemeLength = lower.hasPrefix("http://") ? 7 : lower.hasPrefix("https://") ? 8 : 0
            guard schemeLength > 0 else {
                return rejectHead(exchange, .badRequest, "unsupported request target")
            }
            let rest = target.dropFirst(schemeLength)
            let slash = rest.firstIndex { $0 == "/" || $0 == "?" } ?? rest.endIndex
            hostHeader = String(rest[..<slash])
            target = rest[slash...]
            if target.isEmpty || target.first == "?" { target = "/" + target }
        }
        let rawPath: Substring
        let query: Substring
        if let q = target.firstIndex(of: "?") {
            rawPath = target[..<q]
            query = target[q...]
        } else {
            rawPath = target
            query = ""
        }
        // Route on the normalized path and forward that same path, so the
        // upstream serves exactly what was routed (no `/public/../admin`).
        guard let path = RequestPath.normalize(String(rawPath)) else {
            return rejectHead(exchange, .badRequest, "malformed request path")
        }
        exchange.hostHeader = hostHeader
        // The route table ignores a port and compares case-insensitively.
        let host = hostHeader ?? ""
        guard var routed = loopContext.routing.route(method: head.method, host: host, path: path, query: query, headers: head.headers) else {
            return rejectHead(exchange, .noRoute, "no route matches \(head.method.rawValue) \(path)")
        }
        if asterisk {
            routed = RoutedRequest(route: routed.route, upstream: routed.upstream, forwardURI: "*", routing: routed.routing)
        }
        exchange.routed = routed

        // Body limit (route overrides listener).
        let maxBody = routed.route.maxBodyBytes ?? listener.config.limits.maxBodyBytes
        exchange.maxBody = maxBody
        if let maxBody, let length = exchange.framing.contentLength, length > maxBody {
            exchange.keepAlive = false
            return rejectHead(exchange, .bodyTooLarge, "request body of \(length) bytes exceeds the limit of \(maxBody)")
        }
        if draining {
            exchange.keepAlive = false
        }
        if let plugins = loopContext.plugins, let chain = plugins.chain(forRoute: routed.route.name) {
            return startRequestPlugins(exchange, plugins: plugins, chain: chain, path: path, query: query)
        }
        startAttempt(exchange, excluding: nil)
    }

    /// A request refused before anything reached an upstream.
    private func rejectHead(_ exchange: Exchange, _ kind: ProxyErrorKind, _ message: String) {
        exchange.discardingBody = true
        let clientError: Bool
        switch kind {
        case .badRequest, .headersTooLarge, .uriTooLong, .bodyTooLarge, .notImplemented, .versionNotSupported: clientError = true
        default: clientError = false
        }
        sendLocalResponse(exchange, kind: kind, message: message, close: !exchange.keepAlive || clientError)
    }

    // MARK: - Upstream attempts

    /// Picks a target and gets a connection for the next attempt.
    func startAttempt(_ exchange: Exchange, excluding: Int?) {
        guard let routed = exchange.routed, let head = exchange.head else { return }
        let upstream = routed.upstream
        guard let target = exchange.pinnedTarget(excluding: excluding)
                ?? routed.routing.pickTarget(upstream: upstream, headers: head.headers, clientIP: clientIP, excluding: excluding) else {
            return failBeforeResponse(exchange, .noHealthyTarget, "no healthy target in upstream \(upstream.name)")
        }
        exchange.attempts += 1
        exchange.target = target
        exchange.staleRetried = false
        if exchange.upstreamStart == nil { exchange.upstreamStart = .now() }
        if exchange.upstreamHead != nil {
            // Materialised for plugins (see startRequestPlugins).
            if !routed.route.preserveHost {
                exchange.upstreamHead!.headers.replaceOrAdd(name: "host", value: upstream.targetLabels[target])
            }
        } else if exchange.upstreamEdits == nil {
            exchange.upstreamEdits = upstreamEdits(exchange, head: head, routed: routed)
        } else if !routed.route.preserveHost {
            exchange.upstreamEdits!.added[0].value = upstream.targetLabels[target]
        }
        let pool = routed.routing.pools[upstream.index][target]
        routed.routing.balancerStarted(upstream: upstream, target: target)
        exchange.balancerActive = true
        if let connection = pool.takeIdle(now: .now()) {
            useConnection(connection, for: exchange)
        } else {
            connectFresh(exchange, pool: pool)
        }
    }

    private func connectFresh(_ exchange: Exchange, pool: TargetPool) {
        pool.connect().whenComplete { [weak self] result in
            guard let self else {
                if case .success(let c) = result { c.close() }
                return
            }
            guard self.exchange === exchange, !exchange.finished else {
                // The request ended (client gone, timeout) while we connected: keep the connection.
                if case .success(let c) = result { pool.release(c, now: .now()) }
                return
            }
            switch result {
            case .success(let connection):
                self.useConnection(connection, for: exchange)
            case .failure(let error):
                self.connectFailed(exchange, error: error)
            }
        }
    }

    private func connectFailed(_ exchange: Exchange, error: Error) {
        guard let routed = exchange.routed, let target = exchange.target else { return }
        endBalancerAttempt(exchange)
        routed.upstream.health.recordFailure(target: target)
        let isTimeout = (error as? ChannelError).map { if case .connectTimeout = $0 { return true } else { return false } } ?? false
        let tlsError = error as? UpstreamTLSError
        if let tlsError {
            // Wrong CA, wrong name, refused client certificate: a setup problem worth a warning.
            loopContext.logger.warning("upstream TLS handshake failed", metadata: [
                "request_id": "\(exchange.id)", "upstream": "\(routed.upstream.name)", "error": "\(tlsError)"])
        }
        // Nothing was sent: a connect failure is always safe to retry.
        if exchange.attempts <= exchange.retries(routed) {
            return startAttempt(exchange, excluding: target)
        }
        if let tlsError {
            failBeforeResponse(exchange, .connectFailed, "\(tlsError)")
        } else if isTimeout {
            failBeforeResponse(exchange, .upstreamTimeout, "connecting to \(routed.upstream.targetLabels[target]) timed out")
        } else {
            failBeforeResponse(exchange, .connectFailed, "could not connect to upstream \(routed.upstream.name) (\(routed.upstream.targetLabels[target]))")
        }
    }

    private func upstreamHostHeader(_ exchange: Exchange, routed: RoutedRequest) -> String {
        if routed.route.preserveHost, let clientHost = exchange.hostHeader { return clientHost }
        return routed.upstream.targetLabels[exchange.target ?? 0]
    }

    /// The upstream head as a NIO value, for plugins to edit (the plugin path).
    func buildUpstreamHead(_ exchange: Exchange, head: RequestHead, routed: RoutedRequest) -> HTTPRequestHead {
        let upgrade = exchange.isUpgrade ? head.headers.first(named: "upgrade") : nil
        return HeaderRewriting.upstreamRequestHead(
            from: head.materialized(), forwardURI: routed.forwardURI, framing: exchange.framing, upgrade: upgrade,
            hostHeader: upstreamHostHeader(exchange, routed: routed), clientHost: exchange.hostHeader,
            clientIP: clientIP, peerTrusted: peerTrusted, scheme: listener.scheme, requestID: exchange.id)
    }

    /// The upstream head as edits to the client's head (the fast path: kept
    /// field lines are copied as bytes). Same rules as
    /// `HeaderRewriting.upstreamRequestHead`: hop-by-hop fields go (and what
    /// Connection names), Host/X-Request-ID are replaced, X-Forwarded-* are
    /// replaced (extended for a trusted peer), Via is extended.
    /// `added[0]` is always Host (a retry on another target replaces it).
    private func upstreamEdits(_ exchange: Exchange, head: RequestHead, routed: RoutedRequest) -> HTTP1HeadEdits {
        let fields = head.headers
        var edits = HTTP1HeadEdits(removed: fields.hopByHopFields(keepUpgrade: exchange.isUpgrade), target: routed.forwardURI)
        var forwardedFor: String? = nil
        var forwardedProto: String? = nil
        var forwardedHost: String? = nil
        var via: String? = nil
        for (i, e) in fields.entries.enumerated() {
            switch e.known {
            case .host, .xRequestID:
                edits.removed.insert(i)
            case .xForwardedFor:
                edits.removed.insert(i)
                if peerTrusted { let v = fields.value(at: i); forwardedFor = forwardedFor.map { $0 + ", " + v } ?? v }
            case .xForwardedProto:
                edits.removed.insert(i)
                if peerTrusted && forwardedProto == nil { forwardedProto = fields.value(at: i) }
            case .xForwardedHost:
                edits.removed.insert(i)
                if peerTrusted && forwardedHost == nil { forwardedHost = fields.value(at: i) }
            case .via:
                edits.removed.insert(i)
                let v = fields.value(at: i)
                via = via.map { $0 + ", " + v } ?? v
            default:
                break
            }
        }
        edits.added.reserveCapacity(8)
        edits.added.append((name: "host", value: upstreamHostHeader(exchange, routed: routed)))
        if exchange.framing.chunked { edits.added.append((name: "transfer-encoding", value: "chunked")) }
        if exchange.isUpgrade { edits.added.append((name: "connection", value: "upgrade")) }
        edits.added.append((name: "x-forwarded-for", value: forwardedFor.map { $0 + ", " + clientIP } ?? clientIP))
        edits.added.append((name: "x-forwarded-proto", value: forwardedProto ?? listener.scheme))
        if let host = forwardedHost ?? exchange.hostHeader {
            edits.added.append((name: "x-forwarded-host", value: host))
        }
        let viaEntry = head.isHTTP10 ? "1.0 weir" : "1.1 weir"
        edits.added.append((name: "via", value: via.map { $0 + ", " + viaEntry } ?? viaEntry))
        edits.added.append((name: "x-request-id", value: exchange.id))
        return edits
    }

    /// The upstream request head as bytes, whether it chunks its body, and
    /// the method the response answers (HEAD responses have no body).
    private func serializeUpstreamHead(_ exchange: Exchange) -> (ByteBuffer, chunked: Bool, method: HTTP1Method) {
        if let head = exchange.upstreamHead {
            var out = allocator.buffer(capacity: 512)
            HeadSerialization.writeRequest(head, into: &out)
            let method: HTTP1Method = head.method == .HEAD ? .head : head.method == .CONNECT ? .connect : .get
            return (out, head.headers.contains(name: "transfer-encoding"), method)
        }
        let wire = exchange.head!.wire!
        var out = allocator.buffer(capacity: wire.bytes.readableBytes + 256)
        HTTP1HeadWriter.writeRequest(wire, edits: exchange.upstreamEdits!, into: &out)
        return (out, exchange.framing.chunked, wire.method)
    }

    private func useConnection(_ connection: UpstreamConnection, for exchange: Exchange) {
        exchange.connection = connection
        exchange.connectionReused = connection.requestsSent > 0
        connection.requestsSent += 1
        connection.attach(self)
        let (head, chunked, method) = serializeUpstreamHead(exchange)
        connection.writeHead(head, method: method, chunkedBody: chunked)
        if let replacement = exchange.replacementBody {
            // The client's body is dropped; the replacement goes once the
            // client's request has ended (else requestEnd writes it).
            exchange.pendingUpstream.removeAll()
            if exchange.requestEnded { writeReplacementBody(replacement, exchange: exchange, to: connection) }
        } else if !exchange.pendingUpstream.isEmpty {
            for part in exchange.pendingUpstream {
                switch part {
                case .body(.byteBuffer(let buffer)):
                    exchange.bodyForwarded = true
                    connection.writeBody(buffer)
                case .end(let trailers):
                    connection.writeEnd(trailers: trailers)
                default:
                    break
                }
            }
            exchange.pendingUpstream.removeAll()
        } else if exchange.requestEnded && exchange.bodyless {
            // A retry of a bodyless request: its end was consumed by the first attempt.
            connection.writeEnd(trailers: nil)
        }
        connection.flush()
        if exchange.requestEnded { requestFullySent(exchange) }
        armExchangeTimer(exchange)
        resumeReadingIfAllowed()
    }

    // MARK: - Request body

    private func requestBody(_ buffer: ByteBuffer, exchange: Exchange) {
        exchange.bytesIn += buffer.readableBytes
        if exchange.discardingBody { return }
        if let max = exchange.maxBody, exchange.bytesIn > max {
            exchange.keepAlive = false
            if !exchange.bodyForwarded && !exchange.responseStarted {
                exchange.connection?.close()
                exchange.connection = nil
                endBalancerAttempt(exchange)
                exchange.discardingBody = true
                sendLocalResponse(exchange, kind: .bodyTooLarge, message: "request body exceeds the limit of \(max) bytes", close: true)
            } else {
                abortExchange(exchange, reason: "request body exceeds the limit")
                context.close(promise: nil)
            }
            return
        }
        if let connection = exchange.connection {
            if exchange.replacementBody != nil { return }   // set_body: the client's body is dropped
            connection.writeBody(buffer)
            exchange.bodyForwarded = true
            exchange.upstreamNeedsFlush = true
        } else {
            exchange.pendingUpstream.append(.body(.byteBuffer(buffer)))
            exchange.plugins?.requestBodyArrived()
        }
    }

    private func requestEnd(_ trailers: HTTPHeaders?, exchange: Exchange) {
        exchange.requestEnded = true
        if exchange.discardingBody {
            if exchange.localResponseDone { finishExchange(exchange) }
            return
        }
        if let connection = exchange.connection {
            if let replacement = exchange.replacementBody {
                writeReplacementBody(replacement, exchange: exchange, to: connection)
            } else {
                connection.writeEnd(trailers: trailers)
            }
            exchange.upstreamNeedsFlush = true
            requestFullySent(exchange)
        } else {
            // With a set_body replacement these are kept too (plugins may
            // still read the body); useConnection drops them.
            // A bodyless request's end is written by useConnection without
            // queueing it (saves an array per request).
            guard !exchange.bodyless else { return }
            exchange.pendingUpstream.append(.end(trailers))
            exchange.plugins?.requestBodyArrived()
        }
    }

    private func writeReplacementBody(_ body: ByteBuffer, exchange: Exchange, to connection: UpstreamConnection) {
        if body.readableBytes > 0 {
            connection.writeBody(body)
            exchange.bodyForwarded = true
        }
        connection.writeEnd(trailers: nil)
    }

    private func requestFullySent(_ exchange: Exchange) {
        let now = NIODeadline.now()
        exchange.requestSentAt = now
        exchange.lastUpstreamRead = now
        armExchangeTimer(exchange)
    }

    // MARK: - UpstreamConnectionDelegate

    func upstreamRead(_ part: UpstreamResponsePart, on connection: UpstreamConnection) {
        guard let exchange, exchange.connection === connection else {
            connection.close()
            return
        }
        if let plugins = exchange.plugins, plugins.holdingResponse {
            plugins.heldParts.append(part)
            return
        }
        if exchange.requestSentAt != nil { exchange.lastUpstreamRead = .now() }
        switch part {
        case .head(let head):
            upstreamHead(head, exchange: exchange, connection: connection)
        case .body(let buffer):
            guard exchange.responseStarted else { return }
            if let plugins = exchange.plugins, plugins.filtersBody {
                return filterResponseBody(buffer, exchange: exchange, plugins: plugins, connection: connection)
            }
            exchange.bytesOut += buffer.readableBytes
            writeResponseBody(buffer, exchange: exchange)
            if !context.channel.isWritable {
                connection.handler.pauseReading()
            }
        case .end(let trailers):
            if let plugins = exchange.plugins, plugins.filtersBody, !plugins.lastChunkFiltered, exchange.responseStarted {
                return filterLastChunk(trailers, exchange: exchange, plugins: plugins, connection: connection)
            }
            upstreamEnd(trailers, exchange: exchange, connection: connection)
        }
    }

    private func upstreamHead(_ head: HTTP1ResponseHead, exchange: Exchange, connection: UpstreamConnection) {
        guard let routed = exchange.routed, let target = exchange.target else { return }
        let code = head.status
        if head.isInterim {
            // Informational (100 Continue, 103 Early Hints): relayed as is,
            // to HTTP/1.1 clients only (RFC 9110 §15.2).
            guard !exchange.head!.isHTTP10 else { return }
            var out = allocator.buffer(capacity: head.bytes.readableBytes)
            HTTP1HeadWriter.writeResponse(head, edits: HTTP1HeadEdits(removed: head.fields.hopByHopFields()), into: &out)
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            return
        }
        if code >= 500 { routed.upstream.health.recordFailure(target: target) } else { routed.upstream.health.recordSuccess(target: target) }

        // Retry idempotent bodyless requests on 502/503/504.
        if (502...504).contains(code), exchange.bodyless, exchange.requestEnded,
           Self.isIdempotent(exchange.head!.method), exchange.attempts <= exchange.retries(routed) {
            exchange.connection = nil
            connection.close()
            endBalancerAttempt(exchange)
            return startAttempt(exchange, excluding: target)
        }
        exchange.upstreamKeepAlive = head.keepAlive
        guard checkUpgradeResponse(code, exchange: exchange, connection: connection) else { return }

        if let plugins = exchange.plugins, code != 101 {
            guard let head = runResponsePlugins(Self.materialized(head), exchange: exchange, plugins: plugins, connection: connection) else { return }
            return relayResponseHead(head, exchange: exchange, connection: connection)
        }
        relayWireResponseHead(head, exchange: exchange)
    }

    /// The head as NIO's value type, for the response phase to edit.
    private static func materialized(_ head: HTTP1ResponseHead) -> HTTPResponseHead {
        var headers = HTTPHeaders()
        headers.reserveCapacity(head.fields.count + 4)
        for i in 0..<head.fields.count { headers.add(name: head.fields.name(at: i), value: head.fields.value(at: i)) }
        return HTTPResponseHead(version: head.version.minor == 0 ? .http1_0 : .http1_1,
                                status: HTTPResponseStatus(statusCode: head.status, reasonPhrase: head.reason),
                                headers: headers)
    }

    /// A 101 only answers an upgrade request; a refused upgrade ends the
    /// connection after its response. False when the exchange failed.
    private func checkUpgradeResponse(_ code: Int, exchange: Exchange, connection: UpstreamConnection) -> Bool {
        let isUpgrade = code == 101
        if isUpgrade && !exchange.isUpgrade {
            exchange.connection = nil
            connection.close()
            failBeforeResponse(exchange, .badUpstreamResponse, "upstream switched protocols without an upgrade request")
            return false
        }
        if exchange.isUpgrade && !isUpgrade { exchange.keepAlive = false }
        return true
    }

    /// Whether the client gets a body for this status (never for HEAD, 204, 304).
    private func bodyAllowed(_ exchange: Exchange, status: Int) -> Bool {
        exchange.head!.method != .HEAD && status != 204 && status != 304
    }

    /// The fast path: the upstream's head forwarded by range copy with the
    /// same edits `HeaderRewriting.downstreamResponseHead` makes.
    private func relayWireResponseHead(_ head: HTTP1ResponseHead, exchange: Exchange) {
        let code = head.status
        let isUpgrade = code == 101
        let fields = head.fields
        let clientIs11 = !exchange.head!.isHTTP10
        var edits = HTTP1HeadEdits(removed: fields.hopByHopFields(keepUpgrade: isUpgrade))
        edits.added.reserveCapacity(3)
        var via: String? = nil
        for (i, e) in fields.entries.enumerated() {
            switch e.known {
            case .te:
                edits.removed.insert(i)
            case .via:
                edits.removed.insert(i)
                let v = fields.value(at: i)
                via = via.map { $0 + ", " + v } ?? v
            default:
                break
            }
        }
        var mustClose = !(exchange.keepAlive && !draining)
        var hasLength = false
        if case .contentLength = head.framing { hasLength = true }
        if isUpgrade {
            edits.added.append((name: "connection", value: "upgrade"))
        } else if bodyAllowed(exchange, status: code) && !hasLength {
            if clientIs11 {
                edits.added.append((name: "transfer-encoding", value: "chunked"))
                exchange.responseChunked = true
            } else {
                // HTTP/1.0 client and no length: the body ends at close.
                mustClose = true
            }
        }
        if !isUpgrade {
            if mustClose {
                edits.added.append((name: "connection", value: "close"))
            } else if !clientIs11 {
                edits.added.append((name: "connection", value: "keep-alive"))
            }
        }
        let viaEntry = head.version.minor == 0 ? "1.0 weir" : "1.1 weir"
        edits.added.append((name: "via", value: via.map { $0 + ", " + viaEntry } ?? viaEntry))
        if mustClose { exchange.keepAlive = false }
        exchange.responseStarted = true
        exchange.status = code
        // Room for a small body too: it usually arrives in the same read.
        var bodyRoom = 0
        if case .contentLength(let length) = head.framing, length <= Self.coalescedBodyLimit { bodyRoom = length }
        var out = allocator.buffer(capacity: head.bytes.readableBytes + 96 + bodyRoom)
        HTTP1HeadWriter.writeResponse(head, edits: edits, into: &out)
        pendingResponseHead = out
        if isUpgrade {
            exchange.upgraded = true
        }
    }

    /// The plugin path: a head the response phase may have changed.
    func relayResponseHead(_ head: HTTPResponseHead, exchange: Exchange, connection: UpstreamConnection) {
        let code = Int(head.status.code)
        let isUpgrade = code == 101
        let requestHead = exchange.head!
        let (downHead, mustClose) = HeaderRewriting.downstreamResponseHead(
            head, requestVersion: requestHead.version, bodyAllowed: bodyAllowed(exchange, status: code),
            keepAlive: exchange.keepAlive && !draining, isUpgrade: isUpgrade)
        if mustClose { exchange.keepAlive = false }
        exchange.responseChunked = !isUpgrade && downHead.headers.contains(name: "transfer-encoding")
        exchange.responseStarted = true
        exchange.status = code
        var out = allocator.buffer(capacity: 512)
        HeadSerialization.writeResponse(downHead, into: &out)
        context.write(wrapOutboundOut(out), promise: nil)
        if isUpgrade {
            exchange.upgraded = true
        }
    }

    private func upstreamEnd(_ trailers: HTTP1Fields?, exchange: Exchange, connection: UpstreamConnection) {
        guard exchange.responseStarted else { return }
        if exchange.upgraded {
            writePendingResponseHead()
            context.flush()
            switchToTunnel(exchange, connection: connection)
            return
        }
        exchange.upstreamResponseEnded = true
        if !exchange.requestEnded {
            // The upstream answered before the whole request arrived: that
            // connection is out of step, and so is this one.
            exchange.connection = nil
            connection.close()
            exchange.keepAlive = false
        }
        let willClose = closesAfter(exchange)
        let endWritten: EventLoopPromise<Void>? = willClose ? context.eventLoop.makePromise() : nil
        writeResponseEnd(trailers, exchange: exchange, promise: endWritten)
        completeAfterBoth(exchange, endWritten: endWritten?.futureResult)
    }

    // MARK: - HTTP/1.1 framing: output

    /// Bodies up to this size are copied behind their head (one write).
    private static let coalescedBodyLimit = 16 * 1024

    /// Writes a head `relayWireResponseHead` held back, if any.
    private func writePendingResponseHead() {
        if let head = pendingResponseHead {
            pendingResponseHead = nil
            context.write(wrapOutboundOut(head), promise: nil)
        }
    }

    /// Response body bytes, chunk-framed when the response is re-chunked.
    func writeResponseBody(_ data: ByteBuffer, exchange: Exchange) {
        let length = data.readableBytes
        guard length > 0 else { return }
        if var head = pendingResponseHead {
            pendingResponseHead = nil
            if !exchange.responseChunked && length <= Self.coalescedBodyLimit {
                head.writeImmutableBuffer(data)
                context.write(wrapOutboundOut(head), promise: nil)
                return
            }
            context.write(wrapOutboundOut(head), promise: nil)
        }
        guard exchange.responseChunked else {
            context.write(wrapOutboundOut(data), promise: nil)
            return
        }
        if length <= 4096 {
            // Small chunks: one buffer (a write costs more than the copy).
            var out = allocator.buffer(capacity: length + 24)
            HTTP1ChunkedEncoder.writeChunk(data, into: &out)
            context.write(wrapOutboundOut(out), promise: nil)
        } else {
            var header = allocator.buffer(capacity: 24)
            HTTP1ChunkedEncoder.writeChunkHeader(length: length, into: &header)
            context.write(wrapOutboundOut(header), promise: nil)
            context.write(wrapOutboundOut(data), promise: nil)
            var crlf = allocator.buffer(capacity: 2)
            HTTP1ChunkedEncoder.writeChunkEnd(into: &crlf)
            context.write(wrapOutboundOut(crlf), promise: nil)
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
            context.write(wrapOutboundOut(out), promise: promise)
        } else if let promise {
            context.write(wrapOutboundOut(allocator.buffer(capacity: 0)), promise: promise)
        }
    }

    func upstreamReadComplete(on connection: UpstreamConnection) {
        if exchange?.connection === connection || exchange?.upgraded == true {
            writePendingResponseHead()
            context.flush()
        }
    }

    func upstreamWritabilityChanged(on connection: UpstreamConnection) {
        guard let exchange, exchange.connection === connection else { return }
        if connection.channel.isWritable {
            exchange.writeBlockedSince = nil
            resumeReadingIfAllowed()
        } else {
            exchange.writeBlockedSince = .now()
            armExchangeTimer(exchange)
        }
    }

    func upstreamClosed(_ connection: UpstreamConnection, error: Error?) {
        guard let exchange, exchange.connection === connection else { return }
        exchange.connection = nil
        guard let routed = exchange.routed, let target = exchange.target else { return }
        endBalancerAttempt(exchange)
        if exchange.responseStarted {
            // Mid-response: nothing can be repaired; the client sees the cut.
            abortExchange(exchange, reason: "upstream closed mid-response")
            context.close(promise: nil)
            return
        }
        // A reused keep-alive connection the upstream had already closed (its
        // close crossed our request): an idempotent bodyless request is resent
        // once on a fresh connection to the same target, not counted as a
        // retry (what Go's transport does; anything else could run twice).
        let idempotent = Self.isIdempotent(exchange.head!.method)
        if exchange.connectionReused && !exchange.staleRetried && exchange.bodyless && idempotent {
            exchange.staleRetried = true
            let pool = routed.routing.pools[routed.upstream.index][target]
            routed.routing.balancerStarted(upstream: routed.upstream, target: target)
            exchange.balancerActive = true
            connectFresh(exchange, pool: pool)
            return
        }
        routed.upstream.health.recordFailure(target: target)
        if exchange.bodyless && idempotent && exchange.attempts <= exchange.retries(routed) {
            return startAttempt(exchange, excluding: target)
        }
        failBeforeResponse(exchange, .badUpstreamResponse, "upstream \(routed.upstream.name) (\(routed.upstream.targetLabels[target])) closed the connection without a response")
    }

    private static func isIdempotent(_ method: HTTPMethod) -> Bool {
        switch method {
        case .GET, .HEAD, .OPTIONS, .PUT, .DELETE, .TRACE: return true
        default: return false
        }
    }

    // MARK: - Exchange timeouts (read, write, whole request)

    private func armExchangeTimer(_ exchange: Exchange) {
        guard let routed = exchange.routed else { return }
        let timeouts = exchange.timeouts(routed)
        var next: NIODeadline? = nil
        if let sent = exchange.requestSentAt {
            next = max(sent, exchange.lastUpstreamRead) + .nanoseconds(timeouts.read.nanoseconds)
        }
        if let blocked = exchange.writeBlockedSince {
            let d = blocked + .nanoseconds(timeouts.write.nanoseconds)
            next = next.map { min($0, d) } ?? d
        }
        if let whole = timeouts.request, let start = exchange.upstreamStart {
            let d = start + .nanoseconds(whole.nanoseconds)
            next = next.map { min($0, d) } ?? d
        }
        guard let next else { return }
        exchangeTimer.set(next)
    }

    private func exchangeTimerFired() {
        exchangeTimer.taskFired()
        guard let exchange, !exchange.finished, !exchange.upgraded, let routed = exchange.routed else { return }
        let now = NIODeadline.now()
        let timeouts = exchange.timeouts(routed)
        var expired: String? = nil
        if let sent = exchange.requestSentAt, !exchange.upstreamResponseEnded,
           now >= max(sent, exchange.lastUpstreamRead) + .nanoseconds(timeouts.read.nanoseconds) {
            expired = "reading the upstream response timed out after \(timeouts.read)"
        } else if let blocked = exchange.writeBlockedSince, now >= blocked + .nanoseconds(timeouts.write.nanoseconds) {
            expired = "writing the request upstream timed out after \(timeouts.write)"
        } else if let whole = timeouts.request, let start = exchange.upstreamStart, now >= start + .nanoseconds(whole.nanoseconds) {
            expired = "the upstream exchange exceeded \(whole)"
        }
        guard let expired else {
            // Deadlines moved later since the timer was armed.
            armExchangeTimer(exchange)
            return
        }
        exchangeTimer.set(nil)
        if let connection = exchange.connection {
            exchange.connection = nil
            connection.close()
        }
        endBalancerAttempt(exchange)
        if let target = exchange.target { routed.upstream.health.recordFailure(target: target) }
        if exchange.responseStarted {
            abortExchange(exchange, reason: expired)
            context.close(promise: nil)
        } else {
            exchange.keepAlive = exchange.keepAlive && exchange.requestEnded
            failBeforeResponse(exchange, .upstreamTimeout, expired)
        }
    }

    // MARK: - Finishing

    func endBalancerAttempt(_ exchange: Exchange) {
        if exchange.balancerActive, let routed = exchange.routed, let target = exchange.target {
            exchange.balancerActive = false
            routed.routing.balancerFinished(upstream: routed.upstream, target: target)
        }
    }

    /// The proxy answers itself because the upstream could not.
    func failBeforeResponse(_ exchange: Exchange, _ kind: ProxyErrorKind, _ message: String) {
        loopContext.logger.debug("proxy error", metadata: [
            "request_id": "\(exchange.id)", "error": "\(kind.code)", "message": "\(message)",
        ])
        if let connection = exchange.connection {
            exchange.connection = nil
            connection.close()
        }
        endBalancerAttempt(exchange)
        exchange.pendingUpstream.removeAll()
        exchange.discardingBody = true
        if !exchange.requestEnded && exchange.bodyForwarded { exchange.keepAlive = false }
        sendLocalResponse(exchange, kind: kind, message: message, close: !exchange.keepAlive)
    }

    private func sendLocalResponse(_ exchange: Exchange, kind: ProxyErrorKind, message: String, close closeRequested: Bool) {
        if closeRequested { exchange.keepAlive = false }
        if !exchange.requestEnded && exchange.framing.expectsContinue && exchange.framing.hasBody {
            // The client waited for a 100 it will not get; whether it now
            // sends the body or not is up to it, so the connection cannot be
            // reused safely.
            exchange.keepAlive = false
        }
        let close = closesAfter(exchange)
        var body: ByteBuffer
        let head: HTTPResponseHead
        if exchange.grpc != nil {
            // gRPC clients read grpc-status, not the HTTP status (GRPCSupport.swift).
            body = ByteBuffer()
            head = GRPCErrorResponse.head(kind: kind, message: message, requestID: exchange.id, close: close,
                                          date: loopContext.dateCache.current())
        } else {
            body = ProxyErrorResponse.body(kind: kind, message: message, requestID: exchange.id, allocator: allocator)
            head = ProxyErrorResponse.head(kind: kind, requestID: exchange.id, bodyLength: body.readableBytes,
                                           close: close, version: exchange.head?.version ?? .http1_1,
                                           date: loopContext.dateCache.current())
        }
        exchange.status = Int(head.status.code)
        exchange.responseStarted = true
        exchange.bytesOut += body.readableBytes
        exchange.localResponseDone = true
        // Head and body in one buffer: one write.
        var out = allocator.buffer(capacity: 256 + body.readableBytes)
        HeadSerialization.writeResponse(head, into: &out)
        if exchange.head?.method != .HEAD {
            out.writeBuffer(&body)
        }
        exchange.upstreamResponseEnded = true
        if close {
            // Closing: no need to read the rest of the request.
            exchange.requestEnded = true
        }
        let endPromise: EventLoopPromise<Void>? = close ? context.eventLoop.makePromise() : nil
        context.writeAndFlush(wrapOutboundOut(out), promise: endPromise)
        if exchange.requestEnded {
            finishExchange(exchange, afterWrite: endPromise?.futureResult)
        } else {
            // Keep reading (and dropping) the rest of the body, then carry on.
            resumeReadingIfAllowed()
        }
    }

    /// The response end was written (and the request fully received, or
    /// the connection is closing).
    private func completeAfterBoth(_ exchange: Exchange, endWritten: EventLoopFuture<Void>?) {
        if let connection = exchange.connection {
            exchange.connection = nil
            if exchange.upstreamKeepAlive && connection.reusable {
                connection.pool.release(connection, now: .now())
            } else {
                connection.close()
            }
        }
        finishExchange(exchange, afterWrite: endWritten)
    }

    /// Whether the connection closes once this exchange's response is out.
    func closesAfter(_ exchange: Exchange) -> Bool {
        !exchange.keepAlive || draining || decoderFailed || decoderStopped || (inputClosed && inbound.readableBytes == 0)
    }

    func finishExchange(_ exchange: Exchange, afterWrite: EventLoopFuture<Void>? = nil) {
        guard !exchange.finished else { return }
        exchange.finished = true
        exchangeTimer.set(nil)
        endBalancerAttempt(exchange)
        if let connection = exchange.connection {
            exchange.connection = nil
            connection.close()
        }
        record(exchange)
        exchange.plugins?.requestDone()
        self.exchange = nil
        if closesAfter(exchange) {
            closing = true
            context.flush()
            if let afterWrite {
                let channel = context.channel
                afterWrite.whenComplete { _ in channel.close(promise: nil) }
            } else {
                context.close(promise: nil)
            }
            return
        }
        // Ready for the next request on this connection.
        context.flush()
        armConnectionTimer(header: false)
        // Pipelined requests already read are parsed now (re-entrant calls
        // from inside processInbound return: its loop carries on).
        processInbound()
        flushUpstreamIfNeeded()
        resumeReadingIfAllowed()
    }

    /// The exchange cannot complete normally (client gone, upstream cut off).
    private func abortExchange(_ exchange: Exchange, reason: String) {
        guard !exchange.finished else { return }
        loopContext.logger.debug("exchange aborted", metadata: ["request_id": "\(exchange.id)", "reason": "\(reason)"])
        exchange.keepAlive = false
        if exchange.status == 0 { exchange.status = 499 }
        exchange.finished = true
        exchangeTimer.set(nil)
        endBalancerAttempt(exchange)
        if let connection = exchange.connection {
            exchange.connection = nil
            connection.close()
        }
        record(exchange)
        exchange.plugins?.requestDone()
        self.exchange = nil
        closing = true
    }

    private func record(_ exchange: Exchange) {
        guard let observer = listener.observer else { return }
        let now = NIODeadline.now()
        let head = exchange.head
        let path: String
        if let uri = head?.uri {
            path = uri.firstIndex(of: "?").map { String(uri[..<$0]) } ?? uri
        } else {
            path = ""
        }
        let upstreamDuration = exchange.upstreamStart.map { Double((now - $0).nanoseconds) / 1e9 }
        let target = exchange.target.flatMap { t in exchange.routed.map { $0.upstream.targetLabels[t] } }
        observer.requestCompleted(AccessRecord(
            startTime: exchange.wallStart, requestID: exchange.id, listener: listener.name,
            clientAddress: clientIP, method: head?.method.rawValue ?? "", path: path,
            route: exchange.routed?.route.name, upstream: exchange.routed?.upstream.name,
            upstreamTarget: target, status: exchange.status, bytesIn: exchange.bytesIn,
            bytesOut: exchange.bytesOut, totalDuration: Double((now - exchange.started).nanoseconds) / 1e9,
            upstreamDuration: upstreamDuration, attempts: exchange.attempts, tls: tls))
    }

    // MARK: - WebSocket / Upgrade tunnel

    private func switchToTunnel(_ exchange: Exchange, connection: UpstreamConnection) {
        exchange.finished = true
        exchangeTimer.set(nil)
        exchange.connection = nil
        record(exchange)
        exchange.plugins?.requestDone()
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

/// One request going through the proxy.
final class Exchange {
    let id: String
    let head: RequestHead?
    let started: NIODeadline = .now()
    var wallStart: Double = 0
    var routed: RoutedRequest?
    /// The request's plugin scope when its route has plugins.
    var plugins: ExchangePlugins?
    /// The client's Host (or the authority of an absolute-form target).
    var hostHeader: String?
    var framing = HeaderRewriting.RequestFraming()
    var maxBody: Int?
    var isUpgrade = false
    var upgraded = false
    var bodyless = false
    var keepAlive = true
    var upstreamKeepAlive = false

    /// The upstream head when plugins may edit it (materialised as NIO
    /// values); nil on the fast path, which uses `upstreamEdits`.
    var upstreamHead: HTTPRequestHead?
    /// The fast path's upstream head: the client's head plus these edits.
    var upstreamEdits: HTTP1HeadEdits?
    /// The client's response body is written chunk-framed.
    var responseChunked = false
    var target: Int?
    var attempts = 0
    var balancerActive = false
    var connection: UpstreamConnection?
    var connectionReused = false
    var staleRetried = false
    /// Parts received before the upstream connection was ready (at most one
    /// read's worth: the client is not read while connecting).
    var pendingUpstream: [HTTPClientRequestPart] = []
    var upstreamNeedsFlush = false
    /// Set by `weir.upstream.request.set_body`: forwarded instead of the
    /// client's body, which is then read and dropped.
    var replacementBody: ByteBuffer?

    var requestEnded = false
    var bodyForwarded = false
    var discardingBody = false
    var responseStarted = false
    var localResponseDone = false
    var upstreamResponseEnded = false
    var finished = false
    var status = 0
    var bytesIn = 0
    var bytesOut = 0

    var upstreamStart: NIODeadline?
    var requestSentAt: NIODeadline?
    var lastUpstreamRead: NIODeadline = .uptimeNanoseconds(0)
    var writeBlockedSince: NIODeadline?
    /// Set when the request is gRPC (read on first use: proxy errors and
    /// HTTP/2 upstreams' deadlines only).
    lazy var grpc: GRPCRequestInfo? = head.flatMap { GRPCRequestInfo(headers: $0.headers) }

    init(id: String, head: RequestHead?) {
        self.id = id
        self.head = head
    }
}
