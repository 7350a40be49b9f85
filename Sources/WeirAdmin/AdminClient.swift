import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore

/// A blocking one-shot HTTP/1.1 client for talking to a running gateway's
/// admin listener from the CLI (`weir reload`). Not for the data path.
public enum AdminClient {
    public struct Response: Sendable {
        public var status: Int
        public var body: String
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Sends one request (`Connection: close`) and waits for the whole response.
    public static func send(method: HTTPMethod, to address: HostPort, path: String, body: String? = nil,
                            timeout: TimeAmount = .seconds(30)) throws -> Response {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        let promise = loop.makePromise(of: Response.self)
        let channel: Channel
        do {
            channel = try ClientBootstrap(group: loop)
                .connectTimeout(min(timeout, .seconds(5)))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(CollectResponse(promise: promise))
                    }
                }
                .connect(host: address.host, port: address.port).wait()
        } catch {
            promise.fail(error)
            throw Failure(description: "cannot reach the admin listener at \(address): \(error)")
        }
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
        head.headers.add(name: "Host", value: address.description)
        head.headers.add(name: "Connection", value: "close")
        head.headers.add(name: "Content-Length", value: "\(body?.utf8.count ?? 0)")
        if body != nil { head.headers.add(name: "Content-Type", value: "application/json") }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if let body = body {
            channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(string: body))), promise: nil)
        }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let deadline = loop.scheduleTask(in: timeout) {
            promise.fail(Failure(description: "no answer from \(address) within \(timeout.nanoseconds / 1_000_000_000)s"))
        }
        defer {
            deadline.cancel()
            channel.close(promise: nil)
        }
        return try promise.futureResult.wait()
    }
}

private final class CollectResponse: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    private let promise: EventLoopPromise<AdminClient.Response>
    private var status: Int?
    private var body = ByteBuffer()

    init(promise: EventLoopPromise<AdminClient.Response>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): status = Int(head.status.code)
        case .body(var chunk): body.writeBuffer(&chunk)
        case .end:
            if let status = status { promise.succeed(.init(status: status, body: String(buffer: body))) }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(AdminClient.Failure(description: "the admin listener closed the connection without an answer"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
