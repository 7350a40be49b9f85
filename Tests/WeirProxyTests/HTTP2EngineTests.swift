// The downstream HTTP/2 engine (libnghttp2 driven sans-IO by
// HTTP2DownstreamConnection): many streams per connection, flow control
// both ways (request bodies larger than the windows Weir reopens, responses
// larger than a small client window), bodyless and interim responses, and
// graceful drain; real clients (h2load, nghttp, curl, python3-h2) on
// loopback through a running proxy and a real HTTP/1.1 upstream.

import Foundation
import WeirCore
@testable import WeirProxy
import XCTest

final class HTTP2EngineTests: UpstreamTestCase {
    private func temporaryFile(bytes: Int) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("weir-h2-\(UUID().uuidString)")
        // Printable ASCII, so the programs' output compares as text.
        try Data((0..<bytes).map { UInt8(33 + $0 % 90) }).write(to: url)
        addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url
    }

    /// 100 concurrent streams on each of 4 connections (the benchmark's
    /// shape): every request is answered and recorded.
    func testH2loadHundredStreamsPerConnection() throws {
        let proxy = try self.http2Proxy()
        defer { proxy.stop() }
        let r = try runProgram("/usr/bin/h2load", ["-n", "800", "-c", "4", "-m", "100", "http://127.0.0.1:\(proxy.port)/load"],
                               timeoutSeconds: 60)
        XCTAssertEqual(r.status, 0, r.err + r.out)
        XCTAssertTrue(r.out.contains("800 succeeded, 0 failed, 0 errored"), r.out)
        XCTAssertTrue(r.out.contains("status codes: 800 2xx"), r.out)
        XCTAssertTrue(waitUntil { proxy.observer.records.count == 800 })
        XCTAssertEqual(upstream.requests.filter { $0.uri == "/load" }.count, 800)
    }

    /// A request body 48 times the stream window (and 3 times the
    /// connection window): it only gets through if Weir gives the bytes
    /// back to the windows as the upstream takes them.
    func testUploadLargerThanTheWindowsReachesTheUpstreamWhole() throws {
        let proxy = try self.http2Proxy()
        defer { proxy.stop() }
        let file = try temporaryFile(bytes: 3_000_000)
        let r = try runProgram("/usr/bin/nghttp", ["-d", file.path, "http://127.0.0.1:\(proxy.port)/sink"], timeoutSeconds: 30)
        XCTAssertEqual(r.status, 0, r.err)
        XCTAssertEqual(r.out, "3000000", "the upstream counted every byte")
        XCTAssertEqual(upstream.requests.first { $0.uri == "/sink" }?.bodyBytes, 3_000_000)
    }

    /// Both directions at once: the upstream echoes a 2 MB body while the
    /// client's own windows are small (16 KB per stream, 64 KB for the
    /// connection): the response waits on the client's WINDOW_UPDATEs
    /// (the data provider defers and resumes) and arrives whole.
    func testEchoThroughSmallClientWindows() throws {
        let proxy = try self.http2Proxy()
        defer { proxy.stop() }
        let file = try temporaryFile(bytes: 2_000_000)
        let r = try runProgram("/usr/bin/nghttp", ["-w", "14", "-W", "16", "-d", file.path, "http://127.0.0.1:\(proxy.port)/echo"],
                               timeoutSeconds: 30)
        XCTAssertEqual(r.status, 0, r.err)
        XCTAssertEqual(r.out.utf8.count, try Data(contentsOf: file).count, "the echo came back whole")
        XCTAssertEqual(Array(r.out.utf8.prefix(300)), Array(try Data(contentsOf: file).prefix(300)))
    }

    func testLargeResponseThroughASmallClientWindow() throws {
        let proxy = try self.http2Proxy()
        defer { proxy.stop() }
        let r = try runProgram("/usr/bin/nghttp", ["-w", "14", "-W", "16", "http://127.0.0.1:\(proxy.port)/big/1000000"],
                               timeoutSeconds: 30)
        XCTAssertEqual(r.status, 0, r.err)
        XCTAssertEqual(r.out.utf8.count, 1_000_000)
        XCTAssertTrue(waitUntil { proxy.observer.records.first?.status == 200 })
    }

    /// HEAD, 204 and 304 end with their HEADERS frame; a 103 goes ahead of
    /// the final response on the same stream.
    func testBodylessAndInterimResponses() throws {
        let proxy = try self.http2Proxy()
        defer { proxy.stop() }
        func curl(_ path: String, _ extra: [String] = []) throws -> String {
            let r = try runProgram("/usr/bin/curl", ["-sS", "--http2-prior-knowledge", "--max-time", "10", "-D", "-"]
                                   + extra + ["http://127.0.0.1:\(proxy.port)\(path)"])
            XCTAssertEqual(r.status, 0, r.err)
            return r.out
        }
        let head = try curl("/big/5000", ["-I"])
        XCTAssertTrue(head.hasPrefix("HTTP/2 200"), head)
        XCTAssertTrue(head.contains("content-length: 5000"), head)
        let noContent = try curl("/status/204")
        XCTAssertTrue(noContent.hasPrefix("HTTP/2 204"), noContent)
        let notModified = try curl("/status/304")
        XCTAssertTrue(notModified.hasPrefix("HTTP/2 304"), notModified)
        XCTAssertTrue(notModified.contains("etag: \"v1\""), notModified)
        let hints = try curl("/hints")
        XCTAssertTrue(hints.hasPrefix("HTTP/2 103"), hints)
        XCTAssertTrue(hints.contains("link: </style.css>; rel=preload"), hints)
        XCTAssertTrue(hints.contains("HTTP/2 200"), hints)
        XCTAssertTrue(hints.hasSuffix("after hints"), hints)
        XCTAssertTrue(waitUntil { proxy.observer.records.count == 4 })
        XCTAssertEqual(proxy.observer.records.map(\.status).sorted(), [200, 200, 204, 304])
    }

    /// Drain with a stream in flight: GOAWAY NO_ERROR at once, the stream's
    /// response still arrives whole, then the connection closes. (nghttp:
    /// python3-h2 treats any GOAWAY as the end of the connection.)
    func testDrainLetsTheStreamInFlightFinish() throws {
        let proxy = try self.http2Proxy()
        defer { proxy.stop() }
        final class Box: @unchecked Sendable { var result: (status: Int32, out: String, err: String)?; var error: Error? }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        let url = "http://127.0.0.1:\(proxy.port)/slow/1500"
        DispatchQueue.global().async {
            do { box.result = try runProgram("/usr/bin/nghttp", ["-v", url]) } catch { box.error = error }
            done.signal()
        }
        // The upstream has the request (it answers 1.5 s later): drain now.
        XCTAssertTrue(waitUntil { self.upstream.requests.contains { $0.uri == "/slow/1500" } })
        proxy.server.beginDrain()
        XCTAssertEqual(done.wait(timeout: .now() + 20), .success)
        XCTAssertNil(box.error)
        let r = try XCTUnwrap(box.result)
        XCTAssertEqual(r.status, 0, r.err + r.out)
        let goAway = try XCTUnwrap(r.out.range(of: "recv GOAWAY frame"), r.out)
        let status = try XCTUnwrap(r.out.range(of: ":status: 200"), r.out)
        XCTAssertTrue(goAway.lowerBound < status.lowerBound, "GOAWAY came first: \(r.out)")
        XCTAssertTrue(r.out.contains("error_code=NO_ERROR(0x00)"), r.out)
        XCTAssertTrue(r.out.contains("slow from \(upstream.name)"), "the stream in flight is answered whole: \(r.out)")
        XCTAssertTrue(waitUntil { proxy.observer.closed == proxy.observer.opened }, "then the connection closes")
        XCTAssertEqual(proxy.observer.records.map(\.status), [200])
    }
}
