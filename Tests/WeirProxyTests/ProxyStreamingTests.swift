import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

/// Large bodies stream through with bounded memory, both directions; and
/// `Connection: Upgrade` becomes a raw tunnel after a 101.
final class ProxyStreamingTests: XCTestCase {
    var upstreamGroup: MultiThreadedEventLoopGroup!
    var proxy: ProxyHarness?

    override func setUpWithError() throws {
        upstreamGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        proxy?.stop()
        try? upstreamGroup?.syncShutdownGracefully()
    }

    /// Bytes pushed through in each direction. The proxy, the upstream and
    /// the client all live in this process, so RSS covers all three; none of
    /// them may hold a body.
    static let largeBodyBytes = 384 * 1024 * 1024
    static let rssBudget = 64 * 1024 * 1024

    func testLargeUploadStreamsWithBoundedMemory() throws {
        let upstream = try TestUpstream(name: "sink", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) {
            $0.upstreams[0].timeouts.read = .seconds(60)
        })
        self.proxy = proxy
        // Warm up once so lazily allocated pools and caches are counted in the baseline.
        let client = try proxy.connect(timeoutSeconds: 60)
        XCTAssertEqual(try client.request("POST", "/sink", body: String(repeating: "w", count: 1 << 20)).bodyText, String(1 << 20))
        let before = currentRSS()

        let total = Self.largeBodyBytes
        try client.send("POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: \(total)\r\n\r\n")
        let chunk = [UInt8](repeating: UInt8(ascii: "u"), count: 256 * 1024)
        var sent = 0
        var peak = before
        while sent < total {
            let n = min(chunk.count, total - sent)
            try client.send(n == chunk.count ? chunk : Array(chunk[0..<n]))
            sent += n
            if sent % (32 * 1024 * 1024) == 0 { peak = max(peak, currentRSS()) }
        }
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, String(total))
        peak = max(peak, currentRSS())
        let growth = peak - before
        print("upload \(total >> 20) MiB: RSS before \(before >> 20) MiB, peak \(peak >> 20) MiB, growth \(growth >> 20) MiB")
        XCTAssertLessThan(growth, Self.rssBudget, "RSS grew by \(growth >> 20) MiB while streaming an upload")
    }

    func testLargeDownloadStreamsWithBoundedMemory() throws {
        let upstream = try TestUpstream(name: "big", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]) {
            $0.upstreams[0].timeouts.read = .seconds(60)
        })
        self.proxy = proxy
        let client = try proxy.connect(timeoutSeconds: 60)
        XCTAssertEqual(try client.request("GET", "/big/1048576").body.count, 1 << 20)
        let before = currentRSS()

        let total = Self.largeBodyBytes
        try client.send("GET /big/\(total) HTTP/1.1\r\nHost: a\r\n\r\n")
        // Read slowly at first so the proxy must apply backpressure to the upstream.
        Thread.sleep(forTimeInterval: 0.5)
        let midway = currentRSS()
        let response = try client.readResponse(discardBody: true)
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.header("content-length"), String(total))
        let after = currentRSS()
        let growth = max(midway, after) - before
        print("download \(total >> 20) MiB: RSS before \(before >> 20) MiB, while stalled \(midway >> 20) MiB, after \(after >> 20) MiB")
        XCTAssertLessThan(growth, Self.rssBudget, "RSS grew by \(growth >> 20) MiB while streaming a download")
        // The connection is still good afterwards.
        XCTAssertEqual(try client.request("GET", "/ok").status, 200)
    }

    func testWebSocketUpgradeIsTunnelledBothWays() throws {
        let upstream = try RawUpstream.upgradeEcho(group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]))
        self.proxy = proxy
        let client = try proxy.connect()
        try client.send("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 101)
        XCTAssertEqual(response.header("upgrade")?.lowercased(), "websocket")
        XCTAssertEqual(response.header("connection")?.lowercased(), "upgrade")
        // Bytes the upstream sent right after its 101 arrive.
        XCTAssertEqual(client.readLine(), "hello-from-upstream")
        // Then raw bytes go both ways, unparsed.
        for message in ["ping 1", "not http at all \u{1}\u{2}", String(repeating: "z", count: 100_000)] {
            try client.send(message + "\n")
            XCTAssertEqual(client.readLine(), message)
        }
        let seen = String(decoding: upstream.allReceived, as: UTF8.self)
        XCTAssertTrue(seen.lowercased().contains("upgrade: websocket"), "the Upgrade header is forwarded")
        XCTAssertTrue(seen.lowercased().contains("connection: upgrade"))
        // A tunnel counts as an open connection: drain waits for it and
        // force-closes it at the timeout.
        XCTAssertEqual(proxy.server.activeConnections, 1)
        try proxy.server.waitForDrain(timeout: .milliseconds(300)).wait()
        XCTAssertTrue(client.waitForClose())
        XCTAssertEqual(proxy.server.activeConnections, 0)
    }

    func testUpgradeRefusedByUpstreamEndsAsNormalResponse() throws {
        let upstream = try TestUpstream(name: "plain", group: upstreamGroup)
        defer { upstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]))
        self.proxy = proxy
        let client = try proxy.connect()
        let response = try client.request("GET", "/no-ws", headers: [("Connection", "Upgrade"), ("Upgrade", "websocket")])
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "ok from plain")
        XCTAssertTrue(client.waitForClose(), "after a refused upgrade the connection cannot carry more requests")
    }
}
