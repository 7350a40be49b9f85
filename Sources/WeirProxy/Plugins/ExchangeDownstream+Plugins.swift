import NIOCore
import NIOHTTP1
import WeirLua

// The plugin phases on the data path (HTTP/1.1 connections and HTTP/2
// streams alike, through ExchangeDownstream). The exchange calls in here only when its loop's generation has plugins (`loopContext.plugins`
// is nil otherwise), so a config without plugins never touches Lua.
//
//   accept ─ connection phase (global plugins; reject = close)
//   head routed ─ request phase (may exit: that response, upstream skipped,
//                 after the response phase ran on it)
//   upstream head ─ response phase (status/header changes, may exit)
//   response sent / request aborted ─ log phase, then the scope is finished
// The phases' callbacks hold the handler (or HTTP/2 stream) strongly until
// the phase's future completes, never weakly: a weak reference gives the
// handler a side table for life, and then every retain and release of it
// takes the Swift runtime's slow path (BENCHMARKS.md core5, strong5). A
// phase still waiting when the request ends completes, failed, when its
// scope is finished (PluginRequest.finish, from ExchangePlugins.endScope),
// so no callback outlives the request.

/// Tells a future's callback whether it ran inline (the future was already
/// complete) or later. Used on one event loop only.
private final class SynchronousOutcome: @unchecked Sendable {
    var synchronous = true
    var result: PhaseResult?
}

extension DownstreamHandler {
    /// After accept: runs the global connection-phase plugins.
    func startConnectionPlugins(_ plugins: LoopPlugins) {
        guard let chain = plugins.connectionChain else { return }
        let connection = ConnectionPlugins(connectionID: loopContext.requestIDs.next(), clientIP: clientIP,
                                           clientPort: peerAddress?.port ?? 0, tls: tls,
                                           localPort: context.channel.localAddress?.port, listenerName: listener.name)
        connectionPlugins = connection
        let channel = context.channel
        let logger = loopContext.logger
        var decided = false
        // `self` held until the phase ends, not weakly: a plugin waiting
        // here (weir.sleep, weir.http) holds it until its wait ends, even
        // after the client left (no cycle: only the wait holds the future).
        connection.begin(plugins).runConnectionPhase(chain: chain).whenSuccess { result in
            decided = true
            if connection.phasePending {
                connection.phasePending = false
                if case .continue = result { self.resumeReadingIfAllowed() }
            }
            switch result {
            case .continue: break
            case .exit(let exit):
                logger.debug("connection rejected by a plugin", metadata: ["reason": "\(exit.bodyString ?? "")"])
                channel.close(promise: nil)
            case .failed(let failure):
                logger.error("plugin failed", metadata: ["plugin": "\(failure.plugin)", "phase": "connection",
                                                         "message": "\(failure.message)", "traceback": "\(failure.traceback ?? "")"])
                channel.close(promise: nil)
            }
        }
        // Completed already unless a plugin waits (weir.sleep, weir.http).
        if !decided { connection.phasePending = true }
    }

}

extension ExchangeDownstream {
    /// The route has a chain: run the request phase, then go upstream (or answer).
    /// `routed` and `head` are the exchange's (held by the caller: read
    /// again from its properties they cost a retain and a release each).
    func startRequestPlugins(_ exchange: Exchange, routed: RoutedRequest, head: RequestHead, plugins: LoopPlugins,
                             chain: RouteChain, path: String?, query: Substring) {
        // First request on this connection under a newer generation (a
        // reload happened since accept): that generation's connection phase
        // runs first, so `weir.conn` is filled by the plugins now in force.
        if let connectionChain = plugins.connectionChain, connectionPlugins?.scope?.runtime !== plugins.runtime {
            let connection = connectionPlugins ?? ConnectionPlugins(connectionID: loopContext.requestIDs.next(),
                                                                    clientIP: clientIP, clientPort: peerAddress?.port ?? 0,
                                                                    tls: tls, localPort: localAddress?.port,
                                                                    listenerName: listener.name)
            connectionPlugins = connection
            connection.close()
            let outcome = SynchronousOutcome()
            connection.begin(plugins).runConnectionPhase(chain: connectionChain).whenSuccess { result in
                if outcome.synchronous { outcome.result = result; return }
                guard self.exchange === exchange, !exchange.finished else { return }
                if case .continue = result {
                    self.startRequestPlugins(exchange, routed: routed, head: head, plugins: plugins, chain: chain,
                                             path: path, query: query)
                } else {
                    self.closeDownstream()
                }
            }
            outcome.synchronous = false
            guard let decided = outcome.result else { return }    // a plugin waits; resumed above
            guard case .continue = decided else {
                closeDownstream()
                return
            }
        }
        // The upstream head is materialised only when a plugin reads or
        // changes it (ExchangePlugins.materializeUpstreamHead); otherwise the
        // client's head bytes are forwarded with the proxy's edits, as
        // without plugins.
        // Moved into the exchange and used borrowed from there (the exchange,
        // which the caller holds, keeps it: nothing ends the exchange while
        // the phase runs). A local reference besides it cost a retain and a
        // release per request.
        let made = beginRequestPlugins(plugins, chain: chain, exchange: exchange, path: path, query: query)
        let borrowed = Unmanaged.passUnretained(made)
        exchange.plugins = consume made
        switch borrowed._withUnsafeGuaranteedRef({ $0.start(.request, chain: chain.chain) }) {
        case .done(.continue) where exchange.routed === routed:
            // No plugin picked another upstream (set_upstream, set_target):
            // the first attempt with what the caller already holds.
            startAttempt(exchange, routed: routed, head: head, excluding: nil)
        case .done(let result):
            requestPhaseEnded(exchange, result)
        case .pending(let future):
            // The callback holds it: it may outlive the exchange's reference.
            let scope = borrowed.takeUnretainedValue()
            scope.phasePending = true
            future.whenSuccess { result in
                scope.phasePending = false
                guard self.exchange === exchange, !exchange.finished else { return }
                self.requestPhaseEnded(exchange, result)
            }
        }
    }

    /// The request's plugin side: on an HTTP/1.1 connection its last
    /// request's, kept by the connection (`DownstreamHandler.sparePlugins`)
    /// when it is of this generation and nothing else holds it; otherwise
    /// one of the loop's spares or a new one.
    @inline(__always)
    private func beginRequestPlugins(_ plugins: LoopPlugins, chain: RouteChain, exchange: Exchange,
                                     path: String?, query: Substring) -> ExchangePlugins {
        // Decided at compile time: this function is specialised per downstream type.
        guard Self.self == DownstreamHandler.self else {
            return plugins.beginRequest(chain: chain, handler: self, exchange: exchange, path: path, query: query,
                                        connection: connectionPlugins?.scope)
        }
        let connection = unsafeDowncast(self, to: DownstreamHandler.self)
        // Of another generation only if a reload happened since it was kept
        // (LoopContext.plugins drops them, endScope keeps none of a retired one).
        // Moved out of the optional when returned: a `var` bound to it was
        // copied for the return (a retain and a release per request).
        // Not bound to a `let` either: that reference would make it not unique.
        var spare = connection.sparePlugins.take()
        if spare != nil, spare!.isOf(plugins), isKnownUniquelyReferenced(&spare) {
            spare!.restart(chain: chain, exchange: exchange, path: path, query: query, connection: connectionPlugins?.scope)
            return spare.take()!
        }
        let scope = plugins.beginRequest(chain: chain, handler: self, exchange: exchange, path: path, query: query,
                                         connection: connectionPlugins?.scope)
        scope.connectionHandler = Unmanaged.passUnretained(connection)
        return scope
    }

    private func requestPhaseEnded(_ exchange: Exchange, _ result: PhaseResult) {
        switch result {
        case .continue:
            // A consumer named by an auth plugin switched the chain to the
            // consumer's inside the phase (PluginRequest.consumerChain).
            startAttempt(exchange, excluding: nil)
            // Parts that arrived while the phase ran are written by useConnection.
        case .exit(let exit):
            sendPluginExit(exchange, exit)
        case .failed(let failure):
            pluginFailed(exchange, failure)
        }
    }

    /// The upstream's response head, before anything is sent downstream.
    /// True when the head is to be relayed now with the plugins' changes
    /// (`plugins.relayChanges`, then `recycleRelayChanges`); false when the
    /// plugins answered instead or are still running (the head is relayed
    /// when they finish). The head stays in its bytes: plugins' header
    /// changes are an edit list (PluginHeadEdits.swift).
    func runResponsePlugins(_ head: HTTP1ResponseHead, exchange: Exchange, plugins: ExchangePlugins,
                            connection: UpstreamConnection) -> Bool {
        // Only the request phase's response header changes (or a body
        // filter's re-framing) to apply: no Lua to enter.
        guard plugins.runsResponse else {
            plugins.prepareRelayWithoutResponsePhase(head)
            return true
        }
        plugins.beginUpstreamResponse(head)
        switch plugins.start(.response, chain: plugins.chain) {
        case .done(let result):
            return responsePhaseEnded(exchange, plugins: plugins, result: result, connection: connection)
        case .pending(let future):
            holdResponse(until: future, exchange: exchange, plugins: plugins, connection: connection) { downstream, result in
                guard downstream.responsePhaseEnded(exchange, plugins: plugins, result: result,
                                                    connection: connection) else { return false }
                downstream.relayWireResponseHead(head, pluginChanges: &plugins.relayChanges, exchange: exchange)
                plugins.recycleRelayChanges()
                return true
            }
            return false
        }
    }

    /// A response-side phase (response or body filter) yielded: hold what
    /// the upstream sends meanwhile (bounded: its reads pause); when the
    /// phase ends, `apply` writes its result (false: the exchange ended
    /// there), then the held parts are relayed and reading resumes.
    private func holdResponse(until future: EventLoopFuture<PhaseResult>, exchange: Exchange,
                              plugins: ExchangePlugins, connection: UpstreamConnection,
                              apply: @escaping (Self, PhaseResult) -> Bool) {
        plugins.holdingResponse = true
        plugins.phasePending = true
        connection.handler.pauseReading()
        future.whenSuccess { result in
            plugins.phasePending = false
            guard self.exchange === exchange, !exchange.finished else { return }
            plugins.holdingResponse = false
            let held = plugins.heldParts
            plugins.heldParts.removeAll()
            guard apply(self, result) else { return }
            for part in held where self.exchange === exchange { self.upstreamRead(part, on: connection) }
            self.flushDownstream()
            connection.handler.resumeReading()
        }
    }

    private func responsePhaseEnded(_ exchange: Exchange, plugins: ExchangePlugins, result: PhaseResult,
                                    connection: UpstreamConnection) -> Bool {
        switch result {
        case .continue:
            plugins.endUpstreamResponse(relay: true)
            return true
        case .exit(let exit):
            plugins.endUpstreamResponse(relay: false)
            dropUpstream(exchange, connection)
            sendPluginExit(exchange, exit, runResponsePhase: false)
        case .failed(let failure):
            plugins.endUpstreamResponse(relay: false)
            dropUpstream(exchange, connection)
            pluginFailed(exchange, failure)
        }
        return false
    }

    /// The upstream response will not be relayed: its connection is out of step.
    private func dropUpstream(_ exchange: Exchange, _ connection: UpstreamConnection) {
        if exchange.connection === connection { exchange.connection = nil }
        connection.close()
    }

    /// A plugin raised: 500 with the request id (the proxy's error shape).
    private func pluginFailed(_ exchange: Exchange, _ failure: PluginFailure) {
        exchange.plugins?.logFailure(.failed(failure))
        failBeforeResponse(exchange, .pluginFailed, "plugin \(failure.plugin) failed in the \(failure.phase.rawValue) phase")
    }

    /// Sends a plugin's early-exit response (the upstream is skipped or dropped).
    /// After an exit from the request phase the chain's `response` phase
    /// runs on the exit's head first (as Kong runs header_filter after
    /// `kong.response.exit`). `runResponsePhase` is false when the exit came
    /// from a response phase already: that phase is never run twice, so an
    /// exit there just replaces the response once.
    private func sendPluginExit(_ exchange: Exchange, _ exit: PluginExit, runResponsePhase: Bool = true) {
        endBalancerAttempt(exchange)
        exchange.pendingUpstream.removeAll()
        exchange.discardingBody = true
        if !exchange.requestEnded && exchange.bodyForwarded { exchange.keepAlive = false }
        if !exchange.requestEnded && exchange.framing.expectsContinue && exchange.framing.hasBody { exchange.keepAlive = false }
        exchange.plugins?.exitStatus = exit.status
        let close = closesAfter(exchange)
        let version = exchange.head?.version ?? .http1_1
        var headers = HTTPHeaders()
        for field in exit.headers where !Self.isFramingHeader(field.name) { headers.add(name: field.name, value: field.value) }
        exchange.plugins?.applyEarlyResponseOps(to: &headers)
        let body = exit.body ?? []
        if Self.exitBodyAllowed(exchange, status: exit.status) || !body.isEmpty {
            headers.replaceOrAdd(name: "content-length", value: String(body.count))
        }
        headers.replaceOrAdd(name: "x-request-id", value: exchange.id)
        if close {
            headers.replaceOrAdd(name: "connection", value: "close")
        } else if version.major == 1 && version.minor == 0 {
            headers.replaceOrAdd(name: "connection", value: "keep-alive")
        }
        if !headers.contains(name: "date") { headers.add(name: "date", value: loopContext.dateCache.current()) }
        let head = HTTPResponseHead(version: version.minor == 0 ? .http1_0 : .http1_1,
                                    status: HTTPResponseStatus(statusCode: exit.status), headers: headers)
        guard runResponsePhase, let plugins = exchange.plugins else {
            return writePluginExit(exchange, head: head, body: body, close: close)
        }
        plugins.responseHead = head
        switch plugins.start(.response, chain: plugins.chain) {
        case .done(let result):
            exitResponsePhaseEnded(exchange, plugins: plugins, result: result, body: body, close: close)
        case .pending(let future):
            plugins.phasePending = true
            future.whenSuccess { result in
                plugins.phasePending = false
                guard self.exchange === exchange, !exchange.finished else { return }
                self.exitResponsePhaseEnded(exchange, plugins: plugins, result: result, body: body, close: close)
            }
        }
    }

    /// The response phase ran on an exit's head: send what it left, or its
    /// own exit (without another response phase), or the proxy's 500.
    private func exitResponsePhaseEnded(_ exchange: Exchange, plugins: ExchangePlugins, result: PhaseResult,
                                        body: [UInt8], close: Bool) {
        let head = plugins.responseHead
        plugins.responseHead = nil
        switch result {
        case .continue:
            guard var head else { return }
            plugins.exitStatus = Int(head.status.code)
            var body = body
            // A plugin turned it into a status that has no body.
            if !Self.exitBodyAllowed(exchange, status: Int(head.status.code)) && exchange.head?.method != .HEAD {
                body = []
                head.headers.remove(name: "content-length")
            }
            writePluginExit(exchange, head: head, body: body, close: close)
        case .exit(let exit):
            sendPluginExit(exchange, exit, runResponsePhase: false)
        case .failed(let failure):
            pluginFailed(exchange, failure)
        }
    }

    private static func exitBodyAllowed(_ exchange: Exchange, status: Int) -> Bool {
        exchange.head?.method != .HEAD && status != 204 && status != 304
    }

    /// Writes an exit response. As in Kong, the chain's body filters run
    /// over a non-empty exit body first (one chunk, marked last); the head's
    /// Content-Length is then set to what they left.
    private func writePluginExit(_ exchange: Exchange, head: HTTPResponseHead, body: [UInt8], close: Bool,
                                 bodyFiltered: Bool = false) {
        if !bodyFiltered, let plugins = exchange.plugins, plugins.filtersBody, !body.isEmpty,
           Self.exitBodyAllowed(exchange, status: Int(head.status.code)) {
            let finish: (PhaseResult) -> Void = { result in
                guard self.exchange === exchange, !exchange.finished else { return }
                switch result {
                case .continue:
                    var head = head
                    let filtered = plugins.bodyChunk
                    head.headers.replaceOrAdd(name: "content-length", value: String(filtered.count))
                    self.writePluginExit(exchange, head: head, body: filtered, close: close, bodyFiltered: true)
                case .exit:
                    self.loopContext.logger.error("plugin exit in the body_filter phase of an exit response: ignored",
                                                  metadata: ["request_id": "\(exchange.id)"])
                    self.writePluginExit(exchange, head: head, body: body, close: close, bodyFiltered: true)
                case .failed(let failure):
                    self.pluginFailed(exchange, failure)
                }
            }
            switch plugins.filterBody(body, isLast: true, chain: plugins.chain) {
            case .done(let result): finish(result)
            case .pending(let future):
                plugins.phasePending = true
                future.whenSuccess { result in
                    plugins.phasePending = false
                    finish(result)
                }
            }
            return
        }
        let status = Int(head.status.code)
        exchange.status = status
        exchange.responseStarted = true
        exchange.localResponseDone = true
        exchange.upstreamResponseEnded = true
        var bodyBuffer: ByteBuffer? = nil
        if Self.exitBodyAllowed(exchange, status: status) && !body.isEmpty {
            exchange.bytesOut += body.count
            bodyBuffer = allocator.buffer(bytes: body)
        }
        if close { exchange.requestEnded = true }
        let endPromise: EventLoopPromise<Void>? = close ? eventLoop.makePromise() : nil
        writeLocalResponse(head, body: bodyBuffer, exchange: exchange, promise: endPromise)
        if exchange.requestEnded {
            finishExchange(exchange, afterWrite: endPromise?.futureResult)
        } else {
            resumeReadingIfAllowed()
        }
    }

    // MARK: body_filter

    /// One upstream body part through the chain's body filters.
    func filterResponseBody(_ buffer: ByteBuffer, exchange: Exchange, plugins: ExchangePlugins, connection: UpstreamConnection) {
        runBodyFilter(Array(buffer.readableBytesView), isLast: false, exchange: exchange, plugins: plugins,
                      connection: connection) {}
    }

    /// The upstream's end: the filters see a last (empty) chunk, then the response ends.
    func filterLastChunk(_ trailers: HTTP1Fields?, exchange: Exchange, plugins: ExchangePlugins, connection: UpstreamConnection) {
        runBodyFilter([], isLast: true, exchange: exchange, plugins: plugins, connection: connection) {
            plugins.lastChunkFiltered = true
            self.upstreamRead(.end(trailers), on: connection)
        }
    }

    private func runBodyFilter(_ bytes: [UInt8], isLast: Bool, exchange: Exchange, plugins: ExchangePlugins,
                               connection: UpstreamConnection, then: @escaping () -> Void) {
        switch plugins.filterBody(bytes, isLast: isLast, chain: plugins.chain) {
        case .done(let result):
            if bodyFilterEnded(result, exchange: exchange, plugins: plugins, connection: connection) { then() }
        case .pending(let future):
            holdResponse(until: future, exchange: exchange, plugins: plugins, connection: connection) { downstream, result in
                guard downstream.bodyFilterEnded(result, exchange: exchange, plugins: plugins,
                                                 connection: connection) else { return false }
                then()
                return true
            }
        }
    }

    /// Writes what the filters left of the chunk. A filter that fails (or
    /// tries to exit) mid-body can only cut the response: the head is out.
    private func bodyFilterEnded(_ result: PhaseResult, exchange: Exchange, plugins: ExchangePlugins,
                                 connection: UpstreamConnection) -> Bool {
        switch result {
        case .continue:
            let chunk = plugins.bodyChunk
            if !chunk.isEmpty {
                exchange.bytesOut += chunk.count
                writeResponseBody(allocator.buffer(bytes: chunk), exchange: exchange)
                if !downstreamIsWritable { connection.handler.pauseReading() }
            }
            return true
        case .exit:
            loopContext.logger.error("plugin exit in the body_filter phase: the response has started, so it is cut",
                                     metadata: ["request_id": "\(exchange.id)"])
        case .failed:
            plugins.logFailure(result)
        }
        dropUpstream(exchange, connection)
        closeDownstream()
        return false
    }

    private static func isFramingHeader(_ name: String) -> Bool {
        switch name.lowercased() {
        case "content-length", "transfer-encoding", "connection", "keep-alive": return true
        default: return false
        }
    }
}
