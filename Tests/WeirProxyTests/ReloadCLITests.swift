import Foundation
import NIOPosix
import WeirAdmin
import WeirCore
import WeirTestSupport
import XCTest

/// Hot reload through the real `weir` executable: POST /reload, GET /status,
/// SIGHUP, `weir reload`, and `weir validate` checking plugins.
final class ReloadCLITests: XCTestCase {
    func testReloadTriggersOfARunningGateway() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let folder = try PluginFolder()
        defer { folder.remove() }
        func version(_ v: String) throws {
            try folder.write("ver", handler: """
            local weir = require "weir"
            local P = { PRIORITY = 10, VERSION = "1" }
            function P:request(conf, ctx) weir.response.set_header("x-version", "\(v)") end
            return P
            """, schema: "return { fields = { n = { type = \"integer\", default = 1, description = \"n\" } } }")
        }
        try version("A")
        let origin = DemoUpstream(listen: HostPort(host: "127.0.0.1", port: 0), bodySize: 16, group: group)
        try origin.start().wait()
        defer { _ = try? origin.stop().wait() }
        // The admin port is in the config because `weir reload --config` reads
        // it there: so it is picked before weir binds it, and picked again if
        // something takes it in between (below).
        var adminPort = 0
        let configPath = folder.root + "/weir.yaml"
        func writeConfig(pluginConfig: String = "{}") throws {
            try """
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            upstreams: [{ name: demo, targets: ["127.0.0.1:\(try XCTUnwrap(origin.boundAddress?.port))"] }]
            routes: [{ name: all, match: { paths: [/] }, upstream: demo }]
            plugins: [{ name: ver, config: \(pluginConfig) }]
            plugin_paths: [plugins]
            shared_dicts: [{ name: hits, size: 1m }]
            admin: { listen: "127.0.0.1:\(adminPort)" }
            access_log: "off"
            """.write(toFile: configPath, atomically: true, encoding: .utf8)
        }
        let weir = try withUnusedPort { port in
            adminPort = port
            try writeConfig()
            return try WeirChildProcess(["run", "--config", configPath, "--workers", "2", "--no-watch"])
        }
        defer { weir.stop() }
        let valid = try CLITests.runWeir(["validate", "--config", configPath])
        XCTAssertEqual(valid.status, 0, valid.stderr)
        let process = weir.process
        let proxyPort = try weir.port(listener: "web")
        func proxiedVersion() throws -> String? {
            try OpsTestHTTP.request(port: proxyPort, path: "/x", group: group).headers.first(name: "x-version")
        }
        XCTAssertEqual(try proxiedVersion(), "A")

        // POST /reload
        try version("B")
        let reloaded = try OpsTestHTTP.request(port: adminPort, method: .POST, path: "/reload", group: group)
        XCTAssertEqual(reloaded.status, 200, reloaded.body)
        XCTAssertTrue(reloaded.body.contains("\"generation\":2"), reloaded.body)
        XCTAssertEqual(try proxiedVersion(), "B")

        // A Lua syntax error: 400 with file:line; B keeps serving; /status shows it.
        try folder.write("ver", handler: "local P = {}\nfunction P:request(\nreturn P\n")
        let failed = try OpsTestHTTP.request(port: adminPort, method: .POST, path: "/reload", group: group)
        XCTAssertEqual(failed.status, 400)
        XCTAssertTrue(failed.body.contains("ver/handler.lua:"), failed.body)
        XCTAssertEqual(try proxiedVersion(), "B")
        let status = try OpsTestHTTP.request(port: adminPort, path: "/status", group: group)
        XCTAssertTrue(status.body.contains("\"generation\":2"), status.body)
        XCTAssertTrue(status.body.contains("\"last_reload_result\":\"failed\""), status.body)

        // `weir validate` refuses a bad plugin config with its path.
        try version("C")
        try writeConfig(pluginConfig: "{ n: lots }")
        let invalid = try CLITests.runWeir(["validate", "--config", configPath])
        XCTAssertEqual(invalid.status, 1)
        XCTAssertTrue(invalid.stderr.contains("plugins[0].config.n"), invalid.stderr)

        // SIGHUP
        try writeConfig()
        kill(process.processIdentifier, SIGHUP)
        OpsTestHTTP.eventually("SIGHUP reloaded to C") { (try? proxiedVersion()) == "C" }

        // `weir reload`
        try version("D")
        let cli = try CLITests.runWeir(["reload", "--config", configPath])
        XCTAssertEqual(cli.status, 0, cli.stderr)
        XCTAssertTrue(cli.stdout.contains("\"generation\":4"), cli.stdout)
        XCTAssertEqual(try proxiedVersion(), "D")

        let metrics = try OpsTestHTTP.request(port: adminPort, path: "/metrics", group: group)
        XCTAssertTrue(metrics.body.contains("weir_plugin_calls_total{plugin=\"ver\",phase=\"request\",outcome=\"completed\"}"),
                      metrics.body)
    }
}
