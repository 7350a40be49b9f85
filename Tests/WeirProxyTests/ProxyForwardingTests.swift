import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

/// Proxying semantics over real loopback sockets: framing, hop-by-hop
/// headers, forwarding headers, keep-alive, pipelining, 1xx, HEAD, 204/304.
final class ProxyForwardingTests: XCTestCase {
    var upstreamGroup: MultiThreadedEventLoopGroup!
    var upstream: TestUpstream!
    var proxy: ProxyHarness!

    override func setUpWithError() throws {
        upstreamGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstream = try TestUpstream(name: "u1", group: upstreamGroup)
        proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]))
    }

    override func tearDown() {
        proxy?.stop()
        upstream?.stop()
        try? upstreamGroup?.syncShutdownGracefully()
    }

    func testSimpleGetIsProxied() throws {
        let client = try proxy.connect()
        let response = try client.request("GET", "/hello?x=1")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "ok from u1")
        XCTAssertEqual(response.header("x-upstream"), "u1")
        XCTAssertEqual(response.header("via"), "1.1 weir")
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertEqual(seen.uri, "/hello?x=1")
        XCTAssertEqual(seen.header("host"), upstream.address.description)
        XCTAssertNotNil(seen.header("x-request-id"))
        XCTAssertEqual(seen.header("via"), "1.1 weir")
    }

    /// A target forwarded as received (one shared route object per route)
    /// and targets that must be rewritten (strip_path, normalization,
    /// absolute-form) on the same keep-alive connection: each request goes
    /// upstream with its own target.
    func testEachRequestIsForwardedWithItsOwnTarget() throws {
        proxy.stop()
        proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) { config in
            var api = RouteConfig()
            api.name = "api"
            api.upstream = "backend"
            api.match.paths = [.prefix("/api")]
            api.stripPath = true
            config.routes.insert(api, at: 0)
        })
        let client = try proxy.connect()
        let cases: [(sent: String, forwarded: String)] = [
            ("/one?a=1", "/one?a=1"),
            ("/two", "/two"),
            ("/api/users?page=2", "/users?page=2"),
            ("/three/../four?b=2", "/four?b=2"),
            ("http://example.test/five?c=3", "/five?c=3"),
            ("/one?a=1", "/one?a=1"),
            ("/api/q?x=1?y=/../z", "/q?x=1?y=/../z"),
            ("/a-much-longer-path-than-fifteen-bytes/x?and=a-query-string-too", "/a-much-longer-path-than-fifteen-bytes/x?and=a-query-string-too"),
        ]
        for (sent, forwarded) in cases {
            try client.send("GET \(sent) HTTP/1.1\r\nHost: example.test\r\n\r\n")
            XCTAssertEqual(try client.readResponse().status, 200, sent)
            XCTAssertEqual(upstream.lastRequest?.uri, forwarded, sent)
        }
    }

    func testKeepAliveReusesUpstreamConnection() throws {
        let client = try proxy.connect()
        for i in 0..<5 {
            let response = try client.request("GET", "/n/\(i)")
            XCTAssertEqual(response.status, 200)
        }
        XCTAssertEqual(upstream.requests.count, 5)
        XCTAssertEqual(upstream.connectionsAccepted, 1, "one pooled upstream connection serves all five requests")
        XCTAssertEqual(proxy.observer.records.count, 5)
        XCTAssertEqual(proxy.observer.records.last?.route, "all")
        XCTAssertEqual(proxy.observer.records.last?.status, 200)
    }

    func testPostBodyWithContentLengthIsStreamedAndEchoed() throws {
        let client = try proxy.connect()
        let body = String(repeating: "abcdefgh", count: 10_000)
        let response = try client.request("POST", "/echo", body: body)
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, body)
        XCTAssertEqual(upstream.lastRequest?.bodyBytes, body.utf8.count)
        XCTAssertEqual(upstream.lastRequest?.header("content-length"), String(body.utf8.count))
    }

    func testChunkedRequestWithTrailersIsForwardedChunked() throws {
        let client = try proxy.connect()
        try client.send("POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n")
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "11")
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertEqual(seen.header("transfer-encoding"), "chunked")
        XCTAssertEqual(seen.header("te"), "trailers")
        XCTAssertEqual(seen.trailers?.first { $0.0 == "x-sum" }?.1, "42")
    }

    func testResponseTrailersReachTheClient() throws {
        let client = try proxy.connect()
        let response = try client.request("GET", "/trailers", headers: [("TE", "trailers")])
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "hello trailers")
        XCTAssertEqual(response.header("transfer-encoding"), "chunked")
        XCTAssertEqual(response.trailers.first { $0.0.lowercased() == "x-checksum" }?.1, "abc123")
    }

    func testHopByHopHeadersAreRemovedBothWays() throws {
        let client = try proxy.connect()
        let response = try client.request("GET", "/hop", headers: [
            ("Connection", "x-private, keep-alive"), ("X-Private", "client-secret"),
            ("Keep-Alive", "timeout=10"), ("Proxy-Connection", "keep-alive"), ("TE", "gzip"),
            ("Upgrade", "h2c"), ("X-Normal", "kept"),
        ])
        XCTAssertEqual(response.status, 200)
        let seen = try XCTUnwrap(upstream.lastRequest)
        for name in ["x-private", "keep-alive", "proxy-connection", "te", "upgrade"] {
            XCTAssertNil(seen.header(name), "\(name) must not reach the upstream")
        }
        XCTAssertEqual(seen.header("x-normal"), "kept")
        XCTAssertNil(response.header("x-secret"))
        XCTAssertNil(response.header("keep-alive"))
        XCTAssertNil(response.header("proxy-connection"))
        XCTAssertEqual(response.header("x-kept"), "yes")
        // The client connection is still usable (keep-alive decided by the proxy).
        XCTAssertEqual(try client.request("GET", "/again").status, 200)
    }

    func testForwardedHeadersReplaceUntrustedXFF() throws {
        let client = try proxy.connect()
        _ = try client.request("GET", "/xff", host: "shop.example.com:8080", headers: [("X-Forwarded-For", "6.6.6.6")])
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertEqual(seen.header("x-forwarded-for"), "127.0.0.1")
        XCTAssertEqual(seen.header("x-forwarded-proto"), "http")
        XCTAssertEqual(seen.header("x-forwarded-host"), "shop.example.com:8080")
        XCTAssertEqual(seen.header("host"), upstream.address.description)
    }

    func testHeadResponseHasNoBody() throws {
        let client = try proxy.connect()
        let response = try client.request("HEAD", "/anything")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.header("content-length"), "10")
        XCTAssertTrue(response.body.isEmpty)
        // Framing stayed intact: the next response parses.
        let next = try client.request("GET", "/after-head")
        XCTAssertEqual(next.bodyText, "ok from u1")
    }

    func testNoContentAndNotModifiedHaveNoBody() throws {
        let client = try proxy.connect()
        let r204 = try client.request("GET", "/status/204")
        XCTAssertEqual(r204.status, 204)
        XCTAssertNil(r204.header("transfer-encoding"))
        let r304 = try client.request("GET", "/status/304")
        XCTAssertEqual(r304.status, 304)
        XCTAssertEqual(r304.header("etag"), "\"v1\"")
        XCTAssertEqual(try client.request("GET", "/x").bodyText, "ok from u1")
    }

    func testInformationalResponsesAreRelayed() throws {
        let client = try proxy.connect()
        let response = try client.request("GET", "/hints")
        XCTAssertEqual(response.informational, [103])
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "after hints")
    }

    func testExpectContinueIsForwardedAndUpstream100Relayed() throws {
        let client = try proxy.connect()
        try client.send("POST /continue HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        // The client waits for the 100 before sending its body.
        let interim = try XCTUnwrap(client.readLine())
        XCTAssertTrue(interim.hasPrefix("HTTP/1.1 100"), interim)
        while let line = client.readLine(), !line.isEmpty {}
        try client.send("hello")
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "5")
        XCTAssertEqual(upstream.lastRequest?.header("expect"), "100-continue")
    }

    func testPipelinedRequestsAnswerInOrder() throws {
        let client = try proxy.connect()
        try client.send("GET /slow/150 HTTP/1.1\r\nHost: a\r\n\r\nGET /first-fast HTTP/1.1\r\nHost: a\r\n\r\nPOST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /last HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertEqual(try client.readResponse().bodyText, "slow from u1")
        XCTAssertEqual(try client.readResponse().bodyText, "ok from u1")
        XCTAssertEqual(try client.readResponse().bodyText, "3")
        XCTAssertEqual(try client.readResponse().bodyText, "ok from u1")
        XCTAssertEqual(upstream.requests.map(\.uri), ["/slow/150", "/first-fast", "/sink", "/last"])
    }

    /// Each connection keeps the buffer its heads are written into (client
    /// side: response head + small body; upstream side: request head) across
    /// requests. Sizes that fit, outgrow, and exceed what is kept, some sent
    /// pipelined (earlier writes may still be pending when the next head is
    /// written), must each arrive whole and with their own head.
    func testReusedHeadBuffersKeepEveryMessageIntact() throws {
        let client = try proxy.connect()
        let sizes = [10, 3000, 20000, 7, 5000, 1, 70000, 12]
        for n in sizes.prefix(3) {
            let response = try client.request("GET", "/big/\(n)")
            XCTAssertEqual(response.status, 200)
            XCTAssertEqual(response.header("content-length"), String(n))
            XCTAssertEqual(response.body, Array(repeating: UInt8(ascii: "x"), count: n))
            XCTAssertEqual(response.headerValues("via"), ["1.1 weir"])
        }
        var burst = ""
        for n in sizes.dropFirst(3) { burst += "GET /big/\(n) HTTP/1.1\r\nHost: a\r\nX-Pad: \(String(repeating: "q", count: n % 300))\r\n\r\n" }
        try client.send(burst)
        for n in sizes.dropFirst(3) {
            let response = try client.readResponse()
            XCTAssertEqual(response.header("content-length"), String(n))
            XCTAssertEqual(response.body, Array(repeating: UInt8(ascii: "x"), count: n))
            XCTAssertEqual(response.headerValues("via"), ["1.1 weir"])
        }
        let seen = upstream.requests
        XCTAssertEqual(seen.map(\.uri), sizes.map { "/big/\($0)" })
        XCTAssertEqual(seen.dropFirst(3).map { $0.header("x-pad") ?? "-" }, sizes.dropFirst(3).map { String(repeating: "q", count: $0 % 300) })
        XCTAssertEqual(Set(seen.compactMap { $0.header("x-request-id") }).count, sizes.count)
        XCTAssertTrue(seen.allSatisfy { $0.headerValues("host").count == 1 && $0.headerValues("via") == ["1.1 weir"] })
    }

    /// Small messages are sent straight on the socket (SoleHandlerIO) only
    /// while NIO holds none of the connection's writes. Here the client
    /// does not read a large response at first (a small receive buffer), so
    /// most of it waits in NIO when the pipelined small responses after it
    /// are written: they must queue behind it. The same on the upstream
    /// side: a large request body, then small requests on that connection.
    func testSmallMessagesQueueBehindLargeOnesNIOStillHolds() throws {
        let client = try proxy.connect()
        var small: Int32 = 32 * 1024
        setsockopt(client.fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let big = 4 * 1024 * 1024
        var burst = "GET /big/\(big) HTTP/1.1\r\nHost: a\r\n\r\n"
        for i in 0..<4 { burst += "GET /after-\(i) HTTP/1.1\r\nHost: a\r\n\r\n" }
        try client.send(burst)
        usleep(100_000)   // lets the proxy fill the socket; correct either way
        let first = try client.readResponse()
        XCTAssertEqual(first.status, 200)
        XCTAssertEqual(first.body.count, big)
        XCTAssertTrue(first.body.allSatisfy { $0 == UInt8(ascii: "x") })
        for _ in 0..<4 {
            XCTAssertEqual(try client.readResponse().bodyText, "ok from u1")
        }

        let upload = 3 * 1024 * 1024
        var pipelined = Array("POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: \(upload)\r\n\r\n".utf8)
        pipelined += [UInt8](repeating: UInt8(ascii: "b"), count: upload)
        pipelined += Array("GET /after-upload HTTP/1.1\r\nHost: a\r\n\r\nPOST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi".utf8)
        try client.send(pipelined)
        XCTAssertEqual(try client.readResponse().bodyText, String(upload))
        XCTAssertEqual(try client.readResponse().bodyText, "ok from u1")
        XCTAssertEqual(try client.readResponse().bodyText, "2")
        XCTAssertEqual(upstream.requests.map(\.uri),
                       ["/big/\(big)"] + (0..<4).map { "/after-\($0)" } + ["/sink", "/after-upload", "/sink"])
        XCTAssertEqual(upstream.requests.map(\.bodyBytes).suffix(3), [upload, 0, 2])
    }

    func testHTTP10ClientGetsCloseDelimitedOrLengthResponse() throws {
        let client = try proxy.connect()
        try client.send("GET /echo HTTP/1.0\r\nHost: a\r\n\r\n")
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertNil(response.header("transfer-encoding"), "no chunked encoding for an HTTP/1.0 client")
        XCTAssertTrue(client.waitForClose())
    }

    func testConnectionCloseFromClientIsHonoured() throws {
        let client = try proxy.connect()
        let response = try client.request("GET", "/x", headers: [("Connection", "close")])
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.header("connection"), "close")
        XCTAssertTrue(client.waitForClose())
    }

    func testUpstreamConnectionCloseIsNotReused() throws {
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/close").bodyText, "closing")
        XCTAssertEqual(try client.request("GET", "/next").bodyText, "ok from u1")
        XCTAssertEqual(upstream.connectionsAccepted, 2)
    }

    func testClientHalfCloseStillGetsItsResponse() throws {
        let client = try proxy.connect()
        try client.send("GET /slow/100 HTTP/1.1\r\nHost: a\r\n\r\n")
        client.shutdownWrite()
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "slow from u1")
        XCTAssertTrue(client.waitForClose())
    }

    func testPathIsNormalizedBeforeRoutingAndForwarding() throws {
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/public/../admin/%7Euser?q=1").status, 200)
        XCTAssertEqual(upstream.lastRequest?.uri, "/admin/~user?q=1")
    }

    func testAbsoluteFormTargetIsAccepted() throws {
        let client = try proxy.connect()
        try client.send("GET http://shop.example.com/abs?x=2 HTTP/1.1\r\nHost: other\r\n\r\n")
        XCTAssertEqual(try client.readResponse().status, 200)
        XCTAssertEqual(upstream.lastRequest?.uri, "/abs?x=2")
        XCTAssertEqual(upstream.lastRequest?.header("x-forwarded-host"), "shop.example.com")
    }

    func testMissingOrDuplicateHostIsRejected() throws {
        for raw in ["GET / HTTP/1.1\r\n\r\n", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"] {
            let client = try proxy.connect()
            try client.send(raw)
            XCTAssertEqual(try client.readResponse().status, 400)
            XCTAssertTrue(client.waitForClose())
        }
        XCTAssertEqual(upstream.requests.count, 0)
    }
}

/// X-Forwarded-For from a trusted peer is extended, not replaced.
final class ProxyTrustedForwardingTests: XCTestCase {
    func testTrustedPeerXFFIsAppendedTo() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let upstream = try TestUpstream(name: "u", group: group)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) {
            $0.forwarded.trustedProxies = ["127.0.0.0/8"]
            $0.routes[0].preserveHost = true
        })
        defer { proxy.stop() }
        let client = try proxy.connect()
        _ = try client.request("GET", "/", host: "api.example.com", headers: [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")])
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertEqual(seen.header("x-forwarded-for"), "203.0.113.7, 127.0.0.1")
        XCTAssertEqual(seen.header("x-forwarded-proto"), "https")
        XCTAssertEqual(seen.header("host"), "api.example.com", "preserve_host forwards the client's Host")
    }
}
