import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore

/// What an upstream connection reports, parsed by Weir's HTTP/1.1 codec.
enum UpstreamResponsePart {
    /// A response head (interim 1xx heads come first, each on its own).
    case head(HTTP1ResponseHead)
    /// Body bytes, de-chunked (a slice of what was read, not a copy).
    case body(ByteBuffer)
    /// The response ended; trailer fields of a chunked body, if any.
    case end(HTTP1Fields?)
}

/// The side of an exchange that receives what an upstream connection reports.
/// Implemented by the exchange (`ExchangeDownstream`); everything runs on one event loop.
protocol UpstreamConnectionDelegate: AnyObject {
    /// The loop's clock: a read event reads it once for all its parts.
    var loopClock: LoopClock { get }
    func upstreamRead(_ part: UpstreamResponsePart, on connection: UpstreamConnection)
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
    /// The request being sent has a chunked body (set by `writeHead`).
    private var chunkedBody = false
    /// The last request head written (see `takeHeadBuffer`); not kept when
    /// larger than `keptHeadBufferCapacity`, so an idle pooled connection
    /// holds at most that much.
    /// Optional, not an empty `ByteBuffer()`: that is NIO's shared
    /// zero-capacity storage, retained and released (atomics) each time a
    /// slot is emptied with it.
    private var headBuffer: ByteBuffer? = nil
    private static let keptHeadBufferCapacity = 4096
    /// Set when this "connection" is one stream of an HTTP/2 upstream
    /// connection (`HTTP2/UpstreamHTTP2Pool.swift`): requests go out as
    /// HTTP/2 frames, the response arrives as HTTP/1.1 bytes as usual.
    var http2Stream: UpstreamHTTP2StreamCodec?

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

    /// Starts a request: `head` is the complete serialised head. The
    /// method decides how the response is parsed (HEAD has no body).
    /// `consuming`: the caller's buffer moves into `headBuffer` (a borrowed
    /// one was retained to be kept and released by the caller).
    func writeHead(_ head: consuming ByteBuffer, method: HTTP1Method, chunkedBody: Bool) {
        self.chunkedBody = chunkedBody
        handler.expectResponse(to: method)
        if let http2Stream { return http2Stream.writeHead(head, method: method, bodyless: !chunkedBody) }
        handler.write(head)
        if head.capacity <= Self.keptHeadBufferCapacity { headBuffer = consume head }
    }

    /// An empty buffer of at least `capacity` bytes for the next request
    /// head: the one the previous request's head was written from when NIO
    /// has released it (`clear()` then reuses its memory: no storage object
    /// and malloc/free per request on a pooled connection; if a write still
    /// holds it, `clear()` allocates as a new buffer would).
    func takeHeadBuffer(capacity: Int) -> ByteBuffer {
        guard var buffer = headBuffer.take(), buffer.capacity >= capacity else {
            return channel.allocator.buffer(capacity: capacity)
        }
        buffer.clear()
        return buffer
    }

    /// Request body bytes, chunk-framed when the request is chunked.
    func writeBody(_ data: ByteBuffer) {
        let length = data.readableBytes
        guard length > 0 else { return }
        if let http2Stream { return http2Stream.writeBody(data) }
        guard chunkedBody else { return handler.write(data) }
        if length <= 4096 {
            // Small chunks: one buffer (a write costs more than the copy).
            var out = channel.allocator.buffer(capacity: length + 24)
            HTTP1ChunkedEncoder.writeChunk(data, into: &out)
            handler.write(out)
        } else {
            var header = channel.allocator.buffer(capacity: 24)
            HTTP1ChunkedEncoder.writeChunkHeader(length: length, into: &header)
            handler.write(header)
            handler.write(data)
            handler.write(Self.crlf)
        }
    }

    /// The request body ended (the last chunk and trailers when chunked).
    func writeEnd(trailers: HTTPHeaders?) {
        if let http2Stream { return http2Stream.writeEnd(trailers: trailers) }
        guard chunkedBody else { return }
        var out = channel.allocator.buffer(capacity: 5)
        out.writeStaticString("0\r\n")
        if let trailers { HeadSerialization.writeTrailers(trailers, into: &out) }
        out.writeStaticString("\r\n")
        handler.write(out)
    }

    private static let crlf: ByteBuffer = {
        var b = ByteBufferAllocator().buffer(capacity: 2)
        b.writeStaticString("\r\n")
        return b
    }()

    func flush() {
        handler.flush()
    }

    /// Closes the connection (it will not be pooled again).
    func close() {
        reusable = false
        handler.delegate = nil
        channel.close(promise: nil)
    }
}

/// The whole pipeline of an upstream connection: parses responses with
/// `HTTP1ResponseParser` (bodies by their framing, chunked de-chunked),
/// relays them to the attached exchange and holds back reads while the
/// exchange asks it to (backpressure from a slow client). Requests are
/// written as bytes the exchange already serialised. On a plain TCP
/// connection it is the pipeline's only handler, and its writes, flushes
/// and read requests go straight to the channel's core (`SoleHandlerIO`).
final class UpstreamHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Strong, not weak: a weak reference gives the delegate (the
    /// downstream handler) a side table for its whole life, and then every
    /// retain and release of it takes the runtime's slow path (~550
    /// instructions per request with the weak assignments and loads,
    /// BENCHMARKS.md core5). The cycle this makes (downstream -> exchange ->
    /// connection -> this handler -> downstream) is broken wherever the
    /// connection leaves its exchange: `detach` (back to the pool),
    /// `close`, a failed response, the upstream channel going inactive,
    /// a tunnel taking over (`switchToTunnel`); the downstream closing
    /// aborts its exchange, which closes the connection.
    var delegate: UpstreamConnectionDelegate? {
        didSet { delegateAssignments &+= 1 }
    }
    /// Counts assignments to `delegate`: a read event loads the reference
    /// once and loads it again only after a callback (re)assigned it
    /// (detach, close, a retry's attach).
    private var delegateAssignments: UInt = 0
    /// Strong on purpose: the connection object must outlive a close the
    /// exchange started (late bytes still arrive here). The cycle is broken
    /// when the channel goes inactive or this handler is removed (tunnel).
    var connection: UpstreamConnection?
    private var context: ChannelHandlerContext?
    /// Every write and flush goes through it (`write`/`flush` below): a
    /// plain `context.write` would overtake a buffer it holds until the flush.
    private let io = SoleHandlerIO()
    private let soleHandler: Bool
    private let behindTLS: Bool
    private var readPaused = false
    private var pendingRead = false
    /// The event loop's clock, from the first delegate (see channelRead).
    private var clock: LoopClock?

    /// Bytes read and not yet parsed.
    private var inbound = ByteBuffer()
    private var parser = HTTP1ResponseParser()
    private var requestMethod: HTTP1Method = .get
    private enum Body {
        /// Waiting for a response head.
        case head
        case contentLength(remaining: Int)
        case chunked(HTTP1ChunkedDecoder)
        /// Until the upstream closes (no length, not chunked).
        case untilClose
        /// After a 101: the rest belongs to the tunnel (`takeTunnelBytes`).
        case tunnel
    }
    private var body = Body.head
    private var processing = false

    /// `soleHandler`: nothing else is in the pipeline while this handler is
    /// (a plain TCP connection: no TLS handler, not an HTTP/2 stream).
    /// `behindTLS`: the client TLS handler is in front of it, nothing else
    /// behind it (a TLS upstream; see SoleHandlerIO).
    init(soleHandler: Bool = false, behindTLS: Bool = false) {
        self.soleHandler = soleHandler
        self.behindTLS = behindTLS
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        io.attach(context, soleHandler: soleHandler)
        if behindTLS { io.attachBehindTLS(context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        io.detach()
        self.context = nil
        self.connection = nil
    }

    func expectResponse(to method: HTTP1Method) {
        requestMethod = method
    }

    /// After a 101: bytes already read past the response head.
    func takeTunnelBytes() -> ByteBuffer? {
        guard inbound.readableBytes > 0 else { return nil }
        let rest = inbound
        inbound = ByteBuffer()
        return rest
    }

    /// `context` tested, not bound (a bound reference is retained and
    /// released per call): `io` reads it only when it does not send directly.
    func write(_ buffer: ByteBuffer) {
        guard context != nil else { return }
        io.write(buffer, context: self.context!, promise: nil)
    }

    /// From this handler's context: it is the last handler of the pipeline
    /// (the only one, or after an HTTP/2 stream codec), so nothing is skipped.
    func flush() {
        guard context != nil else { return }
        io.flush(context: self.context!)
    }

    func pauseReading() {
        readPaused = true
    }

    func resumeReading() {
        guard readPaused else { return }
        readPaused = false
        if pendingRead, let context {
            pendingRead = false
            io.read(context: context)
        }
    }

    func read(context: ChannelHandlerContext) {
        if readPaused {
            pendingRead = true
        } else {
            io.read(context: context)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let connection else { return }
        guard let delegate else {
            // An idle pooled connection must stay silent, and a connection an
            // exchange gave up on is finished; either way never reuse it.
            connection.reusable = false
            context.close(promise: nil)
            return
        }
        // The loop's clock (every exchange on this loop has the same one),
        // kept from the first read: asking the delegate (an existential)
        // cost a witness call and a retain/release per read.
        if clock == nil { clock = delegate.loopClock }
        clock!.enterEvent()
        defer { clock!.leaveEvent() }
        var buffer = unwrapInboundIn(data)
        // The usual case, nothing left over: the read's buffer and the
        // empty `inbound` change places (no copy).
        let swapped = inbound.readableBytes == 0
        if swapped { swap(&inbound, &buffer) } else { inbound.writeBuffer(&buffer) }
        process(connection, delegate: delegate)
        // Drained: let go of the read's storage. Holding it (even empty)
        // makes a TLS upstream's NIOSSLHandler copy its whole 32 KB
        // plaintext buffer on the next decode (copy-on-write), once per
        // response; plain sockets' reads reuse their buffer the same way.
        // A storage-less empty buffer swapped out above just comes back
        // (the read's storage goes with `buffer`): `ByteBuffer()` is NIO's
        // shared zero-capacity storage, a retain and a release per read.
        if inbound.readableBytes == 0 {
            if swapped && buffer.capacity == 0 { swap(&inbound, &buffer) } else { inbound = ByteBuffer() }
        }
    }

    /// Parses what is buffered and reports it, part by part, while an
    /// exchange is attached. `delegate` is the one channelRead loaded; a
    /// callback may detach, close or re-attach, and then the weak
    /// reference is read again (`reportParts` returns true).
    private func process(_ connection: UpstreamConnection, delegate: UpstreamConnectionDelegate) {
        guard !processing else { return }
        processing = true
        defer { processing = false }
        do {
            var delegateChanged = try reportParts(connection, to: delegate)
            while delegateChanged {
                guard let next = self.delegate, self.connection != nil else {
                    // Nobody attached (released to the pool, or dropped) yet
                    // bytes are left: the upstream sent more than one response.
                    if inbound.readableBytes > 0, case .head = body, self.connection != nil {
                        connection.reusable = false
                        context?.close(promise: nil)
                    }
                    return
                }
                delegateChanged = try reportParts(connection, to: next)
            }
        } catch {
            fail(error)
        }
    }

    /// Reports parsed parts to `delegate` while it stays the attached one:
    /// true when a callback assigned `delegate` (the caller reloads it),
    /// false when nothing more can be reported now.
    private func reportParts(_ connection: UpstreamConnection, to delegate: UpstreamConnectionDelegate) throws -> Bool {
        let loadedAt = delegateAssignments
        // The end of a response right after its head or last body bytes: to
        // whoever is attached after that callback.
        func reportEnd() {
            if loadedAt == delegateAssignments {
                delegate.upstreamRead(.end(nil), on: connection)
            } else {
                self.delegate?.upstreamRead(.end(nil), on: connection)
            }
        }
        while self.connection != nil {
            guard loadedAt == delegateAssignments else { return true }
            switch body {
            case .head:
                guard inbound.readableBytes > 0,
                      let head = try parser.parse(&inbound, requestMethod: requestMethod) else { return false }
                // `consume`: the head moves into the reported part
                // instead of being copied (its buffer and field index
                // retained) and destroyed twice per response.
                if head.isInterim {
                    delegate.upstreamRead(.head(consume head), on: connection)
                    continue
                }
                if head.status == 101 {
                    body = .tunnel
                    delegate.upstreamRead(.head(consume head), on: connection)
                    reportEnd()
                    return false
                }
                let framing = head.framing
                switch framing {
                case .none, .contentLength(0):
                    delegate.upstreamRead(.head(consume head), on: connection)
                    reportEnd()
                case .contentLength(let length):
                    body = .contentLength(remaining: length)
                    delegate.upstreamRead(.head(consume head), on: connection)
                case .chunked:
                    body = .chunked(HTTP1ChunkedDecoder())
                    delegate.upstreamRead(.head(consume head), on: connection)
                case .untilClose:
                    body = .untilClose
                    delegate.upstreamRead(.head(consume head), on: connection)
                }
            case .contentLength(let remaining):
                let available = inbound.readableBytes
                guard available > 0 else { return false }
                let n = min(remaining, available)
                let slice = inbound.readSlice(length: n)!
                if n == remaining {
                    body = .head
                    delegate.upstreamRead(.body(slice), on: connection)
                    reportEnd()
                } else {
                    body = .contentLength(remaining: remaining - n)
                    delegate.upstreamRead(.body(slice), on: connection)
                }
            case .chunked(var decoder):
                let event = try decoder.next(&inbound)
                switch event {
                case .needMoreData:
                    body = .chunked(decoder)
                    return false
                case .data(let slice):
                    body = .chunked(decoder)
                    delegate.upstreamRead(.body(slice), on: connection)
                case .end(let trailers):
                    body = .head
                    delegate.upstreamRead(.end(trailers), on: connection)
                }
            case .untilClose:
                guard inbound.readableBytes > 0 else { return false }
                let all = inbound.readSlice(length: inbound.readableBytes)!
                delegate.upstreamRead(.body(all), on: connection)
            case .tunnel:
                return false
            }
        }
        // The connection was dropped by a callback.
        return false
    }

    /// A response the codec refused: the exchange sees a failed upstream (502).
    private func fail(_ error: Error) {
        guard let connection else { return }
        connection.reusable = false
        let delegate = self.delegate
        self.delegate = nil
        context?.close(promise: nil)
        delegate?.upstreamClosed(connection, error: error)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if let connection { delegate?.upstreamReadComplete(on: connection) }
        // The next read, asked for here when wanted (see SoleHandlerIO.rearmRead),
        // also behind TLS and an HTTP/2 stream codec.
        io.rearmRead(if: !readPaused, context: context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if let connection { delegate?.upstreamWritabilityChanged(on: connection) }
    }

    /// The upstream closed its side: a body delimited by close ends here;
    /// anything else in progress was cut.
    private func endOfInput() {
        if case .untilClose = body, let connection {
            body = .head
            connection.reusable = false
            delegate?.upstreamRead(.end(nil), on: connection)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            // Half-closure is allowed on upstream channels so a tunnel can
            // pass it on; outside a tunnel it just ends the connection.
            endOfInput()
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        endOfInput()
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
    /// The upstream's current TLS context, for TLS upstreams (read per new
    /// connection so a certificate reload applies to the next one).
    var tls: (() -> UpstreamTLSContext?)?
    /// Open connections to this target from this loop, idle or busy (for
    /// an HTTP/2 target: open streams).
    private(set) var openConnections = 0
    /// For `protocol: http2` upstreams: the connections whose streams this
    /// pool hands out instead of HTTP/1.1 connections.
    let http2: UpstreamHTTP2Pool?

    init(targetIndex: Int, target: TargetConfig, pool: ConnectionPoolConfig, connectTimeout: TimeAmount, loop: EventLoop,
         http2: UpstreamHTTP2Config? = nil) {
        self.targetIndex = targetIndex
        self.host = target.address.host
        self.port = target.address.port
        let address = try? SocketAddress(ipAddress: target.address.host, port: target.address.port)
        self.address = address
        self.poolConfig = pool
        self.connectTimeout = connectTimeout
        self.loop = loop
        self.http2 = http2.map {
            UpstreamHTTP2Pool(loop: loop, host: target.address.host, port: target.address.port, address: address,
                              config: $0, connectTimeout: connectTimeout,
                              idleTimeout: .nanoseconds(pool.idleTimeout.nanoseconds))
        }
    }

    var idleCount: Int { idle.count }

    /// A pooled connection that still looks alive, or nil.
    func takeIdle(now: NIODeadline) -> UpstreamConnection? {
        // HTTP/2: every request is a new stream (`connect`), never idle.
        if http2 != nil { return nil }
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
        // A finished HTTP/2 stream closes itself (its connection stays); one
        // opened for an exchange that ended meanwhile is closed unused.
        if let stream = connection.http2Stream {
            if !stream.requestStarted { connection.close() }
            return
        }
        if retired {
            connection.close()
            return
        }
        if let max = poolConfig.maxRequests, connection.requestsSent >= max {
            connection.close()
            return
        }
        // Kept even beyond `max_idle`: in a burst, a connection closed here
        // would be reopened a moment later (connect + teardown cost more than
        // the whole request). The sweeper trims the excess once it has sat
        // idle through a whole sweep interval. `max_idle: 0` keeps none.
        guard connection.isActive, poolConfig.maxIdle > 0 else {
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

    /// When the sweeper last ran: idle connections beyond `max_idle` idle
    /// since before then were not needed for a whole interval.
    private var lastSweep: NIODeadline = .uptimeNanoseconds(0)

    /// Closes idle connections past `idle_timeout`, and those beyond
    /// `max_idle` (oldest first) that stayed idle since the previous sweep.
    func sweep(now: NIODeadline) {
        defer { lastSweep = now }
        http2?.sweep(now: now)
        let idleLimit = TimeAmount.nanoseconds(poolConfig.idleTimeout.nanoseconds)
        var kept: [UpstreamConnection] = []
        // `idle` is oldest first: the excess is taken from the front.
        var excess = idle.count - poolConfig.maxIdle
        for connection in idle {
            if excess > 0 && connection.idleSince <= lastSweep {
                excess -= 1
                connection.close()
            } else if connection.isActive && now - connection.idleSince < idleLimit {
                kept.append(connection)
            } else {
                excess -= 1
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
        http2?.retire()
    }

    func closeAll() {
        http2?.closeIdle()
        let all = idle
        idle.removeAll()
        for c in all { c.close() }
    }

    /// Opens a new connection on this pool's event loop; `timeout`
    /// overrides the upstream's connect timeout of a new TCP connection (a
    /// plugin's set_timeouts; an HTTP/2 upstream's stream opens on its
    /// shared connection as configured).
    func connect(timeout: TimeAmount? = nil) -> EventLoopFuture<UpstreamConnection> {
        if let http2 {
            return http2.openStream(for: self).map { stream in
                self.openConnections += 1
                return stream
            }
        }
        let tlsContext = tls?()
        let host = self.host
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(timeout ?? connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            // A WebSocket tunnel passes the upstream's half-close on to the
            // client (UpstreamHandler closes on it outside a tunnel).
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                do {
                    // TLS upstreams: the client TLS handler first (TLS/UpstreamTLS.swift).
                    try tlsContext?.addClientHandler(to: channel, targetHost: host)
                    // Without TLS it is the pipeline's only handler.
                    try channel.pipeline.syncOperations.addHandler(UpstreamHandler(soleHandler: tlsContext == nil, behindTLS: tlsContext != nil))
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
        let label = "\(host):\(port)"
        return future.flatMap { channel -> EventLoopFuture<Channel> in
            // A TLS connection is usable (and pooled) once its handshake succeeded.
            guard tlsContext != nil else { return channel.eventLoop.makeSucceededFuture(channel) }
            return UpstreamTLSContext.handshakeDone(on: channel, target: label).map { channel }
        }.flatMapThrowing { channel in
            let handler = try channel.pipeline.syncOperations.handler(type: UpstreamHandler.self)
            self.openConnections += 1
            return UpstreamConnection(channel: channel, handler: handler, targetIndex: self.targetIndex, pool: self)
        }
    }
}
