import NIOCore
import NIOHTTP1
import NIOPosix

/// `weir.http.request`: one HTTP/1.1 exchange per call on a fresh
/// connection (`connection: close`), run on the plugin's own event loop so
/// the coroutine resumes there. Plain http:// only for now (https needs
/// the TLS contexts of the proxy).
struct OutboundRequest {
    var method: String = "GET"
    var host: String
    var port: Int
    var target: String
    var headers: [(String, String)] = []
    var body: [UInt8]? = nil
    var timeout: TimeAmount = .seconds(5)
    var maxBodyBytes: Int = 1 << 20
}

struct OutboundResponse {
    var status: Int
    var headers: [(String, String)]
    var body: [UInt8]
}

struct OutboundHTTPError: Error, CustomStringConvertible {
    var description: String
}

enum OutboundHTTP {
    /// Splits `http://host[:port][/path][?query]`.
    static func parse(_ url: String) -> (host: String, port: Int, target: String)? {
        guard url.hasPrefix("http://") else { return nil }
        let rest = url.dropFirst("http://".count)
        let authorityEnd = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let authority = rest[..<authorityEnd]
        var target = String(rest[authorityEnd...])
        if target.isEmpty { target = "/" } else if target.hasPrefix("?") { target = "/" + target }
        var host = Substring(authority)
        var port = 80
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
        return (String(host), port, target)
    }

    static func perform(_ request: OutboundRequest, on loop: EventLoop) -> EventLoopFuture<OutboundResponse> {
        let promise = loop.makePromise(of: OutboundResponse.self)
        let handler = ResponseCollector(promise: promise, maxBodyBytes: request.maxBodyBytes)
        let timeout = loop.scheduleTask(in: request.timeout) {
            handler.fail(OutboundHTTPError(description: "timed out after \(request.timeout.nanoseconds / 1_000_000) ms"))
        }
        promise.futureResult.whenComplete { _ in timeout.cancel() }
        ClientBootstrap(group: loop)
            .connectTimeout(request.timeout)
            .channelInitializer { channel in
                channel.pipeline.addHTTPClientHandlers().flatMap { channel.pipeline.addHandler(handler) }
            }
            .connect(host: request.host, port: request.port)
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    handler.fail(OutboundHTTPError(description: "cannot connect to \(request.host):\(request.port): \(error)"))
                case .success(let channel):
                    handler.channel = channel
                    if handler.isDone { channel.close(promise: nil); return }
                    var head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: request.method), uri: request.target)
                    let hostHeader = request.port == 80 ? request.host : "\(request.host):\(request.port)"
                    if !request.headers.contains(where: { $0.0.lowercased() == "host" }) { head.headers.add(name: "host", value: hostHeader) }
                    for (name, value) in request.headers { head.headers.add(name: name, value: value) }
                    head.headers.replaceOrAdd(name: "connection", value: "close")
                    if let body = request.body { head.headers.replaceOrAdd(name: "content-length", value: String(body.count)) }
                    channel.write(HTTPClientRequestPart.head(head), promise: nil)
                    if let body = request.body {
                        channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil)
                    }
                    channel.writeAndFlush(HTTPClientRequestPart.end(nil)).whenFailure { error in
                        handler.fail(OutboundHTTPError(description: "write failed: \(error)"))
                    }
                }
            }
        return promise.futureResult
    }
}

/// Collects one response; completes the promise exactly once.
private final class ResponseCollector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    private let promise: EventLoopPromise<OutboundResponse>
    private let maxBodyBytes: Int
    private var head: HTTPResponseHead?
    private var body: [UInt8] = []
    private(set) var isDone = false
    var channel: Channel?

    init(promise: EventLoopPromise<OutboundResponse>, maxBodyBytes: Int) {
        self.promise = promise
        self.maxBodyBytes = maxBodyBytes
    }

    func fail(_ error: Error) {
        guard !isDone else { return }
        isDone = true
        promise.fail(error)
        channel?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !isDone else { return }
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
        case .body(var buffer):
            guard body.count + buffer.readableBytes <= maxBodyBytes else {
                return fail(OutboundHTTPError(description: "response body larger than \(maxBodyBytes) bytes"))
            }
            body.append(contentsOf: buffer.readBytes(length: buffer.readableBytes) ?? [])
        case .end:
            guard let h = head else { return fail(OutboundHTTPError(description: "response without a head")) }
            isDone = true
            promise.succeed(OutboundResponse(status: Int(h.status.code), headers: h.headers.map { ($0.name.lowercased(), $0.value) }, body: body))
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        fail(OutboundHTTPError(description: "\(error)"))
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(OutboundHTTPError(description: "connection closed before the response was complete"))
    }
}
