import NIOCore
import NIOHTTP1
import WeirCore
import WeirLua

extension Exchange {
    /// The upstream's retries, or a plugin's `weir.upstream.set_retries`.
    @inline(__always)
    func retries(_ routed: RoutedRequest) -> Int {
        plugins?.retriesOverride ?? routed.upstream.config.retries
    }

    /// A target chosen by `weir.upstream.set_target` (first attempt only;
    /// a retry goes through the balancer).
    @inline(__always)
    func pinnedTarget(excluding: Int?) -> Int? {
        guard let pinned = plugins?.pinnedTarget, excluding == nil else { return nil }
        return pinned
    }

    /// The upstream's timeouts, or a plugin's `weir.upstream.set_timeouts`.
    @inline(__always)
    func timeouts(_ routed: RoutedRequest) -> UpstreamTimeouts {
        var timeouts = plugins?.timeoutsOverride ?? routed.upstream.config.timeouts
        // gRPC travels over HTTP/2 upstreams only: a client's grpc-timeout
        // bounds the whole exchange (answered DEADLINE_EXCEEDED in gRPC form).
        if routed.upstream.config.upstreamProtocol == .http2, let deadline = grpc?.deadline {
            timeouts.request = min(timeouts.request ?? deadline, deadline)
        }
        return timeouts
    }
}

/// The plugin side of one request, one object: the plugin scope (its
/// `PluginRequest` superclass: coroutine, weir.ctx, the phase runner), the
/// `PluginRequestContext` the Lua SDK calls into (itself: lazily, headers
/// are read from the request head only when a plugin asks), and the
/// generation it is pinned to.
///
/// Reused: a request that ended with every phase run to its end leaves
/// this object in its loop's spares (`LoopPlugins.takeBack`), and a later
/// request of that loop and generation starts on it (`begin`) instead of
/// allocating one. Being its own context, it has no scope <-> context
/// link to set and clear per request. Every per-request property is reset
/// in `resetRequestState`.
final class ExchangePlugins: PluginRequest, PluginRequestContext {
    /// Pins the generation: its Lua state lives while this request does
    /// (nil while waiting in the spares, which its `LoopPlugins` holds).
    private(set) var loopPlugins: LoopPlugins!
    /// The route's chain; replaced by the consumer's full chain once an auth
    /// plugin names a consumer that has plugins of its own.
    private(set) var chain: PluginChain {
        didSet { (runsResponse, runsLog) = (chain.runs(.response), chain.runs(.log)) }
    }
    /// `chain` has response / log plugins: flags set with it, because asking
    /// the chain on every response and request end retained it and its lists.
    private(set) var runsResponse: Bool
    private(set) var runsLog: Bool
    /// The chain has a body_filter: the response is re-framed (chunked) and
    /// each upstream body part goes through it.
    private(set) var filtersBody: Bool
    var routeName: String { exchange.routed?.route.name ?? "" }
    var lastChunkFiltered = false
    /// The scope was finished (`endScope`): it serves no more phases of this request.
    private var scopeEnded = false
    /// Strong, not weak: a weak reference would give the handler a side
    /// table for life, and every retain and release of it would take the
    /// runtime's slow path (BENCHMARKS.md strong5). The cycle it makes
    /// (handler -> exchange -> this -> handler) is broken in `endScope`,
    /// which every end of the request reaches (`requestDone`; an abandoned
    /// phase's callback completes with `.failed` when `finish` runs).
    private var handler: (any ExchangeDownstream)?
    /// The HTTP/1.1 connection whose request this is (the same object as
    /// `handler`, typed: nil for an HTTP/2 stream). Unretained: used only
    /// while `handler` holds it, and then borrowed (a strong local of it
    /// cost a retain and a release). A finished request's object is kept by
    /// that connection for its next request (`endScope`), which then starts
    /// on it with `handler` and `loopPlugins` already in place (`restart`).
    var connectionHandler: Unmanaged<DownstreamHandler>?
    /// Strong: a log phase that waits (weir.http) still reads the request
    /// after the handler dropped the exchange. The cycle through
    /// `exchange.plugins` is broken when the scope is finished.
    private var exchange: Exchange!
    /// The routed path (normalized, without the query); nil when the
    /// request target as received is that path, made into a String only
    /// when a plugin asks (`path`: a String of the target per request cost
    /// ~440 instructions).
    private var routedPath: String?
    private var query: Substring
    /// The request path (`weir.request.get_path`).
    var path: String {
        if let routedPath { return routedPath }
        let made = exchange.head?.uri ?? ""
        routedPath = made
        return made
    }

    /// Response header changes made before a response exists (request
    /// phase); applied to whatever response is finally sent.
    private var pendingResponseHeaders = PendingResponseHeaders()
    /// The upstream's response head while the response phase runs on it,
    /// and the phase's changes as edits on its bytes (PluginHeadEdits.swift).
    private(set) var upstreamResponse: HTTP1ResponseHead?
    private var upstreamResponseChanges = ResponseHeadChanges()
    /// The changes the upstream's head is relayed with, kept here and lent
    /// to the relay (`inout`), then emptied (`recycleRelayChanges`):
    /// storage reused request after request, no value made, returned and
    /// destroyed per response (its Optional's destroy went through the
    /// type's metadata, ~170 instructions). Always `.some`: an optional
    /// because the relay's parameter is one (nil without plugins).
    var relayChanges: ResponseHeadChanges? = ResponseHeadChanges()
    /// A proxy-made head (a plugin's exit) while the response phase runs on it.
    var responseHead: HTTPResponseHead?
    /// Status of an early exit (what the log phase sees).
    var exitStatus: Int?
    /// The response phase is waiting on an async call: upstream parts are held.
    var holdingResponse = false
    var heldParts: [UpstreamResponsePart] = []
    private(set) var consumer: String?
    private var done = false
    /// When the response was done (the log phase's durations end here, not
    /// when a log plugin asks).
    private var finishedAt: NIODeadline?
    /// The listener's name, kept for a log phase that runs after the handler
    /// left (set when the log phase starts).
    private var listenerName: String?
    /// A phase is suspended on an async SDK call (sleep, http).
    var phasePending = false

    enum HeaderOp { case set, add, clear }

    init(loopPlugins: LoopPlugins, chain: RouteChain, handler: any ExchangeDownstream, exchange: Exchange,
         path: String?, query: Substring, connection: PluginConnection?) {
        self.loopPlugins = loopPlugins
        self.chain = chain.chain
        self.runsResponse = chain.chain.runs(.response)
        self.runsLog = chain.chain.runs(.log)
        self.filtersBody = chain.filtersBody
        self.handler = handler
        self.exchange = exchange
        self.routedPath = path
        self.query = query
        loopPlugins.runtime.willBeginRequest()
        super.init(runtime: loopPlugins.runtime, request: nil, connection: Self.connectionScope(connection, loopPlugins))
        adoptAsOwnContext(self)
        // Once: a spare serves only requests of the same `LoopPlugins`.
        if loopPlugins.hasConsumerPlugins {
            // Unowned: the closure is this object's and only it calls it (a
            // weak capture would give this object a side table, see `handler`).
            consumerChain = { [unowned(unsafe) self] consumer in self.chainForConsumer(consumer) }
        }
    }

    /// A connection scope from an older generation belongs to another Lua state.
    private static func connectionScope(_ connection: PluginConnection?, _ loopPlugins: LoopPlugins) -> PluginConnection? {
        connection?.runtime === loopPlugins.runtime ? connection : nil
    }

    /// Starts another request on a spare (`LoopPlugins.takeBack`): its
    /// scope, still attached, is restarted for it.
    func begin(loopPlugins: LoopPlugins, chain: RouteChain, handler: any ExchangeDownstream, exchange: Exchange,
               path: String?, query: Substring, connection: PluginConnection?) {
        precondition(scopeEnded && self.exchange == nil, "only a spare can begin another request")
        self.loopPlugins = loopPlugins
        self.handler = handler
        restart(chain: chain, exchange: exchange, path: path, query: query, connection: connection)
    }

    /// Whether this finished object is of `loopPlugins`' generation (a
    /// connection's spare: `DownstreamHandler.sparePlugins`). By number: an
    /// identity test of the two references retained and released one.
    @inline(__always)
    func isOf(_ loopPlugins: LoopPlugins) -> Bool {
        self.loopPlugins.generation == loopPlugins.generation
    }

    /// Starts its connection's next request on a connection's spare (see
    /// `isOf`): `handler` and `loopPlugins` are already this request's.
    @inline(__always)
    func restart(chain: RouteChain, exchange: Exchange, path: String?, query: Substring, connection: PluginConnection?) {
        precondition(scopeEnded && self.exchange == nil && handler != nil, "only a kept spare can restart")
        if self.chain !== chain.chain { self.chain = chain.chain }
        filtersBody = chain.filtersBody
        self.exchange = exchange
        // Stored only when either is set (a nil or "" store over nil or ""
        // still calls release).
        if path != nil || routedPath != nil { routedPath = path }
        if !query.isEmpty || !self.query.isEmpty { self.query = query }
        scopeEnded = false
        // Tested in place, not through a closure (`flatMap`: its context and
        // temporaries cost three releases per request).
        if let connection, connection.runtime === loopPlugins.runtime {
            restartOwnRequest(connection: connection)
        } else {
            restartOwnRequest(connection: nil)
        }
    }

    /// Back to what a new object starts with: every property that one
    /// request sets (the SDK's overrides, response changes, exit, consumer,
    /// log-phase bookkeeping). Called when a finished request's object goes
    /// to the spares, so a reused one carries nothing over (`endScope` has
    /// taken `exchange` and `loopPlugins` out).
    private func resetRequestState() {
        // What holds memory is released only when set: a nil store of an
        // optional still destroys the old value (~350 instructions for all).
        lastChunkFiltered = false
        if hasPendingResponseHeaders {
            pendingResponseHeaders = PendingResponseHeaders()
            hasPendingResponseHeaders = false
        }
        if upstreamResponse != nil { upstreamResponse = nil }
        // upstreamResponseChanges: started fresh by beginUpstreamResponse.
        if responseHead != nil { responseHead = nil }
        exitStatus = nil
        holdingResponse = false
        if !heldParts.isEmpty { heldParts.removeAll() }
        if consumer != nil { consumer = nil }
        done = false
        finishedAt = nil
        if listenerName != nil { listenerName = nil }
        phasePending = false
        if bodyWaiter != nil { bodyWaiter = nil }
        upstreamFramingEdited = false
        if hasUpstreamLines {
            upstreamLines.reset()
            hasUpstreamLines = false
        }
        if upstreamMethod != nil { upstreamMethod = nil }
        pinnedTarget = nil
        timeoutsOverride = nil
        retriesOverride = nil
        connectTimeoutOverride = nil
    }


    /// After the response went out (or the request was abandoned): the log
    /// phase, then the scope is released. Never delays the client: the
    /// response is already written when this runs.
    func requestDone(at now: NIODeadline) {
        guard !done else { return }
        done = true
        finishedAt = now
        cancelBodyWait()
        holdingResponse = false
        // Emptied only when it holds parts: removeAll on an empty array
        // still releases its storage (a call per request).
        if !heldParts.isEmpty { heldParts.removeAll() }
        if phasePending {
            // Aborted while a plugin waits: no log phase (the chain is mid-
            // phase); finish() abandons the coroutine and releases weir.ctx.
            return endScope(reusable: false)
        }
        // No log plugin (the common chain): nothing to start.
        guard runsLog else { return endScope(reusable: true) }
        listenerName = handler?.listener.name
        // The access record's start, made only for a log phase (makeExchange
        // sets it only for the access log).
        if exchange.wallStart == 0, let clock = handler?.loopContext.clock {
            exchange.wallStart = clock.wallSeconds(at: exchange.started)
        }
        switch start(.log, chain: chain) {
        case .done(let result):
            logFailure(result)
            endScope(reusable: true)
        case .pending(let future):
            future.whenComplete { [self] result in
                if case .success(let r) = result { logFailure(r) }
                endScope(reusable: false)
            }
        }
    }

    /// Finishes the plugin scope and lets go of this request (the cycle
    /// through `exchange.plugins` is broken here). A request whose phases
    /// all ran to their end goes to the loop's spares (`LoopPlugins.takeBack`;
    /// reused only once nothing else holds it); one abandoned mid-phase is
    /// left to whatever still holds it.
    private func endScope(reusable: Bool) {
        guard !scopeEnded else { return }
        scopeEnded = true
        finish()
        guard reusable else {
            // The handler let go of here, whatever holds this object after
            // (a waiting callback): it holds the handler strongly.
            _ = handler.take()
            connectionHandler = nil
            exchange.plugins = nil
            return
        }
        // Both moved out, not read and then cleared (a retain and a release
        // each, per request).
        let exchange = self.exchange.take()!
        // The exchange's reference to this object (requestDone's caller
        // reached it through it and holds it until we return) is moved
        // into the spares, not released here and retained again there.
        var held = exchange.plugins.take()
        detach()
        resetRequestState()
        // Kept by its HTTP/1.1 connection while it is open and this
        // generation is the loop's (an idle connection must not pin a
        // retired Lua state): `handler` and `loopPlugins` stay for its next
        // request. That makes a cycle (handler -> sparePlugins -> handler),
        // broken when the connection closes or is tunnelled (channelInactive,
        // handlerRemoved) or a reload replaces the generation (LoopContext.plugins).
        if let connectionHandler, !loopPlugins.retired, connectionHandler._withUnsafeGuaranteedRef({ $0.registered }) {
            if held !== self { held = self }
            // Moved in (the slot is empty: its request took it out).
            connectionHandler._withUnsafeGuaranteedRef { swap(&$0.sparePlugins, &held) }
            return
        }
        // Otherwise to the loop's spares: whatever holds it there must not
        // hold the handler.
        _ = handler.take()
        connectionHandler = nil
        let loopPlugins = self.loopPlugins.take()!
        if let held, held === self { loopPlugins.takeBack(held) } else { loopPlugins.takeBack(self) }
    }

    func logFailure(_ result: PhaseResult) {
        guard case .failed(let failure) = result else { return }
        handler?.loopContext.logger.error("plugin failed", metadata: [
            "plugin": "\(failure.plugin)", "phase": "\(failure.phase.rawValue)", "request_id": "\(exchange.id)",
            "message": "\(failure.message)", "traceback": "\(failure.traceback ?? "")",
        ])
    }

    /// Nothing for the response phase to do on an upstream head: no plugin
    /// implements it, no body filter re-frames the response and the request
    /// phase left no response header changes.
    var responsePhaseIsNoop: Bool { !hasPendingResponseHeaders && !filtersBody && !runsResponse }
    /// `pendingResponseHeaders` is not empty (a flag: asking the struct
    /// retains and releases its arrays on every response).
    private var hasPendingResponseHeaders = false

    /// Applies the request phase's response header changes to `headers`.
    func applyEarlyResponseOps(to headers: inout HTTPHeaders) {
        guard hasPendingResponseHeaders else { return }
        pendingResponseHeaders.apply(to: &headers)
        pendingResponseHeaders = PendingResponseHeaders()
        hasPendingResponseHeaders = false
    }

    /// The response phase starts on the upstream's head: the request
    /// phase's response header changes become its first edits.
    func beginUpstreamResponse(_ head: HTTP1ResponseHead) {
        upstreamResponse = head
        upstreamResponseChanges = takePendingResponseChanges(on: head.fields)
    }

    /// The upstream's head when no response phase runs (`runsResponse`
    /// false: rate-limiting's lines, set in the request phase): the request
    /// phase's response header changes made into the head's edits at once,
    /// in `relayChanges`, without keeping a copy of the head or passing the
    /// changes through `upstreamResponseChanges` (begin + end cost a copy
    /// and a destroy of each, ~400 instructions per response). Same result
    /// as `beginUpstreamResponse` then `endUpstreamResponse`.
    func prepareRelayWithoutResponsePhase(_ head: HTTP1ResponseHead) {
        relayChanges!.take(&pendingResponseHeaders, on: head.fields, keepingWire: true)
        hasPendingResponseHeaders = false
        reframeForBodyFilter(&relayChanges!, head: head)
    }

    /// The request phase's response header changes, moved out (the
    /// pending set is left empty for the next request).
    private func takePendingResponseChanges(on fields: HTTP1Fields) -> ResponseHeadChanges {
        let changes = ResponseHeadChanges(taking: &pendingResponseHeaders, on: fields)
        hasPendingResponseHeaders = false
        return changes
    }

    /// A body filter changes the body's length, so the upstream's
    /// Content-Length cannot be relayed: the body is re-framed.
    private func reframeForBodyFilter(_ changes: inout ResponseHeadChanges, head: HTTP1ResponseHead) {
        if filtersBody { changes.removeFields(named: "content-length", in: head.fields) }
    }

    /// The relayed head's changes are spent: the storage of their added
    /// lines (and wire lines) goes back to the pending response headers
    /// for the next request (rate-limiting's lines: one array allocated and
    /// freed per response otherwise), and `relayChanges` is empty again.
    func recycleRelayChanges() {
        if !hasPendingResponseHeaders {
            relayChanges!.withAddedStorage { pendingResponseHeaders.reuseStorage(&$0, wire: &$1) }
        }
        relayChanges!.empty()
    }

    /// The response phase is over: its edits to the upstream's head (a
    /// body filter re-frames the body, so its length goes) become
    /// `relayChanges` when the head is to be relayed (`relay`).
    func endUpstreamResponse(relay: Bool) {
        if relay {
            // Swapped, not copied: `upstreamResponseChanges` takes the empty
            // ones (beginUpstreamResponse replaces them).
            swap(&relayChanges!, &upstreamResponseChanges)
            if let head = upstreamResponse { reframeForBodyFilter(&relayChanges!, head: head) }
        }
        upstreamResponse = nil
    }

    private func applyResponseOp(_ op: HeaderOp, _ name: String, _ value: String, to changes: inout ResponseHeadChanges,
                                 in fields: HTTP1Fields) {
        switch op {
        case .set: changes.setField(name, value, in: fields)
        case .add: changes.addField(name, value)
        case .clear: changes.removeFields(named: name, in: fields)
        }
    }

    // MARK: PluginRequestContext: the downstream request

    var requestID: String { exchange.id }
    var method: String { exchange.head?.method.rawValue ?? "" }
    var rawQuery: String? { query.isEmpty ? nil : String(query.dropFirst()) }
    var scheme: String { handler?.listener.scheme ?? "http" }
    var host: String? { exchange.hostHeader }
    func requestHeader(_ lowercasedName: String) -> String? { exchange.head?.headers.first(name: lowercasedName) }
    func withRequestHeader(_ lowercasedName: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        lowercasedName.withContiguousUTF8 { withRequestHeader(nameBytes: UnsafeRawBufferPointer($0), body) }
    }
    /// `withRequestHeader` of a name given as its (lower-case) UTF-8 bytes.
    /// On the head itself: `head.headers` would copy the fields (their
    /// buffer and index retained and released per call). Both borrowed,
    /// not retained (this object holds the exchange, which holds its head).
    func withRequestHeader(nameBytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer?) -> Void) {
        guard let exchange = exchange.map(Unmanaged.passUnretained) else { return body(nil) }
        exchange._withUnsafeGuaranteedRef { exchange in
            guard let head = exchange.head.map(Unmanaged.passUnretained) else { return body(nil) }
            head._withUnsafeGuaranteedRef { $0.wire.fields.withFirstValue(named: nameBytes, body) }
        }
    }
    func requestHeaders() -> [(name: String, value: String)] {
        exchange.head?.headers.map { (name: $0.name.lowercased(), value: $0.value) } ?? []
    }

    struct BodyUnavailable: Error, CustomStringConvertible {
        var description: String { "weir.request.get_body: the request body was already sent upstream" }
    }

    /// A plugin waits in weir.request.get_body: the client is read (into
    /// `exchange.pendingUpstream`, forwarded later as usual) until the body
    /// ends or `maxBytes` are buffered.
    private(set) var bodyWaiter: (promise: EventLoopPromise<[UInt8]?>, maxBytes: Int)?

    func readRequestBody(maxBytes: Int) -> EventLoopFuture<[UInt8]?> {
        if exchange.bodyless { return loopPlugins.loop.makeSucceededFuture(nil) }
        if exchange.connection != nil || exchange.bodyForwarded || exchange.discardingBody {
            return loopPlugins.loop.makeFailedFuture(BodyUnavailable())
        }
        let promise = loopPlugins.loop.makePromise(of: [UInt8]?.self)
        bodyWaiter = (promise, maxBytes)
        requestBodyArrived()
        if bodyWaiter != nil { handler?.resumeReadingIfAllowed() }
        return promise.futureResult
    }

    /// Called by the handler as request body parts are buffered.
    func requestBodyArrived() {
        guard let waiter = bodyWaiter else { return }
        var body: [UInt8] = []
        var ended = false
        for part in exchange.pendingUpstream {
            switch part {
            case .body(.byteBuffer(let buffer)): body.append(contentsOf: buffer.readableBytesView)
            case .end: ended = true
            default: break
            }
        }
        guard ended || body.count >= waiter.maxBytes else { return }
        bodyWaiter = nil
        if body.count > waiter.maxBytes { body.removeLast(body.count - waiter.maxBytes) }
        waiter.promise.succeed(body)
    }

    /// The request ended before the body was read (client gone).
    func cancelBodyWait() {
        guard let waiter = bodyWaiter else { return }
        bodyWaiter = nil
        waiter.promise.succeed(nil)
    }

    // MARK: The client

    var clientIP: String { handler?.clientIP ?? "" }
    var clientPort: Int { handler?.peerAddress?.port ?? 0 }
    var tls: TLSConnectionInfo? { handler?.tls }
    /// The route's name read once (get_route: twice was ~40 instructions more).
    var matchedRouteName: String? {
        let name = routeName
        return name.isEmpty ? nil : name
    }
    func authenticate(consumer: String, credential: String?) { self.consumer = consumer }

    /// Once an auth plugin names a consumer that has plugins of its own, the
    /// request's chain becomes the consumer's full chain (route, upstream
    /// and global plugins with the consumer's configs winning): the rest of
    /// the request phase and every later phase run it (see
    /// `PluginRequest.consumerChain`).
    private func chainForConsumer(_ consumer: String) -> PluginChain? {
        guard let chains = loopPlugins.chains(route: routeName, consumer: consumer) else { return nil }
        chain = chains.full.chain
        filtersBody = chains.full.filtersBody
        return chains.full.chain
    }

    // MARK: The upstream request (request phase)

    /// The upstream head's edit list (the proxy's own edits, then the
    /// plugins'), built the first time a plugin reads or changes the
    /// upstream request; the head itself stays the client's bytes and is
    /// written by range copy as on a route without plugins (see
    /// PluginHeadEdits.swift).
    @discardableResult
    private func makeUpstreamEdits() -> Bool {
        let exchange = self.exchange!   // one load of the var (each costs a retain and a release)
        if exchange.upstreamEdits != nil { return true }
        guard let handler, let head = exchange.head, let routed = exchange.routed else { return false }
        exchange.upstreamEdits = handler.upstreamEdits(exchange, head: head, routed: routed)
        if hasUpstreamLines {
            // Header changes made before the list: after the proxy's own lines, as they would have been.
            upstreamLines.move(into: &exchange.upstreamEdits!)
            hasUpstreamLines = false
        }
        return true
    }

    /// Plugins' upstream header changes while there is no edit list (the
    /// proxy's own lines still written as bytes): names the proxy gives no
    /// meaning to (PluginUpstreamLines).
    private(set) var upstreamLines = PluginUpstreamLines()
    /// `upstreamLines` is not empty (a flag: asking the struct would copy it).
    private(set) var hasUpstreamLines = false

    /// The client's lines of `name` when a change of that name can go to
    /// `upstreamLines` (no edit list yet, a name the proxy gives no meaning
    /// to); nil: it goes to the edit list.
    /// (The exchange is read here only, not held across the change: see
    /// `clientLines(named:_:)`.)
    @inline(__always)
    private func upstreamLinesChange(_ name: String) -> HTTP1FieldSet? {
        guard let exchange = exchange.map(Unmanaged.passUnretained) else { return nil }
        return exchange._withUnsafeGuaranteedRef { exchange in
            guard exchange.upstreamEdits == nil, let head = exchange.head.map(Unmanaged.passUnretained),
                  HTTP1KnownField.classify(name) == .other else { return nil }
            return head._withUnsafeGuaranteedRef { $0.fieldSet(named: name, kind: .other) }
        }
    }

    /// `upstreamLinesChange` of a name given as its (lower-case) UTF-8
    /// bytes, for a head of at most 64 lines (else nil): the client's lines
    /// of the name as one word (`HTTP1FieldSet.low`). A set returned (with
    /// its empty array) cost a release per call.
    @inline(__always)
    private func upstreamLinesChange(_ name: UnsafeRawBufferPointer) -> UInt64? {
        guard let exchange = exchange.map(Unmanaged.passUnretained), let n = name.baseAddress, name.count > 0 else { return nil }
        return exchange._withUnsafeGuaranteedRef { exchange in
            guard exchange.upstreamEdits == nil, let head = exchange.head.map(Unmanaged.passUnretained),
                  HTTP1KnownField.classify(n.assumingMemoryBound(to: UInt8.self), name.count) == .other else { return nil }
            return head._withUnsafeGuaranteedRef { $0.wire.fields.otherFieldLines(named: name) }
        }
    }

    /// The upstream head with the proxy's own lines as bytes and
    /// `upstreamLines` after them (serializeUpstreamHead, while there is no
    /// edit list); the client lines either side removed are left out.
    /// `upstreamLines` is read in place: passed as an argument (or swapped
    /// into a temporary) the struct's arrays were retained and released
    /// per request.
    func writeUpstreamHead(_ head: RequestHead, own: UpstreamOwnFields, target: String?, into out: inout ByteBuffer) {
        let entries = head.wire.fields.entries
        // Under 64 client lines (the usual head) both removed sets are one
        // word each: or'ed into a new set without copying own's (a retain
        // and release of its word array) or a formUnion call.
        var removed = HTTP1FieldSet()
        if own.removed.high.isEmpty && upstreamLines.removed.high.isEmpty {
            removed.low = own.removed.low | upstreamLines.removed.low
        } else {
            removed = own.removed
            removed.low |= upstreamLines.removed.low
            if !upstreamLines.removed.high.isEmpty { removed.formUnionHigh(upstreamLines.removed.high) }
        }
        let edits = HTTP1HeadEdits(removed: removed, target: target)
        HTTP1HeadWriter.writeRequest(head.wire, edits: edits, method: nil,
                                     tailBytes: own.byteCount(entries) + upstreamLines.byteCount, into: &out) { w, src in
            own.write(&w, entries, src)
            self.upstreamLines.withBytes { added in
                if let base = added.baseAddress { w.copy(base, added.count) }
            }
        }
    }

    // The client's lines of the name are looked up on the head itself
    // (RequestHead.fieldSet): `head.headers` would be a copy of its fields,
    // their buffer and index retained and released per call.
    func setUpstreamHeader(_ name: String, _ value: String) {
        if let lines = upstreamLinesChange(name) {
            upstreamLines.set(name, value, clientLines: lines)
            hasUpstreamLines = true
            return
        }
        let exchange = self.exchange!
        guard makeUpstreamEdits(), let lines = exchange.head?.fieldSet(named: name) else { return }
        noteFramingEdit(name)
        exchange.upstreamEdits!.replaceFields(named: name, lines: lines, with: value)
    }
    /// `setUpstreamHeader` with the name's and value's UTF-8 bytes (the
    /// SDK's set_header lends them): a line for `upstreamLines` is copied
    /// from them, not from the Strings.
    /// (A head of more than 64 lines takes the String path: its set of
    /// client lines is more than one word.)
    func setUpstreamHeader(_ name: String, _ value: String, nameBytes: UnsafeRawBufferPointer, valueBytes: UnsafeRawBufferPointer) {
        if let lines = upstreamLinesChange(nameBytes) {
            upstreamLines.set(name, nameBytes: nameBytes, valueBytes: valueBytes, clientLines: lines)
            hasUpstreamLines = true
            return
        }
        setUpstreamHeader(name, value)
    }
    func addUpstreamHeader(_ name: String, _ value: String) {
        if upstreamLinesChange(name) != nil {
            upstreamLines.add(name, value)
            hasUpstreamLines = true
            return
        }
        guard makeUpstreamEdits() else { return }
        noteFramingEdit(name)
        exchange.upstreamEdits!.addField(name, value)
    }
    func clearUpstreamHeader(_ name: String) {
        if let lines = upstreamLinesChange(name) {
            upstreamLines.clear(name, clientLines: lines)
            hasUpstreamLines = true
            return
        }
        let exchange = self.exchange!
        guard makeUpstreamEdits(), let lines = exchange.head?.fieldSet(named: name) else { return }
        noteFramingEdit(name)
        exchange.upstreamEdits!.removeFields(named: name, lines: lines)
    }

    /// `withRequestHeader` then `clearUpstreamHeader` of the same name
    /// (identify_header_credential hiding its key header). While the clear
    /// goes to `upstreamLines` (no edit list, a name the proxy gives no
    /// meaning to), one pass over the client's lines finds both the value
    /// and the lines to drop: no second pass, classify or call.
    func withRequestHeaderClearing(_ lowercasedName: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        // Borrowed, not retained (as in `upstreamLinesChange`); `body` runs
        // before `upstreamLines` changes.
        let lines: HTTP1FieldSet? = exchange.map(Unmanaged.passUnretained)?._withUnsafeGuaranteedRef { exchange in
            guard exchange.upstreamEdits == nil, let head = exchange.head.map(Unmanaged.passUnretained),
                  HTTP1KnownField.classify(lowercasedName) == .other else { return nil }
            return head._withUnsafeGuaranteedRef { $0.wire.fields.otherFieldSet(named: lowercasedName, firstValue: body) }
        }
        guard let lines else {
            withRequestHeader(lowercasedName, body)
            return clearUpstreamHeader(lowercasedName)
        }
        upstreamLines.clear(lowercasedName, clientLines: lines)
        hasUpstreamLines = true
    }

    /// `weir.client.identify`: the consumer, then X-Consumer-Name set (or
    /// only cleared: `nameFits` false) and X-Anonymous-Consumer set to
    /// "true" or cleared, as `setUpstreamHeader`/`clearUpstreamHeader` of
    /// each would. Both are names the proxy gives no meaning to, so while
    /// there is no edit list both changes go to `upstreamLines` after one
    /// pass over the client's lines for the two names (no classify of the
    /// constant names, the exchange and head loaded once): key-auth and
    /// every auth plugin call it per request.
    func identify(consumer: String, credential: String?, nameFits: Bool, anonymous: Bool) {
        authenticate(consumer: consumer, credential: credential)
        let nameField = PluginIdentityFields.consumerName, anonymousField = PluginIdentityFields.anonymousConsumer
        guard let (nameLines, anonymousLines) = clientLines(named: nameField, anonymousField) else {
            if nameFits { setUpstreamHeader(nameField, consumer) } else { clearUpstreamHeader(nameField) }
            if anonymous { setUpstreamHeader(anonymousField, "true") } else { clearUpstreamHeader(anonymousField) }
            return
        }
        // Both cleared before either is added: a clear with no added line is
        // inlined to almost nothing (PluginUpstreamLines.clear).
        upstreamLines.clear(nameField, clientLines: nameLines)
        upstreamLines.clear(anonymousField, clientLines: anonymousLines)
        if nameFits { upstreamLines.add(nameField, consumer) }
        if anonymous { upstreamLines.add(anonymousField, "true") }
        hasUpstreamLines = true
    }

    /// The client's lines of two names the proxy gives no meaning to, while
    /// there is no edit list (nil: there is one). The exchange and head are
    /// only read here, before `upstreamLines` changes: held across those
    /// changes they were retained and released per call.
    @inline(__always)
    private func clientLines(named first: String, _ second: String) -> (HTTP1FieldSet, HTTP1FieldSet)? {
        assert(HTTP1KnownField.classify(first) == .other && HTTP1KnownField.classify(second) == .other)
        // Borrowed, not retained: `self.exchange` holds the exchange, which holds its head.
        guard let exchange = exchange.map(Unmanaged.passUnretained) else { return nil }
        return exchange._withUnsafeGuaranteedRef { exchange in
            guard exchange.upstreamEdits == nil, let head = exchange.head.map(Unmanaged.passUnretained) else { return nil }
            return head._withUnsafeGuaranteedRef { $0.otherFieldSets(named: first, second) }
        }
    }

    /// A plugin's edit of a Transfer-Encoding line decides whether the
    /// upstream body is chunked (see `upstreamFramingEdited`).
    @inline(__always)
    private func noteFramingEdit(_ name: String) {
        if name.utf8.count == 17 && name.equalsIgnoringASCIICase("transfer-encoding") { upstreamFramingEdited = true }
    }

    /// The upstream request target so far (the routed one until a plugin changes it).
    private var upstreamTarget: String? {
        guard makeUpstreamEdits() else { return nil }
        return exchange.upstreamEdits!.target ?? exchange.head?.uri
    }

    private func setUpstreamTarget(_ target: String, by function: String) {
        guard isValidRequestTarget(target) else {
            handler?.loopContext.logger.warning("\(function): the request target would contain a space or control character; unchanged",
                                                metadata: ["request_id": "\(exchange.id)"])
            return
        }
        exchange.upstreamEdits!.target = target
    }

    func setUpstreamPath(_ path: String) {
        guard let uri = upstreamTarget else { return }
        let query = uri.firstIndex(of: "?").map { uri[$0...] } ?? ""
        setUpstreamTarget(path + query, by: "weir.upstream.request.set_path")
    }

    func setUpstreamQuery(_ query: String?) {
        guard let uri = upstreamTarget else { return }
        let path = uri.firstIndex(of: "?").map { String(uri[..<$0]) } ?? uri
        setUpstreamTarget((query?.isEmpty ?? true) ? path : path + "?" + query!, by: "weir.upstream.request.set_query")
    }

    func upstreamRequestHeaders() -> [(name: String, value: String)] {
        guard makeUpstreamEdits(), let fields = exchange.head?.headers else { return requestHeaders() }
        return exchange.upstreamEdits!.fieldPairs(in: fields)
    }

    var upstreamRawQuery: String {
        guard let uri = upstreamTarget else { return rawQuery ?? "" }
        return uri.firstIndex(of: "?").map { String(uri[uri.index(after: $0)...]) } ?? ""
    }

    func setUpstreamMethod(_ method: String) {
        guard makeUpstreamEdits() else { return }
        guard HeadSerialization.isToken(method) else {
            handler?.loopContext.logger.warning("weir.upstream.request.set_method: '\(method)' is not a method token; unchanged",
                                                metadata: ["request_id": "\(exchange.id)"])
            return
        }
        upstreamMethod = method
        upstreamFramingEdited = true
    }

    /// A plugin changed the upstream request's method (`set_method`) or
    /// what frames its body (`set_body`, a Transfer-Encoding line): the
    /// head is then written with `upstreamMethod` and its chunking read
    /// from the edits (serializeUpstreamHead). Other header and target
    /// edits keep the plain path (the client's method and framing).
    private(set) var upstreamFramingEdited = false
    /// `set_method`'s method (the writer's `method`).
    private(set) var upstreamMethod: String?

    /// Request phase only (before the upstream connection exists): the
    /// upstream gets `body` with its Content-Length; the client's own body
    /// (if any) is read and dropped.
    func setUpstreamBody(_ body: [UInt8]) {
        guard exchange.connection == nil, !exchange.bodyForwarded, makeUpstreamEdits(),
              let fields = exchange.head?.headers else {
            handler?.loopContext.logger.warning("weir.upstream.request.set_body after the request was sent; body unchanged",
                                                metadata: ["request_id": "\(exchange.id)"])
            return
        }
        var buffer = ByteBufferAllocator().buffer(capacity: body.count)
        buffer.writeBytes(body)
        exchange.replacementBody = buffer
        upstreamFramingEdited = true
        exchange.upstreamEdits!.removeFields(named: "transfer-encoding", in: fields)
        exchange.upstreamEdits!.setField("content-length", String(body.count), in: fields)
    }

    /// The target index `set_target` picked in `exchange.routed`'s upstream.
    private(set) var pinnedTarget: Int?

    /// Only configured targets (of this route's upstream first, else of any
    /// upstream, which then serves the request): connection pools, TLS and
    /// health exist per configured target, and an address a plugin took from
    /// client input must not reach any host the gateway can (SSRF). Anything
    /// else is refused (false, logged) and the balancer decides.
    func setUpstreamTarget(host: String, port: Int) -> Bool {
        guard let routed = exchange.routed, let handler else { return false }
        let upstreams = [routed.upstream] + routed.routing.runtime.upstreams.filter { $0 !== routed.upstream }
        for upstream in upstreams {
            if let index = upstream.config.targets.firstIndex(where: { $0.address.host == host && $0.address.port == port }) {
                if upstream !== routed.upstream {
                    exchange.routed = RoutedRequest(route: routed.route, upstream: upstream, forwardURI: routed.forwardURI,
                                                    routing: routed.routing)
                }
                pinnedTarget = index
                return true
            }
        }
        handler.loopContext.logger.warning("weir.upstream.set_target: \(host):\(port) is not a configured target; refused",
                                           metadata: ["request_id": "\(exchange.id)"])
        return false
    }

    func setUpstream(named name: String) -> Bool {
        guard let routed = exchange.routed,
              let upstream = routed.routing.runtime.upstreams.first(where: { $0.name == name }) else { return false }
        exchange.routed = RoutedRequest(route: routed.route, upstream: upstream, forwardURI: routed.forwardURI,
                                        routing: routed.routing)
        return true
    }

    /// Per-request overrides of the upstream's timeouts and retries.
    private(set) var timeoutsOverride: UpstreamTimeouts?
    private(set) var retriesOverride: Int?

    /// The connect timeout of this request's new upstream connections
    /// (`weir.upstream.set_timeouts`); nil = the upstream's.
    private(set) var connectTimeoutOverride: TimeAmount?

    /// `connect` applies to the connections this request opens (a pooled
    /// keep-alive connection is already connected), `send` is the write
    /// timeout, `read` the read timeout.
    func setUpstreamTimeouts(connect: Double?, send: Double?, read: Double?) {
        guard let routed = exchange.routed else { return }
        if let connect { connectTimeoutOverride = .nanoseconds(Int64(connect * 1e9)) }
        var timeouts = timeoutsOverride ?? routed.upstream.config.timeouts
        if let send { timeouts.write = TimeSpan(nanoseconds: Int64(send * 1e9)) }
        if let read { timeouts.read = TimeSpan(nanoseconds: Int64(read * 1e9)) }
        timeoutsOverride = timeouts
    }

    func setUpstreamRetries(_ retries: Int) { retriesOverride = max(0, retries) }

    // MARK: The response

    var responseStatus: Int? {
        if let head = upstreamResponse { return upstreamResponseChanges.status?.code ?? head.status }
        if let head = responseHead { return Int(head.status.code) }
        return exitStatus ?? (exchange.status == 0 ? nil : exchange.status)
    }

    func setResponseStatus(_ status: Int) {
        if upstreamResponse != nil {
            let reason = HTTPResponseStatus(statusCode: status).reasonPhrase
            upstreamResponseChanges.status = (status, HeadSerialization.isValidFieldValue(reason) ? reason : "")
        } else {
            responseHead?.status = HTTPResponseStatus(statusCode: status)
        }
    }

    func responseHeader(_ name: String) -> String? {
        if let head = upstreamResponse { return upstreamResponseChanges.edits.firstValue(named: name, in: head.fields) }
        return responseHead?.headers.first(name: name)
    }

    func responseHeaders() -> [(name: String, value: String)] {
        if let head = upstreamResponse { return upstreamResponseChanges.edits.fieldPairs(in: head.fields) }
        return responseHead?.headers.map { (name: $0.name.lowercased(), value: $0.value) } ?? []
    }

    func setResponseHeader(_ name: String, _ value: String) { responseOp(.set, name, value) }
    func addResponseHeader(_ name: String, _ value: String) { responseOp(.add, name, value) }
    func clearResponseHeader(_ name: String) { responseOp(.clear, name, "") }
    /// Before any response exists (the request phase) the lines go into the
    /// pending changes at once; later, one `set` each.
    func setResponseHeaders(_ lines: PreparedHeaderLines, wire: UnsafeRawBufferPointer) {
        guard upstreamResponse == nil, responseHead == nil else {
            return PreparedHeaderLines.forEachLine(inWire: wire) { responseOp(.set, $0, $1) }
        }
        pendingResponseHeaders.set(lines, wire: wire)
        hasPendingResponseHeaders = !pendingResponseHeaders.isEmpty
    }

    // MARK: The access record (log phase)

    func accessRecord() -> PluginAccessRecord? {
        let end = finishedAt ?? .now()
        let head = exchange.head
        let path: String
        if let uri = head?.uri {
            path = uri.firstIndex(of: "?").map { String(uri[..<$0]) } ?? uri
        } else {
            path = ""
        }
        let target = exchange.target.flatMap { t in exchange.routed.map { $0.upstream.targetLabels[t] } }
        return PluginAccessRecord(
            startTime: exchange.wallStart, listener: handler?.listener.name ?? listenerName ?? "", clientAddress: clientIP,
            method: head?.method.rawValue ?? "", path: path, route: exchange.routed?.route.name,
            upstream: exchange.routed?.upstream.name, upstreamTarget: target,
            status: exchange.status != 0 ? exchange.status : (exitStatus ?? 0), bytesIn: exchange.bytesIn, bytesOut: exchange.bytesOut,
            totalDuration: Double((end - exchange.started).nanoseconds) / 1e9,
            upstreamDuration: exchange.upstreamStart.map { Double((end - $0).nanoseconds) / 1e9 },
            attempts: exchange.attempts)
    }

    private func responseOp(_ op: HeaderOp, _ name: String, _ value: String) {
        if let head = upstreamResponse {
            return applyResponseOp(op, name, value, to: &upstreamResponseChanges, in: head.fields)
        }
        guard responseHead != nil else {
            switch op {
            case .set: pendingResponseHeaders.set(name, value)
            case .add: pendingResponseHeaders.add(name, value)
            case .clear: pendingResponseHeaders.clear(name)
            }
            hasPendingResponseHeaders = !pendingResponseHeaders.isEmpty
            return
        }
        switch op {
        case .set: responseHead!.headers.replaceOrAdd(name: name, value: value)
        case .add: responseHead!.headers.add(name: name, value: value)
        case .clear: responseHead!.headers.remove(name: name)
        }
    }
}

/// The plugin side of one downstream connection: its connection-phase
/// scope (`conn.data`, read by request phases as `weir.conn`).
final class ConnectionPlugins: PluginConnectionContext {
    let connectionID: String
    let clientIP: String
    let clientPort: Int
    let tls: TLSConnectionInfo?
    var serverName: String? { tls?.serverName }
    let localPort: Int?
    let listenerName: String?
    private(set) var scope: PluginConnection?
    /// The connection phase waits on an async call: no request is read
    /// until it has decided (a plugin may reject the connection).
    var phasePending = false

    init(connectionID: String, clientIP: String, clientPort: Int, tls: TLSConnectionInfo?,
         localPort: Int? = nil, listenerName: String? = nil) {
        self.connectionID = connectionID
        self.clientIP = clientIP
        self.clientPort = clientPort
        self.tls = tls
        self.localPort = localPort
        self.listenerName = listenerName
    }

    func begin(_ plugins: LoopPlugins) -> PluginConnection {
        let scope = plugins.runtime.beginConnection(self)
        self.scope = scope
        return scope
    }

    func close() {
        scope?.close()
        scope = nil
    }
}
