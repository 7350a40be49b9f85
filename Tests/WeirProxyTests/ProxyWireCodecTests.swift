import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

/// Behaviour that comes with Weir's own HTTP/1.1 codec on the data path:
/// `Date` on the proxy's own answers, `OPTIONS *`, CONNECT and version
/// errors with their own statuses, bytes split at any point, and a WebSocket
/// tunnel that passes the upstream's half-close on.
final class ProxyWireCodecTests: XCTestCase {
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

    func testProxyErrorResponsesCarryAnIMFDate() throws {
        let proxy = try start { $0.routes[0].match.paths = [.prefix("/api")] }
        let client = try proxy.connect()
        let response = try client.request("GET", "/elsewhere")
        XCTAssertEqual(response.status, 404)
        let date = try XCTUnwrap(response.header("date"))
        // e.g. "Sun, 06 Nov 1994 08:49:37 GMT"
        let pattern = #"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$"#
        XCTAssertNotNil(date.range(of: pattern, options: .regularExpression), date)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        let parsed = try XCTUnwrap(formatter.date(from: date))
        XCTAssertLessThan(abs(parsed.timeIntervalSinceNow), 120, "the Date is now, not a stale cache")
        // Malformed input answered by the proxy gets one too.
        let bad = try proxy.connect()
        try bad.send("GET /x HTTP/1.1\r\nHost: a\r\nX-Bad: a\u{0}b\r\n\r\n")
        XCTAssertNotNil(try bad.readResponse().header("date"))
    }

    /// RFC 9110 §6.6.1: a forwarded response whose origin sent no Date gets
    /// the proxy's; an origin's own Date is passed on untouched (one line).
    func testForwardedResponseWithoutDateGetsOneAndAnOriginDateIsKept() throws {
        let originDate = "Sun, 06 Nov 1994 08:49:37 GMT"
        let raw = try RawUpstream(group: upstreamGroup) { channel, buffer in
            // One response per complete head (keep-alive, bodyless requests).
            while let view = buffer.getString(at: buffer.readerIndex, length: buffer.readableBytes),
                  let end = view.range(of: "\r\n\r\n") {
                let head = String(view[..<end.lowerBound])
                buffer.moveReaderIndex(forwardBy: view.utf8.distance(from: view.startIndex, to: end.upperBound))
                let date = head.hasPrefix("GET /dated ") ? "Date: \(originDate)\r\n" : ""
                channel.writeAndFlush(ByteBuffer(string: "HTTP/1.1 200 OK\r\n\(date)Content-Length: 2\r\n\r\nok"), promise: nil)
            }
        }
        defer { raw.stop() }
        let harness = try ProxyHarness(config: ProxyHarness.config(targets: [raw.address]))
        proxy = harness
        let client = try harness.connect()

        let undated = try client.request("GET", "/undated")
        XCTAssertEqual(undated.status, 200)
        XCTAssertEqual(undated.bodyText, "ok")
        XCTAssertEqual(undated.headerValues("date").count, 1)
        let date = try XCTUnwrap(undated.header("date"))
        let pattern = #"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$"#
        XCTAssertNotNil(date.range(of: pattern, options: .regularExpression), date)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        let parsed = try XCTUnwrap(formatter.date(from: date))
        XCTAssertLessThan(abs(parsed.timeIntervalSinceNow), 120, "the proxy's clock, not a stale cache")

        // Same keep-alive connection: the origin's Date is the only one.
        let dated = try client.request("GET", "/dated")
        XCTAssertEqual(dated.status, 200)
        XCTAssertEqual(dated.headerValues("date"), [originDate])
    }

    /// The proxy's own lines of a forwarded response (Date, framing,
    /// Connection, Via) follow the kept lines: the upstream's Via lines fold
    /// into one chain ending in ours, what its Connection names is dropped,
    /// a body without a length is re-chunked for an HTTP/1.1 client and
    /// ends at close for an HTTP/1.0 one, which otherwise gets keep-alive.
    func testProxyLinesOfAForwardedResponse() throws {
        let raw = try RawUpstream(group: upstreamGroup) { channel, buffer in
            while let view = buffer.getString(at: buffer.readerIndex, length: buffer.readableBytes),
                  let end = view.range(of: "\r\n\r\n") {
                let head = String(view[..<end.lowerBound])
                buffer.moveReaderIndex(forwardBy: view.utf8.distance(from: view.startIndex, to: end.upperBound))
                if head.hasPrefix("GET /unframed ") {
                    channel.writeAndFlush(ByteBuffer(string: "HTTP/1.1 200 OK\r\nVia: 1.0 edge\r\n\r\nstreamed")).whenComplete { _ in
                        channel.close(promise: nil)
                    }
                    return
                }
                channel.writeAndFlush(ByteBuffer(string: "HTTP/1.1 200 OK\r\nVia: 1.0 edge\r\nX-Kept: 1\r\n"
                    + "Connection: x-drop\r\nX-Drop: secret\r\nVia: 1.1 cdn\r\nContent-Length: 2\r\n\r\nok"), promise: nil)
            }
        }
        defer { raw.stop() }
        let harness = try ProxyHarness(config: ProxyHarness.config(targets: [raw.address]))
        proxy = harness

        let client = try harness.connect()
        let framed = try client.request("GET", "/framed")
        XCTAssertEqual(framed.bodyText, "ok")
        XCTAssertEqual(framed.headers.map { $0.0.lowercased() }, ["x-kept", "content-length", "date", "via"])
        XCTAssertEqual(framed.header("via"), "1.0 edge, 1.1 cdn, 1.1 weir")
        let unframed = try client.request("GET", "/unframed")
        XCTAssertEqual(unframed.bodyText, "streamed")
        XCTAssertEqual(unframed.headers.map { $0.0.lowercased() }, ["date", "transfer-encoding", "via"])
        XCTAssertEqual(unframed.header("via"), "1.0 edge, 1.1 weir")

        let old = try harness.connect()
        try old.send("GET /framed HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        let kept = try old.readResponse()
        XCTAssertEqual(kept.bodyText, "ok")
        XCTAssertEqual(kept.headers.map { $0.0.lowercased() }, ["x-kept", "content-length", "date", "connection", "via"])
        XCTAssertEqual(kept.header("connection"), "keep-alive")
        try old.send("GET /unframed HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        let closing = try old.readResponse()
        XCTAssertEqual(closing.bodyText, "streamed")
        XCTAssertEqual(closing.header("connection"), "close")
        XCTAssertNil(closing.header("transfer-encoding"))
    }

    func testOptionsAsteriskIsForwarded() throws {
        let proxy = try start()
        let client = try proxy.connect()
        try client.send("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertEqual(try client.readResponse().status, 200)
        XCTAssertEqual(upstream.lastRequest?.method, "OPTIONS")
        XCTAssertEqual(upstream.lastRequest?.uri, "*")
        // An asterisk with any other method is malformed.
        let other = try proxy.connect()
        try other.send("GET * HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertEqual(try other.readResponse().status, 400)
    }

    func testConnectIs501AndCloses() throws {
        let proxy = try start()
        let client = try proxy.connect()
        try client.send("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 501)
        XCTAssertEqual(response.errorJSON?["error"], "not_implemented")
        XCTAssertTrue(client.waitForClose())
        XCTAssertEqual(upstream.requests.count, 0)
    }

    func testUnsupportedVersionAndCodingHaveTheirOwnStatus() throws {
        let proxy = try start()
        for (raw, status) in [
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        ] {
            let client = try proxy.connect()
            try client.send(raw)
            let response = try client.readResponse()
            XCTAssertEqual(response.status, status, raw)
            XCTAssertEqual(response.header("content-type"), "application/json")
            XCTAssertTrue(client.waitForClose())
        }
        XCTAssertEqual(upstream.requests.count, 0)
    }

    /// A request and its chunked body sent one byte per write: the
    /// incremental parser and decoder see every split point.
    func testRequestArrivingByteByByte() throws {
        let proxy = try start()
        let client = try proxy.connect()
        let raw = "POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        for byte in raw.utf8 { try client.send([byte]) }
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "11")
        XCTAssertEqual(try client.request("GET", "/after").bodyText, "ok from u1")
    }

    func testWebSocketTunnelPassesTheUpstreamHalfClose() throws {
        // Echoes until it reads "bye", then shuts its write side only.
        let tunnelUpstream = try RawUpstream(group: upstreamGroup) { channel, buffer in
            let view = String(decoding: buffer.readableBytesView, as: UTF8.self)
            if !view.hasPrefix("GET ") {
                if view.contains("bye\n") {
                    buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
                    channel.close(mode: .output, promise: nil)
                }
                return
            }
            guard let end = view.range(of: "\r\n\r\n") else { return }
            buffer.moveReaderIndex(forwardBy: view.utf8.distance(from: view.startIndex, to: end.upperBound))
            channel.writeAndFlush(ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"), promise: nil)
        }
        defer { tunnelUpstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [tunnelUpstream.address]))
        self.proxy = proxy
        let client = try proxy.connect()
        try client.send("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        XCTAssertEqual(try client.readResponse().status, 101)
        try client.send("bye\n")
        // The upstream's half-close reaches the client as EOF...
        XCTAssertTrue(client.waitForClose())
        // ...while the client's direction stays open.
        try client.send("still-talking\n")
        XCTAssertTrue(waitUntil(timeout: 10) {
            String(decoding: tunnelUpstream.allReceived, as: UTF8.self).contains("still-talking")
        }, "bytes sent after the upstream's half-close still reach it")
    }
}
