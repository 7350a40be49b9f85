// A real HTTP/1.1 server on loopback whose answers a test scripts: the
// external services plugins talk to (ext-authz's auth service, http-log's
// and tracing's collectors). It keeps every request with its body.

import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// One request as the scripted server received it.
struct ScriptedRequest: Sendable {
    var method: String
    var uri: String
    var headers: [(String, String)]
    var body: [UInt8]

    var bodyText: String { String(decoding: body, as: UTF8.self) }
    func header(_ name: String) -> String? {
        headers.first { $0.0.lowercased() == name.lowercased() }?.1
    }
    /// The body parsed as JSON (nil if it is not JSON).
    var json: Any? { try? JSONSerialization.jsonObject(with: Data(body)) }
}

/// What the server answers (after `delay`, without blocking its loop).
struct ScriptedReply: Sendable {
    var status: Int = 200
    var headers: [(String, String)] = []
    var body: String = ""
    var delay: TimeAmount = .zero
    /// Sent chunked, in two halves, without Content-Length.
    var chunked = false
}

final class ScriptedHTTPServer: @unchecked Sendable {
    typealias Script = @Sendable (ScriptedRequest) -> ScriptedReply
    private(set) var channel: Channel!
    private let seen = NIOLockedValueBox<[ScriptedRequest]>([])
    private let script: NIOLockedValueBox<Script>
    private let accepted = NIOLockedValueBox(0)
    /// TCP connections accepted so far (keep-alive reuse shows as fewer
    /// connections than requests).
    var connections: Int { accepted.withLockedValue { $0 } }

    /// Kept after `stop()`, so a test can point at the closed port.
    private(set) var port = 0
    private let scheme: String
    var url: String { "\(scheme)://127.0.0.1:\(port)" }
    var requests: [ScriptedRequest] { seen.withLockedValue { $0 } }

    /// `tls`: serve https with this certificate and key (PEM files).
    init(group: EventLoopGroup, tls: (cert: String, key: String)? = nil,
         script: @escaping Script = { _ in ScriptedReply() }) throws {
        self.script = NIOLockedValueBox(script)
        scheme = tls == nil ? "http" : "https"
        let context = try tls.map { tls in
            try NIOSSLContext(configuration: TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(tls.cert).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: tls.key, format: .pem))))
        }
        let seen = self.seen
        let scriptBox = self.script
        let accepted = self.accepted
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                accepted.withLockedValue { $0 += 1 }
                do {
                    if let context { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context)) }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(Handler(seen: seen, script: scriptBox))
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        port = channel.localAddress!.port!
    }

    /// Changes the answers from now on.
    func setScript(_ script: @escaping Script) { self.script.withLockedValue { $0 = script } }

    /// Waits (polling, up to `timeout` seconds) until `condition` holds for
    /// the requests received so far; returns them either way.
    @discardableResult
    func waitForRequests(timeout: Double = 5, _ condition: ([ScriptedRequest]) -> Bool) -> [ScriptedRequest] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let now = requests
            if condition(now) || Date() > deadline { return now }
            usleep(10_000)
        }
    }

    func stop() { try? channel.close().wait() }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let seen: NIOLockedValueBox<[ScriptedRequest]>
        let script: NIOLockedValueBox<Script>
        var current: ScriptedRequest?

        init(seen: NIOLockedValueBox<[ScriptedRequest]>, script: NIOLockedValueBox<Script>) {
            self.seen = seen
            self.script = script
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                current = ScriptedRequest(method: head.method.rawValue, uri: head.uri,
                                          headers: head.headers.map { ($0.name, $0.value) }, body: [])
            case .body(let buffer):
                current?.body.append(contentsOf: buffer.readableBytesView)
            case .end:
                guard let request = current else { return }
                current = nil
                seen.withLockedValue { $0.append(request) }
                let reply = script.withLockedValue { $0 }(request)
                let channel = context.channel
                let respond = {
                    var headers = HTTPHeaders(reply.headers)
                    if reply.chunked {
                        headers.replaceOrAdd(name: "transfer-encoding", value: "chunked")
                    } else {
                        headers.replaceOrAdd(name: "content-length", value: String(reply.body.utf8.count))
                    }
                    let head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: reply.status),
                                                headers: headers)
                    channel.write(HTTPServerResponsePart.head(head), promise: nil)
                    let bytes = Array(reply.body.utf8)
                    let parts = reply.chunked ? [bytes[..<(bytes.count / 2)], bytes[(bytes.count / 2)...]] : [bytes[...]]
                    for part in parts where !part.isEmpty {
                        var buffer = channel.allocator.buffer(capacity: part.count)
                        buffer.writeBytes(part)
                        channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(buffer)), promise: nil)
                    }
                    channel.writeAndFlush(HTTPServerResponsePart.end(nil), promise: nil)
                }
                if reply.delay == .zero {
                    respond()
                } else {
                    context.eventLoop.scheduleTask(in: reply.delay) { respond() }
                }
            }
        }
    }
}
