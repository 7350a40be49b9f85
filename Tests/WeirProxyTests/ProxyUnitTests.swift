import NIOCore
import NIOHTTP1
@testable import WeirProxy
import WeirCore
import XCTest

/// The data path's pure pieces, without sockets.
final class ProxyUnitTests: XCTestCase {
    /// Plugin-added names are classified like parsed ones (hop-by-hop
    /// fields a plugin adds to a response are not relayed).
    func testHeaderNamesClassifyCaseInsensitively() {
        typealias K = HTTP1KnownField
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
        XCTAssertTrue(K.classify("Keep-Alive").isHopByHop)
        XCTAssertFalse(K.classify("via").isHopByHop)
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
        XCTAssertEqual(parts[0].count, 8)
        XCTAssertEqual(parts[1], "I", "counter in base 62")
        XCTAssertEqual(ids[999].split(separator: "-").last, "G8", "1000 = 16 x 62 + 8")
        let alphabet = Set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-")
        XCTAssertTrue(ids.allSatisfy { $0.allSatisfy(alphabet.contains) })
        XCTAssertNotEqual(RequestIDGenerator().next().prefix(8), ids[0].prefix(8), "random prefix per generator")
    }

    func testRequestIDsStayWithinFifteenBytesAcrossThePrefixChange() {
        // 15 bytes or fewer: Swift keeps the String inline (no heap storage).
        let generator = RequestIDGenerator(counter: RequestIDGenerator.counterLimit - 2)
        let last = generator.next()
        XCTAssertEqual(last.utf8.count, 15)
        XCTAssertEqual(last.split(separator: "-").last, "zzzzzz")
        let afterChange = generator.next()
        XCTAssertEqual(afterChange.split(separator: "-").last, "1", "counter restarts")
        XCTAssertNotEqual(afterChange.prefix(8), last.prefix(8), "new random prefix")
        XCTAssertEqual(afterChange.utf8.count, 10)
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

/// HTTP/2 request field checks (RFC 9113 §8.2) share the HTTP/1.1 tchar
/// table and the plugin-value check; the bytes each one refuses.
final class HTTP2RequestFieldCheckTests: XCTestCase {
    func testNamesAreLowercaseTokens() {
        XCTAssertTrue(HTTP2RequestFields.isLowercaseToken("x-a_b.c!#$%&'*+^`|~09"))
        for bad in ["", "X-Up", "x-uP", "a b", "x@y", "x(y", "x:y", "x\"y", "x/y", "x\u{7F}", "x\u{0}", "é", "x\r\n"] {
            XCTAssertFalse(HTTP2RequestFields.isLowercaseToken(bad), "\(bad.debugDescription)")
        }
    }

    func testValuesRefuseNULCRAndLF() {
        for good in ["", "a b\tc", "ünïcode", String(repeating: "v", count: 100)] {
            XCTAssertTrue(HTTP2RequestFields.isValidValue(good), good)
        }
        for bad in ["1\r\nx-injected: 1", "a\rb", "a\nb", "a\u{0}", String(repeating: "v", count: 100) + "\n"] {
            XCTAssertFalse(HTTP2RequestFields.isValidValue(bad), "\(bad.debugDescription)")
        }
    }
}
