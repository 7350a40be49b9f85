import NIOCore
import WeirCore
@testable import WeirProxy
import XCTest

/// The sans-IO HTTP/1.1 codec (Sources/WeirProxy/HTTP1): strictness, split
/// reads, chunked bodies and the forwarding writer.
final class HTTP1CodecTests: XCTestCase {
    // MARK: helpers

    private func buffer(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }
    private func buffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }

    private func parseRequest(_ s: String, limits: HTTP1Limits = HTTP1Limits()) throws -> HTTP1RequestHead {
        var parser = HTTP1RequestParser(limits: limits)
        var b = buffer(s)
        guard let head = try parser.parse(&b) else { throw XCTSkip("incomplete head: \(s.debugDescription)") }
        return head
    }

    private func assertRequestError(_ s: String, _ expected: HTTP1ParseError, limits: HTTP1Limits = HTTP1Limits(),
                                    file: StaticString = #filePath, line: UInt = #line) {
        assertRequestError(Array(s.utf8), expected, limits: limits, file: file, line: line)
    }

    private func assertRequestError(_ bytes: [UInt8], _ expected: HTTP1ParseError, limits: HTTP1Limits = HTTP1Limits(),
                                    file: StaticString = #filePath, line: UInt = #line) {
        var parser = HTTP1RequestParser(limits: limits)
        var b = buffer(bytes)
        do {
            let head = try parser.parse(&b)
            XCTFail("expected \(expected), got \(head == nil ? "incomplete" : "a head")", file: file, line: line)
        } catch let error as HTTP1ParseError {
            XCTAssertEqual(error, expected, "for \(String(decoding: bytes, as: UTF8.self).debugDescription)", file: file, line: line)
        } catch {
            XCTFail("unexpected \(error)", file: file, line: line)
        }
    }

    /// Everything about a head that must not depend on how it was split.
    private struct RequestSummary: Equatable {
        var method: String, target: String, version: HTTP1Version
        var fields: [String], framing: HTTP1BodyFraming, keepAlive: Bool
        init(_ h: HTTP1RequestHead) {
            method = h.methodString
            target = h.target
            version = h.version
            fields = h.fields.pairs().map { "\($0.name)=\($0.value)" }
            framing = h.framing
            keepAlive = h.keepAlive
        }
    }

    // MARK: request heads

    func testParsesIndexedRequestHead() throws {
        let head = try parseRequest("GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nAccept:  */* \r\nX-Empty:\r\nConnection: keep-alive\r\n\r\n")
        XCTAssertEqual(head.method, .get)
        XCTAssertEqual(head.methodString, "GET")
        XCTAssertEqual(head.target, "/a/b?c=d")
        XCTAssertEqual(head.version, .http1_1)
        XCTAssertEqual(head.fields.count, 4)
        XCTAssertEqual(head.fields.name(at: 1), "Accept")
        XCTAssertEqual(head.fields.value(at: 1), "*/*", "OWS around a value is not part of it")
        XCTAssertEqual(head.fields.value(at: 2), "")
        XCTAssertEqual(head.host, "example.com")
        XCTAssertEqual(head.fields.first(named: "ACCEPT"), "*/*")
        XCTAssertNil(head.fields.first(named: "accept-encoding"))
        XCTAssertEqual(head.fields.entries[0].known, .host)
        XCTAssertEqual(head.fields.entries[3].known, .connection)
        XCTAssertEqual(head.framing, .none)
        XCTAssertTrue(head.keepAlive)
        XCTAssertFalse(head.expectsContinue)
    }

    /// The parsers hand the previous head's field-entry storage to the next
    /// head: a head still held elsewhere (a plugin, a log) keeps its own
    /// entries, and a released one's storage is refilled correctly.
    func testEntryStorageCarriedAcrossHeadsLeavesAKeptHeadIntact() throws {
        var parser = HTTP1RequestParser()
        var buffer = ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: one\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
            + "GET /b HTTP/1.1\r\nHost: two\r\nX-C: 3\r\n\r\n"
            + "GET /c HTTP/1.1\r\nHost: three\r\nX-D: 4\r\nX-E: 5\r\nX-F: 6\r\n\r\n")
        let first = try XCTUnwrap(parser.parse(&buffer))
        do {
            let second = try XCTUnwrap(parser.parse(&buffer))   // `first` still alive: new storage
            XCTAssertEqual(second.fields.count, 2)
            XCTAssertEqual(second.fields.first(named: "x-c"), "3")
        }
        let third = try XCTUnwrap(parser.parse(&buffer))        // `second` gone: its storage refilled
        XCTAssertEqual(first.fields.count, 3)
        XCTAssertEqual(first.host, "one")
        XCTAssertEqual(first.fields.first(named: "x-b"), "2")
        XCTAssertEqual(third.fields.count, 4)
        XCTAssertEqual(third.host, "three")
        XCTAssertEqual((0..<third.fields.count).map { third.fields.name(at: $0) }, ["Host", "X-D", "X-E", "X-F"])

        var responses = HTTP1ResponseParser()
        var upstream = ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-R: 1\r\n\r\n"
            + "HTTP/1.1 204 No Content\r\nX-S: 2\r\n\r\n")
        let ok = try XCTUnwrap(responses.parse(&upstream, requestMethod: .get))
        let noContent = try XCTUnwrap(responses.parse(&upstream, requestMethod: .get))
        XCTAssertEqual(ok.fields.first(named: "x-r"), "1")
        XCTAssertEqual(ok.fields.count, 2)
        XCTAssertEqual(noContent.fields.first(named: "x-s"), "2")
        XCTAssertEqual(noContent.fields.count, 1)
    }

    func testMethodsAndOtherTokens() throws {
        for (text, method) in [("GET", HTTP1Method.get), ("HEAD", .head), ("POST", .post), ("PUT", .put),
                               ("DELETE", .delete), ("OPTIONS", .options), ("PATCH", .patch), ("TRACE", .trace),
                               ("PURGE", .other), ("get", .other)] {
            let head = try parseRequest("\(text) / HTTP/1.1\r\nHost: h\r\n\r\n")
            XCTAssertEqual(head.method, method, text)
            XCTAssertEqual(head.methodString, text)
        }
        XCTAssertEqual(try parseRequest("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").method, .connect)
        XCTAssertEqual(try parseRequest("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").target, "*")
        XCTAssertEqual(try parseRequest("GET http://h.example/x HTTP/1.1\r\nHost: h.example\r\n\r\n").target, "http://h.example/x")
    }

    func testBodyFramingAndConnectionSemantics() throws {
        XCTAssertEqual(try parseRequest("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\n").framing, .contentLength(12))
        XCTAssertEqual(try parseRequest("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").framing, .contentLength(0))
        XCTAssertEqual(try parseRequest("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n").framing, .chunked)
        XCTAssertFalse(try parseRequest("GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n").keepAlive)
        XCTAssertFalse(try parseRequest("GET / HTTP/1.0\r\n\r\n").keepAlive)
        XCTAssertTrue(try parseRequest("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keepAlive)
        XCTAssertEqual(try parseRequest("GET / HTTP/1.2\r\nHost: h\r\n\r\n").version, .http1_1)
        XCTAssertTrue(try parseRequest("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n").expectsContinue)
        let upgrade = try parseRequest("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        XCTAssertTrue(upgrade.wantsUpgrade)
        XCTAssertFalse(try parseRequest("GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n").wantsUpgrade)
    }

    /// `facts.teTrailers`: a TE field is present and all its elements are
    /// `trailers` (what the exchange needs to relay response trailers).
    func testTETrailersFact() throws {
        func teTrailers(_ lines: String) throws -> Bool {
            try parseRequest("GET / HTTP/1.1\r\nHost: h\r\n" + lines + "\r\n").facts.teTrailers
        }
        XCTAssertFalse(try teTrailers(""))
        XCTAssertTrue(try teTrailers("TE: trailers\r\n"))
        XCTAssertTrue(try teTrailers("te: Trailers\r\nAccept: */*\r\n"))
        XCTAssertTrue(try teTrailers("TE: trailers\r\nTE: trailers\r\n"))
        XCTAssertFalse(try teTrailers("TE: gzip\r\n"))
        XCTAssertFalse(try teTrailers("TE: trailers, gzip\r\n"))
        XCTAssertFalse(try teTrailers("TE: trailers\r\nTE: deflate\r\n"))
    }

    func testObsTextInValuesIsAccepted() throws {
        let bytes = Array("GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf".utf8) + [0xC3, 0xA9] + Array("\r\n\r\n".utf8)
        var parser = HTTP1RequestParser()
        var b = buffer(bytes)
        let head = try XCTUnwrap(try parser.parse(&b))
        XCTAssertEqual(head.fields.value(at: 1), "café")
    }

    /// Values are validated 8 bytes at a time; bytes that need the exact
    /// check at every offset of a word must still be found.
    func testValueBytesAtEveryWordOffset() throws {
        for offset in 0..<20 {
            let prefix = Array("GET / HTTP/1.1\r\nHost: h\r\nX-A: ".utf8) + [UInt8](repeating: 0x61, count: offset)
            let suffix = Array("bcdefghijklmnop\r\nX-B: 1\r\n\r\n".utf8)
            assertRequestError(prefix + [0x00] + suffix, .invalidFieldValue)
            assertRequestError(prefix + [0x7F] + suffix, .invalidFieldValue)
            assertRequestError(prefix + [0x0B] + suffix, .invalidFieldValue)
            assertRequestError(prefix + [0x0D] + suffix, .bareCR)
            for allowed: UInt8 in [0x09, 0x20, 0xFF, 0x80] {
                var parser = HTTP1RequestParser()
                var b = buffer(prefix + [allowed] + suffix)
                let head = try XCTUnwrap(try parser.parse(&b))
                XCTAssertEqual(head.fields.count, 3)
                // At offset 0 a SP/HTAB is leading whitespace, not part of the value.
                let leadingOWS = offset == 0 && (allowed == 0x09 || allowed == 0x20)
                XCTAssertEqual(head.fields.entries[1].valueLength, Int32(offset + (leadingOWS ? 0 : 1) + 15),
                               "offset \(offset) byte \(allowed)")
            }
        }
        let padded = try parseRequest("GET / HTTP/1.1\r\nHost: h\r\nX-A:   a b c d e f g h i j  \t \t       \r\n\r\n")
        XCTAssertEqual(padded.fields.value(at: 1), "a b c d e f g h i j")
        let blank = try parseRequest("GET / HTTP/1.1\r\nHost: h\r\nX-A:            \r\n\r\n")
        XCTAssertEqual(blank.fields.value(at: 1), "")
    }

    func testRejectsMalformedRequestLines() {
        assertRequestError("G@T / HTTP/1.1\r\nHost: h\r\n\r\n", .invalidMethod)
        assertRequestError(" GET / HTTP/1.1\r\nHost: h\r\n\r\n", .invalidRequestLine)
        assertRequestError("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", .invalidRequestLine)
        assertRequestError("GET / HTTP/1.1 \r\nHost: h\r\n\r\n", .invalidVersion)
        assertRequestError("GET /\r\nHost: h\r\n\r\n", .invalidRequestLine)
        assertRequestError("GET / HTTX/1.1\r\nHost: h\r\n\r\n", .invalidVersion)
        assertRequestError("GET / HTTP/1.x\r\nHost: h\r\n\r\n", .invalidVersion)
        assertRequestError("GET / HTTP/2.0\r\nHost: h\r\n\r\n", .unsupportedVersion)
        assertRequestError("GET / HTTP/0.9\r\nHost: h\r\n\r\n", .unsupportedVersion)
        assertRequestError(Array("GET /a".utf8) + [0x00] + Array("b HTTP/1.1\r\nHost: h\r\n\r\n".utf8), .invalidTarget)
        assertRequestError(Array("GET /a".utf8) + [0xC3, 0xA9] + Array(" HTTP/1.1\r\nHost: h\r\n\r\n".utf8), .invalidTarget)
        assertRequestError("GET /a\rb HTTP/1.1\r\nHost: h\r\n\r\n", .bareCR)
        assertRequestError("GET * HTTP/1.1\r\nHost: h\r\n\r\n", .invalidTarget)
        assertRequestError("GET a/b HTTP/1.1\r\nHost: h\r\n\r\n", .invalidTarget)
        assertRequestError("CONNECT /x HTTP/1.1\r\nHost: h\r\n\r\n", .invalidTarget)
        XCTAssertEqual(HTTP1ParseError.unsupportedVersion.requestStatus, 505)
        XCTAssertEqual(HTTP1ParseError.invalidMethod.requestStatus, 400)
    }

    func testRejectsMalformedFieldLines() {
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", .bareCR)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nX-A\r: a\r\n\r\n", .bareCR)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\nX-A: a\r\n\r\n", .bareLF)
        assertRequestError("GET / HTTP/1.1\nHost: h\r\n\r\n", .bareLF)
        assertRequestError(Array("GET / HTTP/1.1\r\nHost: h\r\nX-A: a".utf8) + [0x00] + Array("b\r\n\r\n".utf8), .invalidFieldValue)
        assertRequestError(Array("GET / HTTP/1.1\r\nHost: h\r\nX-A: a".utf8) + [0x7F] + Array("\r\n\r\n".utf8), .invalidFieldValue)
        assertRequestError(Array("GET / HTTP/1.1\r\nHost: h\r\nX-A: a".utf8) + [0x1B] + Array("\r\n\r\n".utf8), .invalidFieldValue)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", .obsoleteLineFolding)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n\tb\r\n\r\n", .obsoleteLineFolding)
        assertRequestError("GET / HTTP/1.1\r\nHost : h\r\n\r\n", .whitespaceBeforeColon)
        assertRequestError("GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", .whitespaceBeforeColon)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nX(A): a\r\n\r\n", .invalidFieldName)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\n: a\r\n\r\n", .invalidFieldName)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", .invalidFieldName)
    }

    func testRejectsAmbiguousFraming() {
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                           .contentLengthWithTransferEncoding)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                           .contentLengthWithTransferEncoding)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", .conflictingContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n", .conflictingContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\n", .duplicateContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n", .duplicateContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", .invalidContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n", .invalidContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n", .invalidContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n", .invalidContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 2\r\n\r\n", .invalidContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9999999999999999999\r\n\r\n", .invalidContentLength)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", .invalidTransferEncoding)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", .invalidTransferEncoding)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                           .invalidTransferEncoding)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunkedx\r\n\r\n", .invalidTransferEncoding)
        assertRequestError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", .unsupportedTransferCoding)
        assertRequestError("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", .transferEncodingInHTTP10)
        XCTAssertEqual(HTTP1ParseError.unsupportedTransferCoding.requestStatus, 501)
    }

    func testHostRules() throws {
        assertRequestError("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", .missingHost)
        assertRequestError("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", .duplicateHost)
        assertRequestError("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", .duplicateHost)
        XCTAssertNil(try parseRequest("GET / HTTP/1.0\r\n\r\n").host)
        XCTAssertEqual(try parseRequest("GET / HTTP/1.1\r\nHost:\r\n\r\n").host, "", "empty Host is valid with an empty authority")
    }

    func testLimits() throws {
        let limits = HTTP1Limits(maxStartLineBytes: 64, maxFieldBytes: 100, maxFieldCount: 4)
        let longTarget = "/" + String(repeating: "a", count: 64)
        assertRequestError("GET \(longTarget) HTTP/1.1\r\nHost: h\r\n\r\n", .startLineTooLong, limits: limits)
        XCTAssertEqual(HTTP1ParseError.startLineTooLong.requestStatus, 414)
        // Refused while the line is still arriving, before it is buffered whole.
        assertRequestError("GET \(longTarget)\(longTarget)", .startLineTooLong, limits: limits)
        // Exactly at the limit is fine.
        let atLimit = "GET /" + String(repeating: "a", count: 64 - 14) + " HTTP/1.1"
        XCTAssertEqual(atLimit.utf8.count, 64)
        XCTAssertNoThrow(try parseRequest(atLimit + "\r\nHost: h\r\n\r\n", limits: limits))

        let bigValue = String(repeating: "v", count: 100)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nX-Big: \(bigValue)\r\n\r\n", .headerSectionTooLarge, limits: limits)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nX-Big: \(bigValue)", .headerSectionTooLarge, limits: limits)
        XCTAssertEqual(HTTP1ParseError.headerSectionTooLarge.requestStatus, 431)
        assertRequestError("GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", .tooManyFields, limits: limits)
        XCTAssertEqual(HTTP1ParseError.tooManyFields.requestStatus, 431)
        XCTAssertEqual(try parseRequest("GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", limits: limits).fields.count, 4)

        var listenerLimits = RequestLimits()
        listenerLimits.maxRequestLineBytes = 100
        listenerLimits.maxHeaderBytes = 200
        listenerLimits.maxHeaderCount = 3
        let fromConfig = HTTP1Limits(listenerLimits)
        XCTAssertEqual([fromConfig.maxStartLineBytes, fromConfig.maxFieldBytes, fromConfig.maxFieldCount], [100, 200, 3])
    }

    func testLeadingEmptyLinesAndPipelinedRequests() throws {
        var parser = HTTP1RequestParser()
        var b = buffer("\r\n\r\nPOST /1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /2 HTTP/1.1\r\nHost: h\r\n\r\nGET /3")
        let first = try XCTUnwrap(try parser.parse(&b))
        XCTAssertEqual(first.target, "/1")
        XCTAssertEqual(b.readString(length: 3), "abc", "the parser leaves the body in the buffer")
        let second = try XCTUnwrap(try parser.parse(&b))
        XCTAssertEqual(second.target, "/2")
        XCTAssertNil(try parser.parse(&b))
        XCTAssertEqual(b.readableBytes, 6, "an incomplete head is not consumed")
        b.writeString(" HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(try XCTUnwrap(try parser.parse(&b)).target, "/3")
        XCTAssertEqual(b.readableBytes, 0)
    }

    static let splitCorpus: [String] = [
        "GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET /index.html?x=1&y=2 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n\r\n",
        "POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1024\r\nContent-Type: application/octet-stream\r\nExpect: 100-continue\r\n\r\n",
        "PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\nConnection: keep-alive\r\nX-Tab:\tvalue with\tinner  spaces\t\r\n\r\n",
        "\r\nOPTIONS * HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Many: a, b, c\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\r\n",
    ]

    func testSplitAtEveryByteGivesTheSameHead() throws {
        for text in HTTP1CodecTests.splitCorpus {
            let whole = RequestSummary(try parseRequest(text))
            let bytes = Array(text.utf8)
            for cut in 1..<bytes.count {
                var parser = HTTP1RequestParser()
                var b = buffer(Array(bytes[..<cut]))
                XCTAssertNil(try parser.parse(&b), "head complete after \(cut) of \(bytes.count) bytes")
                b.writeBytes(bytes[cut...])
                let split = try XCTUnwrap(try parser.parse(&b))
                XCTAssertEqual(RequestSummary(split), whole, "cut at \(cut)")
                XCTAssertEqual(b.readableBytes, 0)
            }
            // And one byte per read.
            var parser = HTTP1RequestParser()
            var b = ByteBuffer()
            var result: HTTP1RequestHead? = nil
            for (k, byte) in bytes.enumerated() {
                b.writeInteger(byte)
                result = try parser.parse(&b)
                if result != nil { XCTAssertEqual(k, bytes.count - 1) }
            }
            XCTAssertEqual(RequestSummary(try XCTUnwrap(result)), whole)
        }
    }

    func testSplitReadsStillFindErrors() {
        let bad = Array("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n".utf8)
        var parser = HTTP1RequestParser()
        var b = ByteBuffer()
        var caught: Error? = nil
        for byte in bad {
            b.writeInteger(byte)
            do { _ = try parser.parse(&b) } catch { caught = error; break }
        }
        XCTAssertEqual(caught as? HTTP1ParseError, .bareCR)
    }

    /// A head in one read is parsed in one pass (line ends found while
    /// validating); a head in pieces goes through the scanner first. Both
    /// refuse a malformed head with the same error, limits included.
    func testOnePassAndScannedPathsRefuseAlike() {
        let limits = HTTP1Limits(maxStartLineBytes: 64, maxFieldBytes: 100, maxFieldCount: 4)
        let requests: [(String, HTTP1ParseError)] = [
            ("GET / HTTP/1.1\nHost: h\r\n\r\n", .bareLF),
            ("GET / HTTP/1.1\r\nHost: h\nX: 1\r\n\r\n", .bareLF),
            ("GET / HTTP/1.1\r\nHost: h\r\n\n", .bareLF),
            ("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", .bareCR),
            ("GET /a\rb HTTP/1.1\r\nHost: h\r\n\r\n", .bareCR),
            ("GET / HTTP/1.1\r\nHost: h\r\nX-A: a\u{7F}\r\n\r\n", .invalidFieldValue),
            ("GET / HTTP/1.1\r\nHost: h\r\nX-A: 0123456789abcdef\u{1}\r\n\r\n", .invalidFieldValue),
            ("GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", .obsoleteLineFolding),
            ("GET / HTTP/1.1\r\nHost : h\r\n\r\n", .whitespaceBeforeColon),
            ("GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", .invalidFieldName),
            ("GET /\(String(repeating: "a", count: 64)) HTTP/1.1\r\nHost: h\r\n\r\n", .startLineTooLong),
            ("GET / HTTP/1.1\r\nHost: h\r\nX-Big: \(String(repeating: "v", count: 100))\r\n\r\n", .headerSectionTooLarge),
            ("GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", .tooManyFields),
            ("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", .duplicateContentLength),
            ("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", .conflictingContentLength),
            ("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5x\r\n\r\n", .invalidContentLength),
        ]
        for (text, expected) in requests {
            let bytes = Array(text.utf8)
            assertRequestError(bytes, expected, limits: limits)
            var parser = HTTP1RequestParser(limits: limits)
            var b = ByteBuffer()
            var caught: Error? = nil
            for byte in bytes {
                b.writeInteger(byte)
                do { _ = try parser.parse(&b) } catch { caught = error; break }
            }
            XCTAssertEqual(caught as? HTTP1ParseError, expected, "byte by byte: \(text.debugDescription)")
        }
        let responses: [(String, HTTP1ParseError)] = [
            ("HTTP/1.1 200 OK\nX: 1\r\n\r\n", .bareLF),
            ("HTTP/1.1 200 OK\r\nX: 1\n\r\n", .bareLF),
            ("HTTP/1.1 200 O\rK\r\n\r\n", .bareCR),
            ("HTTP/1.1 20\r\n\r\n", .invalidStatusLine),
            ("HTTP/1.1 200 OK\r\nX : 1\r\n\r\n", .whitespaceBeforeColon),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", .conflictingContentLength),
            ("HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n", .tooManyFields),
        ]
        for (text, expected) in responses {
            let bytes = Array(text.utf8)
            var whole = HTTP1ResponseParser(limits: limits)
            var all = buffer(bytes)
            XCTAssertThrowsError(try whole.parse(&all, requestMethod: .get), text.debugDescription) {
                XCTAssertEqual($0 as? HTTP1ParseError, expected, "whole: \(text.debugDescription)")
            }
            var parser = HTTP1ResponseParser(limits: limits)
            var b = ByteBuffer()
            var caught: Error? = nil
            for byte in bytes {
                b.writeInteger(byte)
                do { _ = try parser.parse(&b, requestMethod: .get) } catch { caught = error; break }
            }
            XCTAssertEqual(caught as? HTTP1ParseError, expected, "byte by byte: \(text.debugDescription)")
        }
    }

    /// The one-pass parse reads values 8 bytes at a time up to the end of
    /// the buffer, not of the line: a body right behind the head (same
    /// read) never leaks into a value, whatever it holds.
    func testHeadFollowedByBodyInTheSameRead() throws {
        for body in ["", "x", "ABCDEFGHIJKLMNOP", "\r\n\r\n", "\u{0}\u{1}\u{7F}binary"] {
            var parser = HTTP1ResponseParser()
            var b = buffer("HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\nX-V: abc\r\n\r\n" + body)
            let head = try XCTUnwrap(try parser.parse(&b, requestMethod: .get))
            XCTAssertEqual(head.fields.pairs().map { "\($0.name)=\($0.value)" }, ["Content-Length=\(body.utf8.count)", "X-V=abc"])
            XCTAssertEqual(b.readableBytes, body.utf8.count)
        }
    }

    // MARK: response heads

    private func parseResponse(_ s: String, method: HTTP1Method = .get) throws -> HTTP1ResponseHead {
        var parser = HTTP1ResponseParser()
        var b = buffer(s)
        return try XCTUnwrap(try parser.parse(&b, requestMethod: method))
    }

    func testResponseHeadsAndBodyRules() throws {
        let ok = try parseResponse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: s\r\n\r\nhello")
        XCTAssertEqual(ok.status, 200)
        XCTAssertEqual(ok.reason, "OK")
        XCTAssertEqual(ok.framing, .contentLength(5))
        XCTAssertTrue(ok.keepAlive)
        XCTAssertEqual(ok.fields.first(named: "server"), "s")
        XCTAssertEqual(try parseResponse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method: .head).framing, .none)
        XCTAssertEqual(try parseResponse("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").framing, .none)
        XCTAssertEqual(try parseResponse("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n").framing, .none)
        XCTAssertEqual(try parseResponse("HTTP/1.1 200 Connection established\r\n\r\n", method: .connect).framing, .none)
        let interim = try parseResponse("HTTP/1.1 100 Continue\r\n\r\n")
        XCTAssertTrue(interim.isInterim)
        XCTAssertEqual(interim.framing, .none)
        let switching = try parseResponse("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        XCTAssertFalse(switching.isInterim)
        XCTAssertEqual(try parseResponse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing, .chunked)
        let untilClose = try parseResponse("HTTP/1.1 200 OK\r\n\r\n")
        XCTAssertEqual(untilClose.framing, .untilClose)
        XCTAssertFalse(untilClose.keepAlive)
        XCTAssertEqual(try parseResponse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").framing, .untilClose)
        XCTAssertFalse(try parseResponse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keepAlive)
        XCTAssertTrue(try parseResponse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n").keepAlive)
        let noReason = try parseResponse("HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n")
        XCTAssertEqual(noReason.status, 404)
        XCTAssertEqual(noReason.reason, "")
    }

    func testResponseSplitAtEveryByte() throws {
        let text = "HTTP/1.1 200 OK\r\nServer: s\r\nTransfer-Encoding: chunked\r\nX-Tab:\ta b\t\r\n\r\n"
        let whole = try parseResponse(text)
        let bytes = Array(text.utf8)
        for cut in 1..<bytes.count {
            var parser = HTTP1ResponseParser()
            var b = buffer(Array(bytes[..<cut]))
            XCTAssertNil(try parser.parse(&b, requestMethod: .get), "cut at \(cut)")
            b.writeBytes(bytes[cut...])
            let split = try XCTUnwrap(try parser.parse(&b, requestMethod: .get))
            XCTAssertEqual(split.status, whole.status)
            XCTAssertEqual(split.reason, whole.reason)
            XCTAssertEqual(split.framing, .chunked)
            XCTAssertEqual(split.fields.pairs().map { "\($0.name)=\($0.value)" }, ["Server=s", "Transfer-Encoding=chunked", "X-Tab=a b"])
        }
    }

    func testRejectsMalformedResponses() {
        for (text, expected) in [
            ("HTTP/1.1 20 OK\r\n\r\n", HTTP1ParseError.invalidStatusLine),
            ("HTTP/1.1 099 Low\r\n\r\n", .invalidStatusLine),
            ("HTTP/1.1  200 OK\r\n\r\n", .invalidStatusLine),
            ("HTTP/1.1 200OK\r\n\r\n", .invalidStatusLine),
            ("HTTX/1.1 200 OK\r\n\r\n", .invalidStatusLine),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", .contentLengthWithTransferEncoding),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", .conflictingContentLength),
            ("HTTP/1.1 200 OK\r\nX : 1\r\n\r\n", .whitespaceBeforeColon),
            ("HTTP/1.1 200 OK\nX: 1\r\n\r\n", .bareLF),
        ] {
            var parser = HTTP1ResponseParser()
            var b = buffer(text)
            XCTAssertThrowsError(try parser.parse(&b, requestMethod: .get), text.debugDescription) {
                XCTAssertEqual($0 as? HTTP1ParseError, expected, text.debugDescription)
            }
        }
    }

    // MARK: chunked bodies

    /// Runs the decoder over `bytes` fed in pieces of `step` bytes; returns
    /// the body, the trailers as "name=value" and the unconsumed bytes.
    private func decodeChunked(_ bytes: [UInt8], step: Int? = nil,
                               limits: HTTP1Limits = HTTP1Limits()) throws -> (body: [UInt8], trailers: [String]?, rest: Int) {
        var decoder = HTTP1ChunkedDecoder(limits: limits)
        var b = ByteBuffer()
        var body: [UInt8] = []
        var offset = 0
        let step = step ?? bytes.count
        while true {
            let event = try decoder.next(&b)
            switch event {
            case .data(var slice):
                body += slice.readBytes(length: slice.readableBytes)!
            case .end(let trailers):
                return (body, trailers.map { $0.pairs().map { "\($0.name)=\($0.value)" } } ?? nil, b.readableBytes)
            case .needMoreData:
                guard offset < bytes.count else { throw XCTSkip("ran out of input") }
                let n = min(step, bytes.count - offset)
                b.writeBytes(bytes[offset..<offset + n])
                offset += n
            }
        }
    }

    private func assertChunkedError(_ s: String, _ expected: HTTP1ParseError, limits: HTTP1Limits = HTTP1Limits(),
                                    file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try decodeChunked(Array(s.utf8), limits: limits), file: file, line: line) {
            XCTAssertEqual($0 as? HTTP1ParseError, expected, s.debugDescription, file: file, line: line)
        }
    }

    func testChunkedDecoding() throws {
        let r = try decodeChunked(Array("5\r\nhello\r\nA\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\nNEXT".utf8))
        XCTAssertEqual(String(decoding: r.body, as: UTF8.self), "hello0123456789abcdefghij")
        XCTAssertNil(r.trailers)
        XCTAssertEqual(r.rest, 4, "bytes after the body stay in the buffer")
        let ext = try decodeChunked(Array("5;name=value;flag\r\nhello\r\n3 ; q=\"a b\"\r\nabc\r\n000\r\n\r\n".utf8))
        XCTAssertEqual(String(decoding: ext.body, as: UTF8.self), "helloabc")
        let trailers = try decodeChunked(Array("2\r\nhi\r\n0\r\nX-Checksum: abc\r\nX-Other:  1 \r\n\r\n".utf8))
        XCTAssertEqual(trailers.trailers, ["X-Checksum=abc", "X-Other=1"])
        XCTAssertEqual(try decodeChunked(Array("0\r\n\r\n".utf8)).body, [])
    }

    func testChunkedSplitAtEveryByte() throws {
        let text = Array("5;e=1\r\nhello\r\n1F\r\n0123456789012345678901234567890\r\n0\r\nX-T: v\r\n\r\n".utf8)
        let whole = try decodeChunked(text)
        for step in 1...8 {
            let split = try decodeChunked(text, step: step)
            XCTAssertEqual(split.body, whole.body, "step \(step)")
            XCTAssertEqual(split.trailers, whole.trailers, "step \(step)")
        }
    }

    func testChunkedStrictness() {
        assertChunkedError("x\r\n", .invalidChunkSize)
        assertChunkedError("\r\n", .invalidChunkSize)
        assertChunkedError("-5\r\n", .invalidChunkSize)
        assertChunkedError("5x\r\n", .invalidChunkSize)
        assertChunkedError("5\nhello\r\n", .bareLF)
        assertChunkedError("5\rhello\r\n", .bareCR)
        assertChunkedError("5\r\nhelloX\r\n", .missingChunkCRLF)
        assertChunkedError("5\r\nhello\rX", .missingChunkCRLF)
        assertChunkedError("1000000000000000\r\n", .chunkSizeTooLarge) // 16 hex digits
        assertChunkedError("5;a\u{01}b\r\nhello\r\n", .invalidChunkExtension)
        assertChunkedError("5;" + String(repeating: "e", count: 40) + "\r\n", .chunkExtensionTooLong,
                           limits: HTTP1Limits(maxChunkExtensionBytes: 32))
        assertChunkedError("0\r\nBad Name: v\r\n\r\n", .whitespaceBeforeColon)
        assertChunkedError("0\r\nX: a\r\n b\r\n\r\n", .obsoleteLineFolding)
        assertChunkedError("0\r\nX: " + String(repeating: "v", count: 80) + "\r\n\r\n", .headerSectionTooLarge,
                           limits: HTTP1Limits(maxFieldBytes: 64))
        // 15 hex digits is the largest accepted size.
        var decoder = HTTP1ChunkedDecoder()
        var b = ByteBuffer(string: "fffffffffffffff\r\nabc")
        XCTAssertNoThrow(try decoder.next(&b))
    }

    func testChunkedEncoderRoundTrips() throws {
        var out = ByteBuffer()
        HTTP1ChunkedEncoder.writeChunk(ByteBuffer(string: "hello"), into: &out)
        HTTP1ChunkedEncoder.writeChunk(ByteBuffer(), into: &out) // nothing: would end the body
        HTTP1ChunkedEncoder.writeChunk(ByteBuffer(bytes: [UInt8](repeating: 0x41, count: 255)), into: &out)
        HTTP1ChunkedEncoder.writeChunkHeader(length: 0x1000, into: &out)
        out.writeBytes([UInt8](repeating: 0x42, count: 0x1000))
        HTTP1ChunkedEncoder.writeChunkEnd(into: &out)
        let trailerSource = try decodeChunked(Array("0\r\nX-Sum: 7\r\n\r\n".utf8))
        XCTAssertEqual(trailerSource.trailers, ["X-Sum=7"])
        var decoder = HTTP1ChunkedDecoder()
        var tb = ByteBuffer(string: "0\r\nX-Sum: 7\r\n\r\n")
        guard case .end(let trailers) = try decoder.next(&tb) else { return XCTFail("expected end") }
        HTTP1ChunkedEncoder.writeLastChunk(trailers: trailers, into: &out)

        let text = String(buffer: out)
        XCTAssertTrue(text.hasPrefix("5\r\nhello\r\nff\r\nAAA"))
        XCTAssertTrue(text.contains("\r\n1000\r\nBBB"))
        XCTAssertTrue(text.hasSuffix("BBB\r\n0\r\nX-Sum: 7\r\n\r\n"))
        let round = try decodeChunked(Array(out.readableBytesView))
        XCTAssertEqual(round.body, Array("hello".utf8) + [UInt8](repeating: 0x41, count: 255) + [UInt8](repeating: 0x42, count: 0x1000))
        XCTAssertEqual(round.trailers, ["X-Sum=7"])

        var empty = ByteBuffer()
        HTTP1ChunkedEncoder.writeLastChunk(into: &empty)
        XCTAssertEqual(String(buffer: empty), "0\r\n\r\n")
    }

    // MARK: forwarding writer

    private func forward(_ text: String, keepUpgrade: Bool = false, added: [(String, String)] = [],
                         target: String? = nil) throws -> String {
        let head = try parseRequest(text)
        var edits = HTTP1HeadEdits(removed: head.fields.hopByHopFields(keepUpgrade: keepUpgrade),
                                   added: added.map { HTTP1AddedField(name: $0.0, value: $0.1) }, target: target)
        edits.removed.formUnion(head.fields.indices(of: .xForwardedFor))
        var out = ByteBuffer()
        HTTP1HeadWriter.writeRequest(head, edits: edits, into: &out)
        return String(buffer: out)
    }

    func testForwardedRequestCopiesKeptLinesAndDropsHopByHop() throws {
        let forwarded = try forward(
            "GET /a?b HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
            + "TE: trailers\r\nAccept:   */*  \r\nUpgrade: websocket\r\nProxy-Connection: x\r\nTrailer: X-Sum\r\n"
            + "X-Forwarded-For: 9.9.9.9\r\nx-secret: again\r\nUser-Agent: u\r\n\r\n",
            added: [("X-Forwarded-For", "1.2.3.4"), ("Via", "1.1 weir")])
        XCTAssertEqual(forwarded,
                       "GET /a?b HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nAccept:   */*  \r\nUser-Agent: u\r\n"
                       + "X-Forwarded-For: 1.2.3.4\r\nVia: 1.1 weir\r\n\r\n")
    }

    func testForwardedRequestEdgeCases() throws {
        XCTAssertEqual(try forward("GET /x HTTP/1.0\r\nConnection: keep-alive\r\nAccept: a\r\n\r\n", target: "/rewritten"),
                       "GET /rewritten HTTP/1.1\r\nAccept: a\r\n\r\n", "version forwarded as 1.1, target replaced")
        XCTAssertEqual(try forward("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                                   keepUpgrade: true, added: [("Connection", "upgrade")]),
                       "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
        XCTAssertEqual(try forward("GET / HTTP/1.1\r\nTE: gzip, trailers\r\nHost: h\r\n\r\n"), "GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(try forward("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", added: [("Transfer-Encoding", "chunked")]),
                       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        XCTAssertEqual(try forward("GET / HTTP/1.1\r\nHost: h\r\n\r\n"), "GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(try forward("GET / HTTP/1.1\r\nConnection: close\r\nHost: h\r\n\r\n"), "GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    }

    /// The piecewise writers (for callers that add fields one by one) give
    /// the same bytes as the one-region writer.
    func testPiecewiseWritersMatchWholeHeadWriter() throws {
        let head = try parseRequest("POST /p?q=1 HTTP/1.1\r\nHost: h\r\nConnection: x-a\r\nX-A: 1\r\nContent-Length: 2\r\nAccept: */*\r\n\r\n")
        let edits = HTTP1HeadEdits(removed: head.fields.hopByHopFields(), added: [HTTP1AddedField(name: "Via", value: "1.1 weir")], target: "/new")
        var whole = ByteBuffer()
        HTTP1HeadWriter.writeRequest(head, edits: edits, into: &whole)
        var pieces = ByteBuffer()
        HTTP1HeadWriter.writeRequestLine(head, target: "/new", into: &pieces)
        HTTP1HeadWriter.writeFields(head.fields, removing: edits.removed, into: &pieces)
        HTTP1HeadWriter.writeField(name: "Via", value: "1.1 weir", into: &pieces)
        pieces.writeStaticString("\r\n")
        XCTAssertEqual(String(buffer: whole), "POST /new HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nAccept: */*\r\nVia: 1.1 weir\r\n\r\n")
        XCTAssertEqual(String(buffer: pieces), String(buffer: whole))

        let response = try parseResponse("HTTP/1.1 200 OK\r\nKeep-Alive: 5\r\nContent-Length: 0\r\n\r\n")
        var line = ByteBuffer()
        HTTP1HeadWriter.writeStatusLine(response, into: &line)
        XCTAssertEqual(String(buffer: line), "HTTP/1.1 200 OK\r\n")
    }

    func testFieldSetBeyondSixtyFourFields() throws {
        var set = HTTP1FieldSet()
        for i in [0, 63, 64, 127, 128, 200] { set.insert(i) }
        for i in 0..<210 { XCTAssertEqual(set.contains(i), [0, 63, 64, 127, 128, 200].contains(i), "\(i)") }
        let fields = (0..<90).map { "X-F\($0): \($0)\r\n" }.joined()
        let head = try parseRequest("GET / HTTP/1.1\r\nHost: h\r\n" + fields + "Connection: X-F70\r\n\r\n")
        let hop = head.fields.hopByHopFields()
        XCTAssertTrue(hop.contains(71), "X-F70 (index 71) is named by Connection")
        XCTAssertTrue(hop.contains(91), "Connection itself")
        XCTAssertFalse(hop.contains(70))
    }

    /// The one-region writers count and copy kept lines from the removed
    /// indices alone (`HTTP1FieldSet.forEachIndex`): they must give the
    /// per-line writer's bytes (`writeFields`) for any removed set: none,
    /// all, first, last, adjacent runs, and indices past 64 fields.
    func testKeptLinesFromRemovedIndicesMatchPerLineWriter() throws {
        let fields = (0..<90).map { "X-F\($0): v\($0)\r\n" }.joined()
        let head = try parseRequest("GET /p HTTP/1.1\r\nHost: h\r\n" + fields + "\r\n")
        let count = head.fields.count
        var sets: [[Int]] = [[], Array(0..<count), [0], [count - 1], [0, 1, 2], [5, 6, 40], [63], [64], [63, 64, 65],
                             [10, 70, 89, 90], [0, count - 1], Array(stride(from: 0, to: count, by: 2))]
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15  // a fixed sequence: same sets every run
        for _ in 0..<50 {
            sets.append((0..<count).filter { _ in
                state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                return state >> 62 == 0
            })
        }
        for indices in sets {
            var removed = HTTP1FieldSet()
            for i in indices { removed.insert(i) }
            var visited: [Int] = []
            removed.forEachIndex(below: count) { visited.append($0) }
            XCTAssertEqual(visited, indices, "forEachIndex visits the members in order")
            var shorter: [Int] = []
            removed.forEachIndex(below: 65) { shorter.append($0) }
            XCTAssertEqual(shorter, indices.filter { $0 < 65 })

            var whole = ByteBuffer()
            HTTP1HeadWriter.writeRequest(head, edits: HTTP1HeadEdits(removed: removed), into: &whole)
            var reference = ByteBuffer()
            HTTP1HeadWriter.writeRequestLine(head, target: nil, into: &reference)
            HTTP1HeadWriter.writeFields(head.fields, removing: removed, into: &reference)
            reference.writeStaticString("\r\n")
            XCTAssertEqual(String(buffer: whole), String(buffer: reference), "removed \(indices)")
        }
        let response = try parseResponse("HTTP/1.1 200 OK\r\nA: 1\r\nConnection: close\r\nB: 2\r\nKeep-Alive: 5\r\n\r\n")
        var out = ByteBuffer()
        HTTP1HeadWriter.writeResponse(response, edits: HTTP1HeadEdits(removed: response.fields.hopByHopFields()), into: &out)
        XCTAssertEqual(String(buffer: out), "HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n")
    }

    func testForwardedResponse() throws {
        let head = try parseResponse("HTTP/1.0 200 Fine Thanks\r\nServer: s\r\nConnection: close\r\nContent-Length: 2\r\n\r\n")
        var out = ByteBuffer()
        HTTP1HeadWriter.writeResponse(head, edits: HTTP1HeadEdits(removed: head.fields.hopByHopFields()), into: &out)
        XCTAssertEqual(String(buffer: out), "HTTP/1.1 200 Fine Thanks\r\nServer: s\r\nContent-Length: 2\r\n\r\n")
        let bare = try parseResponse("HTTP/1.1 204\r\n\r\n")
        out.clear()
        HTTP1HeadWriter.writeResponse(bare, edits: HTTP1HeadEdits(added: [HTTP1AddedField(name: "Via", value: "weir")]), into: &out)
        XCTAssertEqual(String(buffer: out), "HTTP/1.1 204\r\nVia: weir\r\n\r\n")
    }
}
