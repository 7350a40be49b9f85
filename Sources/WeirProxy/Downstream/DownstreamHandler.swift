import Logging
import NIOCore
import NIOHTTP1
import WeirCore

/// The proxy for one downstream HTTP/1.1 connection.
///
/// One request at a time goes through: while a request is in flight the
/// handler reads the client only to stream that request's body (and only as
/// fast as the upstream accepts it); pipelined requests wait, decoded parts
/// queued, until the response before them is done, so responses stay in order.
///
/// Pipeline: HeadGuard -> ByteToMessageHandler(HTTPRequestDecoder) ->
/// HTTPResponseEncoder -> DownstreamHandler. The upstream side of each
/// exchange is an `UpstreamConnection` from the loop's pool, on this loop.
final class DownstreamHandler: ChannelDuplexHandler, RemovableChannelHandler, UpstreamConnectionDelegate {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    let loopContext: LoopContext
    let listener: ListenerRuntime
    private let headGuard: HeadGuard
    var context: ChannelHandlerContext!
    var peerAddress: SocketAddress?
    var clientIP = ""
    private var peerTrusted = false

    /// The request in flight, if any.
    var exchange: Exchange?
    /// Decoded parts of pipelined requests waiting for their turn.
    private var queued = CircularBuffer<HTTPServerRequestPart>()
    /// Body bytes held in `queued`.
    private var queuedBodyBytes = 0
    /// While a response is in flight the client is still read, so that NIO
    /// need not drop and re-add read interest (two epoll_ctl per request),
    /// but only while pipelined input stays this small.
    private static let maxQueuedParts = 32
    private static let maxQueuedBodyBytes = 64 * 1024
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
    /// The decoder saw an error; nothing more will be decoded.
    private var decoderFailed = false
    /// After an Upgrade request the decoder stops parsing, so the connection
    /// cannot carry another HTTP request unless it becomes a tunnel.
    private var decoderStopped = false
    /// The client shut down its write side: no more requests will come.
    private var inputClosed = false
    /// The connection-phase plugin scope (see DownstreamHandler+Plugins).
    var connectionPlugins: ConnectionPlugins?

    init(loopContext: LoopContext, listener: ListenerRuntime, headGuard: HeadGuard) {
        self.loopContext = loopContext
        self.listener = listener
        self.headGuard = headGuard
        headGuard.owner = self
    }

    // MARK: - Channel lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
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
        guard let exchange else { return queued.isEmpty }
        if exchange.requestEnded {
            return queued.count < Self.maxQueuedParts && queuedBodyBytes < Self.maxQueuedBodyBytes
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

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        if !queued.isEmpty || (exchange?.requestEnded ?? false) {
            if case .body(let buffer) = part { queuedBodyBytes += buffer.readableBytes }
            queued.append(part)
            return
        }
        handle(part)
    }

    private func handle(_ part: HTTPServerRequestPart) {
        switch part {
        case .head(let head):
            if closing { return }
            beginRequest(head)
        case .body(let buffer):
            guard let exchange else { return }
            requestBody(buffer, exchange: exchange)
        case .end(let trailers):
            guard let exchange else { return }
            requestEnd(trailers, exchange: exchange)
        }
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
            } else if queued.isEmpty {
                closing = true
                context.close(promise: nil)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let parserError = error as? HTTPParserError {
            decoderFailed = true
            let kind: ProxyErrorKind
            switch parserError {
            case .headerOverflow: kind = .headersTooLarge
            default: kind = .badRequest
            }
            rejectMalformed(kind, message: "malformed request: \(parserError)")
            return
        }
        if error is NIOHTTPDecoderError || error is ByteToMessageDecoderError {
            decoderFailed = true
            rejectMalformed(.badRequest, message: "malformed request")
            return
        }
        // I/O errors (reset by peer and friends): just close.
        context.close(promise: nil)
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

    // MARK: - Called by HeadGuard

    func headBytesArrived() {
        if !sawHeadBytes {
            sawHeadBytes = true
            if !connectionTimerIsHeader { armConnectionTimer(header: true) }
        }
    }

    func rejectBeforeDecoding(_ kind: ProxyErrorKind, message: String) {
        decoderFailed = true
        guard exchange == nil else {
            context.close(promise: nil)
            return
        }
        let exchange = makeExchange(head: nil)
        self.exchange = exchange
        exchange.requestEnded = true
        sendLocalResponse(exchange, kind: kind, message: message, close: true)
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

    private func makeExchange(head: HTTPRequestHead?) -> Exchange {
        let exchange = Exchange(id: loopContext.requestIDs.next(), head: head)
        if listener.observer != nil { exchange.wallStart = wallClockSeconds() }
        return exchange
    }

    private func beginRequest(_ head: HTTPRequestHead) {
        headGuard.headReceived()
        connectionTimer.set(nil)
        sawHeadBytes = false
        let exchange = makeExchange(head: head)
        self.exchange = exchange
        exchange.keepAlive = head.isKeepAlive && !draining

        // Framing as the decoder understood it. llhttp (strict) has already
        // refused CL+TE, differing/duplicate CL, TE not ending in chunked.
        var framing = HeaderRewriting.RequestFraming()
        var upgradeRequested = false
        var connectionHasUpgrade = false
        var hostCount = 0
        var clientHost: String? = nil
        // The decoder's own limit also counts the request line (it bounds
        // memory); the listener's header-bytes limit is checked exactly here.
        var headerBytes = 0
        for (name, value) in head.headers {
            headerBytes += name.utf8.count + value.utf8.count + 4
            switch HeaderRewriting.Known.classify(name) {
            case .contentLength:
                guard let length = Int(value), length >= 0 else {
                    return rejectHead(exchange, .badRequest, "invalid Content-Length")
                }
                framing.contentLength = length
            case .transferEncoding:
                framing.chunked = true
            case .upgrade:
                upgradeRequested = true
            case .connection:
                if value.utf8.count >= 7 && value.lowercased().contains("upgrade") { connectionHasUpgrade = true }
            case .expect:
                framing.expectsContinue = value.lowercased() == "100-continue"
            case .te:
                if value.lowercased().contains("trailers") { framing.teTrailers = true }
            case .host:
                hostCount += 1
                clientHost = value
            default:
                break
            }
            if !Self.isValidFieldValue(value) {
                return rejectHead(exchange, .badRequest, "invalid character in header \(name)")
            }
        }
        // HeadGuard checks the request line as bytes arrive; a pipelined
        // request read while the previous one was in flight is checked here.
        if head.uri.utf8.count > listener.config.limits.maxRequestLineBytes {
            return rejectHead(exchange, .uriTooLong, "request target longer than \(listener.config.limits.maxRequestLineBytes) bytes")
        }
        if headerBytes > listener.config.limits.maxHeaderBytes {
            return rejectHead(exchange, .headersTooLarge, "request headers exceed \(listener.config.limits.maxHeaderBytes) bytes")
        }
        if framing.chunked && framing.contentLength != nil {
            return rejectHead(exchange, .badRequest, "both Content-Length and Transfer-Encoding")
        }
        exchange.framing = framing
        exchange.isUpgrade = upgradeRequested && connectionHasUpgrade
        if exchange.isUpgrade { decoderStopped = true; exchange.keepAlive = false }
        if !framing.hasBody { exchange.bodyless = true }

        // Request target: origin-form (`/path?q`) or absolute-form
        // (`http://host/path`, whose authority replaces Host).
        if hostCount > 1 || (hostCount == 0 && head.version.minor >= 1) {
            return rejectHead(exchange, .badRequest, hostCount == 0 ? "missing Host header" : "more than one Host header")
        }
        var target = Substring(head.uri)
        var hostHeader = clientHost
        if target.utf8.first != UInt8(ascii: "/") {
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
        guard let routed = loopContext.routing.route(method: head.method, host: host, path: path, query: query, headers: head.headers) else {
            return rejectHead(exchange, .noRoute, "no route matches \(head.method.rawValue) \(path)")
        }
        exchange.routed = routed

        // Body limit (route overrides listener).
        let maxBody = routed.route.maxBodyBytes ?? listener.config.limits.maxBodyBytes
        exchange.maxBody = maxBody
        if let maxBody, let length = framing.contentLength, length > maxBody {
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
        case .badRequest, .headersTooLarge, .uriTooLong, .bodyTooLarge: clientError = true
        default: clientError = false
        }
        sendLocalResponse(exchange, kind: kind, message: message, close: !exchange.keepAlive || clientError)
    }

    /// RFC 9110 §5.5: field values never contain NUL, CR or LF.
    private static func isValidFieldValue(_ value: String) -> Bool {
        for byte in value.utf8 where byte == 0 || byte == 13 || byte == 10 {
            return false
        }
        return true
    }

    // MARK: - Upstream attempts

    /// Picks a target and gets a connection for the next attempt.
    func startAttempt(_ exchange: Exchange, excluding: Int?) {
        guard let routed = exchange.routed, let head = exchange.head else { return }
        let upstream = routed.upstream
        guard let target = exchange.pinnedTarget(excluding: excluding)
                ?? routed.routing.pickTarget(upstream: upstream, head: head, clientIP: clientIP, excluding: excluding) else {
            return failBeforeResponse(exchange, .noHealthyTarget, "no healthy target in upstream \(upstream.name)")
        }
        exchange.attempts += 1
        exchange.target = target
        exchange.staleRetried = false
        if exchange.upstreamStart == nil { exchange.upstreamStart = .now() }
        if exchange.upstreamHead == nil {
            exchange.upstreamHead = buildUpstreamHead(exchange, head: head, routed: routed)
        } else if !routed.route.preserveHost {
            exchange.upstreamHead!.headers.replaceOrAdd(name: "host", value: upstream.targetLabels[target])
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
        // Nothing was sent: a connect failure is always safe to retry.
        if exchange.attempts <= exchange.retries(routed) {
            return startAttempt(exchange, excluding: target)
        }
        if isTimeout {
            failBeforeResponse(exchange, .upstreamTimeout, "connecting to \(routed.upstream.targetLabels[target]) timed out")
        } else {
            failBeforeResponse(exchange, .connectFailed, "could not connect to upstream \(routed.upstream.name) (\(routed.upstream.targetLabels[target]))")
        }
    }

    func buildUpstreamHead(_ exchange: Exchange, head: HTTPRequestHead, routed: RoutedRequest) -> HTTPRequestHead {
        let hostHeader: String
        if routed.route.preserveHost, let clientHost = exchange.hostHeader {
            hostHeader = clientHost
        } else {
            hostHeader = routed.upstream.targetLabels[exchange.target ?? 0]
        }
        var framing = exchange.framing
        let upgrade = exchange.isUpgrade ? head.headers.first(name: "upgrade") : nil
        return HeaderRewriting.upstreamRequestHead(
            from: head, forwardURI: routed.forwardURI, framing: framing, upgrade: upgrade,
            hostHeader: hostHeader, clientHost: exchange.hostHeader, clientIP: clientIP, peerTrusted: peerTrusted,
            scheme: listener.scheme, requestID: exchange.id)
    }

    private func useConnection(_ connection: UpstreamConnection, for exchange: Exchange) {
        exchange.connection = connection
        exchange.connectionReused = connection.requestsSent > 0
        connection.requestsSent += 1
        connection.attach(self)
        connection.write(.head(exchange.upstreamHead!))
        if let replacement = exchange.replacementBody {
            // The client's body is dropped; the replacement goes once the
            // client's request has ended (else requestEnd writes it).
            exchange.pendingUpstream.removeAll()
            if exchange.requestEnded { writeReplacementBody(replacement, exchange: exchange, to: connection) }
        } else if !exchange.pendingUpstream.isEmpty {
            for part in exchange.pendingUpstream {
                if case .body = part { exchange.bodyForwarded = true }
                connection.write(part)
            }
            exchange.pendingUpstream.removeAll()
        } else if exchange.requestEnded && exchange.bodyless {
            // A retry of a bodyless request: its end was consumed by the first attempt.
            connection.write(.end(nil))
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
            connection.write(.body(.byteBuffer(buffer)))
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
                connection.write(.end(trailers))
            }
            exchange.upstreamNeedsFlush = true
            requestFullySent(exchange)
        } else {
            // With a set_body replacement these are kept too (plugins may
            // still read the body); useConnection drops them.
            exchange.pendingUpstream.append(.end(trailers))
            exchange.plugins?.requestBodyArrived()
        }
    }

    private func writeReplacementBody(_ body: ByteBuffer, exchange: Exchange, to connection: UpstreamConnection) {
        if body.readableBytes > 0 {
            connection.write(.body(.byteBuffer(body)))
            exchange.bodyForwarded = true
        }
        connection.write(.end(nil))
    }

    private func requestFullySent(_ exchange: Exchange) {
        let now = NIODeadline.now()
        exchange.requestSentAt = now
        exchange.lastUpstreamRead = now
        armExchangeTimer(exchange)
    }

    // MARK: - UpstreamConnectionDelegate

    func upstreamRead(_ part: HTTPClientResponsePart, on connection: UpstreamConnection) {
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
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
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

    private func upstreamHead(_ head: HTTPResponseHead, exchange: Exchange, connection: UpstreamConnection) {
        guard let routed = exchange.routed, let target = exchange.target else { return }
        let code = Int(head.status.code)
        if code >= 100 && code < 200 && code != 101 {
            // Informational (100 Continue, 103 Early Hints): relay as is.
            var info = head
            info.headers.remove(name: "connection")
            info.version = .http1_1
            context.writeAndFlush(wrapOutboundOut(.head(info)), promise: nil)
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

        if let plugins = exchange.plugins, code != 101 {
            guard let head = runResponsePlugins(head, exchange: exchange, plugins: plugins, connection: connection) else { return }
            return relayResponseHead(head, exchange: exchange, connection: connection)
        }
        relayResponseHead(head, exchange: exchange, connection: connection)
    }

    func relayResponseHead(_ head: HTTPResponseHead, exchange: Exchange, connection: UpstreamConnection) {
        let code = Int(head.status.code)
        exchange.upstreamKeepAlive = head.isKeepAlive
        let isUpgrade = code == 101
        if isUpgrade && !exchange.isUpgrade {
            exchange.connection = nil
            connection.close()
            return failBeforeResponse(exchange, .badUpstreamResponse, "upstream switched protocols without an upgrade request")
        }
        if exchange.isUpgrade && !isUpgrade { exchange.keepAlive = false }
        let requestHead = exchange.head!
        let bodyAllowed = requestHead.method != .HEAD && code != 204 && code != 304
        let (downHead, mustClose) = HeaderRewriting.downstreamResponseHead(
            head, requestVersion: requestHead.version, bodyAllowed: bodyAllowed,
            keepAlive: exchange.keepAlive && !draining, isUpgrade: isUpgrade)
        if mustClose { exchange.keepAlive = false }
        exchange.responseStarted = true
        exchange.status = code
        context.write(wrapOutboundOut(.head(downHead)), promise: nil)
        if isUpgrade {
            exchange.upgraded = true
        }
    }

    private func upstreamEnd(_ trailers: HTTPHeaders?, exchange: Exchange, connection: UpstreamConnection) {
        guard exchange.responseStarted else { return }
        if exchange.upgraded {
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
        context.write(wrapOutboundOut(.end(trailers)), promise: endWritten)
        completeAfterBoth(exchange, endWritten: endWritten?.futureResult)
    }

    func upstreamReadComplete(on connection: UpstreamConnection) {
        if exchange?.connection === connection || exchange?.upgraded == true {
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
        let body = ProxyErrorResponse.body(kind: kind, message: message, requestID: exchange.id, allocator: context.channel.allocator)
        let head = ProxyErrorResponse.head(kind: kind, requestID: exchange.id, bodyLength: body.readableBytes,
                                           close: close, version: exchange.head?.version ?? .http1_1)
        exchange.status = Int(kind.status.code)
        exchange.responseStarted = true
        exchange.bytesOut += body.readableBytes
        exchange.localResponseDone = true
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if exchange.head?.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        }
        exchange.upstreamResponseEnded = true
        if close {
            // Closing: no need to read the rest of the request.
            exchange.requestEnded = true
        }
        let endPromise: EventLoopPromise<Void>? = close ? context.eventLoop.makePromise() : nil
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: endPromise)
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
        !exchange.keepAlive || draining || decoderFailed || decoderStopped || (inputClosed && queued.isEmpty)
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
        headGuard.expectHead()
        armConnectionTimer(header: false)
        while !closing, self.exchange == nil || self.exchange?.requestEnded == false, let part = queued.popFirst() {
            if case .body(let buffer) = part { queuedBodyBytes -= buffer.readableBytes }
            handle(part)
        }
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
            upstreamDuration: upstreamDuration, attempts: exchange.attempts))
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
        // Deferred: we are inside the upstream decoder's read callback.
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
                // Remove the HTTP handlers; the decoders forward any bytes
                // that arrived after the upgrade to the tunnel.
                _ = downOps.removeHandler(self)
                _ = upOps.removeHandler(connection.handler)
                _ = downOps.removeHandler(try downOps.handler(type: HTTPResponseEncoder.self))
                _ = upOps.removeHandler(try upOps.handler(type: HTTPRequestEncoder.self))
                _ = downOps.removeHandler(self.headGuard)
                // Leftover bytes are written to the partner outside a read
                // cycle, so flush once each decoder is gone.
                downOps.removeHandler(try downOps.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self))
                    .whenComplete { _ in upstream.flush() }
                upOps.removeHandler(try upOps.handler(type: ByteToMessageHandler<HTTPResponseDecoder>.self))
                    .whenComplete { _ in downstream.flush() }
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

    // MARK: - Drain

    /// Stop taking requests: idle connections close now, busy ones after
    /// their current response.
    func beginDrain() {
        draining = true
        if exchange == nil && queued.isEmpty && !closing {
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
    let head: HTTPRequestHead?
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

    var upstreamHead: HTTPRequestHead?
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

    init(id: String, head: HTTPRequestHead?) {
        self.id = id
        self.head = head
    }
}
