// PluginUpstreamLines: plugins' upstream header changes kept as bytes while
// there is no edit list. A reused request side resets them for its next
// request (ExchangePlugins.resetRequestState): after `reset` they must be
// what a new value is, and serve the next request's changes the same way.

@testable import WeirProxy
import XCTest

final class PluginUpstreamLinesTests: XCTestCase {
    private func text(_ lines: PluginUpstreamLines) -> String { String(decoding: lines.bytes, as: UTF8.self) }

    func testResetLeavesWhatANewValueHasAndServesTheNextRequest() {
        var client = HTTP1FieldSet()
        client.insert(2)
        client.insert(70)   // past the first word: the set's array is used
        var lines = PluginUpstreamLines()
        lines.add("x-one", "1")
        lines.set("x-two", "2", clientLines: client)
        lines.add("x-three", "3")
        lines.clear("x-one", clientLines: HTTP1FieldSet())
        XCTAssertEqual(text(lines), "x-two: 2\r\nx-three: 3\r\n")
        XCTAssertEqual(lines.removed, client)

        lines.reset()
        XCTAssertEqual(lines.bytes, [])
        XCTAssertTrue(lines.removed.isEmpty)
        XCTAssertEqual(lines.removed, HTTP1FieldSet())

        // The next request: only its own changes, a clear finds no old line.
        lines.clear("x-two", clientLines: HTTP1FieldSet())
        lines.set("x-four", "4", clientLines: HTTP1FieldSet())
        var fresh = PluginUpstreamLines()
        fresh.set("x-four", "4", clientLines: HTTP1FieldSet())
        XCTAssertEqual(text(lines), "x-four: 4\r\n")
        XCTAssertEqual(lines.bytes, fresh.bytes)
        XCTAssertTrue(lines.removed.isEmpty)

        // Reset twice, and with nothing set: still empty.
        lines.reset()
        lines.reset()
        XCTAssertEqual(lines.bytes, [])
        lines.add("x-five", "5")
        XCTAssertEqual(text(lines), "x-five: 5\r\n")
    }

    /// The lines are written in place into storage that keeps its size
    /// (grown as needed): long lines past the first 128 bytes, a clear in
    /// the middle and later adds read back exactly, in place as in the copy.
    func testLinesGrowPastTheFirstStorageAndClearKeepsTheOthersInOrder() {
        var lines = PluginUpstreamLines()
        let long = String(repeating: "v", count: 150)
        lines.add("x-a", long)
        lines.add("x-b", "2")
        lines.add("x-a", "again")
        lines.add("x-c", String(repeating: "w", count: 300))
        lines.clear("x-a", clientLines: HTTP1FieldSet())
        lines.add("x-d", "4")
        let expected = "x-b: 2\r\nx-c: \(String(repeating: "w", count: 300))\r\nx-d: 4\r\n"
        XCTAssertEqual(text(lines), expected)
        XCTAssertEqual(lines.byteCount, expected.utf8.count)
        XCTAssertEqual(lines.withBytes { Array($0) }, Array(expected.utf8))
        lines.reset()
        lines.add("x-e", "5")
        XCTAssertEqual(text(lines), "x-e: 5\r\n", "nothing of the longer lines before is read back")
    }

    /// set_header's path (the SDK lends the name's and value's bytes) writes
    /// the same lines as the String one, and a set from bytes still drops an
    /// earlier added line of the name and the client's lines.
    func testLinesFromBytesAreTheLinesFromStrings() {
        func withBytes(_ a: String, _ b: String, _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) -> Void) {
            let x = Array(a.utf8), y = Array(b.utf8)
            x.withUnsafeBytes { xb in y.withUnsafeBytes { yb in body(xb, yb) } }
        }
        var client = HTTP1FieldSet()
        client.insert(1)
        var strings = PluginUpstreamLines(), bytes = PluginUpstreamLines()
        strings.add("x-consumer-name", "bench-consumer")
        withBytes("x-consumer-name", "bench-consumer") { bytes.add(nameBytes: $0, valueBytes: $1) }
        strings.set("x-consumer-name", "other", clientLines: client)
        withBytes("x-consumer-name", "other") { bytes.set("x-consumer-name", nameBytes: $0, valueBytes: $1, clientLines: client.low) }
        strings.add("x-empty", "")
        withBytes("x-empty", "") { bytes.add(nameBytes: $0, valueBytes: $1) }
        XCTAssertEqual(text(bytes), "x-consumer-name: other\r\nx-empty: \r\n")
        XCTAssertEqual(bytes.bytes, strings.bytes)
        XCTAssertEqual(bytes.removed, client)
    }

    /// The lines are read back from their bytes (a clear of an added name,
    /// the edit list taking them over): a value with ": " and ':' in it,
    /// an empty value and a name that is another's prefix stay whole.
    func testLinesReadBackFromTheirBytesKeepValuesWithColons() {
        var lines = PluginUpstreamLines()
        lines.add("x-a", "b: c:d")
        lines.add("x-ab", "")
        lines.add("x-a", "again")
        lines.add("x-c", "http://host:80/")
        lines.clear("x-a", clientLines: HTTP1FieldSet())
        XCTAssertEqual(text(lines), "x-ab: \r\nx-c: http://host:80/\r\n")
        var edits = HTTP1HeadEdits()
        lines.move(into: &edits)
        XCTAssertEqual(edits.added.map { "\($0.name)=\($0.value)" }, ["x-ab=", "x-c=http://host:80/"])
        XCTAssertEqual(lines.byteCount, 0)
    }
}
