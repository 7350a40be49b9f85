import NIOCore
@testable import WeirProxy
import XCTest

/// `LoopClock`: one clock read per I/O event. The cached time must never
/// make a recorded duration negative or shorter than what really happened,
/// whether requests come one by one on a kept-alive connection or pipelined
/// (a pipelined request starts inside the upstream read that ended the
/// previous one).
final class LoopClockTests: UpstreamTestCase {
    func testInsideAnEventTimeStandsStillOutsideItMoves() {
        let clock = LoopClock()
        let before = clock.now
        clock.enterEvent()
        let eventTime = clock.now
        XCTAssertGreaterThanOrEqual(eventTime, before)
        usleep(2_000)
        XCTAssertEqual(clock.now, eventTime, "one read per event")
        clock.enterEvent()   // nested: keeps the outer event's time
        XCTAssertEqual(clock.now, eventTime)
        clock.leaveEvent()
        XCTAssertEqual(clock.now, eventTime)
        clock.leaveEvent()
        XCTAssertGreaterThanOrEqual(clock.now.uptimeNanoseconds - eventTime.uptimeNanoseconds, 2_000_000,
                                    "outside an event the clock is read afresh")
        clock.enterEvent()
        XCTAssertGreaterThan(clock.now, eventTime, "the next event reads the clock again")
        clock.leaveEvent()
    }

    /// Start times in the access log come from the monotonic time plus an
    /// offset read once a second: they must still be the time of day.
    func testWallSecondsTrackTheTimeOfDay() {
        let clock = LoopClock()
        for _ in 0..<3 {
            XCTAssertEqual(clock.wallSeconds, Date().timeIntervalSince1970, accuracy: 0.5)
            clock.enterEvent()
            let inside = clock.wallSeconds
            XCTAssertEqual(clock.wallSeconds, inside, "the event's time, not a fresh read")
            clock.leaveEvent()
            usleep(1_000)
        }
    }

    func testRecordedDurationsStaySaneAcrossKeepAliveAndPipelinedRequests() throws {
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        // Kept alive, one at a time.
        XCTAssertEqual(try client.request("GET", "/slow/40").status, 200)
        XCTAssertEqual(try client.request("GET", "/fast-1").status, 200)
        // Pipelined: each waits for the one before it.
        let burst = ["/slow/30", "/fast-2", "/slow/20", "/fast-3"]
        try client.send(burst.map { "GET \($0) HTTP/1.1\r\nHost: a\r\n\r\n" }.joined())
        for _ in burst { XCTAssertEqual(try client.readResponse().status, 200) }

        let paths = ["/slow/40", "/fast-1"] + burst
        var records: [AccessRecord] = []
        let deadline = Date().addingTimeInterval(5)
        while records.count < paths.count && Date() < deadline {
            usleep(5_000)
            records = proxy.observer.records
        }
        XCTAssertEqual(records.map(\.path), paths, "one record per request, in order (one loop, one connection)")
        for record in records {
            let upstream = try XCTUnwrap(record.upstreamDuration, record.path)
            XCTAssertGreaterThanOrEqual(upstream, 0, record.path)
            XCTAssertGreaterThanOrEqual(record.totalDuration, upstream, "the upstream part lies within the exchange: \(record.path)")
            if record.path.hasPrefix("/slow/"), let ms = Double(record.path.dropFirst("/slow/".count)) {
                // The origin waited this long: a cached start or end time must not hide it.
                XCTAssertGreaterThanOrEqual(upstream, ms / 1000, record.path)
            }
        }
    }
}
