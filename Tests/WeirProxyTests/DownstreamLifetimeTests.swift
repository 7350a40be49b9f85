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
/// `handlerRemoved` when the channel closes.
final class DownstreamLifetimeTests: UpstreamTestCase {
    private final class WeakHandler: @unchecked Sendable { weak var handler: DownstreamHandler? }

    /// The handler of the proxy's one open HTTP/1.1 connection, held weakly.
    private func openHandler(_ proxy: ProxyHarness) throws -> WeakHandler {
        let box = WeakHandler()
        let context = proxy.server.loopContexts[0]
        XCTAssertTrue(waitUntil {
            (try? context.loop.submit { context.registeredHandlers.count }.wait()) == 1
        })
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
}
