import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import WeirTestSupport
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// The proxy's own answers: bad input (every smuggling shape), limits,
/// timeouts, unreachable upstreams; all in the one JSON error shape.
final class ProxyErrorTests: XCTestCase {
    var upstreamGroup: MultiThreadedEventLoopGroup!
    var upstream: TestUpstream!
    var proxy: ProxyHarness?

    override func setUpWithError() throws {
        upstreamGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstream = try TestUpstream(name: "u1", group: upstreamGroup)
    }

    override func tearDown() {
        proxy?.stop()
        upstream?.stop()
        try? upstreamGroup?.syncShutdownGracefully()
    }

    private func start(_ configure: (inout WeirConfig) -> Void = { _ in }) throws -> ProxyHarness {
        let harness = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address], configure: configure))
        proxy = harness
        return harness
    }

    private func assertJSONError(_ response: TestResponse, status: Int, code: String,
                                 file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(response.status, status, response.bodyText, file: file, line: line)
        XCTAssertEqual(response.header("content-type"), "application/json", file: file, line: line)
        let json = response.errorJSON
        XCTAssertEqual(json?["error"], code, response.bodyText, file: file, line: line)
        XCTAssertNotNil(json?["message"], file: file, line: line)
        XCTAssertEqual(json?["request_id"], response.header("x-request-id"), file: file, line: line)
        XCTAssertFalse((json?["request_id"] ?? "").isEmpty, file: file, line: line)
    }

    // MARK: Routing and upstream failures

    func testNoRouteIs404JSON() throws {
        let proxy = try start { config in
            config.routes[0].match.paths = [.prefix("/api")]
        }
        let client = try proxy.connect()
        let response = try client.request("GET", "/nothing-here")
        assertJSONError(response, status: 404, code: "no_route")
        XCTAssertTrue(response.errorJSON?["message"]?.contains("GET /nothing-here") ?? false)
        // Keep-alive survives a 404.
        XCTAssertEqual(try client.request("GET", "/api/x").status, 200)
        XCTAssertEqual(upstream.requests.map(\.uri), ["/api/x"])
    }

    func testRejectedExpectContinueRequestClosesTheConnection() throws {
        let proxy = try start { $0.routes[0].match.paths = [.prefix("/api")] }
        let client = try proxy.connect()
        try client.send("POST /elsewhere HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        let response = try client.readResponse()
        assertJSONError(response, status: 404, code: "no_route")
        XCTAssertEqual(response.informational, [], "no 100 for a request the proxy refuses")
        XCTAssertEqual(response.header("connection"), "close")
        XCTAssertTrue(client.waitForClose())
    }

    func testConnectRefusedIs502() throws {
        let dead = try refusingPort()
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [HostPort(host: "127.0.0.1", port: dead)]) {
            $0.upstreams[0].retries = 0
        })
        self.proxy = proxy
        let response = try proxy.connect().request("GET", "/")
        assertJSONError(response, status: 502, code: "upstream_connect_failed")
    }

    func testConnectTimeoutIs504() throws {
        // A listener that never accepts, with its accept queue filled: further
        // SYNs are dropped, so connecting hangs until the connect timeout.
        let listener = try StalledListener()
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [HostPort(host: "127.0.0.1", port: listener.port)]) {
            $0.upstreams[0].timeouts.connect = .milliseconds(300)
            $0.upstreams[0].retries = 0
        })
        self.proxy = proxy
        let response = try proxy.connect().request("GET", "/")
        assertJSONError(response, status: 504, code: "upstream_timeout")
        _ = listener
    }

    func testReadTimeoutIs504() throws {
        let proxy = try start { $0.upstreams[0].timeouts.read = .milliseconds(300); $0.upstreams[0].retries = 0 }
        let response = try proxy.connect().request("GET", "/slow/3000")
        assertJSONError(response, status: 504, code: "upstream_timeout")
    }

    func testWholeRequestTimeoutIs504() throws {
        let proxy = try start { $0.upstreams[0].timeouts.request = .milliseconds(300); $0.upstreams[0].retries = 0 }
        let response = try proxy.connect().request("GET", "/slow/3000")
        assertJSONError(response, status: 504, code: "upstream_timeout")
    }

    func testWriteTimeoutWhenUpstreamStopsReadingIs504() throws {
        // Accepted by the kernel but never read: the upstream socket fills up
        // and the proxy's write side stays blocked.
        let listener = try NeverReadingListener()
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [HostPort(host: "127.0.0.1", port: listener.port)]) {
            $0.upstreams[0].timeouts.write = .milliseconds(300)
            $0.upstreams[0].retries = 0
        })
        self.proxy = proxy
        let client = try proxy.connect(timeoutSeconds: 20)
        let total = 64 * 1024 * 1024
        try client.send("POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: \(total)\r\n\r\n")
        let sender = Thread {
            let chunk = [UInt8](repeating: 1, count: 256 * 1024)
            var sent = 0
            while sent < total, (try? client.send(chunk)) != nil { sent += chunk.count }
        }
        sender.start()
        let response = try client.readResponse()
        assertJSONError(response, status: 504, code: "upstream_timeout")
        XCTAssertTrue(response.errorJSON?["message"]?.contains("writing") ?? false, response.bodyText)
        XCTAssertTrue(client.waitForClose(), "part of the body went upstream, so the connection closes")
        _ = listener
    }

    func testBodyLimitHitMidStreamClosesWithoutCompletingUpstream() throws {
        let proxy = try start { $0.listeners[0].limits.maxBodyBytes = 100_000 }
        let client = try proxy.connect()
        // Warm the pool so the next request's body is forwarded as it arrives.
        XCTAssertEqual(try client.request("GET", "/warm").status, 200)
        try client.send("POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        let chunk = "ea60\r\n" + String(repeating: "c", count: 60_000) + "\r\n"
        try client.send(chunk)
        Thread.sleep(forTimeInterval: 0.2)
        try? client.send(chunk)   // crosses the limit after bytes went upstream
        let rest = client.readToEnd()
        XCTAssertFalse(String(decoding: rest, as: UTF8.self).hasPrefix("HTTP/1.1 2"), "no success response")
        XCTAssertTrue(client.closedByPeer)
        XCTAssertEqual(upstream.requests.map(\.uri), ["/warm"], "the upstream never saw the oversized request complete")
    }

    func testPipelinedRequestsWithLocalErrorStayInOrder() throws {
        let proxy = try start { $0.routes[0].match.paths = [.prefix("/api")] }
        let client = try proxy.connect()
        try client.send("GET /api/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\nGET /api/slow HTTP/1.1\r\nHost: a\r\n\r\nGET /nope2 HTTP/1.1\r\nHost: a\r\n\r\nGET /api/3 HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertEqual(try client.readResponse().status, 200)
        XCTAssertEqual(try client.readResponse().status, 404)
        XCTAssertEqual(try client.readResponse().status, 200)
        XCTAssertEqual(try client.readResponse().status, 404)
        XCTAssertEqual(try client.readResponse().status, 200)
        XCTAssertEqual(upstream.requests.map(\.uri), ["/api/1", "/api/slow", "/api/3"])
    }

    func testUpstreamClosingWithoutResponseIs502() throws {
        let proxy = try start { $0.upstreams[0].retries = 0 }
        let response = try proxy.connect().request("GET", "/drop")
        assertJSONError(response, status: 502, code: "bad_upstream_response")
    }

    /// A raw upstream that answers every request head with `reply`, then
    /// optionally closes.
    private func scriptedUpstream(reply: String, closeAfter: Bool) throws -> RawUpstream {
        try RawUpstream(group: upstreamGroup) { channel, buffer in
            let text = String(decoding: buffer.readableBytesView, as: UTF8.self)
            guard let end = text.range(of: "\r\n\r\n") else { return }
            buffer.moveReaderIndex(forwardBy: text.utf8.distance(from: text.startIndex, to: end.upperBound))
            let written = channel.writeAndFlush(ByteBuffer(string: reply))
            if closeAfter { written.whenComplete { _ in channel.close(promise: nil) } }
        }
    }

    func testGarbageFromUpstreamIs502() throws {
        let bad = try scriptedUpstream(reply: "SMTP ready\r\n\r\n", closeAfter: false)
        defer { bad.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [bad.address]) { $0.upstreams[0].retries = 0 })
        self.proxy = proxy
        let client = try proxy.connect()
        assertJSONError(try client.request("GET", "/"), status: 502, code: "bad_upstream_response")
        // The client connection is unaffected.
        assertJSONError(try client.request("GET", "/"), status: 502, code: "bad_upstream_response")
    }

    func testUpstreamCutMidBodyCutsTheClientToo() throws {
        let cut = try scriptedUpstream(reply: "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", closeAfter: true)
        defer { cut.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [cut.address]) { $0.upstreams[0].retries = 0 })
        self.proxy = proxy
        let client = try proxy.connect()
        try client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        let bytes = String(decoding: client.readToEnd(), as: UTF8.self)
        XCTAssertTrue(bytes.hasPrefix("HTTP/1.1 200"), bytes)
        XCTAssertTrue(bytes.lowercased().contains("content-length: 100"))
        XCTAssertTrue(bytes.hasSuffix("only ten b"), "the client gets what arrived, then the close: it can tell the body is short")
        XCTAssertTrue(client.closedByPeer)
    }

    func testPassiveEjectionGives503WhenNoTargetIsHealthy() throws {
        let dead = try refusingPort()
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [HostPort(host: "127.0.0.1", port: dead)]) {
            $0.upstreams[0].retries = 0
            var passive = PassiveHealthCheck()
            passive.consecutiveFailures = 1
            passive.ejection = .seconds(30)
            $0.upstreams[0].healthCheck.passive = passive
        })
        self.proxy = proxy
        let client = try proxy.connect()
        assertJSONError(try client.request("GET", "/"), status: 502, code: "upstream_connect_failed")
        assertJSONError(try client.request("GET", "/"), status: 503, code: "no_healthy_target")
        XCTAssertEqual(proxy.server.upstreamHealth(named: "backend")?.healthyCount, 0)
    }

    // MARK: Malformed requests: 400, close, nothing reaches the upstream

    private func assertRejected(_ raw: String, status: Int = 400, file: StaticString = #filePath, line: UInt = #line) throws {
        let proxy = try self.proxy ?? start()
        let client = try proxy.connect()
        try client.send(raw)
        let response = try client.readResponse()
        XCTAssertEqual(response.status, status, "for \(raw.debugDescription): \(response.bodyText)", file: file, line: line)
        XCTAssertEqual(response.header("content-type"), "application/json", file: file, line: line)
        XCTAssertTrue(client.waitForClose(), "connection must close after \(raw.debugDescription)", file: file, line: line)
        XCTAssertEqual(upstream.requests.count, 0, "upstream saw \(upstream.requests.map(\.uri)) for \(raw.debugDescription)", file: file, line: line)
    }

    func testInvalidRequestLine() throws {
        try assertRejected("GARBAGE\r\n\r\n")
        try assertRejected("GET /x HTTP/1.1 extra\r\nHost: a\r\n\r\n")
        try assertRejected("GET /x HTTQ/1.1\r\nHost: a\r\n\r\n")
    }

    func testContentLengthAndTransferEncodingTogether() throws {
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n")
    }

    func testDifferingContentLengths() throws {
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!")
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n")
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n")
    }

    func testTransferEncodingOtherThanFinalChunked() throws {
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n")
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n")
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n")
    }

    func testInvalidChunkSize() throws {
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        try assertRejected("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n")
    }

    func testBareCRAndNULInHeaderValues() throws {
        try assertRejected("GET /x HTTP/1.1\r\nHost: a\r\nX-Bad: a\rb\r\n\r\n")
        try assertRejected("GET /x HTTP/1.1\r\nHost: a\r\nX-Bad: a\u{0}b\r\n\r\n")
    }

    func testObsoleteLineFolding() throws {
        try assertRejected("GET /x HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n")
        try assertRejected("GET /x HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n\tb\r\n\r\n")
    }

    func testWhitespaceBeforeColon() throws {
        try assertRejected("GET /x HTTP/1.1\r\nHost : a\r\n\r\n")
        try assertRejected("GET /x HTTP/1.1\r\nHost: a\r\nX-A\t: b\r\n\r\n")
    }

    // MARK: Limits

    func testLongRequestLineIs414() throws {
        _ = try start { $0.listeners[0].limits.maxRequestLineBytes = 256 }
        try assertRejected("GET /\(String(repeating: "a", count: 400)) HTTP/1.1\r\nHost: a\r\n\r\n", status: 414)
    }

    func testLongTargetInPipelinedRequestIs414() throws {
        let proxy = try start { $0.listeners[0].limits.maxRequestLineBytes = 256 }
        let client = try proxy.connect()
        try client.send("GET /slow/100 HTTP/1.1\r\nHost: a\r\n\r\nGET /\(String(repeating: "a", count: 400)) HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertEqual(try client.readResponse().status, 200)
        assertJSONError(try client.readResponse(), status: 414, code: "uri_too_long")
        XCTAssertTrue(client.waitForClose())
    }

    func testTooManyHeadersIs431() throws {
        _ = try start { $0.listeners[0].limits.maxHeaderCount = 10 }
        var raw = "GET /x HTTP/1.1\r\nHost: a\r\n"
        for i in 0..<20 { raw += "X-H\(i): v\r\n" }
        try assertRejected(raw + "\r\n", status: 431)
    }

    func testHeaderBytesOverLimitIs431() throws {
        _ = try start { $0.listeners[0].limits.maxHeaderBytes = 1024 }
        try assertRejected("GET /x HTTP/1.1\r\nHost: a\r\nX-Big: \(String(repeating: "b", count: 3000))\r\n\r\n", status: 431)
    }

    func testBodyOverLimitByContentLengthIs413() throws {
        _ = try start { $0.routes[0].maxBodyBytes = 100 }
        try assertRejected("POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n", status: 413)
    }

    func testChunkedBodyOverLimitIs413BeforeAnythingIsSent() throws {
        let proxy = try start { $0.listeners[0].limits.maxBodyBytes = 10 }
        let client = try proxy.connect()
        try client.send("POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n12345678901234567890\r\n0\r\n\r\n")
        let response = try client.readResponse()
        assertJSONError(response, status: 413, code: "body_too_large")
        XCTAssertTrue(client.waitForClose())
        XCTAssertTrue(upstream.requests.allSatisfy { $0.bodyBytes <= 10 })
    }

    func testMaxConnectionsPerListener() throws {
        let proxy = try start { $0.listeners[0].maxConnections = 2 }
        let a = try proxy.connect()
        let b = try proxy.connect()
        XCTAssertEqual(try a.request("GET", "/a").status, 200)
        XCTAssertEqual(try b.request("GET", "/b").status, 200)
        let c = try proxy.connect()
        let refused = try c.readResponse()
        assertJSONError(refused, status: 503, code: "too_many_connections")
        XCTAssertTrue(c.waitForClose())
        // The first two still work.
        XCTAssertEqual(try a.request("GET", "/a2").status, 200)
    }

    // MARK: Slow clients

    func testHeaderTimeoutIs408AndClose() throws {
        let proxy = try start { $0.listeners[0].limits.headerTimeout = .milliseconds(300) }
        let client = try proxy.connect()
        try client.send("GET /x HTTP/1.1\r\nHost: a\r\n")   // never finished
        let response = try client.readResponse()
        assertJSONError(response, status: 408, code: "request_timeout")
        XCTAssertTrue(client.waitForClose())
        XCTAssertEqual(upstream.requests.count, 0)
    }

    /// A kept-alive connection's next head switches it from the keep-alive
    /// timeout to the header timeout when its first bytes arrive without
    /// the whole head (a head that is whole at once arms no timer).
    func testPartialHeadOnKeptConnectionGetsTheHeaderTimeout() throws {
        let proxy = try start {
            $0.listeners[0].limits.headerTimeout = .milliseconds(300)
            $0.listeners[0].limits.keepAliveTimeout = .seconds(30)
        }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/a").status, 200)
        XCTAssertEqual(try client.request("GET", "/b").status, 200)
        let sent = Date()
        try client.send("GET /x HTTP/1.1\r\nHost: a\r\n")   // never finished
        let response = try client.readResponse()
        assertJSONError(response, status: 408, code: "request_timeout")
        XCTAssertLessThan(Date().timeIntervalSince(sent), 10, "the header timeout, not the keep-alive one")
        XCTAssertTrue(client.waitForClose())
        XCTAssertEqual(upstream.requests.count, 2)
    }

    func testIdleKeepAliveConnectionIsClosedQuietly() throws {
        let proxy = try start { $0.listeners[0].limits.keepAliveTimeout = .milliseconds(300) }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/x").status, 200)
        XCTAssertTrue(client.waitForClose())
        XCTAssertTrue(client.readToEnd().isEmpty, "no bytes (no 408) on an idle close")
    }

    func testSlowlorisDoesNotStopOtherClients() throws {
        let proxy = try start { $0.listeners[0].limits.headerTimeout = .seconds(30) }
        var slow: [BlockingSocket] = []
        for _ in 0..<300 {
            let s = try proxy.connect()
            try s.send("GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            slow.append(s)
        }
        for i in 0..<20 {
            let client = try proxy.connect()
            XCTAssertEqual(try client.request("GET", "/fast/\(i)").status, 200)
        }
        for s in slow.prefix(10) { try s.send("a") }   // still trickling
        XCTAssertEqual(upstream.requests.count, 20)
        _ = slow
    }
}

/// A TCP listener with backlog 0 that never accepts; its queue is filled at
/// init, so new connection attempts to it stall (SYNs dropped).
final class StalledListener {
    let fd: Int32
    let port: Int
    private var fillers: [BlockingSocket] = []

    init() throws {
        let sock = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr)
        _ = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(sock, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        listen(sock, 0)
        var bound = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(sock, $0, &length) }
        }
        fd = sock
        port = Int(UInt16(bigEndian: bound.sin_port))
        // Fill the accept queue (backlog 0 still admits one); the second
        // attempt usually times out after a second, proving it is full.
        for _ in 0..<2 {
            if let s = try? BlockingSocket(port: port, timeoutSeconds: 1) { fillers.append(s) }
        }
    }

    deinit { close(fd) }
}

/// A TCP listener whose connections the kernel accepts (backlog) but the
/// test never reads: whatever is sent to it stalls once buffers are full.
final class NeverReadingListener {
    let fd: Int32
    let port: Int

    init() throws {
        let sock = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr)
        _ = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(sock, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        // Small receive buffers so the stall comes quickly.
        var small: Int32 = 4096
        setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        listen(sock, 16)
        var bound = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(sock, $0, &length) }
        }
        fd = sock
        port = Int(UInt16(bigEndian: bound.sin_port))
    }

    deinit { close(fd) }
}
