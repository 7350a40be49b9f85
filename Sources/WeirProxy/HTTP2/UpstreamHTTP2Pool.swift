import NIOCore
import NIOPosix
import NIOHTTP2
import NIOTLS
import WeirCore

/// HTTP/2 connections to one target from one event loop (`protocol: http2`
/// upstreams). Owned by the target's `TargetPool`, which hands the exchange
/// one `UpstreamConnection` per request; here that is a stream on one of
/// these connections.
///
/// - A stream goes on the first connection with room: fewer active streams
///   than the smaller of our `max_concurrent_streams` and the server's
///   SETTINGS_MAX_CONCURRENT_STREAMS. Only when none has room (and fewer
///   than `max_connections` are open) is another connection opened; past
///   that, streams queue in swift-nio-http2 on the least busy connection.
/// - Requests arriving while a connection is still connecting reserve
///   slots on it. It is ready once the server's first SETTINGS arrives;
///   reservations past the limit it states then pick again, so a burst on
///   a new connection spreads like one on a known connection. (Opening
///   them at once would exceed the limit: the server enforces it only
///   after we ACK its SETTINGS.)
/// - GOAWAY: the connection takes no new streams; streams it accepted
///   finish; it closes when the last one ends. Streams above the GOAWAY's
///   last stream id are closed by swift-nio-http2, so their exchanges see
///   an upstream close and apply the usual retry rules (a stream on a
///   connection that had carried others counts as "reused", like an
///   HTTP/1.1 keep-alive connection whose close crossed the request).
/// - Connection loss closes every stream channel: each exchange gets a 502
///   (or a cut mid-response), as for HTTP/1.
final class UpstreamHTTP2Pool {
    private let loop: EventLoop
    private let host: String
    private let port: Int
    private let address: SocketAddress?
    private let config: UpstreamHTTP2Config
    private let connectTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private(set) var connections: [UpstreamHTTP2Connection] = []
    private var retired = false

    init(loop: EventLoop, host: String, port: Int, address: SocketAddress?, config: UpstreamHTTP2Config,
         connectTimeout: TimeAmount, idleTimeout: TimeAmount) {
        self.loop = loop
        self.host = host
        self.port = port
        self.address = address
        self.config = config
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout
    }

    /// Open (or connecting) HTTP/2 connections; for tests and metrics.
    var connectionCount: Int { connections.count }

    /// A new stream for one request, as an `UpstreamConnection` that
    /// reports to `targetPool` like an HTTP/1 connection.
    func openStream(for targetPool: TargetPool) -> EventLoopFuture<UpstreamConnection> {
        loop.preconditionInEventLoop()
        let connection = pickConnection(tls: targetPool.tls)
        // The slot is reserved now, so requests arriving before the
        // connection is ready count against it.
        connection.activeStreams += 1
        let stream = loop.makePromise(of: UpstreamConnection.self)
        connection.ready.whenComplete { result in
            switch result {
            case .failure(let error):
                // No stream channel exists, so no close will give the slot back.
                self.streamEnded(on: connection)
                stream.fail(error)
            case .success:
                // A new connection took reservations before the server's
                // SETTINGS told its stream limit. Those past the limit look
                // again (another connection with room, or a new one) rather
                // than queue on this one; with no alternative they stay and
                // queue in swift-nio-http2 as usual.
                if connection.activeStreams > self.streamLimit(of: connection) && self.hasRoomElsewhere(than: connection) {
                    self.streamEnded(on: connection)
                    stream.completeWith(self.openStream(for: targetPool))
                } else {
                    stream.completeWith(self.createStream(on: connection, for: targetPool))
                }
            }
        }
        return stream.futureResult
    }

    /// A stream channel on a ready connection (its slot already reserved).
    private func createStream(on connection: UpstreamHTTP2Connection,
                              for targetPool: TargetPool) -> EventLoopFuture<UpstreamConnection> {
        guard let multiplexer = connection.multiplexer else {
            streamEnded(on: connection)
            return loop.makeFailedFuture(ChannelError.ioOnClosedChannel)
        }
        // Streams before this one on the same connection make it "reused".
        let earlierStreams = connection.streamsOpened
        connection.streamsOpened += 1
        let promise = loop.makePromise(of: Channel.self)
        multiplexer.createStreamChannel(promise: promise) { streamChannel in
            do {
                try streamChannel.pipeline.syncOperations.addHandlers([
                    UpstreamHTTP2StreamCodec(scheme: connection.scheme), UpstreamHandler(),
                ])
                return streamChannel.eventLoop.makeSucceededVoidFuture()
            } catch {
                return streamChannel.eventLoop.makeFailedFuture(error)
            }
        }
        return promise.futureResult.flatMapThrowing { streamChannel in
            let sync = streamChannel.pipeline.syncOperations
            let handler = try sync.handler(type: UpstreamHandler.self)
            let codec = try sync.handler(type: UpstreamHTTP2StreamCodec.self)
            let upstream = UpstreamConnection(channel: streamChannel, handler: handler,
                                              targetIndex: targetPool.targetIndex, pool: targetPool)
            upstream.http2Stream = codec
            upstream.requestsSent = earlierStreams
            streamChannel.closeFuture.whenComplete { _ in self.streamEnded(on: connection) }
            return upstream
        }.flatMapErrorThrowing { error in
            // No stream channel exists, so no close will give the slot back.
            self.streamEnded(on: connection)
            throw error
        }
    }

    /// Concurrent streams a connection takes: the smaller of ours and the
    /// server's (unlimited until its SETTINGS arrive).
    private func streamLimit(of connection: UpstreamHTTP2Connection) -> Int {
        min(config.maxConcurrentStreams, connection.peerMaxStreams)
    }

    /// Whether a stream that does not fit on `connection` would go
    /// elsewhere: another connection has room, or another may be opened.
    private func hasRoomElsewhere(than connection: UpstreamHTTP2Connection) -> Bool {
        connections.count < config.maxConnections || connections.contains {
            $0 !== connection && $0.acceptsStreams && $0.activeStreams < streamLimit(of: $0)
        }
    }

    /// The first connection with room, else a new one, else the least busy.
    private func pickConnection(tls: (() -> UpstreamTLSContext?)?) -> UpstreamHTTP2Connection {
        var leastBusy: UpstreamHTTP2Connection?
        for connection in connections where connection.acceptsStreams {
            if connection.activeStreams < streamLimit(of: connection) {
                return connection
            }
            if leastBusy == nil || connection.activeStreams < leastBusy!.activeStreams { leastBusy = connection }
        }
        if connections.count < config.maxConnections || leastBusy == nil {
            return connect(tls: tls)
        }
        return leastBusy!
    }

    /// `tls`: the upstream's TLS context provider (TLS upstreams): the
    /// handshake offers ALPN `h2` and must end with the server choosing it.
    private func connect(tls: (() -> UpstreamTLSContext?)?) -> UpstreamHTTP2Connection {
        let tlsContext = tls?()
        let connection = UpstreamHTTP2Connection(loop: loop, scheme: tls == nil ? "http" : "https")
        connections.append(connection)
        if tls != nil && tlsContext == nil {
            remove(connection)
            connection.failReady(UpstreamTLSError(target: "\(host):\(port)", reason: "no TLS context loaded"))
            return connection
        }
        let host = self.host
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                do {
                    let sync = channel.pipeline.syncOperations
                    if let tlsContext {
                        // TLS first; HTTP/2's preface waits in it until the handshake is done.
                        try tlsContext.addClientHandler(to: channel, targetHost: host)
                        try sync.addHandler(ALPNRecorder())
                    }
                    try sync.addHandler(NIOHTTP2Handler(mode: .client, initialSettings: Self.localSettings))
                    try sync.addHandler(UpstreamHTTP2ConnectionObserver(pool: self, connection: connection))
                    // A stream channel turns unwritable past 64 KiB buffered
                    // (flow control or socket): the exchange's cue to stop
                    // reading the client.
                    let multiplexer = HTTP2StreamMultiplexer(
                        mode: .client, channel: channel, targetWindowSize: Self.windowSize,
                        outboundBufferSizeHighWatermark: 1 << 16, outboundBufferSizeLowWatermark: 1 << 15,
                        inboundStreamInitializer: nil)
                    try sync.addHandler(multiplexer)
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        let label = "\(host):\(port)"
        let future = (address.map { bootstrap.connect(to: $0) } ?? bootstrap.connect(host: host, port: port))
            .flatMap { channel -> EventLoopFuture<Channel> in
                guard tlsContext != nil else { return channel.eventLoop.makeSucceededFuture(channel) }
                let recorder: ALPNRecorder
                do {
                    recorder = try channel.pipeline.syncOperations.handler(type: ALPNRecorder.self)
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
                // The recorder completes on the handshake's end (not
                // UpstreamTLSContext.handshakeDone: its waiter removes itself
                // before passing the event on).
                return recorder.negotiated.flatMapErrorThrowing { error in
                    throw UpstreamTLSError(target: label, reason: "\(error)")
                }.flatMapThrowing { alpn in
                    guard alpn == "h2" else {
                        channel.close(promise: nil)
                        throw UpstreamTLSError(target: label, reason: "the server did not accept HTTP/2 (ALPN: \(alpn ?? "none"))")
                    }
                    return channel
                }
            }
        future.whenComplete { result in
            switch result {
            case .success(let channel):
                connection.channel = channel
                do {
                    connection.multiplexer = try channel.pipeline.syncOperations.handler(type: HTTP2StreamMultiplexer.self)
                    connection.connected()
                } catch {
                    channel.close(promise: nil)
                    connection.failReady(error)
                }
                if self.retired { connection.goingAway = true }
                // A server that accepts the connection but never sends its
                // SETTINGS (not HTTP/2) would hold the waiting requests
                // forever: it has the connect timeout to speak.
                self.loop.scheduleTask(in: self.connectTimeout) {
                    if !connection.settingsReceived {
                        connection.failReady(UpstreamHTTP2NoSettings(target: label))
                        channel.close(promise: nil)
                    }
                }
            case .failure(let error):
                self.remove(connection)
                connection.failReady(error)
            }
        }
        return connection
    }

    /// Our receive window per stream (and the connection's target): large
    /// enough for throughput, small enough that a slow client holds back
    /// at most this much per stream.
    static let windowSize = 1 << 18

    static let localSettings: HTTP2Settings = [
        HTTP2Setting(parameter: .enablePush, value: 0),
        HTTP2Setting(parameter: .initialWindowSize, value: windowSize),
        HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 16),
    ]

    private func streamEnded(on connection: UpstreamHTTP2Connection) {
        connection.activeStreams -= 1
        if connection.activeStreams == 0 {
            connection.idleSince = .now()
            if connection.goingAway { connection.channel?.close(promise: nil) }
        }
    }

    // MARK: Events from the connection's pipeline

    func goAwayReceived(on connection: UpstreamHTTP2Connection) {
        connection.goingAway = true
        if connection.activeStreams == 0 { connection.channel?.close(promise: nil) }
    }

    func connectionClosed(_ connection: UpstreamHTTP2Connection) {
        connection.goingAway = true
        connection.failReady(ChannelError.ioOnClosedChannel)
        remove(connection)
    }

    private func remove(_ connection: UpstreamHTTP2Connection) {
        if let i = connections.firstIndex(where: { $0 === connection }) { connections.remove(at: i) }
    }

    // MARK: Pool upkeep (TargetPool forwards these)

    /// Closes connections without streams for longer than `idle_timeout`.
    func sweep(now: NIODeadline) {
        for connection in connections where connection.activeStreams == 0 && now - connection.idleSince >= idleTimeout {
            connection.goingAway = true
            connection.channel?.close(promise: nil)
        }
    }

    /// A reload removed the target: idle connections close now, busy ones
    /// when their last stream ends.
    func retire() {
        retired = true
        closeIdle()
        for connection in connections { connection.goingAway = true }
    }

    func closeIdle() {
        for connection in connections where connection.activeStreams == 0 {
            connection.goingAway = true
            connection.channel?.close(promise: nil)
        }
    }
}

/// One HTTP/2 connection of an `UpstreamHTTP2Pool` (event-loop confined).
final class UpstreamHTTP2Connection {
    /// Succeeds once connected (`multiplexer` set) and the server's first
    /// SETTINGS has arrived, so `peerMaxStreams` is the server's real limit
    /// when streams are placed; fails if the connection fails first.
    var ready: EventLoopFuture<Void> { readyPromise.futureResult }
    private let readyPromise: EventLoopPromise<Void>
    private var readyCompleted = false
    private var isConnected = false
    private(set) var settingsReceived = false
    var channel: Channel?
    var multiplexer: HTTP2StreamMultiplexer?
    /// Streams reserved or open on this connection.
    var activeStreams = 0
    /// Streams ever started on it.
    var streamsOpened = 0
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until it says).
    var peerMaxStreams = Int.max
    /// GOAWAY received, closing, or retired: no new streams.
    var goingAway = false
    var idleSince = NIODeadline.now()

    /// `:scheme` of its requests: http (prior knowledge) or https (TLS).
    let scheme: String

    init(loop: EventLoop, scheme: String) {
        self.readyPromise = loop.makePromise(of: Void.self)
        self.scheme = scheme
    }

    var acceptsStreams: Bool { !goingAway }

    /// The channel is up (and, over TLS, ALPN chose h2).
    func connected() {
        isConnected = true
        succeedReadyIfComplete()
    }

    /// The server's first SETTINGS frame (its connection preface) arrived.
    func receivedSettings() {
        settingsReceived = true
        succeedReadyIfComplete()
    }

    func failReady(_ error: Error) {
        guard !readyCompleted else { return }
        readyCompleted = true
        readyPromise.fail(error)
    }

    private func succeedReadyIfComplete() {
        guard isConnected && settingsReceived && !readyCompleted else { return }
        readyCompleted = true
        readyPromise.succeed(())
    }
}

/// The server accepted the connection but sent no HTTP/2 SETTINGS within
/// the connect timeout.
struct UpstreamHTTP2NoSettings: Error, CustomStringConvertible {
    let target: String
    var description: String { "\(target): no HTTP/2 SETTINGS from the server within the connect timeout" }
}

/// Sits between `NIOHTTP2Handler` and the multiplexer on an upstream
/// HTTP/2 connection: reads the server's SETTINGS (stream limit) and
/// GOAWAY, and tells the pool when the connection is gone.
final class UpstreamHTTP2ConnectionObserver: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame

    private let pool: UpstreamHTTP2Pool
    private let connection: UpstreamHTTP2Connection

    init(pool: UpstreamHTTP2Pool, connection: UpstreamHTTP2Connection) {
        self.pool = pool
        self.connection = connection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.payload {
        case .settings(.settings(let settings)):
            for setting in settings where setting.parameter == .maxConcurrentStreams {
                connection.peerMaxStreams = setting.value
            }
            connection.receivedSettings()
        case .goAway:
            pool.goAwayReceived(on: connection)
        default:
            break
        }
        context.fireChannelRead(data)
    }

    func channelInactive(context: ChannelHandlerContext) {
        pool.connectionClosed(connection)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A stream's error is that stream's business (the multiplexer
        // routes it); anything else is a connection error, after which
        // NIOHTTP2Handler has sent GOAWAY: close so every stream's exchange
        // learns of it now.
        if error is NIOHTTP2Errors.StreamError {
            return context.fireErrorCaught(error)
        }
        pool.goAwayReceived(on: connection)
        context.close(promise: nil)
    }
}

/// The protocol ALPN settled on (TLS upstream connections), as a future
/// completed when the handshake's event passes this handler; failed with
/// the handshake's error or when the connection closes first.
final class ALPNRecorder: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private var promise: EventLoopPromise<String?>?
    private(set) var negotiated: EventLoopFuture<String?>!

    func handlerAdded(context: ChannelHandlerContext) {
        let promise = context.eventLoop.makePromise(of: String?.self)
        self.promise = promise
        negotiated = promise.futureResult
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        promise?.fail(ChannelError.ioOnClosedChannel)
        promise = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted(let proto) = tls {
            promise?.succeed(proto)
            promise = nil
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let promise {
            self.promise = nil
            promise.fail(error)
            context.close(promise: nil)
            return
        }
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise?.fail(ClosedDuringHandshake())
        promise = nil
        context.fireChannelInactive()
    }

    struct ClosedDuringHandshake: Error, CustomStringConvertible {
        var description: String { "connection closed during the handshake" }
    }
}
