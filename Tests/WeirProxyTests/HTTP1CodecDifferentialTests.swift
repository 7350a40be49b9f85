import NIOCore
import NIOEmbedded
import NIOHTTP1
@testable import WeirProxy
import XCTest

/// Our codec against NIOHTTP1's decoder (llhttp) on generated valid requests:
/// both must see the same method, target, version, fields, body and trailers.
final class HTTP1CodecDifferentialTests: XCTestCase {
    /// Deterministic generator so a failure reproduces (SplitMix64).
    struct SeededGenerator: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    struct Expected: Equatable {
        var method: String
        var target: String
        var version: String
        var fields: [String]
        var body: [UInt8]
        var trailers: [String]
    }

    static let nameAlphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~")
    static let valueAlphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,;:=/?\"()[]{}<>@\\ \t")
    static let pathAlphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:@/")

    func generateRequest(_ rng: inout SeededGenerator) -> String {
        func pick<T>(_ a: [T]) -> T { a[Int.random(in: 0..<a.count, using: &rng)] }
        func word(_ alphabet: [Character], _ range: ClosedRange<Int>) -> String {
            String((0..<Int.random(in: range, using: &rng)).map { _ in pick(alphabet) })
        }
        let method = pick(["GET", "GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PURGE"])
        let target = "/" + word(HTTP1CodecDifferentialTests.pathAlphabet, 0...30)
            + (Bool.random(using: &rng) ? "?" + word(Array("abc=&xyz0123"), 1...20) : "")
        var lines = ["\(method) \(target) HTTP/1.1", "Host: " + pick(["example.com", "a.b.c:8080", "localhost", "[::1]:80"])]
        for _ in 0..<Int.random(in: 0...14, using: &rng) {
            let name = "X-" + word(HTTP1CodecDifferentialTests.nameAlphabet, 1...20)
            // Values start and end with a visible char so trimming is unambiguous.
            var value = word(Array("abcXYZ019"), 1...1)
            if Bool.random(using: &rng) { value += word(HTTP1CodecDifferentialTests.valueAlphabet, 0...60) + "z" }
            let ows = pick(["", " ", "  ", "\t", " \t"])
            lines.append("\(name):\(ows)\(value)")
        }
        if Bool.random(using: &rng) { lines.append(pick(["Connection: keep-alive", "Connection: close", "Accept: */*"])) }
        let bodyKind = Int.random(in: 0..<3, using: &rng)
        var body = ""
        if bodyKind == 1 {
            let content = word(Array("abcdefgh0123456789\r\n "), 0...200)
            lines.append(pick(["Content-Length", "content-length", "CONTENT-LENGTH"]) + ": \(content.utf8.count)")
            body = content
        } else if bodyKind == 2 {
            lines.append(pick(["Transfer-Encoding: chunked", "transfer-encoding: Chunked"]))
            for _ in 0..<Int.random(in: 0...4, using: &rng) {
                let chunk = word(Array("ijklmn0123\r\n"), 1...100)
                let size = String(chunk.utf8.count, radix: 16, uppercase: Bool.random(using: &rng))
                body += size + (Bool.random(using: &rng) ? ";ext=1" : "") + "\r\n" + chunk + "\r\n"
            }
            body += "0\r\n"
            if Bool.random(using: &rng) { body += "X-Trailer-" + word(Array("abc"), 1...5) + ": t\r\n" }
            body += "\r\n"
        }
        return lines.joined(separator: "\r\n") + "\r\n\r\n" + body
    }

    func decodeWithNIO(_ bytes: String) throws -> Expected {
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(HTTPRequestDecoder()))
        try channel.writeInbound(ByteBuffer(string: bytes))
        var result = Expected(method: "", target: "", version: "", fields: [], body: [], trailers: [])
        while let part = try channel.readInbound(as: HTTPServerRequestPart.self) {
            switch part {
            case .head(let head):
                result.method = head.method.rawValue
                result.target = head.uri
                result.version = "\(head.version.major).\(head.version.minor)"
                result.fields = head.headers.map { "\($0.name)=\($0.value)" }
            case .body(var chunk):
                result.body += chunk.readBytes(length: chunk.readableBytes)!
            case .end(let trailers):
                result.trailers = trailers?.map { "\($0.name)=\($0.value)" } ?? []
            }
        }
        return result
    }

    func decodeWithCodec(_ bytes: String) throws -> Expected {
        var buffer = ByteBuffer(string: bytes)
        var parser = HTTP1RequestParser()
        let head = try XCTUnwrap(try parser.parse(&buffer))
        var result = Expected(method: head.methodString, target: head.target,
                              version: "\(head.version.major).\(head.version.minor)",
                              fields: head.fields.pairs().map { "\($0.name)=\($0.value)" }, body: [], trailers: [])
        switch head.framing {
        case .none:
            break
        case .contentLength(let n):
            result.body = try XCTUnwrap(buffer.readBytes(length: n))
        case .chunked:
            var decoder = HTTP1ChunkedDecoder()
            loop: while true {
                switch try decoder.next(&buffer) {
                case .data(var slice): result.body += slice.readBytes(length: slice.readableBytes)!
                case .end(let trailers):
                    result.trailers = trailers?.pairs().map { "\($0.name)=\($0.value)" } ?? []
                    break loop
                case .needMoreData: XCTFail("chunked body incomplete"); break loop
                }
            }
        case .untilClose:
            XCTFail("requests are never delimited by close")
        }
        XCTAssertEqual(buffer.readableBytes, 0, "whole request consumed")
        return result
    }

    /// The data path's loop: one cumulation buffer fed in reads of random
    /// size; head, then the body by its framing, both incremental.
    func decodeWithCodecInReads(_ bytes: String, _ rng: inout SeededGenerator) throws -> Expected {
        let all = Array(bytes.utf8)
        var offset = 0
        var buffer = ByteBuffer()
        func read() -> Bool {
            guard offset < all.count else { return false }
            let n = min(Int.random(in: 1...40, using: &rng), all.count - offset)
            buffer.writeBytes(all[offset..<offset + n])
            offset += n
            return true
        }
        var parser = HTTP1RequestParser()
        var head: HTTP1RequestHead? = nil
        while head == nil {
            head = try parser.parse(&buffer)
            if head == nil { XCTAssertTrue(read(), "input ended inside the head") }
        }
        let h = head!
        var result = Expected(method: h.methodString, target: h.target, version: "\(h.version.major).\(h.version.minor)",
                              fields: h.fields.pairs().map { "\($0.name)=\($0.value)" }, body: [], trailers: [])
        switch h.framing {
        case .none, .untilClose:
            break
        case .contentLength(var remaining):
            while remaining > 0 {
                if buffer.readableBytes == 0 { XCTAssertTrue(read()) }
                let n = min(remaining, buffer.readableBytes)
                result.body += buffer.readBytes(length: n)!
                remaining -= n
            }
        case .chunked:
            var decoder = HTTP1ChunkedDecoder()
            loop: while true {
                switch try decoder.next(&buffer) {
                case .data(var slice): result.body += slice.readBytes(length: slice.readableBytes)!
                case .end(let trailers):
                    result.trailers = trailers?.pairs().map { "\($0.name)=\($0.value)" } ?? []
                    break loop
                case .needMoreData:
                    guard read() else { XCTFail("input ended inside the body"); break loop }
                }
            }
        }
        return result
    }

    func testAgreesWithNIOHTTP1OnGeneratedRequests() throws {
        var rng = SeededGenerator(state: 0x5EED_0F_3E1F)
        var bodies = 0, chunked = 0
        for i in 0..<400 {
            let request = generateRequest(&rng)
            let nio = try decodeWithNIO(request)
            let ours = try decodeWithCodec(request)
            XCTAssertEqual(ours, nio, "request #\(i): \(request.debugDescription)")
            XCTAssertEqual(try decodeWithCodecInReads(request, &rng), nio, "request #\(i) in random reads")
            if !ours.body.isEmpty { bodies += 1 }
            if request.lowercased().contains("transfer-encoding") { chunked += 1 }
        }
        XCTAssertGreaterThan(bodies, 100, "the corpus exercises bodies")
        XCTAssertGreaterThan(chunked, 50, "the corpus exercises chunked bodies")
    }

    func generateResponse(_ rng: inout SeededGenerator) -> (text: String, method: HTTP1Method) {
        func pick<T>(_ a: [T]) -> T { a[Int.random(in: 0..<a.count, using: &rng)] }
        func word(_ alphabet: [Character], _ range: ClosedRange<Int>) -> String {
            String((0..<Int.random(in: range, using: &rng)).map { _ in pick(alphabet) })
        }
        let method: HTTP1Method = Int.random(in: 0..<8, using: &rng) == 0 ? .head : .get
        let status = pick([200, 200, 201, 204, 301, 304, 404, 500, 503])
        var lines = ["HTTP/1.1 \(status) " + word(Array("OK Fine Not Found abc"), 0...12)]
        for _ in 0..<Int.random(in: 0...10, using: &rng) {
            lines.append("X-" + word(HTTP1CodecDifferentialTests.nameAlphabet, 1...12) + ": "
                         + word(Array("abc123"), 1...1) + word(HTTP1CodecDifferentialTests.valueAlphabet, 0...30) + "z")
        }
        var body = ""
        let hasBody = method != .head && status != 204 && status != 304
        if Bool.random(using: &rng) {
            let content = word(Array("abcdef0123\r\n"), 0...150)
            lines.append("Content-Length: \(content.utf8.count)")
            if hasBody { body = content }
        } else {
            lines.append("Transfer-Encoding: chunked")
            if hasBody {
                for _ in 0..<Int.random(in: 0...3, using: &rng) {
                    let chunk = word(Array("uvwxyz"), 1...60)
                    body += String(chunk.utf8.count, radix: 16) + "\r\n" + chunk + "\r\n"
                }
                body += "0\r\n\r\n"
            }
        }
        return (lines.joined(separator: "\r\n") + "\r\n\r\n" + body, method)
    }

    func testResponsesAgreeWithNIOHTTP1() throws {
        var rng = SeededGenerator(state: 7)
        for i in 0..<300 {
            let (text, method) = generateResponse(&rng)
            // NIO's response decoder learns the request method from the request written before.
            let channel = EmbeddedChannel()
            try channel.pipeline.syncOperations.addHandler(HTTPRequestEncoder())
            try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(HTTPResponseDecoder()))
            try channel.writeOutbound(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: method == .head ? .HEAD : .GET, uri: "/")))
            try channel.writeOutbound(HTTPClientRequestPart.end(nil))
            while try channel.readOutbound(as: ByteBuffer.self) != nil {}
            try channel.writeInbound(ByteBuffer(string: text))
            var nio = Expected(method: "", target: "", version: "", fields: [], body: [], trailers: [])
            var nioEnded = false
            while let part = try channel.readInbound(as: HTTPClientResponsePart.self) {
                switch part {
                case .head(let head):
                    // NIO maps known codes to its own reason phrase, so only codes compare.
                    nio.target = "\(head.status.code)"
                    nio.fields = head.headers.map { "\($0.name)=\($0.value)" }
                case .body(var chunk): nio.body += chunk.readBytes(length: chunk.readableBytes)!
                case .end: nioEnded = true
                }
            }
            _ = try? channel.finish()

            var buffer = ByteBuffer(string: text)
            var parser = HTTP1ResponseParser()
            let head = try XCTUnwrap(try parser.parse(&buffer, requestMethod: method))
            var ours = Expected(method: "", target: "\(head.status)", version: "",
                                fields: head.fields.pairs().map { "\($0.name)=\($0.value)" }, body: [], trailers: [])
            switch head.framing {
            case .none: break
            case .contentLength(let n): ours.body = try XCTUnwrap(buffer.readBytes(length: n))
            case .chunked:
                var decoder = HTTP1ChunkedDecoder()
                loop: while true {
                    switch try decoder.next(&buffer) {
                    case .data(var slice): ours.body += slice.readBytes(length: slice.readableBytes)!
                    case .end: break loop
                    case .needMoreData: XCTFail("incomplete chunked body in #\(i)"); break loop
                    }
                }
            case .untilClose: XCTFail("every generated response is delimited")
            }
            XCTAssertEqual(buffer.readableBytes, 0, "#\(i)")
            XCTAssertTrue(nioEnded, "#\(i)")
            XCTAssertEqual(head.reason, String(decoding: text.utf8.prefix { $0 != 0x0D }.dropFirst(13), as: UTF8.self), "#\(i)")
            XCTAssertEqual(ours, nio, "response #\(i): \(text.debugDescription)")
        }
    }

    /// Forwarding by range copy must re-parse (by NIO) to the same request minus hop-by-hop fields.
    func testForwardedHeadsReparseIdentically() throws {
        var rng = SeededGenerator(state: 42)
        for i in 0..<200 {
            let request = generateRequest(&rng)
            var buffer = ByteBuffer(string: request)
            var parser = HTTP1RequestParser()
            let head = try XCTUnwrap(try parser.parse(&buffer))
            guard head.framing == .none else { continue }
            var out = ByteBuffer()
            HTTP1HeadWriter.writeRequest(head, edits: HTTP1HeadEdits(removed: head.fields.hopByHopFields(),
                                                                    added: [HTTP1AddedField(name: "Via", value: "1.1 weir")]), into: &out)
            let reparsed = try decodeWithNIO(String(buffer: out))
            var expected = try decodeWithNIO(request)
            expected.fields = expected.fields.filter { !$0.lowercased().hasPrefix("connection=") } + ["Via=1.1 weir"]
            XCTAssertEqual(reparsed, expected, "request #\(i)")
        }
    }
}
