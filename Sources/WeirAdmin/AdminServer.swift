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

    public init(isReady: @escaping @Sendable () -> Bool,
                metricsText: @escaping @Sendable () -> String,
                configText: @escaping @Sendable () -> String,
                upstreamsJSON: (@Sendable () -> String)? = nil) {
        self.isReady = isReady; self.metricsText = metricsText; self.configText = configText
        self.upstreamsJSON = upstreamsJSON
    }
}

/// The admin listener: a small HTTP/1.1 server, loopback by default.
///
/// - `GET /healthz` 200 `{"status":"ok"}` while the process is up
/// - `GET /ready`   200 `{"status":"ready"}`, or 503 `{"status":"not ready"}`
/// - `GET /metrics` Prometheus text
/// - `GET /config`  the running config (YAML, secrets redacted)
/// - `GET /upstreams` every target's health (JSON), when wired
/// - anything else 404 (unknown path) or 405 (method other than GET/HEAD), JSON
///
/// Admin traffic is rare, so simplicity wins over speed here.
public final class AdminServer: @unchecked Sendable {
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
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(endpoints: endpoints))
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

/// One admin response, built off the I/O path.
public struct AdminResponse: Sendable, Equatable {
    public var status: HTTPResponseStatus
    public var contentType: String
    public var body: String

    static func json(_ status: HTTPResponseStatus, _ body: String) -> AdminResponse {
        AdminResponse(status: status, contentType: "application/json", body: body + "\n")
    }

    /// Routes one admin request. Pure, so tests and the handler share it.
    public static func route(method: HTTPMethod, path: String, endpoints: AdminEndpoints) -> AdminResponse {
        let pathOnly = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? path
        var known = ["/healthz", "/ready", "/metrics", "/config"]
        if endpoints.upstreamsJSON != nil { known.append("/upstreams") }
        guard known.contains(pathOnly) else {
            return .json(.notFound, #"{"error":"not found","path":"\#(jsonEscape(pathOnly))"}"#)
        }
        guard method == .GET || method == .HEAD else {
            return .json(.methodNotAllowed, #"{"error":"method not allowed","allowed":["GET","HEAD"]}"#)
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

    static func jsonEscape(_ s: String) -> String {
        var out = ""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case _ where scalar.value < 0x20: out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}

private final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let endpoints: AdminEndpoints
    private var pending: HTTPRequestHead?

    init(endpoints: AdminEndpoints) { self.endpoints = endpoints }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            pending = head
        case .body:
            break // admin endpoints take no body; ignore it
        case .end:
            guard let head = pending else { return }
            pending = nil
            respond(context: context, to: head)
        }
    }

    private func respond(context: ChannelHandlerContext, to request: HTTPRequestHead) {
        let response = AdminResponse.route(method: request.method, path: request.uri, endpoints: endpoints)
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
            done.whenComplete { _ in context.close(promise: nil) }
        }
    }
}
