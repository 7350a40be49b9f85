import NIOCore
import NIOHTTP1
import NIOPosix

/// `weir.http.request`: HTTP/1.1 exchanges over http:// or https://, on the
/// plugin's own event loop (so the coroutine resumes there), with keep-alive
/// connections pooled per Lua runtime (one per event loop per generation) by
/// host, port and TLS settings, so ext-authz, http-log and JWKS fetches do
/// not pay a connect (and a TLS handshake) per call.
struct OutboundRequest {
    var method: String = "GET"
    var host: String
    var port: Int
    var target: String
    var headers: [(String, String)] = []
    var body: [UInt8]? = nil
    var timeout: TimeAmount = .seconds(5)
    var maxBodyBytes: Int = 1 << 20
    /// nil: plain http; else TLS with these settings (https://).
    var tls: OutboundTLSSettings? = nil
    /// false: `connection: close`, never pooled.
    var keepAlive = true

    var poolKey: OutboundConnectionPool.Key { .init(host: host, port: port, tls: tls) }
}

struct OutboundResponse {
    var status: Int
    var headers: [(String, String)]
    var body: [UInt8]
}

struct OutboundHTTPError: Error, CustomStringConvertible {
    var description: String
}

/// How `weir.http.request` checks an https:// server (`ssl_verify`, `ca_file`).
public struct OutboundTLSSettings: Hashable, Sendable {
    /// Verify the certificate chain and host name (off only for tests).
    public var verify: Bool = true
    /// PEM bundle of trusted CAs; nil = the system's.
    public var caFile: String? = nil
    public init(verify: Bool = true, caFile: String? = nil) {
        self.verify = verify
        self.caFile = caFile
    }
}

/// TLS for `weir.http`'s https:// URLs, given by the proxy (WeirProxy's
/// upstream TLS code), so WeirLua itself links no TLS library.
public protocol OutboundTLSProvider: Sendable {
    /// Adds a client TLS handler to `channel` (first in its pipeline) for
    /// `host` (SNI and the name checked, unless an IP address) and completes
    /// when the handshake is done, or fails with the reason.
    func secure(_ channel: Channel, host: String, settings: OutboundTLSSettings) -> EventLoopFuture<Void>
}

/// Keep-alive limits of `weir.http`'s pool (`LuaRuntimeOptions.httpPool`).
public struct OutboundPoolOptions: Sendable {
    /// Idle connections kept per host, port and TLS settings; more are closed.
    public var maxIdlePerHost = 16
    /// An idle connection unused this long is closed.
    public var idleTimeout: TimeAmount = .seconds(30)
    public init() {}
}

enum OutboundHTTP {
    /// Splits `http[s]://host[:port][/path][?query]`.
    static func parse(_ url: String) -> (secure: Bool, host: String, port: Int, target: String)? {
        let secure: Bool
        let rest: Substring
        if url.hasPrefix("http://") { secure = false; rest = url.dropFirst("http://".count) }
        else if url.hasPrefix("https://") { secure = true; rest = url.dropFirst("https://".count) }
        else { return nil }
        let authorityEnd = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let authority = rest[..<authorityEnd]
        var target = String(rest[authorityEnd...])
        if target.isEmpty { target = "/" } else if target.hasPrefix("?") { target = "/" + target }
        var host = Substring(authority)
        var port = secure ? 443 : 80
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return nil }
            let after = host[host.index(after: close)...]
            if after.hasPrefix(":") { guard let p = Int(after.dropFirst()) else { return nil }; port = p }
            host = host[host.index(after: host.startIndex)..<close]
        } else if let colon = host.lastIndex(of: ":") {
            guard let p = Int(host[host.index(after: colon)...]) else { return nil }
            port = p
            host = host[..<colon]
        }
        guard !host.isEmpty, (1...65535).contains(port) else { return nil }
        return (secure, String(host), port, target)
    }
}

/// The keep-alive connections of one Lua runtime; used only on its loop.
final class OutboundConnectionPool {
    struct Key: Hashable {
        var host: String
        var port: Int
        var tls: OutboundTLSSettings?
    }

    let loop: EventLoop
    let tlsProvider: OutboundTLSProvider?
    let options: OutboundPoolOptions
    private var idle: [Key: [OutboundConnection]] = [:]
    /// Set when the runtime's generation is retired: idle connections are
    /// closed and no connection is kept after its exchange (calls still work,
    /// e.g. the final flush of a batch queue).
    private var isClosed = false

    init(loop: EventLoop, tlsProvider: OutboundTLSProvider?, options: OutboundPoolOptions) {
        self.loop = loop
        self.tlsProvider = tlsProvider
        self.options = options
    }

    func perform(_ request: OutboundRequest) -> EventLoopFuture<OutboundResponse> {
        loop.assertInEventLoop()
        let exchange = OutboundExchange(request: request, promise: loop.makePromise())
        let timeout = loop.scheduleTask(in: request.timeout) {
            exchange.fail(OutboundHTTPError(description: "timed out after \(request.timeout.nanoseconds / 1_000_000) ms"))
        }
        exchange.promise.futureResult.whenComplete { _ in timeout.cancel() }
        if request.tls != nil, tlsProvider == nil {
            exchange.fail(OutboundHTTPError(description: "https is not available here (no TLS provider; the proxy gives one)"))
        } else {
            start(exchange, reuse: request.keepAlive)
        }
        return exchange.promise.futureResult
    }

    /// Sends on an idle connection if there is one, else on a new one.
    /// A reused connection that the server closed meanwhile (before any byte
    /// of the answer) sends the exchange here again with `reuse` false.
    func start(_ exchange: OutboundExchange, reuse: Bool) {
        guard !exchange.isDone else { return }
        let request = exchange.request
        if reuse, let connection = takeIdle(request.poolKey) {
            connection.begin(exchange, reused: true)
            return
        }
        let key = request.poolKey
        let connection = OutboundConnection(key: key, pool: self)
        let target = "\(request.host):\(request.port)"
        ClientBootstrap(group: loop)
            .connectTimeout(request.timeout)
            .channelInitializer { channel in
                channel.pipeline.addHTTPClientHandlers().flatMap { channel.pipeline.addHandler(connection) }
            }
            .connect(host: request.host, port: request.port)
            .flatMapError { error in
                self.loop.makeFailedFuture(OutboundHTTPError(description: "cannot connect to \(target): \(error)"))
            }
            .flatMap { channel -> EventLoopFuture<Channel> in
                guard let tls = request.tls, let provider = self.tlsProvider else { return self.loop.makeSucceededFuture(channel) }
                return provider.secure(channel, host: request.host, settings: tls).map { channel }.flatMapErrorThrowing { error in
                    channel.close(promise: nil)
                    throw OutboundHTTPError(description: "\(error)")
                }
            }
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    exchange.fail(error)
                case .success(let channel):
                    if exchange.isDone { channel.close(promise: nil); return }
                    connection.begin(exchange, reused: false)
                }
            }
    }

    private func takeIdle(_ key: Key) -> OutboundConnection? {
        while var list = idle[key], let connection = list.popLast() {
            idle[key] = list.isEmpty ? nil : list
            connection.idleTimer?.cancel()
            if connection.channel?.isActive == true { return connection }
        }
        return nil
    }

    /// An exchange ended cleanly on a keep-alive connection: keep it (bounded).
    func release(_ connection: OutboundConnection) {
        guard !isClosed, let channel = connection.channel, channel.isActive,
              idle[connection.key, default: []].count < options.maxIdlePerHost else {
            connection.channel?.close(promise: nil)
            return
        }
        idle[connection.key, default: []].append(connection)
        connection.idleTimer = loop.scheduleTask(in: options.idleTimeout) { channel.close(promise: nil) }
    }

    /// The connection closed (server, idle timeout, error): forget it.
    func remove(_ connection: OutboundConnection) {
        connection.idleTimer?.cancel()
        guard var list = idle[connection.key] else { return }
        list.removeAll { $0 === connection }
        idle[connection.key] = list.isEmpty ? nil : list
    }

    /// Closes the idle connections; later exchanges close theirs when done.
    func close() {
        isClosed = true
        let all = idle.values.flatMap { $0 }
        idle.removeAll()
        for connection in all { connection.idleTimer?.cancel(); connection.channel?.close(promise: nil) }
    }

    var idleConnectionCount: Int { idle.values.reduce(0) { $0 + $1.count } }

    deinit { close() }
}

/// One `weir.http.request` call; completes its promise exactly once.
final class OutboundExchange {
    let request: OutboundRequest
    let promise: EventLoopPromise<OutboundResponse>
    private(set) var isDone = false
    /// The connection the exchange is on, closed when the exchange fails.
    var connection: OutboundConnection?

    init(request: OutboundRequest, promise: EventLoopPromise<OutboundResponse>) {
        self.request = request
        self.promise = promise
    }

    func fail(_ error: Error) {
        guard !isDone else { return }
        isDone = true
        promise.fail(error)
        connection?.abandon()
    }

    func succeed(_ response: OutboundResponse) {
        guard !isDone else { return }
        isDone = true
        promise.succeed(response)
    }
}

/// The last handler of one outbound connection: runs one exchange at a
/// time, then goes back to the pool when both sides keep the connection.
final class OutboundConnection: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    let key: OutboundConnectionPool.Key
    /// Weak: an idle or in-flight connection may outlive its runtime's pool.
    private weak var pool: OutboundConnectionPool?
    private(set) var channel: Channel?
    var idleTimer: Scheduled<Void>?
    private var exchange: OutboundExchange?
    private var reused = false
    private var head: HTTPResponseHead?
    private var body: [UInt8] = []
    private var receivedAnything = false
    /// Whether this exchange asked to keep the connection afterwards.
    private var keepAfter = true

    init(key: OutboundConnectionPool.Key, pool: OutboundConnectionPool) {
        self.key = key
        self.pool = pool
    }

    func handlerAdded(context: ChannelHandlerContext) { channel = context.channel }

    func begin(_ exchange: OutboundExchange, reused: Bool) {
        guard let channel else { return exchange.fail(OutboundHTTPError(description: "connection gone")) }
        self.exchange = exchange
        self.reused = reused
        head = nil
        body = []
        receivedAnything = false
        exchange.connection = self
        let request = exchange.request
        var head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: request.method), uri: request.target)
        let defaultPort = request.tls == nil ? 80 : 443
        let hostName = request.host.contains(":") ? "[\(request.host)]" : request.host
        if !request.headers.contains(where: { $0.0.lowercased() == "host" }) {
            head.headers.add(name: "host", value: request.port == defaultPort ? hostName : "\(hostName):\(request.port)")
        }
        for (name, value) in request.headers { head.headers.add(name: name, value: value) }
        // A plugin's own `connection: close` header counts like keepalive = false.
        keepAfter = request.keepAlive && !head.headers["connection"].contains { $0.lowercased().contains("close") }
        if !keepAfter { head.headers.replaceOrAdd(name: "connection", value: "close") }
        if let body = request.body { head.headers.replaceOrAdd(name: "content-length", value: String(body.count)) }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if let body = request.body {
            channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil)
        }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil)).whenFailure { [weak self] error in
            self?.lost(OutboundHTTPError(description: "write failed: \(error)"))
        }
    }

    /// The exchange failed (timeout, too large): the connection is not reusable.
    func abandon() {
        exchange = nil
        channel?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let exchange else {
            // Bytes nobody asked for: the connection cannot be trusted any more.
            context.close(promise: nil)
            return
        }
        receivedAnything = true
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
        case .body(var buffer):
            guard body.count + buffer.readableBytes <= exchange.request.maxBodyBytes else {
                return exchange.fail(OutboundHTTPError(description: "response body larger than \(exchange.request.maxBodyBytes) bytes"))
            }
            body.append(contentsOf: buffer.readBytes(length: buffer.readableBytes) ?? [])
        case .end:
            guard let h = head else { return exchange.fail(OutboundHTTPError(description: "response without a head")) }
            self.exchange = nil
            exchange.connection = nil
            let response = OutboundResponse(status: Int(h.status.code), headers: h.headers.map { ($0.name.lowercased(), $0.value) }, body: body)
            body = []
            if keepAfter && h.isKeepAlive, let pool { pool.release(self) } else { context.close(promise: nil) }
            exchange.succeed(response)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        lost(OutboundHTTPError(description: "\(error)"))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        pool?.remove(self)
        lost(OutboundHTTPError(description: "connection closed before the response was complete"))
        context.fireChannelInactive()
    }

    /// The connection broke during an exchange. On a reused connection
    /// before any byte of the answer, the server most likely closed it while
    /// idle: the exchange is sent once more on a new connection.
    private func lost(_ error: OutboundHTTPError) {
        guard let exchange else { return }
        self.exchange = nil
        exchange.connection = nil
        channel?.close(promise: nil)
        if reused && !receivedAnything, let pool {
            pool.start(exchange, reuse: false)
        } else {
            exchange.fail(error)
        }
    }
}
