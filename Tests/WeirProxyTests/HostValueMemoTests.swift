import NIOCore
@testable import WeirProxy
import XCTest

/// `HostValueMemo` hands an HTTP/1.1 connection's next request the last
/// request's Host String when the value's bytes repeat. It must answer
/// what `HTTP1RequestHead.host` answers for every head, in any order.
final class HostValueMemoTests: XCTestCase {
    static func head(host: String?, version: String = "1.1") throws -> HTTP1RequestHead {
        var parser = HTTP1RequestParser()
        var buffer = ByteBuffer(string: "GET / HTTP/\(version)\r\n" + (host.map { "Host: \($0)\r\n" } ?? "") + "X-A: b\r\n\r\n")
        return try XCTUnwrap(parser.parse(&buffer))
    }

    func testAgreesWithTheHeadsHostAcrossRequests() throws {
        // Values of every length 0...20 (past the 16 the memo keeps), and
        // values that differ from the previous one in one byte only, at
        // the start, middle and end (the words' overlaps included).
        var hosts: [String] = []
        for n in 0...20 {
            let base = String((0..<n).map { i in Character(UnicodeScalar(UInt8(0x61 + i % 26))) })
            hosts.append(base)
            hosts.append(base)
            for position in Set([0, n / 2, n - 1]) where n > 0 {
                var bytes = Array(base.utf8)
                bytes[position] = UInt8(ascii: "Z")
                hosts.append(String(decoding: bytes, as: UTF8.self))
            }
            hosts.append(base)
        }
        hosts += ["example.com:8080", "example.com:8081", "Example.com:8080", "example.com:8080", "127.0.0.1:19001",
                  "127.0.0.1:19002", "127.0.0.1", "127.0.0.1:19001"]
        var memo = HostValueMemo()
        for host in hosts {
            let wire = try Self.head(host: host)
            XCTAssertEqual(memo.host(of: wire), wire.host, "Host '\(host)'")
            XCTAssertEqual(memo.host(of: wire), host)
        }
    }

    func testNoHostAndNonASCIIValues() throws {
        var memo = HostValueMemo()
        XCTAssertEqual(memo.host(of: try Self.head(host: "a.test")), "a.test")
        // HTTP/1.0 may omit Host: nil, and the kept value stays usable.
        XCTAssertNil(memo.host(of: try Self.head(host: nil, version: "1.0")))
        XCTAssertEqual(memo.host(of: try Self.head(host: "a.test")), "a.test")
        // obs-text bytes: the memo's String is the head's (repaired the same way).
        let wire = try Self.head(host: "b\u{e9}.test")
        XCTAssertEqual(memo.host(of: wire), wire.host)
        XCTAssertEqual(memo.host(of: wire), wire.host)
    }

    func testRequestHeadTakesTheMemosHost() throws {
        var memo = HostValueMemo()
        for host in ["one.test", "two.test", "two.test", "one.test"] {
            XCTAssertEqual(RequestHead(try Self.head(host: host), hostMemo: &memo).host, host)
        }
    }
}
