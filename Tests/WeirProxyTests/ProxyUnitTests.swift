import NIOCore
import NIOHTTP1
@testable import WeirProxy
import WeirCore
import XCTest

/// The data path's pure pieces, without sockets.
final class ProxyUnitTests: XCTestCase {
    func testHeaderNamesClassifyCaseInsensitively() {
        typealias K = HeaderRewriting.Known
        XCTAssertEqual(K.classify("Connection"), .connection)
        XCTAssertEqual(K.classify("TRANSFER-ENCODING"), .transferEncoding)
        XCTAssertEqual(K.classify("x-Forwarded-For"), .xForwardedFor)
        XCTAssertEqual(K.classify("X-Forwarded-Host"), .xForwardedHost)
        XCTAssertEqual(K.classify("x-forwarded-proto"), .xForwardedProto)
        XCTAssertEqual(K.classify("Proxy-Connection"), .proxyConnection)
        XCTAssertEqual(K.classify("te"), .te)
        XCTAssertEqual(K.classify("Host"), .host)
        XCTAssertEqual(K.classify("hosts"), .other)
        XCTAssertEqual(K.classify("Connectiom"), .other)
        XCTAssertEqual(K.classify("content_length"), .other, "underscore is not a dash")
        XCTAssertEqual(K.classify(""), .other)
    }

    func testUpstreamHeadDropsHopByHopAndAddsForwarding() {
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: "client.example")
        headers.add(name: "Connection", value: "keep-alive, X-Secret")
        headers.add(name: "X-Secret", value: "s")
        headers.add(name: "Keep-Alive", value: "timeout=5")
        headers.add(name: "X-Forwarded-For", value: "1.2.3.4")
        headers.add(name: "Via", value: "1.0 edge")
        headers.add(name: "X-Request-ID", value: "from-client")
        headers.add(name: "Accept", value: "*/*")
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/x", headers: headers)
        let out = HeaderRewriting.upstreamRequestHead(
            from: head, forwardURI: "/y?q", framing: .init(), upgrade: nil, hostHeader: "10.0.0.1:80",
            clientHost: "client.example", clientIP: "9.9.9.9", peerTrusted: false, scheme: "http", requestID: "rid")
        XCTAssertEqual(out.uri, "/y?q")
        XCTAssertEqual(out.headers["host"], ["10.0.0.1:80"])
        XCTAssertEqual(out.headers["x-forwarded-for"], ["9.9.9.9"], "untrusted peer: replaced")
        XCTAssertEqual(out.headers["x-forwarded-host"], ["client.example"])
        XCTAssertEqual(out.headers["via"], ["1.0 edge, 1.1 weir"])
        XCTAssertEqual(out.headers["x-request-id"], ["rid"])
        XCTAssertEqual(out.headers["accept"], ["*/*"])
        for name in ["connection", "x-secret", "keep-alive"] {
            XCTAssertFalse(out.headers.contains(name: name), name)
        }
    }

    func testDownstreamHeadFramesBodiesForEachClientVersion() {
        let upstream = HTTPResponseHead(version: .http1_1, status: .ok,
                                        headers: HTTPHeaders([("Transfer-Encoding", "chunked"), ("Connection", "keep-alive")]))
        let for11 = HeaderRewriting.downstreamResponseHead(upstream, requestVersion: .http1_1, bodyAllowed: true, keepAlive: true, isUpgrade: false)
        XCTAssertEqual(for11.head.headers["transfer-encoding"], ["chunked"])
        XCTAssertFalse(for11.mustClose)
        let for10 = HeaderRewriting.downstreamResponseHead(upstream, requestVersion: .http1_0, bodyAllowed: true, keepAlive: true, isUpgrade: false)
        XCTAssertTrue(for10.mustClose, "HTTP/1.0 client, no length: close-delimited")
        XCTAssertFalse(for10.head.headers.contains(name: "transfer-encoding"))
        XCTAssertEqual(for10.head.headers["connection"], ["close"])
        let forHead = HeaderRewriting.downstreamResponseHead(upstream, requestVersion: .http1_1, bodyAllowed: false, keepAlive: true, isUpgrade: false)
        XCTAssertFalse(forHead.head.headers.contains(name: "transfer-encoding"), "no chunked framing without a body")
    }

    /// Trusted-proxy ranges are WeirCore's CIDRBlock, matched against the peer's textual address.
    func testTrustedProxyRanges() throws {
        let v4 = try CIDRBlock(parsing: "10.0.0.0/8")
        XCTAssertTrue(v4.contains("10.200.3.4"))
        XCTAssertFalse(v4.contains("11.0.0.1"))
        XCTAssertTrue(v4.contains("::ffff:10.1.1.1"), "IPv4-mapped IPv6")
        let single = try CIDRBlock(parsing: "192.168.1.7")
        XCTAssertTrue(single.contains("192.168.1.7"))
        XCTAssertFalse(single.contains("192.168.1.8"))
        let v6 = try CIDRBlock(parsing: "fd00::/8")
        XCTAssertTrue(v6.contains("fd12::1"))
        XCTAssertFalse(v6.contains("10.0.0.1"))
        XCTAssertThrowsError(try CIDRBlock(parsing: "10.0.0.0/33"))
        XCTAssertThrowsError(try CIDRBlock(parsing: "not-an-ip"))
    }

    func testRequestIDsAreUniqueAndShaped() {
        let generator = RequestIDGenerator()
        let ids = (0..<1000).map { _ in generator.next() }
        XCTAssertEqual(Set(ids).count, 1000)
        let parts = ids[17].split(separator: "-")
        XCTAssertEqual(parts.count, 2)
        XCTAssertEqual(parts[0].count, 12)
        XCTAssertEqual(parts[1], "12", "counter in hex")
        XCTAssertNotEqual(RequestIDGenerator().next().prefix(12), ids[0].prefix(12), "random prefix per generator")
    }

    func testErrorBodyEscapesClientText() throws {
        let body = ProxyErrorResponse.body(kind: .noRoute, message: "no route matches GET /a\"b\\c\n\u{1}",
                                           requestID: "r-1", allocator: ByteBufferAllocator())
        let json = try JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [String: String]
        XCTAssertEqual(json?["error"], "no_route")
        XCTAssertEqual(json?["message"], "no route matches GET /a\"b\\c\n\u{1}")
        XCTAssertEqual(json?["request_id"], "r-1")
    }
}
