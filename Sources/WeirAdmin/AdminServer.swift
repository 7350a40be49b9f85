import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore

/// What the admin endpoints report. Closures so the admin listener depends
/// on nothing but what it shows; `weir run` wires them to the proxy.
public struct AdminEndpoints: Sendable {
    /// `/ready` answers 200 only while this is true (listeners bound, not draining).
    public var isReady: @Sendable () -> Bool
    /// `/metrics` body, Prometheus text format 0.0.4.
    public var metricsText: @Sendable () -> String
    /// `/config` body: the running config with secrets redacted.
    public var configText: @Sendable () -> String
    /// `/upstreams` body (JSON, see `UpstreamStatusReport`); nil = 404.
    public var upstreamsJSON: (@Sendable () -> String)?
    /// More endpoints (e.g. `POST /reload`, `GET /status`), matched by
    /// method and exact path before the built-in ones.
    public var routes: [AdminRoute]

    public init(isReady: @escaping @Sendable () -> Bool,
                metricsText: @escaping @Sendable () -> String,
                configText: @escaping @Sendable () -> String,
                upstreamsJSON: (@Sendable () -> String)? = nil,
                routes: [AdminRoute] = []) {
        self.isReady = isReady; self.metricsText = metricsText; self.configText = configText
        self.upstreamsJSON = upstreamsJSON
        self.routes = routes
    }
}

/// A request to an admin endpoint, body included (admin bodies are small;
/// more than `AdminServer.maxBodyBytes` gets 413).
public struct AdminRequest: Sendable {
    public var method: HTTPMethod
    /// The path without the query string.
    public var path: String
    /// The query string without `?`, if any.
    public var query: String?
    public var headers: HTTPHeaders
    public var body: ByteBuffer
}

/// An extra admin endpoint. The handler may finish later (e.g. a reload
/// built off the event loops): it returns a future on any event loop.
public struct AdminRoute: Sendable {
    public var method: HTTPMethod
    public var path: String
    public var handler: @Sendable (AdminRequest, EventLoop) -> EventLoopFuture<AdminResponse>

    public init(method: HTTPMethod, path: String,
                handler: @escaping @Sendable (AdminRequest, EventLoop) -> EventLoopFuture<AdminResponse>) {
        self.method = method; self.path = path; self.handler = handler
    }
}

/// The admin listener: a small HTTP/1.1 server, loopback by default.
///
/// - `GET /healthz` 200 `{"status":"ok"}` while the process is up
/// - `GET /ready`   200 `{"status":"ready"}`, or 503 `{"status":"not ready"}`
/// - `GET /metrics` Prometheus text
/// - `GET /config`  the running config (YAML, secrets redacted)
/// - `GET /upstreams` every target's health (JSON), when wired
/// - extra `AdminRoute`s (e.g. `POST /reload`), when wired
/// - anything else 404 (unknown path) or 405 (known path, other method), JSON
///
/// Admin traffic is rare, so simplicity wins over speed here.
public final class AdminServer: @unchecked Sendable {
    /// Largest request body an admin endpoint accepts.
    public static let maxBodyBytes = 1024 * 1024

    private let address: HostPort
    private let group: EventLoopGroup
    private let endpoints: AdminEndpoints
    private let logger: Logger
    private var channel: Channel?

    public init(listen address: HostPort, group: EventLoopGroup, endpoints: AdminEndpoints, logger: Logger) {
        self.address = address
        self.group = group
        self.endpoints = endpoints
        self.logger = logger
    }

    /// Binds the listener. Port 0 picks a free port (see `boundAddress`).
    public func start() -> EventLoopFuture<Void> {
        let endpoints = self.endpoints
        let logger = self.logger
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(endpoints: endpoints, logger: logger))
                }
            }
        return bootstrap.bind(host: address.host, port: address.port).map { channel in
            self.channel = channel
        }
    }

    /// The bound address, e.g. to learn the port after binding port 0.
    public var boundAddress: SocketAddress? { channel?.localAddress }

    public func stop() -> EventLoopFuture<Void> {
        guard let channel = channel else { return group.next().makeSucceededVoidFuture() }
        return channel.close()
    }
}

/// One admin response.
public struct AdminResponse: Sendable, Equatable {
    public var status: HTTPResponseStatus
    public var contentType: String
    public var body: String

    public init(status: HTTPResponseStatus, contentType: String, body: String) {
        self.status = status; self.contentType = contentType; self.body = body
    }

    /// A JSON response; `body` must already be JSON. A newline is added.
    public static func json(_ status: HTTPResponseStatus, _ body: String) -> AdminResponse {
        AdminResponse(status: status, contentType: "application/json", body: body + "\n")
    }

    /// `{"error": message}` with the given status.
    public static func error(_ status: HTTPResponseStatus, _ message: String) -> AdminResponse {
        .json(status, #"{"error":"\#(jsonEscape(message))"}"#)
    }

    /// Routes a request to a built-in endpoint (no body, answered at once);
    /// nil when an extra `AdminRoute` must handle it.
    public static func route(method: HTTPMethod, path: String, endpoints: AdminEndpoints) -> AdminResponse? {
        let pathOnly = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? path
        if endpoints.routes.contains(where: { $0.path == pathOnly && $0.method == method }) { return nil }
        var builtIn = ["/healthz", "/ready", "/metrics", "/config"]
        if endpoints.upstreamsJSON != nil { builtIn.append("/upstreams") }
        let extraMethods = endpoints.routes.filter { $0.path == pathOnly }.map(\.method.rawValue)
        guard builtIn.contains(pathOnly) || !extraMethods.isEmpty else {
            return .json(.notFound, #"{"error":"not found","path":"\#(jsonEscape(pathOnly))"}"#)
        }
        guard builtIn.contains(pathOnly), method == .GET || method == .HEAD else {
            let allowed = builtIn.contains(pathOnly) ? ["GET", "HEAD"] : extraMethods
            let list = allowed.map { "\"\($0)\"" }.joined(separator: ",")
            return .json(.methodNotAllowed, #"{"error":"method not allowed","allowed":[\#(list)]}"#)
        }
        switch pathOnly {
        case "/healthz":
            return .json(.ok, #"{"status":"ok"}"#)
        case "/ready":
            return endpoints.isReady()
                ? .json(.ok, #"{"status":"ready"}"#)
                : .json(.serviceUnavailable, #"{"status":"not ready"}"#)
        case "/metrics":
            return AdminResponse(status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8",
                                 body: endpoints.metricsText())
        case "/upstreams":
            return .json(.ok, endpoints.upstreamsJSON?() ?? "{}")
        default: // "/config"
            return AdminResponse(status: .ok, contentType: "application/yaml; charset=utf-8",
                                 body: endpoints.configText())
        }
    }

    public static func jsonEscape(_ s: String) -> String {
        var out = ""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}

private final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        case idle
        /// Reading a request for a built-in endpoint: its body is ignored.
        case readingBuiltIn(HTTPRequestHead)
        /// Reading a request for an extra route: its body is collected.
        case readingRoute(HTTPRequestHead, AdminRoute, ByteBuffer)
        /// Body too large: answer 413 at the end.
        case rejecting(HTTPRequestHead)
        /// A route handler is running; HTTPServerPipelineHandler holds back
        /// pipelined requests until this response ends.
        case responding
    }

    private let endpoints: AdminEndpoints
    private let logger: Logger
    private var state = State.idle

    init(endpoints: AdminEndpoints, logger: Logger) {
        self.endpoints = endpoints
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch (unwrapInboundIn(data), state) {
        case (.head(let head), .idle):
            let path = String(head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
            if let route = endpoints.routes.first(where: { $0.path == path && $0.method == head.method }) {
                state = .readingRoute(head, route, context.channel.allocator.buffer(capacity: 0))
            } else {
                state = .readingBuiltIn(head)
            }
        case (.body(var chunk), .readingRoute(let head, let route, var body)):
            if body.readableBytes + chunk.readableBytes > AdminServer.maxBodyBytes {
                state = .rejecting(head)
            } else {
                body.writeBuffer(&chunk)
                state = .readingRoute(head, route, body)
            }
        case (.body, _):
            break // built-in endpoints take no body; a rejected one is dropped
        case (.end, .readingBuiltIn(let head)):
            state = .idle
            let response = AdminResponse.route(method: head.method, path: head.uri, endpoints: endpoints)
                ?? .error(.internalServerError, "no handler")
            write(response, for: head, context: context)
        case (.end, .rejecting(let head)):
            state = .idle
            write(.error(.payloadTooLarge, "admin request bodies are limited to \(AdminServer.maxBodyBytes) bytes"),
                  for: head, context: context)
        case (.end, .readingRoute(let head, let route, let body)):
            state = .responding
            run(route, head: head, body: body, context: context)
        default:
            // Unexpected order (e.g. a head while responding): the pipeline
            // handler prevents it; refuse rather than guess.
            context.close(promise: nil)
        }
    }

    private func run(_ route: AdminRoute, head: HTTPRequestHead, body: ByteBuffer, context: ChannelHandlerContext) {
        let parts = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let request = AdminRequest(method: head.method, path: String(parts.first ?? ""),
                                   query: parts.count > 1 ? String(parts[1]) : nil, headers: head.headers, body: body)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        route.handler(request, context.eventLoop)
            .hop(to: context.eventLoop)
            .whenComplete { result in
                let (handler, context) = loopBound.value
                handler.state = .idle
                switch result {
                case .success(let response):
                    handler.write(response, for: head, context: context)
                case .failure(let error):
                    handler.logger.error("admin endpoint failed", metadata: ["path": "\(route.path)", "error": "\(error)"])
                    handler.write(.error(.internalServerError, "\(error)"), for: head, context: context)
                }
            }
    }

    private func write(_ response: AdminResponse, for request: HTTPRequestHead, context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: "\(response.body.utf8.count)")
        headers.add(name: "Cache-Control", value: "no-store")
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: response.status,
                                                              headers: headers))), promise: nil)
        if request.method != .HEAD {
            let buffer = context.channel.allocator.buffer(string: response.body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            done.whenComplete { _ in loopBound.value.close(promise: nil) }
        }
    }
}
