import NIOCore
@testable import WeirProxy
import XCTest

/// `HTTP1Bytes.equalsIgnoringCase` compares a word at a time (header names
/// looked up by plugins and the proxy). It must answer what a byte-by-byte
/// comparison answers: ASCII letters without case, every other byte (the
/// neighbours of 'A'...'Z' and 'a'...'z', bytes >= 0x80) exactly.
final class HTTP1EqualsIgnoringCaseTests: XCTestCase {
    static func reference(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        func fold(_ x: UInt8) -> UInt8 { x >= 0x41 && x <= 0x5A ? x | 0x20 : x }
        return a.count == b.count && zip(a, b).allSatisfy { fold($0) == fold($1) }
    }

    static func fast(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        precondition(a.count == b.count)
        // Exact-size copies: the loads must stay within the `n` bytes.
        let pa = UnsafeMutablePointer<UInt8>.allocate(capacity: max(a.count, 1))
        let pb = UnsafeMutablePointer<UInt8>.allocate(capacity: max(b.count, 1))
        defer { pa.deallocate(); pb.deallocate() }
        pa.initialize(from: a, count: a.count)
        pb.initialize(from: b, count: b.count)
        return HTTP1Bytes.equalsIgnoringCase(pa, pb, a.count)
    }

    func testEveryByteAgainstEveryByteAtEveryPosition() {
        // One byte differs from a run of letters, at each position of each
        // length: all 256 x 256 pairs at the first, middle and last position.
        // Exact-size buffers, so the loads must stay within the `n` bytes.
        for n in [1, 2, 3, 5, 8, 9, 16, 17] {
            let base = Array("apikey-x-forwarded".utf8.prefix(n))
            let pa = UnsafeMutablePointer<UInt8>.allocate(capacity: n)
            let pb = UnsafeMutablePointer<UInt8>.allocate(capacity: n)
            defer { pa.deallocate(); pb.deallocate() }
            pa.initialize(from: base, count: n)
            pb.initialize(from: base, count: n)
            for position in Set([0, n / 2, n - 1]) {
                for x in 0...255 {
                    for y in 0...255 {
                        pa[position] = UInt8(x)
                        pb[position] = UInt8(y)
                        func fold(_ v: Int) -> Int { v >= 0x41 && v <= 0x5A ? v | 0x20 : v }
                        if HTTP1Bytes.equalsIgnoringCase(pa, pb, n) != (fold(x) == fold(y)) {
                            return XCTFail("length \(n), position \(position): \(x) vs \(y)")
                        }
                    }
                }
                pa[position] = base[position]
                pb[position] = base[position]
            }
        }
    }

    func testRandomNamesOfEveryLength() {
        var generator = SystemRandomNumberGenerator()
        let alphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_^~`@[{".utf8) + [0x80, 0xC1, 0xE1, 0xFF]
        for n in 0...40 {
            for _ in 0..<400 {
                let a = (0..<n).map { _ in alphabet.randomElement(using: &generator)! }
                // Same name with cases flipped at random, sometimes one byte changed.
                var b = a.map { x -> UInt8 in
                    let letter = (x | 0x20) >= 0x61 && (x | 0x20) <= 0x7A
                    return letter && Bool.random(using: &generator) ? x ^ 0x20 : x
                }
                if n > 0 && Bool.random(using: &generator) {
                    b[Int.random(in: 0..<n, using: &generator)] = alphabet.randomElement(using: &generator)!
                }
                XCTAssertEqual(Self.fast(a, b), Self.reference(a, b), "\(a) vs \(b)")
            }
        }
    }

    func testHeaderLookupIgnoresCase() throws {
        var parser = HTTP1RequestParser()
        var buffer = ByteBuffer(string: "GET / HTTP/1.1\r\nHost: h\r\nAPIKey: k1\r\nX-Api_Key: k2\r\napikez: no\r\n\r\n")
        guard let head = try parser.parse(&buffer) else { return XCTFail("no head") }
        func value(_ name: String) -> String? {
            var found: String?
            head.fields.withFirstValue(named: name) { found = $0.map { String(decoding: $0, as: UTF8.self) } }
            return found
        }
        XCTAssertEqual(value("apikey"), "k1")
        XCTAssertEqual(value("x-api_key"), "k2")
        XCTAssertEqual(value("x-api-key"), nil)
        XCTAssertEqual(value("apikez"), "no")
        XCTAssertEqual(value("HOST"), "h")
    }
}
