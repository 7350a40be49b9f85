// tls (passthrough) listeners with real TLS: python3's ssl module (OpenSSL)
// as backends and clients, a certificate made by `openssl` at test time.
// The proxy never terminates TLS: each backend completes the handshake
// with the client and reports the SNI and ALPN it saw.

import Foundation
import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

/// A python3 TLS server (one process) that, per connection, completes the
/// handshake, sends "<name> sni=<sni> alpn=<alpn>\n", then echoes one line.
final class PythonTLSBackend {
    let name: String
    let port: Int
    private let process: Process

    static let script = """
    import socket, ssl, sys, threading
    mode = sys.argv[1]
    if mode == "serve":
        cert, key, name = sys.argv[2:5]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        def on_sni(sslsock, server_name, _ctx):
            sslsock.weir_sni = server_name
        ctx.sni_callback = on_sni
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        print(listener.getsockname()[1], flush=True)
        def serve(raw):
            try:
                conn = ctx.wrap_socket(raw, server_side=True)
                sni = getattr(conn, "weir_sni", None) or "-"
                conn.sendall(f"{name} sni={sni} alpn={conn.selected_alpn_protocol() or '-'}\\n".encode())
                line = b""
                while not line.endswith(b"\\n"):
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    line += chunk
                conn.sendall(b"echo " + line)
                conn.close()
            except Exception as e:
                raw.close()
        while True:
            raw, _ = listener.accept()
            threading.Thread(target=serve, args=(raw,), daemon=True).start()
    else:
        port, sni, alpn = int(sys.argv[2]), sys.argv[3], sys.argv[4]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if alpn != "-":
            ctx.set_alpn_protocols(alpn.split(","))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn = ctx.wrap_socket(raw, server_hostname=None if sni == "-" else sni)
        f = conn.makefile("rb")
        hello = f.readline().decode().strip()
        conn.sendall(b"ping\\n")
        echo = f.readline().decode().strip()
        print(hello + " | " + echo)
    """

    static func scriptPath() throws -> String {
        let path = NSTemporaryDirectory() + "weir-tls-helper.py"
        try script.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    init(name: String, certificate: TestCertificate) throws {
        self.name = name
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = [try Self.scriptPath(), "serve", certificate.certPath, certificate.keyPath, name]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        var text = ""
        while !text.contains("\n") {
            let data = out.fileHandleForReading.availableData
            if data.isEmpty { break }
            text += String(decoding: data, as: UTF8.self)
        }
        guard let port = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            process.terminate()
            throw NSError(domain: "PythonTLSBackend", code: 1, userInfo: [NSLocalizedDescriptionKey: "no port from helper: \(text)"])
        }
        self.port = port
    }

    var address: HostPort { HostPort(host: "127.0.0.1", port: port) }

    func stop() {
        process.terminate()
        process.waitUntilExit()
    }

    /// A TLS client through `port`: returns "<backend> sni=.. alpn=.. | echo ping", or nil.
    static func connect(port: Int, sni: String?, alpn: [String]) throws -> String? {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = [try scriptPath(), "connect", String(port), sni ?? "-", alpn.isEmpty ? "-" : alpn.joined(separator: ",")]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { return nil }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// A self-signed EC certificate made with `openssl` for this test run.
final class TestCertificate {
    let directory: String
    var certPath: String { directory + "/cert.pem" }
    var keyPath: String { directory + "/key.pem" }

    init() throws {
        directory = NSTemporaryDirectory() + "weir-tls-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                             "-keyout", keyPath, "-out", certPath, "-subj", "/CN=weir-test", "-days", "1"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw NSError(domain: "TestCertificate", code: 1, userInfo: [NSLocalizedDescriptionKey: "openssl req failed"])
        }
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }
}

final class StreamTLSPassthroughTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!

    override func setUpWithError() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")
                          && FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl"), "python3 and openssl needed")
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        try? group?.syncShutdownGracefully()
    }

    static func tlsConfig(exact: HostPort, wildcard: HostPort, fallback: HostPort?,
                          configure: (inout WeirConfig) -> Void = { _ in }) -> WeirConfig {
        var config = WeirConfig()
        var listener = ListenerConfig()
        listener.name = "edge"
        listener.listen = HostPort(host: "127.0.0.1", port: 0)
        listener.protocol = .tls
        listener.sniRoutes = [SNIRoute(serverNames: ["api.example.com"], upstream: "exact"),
                              SNIRoute(serverNames: ["*.apps.example.com"], upstream: "wildcard")]
        if fallback != nil { listener.upstream = "fallback" }
        config.listeners = [listener]
        for (name, address) in [("exact", exact), ("wildcard", wildcard), ("fallback", fallback)] {
            guard let address else { continue }
            var upstream = UpstreamConfig()
            upstream.name = name
            upstream.targets = [TargetConfig(address: address)]
            config.upstreams.append(upstream)
        }
        config.accessLog = .off
        configure(&config)
        return config
    }

    func testRoutesBySNIWithWildcardAndFallback() throws {
        let certificate = try TestCertificate()
        defer { certificate.remove() }
        let a = try PythonTLSBackend(name: "A", certificate: certificate)
        let b = try PythonTLSBackend(name: "B", certificate: certificate)
        let c = try PythonTLSBackend(name: "C", certificate: certificate)
        defer { a.stop(); b.stop(); c.stop() }
        let proxy = try StreamHarness(config: Self.tlsConfig(exact: a.address, wildcard: b.address, fallback: c.address))
        defer { proxy.stop() }
        let port = proxy.port("edge")

        XCTAssertEqual(try PythonTLSBackend.connect(port: port, sni: "api.example.com", alpn: ["h2", "http/1.1"]),
                       "A sni=api.example.com alpn=h2 | echo ping")
        XCTAssertEqual(try PythonTLSBackend.connect(port: port, sni: "x.apps.example.com", alpn: ["http/1.1"]),
                       "B sni=x.apps.example.com alpn=http/1.1 | echo ping")
        XCTAssertEqual(try PythonTLSBackend.connect(port: port, sni: "deep.x.apps.example.com", alpn: []),
                       "B sni=deep.x.apps.example.com alpn=- | echo ping")
        XCTAssertEqual(try PythonTLSBackend.connect(port: port, sni: "unknown.example.org", alpn: []),
                       "C sni=unknown.example.org alpn=- | echo ping")
        XCTAssertEqual(try PythonTLSBackend.connect(port: port, sni: nil, alpn: []),
                       "C sni=- alpn=- | echo ping")

        XCTAssertTrue(waitUntil { proxy.streamLogLines().count == 5 })
        let first = proxy.streamLogLines().first { $0["sni"] as? String == "api.example.com" }
        XCTAssertEqual(first?["upstream"] as? String, "exact")
        XCTAssertEqual(first?["alpn"] as? [String], ["h2", "http/1.1"])
        XCTAssertEqual(first?["protocol"] as? String, "tls")
        XCTAssertEqual(first?["outcome"] as? String, "closed")
    }

    func testWithoutFallbackUnknownSNIIsClosed() throws {
        let certificate = try TestCertificate()
        defer { certificate.remove() }
        let a = try PythonTLSBackend(name: "A", certificate: certificate)
        defer { a.stop() }
        let proxy = try StreamHarness(config: Self.tlsConfig(exact: a.address, wildcard: a.address, fallback: nil))
        defer { proxy.stop() }
        XCTAssertNil(try PythonTLSBackend.connect(port: proxy.port("edge"), sni: "other.example.org", alpn: []))
        XCTAssertTrue(waitUntil { proxy.streamLogLines().first?["outcome"] as? String == "no_upstream" })
    }

    func testFragmentedHelloIsReplayedByteForByte() throws {
        // A plain TCP echo as the "TLS" backend: it gets exactly the bytes
        // the client sent (records of 7 bytes, sent in three pieces), and
        // the bytes after the hello follow them.
        let echo = try TCPTestServer(group: group)
        defer { echo.stop() }
        let proxy = try StreamHarness(config: Self.tlsConfig(exact: echo.address, wildcard: echo.address, fallback: nil))
        defer { proxy.stop() }
        let hello = ClientHelloBuilder.hello(sni: "api.example.com", fragment: 7)
        let after: [UInt8] = [23, 3, 3, 0, 3, 1, 2, 3]
        let client = try proxy.connect("edge")
        let thirds = [0, hello.count / 3, 2 * hello.count / 3, hello.count]
        for i in 0..<3 {
            try client.send(Array(hello[thirds[i]..<thirds[i + 1]]))
            usleep(20_000)
        }
        try client.send(after)
        XCTAssertEqual(client.read(hello.count + after.count), hello + after)
        XCTAssertEqual(echo.receivedBytes, hello + after)
    }

    func testNotTLSAndSlowHelloAreClosedAndLogged() throws {
        let echo = try TCPTestServer(group: group)
        defer { echo.stop() }
        let proxy = try StreamHarness(config: Self.tlsConfig(exact: echo.address, wildcard: echo.address, fallback: echo.address) {
            $0.listeners[0].stream.clientHelloTimeout = .milliseconds(200)
        })
        defer { proxy.stop() }

        let plain = try proxy.connect("edge")
        try plain.send("GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        XCTAssertEqual(plain.readToEnd().end, StreamClient.ReadEnd.eof)

        let slow = try proxy.connect("edge")
        try slow.send(Array(ClientHelloBuilder.hello()[0..<20]))      // and then nothing
        XCTAssertEqual(slow.readToEnd().end, StreamClient.ReadEnd.eof)

        XCTAssertTrue(waitUntil { proxy.streamLogLines().count == 2 })
        XCTAssertEqual(Set(proxy.streamLogLines().compactMap { $0["outcome"] as? String }), ["bad_client_hello", "client_hello_timeout"])
        XCTAssertEqual(echo.connections, 0, "nothing reached the backend")
    }
}
