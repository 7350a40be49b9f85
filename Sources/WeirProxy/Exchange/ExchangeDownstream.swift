import NIOCore
import NIOHTTP1
import WeirCore

/// The exchange logic: one request from routing to its log line, whatever
/// wire protocol carried it (see docs/http1-codec.md, "The seam for HTTP/2").
///
/// `routeRequest` takes a protocol-neutral `RequestHead`; the body arrives
/// through `requestBody` / `requestEnd`; routing, limits, plugins, upstream
/// attempts, retries, timeouts and the response relay live here. The
/// downstream side (the HTTP/1.1 connection, an HTTP/2 stream) conforms to
/// `ExchangeDownstream`: it holds the exchange in flight and answers through
/// its write functions in its own framing.
///
/// A protocol with the logic in its extension (not a separate object the
/// connection calls through an existential) so that each conformer gets the
/// code specialised for it: the HTTP/1.1 path pays no dynamic dispatch and
/// no extra allocation per request for the seam.
protocol ExchangeDownstream: AnyObject, UpstreamConnectionDelegate {
    var loopContext: LoopContext { get }
    var listener: ListenerRuntime { get }
    var peerAddress: SocketAddress? { get }
    var clientIP: String { get }
    /// The client is a trusted proxy: its X-Forwarded-* are extended.
    var peerTrusted: Bool { get }
    /// The connection is draining: no keep-alive after this exchange.
    var draining: Bool { get }
    /// The request in flight on this connection (HTTP/1.1) or stream (HTTP/2).
    var exchange: Exchange? { get set }
    /// Read/write/whole-request deadlines of the exchange in flight.
    var exchangeTimer: LazyTimer { get set }
    /// The connection-phase plugin scope, if any.
    var connectionPlugins: ConnectionPlugins? { get set }
    /// Emptied storage for the next request's added upstream fields (a
    /// finished exchange's array is handed back: `recycleUpstreamFields`).
    var spareUpstreamFields: [HTTP1AddedField] { get set }
    /// The connection's last own upstream lines (`UpstreamOwnLinesMemo`).
    var upstreamOwnLinesMemo: UpstreamOwnLinesMemo { get }
    /// The TLS session of an https connection; nil on plain ones.
    var tls: TLSConnectionInfo? { get }
    /// The listener's side of the connection (`conn:get_local_port`).
    var localAddress: SocketAddress? { get }
    var allocator: ByteBufferAllocator { get }
    var eventLoop: EventLoop { get }

    // MARK: Writing the response (in the downstream's own framing)

    /// The upstream's head as parsed, with the plugins' changes to it if
    /// any (removed lines, added lines, a new status; see
    /// Plugins/PluginHeadEdits.swift). The downstream applies its own
    /// rewriting (hop-by-hop fields, Via, framing) on top.
    /// `pluginChanges` is lent (ExchangePlugins.relayChanges, kept from
    /// response to response) and left as it was.
    func relayWireResponseHead(_ head: HTTP1ResponseHead, pluginChanges: inout ResponseHeadChanges?, exchange: Exchange)
    /// Always nil: what a head without plugin changes is relayed with. A
    /// stored nil lent to the relay; a local one was destroyed after the
    /// call through the type's metadata (~60 instructions per response).
    var noPluginChanges: ResponseHeadChanges? { get set }
    /// An informational (1xx, not 101) head from the upstream.
    func relayInterimResponseHead(_ head: HTTP1ResponseHead, exchange: Exchange)
    func writeResponseBody(_ data: ByteBuffer, exchange: Exchange)
    /// The end of the response, with the upstream's trailers if any;
    /// `promise` completes when it is written (to close after it).
    func writeResponseEnd(_ trailers: HTTP1Fields?, exchange: Exchange, promise: EventLoopPromise<Void>?)
    /// A whole response made by the proxy (error or plugin exit), flushed;
    /// `body` nil when none is sent (HEAD, 204, 304).
    func writeLocalResponse(_ head: HTTPResponseHead, body: ByteBuffer?, exchange: Exchange, promise: EventLoopPromise<Void>?)
    func flushDownstream()
    /// The exchange cannot go on: close the connection (HTTP/1.1) or reset the stream (HTTP/2).
    func closeDownstream()
    /// A gRPC call fails after its response head went out: end the
    /// response with `grpc-status`/`grpc-message` trailers if the framing
    /// still allows it (true when written; `closeDownstream` follows either way).
    func endGRPCResponseWithStatus(_ status: GRPCStatusCode, message: String) -> Bool
    var downstreamIsWritable: Bool { get }
    func resumeReadingIfAllowed()

    // MARK: Lifecycle hooks

    /// Whether the connection closes once this exchange's response is out.
    func closesAfter(_ exchange: Exchange) -> Bool
    /// The exchange ended normally and was recorded; `self.exchange` is nil.
    func exchangeFinished(_ exchange: Exchange, afterWrite: EventLoopFuture<Void>?)
    /// The exchange was abandoned (client gone, response cut); `self.exchange` is nil.
    func exchangeAborted(_ exchange: Exchange)
    /// The upstream answered 101 and the exchange is done: splice the two connections.
    func switchToTunnel(_ exchange: Exchange, connection: UpstreamConnection)
}

extension ExchangeDownstream {
    /// HTTP/1.1 cannot add trailers to a response already framed (and a
    /// chunked one would need the codec's help): the connection just closes.
    func endGRPCResponseWithStatus(_ status: GRPCStatusCode, message: String) -> Bool { false }

    /// Hands a finished exchange's added-upstream-field array, emptied, to
    /// `spare` for a next request (saves its allocation). Not with plugins:
    /// a log-phase handler may still read the edits.
    func recycleUpstreamFields(of exchange: Exchange, into spare: inout [HTTP1AddedField]) {
        guard exchange.plugins == nil, exchange.upstreamEdits != nil else { return }
        swap(&spare, &exchange.upstreamEdits!.added)
        spare.removeAll(keepingCapacity: true)
    }

    // MARK: - Request start

    /// `spare`: a finished exchange of this connection held by nothing
    /// else, cleared (`Exchange.clearForReuse`), to reuse for this request.
    func makeExchange(head: RequestHead?, reusing spare: Exchange? = nil) -> Exchange {
        let requestID = loopContext.requestIDs.nextID(), started = loopContext.clock.now
        let exchange: Exchange
        if let spare {
            spare.begin(requestID: requestID, head: head, started: started)
            exchange = spare
        } else {
            exchange = Exchange(requestID: requestID, head: head, started: started)
        }
        // The wall-clock start goes into access records only (the access
        // log's, a plugin log phase's: that one converts `started` when its
        // log phase starts, ExchangePlugins.requestDone): metrics alone need none.
        if listener.observerWantsAccessRecords {
            exchange.wallStart = loopContext.clock.wallSeconds
        }
        return exchange
    }

    /// The exchange starts here: a complete head (any wire protocol), its
    /// body still to come through `requestBody` / `requestEnd`.
    func routeRequest(_ exchange: Exchange, head: RequestHead) {
        // The wire method: NIO's HTTPMethod compares through its rawValue String.
        if head.wire.method == .connect {
            // A reverse proxy does not open tunnels to arbitrary authorities.
            exchange.keepAlive = false
            return rejectHead(exchange, .notImplemented, "CONNECT is not supported: Weir is a reverse proxy")
        }
        var hostHeader = head.host
        // The usual target, an origin-form path without a query that is
        // already normal, is routed by its bytes: no String is made of it
        // (plugins and logs make one from `head.uri` if they ask).
        let clientHost = hostHeader ?? ""
        switch head.withTargetBytes({ loopContext.routeAsReceived(head: head, host: clientHost, target: $0) }) {
        case .routed(let routed):
            exchange.hostHeader = hostHeader
            // `Substring()`: a `""` literal here is a Substring made from a String (~30 instructions).
            return routeFound(exchange, head: head, routed: routed, path: nil, query: Substring())
        case .noRoute:
            exchange.hostHeader = hostHeader
            return rejectHead(exchange, .noRoute, "no route matches \(head.method.rawValue) \(head.uri)")
        case .notPlain:
            break
        }
        // Request target: origin-form (`/path?q`), absolute-form
        // (`http://host/path`, whose authority replaces Host), or `*`
        // (OPTIONS only: routed as `/`, forwarded as `*`).
        let uri = head.uri
        // By its bytes: `Substring == "*"` is the generic StringProtocol
        // comparison (~135 instructions, callgrind), String == a call.
        let firstByte = uri.utf8.first
        let asterisk = firstByte == UInt8(ascii: "*") && uri.utf8.count == 1
        let originForm = firstByte == UInt8(ascii: "/")
        let receivedPath: String
        let query: Substring
        if originForm, Self.queryStart(uri) == nil {
            // The usual target, a path without a query: it is its own path
            // (no Substring of it and no String made back from one).
            receivedPath = uri
            query = ""
        } else {
            var target = Substring(uri)
            if asterisk {
                target = "/"
            } else if !originForm {
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
            if let q = Self.queryStart(target) {
                receivedPath = String(target[..<q])
                query = target[q...]
            } else {
                receivedPath = String(target)
                query = ""
            }
        }
        // Route on the normalized path and forward that same path, so the
        // upstream serves exactly what was routed (no `/public/../admin`).
        guard let (path, pathChanged) = RequestPath.normalizeReportingChange(receivedPath) else {
            return rejectHead(exchange, .badRequest, "malformed request path")
        }
        exchange.hostHeader = hostHeader
        // The route table ignores a port and compares case-insensitively.
        let host = hostHeader ?? ""
        // Origin-form and already normal: the target itself can be forwarded.
        let targetIsPathAndQuery = originForm && !pathChanged
        guard var routed = loopContext.route(head: head, host: host, path: path, query: query,
                                             targetIsPathAndQuery: targetIsPathAndQuery) else {
            return rejectHead(exchange, .noRoute, "no route matches \(head.method.rawValue) \(path)")
        }
        if asterisk {
            routed = RoutedRequest(route: routed.route, upstream: routed.upstream, forwardURI: "*", routing: routed.routing)
        }
        routeFound(exchange, head: head, routed: routed, path: path, query: query)
    }

    /// The request has its route: limits, then the plugins or the first
    /// upstream attempt. `path` (normalized, without the query) is for
    /// plugins; nil when the request target as received is that path
    /// (origin-form, no query, already normal): a plugin that asks for it
    /// then makes it from the head (ExchangePlugins.path).
    func routeFound(_ exchange: Exchange, head: RequestHead, routed: RoutedRequest,
                    path: String?, query: Substring) {
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
        if let plugins = loopContext.plugins, let chain = plugins.chain(for: routed.route) {
            return startRequestPlugins(exchange, routed: routed, head: head, plugins: plugins, chain: chain,
                                       path: path, query: query)
        }
        startAttempt(exchange, routed: routed, head: head, excluding: nil)
    }

    /// Where the query of a request target starts (its `?`), by a search of
    /// the contiguous bytes: `firstIndex(of:)` walks Characters (~230
    /// instructions each under callgrind: 10 k for a 45-byte path) and even
    /// the UTF-8 view's goes index by index (~24 a byte).
    static func queryStart<Target: StringProtocol>(_ target: Target) -> Target.Index? {
        let utf8 = target.utf8
        let offset = utf8.withContiguousStorageIfAvailable { $0.firstIndex(of: UInt8(ascii: "?")) }
            ?? utf8.firstIndex(of: UInt8(ascii: "?")).map { utf8.distance(from: utf8.startIndex, to: $0) }
        return offset.map { utf8.index(utf8.startIndex, offsetBy: $0) }
    }

    /// A request refused before anything reached an upstream.
    func rejectHead(_ exchange: Exchange, _ kind: ProxyErrorKind, _ message: String) {
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
        startAttempt(exchange, routed: routed, head: head, excluding: excluding)
    }

    /// `routed` and `head` are the exchange's, from a caller that already
    /// holds them (the first attempt, from `routeRequest`): read again from
    /// the exchange's properties they were retained and released once more.
    func startAttempt(_ exchange: Exchange, routed: RoutedRequest, head: RequestHead, excluding: Int?) {
        let upstream = routed.upstream
        guard let target = exchange.pinnedTarget(excluding: excluding)
                ?? routed.pickTarget(head: head, clientIP: self.clientIP, excluding: excluding,
                                     now: loopContext.clock.nowNanoseconds) else {
            return failBeforeResponse(exchange, .noHealthyTarget, "no healthy target in upstream \(upstream.name)")
        }
        exchange.attempts += 1
        exchange.target = target
        exchange.staleRetried = false
        let now = loopContext.clock.now
        if exchange.upstreamStart == nil { exchange.upstreamStart = now }
        // Until a plugin reads or edits the upstream request (which makes
        // the edit list, ExchangePlugins.makeUpstreamEdits) the proxy's own
        // lines are written as bytes (serializeUpstreamHead), with plugins
        // on the route or not: a chain that edits nothing pays nothing.
        if exchange.upstreamEdits != nil && !routed.route.preserveHost {
            // A retry, or edits a plugin made before the target was known.
            exchange.upstreamEdits!.replaceHost(upstream.targetLabels[target])
        }
        let pool = routed.pools[target]
        routed.balancer.requestStarted(target: target)
        exchange.balancerActive = true
        if let connection = pool.takeIdle(now: now) {
            useConnection(connection, for: exchange)
        } else {
            connectFresh(exchange, pool: pool)
        }
    }

    func connectFresh(_ exchange: Exchange, pool: TargetPool) {
        // `self` held until the connect completes (bounded by the connect
        // timeout), not weakly: a weak reference would give an HTTP/1.1
        // handler a side table for its life (see UpstreamHandler.delegate).
        pool.connect(timeout: exchange.plugins?.connectTimeoutOverride).whenComplete { result in
            guard self.exchange === exchange, !exchange.finished else {
                // The request ended (client gone, timeout) while we connected: keep the connection.
                if case .success(let c) = result { pool.release(c, now: self.loopContext.clock.now) }
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

    func connectFailed(_ exchange: Exchange, error: Error) {
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

    func upstreamHostHeader(_ exchange: Exchange, routed: RoutedRequest) -> String {
        if routed.route.preserveHost, let clientHost = exchange.hostHeader { return clientHost }
        return routed.upstream.targetLabels[exchange.target ?? 0]
    }

    /// The upstream head as edits to the client's head (kept field lines
    /// are copied as bytes): hop-by-hop fields go (and what Connection
    /// names), Host/X-Request-ID are replaced, X-Forwarded-* are replaced
    /// (extended for a trusted peer), Via is extended.
    /// `added[0]` is Host (a retry on another target replaces it, see
    /// `HTTP1HeadEdits.replaceHost`). Plugins edit this same list; without
    /// plugins the same lines are written as bytes (`upstreamOwnFields`).
    func upstreamEdits(_ exchange: Exchange, head: RequestHead, routed: RoutedRequest) -> HTTP1HeadEdits {
        let fields = head.headers
        var edits = HTTP1HeadEdits(removed: fields.hopByHopFields(keepUpgrade: exchange.isUpgrade), target: routed.forwardURI)
        var forwardedFor: String? = nil
        var forwardedProto: String? = nil
        var forwardedHost: String? = nil
        var via: String? = nil
        for (i, e) in fields.entries.enumerated() {
            guard let line = ReplacedClientLine(e.known) else { continue }
            edits.removed.insert(i)
            switch line {
            case .dropped:
                break
            case .forwardedFor:
                if peerTrusted { let v = fields.value(at: i); forwardedFor = forwardedFor.map { $0 + ", " + v } ?? v }
            case .forwardedProto:
                if peerTrusted && forwardedProto == nil { forwardedProto = fields.value(at: i) }
            case .forwardedHost:
                if peerTrusted && forwardedHost == nil { forwardedHost = fields.value(at: i) }
            case .via:
                let v = fields.value(at: i)
                via = via.map { $0 + ", " + v } ?? v
            }
        }
        swap(&edits.added, &spareUpstreamFields)
        edits.added.reserveCapacity(8)
        edits.added.append(HTTP1AddedField(name: "host", value: upstreamHostHeader(exchange, routed: routed)))
        if exchange.framing.chunked { edits.added.append(HTTP1AddedField(name: "transfer-encoding", value: "chunked")) }
        if exchange.isUpgrade { edits.added.append(HTTP1AddedField(name: "connection", value: "upgrade")) }
        edits.added.append(HTTP1AddedField(name: "x-forwarded-for", value: forwardedFor.map { $0 + ", " + clientIP } ?? clientIP))
        edits.added.append(HTTP1AddedField(name: "x-forwarded-proto", value: forwardedProto ?? listener.scheme))
        if let host = forwardedHost ?? exchange.hostHeader {
            edits.added.append(HTTP1AddedField(name: "x-forwarded-host", value: host))
        }
        let viaEntry = HeaderRewriting.viaEntry(http2: head.receivedOverHTTP2, http10: head.isHTTP10)
        edits.added.append(HTTP1AddedField(name: "via", value: via.map { $0 + ", " + viaEntry } ?? viaEntry))
        edits.added.append(HTTP1AddedField(name: "x-request-id", value: exchange.id))
        return edits
    }

    /// `upstreamEdits`' lines for the byte writer (UpstreamOwnFields).
    /// Inlined: built in its caller's frame, not returned (a struct copy).
    /// The connection's memo is asked before the Strings are handed over:
    /// when it holds this request's lines (the usual keep-alive request),
    /// the struct keeps none of them (no retain now, no release at its end).
    @inline(__always)
    func upstreamOwnFields(_ exchange: Exchange, head: RequestHead, routed: RoutedRequest) -> UpstreamOwnFields {
        let fields = head.headers
        let chunked = exchange.framing.chunked, upgrade = exchange.isUpgrade
        let viaEntry = HeaderRewriting.viaEntryLiteral(http2: head.receivedOverHTTP2, http10: head.isHTTP10)
        return UpstreamOwnFields(
            fields: fields, removed: fields.hopByHopFields(keepUpgrade: upgrade), peerTrusted: peerTrusted,
            requestID: exchange.requestID, memo: upstreamOwnLinesMemo,
            memoHolds: { memo in
                let holds = memo.holdsLines(host: upstreamHostHeader(exchange, routed: routed), chunked: chunked, upgrade: upgrade,
                                            clientHost: exchange.hostHeader, viaEntry: viaEntry)
                assert(!holds || memo.keptFor(clientIP: clientIP, scheme: listener.scheme), "a connection's client address and scheme changed")
                return holds
            },
            inputs: {
                UpstreamOwnFields.Inputs(host: upstreamHostHeader(exchange, routed: routed), chunked: chunked, upgrade: upgrade,
                                         clientIP: clientIP, scheme: listener.scheme, clientHost: exchange.hostHeader,
                                         viaEntry: viaEntry)
            })
    }

    /// The upstream request head as bytes, whether it chunks its body, and
    /// the method the response answers (HEAD responses have no body).
    func serializeUpstreamHead(_ exchange: Exchange, on connection: UpstreamConnection) -> (ByteBuffer, chunked: Bool, method: HTTP1Method) {
        // The head is read in place (`head.wire`), not copied into a local.
        let head = exchange.head!
        var out = connection.takeHeadBuffer(capacity: head.wire.bytes.readableBytes + 256)
        guard exchange.upstreamEdits != nil else {
            // No plugin edits: the proxy's own lines as bytes.
            let routed = exchange.routed!
            let own = upstreamOwnFields(exchange, head: head, routed: routed)
            if let plugins = exchange.plugins, plugins.hasUpstreamLines {
                // Plugins' header lines after the own ones (PluginUpstreamLines).
                plugins.writeUpstreamHead(head, own: own, target: routed.forwardURI, into: &out)
            } else {
                head.writeUpstream(own: own, target: routed.forwardURI, into: &out)
            }
            return (out, exchange.framing.chunked, head.wire.method)
        }
        guard let plugins = exchange.plugins, plugins.upstreamFramingEdited else {
            // Swapped out of the exchange and back, not copied: passing
            // the class property copies it (its arrays retained, released).
            var edits: HTTP1HeadEdits? = nil
            swap(&edits, &exchange.upstreamEdits)
            head.writeUpstream(edits: edits!, into: &out)
            swap(&edits, &exchange.upstreamEdits)
            return (out, exchange.framing.chunked, head.wire.method)
        }
        // Plugins may have changed the method or the framing (set_body).
        let method = plugins.upstreamMethod
        HTTP1HeadWriter.writeRequest(head.wire, edits: exchange.upstreamEdits!, method: method, into: &out)
        let chunked = exchange.upstreamEdits!.added.contains { $0.name.equalsIgnoringASCIICase("transfer-encoding") }
        guard let method else { return (out, chunked, head.wire.method) }
        return (out, chunked, method == "HEAD" ? .head : method == "CONNECT" ? .connect : .get)
    }

    func useConnection(_ connection: UpstreamConnection, for exchange: Exchange) {
        exchange.connection = connection
        exchange.connectionReused = connection.requestsSent > 0
        connection.requestsSent += 1
        connection.attach(self)
        let (head, chunked, method) = serializeUpstreamHead(exchange, on: connection)
        connection.writeHead(consume head, method: method, chunkedBody: chunked)
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
        // requestFullySent arms the timer itself (once is enough: both
        // would compute the same deadlines).
        if exchange.requestEnded { requestFullySent(exchange) } else { armExchangeTimer(exchange) }
        resumeReadingIfAllowed()
    }

    // MARK: - Request body

    func requestBody(_ buffer: ByteBuffer, exchange: Exchange) {
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
                closeDownstream()
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

    func requestEnd(_ trailers: HTTPHeaders?, exchange: Exchange) {
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

    func writeReplacementBody(_ body: ByteBuffer, exchange: Exchange, to connection: UpstreamConnection) {
        if body.readableBytes > 0 {
            connection.writeBody(body)
            exchange.bodyForwarded = true
        }
        connection.writeEnd(trailers: nil)
    }

    func requestFullySent(_ exchange: Exchange) {
        let now = loopContext.clock.now
        exchange.requestSentAt = now
        exchange.lastUpstreamRead = now
        armExchangeTimer(exchange)
    }

    // MARK: - UpstreamConnectionDelegate

    var loopClock: LoopClock { loopContext.clock }

    /// What `UpstreamConnectionDelegate.upstreamRead` does (each conformer's
    /// witness calls it; the HTTP/1.1 one also keeps the finished exchange
    /// for reuse afterwards).
    func relayUpstreamPart(_ part: UpstreamResponsePart, on connection: UpstreamConnection) {
        guard let exchange, exchange.connection === connection else {
            connection.close()
            return
        }
        if let plugins = exchange.plugins, plugins.holdingResponse {
            plugins.heldParts.append(part)
            return
        }
        if exchange.requestSentAt != nil { exchange.lastUpstreamRead = loopContext.clock.now }
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
            if !downstreamIsWritable {
                connection.handler.pauseReading()
            }
        case .end(let trailers):
            if let plugins = exchange.plugins, plugins.filtersBody, !plugins.lastChunkFiltered, exchange.responseStarted {
                return filterLastChunk(trailers, exchange: exchange, plugins: plugins, connection: connection)
            }
            upstreamEnd(trailers, exchange: exchange, connection: connection)
        }
    }

    func upstreamHead(_ head: HTTP1ResponseHead, exchange: Exchange, connection: UpstreamConnection) {
        guard exchange.routed != nil, let target = exchange.target else { return }
        // unowned(unsafe): the exchange (held by the caller) keeps its route
        // until `clearForReuse`, after the exchange is done; a strong local
        // was a retain/release per response.
        unowned(unsafe) let routed = exchange.routed!
        let code = head.status
        if head.isInterim {
            // Informational (100 Continue, 103 Early Hints): relayed as is,
            // to HTTP/1.1 clients only (RFC 9110 §15.2).
            guard !exchange.head!.isHTTP10 else { return }
            relayInterimResponseHead(head, exchange: exchange)
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

        // The response phase (or the request phase's response header
        // changes, or a body filter) edits the head as a list of changes to
        // its bytes; with none of them it is relayed exactly as without plugins.
        if let plugins = exchange.plugins, code != 101, !plugins.responsePhaseIsNoop {
            // The changes stay in `plugins`, lent to the relay (a value
            // returned and destroyed per response cost ~300 instructions).
            guard runResponsePlugins(head, exchange: exchange, plugins: plugins, connection: connection) else { return }
            relayWireResponseHead(head, pluginChanges: &plugins.relayChanges, exchange: exchange)
            return plugins.recycleRelayChanges()
        }
        relayWireResponseHead(head, pluginChanges: &noPluginChanges, exchange: exchange)
    }

    /// A 101 only answers an upgrade request; a refused upgrade ends the
    /// connection after its response. False when the exchange failed.
    func checkUpgradeResponse(_ code: Int, exchange: Exchange, connection: UpstreamConnection) -> Bool {
        let isUpgrade = code == 101
        if isUpgrade && !exchange.isUpgrade {
            exchange.connection = nil
            connection.close()
            failBeforeResponse(exchange, .badUpstreamResponse, "upstream switched protocols without an upgrade request")
            return false
        }
        if exchange.isUpgrade && !isUpgrade {
            // Refused: neither side's connection carries another request. The
            // upstream was asked to switch and may have stopped parsing HTTP
            // (NIO's server does): pooled, it would hold the next client's
            // request until the read timeout (ExchangeReuseUpgradeTests).
            exchange.keepAlive = false
            exchange.upstreamKeepAlive = false
        }
        return true
    }

    /// Whether the client gets a body for this status (never for HEAD, 204, 304).
    func bodyAllowed(_ exchange: Exchange, status: Int) -> Bool {
        // The wire method: NIO's HTTPMethod compares through its rawValue String.
        exchange.head!.wire.method != .head && status != 204 && status != 304
    }

    func upstreamEnd(_ trailers: HTTP1Fields?, exchange: Exchange, connection: UpstreamConnection) {
        guard exchange.responseStarted else { return }
        if exchange.upgraded {
            flushDownstream()
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
        let endWritten: EventLoopPromise<Void>? = willClose ? eventLoop.makePromise() : nil
        writeResponseEnd(trailers, exchange: exchange, promise: endWritten)
        completeAfterBoth(exchange, endWritten: endWritten?.futureResult)
    }

    func upstreamReadComplete(on connection: UpstreamConnection) {
        if exchange?.connection === connection || exchange?.upgraded == true {
            flushDownstream()
        }
    }

    func upstreamWritabilityChanged(on connection: UpstreamConnection) {
        guard let exchange, exchange.connection === connection else { return }
        if connection.channel.isWritable {
            exchange.writeBlockedSince = nil
            resumeReadingIfAllowed()
        } else {
            exchange.writeBlockedSince = loopContext.clock.now
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
            closeDownstream()
            return
        }
        // A reused keep-alive connection the upstream had already closed (its
        // close crossed our request): an idempotent bodyless request is resent
        // once on a fresh connection to the same target, not counted as a
        // retry (what Go's transport does; anything else could run twice).
        let idempotent = Self.isIdempotent(exchange.head!.method)
        if exchange.connectionReused && !exchange.staleRetried && exchange.bodyless && idempotent {
            exchange.staleRetried = true
            let pool = routed.pools[target]
            routed.balancer.requestStarted(target: target)
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

    static func isIdempotent(_ method: HTTPMethod) -> Bool {
        switch method {
        case .GET, .HEAD, .OPTIONS, .PUT, .DELETE, .TRACE: return true
        default: return false
        }
    }

    // MARK: - Exchange timeouts (read, write, whole request)

    func armExchangeTimer(_ exchange: Exchange) {
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

    func exchangeTimerFired() {
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
            // A gRPC client learns DEADLINE_EXCEEDED from trailers where the
            // downstream can still send them (HTTP/2), not from a reset.
            if exchange.grpc != nil {
                _ = endGRPCResponseWithStatus(GRPCErrorResponse.status(for: .upstreamTimeout), message: expired)
            }
            abortExchange(exchange, reason: expired)
            closeDownstream()
        } else {
            exchange.keepAlive = exchange.keepAlive && exchange.requestEnded
            failBeforeResponse(exchange, .upstreamTimeout, expired)
        }
    }

    // MARK: - Finishing

    func endBalancerAttempt(_ exchange: Exchange) {
        guard exchange.balancerActive, exchange.routed != nil, let target = exchange.target else { return }
        exchange.balancerActive = false
        // unowned(unsafe): the exchange (held by the caller) keeps its route
        // until `clearForReuse`; a strong local was a retain/release per request.
        unowned(unsafe) let routed = exchange.routed!
        routed.balancer.requestFinished(target: target)
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

    func sendLocalResponse(_ exchange: Exchange, kind: ProxyErrorKind, message: String, close closeRequested: Bool) {
        if closeRequested { exchange.keepAlive = false }
        if !exchange.requestEnded && exchange.framing.expectsContinue && exchange.framing.hasBody {
            // The client waited for a 100 it will not get; whether it now
            // sends the body or not is up to it, so the connection cannot be
            // reused safely.
            exchange.keepAlive = false
        }
        let close = closesAfter(exchange)
        let body: ByteBuffer
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
        exchange.upstreamResponseEnded = true
        if close {
            // Closing: no need to read the rest of the request.
            exchange.requestEnded = true
        }
        let endPromise: EventLoopPromise<Void>? = close ? eventLoop.makePromise() : nil
        writeLocalResponse(head, body: exchange.head?.method != .HEAD ? body : nil, exchange: exchange, promise: endPromise)
        if exchange.requestEnded {
            finishExchange(exchange, afterWrite: endPromise?.futureResult)
        } else {
            // Keep reading (and dropping) the rest of the body, then carry on.
            resumeReadingIfAllowed()
        }
    }

    /// The response end was written (and the request fully received, or
    /// the connection is closing).
    func completeAfterBoth(_ exchange: Exchange, endWritten: EventLoopFuture<Void>?) {
        if let connection = exchange.connection {
            exchange.connection = nil
            if exchange.upstreamKeepAlive && connection.reusable {
                connection.pool.release(connection, now: loopContext.clock.now)
            } else {
                connection.close()
            }
        }
        finishExchange(exchange, afterWrite: endWritten)
    }

    func finishExchange(_ exchange: Exchange, afterWrite: EventLoopFuture<Void>? = nil) {
        guard !exchange.finished else { return }
        endExchange(exchange)
        exchangeFinished(exchange, afterWrite: afterWrite)
    }

    /// The exchange cannot complete normally (client gone, upstream cut off).
    func abortExchange(_ exchange: Exchange, reason: String) {
        guard !exchange.finished else { return }
        loopContext.logger.debug("exchange aborted", metadata: ["request_id": "\(exchange.id)", "reason": "\(reason)"])
        exchange.keepAlive = false
        if exchange.status == 0 { exchange.status = 499 }
        endExchange(exchange)
        exchangeAborted(exchange)
    }

    /// What every end of an exchange does, finished or aborted: timer off,
    /// balancer told, a still-held upstream connection closed (a released
    /// one was already detached), the access record and the log phase.
    private func endExchange(_ exchange: Exchange) {
        exchange.finished = true
        exchangeTimer.set(nil)
        endBalancerAttempt(exchange)
        if let connection = exchange.connection {
            exchange.connection = nil
            connection.close()
        }
        let now = loopContext.clock.now
        record(exchange, now: now)
        exchange.plugins?.requestDone(at: now)
        self.exchange = nil
    }

    /// `now`: the loop's cached time of the event that ended the exchange
    /// (`LoopClock`), so durations are exact to within one loop turn.
    func record(_ exchange: Exchange, now: NIODeadline) {
        let upstreamDuration = exchange.upstreamStart.map { Double((now - $0).nanoseconds) / 1e9 }
        let totalDuration = Double((now - exchange.started).nanoseconds) / 1e9
        // The usual case: the route's counter already found, and no
        // access record wanted. The observer (an existential: a retain and
        // a release) is not loaded for it.
        if !listener.observerWantsAccessRecords, let counter = exchange.routed?.counter {
            return counter.add(status: exchange.status, bytesIn: exchange.bytesIn, bytesOut: exchange.bytesOut,
                               totalDuration: totalDuration, upstreamDuration: upstreamDuration)
        }
        guard let observer = listener.observer else { return }
        guard listener.observerWantsAccessRecords else {
            if let counter = exchange.routed?.requestCounter(observer: observer) {
                return counter.add(status: exchange.status, bytesIn: exchange.bytesIn, bytesOut: exchange.bytesOut,
                                   totalDuration: totalDuration, upstreamDuration: upstreamDuration)
            }
            return observer.requestCounted(RequestSample(
                route: exchange.routed?.route.name, upstream: exchange.routed?.upstream.name, status: exchange.status,
                bytesIn: exchange.bytesIn, bytesOut: exchange.bytesOut,
                totalDuration: totalDuration, upstreamDuration: upstreamDuration))
        }
        let head = exchange.head
        let path = head?.pathWithoutQuery ?? ""
        let target = exchange.target.flatMap { t in exchange.routed.map { $0.upstream.targetLabels[t] } }
        observer.requestCompleted(AccessRecord(
            startTime: exchange.wallStart, requestID: exchange.id, listener: listener.name,
            clientAddress: clientIP, method: head?.method.rawValue ?? "", path: path,
            route: exchange.routed?.route.name, upstream: exchange.routed?.upstream.name,
            upstreamTarget: target, status: exchange.status, bytesIn: exchange.bytesIn,
            bytesOut: exchange.bytesOut, totalDuration: totalDuration,
            upstreamDuration: upstreamDuration, attempts: exchange.attempts, tls: tls))
    }

}
