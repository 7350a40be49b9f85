import Foundation
import NIOConcurrencyHelpers
import NIOCore
import WeirCore
@testable import WeirProxy
import XCTest

/// A closed client connection's handler is freed, however it ended. Nothing
/// refers to it weakly any more (no side table, see
/// `UpstreamHandler.delegate`): the upstream connection's delegate, the
/// timers' closures and a pending connect hold it strongly, and let go when
/// the connection leaves its exchange, when NIO removes the handler, when
/// the connect completes. Its context (which holds it) is let go in
/// `handlerRemoved` when the channel closes, or on the next loop tick when
/// it leaves a live channel (a WebSocket tunnel after a 101, an HTTP/2
/// switch).
final class DownstreamLifetimeTests: UpstreamTestCase {
    private final class WeakHandler: @unchecked Sendable { weak var handler: DownstreamHandler? }

    /// The handler of the proxy's one open HTTP/1.1 connection, held weakly.
    private func openHandler(_ proxy: ProxyHarness) throws -> WeakHandler {
        let box = WeakHandler()
        let context = proxy.server.loopContexts[0]
        // Polled often: the many-connections test opens a thousand.
        let deadline = Date().addingTimeInterval(10)
        while (try? context.loop.submit { context.registeredHandlers.count }.wait()) != 1 && Date() < deadline {
            usleep(500)
        }
        try context.loop.submit { box.handler = context.registeredHandlers.first }.wait()
        XCTAssertNotNil(box.handler)
        return box
    }

    private func assertFreed(_ box: WeakHandler, _ proxy: ProxyHarness, _ what: String) throws {
        let context = proxy.server.loopContexts[0]
        // Checked on the loop: the handler's last references go there.
        XCTAssertTrue(waitUntil { (try? context.loop.submit { box.handler == nil }.wait()) == true },
                      "the handler of a connection that \(what) was not freed")
    }

    func testHandlerIsFreedAfterKeptAliveRequests() throws {
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        for path in ["/a", "/b", "/status/404", "/trailers"] {
            XCTAssertNotEqual(try client!.request("GET", path).status, 0)
        }
        let box = try openHandler(proxy)
        client = nil   // closes the socket
        try assertFreed(box, proxy, "closed between requests")
    }

    func testHandlerIsFreedWhenTheClientLeavesMidResponse() throws {
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        XCTAssertEqual(try client!.request("GET", "/first").status, 200)
        // The upstream answers after 300 ms: the client is gone by then, with
        // the exchange holding an attached upstream connection.
        try client!.send("GET /slow/300 HTTP/1.1\r\nHost: a\r\n\r\n")
        let box = try openHandler(proxy)
        XCTAssertTrue(waitUntil { self.upstream.requests.count == 2 })
        client = nil
        try assertFreed(box, proxy, "closed mid-response")
    }

    // MARK: - Removed from a live channel: tunnel and HTTP/2

    /// An upstream that answers an Upgrade request with 101, then echoes
    /// every byte and closes its side when a line is "bye".
    private func tunnelUpstream() throws -> RawUpstream {
        let upgraded = NIOLockedValueBox<Set<ObjectIdentifier>>([])
        return try RawUpstream(group: group) { channel, buffer in
            let id = ObjectIdentifier(channel)
            if upgraded.withLockedValue({ $0.contains(id) }) {
                let text = buffer.readString(length: buffer.readableBytes) ?? ""
                if text.contains("bye\n") { channel.close(promise: nil) } else {
                    channel.writeAndFlush(ByteBuffer(string: text), promise: nil)
                }
                return
            }
            let view = String(decoding: buffer.readableBytesView, as: UTF8.self)
            guard let end = view.range(of: "\r\n\r\n") else { return }
            buffer.moveReaderIndex(forwardBy: view.utf8.distance(from: view.startIndex, to: end.upperBound))
            upgraded.withLockedValue { _ = $0.insert(id) }
            // A later connection may reuse the identifier once this one is gone.
            channel.closeFuture.whenComplete { _ in upgraded.withLockedValue { _ = $0.remove(id) } }
            channel.writeAndFlush(ByteBuffer(string: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"), promise: nil)
        }
    }

    /// Upgrades a fresh connection to a tunnel and checks bytes pass both
    /// ways; returns the client and its (former) HTTP/1.1 handler.
    private func openTunnel(_ proxy: ProxyHarness) throws -> (BlockingSocket, WeakHandler) {
        let client = try proxy.connect()
        let box = try openHandler(proxy)
        try client.send("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        XCTAssertEqual(try client.readResponse().status, 101)
        try client.send("ping\n")
        XCTAssertEqual(client.readLine(), "ping", "the tunnel echoes")
        return (client, box)
    }

    /// Switches a fresh connection to HTTP/2 with prior knowledge (the
    /// preface and an empty SETTINGS frame) and waits for the proxy's
    /// SETTINGS frame; returns the client and its (former) HTTP/1.1 handler.
    private func openHTTP2(_ proxy: ProxyHarness) throws -> (BlockingSocket, WeakHandler) {
        let client = try proxy.connect()
        let box = try openHandler(proxy)
        try client.send(Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + [0, 0, 0, 4, 0, 0, 0, 0, 0])
        let frameHead = try XCTUnwrap(client.readExactly(9), "the proxy answers in HTTP/2")
        XCTAssertEqual(frameHead[3], 4, "the proxy's first frame is SETTINGS")
        return (client, box)
    }

    func testHandlerIsFreedAfterATunnelTheClientCloses() throws {
        let tunnelUpstream = try tunnelUpstream()
        defer { tunnelUpstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [tunnelUpstream.address]), loops: 1)
        defer { proxy.stop() }
        var (client, box): (BlockingSocket?, WeakHandler) = try openTunnel(proxy)
        XCTAssertEqual(proxy.server.activeConnections, 1, "the tunnel is still open")
        XCTAssertNotNil(client)
        client = nil   // closes the socket
        try assertFreed(box, proxy, "was tunnelled and closed by the client")
        XCTAssertTrue(waitUntil { proxy.server.activeConnections == 0 })
    }

    func testHandlerIsFreedAfterATunnelTheUpstreamCloses() throws {
        let tunnelUpstream = try tunnelUpstream()
        defer { tunnelUpstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [tunnelUpstream.address]), loops: 1)
        defer { proxy.stop() }
        var (client, box): (BlockingSocket?, WeakHandler) = try openTunnel(proxy)
        try client!.send("bye\n")
        // The upstream's end reaches the client as a half-close (end of input).
        XCTAssertTrue(client!.waitForClose(), "the upstream's close ends the tunnel")
        try assertFreed(box, proxy, "was tunnelled and closed by the upstream")
        client = nil
        XCTAssertTrue(waitUntil { proxy.server.activeConnections == 0 })
    }

    func testHandlerIsFreedAfterAnHTTP2Switch() throws {
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        var (client, box): (BlockingSocket?, WeakHandler) = try openHTTP2(proxy)
        // The HTTP/2 connection lives on without the HTTP/1.1 handler.
        try assertFreed(box, proxy, "switched to HTTP/2 (still open)")
        XCTAssertEqual(proxy.server.activeConnections, 1)
        XCTAssertNotNil(client)
        client = nil
        try assertFreed(box, proxy, "switched to HTTP/2 and closed")
    }

    func testHandlerIsFreedAfterAnHTTP2SwitchChosenByALPN() throws {
        let pki = TestPKI.shared
        let tls = ListenerTLSConfig.test(pki, certificates: ["a"]) { $0.alpn = ["h2", "http/1.1"] }
        let proxy = try ProxyHarness(config: httpsConfig(targets: [upstream.address], tls: tls), loops: 1)
        defer { proxy.stop() }
        let client = try TLSTestClient(group: group, port: proxy.port, serverName: "a.example.com", ca: pki.cert("ca"),
                                       alpn: ["h2"])
        let box = try openHandler(proxy)
        try client.channel.writeAndFlush(ByteBuffer(bytes: Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + [0, 0, 0, 4, 0, 0, 0, 0, 0])).wait()
        XCTAssertTrue(waitUntil { client.unreadByteCount >= 9 }, "the proxy answers in HTTP/2")
        try assertFreed(box, proxy, "switched to HTTP/2 over TLS (still open)")
        XCTAssertEqual(proxy.server.activeConnections, 1)
        client.close()
        try assertFreed(box, proxy, "switched to HTTP/2 over TLS and closed")
    }

    /// Many upgraded connections, half tunnels and half HTTP/2: none of
    /// their HTTP/1.1 handlers outlives its connection.
    func testNoHandlerOfManyUpgradedConnectionsIsKept() throws {
        let tunnelUpstream = try tunnelUpstream()
        defer { tunnelUpstream.stop() }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [tunnelUpstream.address]), loops: 1)
        defer { proxy.stop() }
        var boxes: [WeakHandler] = []
        for round in 0..<1_000 {
            let (client, box) = round % 2 == 0 ? try openTunnel(proxy) : try openHTTP2(proxy)
            boxes.append(box)
            _ = client   // closed here, at the end of the round
        }
        let context = proxy.server.loopContexts[0]
        var kept = boxes.count
        XCTAssertTrue(waitUntil {
            kept = (try? context.loop.submit { boxes.filter { $0.handler != nil }.count }.wait()) ?? kept
            return kept == 0
        }, "\(kept) of \(boxes.count) upgraded connections' handlers were kept")
    }
}
