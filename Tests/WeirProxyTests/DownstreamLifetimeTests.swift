import Foundation
import NIOConcurrencyHelpers
import NIOCore
import WeirCore
@testable import WeirProxy
import WeirLua
import XCTest

/// A closed client connection's handler is freed, however it ended. Nothing
/// refers to it weakly any more (no side table, see
/// `UpstreamHandler.delegate`): the upstream connection's delegate, the
/// timers' closures and a pending connect hold it strongly, and let go when
/// the connection leaves its exchange, when NIO removes the handler, when
/// the connect completes. Its context (which holds it) is let go in
/// `handlerRemoved` when the channel closes, or on the next loop tick when
/// it leaves a live channel (a WebSocket tunnel after a 101, an HTTP/2
/// switch). On the plugin path the request's plugin side
/// (`ExchangePlugins.handler`) and the phases' callbacks hold it strongly
/// too, let go when the scope is finished or the phase's future completes
/// (see ExchangeDownstream+Plugins.swift). Between requests the connection
/// keeps its last request's plugin side (`DownstreamHandler.sparePlugins`),
/// which holds the handler: let go when the connection ends (closed or
/// tunnelled) and when a reload replaces its generation.
final class DownstreamLifetimeTests: PluginFolderTestCase {
    private final class WeakHandler: @unchecked Sendable {
        weak var handler: DownstreamHandler?
        /// The exchange in flight, when taken mid-request.
        weak var exchange: Exchange?
        /// The plugin side the connection keeps between its requests.
        weak var plugins: ExchangePlugins?
    }

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
        // (Its plugin side may live on, emptied, in the loop's spares.)
        XCTAssertTrue(waitUntil { (try? context.loop.submit { box.exchange == nil }.wait()) == true },
                      "the exchange of a connection that \(what) was not freed")
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

    func testHTTP2ConnectionIsFreedAfterItCloses() throws {
        final class WeakConnection: @unchecked Sendable { weak var connection: HTTP2DownstreamConnection? }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        let (client, _) = try openHTTP2(proxy)
        let context = proxy.server.loopContexts[0]
        let box = WeakConnection()
        try context.loop.submit { box.connection = context.registeredHTTP2Connections.first }.wait()
        XCTAssertNotNil(box.connection)
        try context.loop.submit { box.connection?.forceClose() }.wait()
        XCTAssertTrue(client.waitForClose())
        XCTAssertTrue(waitUntil { (try? context.loop.submit { box.connection == nil }.wait()) == true },
                      "a closed HTTP/2 connection's handler was not freed")
    }

    func testHTTP2ConnectionTheClientClosesEndsAndIsFreed() throws {
        final class WeakConnection: @unchecked Sendable { weak var connection: HTTP2DownstreamConnection? }
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        var (client, _): (BlockingSocket?, WeakHandler) = try openHTTP2(proxy)
        let context = proxy.server.loopContexts[0]
        let box = WeakConnection()
        try context.loop.submit { box.connection = context.registeredHTTP2Connections.first }.wait()
        XCTAssertNotNil(box.connection)
        XCTAssertNotNil(client)
        client = nil   // closes the socket: before, the proxy only noticed at the next PING (60 s)
        XCTAssertTrue(waitUntil { proxy.server.activeConnections == 0 }, "the HTTP/2 connection was not closed")
        XCTAssertTrue(waitUntil { (try? context.loop.submit { box.connection == nil }.wait()) == true },
                      "the HTTP/2 connection's handler was not freed")
    }

    func testHTTP2ClientHalfCloseStillGetsItsResponse() throws {
        let proxy = try ProxyHarness(config: ProxyHarness.config(targets: [upstream.address]), loops: 1)
        defer { proxy.stop() }
        // One GET on stream 1 (END_STREAM), then the client shuts its write side.
        let script = """
        import socket, sys, h2.connection, h2.events
        s = socket.create_connection(("127.0.0.1", \(proxy.port)))
        c = h2.connection.H2Connection(); c.initiate_connection()
        c.send_headers(1, [(":method", "GET"), (":path", "/half"), (":scheme", "http"), (":authority", "a")], end_stream=True)
        s.sendall(c.data_to_send()); s.shutdown(socket.SHUT_WR)
        status, body, ended = None, b"", False
        while not ended:
            data = s.recv(65536)
            if not data: break
            for e in c.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived): status = dict(e.headers)[b":status"]
                if isinstance(e, h2.events.DataReceived): body += e.data
                if isinstance(e, h2.events.StreamEnded): ended = True
        print(status.decode(), body.decode(), ended)
        """
        let r = try runProgram("/usr/bin/python3", ["-c", script])
        XCTAssertEqual(r.status, 0, r.err)
        XCTAssertEqual(r.out.trimmingCharacters(in: .whitespacesAndNewlines), "200 ok from upstream True")
        XCTAssertTrue(waitUntil { proxy.server.activeConnections == 0 }, "the half-closed HTTP/2 connection was not closed")
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

    // MARK: Connections that ran plugins

    private func pluginProxy(global: [String] = [], route: [String]) throws -> PluginProxy {
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = global.map { pluginRef($0) }
            $0.routes[0].plugins = route.map { pluginRef($0) }
        }
        return try PluginProxy(config: config, folder: folder, loops: 1)
    }

    /// Takes the handler and its exchange once a plugin of the request
    /// waits (`phasePending`).
    private func handlerWaitingInPlugin(_ proxy: ProxyHarness) throws -> WeakHandler {
        let box = try openHandler(proxy)
        let context = proxy.server.loopContexts[0]
        XCTAssertTrue(waitUntil {
            (try? context.loop.submit { box.handler?.exchange?.plugins?.phasePending == true }.wait()) == true
        }, "no plugin waits")
        try context.loop.submit { box.exchange = box.handler?.exchange }.wait()
        XCTAssertNotNil(box.exchange)
        return box
    }

    /// Sends one request through a route with `plugin`, waits until the
    /// plugin waits, resets the connection, and checks that the handler and
    /// the in-flight exchange are freed; `thenWhileRunning` runs before the
    /// proxy stops.
    private func assertFreedWhenTheClientLeavesWhile(waitingIn plugin: String, _ what: String,
                                                     thenWhileRunning: () throws -> Void = {}) throws {
        let proxy = try pluginProxy(route: [plugin])
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        try client!.send("GET /waits HTTP/1.1\r\nHost: a\r\n\r\n")
        let box = try handlerWaitingInPlugin(proxy.harness)
        reset(&client)
        try assertFreed(box, proxy.harness, "closed while \(what)")
        try thenWhileRunning()
    }

    /// Closes with a reset: the proxy sees the connection go at once (a FIN
    /// alone is a half-close, and the request would carry on).
    private func reset(_ client: inout BlockingSocket?) {
        client!.closeWithReset()
        client = nil
    }

    func testHandlerIsFreedAfterRequestPhasePlugins() throws {
        try writeTag()
        let proxy = try pluginProxy(route: ["tag"])
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        // Several requests: a finished request's plugin side goes to the
        // loop's spares and serves the next (it must not keep the handler).
        for path in ["/a", "/b", "/c"] { XCTAssertEqual(try client!.request("GET", path).status, 200) }
        XCTAssertEqual(upstream.lastRequest?.header("x-tag"), "1")
        let box = try openHandler(proxy.harness)
        client = nil
        try assertFreed(box, proxy.harness, "ran request-phase plugins")
    }

    func testHandlerIsFreedAfterResponseAndLogPhases() throws {
        // The log phase waits (weir.sleep): it still runs after the client left.
        try folder.write("all", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:request(conf, ctx) ctx.seen = true end
        function P:response(conf, ctx) weir.response.set_header("x-seen", tostring(ctx.seen)) end
        function P:log(conf, ctx) weir.sleep(0.05) end
        return P
        """)
        let proxy = try pluginProxy(route: ["all"])
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        for path in ["/a", "/b"] { XCTAssertEqual(try client!.request("GET", path).header("x-seen"), "true") }
        let box = try openHandler(proxy.harness)
        client = nil
        try assertFreed(box, proxy.harness, "ran response and (waiting) log phases")
    }

    func testHandlerIsFreedWhenTheClientLeavesWhileAPluginWaits() throws {
        // The request phase waits (sleep), with a timer set, when the client goes.
        try folder.write("slow", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:request(conf, ctx)
          weir.timer.at(0.05, function() end)
          weir.sleep(0.3)
        end
        return P
        """)
        try assertFreedWhenTheClientLeavesWhile(waitingIn: "slow", "a request-phase plugin waited") {
            // Freed before the plugin's wait ended: the abandoned phase completed
            // (failed) when the scope was finished, and the request never went on.
            Thread.sleep(forTimeInterval: 0.4)
            XCTAssertTrue(upstream.requests.isEmpty, "the abandoned request went upstream")
        }
    }

    func testHandlerIsFreedWhenTheClientLeavesWhileAResponsePhaseWaits() throws {
        try folder.write("slowresponse", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:response(conf, ctx) weir.sleep(0.3) end
        return P
        """)
        try assertFreedWhenTheClientLeavesWhile(waitingIn: "slowresponse", "a response-phase plugin waited")
    }

    func testHandlerIsFreedWhenTheClientLeavesWhileTheConnectionPhaseWaits() throws {
        try folder.write("slowaccept", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:connection(conf, conn) weir.sleep(0.2) end
        return P
        """)
        let proxy = try pluginProxy(global: ["slowaccept"], route: [])
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        let box = try openHandler(proxy.harness)
        client = nil
        try assertFreed(box, proxy.harness, "closed while its connection phase waited")
    }

    func testHandlerIsFreedAfterAPluginFailedAndAnExit() throws {
        try folder.write("gate", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:request(conf, ctx)
          local path = weir.request.get_path()
          if path == "/fail" then error("boom") end
          if path == "/exit" then weir.response.exit(403, { message = "no" }) end
        end
        return P
        """)
        let proxy = try pluginProxy(route: ["gate"])
        defer { proxy.stop() }
        for (path, status) in [("/fail", 500), ("/exit", 403)] {
            var client: BlockingSocket? = try proxy.connect()
            XCTAssertEqual(try client!.request("GET", path).status, status)
            let box = try openHandler(proxy.harness)
            client = nil
            try assertFreed(box, proxy.harness, "got \(path)'s answer")
            let context = proxy.harness.server.loopContexts[0]
            XCTAssertTrue(waitUntil { (try? context.loop.submit { context.registeredHandlers.isEmpty }.wait()) == true })
        }
        XCTAssertTrue(upstream.requests.isEmpty)
    }

    // MARK: The plugin side a connection keeps between its requests

    private func writeTag() throws {
        try folder.write("tag", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:request(conf, ctx)
          weir.upstream.request.set_header("x-tag", "1")
        end
        return P
        """)
    }

    /// The connection's kept plugin side, held weakly in `box`.
    private func takeSparePlugins(_ box: WeakHandler, _ proxy: ProxyHarness) throws {
        let context = proxy.server.loopContexts[0]
        try context.loop.submit { box.plugins = box.handler?.sparePlugins }.wait()
    }

    private func assertPluginSideFreed(_ box: WeakHandler, _ proxy: ProxyHarness, _ what: String) {
        let context = proxy.server.loopContexts[0]
        XCTAssertTrue(waitUntil { (try? context.loop.submit { box.plugins == nil }.wait()) == true },
                      "the plugin side of a connection that \(what) was not freed")
    }

    func testAKeptAliveConnectionRunsItsRequestsOnOnePluginSideFreedWithIt() throws {
        try writeTag()
        let proxy = try pluginProxy(route: ["tag"])
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        XCTAssertEqual(try client!.request("GET", "/a").status, 200)
        let box = try openHandler(proxy.harness)
        try takeSparePlugins(box, proxy.harness)
        XCTAssertNotNil(box.plugins, "the connection keeps its finished request's plugin side")
        let context = proxy.harness.server.loopContexts[0]
        for path in ["/b", "/c", "/d"] {
            XCTAssertEqual(try client!.request("GET", path).status, 200)
            XCTAssertEqual(upstream.lastRequest?.header("x-tag"), "1")
            XCTAssertTrue(try context.loop.submit { box.handler?.sparePlugins === box.plugins }.wait(),
                          "\(path) ran on the same plugin side")
        }
        client = nil
        try assertFreed(box, proxy.harness, "closed between requests that ran plugins")
        assertPluginSideFreed(box, proxy.harness, "closed between requests")
    }

    func testAPluginSideKeptThroughATunnelSwitchIsFreedWithTheHandler() throws {
        try writeTag()
        let tunnelUpstream = try tunnelUpstream()
        defer { tunnelUpstream.stop() }
        let config = ProxyHarness.config(targets: [tunnelUpstream.address]) { $0.routes[0].plugins = [pluginRef("tag")] }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        // The upgrade request ran the request phase, then its connection
        // became a tunnel: the handler left the pipeline with the plugin side.
        var (client, box): (BlockingSocket?, WeakHandler) = try openTunnel(proxy.harness)
        XCTAssertNotNil(client)
        client = nil
        try assertFreed(box, proxy.harness, "ran plugins, was tunnelled and closed")
        XCTAssertTrue(waitUntil { proxy.harness.server.activeConnections == 0 })
    }

    func testHandlerIsFreedWhenTheClientLeavesWhileAPluginWaitsAfterAFinishedRequest() throws {
        // The connection's second request waits (sleep, with a timer set) on
        // the plugin side its first request left.
        try folder.write("slowpath", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_path() == "/waits" then
            weir.timer.at(0.05, function() end)
            weir.sleep(0.3)
          end
        end
        return P
        """)
        let proxy = try pluginProxy(route: ["slowpath"])
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        XCTAssertEqual(try client!.request("GET", "/first").status, 200)
        try client!.send("GET /waits HTTP/1.1\r\nHost: a\r\n\r\n")
        let box = try handlerWaitingInPlugin(proxy.harness)
        try proxy.harness.server.loopContexts[0].loop.submit { box.plugins = box.handler?.exchange?.plugins }.wait()
        XCTAssertNotNil(box.plugins)
        reset(&client)
        try assertFreed(box, proxy.harness, "closed while its second request's plugin waited")
        assertPluginSideFreed(box, proxy.harness, "closed while a plugin waited")
        Thread.sleep(forTimeInterval: 0.4)
        XCTAssertEqual(upstream.requests.count, 1, "the abandoned request went upstream")
    }

    private final class WeakRuntime: @unchecked Sendable { weak var runtime: LuaRuntime? }

    func testAReloadBetweenTwoRequestsOfAConnectionFreesTheOldGenerationAndRunsTheNew() throws {
        func writeVersion(_ version: String) throws {
            try folder.write("version", handler: """
            local weir = require "weir"
            local P = { PRIORITY = 10, VERSION = "1" }
            function P:request(conf, ctx) weir.response.set_header("x-version", "\(version)") end
            return P
            """)
        }
        let path = folder.root + "/weir.yaml"
        try """
        listeners: [{ name: web, listen: 127.0.0.1:0 }]
        upstreams: [{ name: backend, targets: [127.0.0.1:\(upstream.port)] }]
        routes: [{ name: all, match: { paths: [/] }, upstream: backend, plugins: [{ name: version }] }]
        plugin_paths: [plugins]
        access_log: "off"
        """.write(toFile: path, atomically: true, encoding: .utf8)
        try writeVersion("A")
        let proxy = try PluginProxy(config: try ConfigLoader.load(path: path), folder: folder, configPath: path, loops: 1)
        defer { proxy.stop() }
        var client: BlockingSocket? = try proxy.connect()
        XCTAssertEqual(try client!.request("GET", "/a").header("x-version"), "A")
        let box = try openHandler(proxy.harness)
        try takeSparePlugins(box, proxy.harness)
        XCTAssertNotNil(box.plugins)
        let context = proxy.harness.server.loopContexts[0]
        let old = WeakRuntime()
        try context.loop.submit { old.runtime = context.plugins?.runtime }.wait()
        XCTAssertNotNil(old.runtime)

        try writeVersion("B")
        guard case .success = proxy.generations.reload() else { return XCTFail("reload failed") }
        // The connection is idle and open: its kept plugin side (of A) is
        // let go at the reload, and with it the retired Lua state.
        assertPluginSideFreed(box, proxy.harness, "stayed idle across a reload")
        XCTAssertTrue(waitUntil(timeout: 5) { old.runtime == nil },
                      "an idle connection pinned the retired generation's Lua runtime")
        XCTAssertEqual(try client!.request("GET", "/b").header("x-version"), "B", "the next request runs the new generation")
        XCTAssertTrue(try context.loop.submit {
            box.handler?.sparePlugins != nil && box.handler?.sparePlugins?.loopPlugins === context.plugins
        }.wait(), "the connection keeps the new generation's plugin side")
        XCTAssertEqual(try client!.request("GET", "/c").header("x-version"), "B")
        client = nil
        try assertFreed(box, proxy.harness, "ran plugins of two generations")
    }
}
