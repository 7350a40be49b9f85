import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore

/// The side of an exchange that receives what an upstream connection reports.
/// Implemented by `DownstreamHandler`; everything runs on one event loop.
protocol UpstreamConnectionDelegate: AnyObject {
    func upstreamRead(_ part: HTTPClientResponsePart, on connection: UpstreamConnection)
    func upstreamReadComplete(on connection: UpstreamConnection)
    func upstreamWritabilityChanged(on connection: UpstreamConnection)
    func upstreamClosed(_ connection: UpstreamConnection, error: Error?)
}

/// One keep-alive HTTP/1.1 connection to a target, owned by a `TargetPool`
/// while idle and attached to one downstream exchange while in use.
final class UpstreamConnection {
    let channel: Channel
    let handler: UpstreamHandler
    let targetIndex: Int
    let pool: TargetPool
    /// Requests started on this connection (for `max_requests`, and to know
    /// whether it was reused: a reused connection may have gone stale).
    var requestsSent = 0
    var idleSince: NIODeadline = .now()
    /// False once the connection closed or must not be reused.
    var reusable = true

    init(channel: Channel, handler: UpstreamHandler, targetIndex: Int, pool: TargetPool) {
        self.channel = channel
        self.handler = handler
        self.targetIndex = targetIndex
        self.pool = pool
        handler.connection = self
    }

    var isActive: Bool { channel.isActive && reusable }

    func attach(_ delegate: UpstreamConnectionDelegate) {
        handler.delegate = delegate
    }

    func detach() {
        handler.delegate = nil
        handler.resumeReading()
    }

    func write(_ part: HTTPClientRequestPart) {
        handler.write(part)
    }

    func flush() {
        channel.flush()
    }

    /// Closes the connection (it will not be pooled again).
    func close() {
        reusable = false
        handler.delegate = nil
        channel.close(promise: nil)
    }
}

/// The pipeline end of an upstream connection: relays decoded response parts
/// to the attached exchange and holds back reads while the exchange asks it
/// to (backpressure from a slow client).
final class UpstreamHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = HTTPClientRequestPart

    weak var delegate: UpstreamConnectionDelegate?
    /// Strong on purpose: the connection object must outlive a close the
    /// exchange started (late bytes still arrive here). The cycle is broken
    /// when the channel goes inactive or this handler is removed (tunnel).
    var connection: UpstreamConnection?
    private var context: ChannelHandlerContext?
    private var readPaused = false
    private var pendingRead = false

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.connection = nil
    }

    func write(_ part: HTTPClientRequestPart) {
        context?.write(wrapOutboundOut(part), promise: nil)
    }

    func pauseReading() {
        readPaused = true
    }

    func resumeReading() {
        guard readPaused else { return }
        readPaused = false
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    func read(context: ChannelHandlerContext) {
        if readPaused {
            pendingRead = true
        } else {
            context.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let connection else { return }
        if let delegate {
            delegate.upstreamRead(unwrapInboundIn(data), on: connection)
        } else {
            // An idle pooled connection must stay silent, and a connection an
            // exchange gave up on is finished; either way never reuse it.
            connection.reusable = false
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if let connection { delegate?.upstreamReadComplete(on: connection) }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if let connection { delegate?.upstreamWritabilityChanged(on: connection) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        guard let connection else { return }
        self.connection = nil
        connection.reusable = false
        let delegate = self.delegate
        self.delegate = nil
        connection.pool.connectionClosed(connection)
        delegate?.upstreamClosed(connection, error: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard let connection else { return }
        connection.reusable = false
        let delegate = self.delegate
        self.delegate = nil
        context.close(promise: nil)
        delegate?.upstreamClosed(connection, error: error)
    }
}

/// Idle keep-alive connections to one target, on one event loop (so no
/// locks). LIFO: the most recently used connection is the warmest.
final class TargetPool {
    let targetIndex: Int
    let address: SocketAddress?
    let host: String
    let port: Int
    private let poolConfig: ConnectionPoolConfig
    private let connectTimeout: TimeAmount
    private let loop: EventLoop
    private var idle: [UpstreamConnection] = []
    /// Open connections to this target from this loop, idle or busy.
    private(set) var openConnections = 0

    init(targetIndex: Int, target: TargetConfig, pool: ConnectionPoolConfig, connectTimeout: TimeAmount, loop: EventLoop) {
        self.targetIndex = targetIndex
        self.host = target.address.host
        self.port = target.address.port
        self.address = try? SocketAddress(ipAddress: target.address.host, port: target.address.port)
        self.poolConfig = pool
        self.connectTimeout = connectTimeout
        self.loop = loop
    }

    var idleCount: Int { idle.count }

    /// A pooled connection that still looks alive, or nil.
    func takeIdle(now: NIODeadline) -> UpstreamConnection? {
        let idleLimit = TimeAmount.nanoseconds(poolConfig.idleTimeout.nanoseconds)
        while let connection = idle.popLast() {
            if connection.isActive && now - connection.idleSince < idleLimit {
                return connection
            }
            connection.close()
        }
        return nil
    }

    /// Returns a connection after a complete exchange.
    func release(_ connection: UpstreamConnection, now: NIODeadline) {
        connection.detach()
        if retired {
            connection.close()
            return
        }
        if let max = poolConfig.maxRequests, connection.requestsSent >= max {
            connection.close()
            return
        }
        guard connection.isActive, idle.count < poolConfig.maxIdle else {
            connection.close()
            return
        }
        connection.idleSince = now
        idle.append(connection)
    }

    func connectionClosed(_ connection: UpstreamConnection) {
        openConnections -= 1
        if let i = idle.firstIndex(where: { $0 === connection }) {
            idle.remove(at: i)
        }
    }

    /// Closes idle connections past `idle_timeout`.
    func sweep(now: NIODeadline) {
        let idleLimit = TimeAmount.nanoseconds(poolConfig.idleTimeout.nanoseconds)
        var kept: [UpstreamConnection] = []
        for connection in idle {
            if connection.isActive && now - connection.idleSince < idleLimit {
                kept.append(connection)
            } else {
                connection.close()
            }
        }
        idle = kept
    }

    /// Set when a reload removed this pool's target: connections still
    /// busy close when their exchange ends instead of returning here.
    private(set) var retired = false

    func retire() {
        retired = true
        closeAll()
    }

    func closeAll() {
        let all = idle
        idle.removeAll()
        for c in all { c.close() }
    }

    /// Opens a new connection on this pool's event loop.
    func connect() -> EventLoopFuture<UpstreamConnection> {
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                do {
                    let sync = channel.pipeline.syncOperations
                    var encoderConfig = HTTPRequestEncoder.Configuration()
                    // The proxy decides framing itself (see HeaderRewriting).
                    encoderConfig.automaticallySetFramingHeaders = false
                    try sync.addHandler(HTTPRequestEncoder(configuration: encoderConfig))
                    try sync.addHandler(ByteToMessageHandler(HTTPResponseDecoder(
                        leftOverBytesStrategy: .forwardBytes,
                        informationalResponseStrategy: .forward)))
                    try sync.addHandler(UpstreamHandler())
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        let future: EventLoopFuture<Channel>
        if let address {
            future = bootstrap.connect(to: address)
        } else {
            future = bootstrap.connect(host: host, port: port)
        }
        return future.flatMapThrowing { channel in
            let handler = try channel.pipeline.syncOperations.handler(type: UpstreamHandler.self)
            self.openConnections += 1
            return UpstreamConnection(channel: channel, handler: handler, targetIndex: self.targetIndex, pool: self)
        }
    }
}
