// HTTPS listeners on real loopback sockets: curl and a NIO TLS client
// against the proxy, certificates from TestPKI (openssl at test time).

import Foundation
import NIOCore
import NIOEmbedded
import NIOPosix
import NIOSSL
import WeirCore
@testable import WeirProxy
import XCTest

final class TLSListenerTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var upstream: TestUpstream!
    private let pki = TestPKI.shared

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstream = try TestUpstream(name: "plain", group: group)
    }

    override func tearDown() {
        upstream.stop()
        try? group.syncShutdownGracefully()
    }

    private func proxy(_ tls: ListenerTLSConfig) throws -> ProxyHarness {
        try ProxyHarness(config: httpsConfig(targets: [upstream.address], tls: tls))
    }

    func testCurlGetsAResponseOverHTTPSAndTheUpstreamSeesHTTPSForwarding() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]))
        defer { harness.stop() }
        let curl = try Curl.https(host: "a.example.com", port: harness.port, path: "/hello", ca: pki.cert("ca"))
        XCTAssertEqual(curl.status, 200, curl.result.stderr)
        XCTAssertEqual(curl.body, "ok from plain")
        XCTAssertEqual(upstream.lastRequest?.header("x-forwarded-proto"), "https")
    }

    func testSNIPicksExactThenWildcardThenDefaultCertificate() throws {
        var tls = ListenerTLSConfig.test(pki, certificates: ["default", "a", "wild"])
        tls.defaultCertificate = 0
        let harness = try proxy(tls)
        defer { harness.stop() }
        // curl verifies the name against the certificate it gets: each succeeds only with the right one.
        for host in ["a.example.com", "b.example.com", "default.test"] {
            let curl = try Curl.https(host: host, port: harness.port, ca: pki.cert("ca"))
            XCTAssertEqual(curl.status, 200, "\(host): \(curl.result.stderr)")
        }
        func served(_ name: String?) throws -> String? {
            let client = try TLSTestClient(group: group, port: harness.port, serverName: name, ca: nil)
            defer { client.close() }
            return client.serverCommonName
        }
        XCTAssertEqual(try served("a.example.com"), "a.example.com")       // exact beats the wildcard
        XCTAssertEqual(try served("A.Example.COM"), "a.example.com")       // names are case-insensitive
        XCTAssertEqual(try served("zzz.example.com"), "wildcard")
        XCTAssertEqual(try served("deep.zzz.example.com"), "default.test") // a wildcard covers one label
        XCTAssertEqual(try served("unknown.test"), "default.test")
        XCTAssertEqual(try served(nil), "default.test")                    // no SNI at all
    }

    func testMinimumVersion13RefusesTLS12OnlyClients() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]) { $0.minVersion = .v1_3 })
        defer { harness.stop() }
        let old = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                 extra: ["--tlsv1.2", "--tls-max", "1.2"])
        XCTAssertEqual(old.status, 0)
        XCTAssertNotEqual(old.result.status, 0, "a TLS 1.2-only client must fail the handshake")
        let new = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"), extra: ["--tlsv1.3"])
        XCTAssertEqual(new.status, 200, new.result.stderr)
    }

    func testMinimumVersion12ServesBothAndCiphersRestrictTLS12() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]) { $0.ciphers = ["ECDHE-ECDSA-AES256-GCM-SHA384"] })
        defer { harness.stop() }
        let v12 = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                 extra: ["--tlsv1.2", "--tls-max", "1.2", "-v"])
        XCTAssertEqual(v12.status, 200, v12.result.stderr)
        XCTAssertTrue(v12.result.stderr.contains("ECDHE-ECDSA-AES256-GCM-SHA384"), v12.result.stderr)
        let v13 = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"), extra: ["--tlsv1.3"])
        XCTAssertEqual(v13.status, 200, v13.result.stderr)
        // A TLS 1.2 client offering only another suite gets no handshake.
        let other = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                   extra: ["--tlsv1.2", "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"])
        XCTAssertEqual(other.status, 0)
    }

    func testClientCertificateRequired() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]) { $0.clientCA = self.pki.cert("ca"); $0.clientAuth = .required })
        defer { harness.stop() }
        let good = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                  extra: ["--cert", pki.cert("client"), "--key", pki.key("client")])
        XCTAssertEqual(good.status, 200, good.result.stderr)
        let none = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"))
        XCTAssertEqual(none.status, 0, "no client certificate must be refused")
        let wrongCA = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                     extra: ["--cert", pki.cert("stranger"), "--key", pki.key("stranger")])
        XCTAssertEqual(wrongCA.status, 0, "a certificate from another CA must be refused")
        // Refused handshakes released their connection slots.
        let deadline = Date().addingTimeInterval(5)
        while harness.server.activeConnections != 0 && Date() < deadline { usleep(10_000) }
        XCTAssertEqual(harness.server.activeConnections, 0)
    }

    func testClientCertificateOptional() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]) { $0.clientCA = self.pki.cert("ca"); $0.clientAuth = .optional })
        defer { harness.stop() }
        let none = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"))
        XCTAssertEqual(none.status, 200, none.result.stderr)
        let good = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                  extra: ["--cert", pki.cert("client"), "--key", pki.key("client")])
        XCTAssertEqual(good.status, 200, good.result.stderr)
        let wrongCA = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                     extra: ["--cert", pki.cert("stranger"), "--key", pki.key("stranger")])
        XCTAssertEqual(wrongCA.status, 0, "a presented certificate must still verify")
    }

    func testAccessRecordCarriesTLSDetailsAndClientIdentity() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]) { $0.clientCA = self.pki.cert("ca") })
        defer { harness.stop() }
        let curl = try Curl.https(host: "a.example.com", port: harness.port, ca: pki.cert("ca"),
                                  extra: ["--tlsv1.3", "--cert", pki.cert("client"), "--key", pki.key("client")])
        XCTAssertEqual(curl.status, 200, curl.result.stderr)
        let deadline = Date().addingTimeInterval(5)
        while harness.observer.records.isEmpty && Date() < deadline { usleep(5_000) }
        let record = try XCTUnwrap(harness.observer.records.last)
        let tls = try XCTUnwrap(record.tls)
        XCTAssertEqual(tls.version, "TLSv1.3")
        XCTAssertEqual(tls.serverName, "a.example.com")
        XCTAssertEqual(tls.alpn, "http/1.1")
        XCTAssertNotNil(tls.cipher)
        XCTAssertTrue(tls.cipher?.hasPrefix("TLS_") ?? false, "\(tls.cipher ?? "nil")")
        XCTAssertEqual(tls.peer?.spiffeID, "spiffe://weir.test/ns/default/sa/alice")
        XCTAssertEqual(tls.peer?.fingerprintSHA256, try pki.fingerprint("client"))
        let line = AccessLogFormatter.jsonLine(record)
        XCTAssertTrue(line.contains(#""tls":{"version":"TLSv1.3""#), line)
        XCTAssertTrue(line.contains(#""client_spiffe_id":"spiffe://weir.test/ns/default/sa/alice""#), line)
        XCTAssertTrue(line.contains(#""sni":"a.example.com""#), line)
    }

    func testKeepAliveRequestsShareOneHandshake() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]))
        defer { harness.stop() }
        let client = try TLSTestClient(group: group, port: harness.port, serverName: "a.example.com", ca: pki.cert("ca"))
        defer { client.close() }
        for i in 0..<5 {
            let (status, body) = try client.get("/n/\(i)")
            XCTAssertEqual(status, 200)
            XCTAssertEqual(body, "ok from plain")
        }
    }

    /// After the handshake, records go to the socket through TLSRecordWriter
    /// (small ones with its own send(2), large ones and whatever the socket
    /// does not take through NIO): a body larger than the socket buffers,
    /// then small responses on the same connection, arrive whole and in order.
    func testLargeThenSmallResponsesOnOneConnectionArriveWholeAndInOrder() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]))
        defer { harness.stop() }
        let client = try TLSTestClient(group: group, port: harness.port, serverName: "a.example.com", ca: pki.cert("ca"))
        defer { client.close() }
        for round in 0..<2 {
            let (status, body) = try client.get("/big/3000000")
            XCTAssertEqual(status, 200)
            XCTAssertEqual(body.utf8.count, 3_000_000, "round \(round)")
            XCTAssertTrue(body.utf8.allSatisfy { $0 == UInt8(ascii: "x") })
            for i in 0..<3 {
                let (status, body) = try client.get("/n/\(round)/\(i)")
                XCTAssertEqual(status, 200)
                XCTAssertEqual(body, "ok from plain")
            }
        }
        // A slow reader (curl at 4 MB/s): most of the body waits in NIO, and
        // the next response on the connection must still come after it.
        let host = "a.example.com"
        // (Curl.https puts `path`'s URL last: the big one goes first here.)
        let curl = try Curl.https(host: host, port: harness.port, path: "/after", ca: pki.cert("ca"),
                                  extra: ["--limit-rate", "4M", "https://\(host):\(harness.port)/big/2000000"])
        XCTAssertEqual(curl.result.status, 0, curl.result.stderr)
        XCTAssertEqual(curl.result.stdout, String(repeating: "x", count: 2_000_000) + "\n200ok from plain\n200")
    }

    /// Behind TLS the HTTP handler writes to NIOSSLHandler and asks the
    /// socket for reads directly (SoleHandlerIO "Behind TLS"): an upload
    /// larger than the socket buffers (reads paused while the upstream
    /// connection is not writable, then resumed) and pipelined requests
    /// decrypted from one read are all served, in order, on one connection.
    func testLargeUploadThenPipelinedRequestsOnOneConnection() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]))
        defer { harness.stop() }
        let client = try TLSTestClient(group: group, port: harness.port, serverName: "a.example.com", ca: pki.cert("ca"))
        defer { client.close() }
        let size = 4_000_000
        var upload = ByteBuffer(string: "POST /sink HTTP/1.1\r\nHost: a.example.com\r\ncontent-length: \(size)\r\n\r\n")
        upload.writeRepeatingByte(UInt8(ascii: "u"), count: size)
        let uploaded = try client.send(upload, responses: 1)
        XCTAssertEqual(uploaded[0].0, 200)
        XCTAssertEqual(uploaded[0].1, String(size), "the upstream saw the whole body")

        let pipelined = (0..<3).map { "GET /n/\($0) HTTP/1.1\r\nHost: a.example.com\r\n\r\n" }.joined()
        let responses = try client.send(ByteBuffer(string: pipelined), responses: 3)
        XCTAssertEqual(responses.map(\.0), [200, 200, 200])
        XCTAssertEqual(responses.map(\.1), Array(repeating: "ok from plain", count: 3))
        XCTAssertEqual(upstream.requests.suffix(3).map(\.uri), ["/n/0", "/n/1", "/n/2"])

        // `Connection: close`: the close waits for the response's write
        // promise, which now starts at NIOSSLHandler's write.
        let last = try client.send(ByteBuffer(string: "GET /last HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n"),
                                   responses: 1)
        XCTAssertEqual(last[0].0, 200)
        XCTAssertEqual(last[0].1, "ok from plain")
        XCTAssertEqual(client.lastHeaders["connection"], "close")
        let deadline = Date().addingTimeInterval(5)
        while client.channel.isActive && Date() < deadline { usleep(5_000) }
        XCTAssertFalse(client.channel.isActive, "the proxy closed the connection after the response")
    }

    func testPlainHTTPOnTheTLSPortIsClosedAndSlotsAreReleased() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]))
        defer { harness.stop() }
        let socket = try harness.connect()
        try socket.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertTrue(socket.waitForClose())
        let deadline = Date().addingTimeInterval(5)
        while harness.server.activeConnections != 0 && Date() < deadline { usleep(10_000) }
        XCTAssertEqual(harness.server.activeConnections, 0)
    }

    func testStalledHandshakeTimesOut() throws {
        let harness = try proxy(.test(pki, certificates: ["a"]) { $0.handshakeTimeout = .milliseconds(200) })
        defer { harness.stop() }
        let socket = try harness.connect()
        try socket.send([0x16, 0x03, 0x01])     // the start of a record, then nothing
        XCTAssertTrue(socket.waitForClose())
    }
}

/// The ClientHello/ServerHello reader, byte by byte (no sockets).
final class TLSHelloParserTests: XCTestCase {
    /// A real ClientHello: NIOSSL's client writes one into an EmbeddedChannel.
    private func clientHello(serverName: String?, alpn: [String]) throws -> ByteBuffer {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.applicationProtocols = alpn
        configuration.certificateVerification = .none
        let context = try NIOSSLContext(configuration: configuration)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: serverName))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 443)).wait()
        var all = ByteBuffer()
        while var chunk = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&chunk) }
        _ = try? channel.finish()
        return all
    }

    func testReadsSNIAndALPNFromARealClientHello() throws {
        let hello = try clientHello(serverName: "Api.Example.com", alpn: ["h2", "http/1.1"])
        XCTAssertEqual(TLSHelloParser.clientHello(hello), .parsed(ClientHelloSummary(serverName: "api.example.com", alpn: ["h2", "http/1.1"])))
        let bare = try clientHello(serverName: nil, alpn: [])
        XCTAssertEqual(TLSHelloParser.clientHello(bare), .parsed(ClientHelloSummary(serverName: nil, alpn: [])))
    }

    func testNeedsMoreUntilTheWholeHelloArrivesAtEveryCut() throws {
        let hello = try clientHello(serverName: "a.example.com", alpn: ["http/1.1"])
        for cut in 0..<hello.readableBytes {
            let part = hello.getSlice(at: 0, length: cut)!
            XCTAssertEqual(TLSHelloParser.clientHello(part), .needMore, "cut at \(cut)")
        }
    }

    func testHelloSplitAcrossRecordsIsJoined() throws {
        let hello = try clientHello(serverName: "split.example.com", alpn: [])
        // Re-frame the handshake message as two records.
        let message = hello.getSlice(at: 5, length: hello.readableBytes - 5)!
        let half = message.readableBytes / 2
        var split = ByteBuffer()
        for part in [message.getSlice(at: 0, length: half)!, message.getSlice(at: half, length: message.readableBytes - half)!] {
            split.writeBytes([22, 3, 1])
            split.writeInteger(UInt16(part.readableBytes))
            var p = part
            split.writeBuffer(&p)
        }
        XCTAssertEqual(TLSHelloParser.clientHello(split), .parsed(ClientHelloSummary(serverName: "split.example.com", alpn: [])))
    }

    func testPlainHTTPAndGarbageAreNotHellos() {
        XCTAssertEqual(TLSHelloParser.clientHello(ByteBuffer(string: "GET / HTTP/1.1\r\n\r\n")), .notHello)
        XCTAssertEqual(TLSHelloParser.clientHello(ByteBuffer(bytes: [22, 3, 1, 0, 4, 2, 0, 0, 0])), .notHello)   // a ServerHello
        XCTAssertEqual(TLSHelloParser.clientHello(ByteBuffer(bytes: [22, 3, 1, 0, 5, 1, 0, 0, 1, 0])), .notHello)   // a body too short to be a hello
    }

    func testCipherNames() {
        XCTAssertEqual(TLSHelloParser.cipherName(0x1301), "TLS_AES_128_GCM_SHA256")
        XCTAssertEqual(TLSHelloParser.cipherName(0xC02F), "ECDHE-RSA-AES128-GCM-SHA256")
        XCTAssertEqual(TLSHelloParser.cipherName(0x00FF), "0x00FF")
    }
}
