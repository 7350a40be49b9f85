import NIOCore
import NIOEmbedded
@testable import WeirRedis
import XCTest

/// The RESP2 encoder and the incremental decoder, on EmbeddedChannel (no sockets).
final class RESPCodecTests: XCTestCase {
    private static let samples: [RESPValue] = [
        .simpleString(ByteBuffer(string: "OK")),
        .simpleString(ByteBuffer(string: "")),
        .error("ERR unknown command 'FOO'"),
        .integer(0),
        .integer(42),
        .integer(-7),
        .integer(Int.max),
        .integer(Int.min),
        .bulkString(ByteBuffer(string: "hello")),
        .bulkString(ByteBuffer(string: "")),
        .bulkString(ByteBuffer(bytes: [0, 13, 10, 255, 36, 42])),  // binary, with CRLF inside
        .bulkString(nil),
        .array([]),
        .array(nil),
        .array([.integer(1), .bulkString(ByteBuffer(string: "two")), .bulkString(nil),
                .array([.simpleString(ByteBuffer(string: "nested")), .array([.integer(3)]), .array(nil)]),
                .error("WRONGTYPE inner")]),
    ]

    private func decodeAll(_ chunks: [ByteBuffer], limits: RESPLimits = RESPLimits()) throws -> [RESPValue] {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(RESPDecoder(limits: limits)))
        var values: [RESPValue] = []
        for chunk in chunks {
            try channel.writeInbound(chunk)
            while let value = try channel.readInbound(as: RESPValue.self) { values.append(value) }
        }
        _ = try channel.finish()
        return values
    }

    private func wire(_ values: [RESPValue]) -> ByteBuffer {
        var buffer = ByteBuffer()
        for value in values { buffer.writeRESPValue(value) }
        return buffer
    }

    func testEveryTypeRoundTripsInOneRead() throws {
        let decoded = try self.decodeAll([self.wire(Self.samples)])
        XCTAssertEqual(decoded, Self.samples)
    }

    func testEveryTypeRoundTripsSplitAtEveryByte() throws {
        let bytes = self.wire(Self.samples)
        // One byte per read: every split point inside every value is crossed.
        var chunks: [ByteBuffer] = []
        for index in 0..<bytes.readableBytes {
            chunks.append(bytes.getSlice(at: bytes.readerIndex + index, length: 1)!)
        }
        XCTAssertEqual(try self.decodeAll(chunks), Self.samples)
    }

    func testEveryTypeRoundTripsSplitInTwoAtEachOffset() throws {
        let bytes = self.wire(Self.samples)
        for split in stride(from: 1, to: bytes.readableBytes, by: 3) {
            let first = bytes.getSlice(at: 0, length: split)!
            let second = bytes.getSlice(at: split, length: bytes.readableBytes - split)!
            XCTAssertEqual(try self.decodeAll([first, second]), Self.samples, "split at \(split)")
        }
    }

    func testCommandEncodingIsArrayOfBulkStrings() {
        var buffer = ByteBuffer()
        buffer.writeRESPCommand(["SET", "key", .bytes(ByteBuffer(string: "v\r\n")), .integer(-120), .integer(0)])
        XCTAssertEqual(String(buffer: buffer),
                       "*5\r\n$3\r\nSET\r\n$3\r\nkey\r\n$3\r\nv\r\n\r\n$4\r\n-120\r\n$1\r\n0\r\n")
        var unicode = ByteBuffer()
        unicode.writeRESPCommand(["GET", "clé"])
        XCTAssertEqual(String(buffer: unicode), "*2\r\n$3\r\nGET\r\n$4\r\nclé\r\n", "length is in bytes, not characters")
    }

    func testEncodingEmptyAndLargeArgumentsAndIntegerExtremes() throws {
        let large = String(repeating: "0123456789", count: 100_000)  // 1 MB
        var buffer = ByteBuffer(string: "prefix-")  // appends after existing bytes
        buffer.writeRESPCommand(["SET", "", .bytes(ByteBuffer()), .string(large), .integer(Int.min), .integer(Int.max)])
        XCTAssertEqual(buffer.readString(length: 7), "prefix-")
        let decoded = try self.decodeAll([buffer])
        XCTAssertEqual(decoded, [.array([
            .bulkString(ByteBuffer(string: "SET")), .bulkString(ByteBuffer()), .bulkString(ByteBuffer()),
            .bulkString(ByteBuffer(string: large)), .bulkString(ByteBuffer(string: String(Int.min))),
            .bulkString(ByteBuffer(string: String(Int.max))),
        ])])
    }

    func testEncodedCommandDecodesAsArrayOfBulkStrings() throws {
        var buffer = ByteBuffer()
        buffer.writeRESPCommand(["INCRBY", "counter", .integer(1234567890123)])
        let decoded = try self.decodeAll([buffer])
        XCTAssertEqual(decoded, [.array([.bulkString(ByteBuffer(string: "INCRBY")),
                                         .bulkString(ByteBuffer(string: "counter")),
                                         .bulkString(ByteBuffer(string: "1234567890123"))])])
    }

    func testMalformedInputIsAClearError() {
        let cases: [(String, String)] = [
            ("?what\r\n", "unknown type byte"),
            (":12a\r\n", "invalid integer"),
            (":\r\n", "empty integer"),
            (":99999999999999999999999\r\n", "out of range"),
            ("$3\r\nabcde\r\n", "not followed by CRLF"),
            ("$-5\r\n", "negative bulk length"),
            ("*-2\r\n", "negative array length"),
            ("+OK\rX", "CR not followed by LF"),
        ]
        for (input, expected) in cases {
            XCTAssertThrowsError(try self.decodeAll([ByteBuffer(string: input)]), input) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(input): \(error)")
            }
        }
    }

    func testLimitsStopHostileLengthsBeforeAllocating() {
        let limits = RESPLimits(maxBulkLength: 1024, maxArrayLength: 100, maxDepth: 4, maxLineLength: 64)
        let cases: [(String, String)] = [
            ("$1025\r\n", "over the limit of 1024"),
            ("$9223372036854775807\r\n", "over the limit"),
            ("*101\r\n", "over the limit of 100"),
            ("*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", "nested deeper than 4"),
            ("+" + String(repeating: "a", count: 100), "line longer than 64"),
        ]
        for (input, expected) in cases {
            XCTAssertThrowsError(try self.decodeAll([ByteBuffer(string: input)], limits: limits), input) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(input): \(error)")
            }
        }
        // At the limits exactly, values are accepted.
        XCTAssertNoThrow(try self.decodeAll([ByteBuffer(string: "*1\r\n*1\r\n*1\r\n:1\r\n")], limits: limits))
        let bulk = "$1024\r\n" + String(repeating: "x", count: 1024) + "\r\n"
        XCTAssertEqual(try self.decodeAll([ByteBuffer(string: bulk)], limits: limits).count, 1)
    }

    func testHugeClaimedArrayWithFewBytesWaitsWithoutReserving() throws {
        // A count within limits but with no elements yet: decoder waits, consumes nothing.
        var buffer = ByteBuffer(string: "*1000000\r\n:1\r\n")
        XCTAssertNil(try RESPDecoder.parse(buffer, limits: RESPLimits()))
        XCTAssertEqual(buffer.readableBytes, 14)
        buffer.clear()
    }

    func testScriptSHA1MatchesKnownDigests() {
        XCTAssertEqual(RedisScript("").sha1, "da39a3ee5e6b4b0d3255bfef95601890afd80709")
        XCTAssertEqual(RedisScript("abc").sha1, "a9993e364706816aba3e25717850c26c9cd0d89d")
        XCTAssertEqual(RedisScript(String(repeating: "a", count: 1000)).sha1,
                       "291e9a6c66994949b57ba5e650361e98fc36b1ba")
    }
}
