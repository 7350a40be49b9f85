import NIOCore
@testable import WeirProxy
import XCTest

/// `parseFieldLines` takes plain lines by one scan (`scanPlainFieldLine`)
/// and leaves every other line to `parseFieldLineChecked`. Whatever the
/// bytes, it must answer exactly what the checked parse alone answers: the
/// same head end or "incomplete", the same entries and framing facts, or
/// the same error.
final class HTTP1FieldLinesTests: XCTestCase {
    /// The result of a parse, comparable.
    enum Outcome: Equatable {
        case end(Int, [String], String)
        case incomplete([String])
        case error(String)
    }

    static func outcome(_ bytes: [UInt8], limits: HTTP1Limits, checkedOnly: Bool) -> Outcome {
        var entries: [HTTP1FieldEntry] = []
        var facts = HTTP1FramingFacts()
        func describe() -> [String] {
            entries.map { "\($0.nameStart) \($0.nameLength) \($0.valueStart) \($0.valueLength) \($0.lineEnd) \($0.known)" }
        }
        do {
            let end: Int? = try bytes.withUnsafeBufferPointer { buffer in
                // A copy with no spare bytes after it: loads must stay within `available`.
                let p = UnsafeMutablePointer<UInt8>.allocate(capacity: max(buffer.count, 1))
                defer { p.deallocate() }
                if let base = buffer.baseAddress { p.initialize(from: base, count: buffer.count) }
                if !checkedOnly {
                    return try parseFieldLines(p, from: 0, available: buffer.count, limits: limits, entries: &entries, facts: &facts)
                }
                var line = 0
                while true {
                    switch try parseFieldLineChecked(p, at: line, from: 0, available: buffer.count, limits: limits,
                                                     entries: &entries, facts: &facts) {
                    case .field(let next): line = next
                    case .headEnd(let end): return end
                    case .incomplete, .irregular: return nil
                    }
                }
            }
            guard let end else { return .incomplete(describe()) }
            return .end(end, describe(), "\(facts)")
        } catch {
            return .error("\(error)")
        }
    }

    func assertAgree(_ bytes: [UInt8], limits: HTTP1Limits = HTTP1Limits(), file: StaticString = #filePath, line: UInt = #line) {
        let fast = Self.outcome(bytes, limits: limits, checkedOnly: false)
        let checked = Self.outcome(bytes, limits: limits, checkedOnly: true)
        XCTAssertEqual(fast, checked, String(decoding: bytes, as: UTF8.self).debugDescription, file: file, line: line)
    }

    static let heads = [
        "Host: example.com\r\n\r\n",
        "Server: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 11:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\nbody",
        "Host: h\r\nTransfer-Encoding: gzip, chunked\r\nTE: trailers\r\nExpect: 100-continue\r\nX-Empty:\r\nX-Trail:   v  \r\n\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n\r\n",
        "Host: a\r\nHost: b\r\nConnection: close, upgrade\r\nUpgrade: websocket\r\n\r\n",
        "X-Tab:\tv\tw\t\r\nX-Obs: caf\u{e9}\r\nX-Long: 0123456789abcdef0123456789abcdef0123456789\r\n\r\n",
    ]

    /// The scan takes the usual lines itself (else the agreement below
    /// would hold trivially) and leaves the others to the checked parse.
    func testPlainLinesTakeTheScan() {
        func scan(_ text: String, at line: Int) -> String {
            let bytes = Array(text.utf8)
            var entries: [HTTP1FieldEntry] = []
            var facts = HTTP1FramingFacts()
            return bytes.withUnsafeBufferPointer { buffer in
                let step = try? scanPlainFieldLine(buffer.baseAddress!, at: line, from: 0, available: buffer.count,
                                                   limits: HTTP1Limits(), entries: &entries, facts: &facts)
                return step.map { "\($0)" } ?? "error"
            }
        }
        XCTAssertEqual(scan("Host: example.com\r\n\r\n", at: 0), "field(next: 19)")
        XCTAssertEqual(scan("Host: example.com\r\n\r\n", at: 19), "headEnd(21)")
        XCTAssertEqual(scan("Content-Length: 12   \r\n\r\n", at: 0), "field(next: 23)")
        XCTAssertEqual(scan("X-Tab:\tv\r\n\r\n", at: 0), "irregular")
        XCTAssertEqual(scan("X-Obs: caf\u{e9}\r\n\r\n", at: 0), "irregular")
        XCTAssertEqual(scan("Host: example.com\r", at: 0), "irregular")
        XCTAssertEqual(scan(" Host: x\r\n\r\n", at: 0), "irregular")
    }

    /// `name(at:)` / `value(at:)` build their Strings in place: the same
    /// Strings as decoding the bytes (short and long, ASCII, UTF-8,
    /// obs-text that is not UTF-8 and gets repaired, empty).
    func testNamesAndValuesAreTheDecodedBytes() throws {
        let values: [[UInt8]] = [Array("example.com:8080".utf8), Array("h".utf8), [], Array("café au lait".utf8),
                                 [0x63, 0x61, 0x66, 0xE9], Array(String(repeating: "v", count: 40).utf8),
                                 Array("0123456789abcde".utf8), Array("0123456789abcdef".utf8)]
        var head = Array("GET / HTTP/1.1\r\n".utf8)
        for (i, value) in values.enumerated() { head += Array("X-F\(i): ".utf8) + value + Array("\r\n".utf8) }
        head += Array("Host: h\r\n\r\n".utf8)
        var buffer = ByteBuffer(bytes: head)
        var parser = HTTP1RequestParser()
        let parsed = try XCTUnwrap(try parser.parse(&buffer))
        for (i, value) in values.enumerated() {
            XCTAssertEqual(parsed.fields.name(at: i), "X-F\(i)")
            XCTAssertEqual(parsed.fields.value(at: i), String(decoding: value, as: UTF8.self))
        }
        XCTAssertEqual(parsed.fields.value(at: 4), "caf\u{FFFD}")
        XCTAssertEqual(parsed.host, "h")
    }

    func testAgreesOnHeadsAndEveryTruncation() {
        for head in Self.heads {
            let bytes = Array(head.utf8)
            for length in 0...bytes.count { assertAgree(Array(bytes[..<length])) }
        }
    }

    /// Every byte of each head replaced by each byte that matters to the
    /// parse (CR, LF, SP, HTAB, ':', NUL, DEL, obs-text, a token char).
    func testAgreesOnEverySingleByteMutation() {
        let replacements: [UInt8] = [0x0D, 0x0A, 0x20, 0x09, 0x3A, 0x00, 0x7F, 0x80, 0xE9, 0x41, 0x2C, 0x22]
        for head in Self.heads {
            let bytes = Array(head.utf8)
            for index in bytes.indices {
                for byte in replacements where byte != bytes[index] {
                    var mutated = bytes
                    mutated[index] = byte
                    assertAgree(mutated)
                    assertAgree(Array(mutated[..<(index + 1)]))
                }
            }
        }
    }

    func testAgreesAtTheLimits() {
        let head = Array("A: 1\r\nB: 2\r\nC: 3\r\n\r\n".utf8)
        for count in 0...4 {
            for bytes in [4, 6, 11, 12, 13, 18, 19, 40] {
                var limits = HTTP1Limits()
                limits.maxFieldCount = count
                limits.maxFieldBytes = bytes
                assertAgree(head, limits: limits)
            }
        }
    }

    /// Random heads from plain and irregular pieces.
    func testAgreesOnGeneratedHeads() {
        var rng = HTTP1CodecDifferentialTests.SeededGenerator(state: 7)
        let pieces = ["Host", "X-A", "content-length", "Transfer-Encoding", ":", ": ", ":\t", " ", "\t", "v", "12",
                      "chunked", "close", "a,b", "\r\n", "\n", "\r", "\u{e9}", "\u{7f}", "x y"]
        for _ in 0..<3000 {
            var head = ""
            for _ in 0..<Int.random(in: 1...14, using: &rng) { head += pieces[Int.random(in: 0..<pieces.count, using: &rng)] }
            if Bool.random(using: &rng) { head += "\r\n\r\n" }
            assertAgree(Array(head.utf8))
        }
    }
}
