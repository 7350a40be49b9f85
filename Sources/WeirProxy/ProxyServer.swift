import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore
#if canImport(Glibc)
import Glibc
#endif

// The HTTP/1.1 data path at a glance (files under Sources/WeirProxy/):
//
//   client ⇄ DownstreamHandler ───────────────────────────▶ UpstreamConnection (pool per loop per target)
//            HTTP/1.1 framing: HTTP1RequestParser,          UpstreamHandler: HTTP1ResponseParser,
//            chunked decoder, HTTP1HeadWriter        ◀──── requests written as bytes ⇄ upstream
//            exchange: route, limits, plugins, retries,
//            timeouts, response relay
//
// - Weir's own codec (HTTP1/): heads stay the bytes they arrived as plus an
//   index; forwarded heads are range copies plus edits (docs/http1-codec.md).
// - One request at a time per client connection; pipelined requests wait
//   unparsed until the response before them is done.
// - Bodies stream slice by slice; each side stops reading while the other
//   side is not writable (read() is withheld), so memory stays bounded.
// - Framing is decided by the exchange (content-length passes through,
//   otherwise re-chunked); hop-by-hop headers never cross.
// - A 101 turns both channels into a TunnelHandler pair (raw bytes).
// - Errors the proxy answers itself use ProxyErrorResponse (one JSON shape).
// - Everything for one connection, upstream side included, runs on the
//   event loop that accepted it: no locks on the request path.

/// The HTTP/1.1 reverse proxy: binds the config's listeners and proxies
/// requests to upstreams. Everything per request runs on the event loop
/// that accepted the connection, upstream connections included.
///
/// Lifecycle: `init` -> `start()` -> (serve) -> `beginDrain()` ->
/// `waitForDrain(timeout:)` -> `shutdown()`.
public final class ProxyServer: @unchecked Sendable {
    public struct StartError: Error, CustomStringConvertible {
        public let listener: String
        public let address: String
        public let reason: String
        public var description: String { "listener \"\(listener)\" could not bind \(address): \(reason)" }
    }

    private let config: WeirConfig
    private let group: EventLoopGroup
    private let observer: ProxyObserver?
    private let logger: Logger
    /// nil when the config could not be compiled; `start()` then throws
    /// `setupError`. Replaced by a reload (`GenerationManager`), under `lock`.
    private var runtime: ProxyRuntime?
    private let setupError: Error?
    let loopContexts: [LoopContext]
    private let lock = NIOLock()
    private var serverChannels: [Channel] = []
    private var bound: [String: SocketAddress] = [:]
    private let connectionCount = ManagedAtomic<Int>(0)
    /// Certificates of https listeners and contexts of TLS upstreams; nil
    /// when setup failed (see `setupError`).
    public let tls: ProxyTLS?
    private let drainStarted = ManagedAtomic<Bool>(false)

    /// Builds the runtime (route table, upstream health). A config the data
    /// path cannot run (unknown upstream, invalid route regex; normally caught
    /// by ConfigLoader already) makes `start()` throw.
    public init(config: WeirConfig, group: EventLoopGroup, observer: ProxyObserver?, logger: Logger) {
        self.config = config
        self.group = group
        self.observer = observer
        self.logger = logger
        var contexts: [LoopContext] = []
        var tls: ProxyTLS? = nil
        do {
            tls = try ProxyTLS(config: config)
            let runtime = try ProxyRuntime(config: config, upstreamTLS: tls!.upstreams)
            self.runtime = runtime
            self.setupError = nil
            for loop in group.makeIterator() {
                contexts.append(LoopContext(loop: loop, runtime: runtime, logger: logger))
            }
        } catch {
            self.runtime = nil
            self.setupError = error
        }
        self.tls = tls
        self.loopContexts = contexts
    }

    /// Binds every listener: one listening socket per event loop with
    /// SO_REUSEPORT, so the kernel spreads connections across loops and a
    /// connection stays on the loop that accepted it.
    public func start() throws {
        if let setupError { throw setupError }
        for context in loopContexts {
            context.loop.execute { context.start() }
        }
        for listenerConfig in config.listeners {
            guard listenerConfig.protocol == .http || listenerConfig.protocol == .https || listenerConfig.protocol.isStream else {
                throw StartError(listener: listenerConfig.name, address: listenerConfig.listen.description,
                                 reason: "protocol \(listenerConfig.protocol.rawValue) is not supported by this build yet (only http, https, tcp, tls)")
            }
            let listener = ListenerRuntime(config: listenerConfig, observer: observer, serverConnections: connectionCount,
                                           tls: tls?.listeners[listenerConfig.name])
            var port = listenerConfig.listen.port
            for (i, loopContext) in loopContexts.enumerated() {
                let channel: Channel
                do {
                    let bootstrap = listenerConfig.protocol.isStream
                        ? makeStreamBootstrap(loopContext: loopContext, listener: listener)   // L4/StreamListener.swift
                        : makeBootstrap(loopContext: loopContext, listener: listener)
                    channel = try bootstrap.bind(host: listenerConfig.listen.host, port: port).wait()
                } catch {
                    // Close what was bound so a failed start leaves nothing behind.
                    closeServerChannels()
                    throw StartError(listener: listenerConfig.name, address: listenerConfig.listen.description,
                                     reason: "\(error)")
                }
                if i == 0, let actual = channel.localAddress {
                    // Port 0: the other loops bind the port the kernel chose.
                    port = actual.port ?? port
                    lock.withLock { bound[listenerConfig.name] = actual }
                }
                lock.withLock { serverChannels.append(channel) }
            }
            logger.info("listening", metadata: ["listener": "\(listenerConfig.name)", "address": "\(listenerConfig.listen.host):\(port)"])
        }
    }

    private func makeBootstrap(loopContext: LoopContext, listener: ListenerRuntime) -> ServerBootstrap {
        let multipleLoops = loopContexts.count > 1
        return ServerBootstrap(group: loopContext.loop, childGroup: loopContext.loop)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.socketOption(NIOBSDSocket.Option(rawValue: SO_REUSEPORT)), value: multipleLoops ? 1 : 0)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            // A client may send its request and then shut down its write side;
            // it still gets its response (see DownstreamHandler.inputClosed).
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { [logger] channel in
                guard listener.admitConnection() else {
                    return Self.refuseConnection(channel, listener: listener, loopContext: loopContext)
                }
                func addHTTPHandlers(_ channel: Channel, tls: TLSConnectionInfo?) throws {
                    // Weir's own HTTP/1.1 codec runs inside the handler (no
                    // decoder/encoder handlers: one handler per connection).
                    // On a plain listener it is the pipeline's only handler.
                    let downstream = DownstreamHandler(loopContext: loopContext, listener: listener, soleHandler: tls == nil)
                    downstream.tls = tls
                    try channel.pipeline.syncOperations.addHandler(downstream)
                }
                do {
                    if let listenerTLS = listener.tls {
                        // https: the HTTP handler is added once the handshake succeeded (TLS/ListenerTLS.swift).
                        try listenerTLS.addHandlers(to: channel, logger: logger,
                                                    onClosedBeforeHTTP: { listener.connectionClosed() },
                                                    installHTTP: { channel, info in try addHTTPHandlers(channel, tls: info) })
                    } else {
                        try addHTTPHandlers(channel, tls: nil)
                    }
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    listener.connectionClosed()
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
    }

    /// Over `max_connections`: a 503 and close, without reading the request.
    private static func refuseConnection(_ channel: Channel, listener: ListenerRuntime, loopContext: LoopContext) -> EventLoopFuture<Void> {
        let id = loopContext.requestIDs.next()
        let body = ProxyErrorResponse.body(kind: .tooManyConnections,
                                           message: "listener \(listener.name) is at its connection limit",
                                           requestID: id, allocator: channel.allocator)
        var buffer = channel.allocator.buffer(capacity: 256 + body.readableBytes)
        buffer.writeString("HTTP/1.1 503 Service Unavailable\r\ndate: \(HTTPDateCache.format(time(nil)))\r\ncontent-type: application/json\r\ncontent-length: \(body.readableBytes)\r\nx-request-id: \(id)\r\nconnection: close\r\n\r\n")
        var bodyCopy = body
        buffer.writeBuffer(&bodyCopy)
        channel.writeAndFlush(buffer).whenComplete { _ in channel.close(promise: nil) }
        return channel.eventLoop.makeSucceededVoidFuture()
    }

    private func closeServerChannels() {
        let channels = lock.withLock { () -> [Channel] in
            let c = serverChannels
            serverChannels.removeAll()
            return c
        }
        for channel in channels { try? channel.close().wait() }
    }

    /// Listener name -> the address it is bound to (the real port when the
    /// config said port 0).
    public var boundAddresses: [String: SocketAddress] {
        lock.withLock { bound }
    }

    /// The shared health state of an upstream (for active health checks and metrics).
    public func upstreamHealth(named name: String) -> UpstreamHealth? {
        lock.withLock { runtime }?.upstreams.first { $0.name == name }?.health
    }

    /// Compiles `config`'s routes and upstreams for a reload, carrying
    /// upstream health over by target address. Throws what the data path
    /// cannot run. Installing it is `adoptRouting` plus, on each loop,
    /// `LoopContext.installRouting`.
    func makeRouting(config: WeirConfig) throws -> ProxyRuntime {
        try ProxyRuntime(config: config, previous: lock.withLock { runtime })
    }

    /// Loads the TLS files of `config` for a reload; throws (changing
    /// nothing) when one is bad. The closure swaps them in: new handshakes
    /// and new upstream connections use them, open connections are untouched.
    func prepareTLS(config: WeirConfig) throws -> () -> Void {
        guard let tls else { return {} }
        return try tls.prepare(config: config)
    }

    func adoptRouting(_ newRuntime: ProxyRuntime) {
        lock.withLock { runtime = newRuntime }
    }

    /// Open downstream connections across all listeners.
    public var activeConnections: Int {
        connectionCount.load(ordering: .relaxed)
    }

    /// Stops accepting; idle keep-alive connections close now, busy ones
    /// after their current response (which carries `Connection: close`).
    public func beginDrain() {
        guard drainStarted.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        let channels = lock.withLock { serverChannels }
        for channel in channels { channel.close(promise: nil) }
        for context in loopContexts {
            context.loop.execute { context.beginDrain() }
        }
    }

    /// Succeeds when every downstream connection has closed, or when
    /// `timeout` passed (then the remaining connections are closed by force).
    public func waitForDrain(timeout: TimeAmount) -> EventLoopFuture<Void> {
        beginDrain()
        let loop = group.next()
        let promise = loop.makePromise(of: Void.self)
        let deadline = NIODeadline.now() + timeout
        func poll() {
            if activeConnections <= 0 {
                promise.succeed(())
            } else if NIODeadline.now() >= deadline {
                logger.warning("drain timeout: closing remaining connections", metadata: ["connections": "\(activeConnections)"])
                let closes = loopContexts.map { context in
                    context.loop.submit { context.forceCloseAll() }
                }
                EventLoopFuture.andAllComplete(closes, on: loop).whenComplete { _ in
                    // Give the closes a moment to run their handlers.
                    loop.scheduleTask(in: .milliseconds(50)) { promise.succeed(()) }
                }
            } else {
                loop.scheduleTask(in: .milliseconds(20)) { poll() }
            }
        }
        loop.execute { poll() }
        return promise.futureResult
    }

    /// Closes listeners and pooled upstream connections. Call after drain.
    public func shutdown() {
        closeServerChannels()
        for context in loopContexts {
            try? context.loop.submit { context.stop() }.wait()
        }
    }
}
