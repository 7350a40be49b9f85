// The connection phase on tcp/tls listeners (listener plugins and global
// ones), and hot reload of tcp listeners: new connections follow the new
// generation, live ones are untouched.

import Foundation
import Logging
import NIOCore
import NIOPosix
import WeirCore
@testable import WeirProxy
import WeirTestSupport
import XCTest

/// A StreamHarness whose plugins come from a `PluginFolder`.
final class StreamPluginProxy {
    let harness: StreamHarness
    let generations: GenerationManager

    init(config: WeirConfig, folder: PluginFolder, loops: Int = 1) throws {
        var config = config
        config.pluginPaths = [folder.pluginsDir]
        harness = try StreamHarness(config: config, loops: loops)
        var logger = Logger(label: "weir.test.l4.plugins")
        logger.logLevel = .critical
        do {
            generations = try GenerationManager(server: harness.server, config: config, configPath: nil,
                                                baseDirectory: folder.root, logger: logger)
        } catch {
            harness.stop()
            throw error
        }
    }

    func stop() { harness.stop() }
}

final class StreamPluginTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!
    var folder: PluginFolder!

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        folder = try PluginFolder()
        // Picks the upstream from its config, or by the ALPN the client
        // offered; rejects one client port; checks what the handle reports.
        try folder.write("l4-pick", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1.0.0" }
        function P:connection(conf, conn)
          if conn:get_listener() ~= conf.listener then return conn:reject("wrong listener") end
          if conn:get_local_port() ~= conf.local_port then return conn:reject("wrong port") end
          if conn:get_ip() ~= "127.0.0.1" then return conn:reject("wrong ip") end
          if conf.reject_sni and conn:get_sni() == conf.reject_sni then return conn:reject("sni refused") end
          local alpn = conn:get_alpn()
          if alpn and alpn[1] == "h2" then
            assert(weir.upstream.set_upstream("b"))
          elseif conf.upstream then
            local ok, err = weir.upstream.set_upstream(conf.upstream)
            if not ok then error(err) end
          end
        end
        return P
        """, schema: """
        return { fields = {
          listener = { type = "string", required = true },
          local_port = { type = "integer", required = true },
          upstream = { type = "string" },
          reject_sni = { type = "string" },
        } }
        """)
        try folder.write("request-only", handler: """
        local P = { PRIORITY = 1, VERSION = "1.0.0" }
        function P:request(conf, ctx) end
        return P
        """)
        try folder.write("deny-all", handler: """
        local P = { PRIORITY = 1000, VERSION = "1.0.0" }
        function P:connection(conf, conn) return conn:reject("closed for maintenance") end
        return P
        """)
    }

    override func tearDown() {
        folder?.remove()
        try? group?.syncShutdownGracefully()
    }

    /// tcp listener `tcp` (fixed port) -> upstream `a`; upstreams a and b.
    private func config(port: Int, a: TCPTestServer, b: TCPTestServer, plugin: ConfigValue?) -> WeirConfig {
        StreamHarness.tcpConfig(targets: [a.address]) {
            $0.listeners[0].listen.port = port
            $0.upstreams[0].name = "a"
            $0.listeners[0].upstream = "a"
            var upstreamB = UpstreamConfig()
            upstreamB.name = "b"
            upstreamB.targets = [TargetConfig(address: b.address)]
            $0.upstreams.append(upstreamB)
            if let plugin { $0.listeners[0].plugins = [pluginRef("l4-pick", plugin)] }
        }
    }

    func testPluginPicksTheUpstream() throws {
        let a = try TCPTestServer(group: group, greeting: "A")
        let b = try TCPTestServer(group: group, greeting: "B")
        defer { a.stop(); b.stop() }
        let proxy = try withUnusedPort { port in
            try StreamPluginProxy(config: config(port: port, a: a, b: b, plugin: .map([
                "listener": .string("tcp"), "local_port": .int(port), "upstream": .string("b"),
            ])), folder: folder)
        }
        defer { proxy.stop() }
        XCTAssertEqual(try proxy.harness.connect("tcp").readString(1), "B")
    }

    func testUnknownUpstreamFromPluginFailsTheConnection() throws {
        let a = try TCPTestServer(group: group, greeting: "A")
        let b = try TCPTestServer(group: group, greeting: "B")
        defer { a.stop(); b.stop() }
        let proxy = try withUnusedPort { port in
            try StreamPluginProxy(config: config(port: port, a: a, b: b, plugin: .map([
                "listener": .string("tcp"), "local_port": .int(port), "upstream": .string("nowhere"),
            ])), folder: folder)
        }
        defer { proxy.stop() }
        XCTAssertEqual(try proxy.harness.connect("tcp").readToEnd().end, StreamClient.ReadEnd.eof)
        XCTAssertTrue(waitUntil { proxy.harness.streamLogLines().first?["outcome"] as? String == "plugin_failed" })
        XCTAssertEqual(a.connections + b.connections, 0)
    }

    func testPluginRejectsAndHandleChecksRun() throws {
        let a = try TCPTestServer(group: group, greeting: "A")
        let b = try TCPTestServer(group: group, greeting: "B")
        defer { a.stop(); b.stop() }
        // local_port deliberately wrong: the plugin rejects every connection.
        let proxy = try StreamPluginProxy(config: config(port: 0, a: a, b: b, plugin: .map([
            "listener": .string("tcp"), "local_port": .int(1),
        ])), folder: folder)
        defer { proxy.stop() }
        XCTAssertEqual(try proxy.harness.connect("tcp").readToEnd().end, StreamClient.ReadEnd.eof)
        XCTAssertTrue(waitUntil { proxy.harness.streamLogLines().first?["outcome"] as? String == "rejected" })
        XCTAssertEqual(a.connections + b.connections, 0, "no upstream connection for a rejected client")
        let text = proxy.harness.metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"weir_stream_connections_total{listener="tcp",upstream="",outcome="rejected"} 1"#), text)
    }

    func testGlobalConnectionPluginsRunOnTCPListeners() throws {
        let a = try TCPTestServer(group: group, greeting: "A")
        let b = try TCPTestServer(group: group, greeting: "B")
        defer { a.stop(); b.stop() }
        var config = config(port: 0, a: a, b: b, plugin: nil)
        config.plugins = [pluginRef("deny-all")]
        let proxy = try StreamPluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        XCTAssertEqual(try proxy.harness.connect("tcp").readToEnd().end, StreamClient.ReadEnd.eof)
        XCTAssertEqual(a.connections, 0)
    }

    func testTLSListenerPluginSeesSNIAndALPN() throws {
        let a = try TCPTestServer(group: group)
        let b = try TCPTestServer(group: group)
        defer { a.stop(); b.stop() }
        let proxy = try withUnusedPort { port in
            var config = config(port: port, a: a, b: b, plugin: .map([
                "listener": .string("tcp"), "local_port": .int(port), "reject_sni": .string("blocked.example.com"),
            ]))
            config.listeners[0].protocol = .tls
            return try StreamPluginProxy(config: config, folder: folder)
        }
        defer { proxy.stop() }

        // ALPN h2 first: the plugin sends it to b (the hello reaches b unchanged).
        let h2 = ClientHelloBuilder.hello(sni: "ok.example.com", alpn: ["h2", "http/1.1"])
        let client = try proxy.harness.connect("tcp")
        try client.send(h2)
        XCTAssertEqual(client.read(h2.count), h2)
        XCTAssertEqual(b.receivedBytes, h2)
        // No ALPN: the listener's upstream (a).
        let plain = ClientHelloBuilder.hello(sni: "ok.example.com", alpn: [])
        let second = try proxy.harness.connect("tcp")
        try second.send(plain)
        XCTAssertEqual(second.read(plain.count), plain)
        XCTAssertEqual(a.receivedBytes, plain)
        // The refused SNI is closed before any upstream connection.
        let blocked = try proxy.harness.connect("tcp")
        try blocked.send(ClientHelloBuilder.hello(sni: "blocked.example.com"))
        XCTAssertEqual(blocked.readToEnd().end, StreamClient.ReadEnd.eof)
        XCTAssertEqual(a.connections + b.connections, 2)
    }

    func testListenerPluginWithoutConnectionPhaseIsRefusedAtLoad() throws {
        let a = try TCPTestServer(group: group)
        defer { a.stop() }
        var config = config(port: 0, a: a, b: a, plugin: nil)
        config.listeners[0].plugins = [pluginRef("request-only")]
        XCTAssertThrowsError(try StreamPluginProxy(config: config, folder: folder)) { error in
            XCTAssertTrue("\(error)".contains("listeners[0].plugins[0].name"), "\(error)")
            XCTAssertTrue("\(error)".contains("has no connection phase"), "\(error)")
        }
    }

    func testHTTPListenerConnectionPhaseSeesListenerAndLocalPort() throws {
        try folder.write("where", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:connection(conf, conn)
          conn.data.where = conn:get_listener() .. ":" .. tostring(conn:get_local_port())
          -- Choosing an upstream is for tcp/tls listeners: nil, err here.
          local ok, err = weir.upstream.set_upstream("backend")
          conn.data.choice = ok and "chosen" or err
        end
        function P:request(conf, ctx)
          weir.response.set_header("x-where", weir.conn.where)
          weir.response.set_header("x-choice", weir.conn.choice)
        end
        return P
        """)
        let upstream = try TestUpstream(group: group)
        defer { upstream.stop() }
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("where")] }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let response = try proxy.connect().request("GET", "/")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.header("x-where"), "web:\(proxy.harness.port)")
        XCTAssertEqual(response.header("x-choice"), "weir.upstream.set_upstream in the connection phase only applies to tcp and tls listeners")
    }

    func testReloadChangesNewConnectionsOnlyAndKeepsTheSocket() throws {
        let a = try TCPTestServer(group: group, greeting: "A")
        let b = try TCPTestServer(group: group, greeting: "B")
        defer { a.stop(); b.stop() }
        let config = config(port: 0, a: a, b: b, plugin: nil)
        let proxy = try StreamPluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let port = proxy.harness.port("tcp")

        let old = try proxy.harness.connect("tcp")
        XCTAssertEqual(old.readString(1), "A")

        var next = config
        next.pluginPaths = [folder.pluginsDir]
        next.listeners[0].upstream = "b"
        next.listeners[0].stream.idleTimeout = .seconds(30)
        guard case .success = proxy.generations.reload(config: next) else { return XCTFail("reload failed") }

        XCTAssertEqual(proxy.harness.port("tcp"), port, "same listening socket")
        XCTAssertEqual(try proxy.harness.connect("tcp").readString(1), "B")
        // The connection from before the reload still relays to A.
        try old.send("still A")
        XCTAssertEqual(old.readString(7), "still A")
        XCTAssertEqual(a.receivedBytes, Array("still A".utf8))

        // Moving the listener is not a reload.
        var moved = next
        moved.listeners[0].listen.port = try refusingPort()   // any other port
        guard case .failure(let error) = proxy.generations.reload(config: moved) else { return XCTFail("moved listener reloaded") }
        XCTAssertTrue(error.description.contains("listeners"), error.description)
    }
}
