import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore

/// A small, fast HTTP/1.1 origin for `make run`, examples and tests
/// (`weir demo-upstream`). Keep-alive and pipelining are supported.
///
/// - `GET /healthz`       200 `ok`
/// - `ANY /echo`          200 JSON `{"method","path","headers":[[name,value]...],"body_bytes"}`
/// - `ANY /status/<code>` that status, small JSON body
/// - `ANY /delay/<ms>`    the fixed body after `ms` milliseconds (for drain/timeouts)
/// - anything else        200 with the fixed body of `bodySize` bytes
///
/// Every response carries `x-demo-upstream: <listen address>` so a test can
/// tell which target answered.
public final class DemoUpstream: @unchecked Sendable {
    private let address: HostPort
    private let group: EventLoopGroup
    private let bodySize: Int
    private let onRequest: (@Sendable (HTTPRequestHead) -> Void)?
    private var channel: Channel?

    /// - Parameter onRequest: called on the event loop for every request head
    ///   received (tests use it to know a request reached the origin); nil
    ///   costs nothing.
    public init(listen address: HostPort, bodySize: Int = 1024, group: EventLoopGroup,
                onRequest: (@Sendable (HTTPRequestHead) -> Void)? = nil) {
        self.address = address
        self.bodySize = bodySize
        self.group = group
        self.onRequest = onRequest
    }

    public func start() -> EventLoopFuture<Void> {
        let fixedBody = DemoUpstream.makeBody(size: bodySize)
        let identity = address.description
        let onRequest = self.onRequest
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 1024)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(
                        DemoUpstreamHandler(fixedBody: fixedBody, identity: identity, onRequest: onRequest))
                }
            }
        return bootstrap.bind(host: address.host, port: address.port).map { self.channel = $0 }
    }

    /// The bound address (useful after binding port 0).
    public var boundAddress: SocketAddress? { channel?.localAddress }

    /// Resolves when the listener closes.
    public var closeFuture: EventLoopFuture<Void>? { channel?.closeFuture }

    /// Stops accepting; open connections are closed too, so a health check
    /// sees the target as down.
    public func stop() -> EventLoopFuture<Void> {
        guard let channel = channel else { return group.next().makeSucceededVoidFuture() }
        return channel.close()
    }

    static func makeBody(size: Int) -> ByteBuffer {
        let pattern = Array("weir demo upstream\n".utf8)
        var buffer = ByteBufferAllocator().buffer(capacity: size)
        for i in 0..<size { buffer.writeInteger(pattern[i % pattern.count]) }
        return buffer
    }
}

private final class DemoUpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum Action {
        case fixed
        case healthz
        case echo
        case status(Int)
        case delay(Int64)
    }

    private let fixedBody: ByteBuffer
    private let identity: String
    private let fixedHeaders: HTTPHeaders
    private let onRequest: (@Sendable (HTTPRequestHead) -> Void)?
    private var head: HTTPRequestHead?
    private var action: Action = .fixed
    private var bodyBytes = 0

    init(fixedBody: ByteBuffer, identity: String, onRequest: (@Sendable (HTTPRequestHead) -> Void)?) {
        self.fixedBody = fixedBody
        self.onRequest = onRequest
        self.identity = identity
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "text/plain")
        headers.add(name: "Content-Length", value: "\(fixedBody.readableBytes)")
        headers.add(name: "x-demo-upstream", value: identity)
        self.fixedHeaders = headers
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let requestHead):
            head = requestHead
            bodyBytes = 0
            onRequest?(requestHead)
            action = Self.action(for: requestHead.uri)
        case .body(let buffer):
            bodyBytes += buffer.readableBytes
        case .end:
            guard let requestHead = head else { return }
            head = nil
            respond(context: context, request: requestHead)
        }
    }

    private static func action(for uri: String) -> Action {
        let path = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        if path == "/healthz" { return .healthz }
        if path == "/echo" { return .echo }
        if path.hasPrefix("/status/"), let code = Int(path.dropFirst("/status/".count)), (100...999).contains(code) {
            return .status(code)
        }
        if path.hasPrefix("/delay/"), let ms = Int64(path.dropFirst("/delay/".count)), ms >= 0 {
            return .delay(ms)
        }
        return .fixed
    }

    private func respond(context: ChannelHandlerContext, request: HTTPRequestHead) {
        switch action {
        case .fixed:
            send(context: context, request: request, status: .ok, headers: fixedHeaders, body: fixedBody)
        case .healthz:
            sendText(context: context, request: request, status: .ok, contentType: "text/plain", body: "ok\n")
        case .echo:
            sendText(context: context, request: request, status: .ok, contentType: "application/json",
                     body: echoJSON(request))
        case .status(let code):
            sendText(context: context, request: request, status: HTTPResponseStatus(statusCode: code),
                     contentType: "application/json", body: "{\"status\":\(code)}\n")
        case .delay(let ms):
            let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
            context.eventLoop.scheduleTask(in: .milliseconds(ms)) {
                let context = loopBoundContext.value
                guard context.channel.isActive else { return }
                self.send(context: context, request: request, status: .ok, headers: self.fixedHeaders,
                          body: self.fixedBody)
            }
        }
    }

    private func echoJSON(_ request: HTTPRequestHead) -> String {
        func quoted(_ s: String) -> String { "\"" + AdminResponse.jsonEscape(s) + "\"" }
        let headers = request.headers.map { "[\(quoted($0.name)),\(quoted($0.value))]" }.joined(separator: ",")
        return "{\"method\":\(quoted(request.method.rawValue)),\"path\":\(quoted(request.uri)),"
            + "\"version\":\(quoted("\(request.version)")),\"headers\":[\(headers)],\"body_bytes\":\(bodyBytes)}\n"
    }

    private func sendText(context: ChannelHandlerContext, request: HTTPRequestHead, status: HTTPResponseStatus,
                          contentType: String, body: String) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.utf8.count)")
        headers.add(name: "x-demo-upstream", value: identity)
        send(context: context, request: request, status: status, headers: headers,
             body: context.channel.allocator.buffer(string: body))
    }

    private func send(context: ChannelHandlerContext, request: HTTPRequestHead, status: HTTPResponseStatus,
                      headers: HTTPHeaders, body: ByteBuffer) {
        var headers = headers
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.replaceOrAdd(name: "Connection", value: "close") }
        let noBody = request.method == .HEAD || status.code == 204 || status.code == 304 || status.code < 200
        if noBody && (status.code == 204 || status.code < 200) { headers.remove(name: "Content-Length") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status,
                                                              headers: headers))), promise: nil)
        if !noBody { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        if keepAlive {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        } else {
            let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                loopBoundContext.value.close(promise: nil)
            }
        }
    }
}
