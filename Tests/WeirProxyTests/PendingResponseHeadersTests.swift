// PendingResponseHeaders (the request phase's response header changes)
// finds the upstream response's lines to remove in one pass over its
// fields: it must remove exactly what looking each set or cleared name up
// (`HTTP1Fields.fieldSet(named:)`) removes.

import NIOCore
import NIOHTTP1
import WeirLua
@testable import WeirProxy
import XCTest

final class PendingResponseHeadersTests: XCTestCase {
    private func responseFields(_ lines: [String]) throws -> HTTP1Fields {
        var parser = HTTP1ResponseParser()
        var bytes = ByteBuffer(string: "HTTP/1.1 200 OK\r\n" + lines.map { $0 + "\r\n" }.joined() + "\r\n")
        return try XCTUnwrap(parser.parse(&bytes, requestMethod: .get)).fields
    }

    private enum Op { case set(String), add(String), clear(String) }

    func testOnePassRemovesWhatEachNameLooksUp() throws {
        // Tagged (Date, Via, Content-Length, Connection) and untagged
        // fields, names of equal length (ratelimit-limit / ratelimit-reset,
        // content-type / x-request-id), mixed case, repeats.
        let fields = try responseFields([
            "Server: origin", "Date: Mon, 30 Nov 2026 11:00:00 GMT", "Content-Type: text/plain",
            "Content-Length: 5", "RateLimit-Limit: 9", "ratelimit-reset: 3", "Via: 1.1 up", "X-Request-Id: r1",
            "X-Tag: a", "x-tag: b", "Connection: keep-alive", "RATELIMIT-REMAINING: 1",
        ])
        let cases: [[Op]] = [
            [],
            [.set("ratelimit-limit"), .set("ratelimit-remaining"), .set("x-ratelimit-limit-minute")],
            [.add("x-tag"), .add("ratelimit-reset")],
            [.set("date"), .clear("via"), .set("content-type")],
            [.clear("x-tag"), .set("x-request-id"), .add("server")],
            [.set("x-tag"), .clear("x-tag"), .set("ratelimit-reset"), .set("ratelimit-reset")],
            [.clear("x-absent"), .set("content-length"), .add("connection")],
            [.set("x-tag"), .add("x-tag"), .clear("server")],
            [.add("content-length")],
            [.clear("content-length"), .set("x-tag")],
        ]
        for (k, ops) in cases.enumerated() {
            var pending = PendingResponseHeaders()
            var expected = HTTP1FieldSet()
            for op in ops {
                switch op {
                case .set(let name): pending.set(name, "v"); expected.formUnion(fields.fieldSet(named: name))
                case .add(let name): pending.add(name, "v")
                case .clear(let name): pending.clear(name); expected.formUnion(fields.fieldSet(named: name))
                }
            }
            let edits = pending.edits(on: fields)
            XCTAssertEqual(edits.removed, expected, "case \(k)")
            XCTAssertEqual(edits.added.map(\.name), pending.added.map(\.name), "case \(k)")
            // Taken over by the response's changes: the same edits, moved
            // (pending is left empty), and Content-Length marked only when
            // some change names it.
            let namesLength = ops.contains { op in
                switch op { case .set(let n), .add(let n), .clear(let n): return n == "content-length" }
            }
            XCTAssertEqual(pending.touchesContentLength, namesLength, "case \(k)")
            let added = pending.added
            let changes = ResponseHeadChanges(taking: &pending, on: fields)
            XCTAssertEqual(changes.edits.removed, expected, "case \(k)")
            XCTAssertEqual(changes.edits.added, added, "case \(k)")
            XCTAssertEqual(changes.touchesContentLength, namesLength, "case \(k)")
            XCTAssertTrue(pending.isEmpty && pending.added.isEmpty && !pending.touchesContentLength, "case \(k)")
        }
    }

    /// A prepared set (weir.response.prepare_headers) makes the same edits
    /// as a `set` of each of its lines, into empty changes (at once) and
    /// after other changes (line by line).
    func testPreparedLinesEqualOneSetEach() throws {
        let fields = try responseFields([
            "Content-Length: 5", "RateLimit-Limit: 9", "ratelimit-reset: 3", "Date: now", "X-Tag: a",
        ])
        let prepared = try PreparedHeaderLines.make([
            ("X-RateLimit-Limit-Minute", "10"), ("x-ratelimit-remaining-minute", nil), ("ratelimit-limit", "10"),
            ("ratelimit-remaining", nil), ("ratelimit-reset", nil), ("date", nil),
        ]).get()
        let values = ["7", "7", "42", "later"]
        for before in [[], ["x-tag"], ["ratelimit-reset"]] {
            var pending = PendingResponseHeaders(), oneByOne = PendingResponseHeaders()
            for name in before { pending.set(name, "b"); oneByOne.set(name, "b") }
            let wire = prepared.wire(values)
            wire.withUnsafeBytes { pending.set(prepared, wire: $0) }
            wire.withUnsafeBytes { PreparedHeaderLines.forEachLine(inWire: $0) { oneByOne.set($0, $1) } }
            XCTAssertEqual(pending.added, oneByOne.added, "after \(before)")
            XCTAssertEqual(pending.addedNeedReview, true, "date is reviewed by the relay")
            XCTAssertEqual(pending.edits(on: fields).removed, oneByOne.edits(on: fields).removed, "after \(before)")
            XCTAssertFalse(pending.touchesContentLength)
        }
        XCTAssertEqual(prepared.names.first, "x-ratelimit-limit-minute")
    }

    /// A prepared set of untagged names into empty changes stays as its
    /// wire bytes: the same lines, the same removed fields, and taken line
    /// by line when another change follows (or a reader needs `added`).
    func testPreparedLinesAsWireBytes() throws {
        let fields = try responseFields([
            "Content-Length: 5", "RateLimit-Limit: 9", "ratelimit-reset: 3", "X-Tag: a", "X-RATELIMIT-REMAINING-MINUTE: 1",
        ])
        let prepared = try PreparedHeaderLines.make([
            ("X-RateLimit-Limit-Minute", "10"), ("x-ratelimit-remaining-minute", nil), ("ratelimit-limit", "10"),
            ("ratelimit-remaining", nil), ("ratelimit-reset", nil),
        ]).get()
        let wire = prepared.wire(["7", "-7", "42"])
        XCTAssertEqual(String(decoding: wire, as: UTF8.self),
                       "x-ratelimit-limit-minute: 10\r\nx-ratelimit-remaining-minute: 7\r\nratelimit-limit: 10\r\n"
                       + "ratelimit-remaining: -7\r\nratelimit-reset: 42\r\n")
        for after in [nil, "x-tag", "ratelimit-reset"] as [String?] {
            var pending = PendingResponseHeaders(), oneByOne = PendingResponseHeaders()
            wire.withUnsafeBytes { pending.set(prepared, wire: $0) }
            wire.withUnsafeBytes { PreparedHeaderLines.forEachLine(inWire: $0) { oneByOne.set($0, $1) } }
            XCTAssertEqual(pending.wireLines, wire)
            XCTAssertTrue(pending.added.isEmpty && !pending.isEmpty && !pending.addedNeedReview)
            if let after { pending.set(after, "b"); oneByOne.set(after, "b") }
            XCTAssertEqual(pending.wireLines.isEmpty, after != nil, "after \(after ?? "-")")
            XCTAssertEqual(pending.edits(on: fields).added, oneByOne.edits(on: fields).added, "after \(after ?? "-")")
            XCTAssertEqual(pending.edits(on: fields).removed, oneByOne.edits(on: fields).removed, "after \(after ?? "-")")
            var headers = HTTPHeaders([("ratelimit-limit", "0"), ("x-tag", "z")]), expected = headers
            pending.apply(to: &headers)
            oneByOne.apply(to: &expected)
            XCTAssertEqual(headers.map { "\($0.name)=\($0.value)" }, expected.map { "\($0.name)=\($0.value)" })
            // The relay's changes keep the bytes; the response phase's take lines.
            var copy = pending
            let relayed = ResponseHeadChanges(taking: &pending, on: fields, keepingWire: true)
            let phase = ResponseHeadChanges(taking: &copy, on: fields)
            XCTAssertEqual(relayed.wireLines, after == nil ? wire : [])
            XCTAssertEqual(relayed.edits.removed, oneByOne.edits(on: fields).removed)
            XCTAssertEqual(phase.wireLines, [])
            XCTAssertEqual(phase.edits.added, oneByOne.edits(on: fields).added)
            XCTAssertTrue(pending.isEmpty && copy.isEmpty)
        }
        XCTAssertFalse(fields.fieldSet(named: "x-ratelimit-remaining-minute").isEmpty)
    }

    /// A relayed response's wire storage, recycled for the next request
    /// (`reuseStorage`), keeps its old bytes until a prepared set comes:
    /// the pending changes stay empty meanwhile, and each set's lines are
    /// its own, whether their length is the old one (copied over) or not.
    func testRecycledWireStorageHoldsOnlyTheNewLines() throws {
        let fields = try responseFields(["Content-Length: 5", "RateLimit-Remaining: 9"])
        let prepared = try PreparedHeaderLines.make([
            ("ratelimit-limit", "10"), ("ratelimit-remaining", nil), ("ratelimit-reset", nil),
        ]).get()
        var pending = PendingResponseHeaders()
        var spareAdded: [HTTP1AddedField] = [], spareWire: [UInt8] = []
        // Same length, shorter, longer, same again, then a line-by-line set.
        for (k, values) in [["9", "60"], ["8", "59"], ["7", "5"], ["100", "12345"], ["99", "12344"]].enumerated() {
            pending.reuseStorage(&spareAdded, wire: &spareWire)
            XCTAssertTrue(pending.isEmpty && pending.wireLines.isEmpty, "request \(k)")
            let wire = prepared.wire(values)
            wire.withUnsafeBytes { pending.set(prepared, wire: $0) }
            XCTAssertEqual(pending.wireLines, wire, "request \(k)")
            var changes = ResponseHeadChanges(taking: &pending, on: fields, keepingWire: true)
            XCTAssertEqual(changes.wireLines, wire, "request \(k)")
            XCTAssertEqual(changes.edits.removed, fields.fieldSet(named: "ratelimit-remaining"), "request \(k)")
            changes.withAddedStorage { added, wire in swap(&spareAdded, &added); swap(&spareWire, &wire) }
        }
        // Recycled storage and then a change other than a prepared set.
        pending.reuseStorage(&spareAdded, wire: &spareWire)
        pending.set("x-tag", "a")
        XCTAssertTrue(pending.wireLines.isEmpty)
        XCTAssertEqual(pending.added.map(\.name), ["x-tag"])
    }

    /// More than 64 fields: indices past the first word are removed too.
    func testFieldsPastTheFirstWord() throws {
        let fields = try responseFields((0..<70).map { "x-filler-\($0 % 10): \($0)" } + ["RateLimit-Limit: 1", "Date: now"])
        var pending = PendingResponseHeaders()
        pending.set("ratelimit-limit", "2")
        pending.clear("x-filler-3")
        pending.set("date", "later")
        var expected = fields.fieldSet(named: "ratelimit-limit")
        expected.formUnion(fields.fieldSet(named: "x-filler-3"))
        expected.formUnion(fields.fieldSet(named: "date"))
        XCTAssertEqual(pending.edits(on: fields).removed, expected)
        XCTAssertTrue(expected.contains(70) && expected.contains(71) && expected.contains(63))
    }
}
