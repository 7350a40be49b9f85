// TLS test fixtures: a throwaway PKI made with the `openssl` CLI in a temp
// folder at test time (no key is committed), a TLS-capable test upstream,
// a NIO TLS client that keeps its connection open, and a curl runner.

import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import WeirCore
import XCTest

/// Certificates under one test CA (EC P-256, valid two days), plus a
/// second, unrelated CA for "wrong CA" cases.
final class TestPKI: @unchecked Sendable {
    let dir: String

    /// One PKI per test process: generating keys is the slow part.
    static let shared: TestPKI = {
        do { return try TestPKI() } catch { fatalError("cannot build the test PKI with openssl: \(error)") }
    }()

    struct Failure: Error, CustomStringConvertible { let description: String }

    init() throws {
        dir = NSTemporaryDirectory() + "weir-pki-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try makeCA("ca", subject: "/CN=Weir Test CA")
        try makeCA("other-ca", subject: "/CN=Some Other CA")
        try issue("a", ca: "ca", subject: "/CN=a.example.com", sans: "DNS:a.example.com")
        try issue("wild", ca: "ca", subject: "/CN=wildcard", sans: "DNS:*.example.com")
        try issue("default", ca: "ca", subject: "/CN=default.test", sans: "DNS:default.test")
        try issue("localhost", ca: "ca", subject: "/CN=localhost", sans: "DNS:localhost,IP:127.0.0.1")
        try issue("client", ca: "ca", subject: "/CN=alice/O=Weir Tests",
                  sans: "DNS:alice.internal,URI:spiffe://weir.test/ns/default/sa/alice,email:alice@weir.test")
        try issue("stranger", ca: "other-ca", subject: "/CN=mallory", sans: "DNS:mallory.internal")
        try issue("other-localhost", ca: "other-ca", subject: "/CN=localhost", sans: "DNS:localhost,IP:127.0.0.1")
    }

    func cert(_ name: String) -> String { "\(dir)/\(name).pem" }
    func key(_ name: String) -> String { "\(dir)/\(name).key" }

    private func makeCA(_ name: String, subject: String) throws {
        try Self.openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                          "-keyout", key(name), "-out", cert(name), "-days", "2", "-subj", subject,
                          "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    }

    /// A leaf for server and client use, signed by `ca`.
    func issue(_ name: String, ca: String, subject: String, sans: String) throws {
        let ext = "\(dir)/\(name).ext"
        try "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=\(sans)\n"
            .write(toFile: ext, atomically: true, encoding: .utf8)
        try Self.openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                          "-keyout", key(name), "-out", "\(dir)/\(name).csr", "-subj", subject])
        try Self.openssl(["x509", "-req", "-in", "\(dir)/\(name).csr", "-CA", cert(ca), "-CAkey", key(ca),
                          "-CAcreateserial", "-out", cert(name), "-days", "2", "-extfile", ext])
    }

    /// SHA-256 of a certificate's DER, lower-case hex (what get_tls() reports).
    func fingerprint(_ name: String) throws -> String {
        let out = try Self.openssl(["x509", "-in", cert(name), "-noout", "-fingerprint", "-sha256"])
        // "sha256 Fingerprint=AB:CD:..."
        guard let eq = out.firstIndex(of: "=") else { throw Failure(description: "no fingerprint in \(out)") }
        return out[out.index(after: eq)...].filter { $0 != ":" && !$0.isWhitespace }.lowercased()
    }

    @discardableResult
    static func openssl(_ arguments: [String]) throws -> String {
        let result = try run("/usr/bin/openssl", arguments)
        guard result.status == 0 else {
            throw Failure(description: "openssl \(arguments.joined(separator: " ")) failed: \(result.stderr)")
        }
        return result.stdout
    }

    struct ProcessResult { var status: Int32; var stdout: String; var stderr: String }

    static func run(_ executable: String, _ arguments: [String], stdin: String? = nil) throws -> ProcessResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        let input = Pipe()
        process.standardInput = input
        try process.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try? input.fileHandleForWriting.close()
        // Read both pipes before waiting so a chatty process never blocks on a full pipe.
        let errData = NIOLockedValueBox(Data())
        let errReader = Thread { errData.withLockedValue { $0 = err.fileHandleForReading.readDataToEndOfFile() } }
        errReader.start()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        while errReader.isExecuting || !errReader.isFinished { usleep(1000) }
        return ProcessResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                             stderr: String(decoding: errData.withLockedValue { $0 }, as: UTF8.self))
    }
}

/// `curl` against the proxy: HTTPS with `--resolve` so the URL's host name
/// is the SNI and the name verified, whatever port the proxy got.
struct Curl {
    var result: TestPKI.ProcessResult
    /// The HTTP status (`-w %{http_code}`), 0 when no response (TLS failure).
    var status: Int {
        Int(result.stdout.split(separator: "\n").last.map(String.init) ?? "") ?? 0
    }
    var body: String {
        var lines = result.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        if !lines.isEmpty { lines.removeLast() }
        return lines.joined(separator: "\n")
    }

    static func https(host: String, port: Int, path: String = "/", ca: String?, extra: [String] = []) throws -> Curl {
        var args = ["-sS", "--max-time", "10", "--resolve", "\(host):\(port):127.0.0.1", "-w", "\n%{http_code}"]
        if let ca { args += ["--cacert", ca] }
        args += extra
        args.append("https://\(host):\(port)\(path)")
        return Curl(result: try TestPKI.run("/usr/bin/curl", args))
    }
}

/// A TLS client on one connection that stays open: send a request, read
/// one response (Content-Length bodies), repeat. Blocking, for tests.
final class TLSTestClient {
    let channel: Channel
    private let received: NIOLockedValueBox<ByteBuffer>
    private let handshake: EventLoopFuture<Void>
    /// Header lines of the last response, lower-cased names.
    private(set) var lastHeaders: [String: String] = [:]

    /// - Parameters: `serverName` for SNI (nil: none); `ca` to verify the
    ///   server with (nil: no verification); client certificate optional.
    init(group: EventLoopGroup, port: Int, serverName: String?, ca: String?, clientCert: String? = nil,
         clientKey: String? = nil, maxVersion: TLSVersion? = nil, alpn: [String] = ["http/1.1"]) throws {
        var configuration = TLSConfiguration.makeClientConfiguration()
        if let ca {
            configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca))
            configuration.certificateVerification = serverName == nil ? .noHostnameVerification : .fullVerification
        } else {
            configuration.certificateVerification = .none
        }
        if let clientCert, let clientKey {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(clientCert).map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: clientKey, format: .pem))
        }
        configuration.maximumTLSVersion = maxVersion
        configuration.applicationProtocols = alpn
        let context = try NIOSSLContext(configuration: configuration)
        let received = NIOLockedValueBox(ByteBuffer())
        self.received = received
        let loop = group.next()
        let handshakePromise = loop.makePromise(of: Void.self)
        self.handshake = handshakePromise.futureResult
        channel = try ClientBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: serverName))
                    try channel.pipeline.syncOperations.addHandler(Collector(received: received, handshake: handshakePromise))
                }
            }
            .connect(host: "127.0.0.1", port: port).wait()
        try handshake.wait()
    }

    /// The certificate the server presented.
    var serverCertificate: NIOSSLCertificate? {
        try? channel.eventLoop.submit { [channel] in
            try channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate
        }.wait()
    }

    var serverCommonName: String? {
        serverCertificate?.subjectName.last { $0.type == .commonName }?.value
    }

    /// Sends a GET and returns (status, body) of the response.
    func get(_ path: String, host: String = "example.com", headers: [(String, String)] = []) throws -> (Int, String) {
        var request = "GET \(path) HTTP/1.1\r\nHost: \(host)\r\n"
        for (name, value) in headers { request += "\(name): \(value)\r\n" }
        request += "\r\n"
        return try send(ByteBuffer(string: request), responses: 1)[0]
    }

    /// Writes `bytes` as they are (one request, several pipelined ones, a
    /// request with its body) and returns the `count` (status, body)
    /// responses that arrive, in order.
    func send(_ bytes: ByteBuffer, responses count: Int) throws -> [(Int, String)] {
        try channel.writeAndFlush(bytes).wait()
        var responses: [(Int, String)] = []
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            while responses.count < count, let response = takeResponse() {
                lastHeaders = response.2
                responses.append((response.0, response.1))
            }
            if responses.count == count { return responses }
            guard channel.isActive else { break }
            usleep(2000)
        }
        throw TestPKI.Failure(description: "\(responses.count) of \(count) responses (connection active: \(channel.isActive))")
    }

    private func takeResponse() -> (Int, String, [String: String])? {
        received.withLockedValue { buffer -> (Int, String, [String: String])? in
            guard let text = buffer.getString(at: buffer.readerIndex, length: buffer.readableBytes),
                  let headEnd = text.range(of: "\r\n\r\n") else { return nil }
            let head = text[..<headEnd.lowerBound]
            let status = Int(head.split(separator: " ").dropFirst().first ?? "") ?? 0
            var length = 0
            var headers: [String: String] = [:]
            for line in head.split(separator: "\r\n").dropFirst() {
                guard let colon = line.firstIndex(of: ":") else { continue }
                headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            length = Int(headers["content-length"] ?? "0") ?? 0
            let headBytes = text.utf8.distance(from: text.utf8.startIndex, to: headEnd.upperBound)
            guard buffer.readableBytes >= headBytes + length else { return nil }
            buffer.moveReaderIndex(forwardBy: headBytes)
            let body = buffer.readString(length: length) ?? ""
            return (status, body, headers)
        }
    }

    func close() { try? channel.close().wait() }

    /// How many bytes arrived and were not taken as a response yet.
    var unreadByteCount: Int { received.withLockedValue { $0.readableBytes } }

    private final class Collector: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let received: NIOLockedValueBox<ByteBuffer>
        let handshake: EventLoopPromise<Void>
        init(received: NIOLockedValueBox<ByteBuffer>, handshake: EventLoopPromise<Void>) {
            self.received = received; self.handshake = handshake
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var bytes = unwrapInboundIn(data)
            received.withLockedValue { $0.writeBuffer(&bytes) }
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls { handshake.succeed(()) }
            context.fireUserInboundEventTriggered(event)
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) {
            handshake.fail(error)
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) {
            handshake.fail(ChannelError.ioOnClosedChannel)
        }
    }
}

/// A TLS HTTP/1.1 upstream answering "ok from <name>" (and /healthz),
/// optionally requiring a client certificate signed by `clientCA`.
final class TLSTestUpstream: @unchecked Sendable {
    let channel: Channel
    var port: Int { channel.localAddress!.port! }
    var address: HostPort { HostPort(host: "127.0.0.1", port: port) }
    private let seen = NIOLockedValueBox<[String]>([])
    private let handshakes = NIOLockedValueBox<Int>(0)
    /// Client certificate CNs seen, one per request.
    var clientNames: [String] { seen.withLockedValue { $0 } }
    var connections: Int { handshakes.withLockedValue { $0 } }

    init(group: EventLoopGroup, name: String, cert: String, key: String, clientCA: String? = nil) throws {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: key, format: .pem)))
        if let clientCA {
            configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(clientCA))
            configuration.certificateVerification = .noHostnameVerification
        }
        let context = try NIOSSLContext(configuration: configuration)
        let seen = self.seen, handshakes = self.handshakes
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    handshakes.withLockedValue { $0 += 1 }
                    let ssl = NIOSSLServerHandler(context: context)
                    try channel.pipeline.syncOperations.addHandler(ssl)
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Responder(name: name, ssl: ssl, seen: seen))
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    func stop() { try? channel.close().wait() }

    private final class Responder: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let name: String
        let ssl: NIOSSLServerHandler
        let seen: NIOLockedValueBox<[String]>
        init(name: String, ssl: NIOSSLServerHandler, seen: NIOLockedValueBox<[String]>) {
            self.name = name; self.ssl = ssl; self.seen = seen
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = unwrapInboundIn(data) else { return }
            let cn = ssl.peerCertificate?.subjectName.last { $0.type == .commonName }?.value ?? "-"
            seen.withLockedValue { $0.append(cn) }
            let body = "ok from \(name) (client \(cn))"
            var head = HTTPResponseHead(version: .http1_1, status: .ok)
            head.headers.add(name: "content-length", value: "\(body.utf8.count)")
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}

extension ListenerTLSConfig {
    static func test(_ pki: TestPKI, certificates: [String], configure: (inout ListenerTLSConfig) -> Void = { _ in }) -> ListenerTLSConfig {
        var tls = ListenerTLSConfig()
        tls.certificates = certificates.map { TLSCertificateConfig(cert: pki.cert($0), key: pki.key($0)) }
        configure(&tls)
        return tls
    }
}

/// The test config (ProxyHarness.config) with listener `web` on https.
func httpsConfig(targets: [HostPort], tls: ListenerTLSConfig, configure: (inout WeirConfig) -> Void = { _ in }) -> WeirConfig {
    ProxyHarness.config(targets: targets) { config in
        config.listeners[0].protocol = .https
        config.listeners[0].tls = tls
        configure(&config)
    }
}
