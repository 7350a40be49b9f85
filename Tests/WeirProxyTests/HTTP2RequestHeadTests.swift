// HTTP2RequestHead builds an HTTP/2 request's HTTP/1.1 head and its field
// index in one pass: it must be exactly what HTTP1RequestParser makes of
// the same bytes (the exchange and the upstream writer read that index).

import NIOCore
@testable import WeirProxy
import XCTest

final class HTTP2RequestHeadTests: XCTestCase {
    private func list(_ fields: [(String, String)]) -> HTTP2FieldList {
        var list = HTTP2FieldList(capacity: fields.count)
        for (name, value) in fields { list.add(name: name, value: value) }
        return list
    }

    private func make(_ fields: [(String, String)], endStream: Bool = true,
                      limits: HTTP1Limits = HTTP1Limits()) throws -> HTTP1RequestHead {
        let headers = list(fields)
        return try HTTP2RequestHead.make(headers, try HTTP2RequestFields(headers), endStream: endStream, limits: limits,
                                         allocator: ByteBufferAllocator())
    }

    private let get = [(":method", "GET"), (":scheme", "https"), (":path", "/a/b?c=d"), (":authority", "api.example:8443")]

    func testTheIndexIsWhatTheParserMakesOfTheSameBytes() throws {
        let lists: [([(String, String)], Bool)] = [
            (get, true),
            (get + [("accept", "*/*"), ("cookie", "a=1"), ("x-b", ""), ("cookie", "b=2"), ("te", "trailers")], true),
            ([(":method", "POST"), (":scheme", "http"), (":path", "/up"), (":authority", "h"),
              ("content-length", "12"), ("expect", "100-continue"), ("content-type", "text/plain")], false),
            ([(":method", "PUT"), (":scheme", "http"), (":path", "/up"), ("host", "only-host"), ("x-t", "v\tw  \tx")], false),
            ([(":method", "OPTIONS"), (":scheme", "http"), (":path", "*"), (":authority", "h"), ("x-u", "\u{FC}")], true),
            ([(":method", "GET"), (":scheme", "http"), (":path", "http://abs.example/x"), (":authority", "h"),
              ("host", "ignored"), ("x-forwarded-for", "10.0.0.1"), ("via", "1.1 a")], true),
        ]
        for (fields, endStream) in lists {
            let built = try make(fields, endStream: endStream)
            var bytes = built.bytes
            var parser = HTTP1RequestParser()
            let parsed = try XCTUnwrap(try parser.parse(&bytes), "\(fields)")
            XCTAssertEqual(bytes.readableBytes, 0, "the whole head: \(fields)")
            XCTAssertEqual(built.fields.entries.count, parsed.fields.entries.count, "\(fields)")
            for (a, b) in zip(built.fields.entries, parsed.fields.entries) {
                XCTAssertEqual([a.nameStart, a.nameLength, a.valueStart, a.valueLength, a.lineEnd],
                               [b.nameStart, b.nameLength, b.valueStart, b.valueLength, b.lineEnd], "\(fields)")
                XCTAssertEqual(a.known, b.known, "\(fields)")
            }
            XCTAssertEqual(built.method, parsed.method)
            XCTAssertEqual(built.methodString, parsed.methodString)
            XCTAssertEqual(built.target, parsed.target)
            XCTAssertEqual(built.targetRange, parsed.targetRange)
            XCTAssertEqual(built.version, parsed.version)
            XCTAssertEqual(built.framing, parsed.framing, "\(fields)")
            XCTAssertEqual(built.keepAlive, parsed.keepAlive)
            XCTAssertEqual(built.expectsContinue, parsed.expectsContinue)
            XCTAssertEqual(built.wantsUpgrade, parsed.wantsUpgrade)
            XCTAssertEqual(built.hostIndex, parsed.hostIndex)
            XCTAssertEqual(built.facts.teTrailersOnly, parsed.facts.teTrailersOnly)
            XCTAssertEqual(built.facts.teTrailers, parsed.facts.teTrailers)
            XCTAssertEqual(built.fields.connectionNamesOtherFields, parsed.fields.connectionNamesOtherFields)
        }
    }

    func testWhatHTTP2ChangesInTheHead() throws {
        let head = try make(get + [("cookie", "a=1"), ("host", "other"), ("cookie", "b=2")], endStream: false)
        XCTAssertEqual(head.host, "api.example:8443", ":authority is the Host")
        XCTAssertEqual(head.fields.values(named: "host"), ["api.example:8443"], "a host field with :authority is dropped")
        XCTAssertEqual(head.fields.values(named: "cookie"), ["a=1; b=2"], "split cookies joined")
        XCTAssertEqual(head.framing, .chunked, "a body without a length goes upstream chunked")
        XCTAssertEqual(head.target, "/a/b?c=d")
        let options = try make([(":method", "OPTIONS"), (":scheme", "http"), (":path", "*"), (":authority", "h")])
        XCTAssertEqual(options.target, "*")
        XCTAssertEqual(try make(get + [("content-length", "0")]).framing, .contentLength(0))
    }

    /// RFC 9113 §8.2.1: a value that starts or ends with SP or HTAB makes
    /// the request malformed (a stream error), in the head and in trailers;
    /// whitespace inside a value, and an empty value, are fine.
    func testValuesWithWhitespaceAroundThemAreMalformed() throws {
        for value in [" 1", "1 ", "\t1", "1\t", " ", "\t \t"] {
            XCTAssertThrowsError(try HTTP2RequestFields(list(get + [("x-a", value)])), "\(Array(value.utf8))") { error in
                XCTAssertEqual(error as? HTTP2RequestFields.Malformed, .whitespaceAroundValue(name: "x-a"))
            }
            XCTAssertThrowsError(try HTTP2RequestFields.checkTrailers(list([("x-t", value)]))) { error in
                XCTAssertEqual(error as? HTTP2RequestFields.Malformed, .whitespaceAroundValue(name: "x-t"))
            }
        }
        XCTAssertNoThrow(try HTTP2RequestFields(list(get + [("x-a", "1 \t 2"), ("x-b", "")])))
        XCTAssertNoThrow(try HTTP2RequestFields.checkTrailers(list([("x-t", "a b")])))
    }

    func testRefusedForTheParsersReasons() {
        func refusal(_ fields: [(String, String)], limits: HTTP1Limits = HTTP1Limits()) -> HTTP1ParseError? {
            do {
                _ = try make(fields, limits: limits)
                return nil
            } catch {
                return error as? HTTP1ParseError
            }
        }
        let base = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "h")]
        XCTAssertEqual(refusal(base + [("content-length", "x")]), .invalidContentLength)
        XCTAssertEqual(refusal(base + [("content-length", "1"), ("content-length", "2")]), .conflictingContentLength)
        XCTAssertEqual(refusal(base + [("content-length", "1"), ("content-length", "1")]), .duplicateContentLength)
        XCTAssertEqual(refusal(base + [("x-a", "a\u{1}b")]), .invalidFieldValue)
        XCTAssertEqual(refusal(base + [("x-a", "\u{7F}")]), .invalidFieldValue)
        XCTAssertEqual(refusal([(":method", "G@T"), (":scheme", "http"), (":path", "/"), (":authority", "h")]), .invalidMethod)
        XCTAssertEqual(refusal([(":method", ""), (":scheme", "http"), (":path", "/"), (":authority", "h")]), .invalidRequestLine)
        XCTAssertEqual(refusal([(":method", "GET"), (":scheme", "http"), (":path", "/\u{E9}"), (":authority", "h")]), .invalidTarget)
        XCTAssertEqual(refusal([(":method", "GET"), (":scheme", "http"), (":path", "*"), (":authority", "h")]), .invalidTarget)
        XCTAssertEqual(refusal([(":method", "GET"), (":scheme", "http"), (":path", "/")]), .missingHost)
        XCTAssertEqual(refusal([(":method", "GET"), (":scheme", "http"), (":path", "/"), ("host", "a"), ("host", "b")]), .duplicateHost)
        let limits = HTTP1Limits(maxStartLineBytes: 30, maxFieldBytes: 64, maxFieldCount: 3)
        // "GET /" + 16 × "p" + " HTTP/1.1" is 30 bytes: the limit; one more is over it.
        XCTAssertNil(refusal([(":method", "GET"), (":scheme", "http"), (":path", "/" + String(repeating: "p", count: 16)),
                              (":authority", "h")], limits: limits))
        XCTAssertEqual(refusal([(":method", "GET"), (":scheme", "http"), (":path", "/" + String(repeating: "p", count: 17)),
                                (":authority", "h")], limits: limits), .startLineTooLong)
        XCTAssertNil(refusal(base + [("a", "1"), ("b", "2")], limits: limits), "host + 2 fields: 3")
        XCTAssertEqual(refusal(base + [("a", "1"), ("b", "2"), ("c", "3")], limits: limits), .tooManyFields)
        XCTAssertEqual(refusal(base + [("a", String(repeating: "v", count: 60))], limits: limits), .headerSectionTooLarge)
    }
}
