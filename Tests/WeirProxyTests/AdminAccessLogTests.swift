import Foundation
import NIOCore
import NIOPosix
import WeirCore
@testable import WeirProxy
import XCTest

/// The access log: JSON line content, batching from several event loops to a
/// real file, and dropping (not blocking) when the output stalls.
final class AdminAccessLogTests: XCTestCase {
    private var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("weir-accesslog-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    func testJSONLineHasEveryFieldWithTheRightValues() throws {
        var record = AdminMetricsTests.record(route: "api", upstream: "orders", status: 201, total: 0.0123456,
                                              upstreamDuration: 0.010, bytesIn: 42, bytesOut: 1024,
                                              path: "/orders?id=\"7\"\n")
        record.requestID = "abc-123"
        record.attempts = 2
        let line = AccessLogFormatter.jsonLine(record)
        XCTAssertTrue(line.hasSuffix("}\n"))
        XCTAssertEqual(line.filter { $0 == "\n" }.count, 1, "one record, one line")
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        XCTAssertEqual(object["time"] as? String, "2026-11-18T11:06:40.250Z")
        XCTAssertEqual(object["request_id"] as? String, "abc-123")
        XCTAssertEqual(object["listener"] as? String, "web")
        XCTAssertEqual(object["client"] as? String, "127.0.0.1:5555")
        XCTAssertEqual(object["method"] as? String, "GET")
        XCTAssertEqual(object["path"] as? String, "/orders?id=\"7\"\n")
        XCTAssertEqual(object["route"] as? String, "api")
        XCTAssertEqual(object["upstream"] as? String, "orders")
        XCTAssertEqual(object["upstream_target"] as? String, "127.0.0.1:9001")
        XCTAssertEqual(object["status"] as? Int, 201)
        XCTAssertEqual(object["bytes_in"] as? Int, 42)
        XCTAssertEqual(object["bytes_out"] as? Int, 1024)
        XCTAssertEqual(object["duration_ms"] as? Double, 12.346)
        XCTAssertEqual(object["upstream_duration_ms"] as? Double, 10.0)
        XCTAssertEqual(object["attempts"] as? Int, 2)
    }

    func testNonASCIIAndControlCharactersSurviveTheRoundTrip() throws {
        let path = "/caf\u{e9}/\u{1F600}?q=a\tb\u{01}\\"
        let line = AccessLogFormatter.jsonLine(AdminMetricsTests.record(route: "r", upstream: "u", status: 200, path: path))
        XCTAssertTrue(line.contains(#"\u0001"#), line)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        XCTAssertEqual(object["path"] as? String, path)
    }

    func testWorstCaseEscapingFitsItsReservation() throws {
        // Every byte a control character: each becomes \u00XX, six times its size.
        let path = String(repeating: "\u{01}", count: 20_000)
        let line = AccessLogFormatter.jsonLine(AdminMetricsTests.record(route: path, upstream: "u", status: 200, path: path))
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        XCTAssertEqual(object["path"] as? String, path)
        XCTAssertEqual(object["route"] as? String, path)
    }

    func testMillisecondsAndTimeFormatting() {
        XCTAssertEqual(AccessLogFormatter.jsonLine(AdminMetricsTests.record(route: "r", upstream: "u", status: 200,
                                                                            total: 0, upstreamDuration: 12.5))
                        .contains(#""duration_ms":0.000,"upstream_duration_ms":12500.000,"#), true)
        var record = AdminMetricsTests.record(route: "r", upstream: "u", status: 200)
        record.startTime = 0.007
        XCTAssertTrue(AccessLogFormatter.jsonLine(record).hasPrefix(#"{"time":"1970-01-01T00:00:00.007Z","#))
    }

    func testNoRouteRecordHasNullsNotEmptyStrings() throws {
        let line = AccessLogFormatter.jsonLine(AdminMetricsTests.record(route: nil, upstream: nil, status: 404,
                                                                        upstreamDuration: nil))
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        XCTAssertTrue(object["route"] is NSNull)
        XCTAssertTrue(object["upstream"] is NSNull)
        XCTAssertTrue(object["upstream_target"] is NSNull)
        XCTAssertTrue(object["upstream_duration_ms"] is NSNull)
        XCTAssertEqual(object["status"] as? Int, 404)
    }

    func testLinesFromSeveralEventLoopsAllReachTheFile() throws {
        let path = tempDir.appendingPathComponent("access.log").path
        var limits = AccessLogWriter.Limits()
        limits.batchBytes = 4096 // force several batch hand-offs as well as timer flushes
        let writer = try XCTUnwrap(AccessLogWriter.make(target: .file(path), limits: limits))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { try? group.syncShutdownGracefully() }

        let perLoop = 500
        let futures = group.makeIterator().enumerated().map { (loopIndex, loop) in
            loop.submit {
                for n in 0..<perLoop {
                    var record = AdminMetricsTests.record(route: "r", upstream: "u", status: 200)
                    record.requestID = "loop\(loopIndex)-\(n)"
                    writer.append(record)
                }
            }
        }
        try EventLoopFuture.andAllSucceed(Array(futures), on: group.next()).wait()
        writer.shutdown()

        let text = try String(contentsOfFile: path, encoding: .utf8)
        let lines = text.split(separator: "\n")
        XCTAssertEqual(lines.count, 2 * perLoop)
        var ids = Set<String>()
        for line in lines {
            let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            ids.insert(try XCTUnwrap(object["request_id"] as? String))
        }
        XCTAssertEqual(ids.count, 2 * perLoop, "every line exactly once")
        XCTAssertEqual(writer.writtenLines, 2 * perLoop)
        XCTAssertEqual(writer.droppedLines, 0)
    }

    func testReopenAfterRotationContinuesInANewFile() throws {
        let path = tempDir.appendingPathComponent("access.log").path
        let rotated = tempDir.appendingPathComponent("access.log.1").path
        let writer = try XCTUnwrap(AccessLogWriter.make(target: .file(path)))
        var record = AdminMetricsTests.record(route: "r", upstream: "u", status: 200)
        record.requestID = "before"
        writer.append(record)
        try FileManager.default.moveItem(atPath: path, toPath: rotated) // what logrotate does
        try writer.reopen()
        record.requestID = "after"
        writer.append(record)
        writer.shutdown()

        let old = try String(contentsOfFile: rotated, encoding: .utf8)
        let new = try String(contentsOfFile: path, encoding: .utf8)
        XCTAssertEqual(old.split(separator: "\n").count, 1)
        XCTAssertTrue(old.contains(#""request_id":"before""#), old)
        XCTAssertEqual(new.split(separator: "\n").count, 1)
        XCTAssertTrue(new.contains(#""request_id":"after""#), new)
    }

    func testUnwritableFileIsAClearError() {
        XCTAssertThrowsError(try AccessLogWriter.make(target: .file("/nonexistent-dir/access.log"))) { error in
            XCTAssertTrue("\(error)".contains("cannot open /nonexistent-dir/access.log"), "\(error)")
        }
    }

    func testStalledOutputDropsAndCountsInsteadOfBlocking() throws {
        // A pipe nobody reads: once its kernel buffer is full the writer's
        // queue is stuck in write(2), and the event loop must not be.
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        defer { close(fds[0]) }
        var limits = AccessLogWriter.Limits()
        limits.batchBytes = 1024
        limits.maxPendingBytes = 16 * 1024
        let writer = AccessLogWriter(fileDescriptor: fds[1], limits: limits)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }

        let total = 5000 // ~1.5 MB of lines, far beyond the pipe buffer plus the pending bound
        try group.next().submit {
            for n in 0..<total {
                var record = AdminMetricsTests.record(route: "r", upstream: "u", status: 200)
                record.requestID = "stall-\(n)"
                writer.append(record)
            }
        }.wait()
        XCTAssertGreaterThan(writer.droppedLines, 0, "a stalled output must drop lines, not queue without bound")

        // Unstick the writer: drain the pipe until the writer is done.
        let readerDone = DispatchSemaphore(value: 0)
        let readFD = fds[0]
        Thread.detachNewThread {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while read(readFD, &buffer, buffer.count) > 0 {}
            readerDone.signal()
        }
        writer.shutdown()
        close(fds[1])
        readerDone.wait()
        XCTAssertEqual(writer.writtenLines + writer.droppedLines, total, "every line is either written or counted as dropped")
    }
}
