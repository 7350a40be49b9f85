import Atomics
import Logging
import NIOCore
import NIOPosix
import WeirCore
import WeirLua
#if canImport(Glibc)
import Glibc
#endif

/// One tcp/tls listener connection, from accept to the last side closing
/// (see StreamListener.swift for the picture). Lives on the loop that
/// accepted the connection; its two `StreamSideHandler`s call in here.
final class StreamSession {
    enum Side { case client, upstream }

    enum State {
        /// tls: buffering until the ClientHello is complete.
        case readingHello
        /// The connection phase runs, then the upstream is chosen.
        case deciding
        case connecting
        case relaying
        /// Failed or ended before the relay: both sides are being closed.
        case closing
    }

    /// Reads start at 16 KiB (a TLS record) and grow to 64 KiB for bulk
    /// transfers; buffers are handed to the other side as they are.
    static let receiveAllocator = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 16 * 1024, maximum: 64 * 1024)

    let loopContext: LoopContext
    let listener: ListenerRuntime
    /// The generation in force at accept: it serves this connection to its end.
    private let routing: LoopRouting
    private let streamRouting: StreamListenerRouting?
    private let plugins: LoopPlugins?
    private let settings: StreamSettings
    let client: Channel
    let clientHandler: StreamSideHandler
    private var upstreamHandler: StreamSideHandler?

    private var state: State
    /// Bytes from the client before the relay began (the ClientHello and
    /// anything after it): replayed to the upstream first.
    private var pending: ByteBuffer?
    private var hello: ClientHelloInfo?
    private var pluginChoice: UpstreamRuntime?
    private var upstream: UpstreamRuntime?
    private var target: Int?
    private var attempts = 0
    private var connectInFlight = false
    private var pluginConnection: PluginConnection?

    private var clientInputClosed = false
    private var clientClosed = false
    private var upstreamClosed = false
    private var relayed = false
    private var finished = false
    private var outcome: StreamRecord.Outcome?

    /// Relayed bytes (both ways) at the idle timer's last tick.
    private var relayedAtLastTick = 0
    private var idleTicks = 0
    private var idleTask: RepeatedTask?
    private var helloTimeout: Scheduled<Void>?

    /// Client bytes buffered before the relay and replayed upstream (the
    /// relayed ones are counted by the side handlers).
    private var bytesReplayed = 0
    private var counters: StreamCounters?
    private let startWall: Double
    private let startNanos: UInt64
    private var connectStartNanos: UInt64?
    private var connectDuration: Double?
    let connectionID: String
    let clientIP: String
    let clientPort: Int

    init(client: Channel, loopContext: LoopContext, listener: ListenerRuntime) {
        self.client = client
        self.loopContext = loopContext
        self.listener = listener
        self.routing = loopContext.routing
        self.streamRouting = routing.runtime.streamRouting[listener.name]
        self.plugins = loopContext.plugins
        self.settings = streamRouting?.listener.stream ?? listener.config.stream
        self.state = listener.config.protocol == .tls ? .readingHello : .deciding
        self.clientHandler = StreamSideHandler(side: .client)
        self.connectionID = loopContext.requestIDs.next()
        self.clientIP = client.remoteAddress?.ipAddress ?? ""
        self.clientPort = client.remoteAddress?.port ?? 0
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        self.startWall = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
        self.startNanos = NIODeadline.now().uptimeNanoseconds
        clientHandler.session = self
    }

    private var logger: Logger { loopContext.logger }

    /// When the client channel is active (not in the initializer: a channel
    /// closed before it is active never reports its close).
    func start() {
        loopContext.registerTunnel(client)
        listener.observer?.connectionOpened(listener: listener.name)
        if state == .readingHello {
            pending = client.allocator.buffer(capacity: 1024)
            helloTimeout = client.eventLoop.scheduleTask(in: .nanoseconds(settings.clientHelloTimeout.nanoseconds)) { [weak self] in
                guard let self, self.state == .readingHello else { return }
                self.logger.info("tls listener: no complete ClientHello in time; closing",
                                 metadata: ["listener": "\(self.listener.name)", "client": "\(self.clientIP)",
                                            "timeout": "\(self.settings.clientHelloTimeout)"])
                self.fail(.clientHelloTimeout)
            }
        } else {
            decide()
        }
    }

    // MARK: Deciding where the connection goes

    private func decide() {
        state = .deciding
        // tls: the ClientHello is in; nothing more is read until the
        // upstream is connected (tcp listeners start with reads off).
        clientHandler.setReading(false)
        guard let plugins, let chain = plugins.streamConnectionChains[listener.name] else {
            return connectionPhaseEnded(.continue)
        }
        let context = StreamConnectionContext(session: self, hello: hello, localPort: client.localAddress?.port)
        let connection = plugins.runtime.beginConnection(context)
        pluginConnection = connection
        connection.runConnectionPhase(chain: chain).whenSuccess { [weak self] result in
            self?.connectionPhaseEnded(result)
        }
    }

    /// `weir.upstream.set_upstream` in the connection phase.
    func choose(upstreamNamed name: String) -> String? {
        guard let upstream = routing.runtime.upstreams.first(where: { $0.name == name }) else {
            return "no upstream named '\(name)'"
        }
        pluginChoice = upstream
        return nil
    }

    private func connectionPhaseEnded(_ result: PhaseResult) {
        guard state == .deciding else { return }      // the client left meanwhile
        switch result {
        case .continue:
            guard let upstream = pluginChoice ?? streamRouting?.upstream(serverName: hello?.serverName) else {
                logger.info("tcp/tls listener: no upstream for this connection; closing",
                            metadata: ["listener": "\(listener.name)", "client": "\(clientIP)",
                                       "sni": "\(hello?.serverName ?? "-")"])
                return fail(.noUpstream)
            }
            self.upstream = upstream
            counters = listener.observer?.streamCounters(listener: listener.name, upstream: upstream.name)
            connect(excluding: nil)
        case .exit(let exit):
            logger.debug("connection rejected by a plugin", metadata: ["listener": "\(listener.name)", "client": "\(clientIP)",
                                                                       "reason": "\(exit.bodyString ?? "")"])
            fail(.rejected)
        case .failed(let failure):
            logger.error("plugin failed", metadata: ["plugin": "\(failure.plugin)", "phase": "connection",
                                                     "listener": "\(listener.name)", "message": "\(failure.message)",
                                                     "traceback": "\(failure.traceback ?? "")"])
            fail(.pluginFailed)
        }
    }

    // MARK: Connecting

    private func connect(excluding: Int?) {
        guard let upstream else { return fail(.noUpstream) }
        guard let target = routing.pickStreamTarget(upstream: upstream, clientIP: clientIP, excluding: excluding) else {
            logger.info("tcp/tls listener: every target of the upstream is unhealthy; closing",
                        metadata: ["listener": "\(listener.name)", "upstream": "\(upstream.name)"])
            return fail(.noTarget)
        }
        state = .connecting
        attempts += 1
        if connectStartNanos == nil { connectStartNanos = NIODeadline.now().uptimeNanoseconds }
        routing.balancerStarted(upstream: upstream, target: target)
        connectInFlight = true
        let address = upstream.config.targets[target].address
        let timeout = settings.connectTimeout ?? upstream.config.timeouts.connect
        let handler = StreamSideHandler(side: .upstream)
        handler.session = self
        let bootstrap = ClientBootstrap(group: client.eventLoop)
            .connectTimeout(.nanoseconds(timeout.nanoseconds))
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.recvAllocator, value: Self.receiveAllocator)
            // Reads start once relaying (`connected`).
            .channelOption(.autoRead, value: false)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(handler) }
            }
        // An IP literal skips the resolver (and its happy-eyeballs machinery).
        let connecting: EventLoopFuture<Channel>
        if let ip = try? SocketAddress(ipAddress: address.host, port: address.port) {
            connecting = bootstrap.connect(to: ip)
        } else {
            connecting = bootstrap.connect(host: address.host, port: address.port)
        }
        connecting.whenComplete { [self] result in
            connectInFlight = false
            switch result {
            case .success(let channel):
                upstream.health.recordSuccess(target: target)
                guard state == .connecting else {
                    // The client went away while connecting.
                    routing.balancerFinished(upstream: upstream, target: target)
                    handler.session = nil
                    channel.close(promise: nil)
                    return finishIfDone()
                }
                connected(handler, target: target)
            case .failure(let error):
                handler.session = nil
                routing.balancerFinished(upstream: upstream, target: target)
                upstream.health.recordFailure(target: target)
                logger.debug("tcp/tls listener: upstream connect failed",
                             metadata: ["upstream": "\(upstream.name)", "target": "\(address)", "error": "\(error)"])
                guard state == .connecting else { return finishIfDone() }
                if attempts <= upstream.config.retries {
                    connect(excluding: target)
                } else {
                    logger.info("tcp/tls listener: could not connect to the upstream; closing",
                                metadata: ["listener": "\(listener.name)", "upstream": "\(upstream.name)",
                                           "target": "\(address)", "attempts": "\(attempts)", "error": "\(error)"])
                    fail(.connectFailed)
                }
            }
        }
    }

    private func connected(_ handler: StreamSideHandler, target: Int) {
        upstreamHandler = handler
        self.target = target
        if let start = connectStartNanos {
            connectDuration = Double(NIODeadline.now().uptimeNanoseconds - start) / 1e9
        }
        state = .relaying
        relayed = true
        counters?.active.wrappingIncrement(ordering: .relaxed)
        if let buffered = pending, buffered.readableBytes > 0 {
            bytesReplayed = buffered.readableBytes
            counters?.bytesIn.wrappingIncrement(by: buffered.readableBytes, ordering: .relaxed)
            handler.replay(buffered)
        }
        pending = nil
        // From here on each side hands its chunks straight to the other.
        clientHandler.liveBytes = counters?.bytesIn
        handler.liveBytes = counters?.bytesOut
        clientHandler.relay(to: handler)
        handler.relay(to: clientHandler)
        if clientInputClosed { shutOutput(of: handler) }
        startIdleTimer()
        handler.setReading(clientHandler.isWritable)
        clientHandler.setReading(handler.isWritable)
    }

    // MARK: Before and around the relay (called by the side handlers)

    /// Client bytes before the relay (the relay itself is the handlers').
    func received(_ buffer: ByteBuffer, from side: StreamSideHandler) {
        guard side === clientHandler, state == .readingHello || state == .deciding || state == .connecting else { return }
        var buffer = buffer
        if pending == nil { pending = client.allocator.buffer(capacity: buffer.readableBytes) }
        pending!.writeBuffer(&buffer)
        if state == .readingHello { parseHello() }
    }

    private func parseHello() {
        guard let buffered = pending else { return }
        let max = settings.maxClientHelloBytes
        switch ClientHelloParser.parse(buffered, maxBytes: max) {
        case .needMore:
            guard buffered.readableBytes >= max else { return }
            logger.info("tls listener: ClientHello exceeds max_client_hello; closing",
                        metadata: ["listener": "\(listener.name)", "client": "\(clientIP)", "limit": "\(max)"])
            fail(.badClientHello)
        case .complete(let info):
            hello = info
            helloTimeout?.cancel()
            helloTimeout = nil
            decide()
        case .invalid(let reason):
            logger.info("tls listener: bad ClientHello; closing",
                        metadata: ["listener": "\(listener.name)", "client": "\(clientIP)", "reason": "\(reason)"])
            fail(.badClientHello)
        }
    }

    /// Backpressure: a side whose queued writes passed the high-water mark
    /// stops the other side's reads until they drain below the low mark.
    /// (Only these crossings cost anything; a relayed chunk checks nothing.)
    func writabilityChanged(_ side: StreamSideHandler, isWritable: Bool) {
        guard state == .relaying else { return }
        if side === clientHandler { upstreamHandler?.setReading(isWritable) } else if side === upstreamHandler { clientHandler.setReading(isWritable) }
    }

    /// A FIN: passed on to the other side; the other direction keeps flowing.
    func inputClosed(_ side: StreamSideHandler) {
        if side === clientHandler {
            clientInputClosed = true
            switch state {
            case .readingHello:
                fail(.clientClosed)
            case .relaying:
                if let upstreamHandler { shutOutput(of: upstreamHandler) }
            case .deciding, .connecting, .closing:
                break           // passed on once connected (see `connected`)
            }
        } else if side === upstreamHandler {
            shutOutput(of: clientHandler)
        }
    }

    /// Sends a FIN once what is queued for that side has been written. (If
    /// that side's input is closed already, NIO turns this into a full
    /// close, which ends the connection.)
    private func shutOutput(of handler: StreamSideHandler) {
        guard let context = handler.context else { return }
        let channel = context.channel
        context.writeAndFlush(NIOAny(context.channel.allocator.buffer(capacity: 0))).whenComplete { _ in
            channel.close(mode: .output).whenFailure { _ in channel.close(promise: nil) }
        }
    }

    /// Closes a side once its queued writes are out (they are data the
    /// other side sent before it went away).
    private func closeAfterWrites(_ handler: StreamSideHandler) {
        guard let context = handler.context else { return }
        let channel = context.channel
        context.writeAndFlush(NIOAny(context.channel.allocator.buffer(capacity: 0))).whenComplete { _ in
            channel.close(promise: nil)
        }
    }

    func sideError(_ side: StreamSideHandler, _ error: Error) {
        logger.debug("tcp/tls listener: socket error", metadata: ["listener": "\(listener.name)",
                                                                  "side": "\(side === clientHandler ? "client" : "upstream")",
                                                                  "error": "\(error)"])
    }

    func sideClosed(_ side: StreamSideHandler) {
        if side === clientHandler {
            clientClosed = true
            switch state {
            case .relaying:
                if let upstreamHandler, !upstreamClosed { closeAfterWrites(upstreamHandler) }
            case .readingHello, .deciding, .connecting:
                if outcome == nil { outcome = .clientClosed }
                state = .closing
            case .closing:
                break
            }
        } else if side === upstreamHandler {
            upstreamClosed = true
            if !clientClosed { closeAfterWrites(clientHandler) }
        }
        finishIfDone()
    }

    /// Ends the connection before (or instead of) relaying.
    private func fail(_ outcome: StreamRecord.Outcome) {
        if self.outcome == nil { self.outcome = outcome }
        state = .closing
        helloTimeout?.cancel()
        client.close(promise: nil)
        upstreamHandler?.context?.close(promise: nil)
    }

    // MARK: Idle timeout

    private func startIdleTimer() {
        // Four ticks per timeout: a connection idle for the whole timeout
        // closes within 1.25x of it, and a busy one costs nothing per read
        // (the tick compares the handlers' byte counts).
        let tick = max(settings.idleTimeout.nanoseconds / 4, 5_000_000)
        idleTask = client.eventLoop.scheduleRepeatedTask(initialDelay: .nanoseconds(tick), delay: .nanoseconds(tick)) { [weak self] _ in
            guard let self else { return }
            let relayed = self.clientHandler.bytesRelayed &+ (self.upstreamHandler?.bytesRelayed ?? 0)
            if relayed != self.relayedAtLastTick {
                self.relayedAtLastTick = relayed
                self.idleTicks = 0
                return
            }
            self.idleTicks += 1
            if self.idleTicks >= 4 {
                self.logger.debug("tcp/tls listener: idle timeout", metadata: ["listener": "\(self.listener.name)",
                                                                               "client": "\(self.clientIP)"])
                self.outcome = self.outcome ?? .idleTimeout
                self.idleTask?.cancel()
                self.idleTask = nil
                self.client.close(promise: nil)
                self.upstreamHandler?.context?.close(promise: nil)
            }
        }
    }

    // MARK: The end

    private func finishIfDone() {
        guard !finished, clientClosed, !connectInFlight, upstreamHandler == nil || upstreamClosed else { return }
        finished = true
        idleTask?.cancel()
        idleTask = nil
        helloTimeout?.cancel()
        helloTimeout = nil
        if let upstream, let target, relayed { routing.balancerFinished(upstream: upstream, target: target) }
        let outcome = self.outcome ?? (relayed ? .closed : .clientClosed)
        if relayed { counters?.active.wrappingDecrement(ordering: .relaxed) }
        let counters = self.counters ?? listener.observer?.streamCounters(listener: listener.name, upstream: nil)
        counters?.ended(outcome)
        pluginConnection?.close()
        pluginConnection = nil
        loopContext.unregisterTunnel(client)
        listener.connectionClosed()
        if let observer = listener.observer {
            observer.connectionClosed(listener: listener.name)
            observer.streamCompleted(StreamRecord(
                startTime: startWall, connectionID: connectionID, listener: listener.name,
                protocolName: listener.config.protocol.rawValue,
                clientAddress: clientIP, serverName: hello?.serverName, alpn: hello?.alpn ?? [],
                upstream: upstream?.name, upstreamTarget: target.map { upstream!.targetLabels[$0] },
                outcome: outcome, bytesIn: bytesReplayed + clientHandler.bytesRelayed,
                bytesOut: upstreamHandler?.bytesRelayed ?? 0,
                duration: Double(NIODeadline.now().uptimeNanoseconds - startNanos) / 1e9,
                connectDuration: connectDuration, attempts: attempts))
        }
        // Break the session <-> handler and the two sides' cycles.
        clientHandler.session = nil
        clientHandler.relay(to: nil)
        upstreamHandler?.session = nil
        upstreamHandler?.relay(to: nil)
    }

    /// Over the listener's `max_connections`: closed at once, counted.
    static func refuseOverLimit(_ channel: Channel, listener: ListenerRuntime) {
        listener.observer?.streamCounters(listener: listener.name, upstream: nil)?.ended(.overLimit)
        channel.close(promise: nil)
    }
}

/// One side of a stream connection. Before the relay it forwards its
/// events to the session; while relaying it hands each chunk straight to
/// the other side's channel (`relayTo`) without going through the session.
/// Reads are switched with the channel's autoRead (off until relaying, and
/// while the other side cannot take more), so the handler is not on the
/// outbound path and a relayed chunk never asks whether it may be read.
///
/// The relay calls the channel's core (`write0`, `flush0`, `read0`)
/// directly: this handler is the only one in either pipeline, so the
/// pipeline's outbound path would only walk to the head handler, which
/// makes these same calls. Skipping that walk is ~1 k instructions per
/// relayed chunk (BENCHMARKS.md, "tcp" 2026-11-30). Anything that is not
/// the per-chunk relay (FIN, close) still goes through `context`.
final class StreamSideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let side: StreamSession.Side
    /// Cleared when the session ends (breaks the cycle).
    var session: StreamSession?
    /// The other side's channel core while relaying (set by the session,
    /// cleared at its end: it breaks the cycle between the two sides).
    private(set) var relayTo: ChannelCore?
    /// The live metrics counter of this side's direction (relaxed atomic).
    var liveBytes: ManagedAtomic<Int>?
    /// Bytes read from this side and relayed to the peer (the idle timer
    /// watches it move; the access record sums it at the end).
    private(set) var bytesRelayed = 0
    private(set) var context: ChannelHandlerContext?
    private var core: ChannelCore?
    /// What `setReading` last asked for: the relay re-arms a read only then.
    private var reading = false

    init(side: StreamSession.Side) { self.side = side }

    var isWritable: Bool { context?.channel.isWritable ?? false }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.core = context.channel._channelCore
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.core = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        if side == .client { session?.start() }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let relayTo else { return session?.received(unwrapInboundIn(data), from: self) ?? () }
        let count = unwrapInboundIn(data).readableBytes
        bytesRelayed &+= count
        liveBytes?.wrappingIncrement(by: count, ordering: .relaxed)
        relayTo.write0(data, promise: nil)      // the read's NIOAny as it is: no re-wrapping
    }

    /// The end of a read burst: one flush for what it relayed, and the next
    /// read asked for here (NIO's autoRead would ask through the pipeline).
    func channelReadComplete(context: ChannelHandlerContext) {
        guard let relayTo else { return }
        relayTo.flush0()
        if reading { core?.read0() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event { session?.inputClosed(self) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        session?.sideClosed(self)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        session?.sideError(self, error)
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        session?.writabilityChanged(self, isWritable: context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    /// Reads on or off (NIO stops or resumes epoll read interest; setting
    /// the value it already has does nothing).
    /// Starts (`to` the other side) or ends (`nil`) the relay.
    func relay(to other: StreamSideHandler?) {
        relayTo = other?.core
    }

    func setReading(_ on: Bool) {
        guard let context, let options = context.channel.syncOptions else { return }
        reading = on
        try? options.setOption(ChannelOptions.autoRead, value: on)
    }

    /// Bytes buffered before the relay began (the tls ClientHello and what
    /// followed it): written and flushed once the upstream is connected.
    func replay(_ buffer: ByteBuffer) {
        context?.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
    }
}

/// The connection as the connection phase of a tcp/tls listener sees it.
final class StreamConnectionContext: PluginConnectionContext {
    private weak var session: StreamSession?
    let connectionID: String
    let clientIP: String
    let clientPort: Int
    let serverName: String?
    let offeredALPN: [String]
    let localPort: Int?
    let listenerName: String?

    init(session: StreamSession, hello: ClientHelloInfo?, localPort: Int?) {
        self.session = session
        self.connectionID = session.connectionID
        self.clientIP = session.clientIP
        self.clientPort = session.clientPort
        self.serverName = hello?.serverName
        self.offeredALPN = hello?.alpn ?? []
        self.localPort = localPort
        self.listenerName = session.listener.name
    }

    func chooseUpstream(named name: String) -> String? {
        guard let session else { return "the connection is closed" }
        return session.choose(upstreamNamed: name)
    }
}
