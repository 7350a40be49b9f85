import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore
import XCTest

/// A minimal real HTTP/1.1 client for the ops tests (admin, health, CLI):
/// one request per connection, whole response collected.
struct OpsTestResponse {
    var status: Int
    var headers: HTTPHeaders
    var body: String
}

enum OpsTestHTTP {
    static func request(host: String = "127.0.0.1", port: Int, method: HTTPMethod = .GET, path: String,
                        headers: [(String, String)] = [], group: EventLoopGroup,
                        timeout: TimeAmount = .seconds(10)) throws -> OpsTestResponse {
        let promise = group.next().makePromise(of: OpsTestResponse.self)
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise))
                }
            }
        let channel: Channel
        do {
            channel = try bootstrap.connect(host: host, port: port).wait()
        } catch {
            promise.fail(error) // NIO insists every promise is completed
            throw error
        }
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
        head.headers.add(name: "Host", value: "\(host):\(port)")
        head.headers.add(name: "Connection", value: "close")
        for (name, value) in headers { head.headers.add(name: name, value: value) }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        try channel.writeAndFlush(HTTPClientRequestPart.end(nil)).wait()
        let timeoutTask = channel.eventLoop.scheduleTask(in: timeout) {
            promise.fail(ChannelError.connectTimeout(timeout))
        }
        defer { timeoutTask.cancel(); channel.close(promise: nil) }
        return try promise.futureResult.wait()
    }

    /// Polls until `condition` holds or `timeout` passes. Tests use it to
    /// wait for asynchronous effects (probes, flushes) without fixed sleeps
    /// deciding pass/fail.
    static func eventually(timeout: TimeInterval = 10, _ description: String,
                           file: StaticString = #filePath, line: UInt = #line,
                           _ condition: () throws -> Bool) rethrows {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if try condition() { return }
            usleep(20_000)
        }
        XCTFail("timed out waiting for: \(description)", file: file, line: line)
    }
}

private final class ResponseCollector: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    private let promise: EventLoopPromise<OpsTestResponse>
    private var head: HTTPResponseHead?
    private var body = ByteBuffer()

    init(promise: EventLoopPromise<OpsTestResponse>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body(var b): body.writeBuffer(&b)
        case .end:
            guard let h = head else { return }
            promise.succeed(OpsTestResponse(status: Int(h.status.code), headers: h.headers,
                                            body: String(buffer: body)))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(ChannelError.eof)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}

extension SocketAddress {
    var portOrZero: Int { port ?? 0 }
}
