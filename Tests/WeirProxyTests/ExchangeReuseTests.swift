import NIOCore
@testable import WeirProxy
import XCTest

/// An HTTP/1.1 connection reuses its finished exchange for its next request
/// (`DownstreamHandler.keepForReuse`, `Exchange.clearForReuse`): nothing of
/// one request may carry over into the next.
final class ExchangeReuseTests: UpstreamTestCase {
    private func freshExchange() -> Exchange {
        Exchange(requestID: RequestIDGenerator().nextID(), head: nil, started: .uptimeNanoseconds(0))
    }

    /// Every stored property as `label=value` text, but the three `begin` sets.
    private func state(_ exchange: Exchange) -> [String] {
        Mirror(reflecting: exchange).children.compactMap { child in
            guard let label = child.label, !["requestID", "head", "started"].contains(label) else { return nil }
            return "\(label)=\(String(describing: child.value))"
        }
    }

    /// A stored property added to `Exchange` must be reset by `clearForReuse`
    /// (and set in `testClearForReuseLeavesWhatInitLeaves`): this count says so.
    func testEveryStoredPropertyIsAccountedFor() {
        XCTAssertEqual(Mirror(reflecting: freshExchange()).children.count, 41,
                       "Exchange gained or lost a stored property: reset it in clearForReuse, set it in the test below, then update this count")
    }

    func testClearForReuseLeavesWhatInitLeaves() {
        let used = freshExchange()
        _ = used.id
        _ = used.grpc
        used.wallStart = 12.5
        used.hostHeader = "a.example"
        used.framing.chunked = true
        used.maxBody = 10
        used.isUpgrade = true
        used.upgraded = true
        used.bodyless = true
        used.keepAlive = false
        used.upstreamKeepAlive = true
        used.upstreamEdits = HTTP1HeadEdits(added: [HTTP1AddedField(name: "x-a", value: "1")])
        used.responseChunked = true
        used.target = 1
        used.attempts = 2
        used.balancerActive = true
        used.connectionReused = true
        used.staleRetried = true
        used.pendingUpstream = [.end(nil)]
        used.upstreamNeedsFlush = true
        used.replacementBody = ByteBuffer(string: "x")
        used.requestEnded = true
        used.bodyForwarded = true
        used.discardingBody = true
        used.responseStarted = true
        used.localResponseDone = true
        used.upstreamResponseEnded = true
        used.finished = true
        used.status = 502
        used.bytesIn = 3
        used.bytesOut = 4
        used.upstreamStart = .uptimeNanoseconds(5)
        used.requestSentAt = .uptimeNanoseconds(6)
        used.lastUpstreamRead = .uptimeNanoseconds(7)
        used.writeBlockedSince = .uptimeNanoseconds(8)
        let initial = state(freshExchange())
        // Every property but the references a unit test cannot make
        // (route, plugin scope, upstream connection) now differs.
        let differing = zip(state(used), initial).filter { $0 != $1 }.count
        XCTAssertEqual(differing, initial.count - 3)

        used.clearForReuse()
        XCTAssertEqual(state(used), initial)
        XCTAssertNil(used.head)
        let next = RequestIDGenerator().nextID()
        used.begin(requestID: next, head: nil, started: .uptimeNanoseconds(9))
        XCTAssertEqual(used.id, next.string, "the id String is made anew")
        XCTAssertEqual(used.started, .uptimeNanoseconds(9))
    }

    /// One kept-alive connection whose requests change framing both ways,
    /// status and body: each gets what it gets on a fresh connection, and
    /// each access record carries the id its upstream request carried.
    func testKeptAliveRequestsGetNothingOfTheRequestBefore() throws {
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()

        let rechunked = try client.request("GET", "/trailers")
        XCTAssertEqual(rechunked.header("transfer-encoding"), "chunked")
        XCTAssertEqual(rechunked.bodyText, "hello trailers")
        let sized = try client.request("GET", "/after-chunked")
        XCTAssertNil(sized.header("transfer-encoding"))
        XCTAssertEqual(sized.header("content-length"), String("ok from \(upstream.name)".utf8.count))
        XCTAssertEqual(sized.bodyText, "ok from \(upstream.name)")

        try client.send("POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        XCTAssertEqual(try client.readResponse().bodyText, "5")
        XCTAssertEqual(try client.request("GET", "/after-body").status, 200)
        XCTAssertEqual(try client.request("GET", "/status/404").status, 404)
        let last = try client.request("GET", "/last")
        XCTAssertEqual(last.status, 200)
        XCTAssertNil(last.header("transfer-encoding"))

        let paths = ["/trailers", "/after-chunked", "/sink", "/after-body", "/status/404", "/last"]
        let seen = upstream.requests
        XCTAssertEqual(seen.map(\.uri), paths)
        XCTAssertEqual(seen[2].header("transfer-encoding"), "chunked")
        for i in [1, 3, 4, 5] {
            XCTAssertNil(seen[i].header("transfer-encoding"), seen[i].uri)
            XCTAssertNil(seen[i].header("content-length"), seen[i].uri)
            XCTAssertEqual(seen[i].bodyBytes, 0, seen[i].uri)
        }
        XCTAssertTrue(waitUntil { proxy.observer.records.count == paths.count })
        let records = proxy.observer.records
        XCTAssertEqual(records.map(\.path), paths)
        XCTAssertEqual(records.map(\.status), [200, 200, 200, 200, 404, 200])
        XCTAssertEqual(records.map(\.attempts), Array(repeating: 1, count: paths.count))
        XCTAssertEqual(records.map { Optional($0.requestID) }, seen.map { $0.header("x-request-id") })
        XCTAssertEqual(Set(records.map(\.requestID)).count, paths.count)
        XCTAssertEqual(records[2].bytesIn, 5, "the chunked body's bytes")
        XCTAssertEqual(records[3].bytesIn, 0, "nothing of the body before")
    }
}
