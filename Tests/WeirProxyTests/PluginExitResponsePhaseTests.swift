// The response phase runs on a request-phase early exit (issue 3), through
// a running proxy on loopback with a real upstream.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class PluginExitResponsePhaseTests: PluginFolderTestCase {
    /// `gate` (priority 100) exits with 401 on /private. A plugin that runs
    /// before it (priority 1000) and one that would have run after it
    /// (priority 10) both see the exit response in their response phase.
    private func writeGate() throws {
        try folder.write("gate", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_path() == "/private" then
            weir.response.exit(401, { message = "no key" }, { ["x-gate"] = "closed" })
          end
        end
        return P
        """)
    }

    private func writeStatusTagger(_ name: String, priority: Int, extra: String = "") throws {
        try folder.write(name, handler: """
        local weir = require "weir"
        local P = { PRIORITY = \(priority), VERSION = "1" }
        function P:response(conf, ctx)
          weir.response.set_header("x-\(name)", tostring(weir.response.get_status()) .. ":" ..
            (weir.response.get_header("x-gate") or "none"))
          \(extra)
        end
        return P
        """)
    }

    func testHigherAndLowerPriorityResponsePhasesChangeTheExit() throws {
        try writeGate()
        try writeStatusTagger("high", priority: 1000)
        try writeStatusTagger("low", priority: 10, extra: """
        if weir.response.get_status() == 401 then weir.response.set_status(403) end
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("high"), pluginRef("gate"), pluginRef("low")]
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let denied = try client.request("GET", "/private")
        // high runs first and sees 401; low (after it) changes it to 403.
        XCTAssertEqual(denied.status, 403)
        XCTAssertEqual(denied.header("x-high"), "401:closed")
        XCTAssertEqual(denied.header("x-low"), "401:closed")
        XCTAssertEqual(denied.header("x-gate"), "closed")
        XCTAssertEqual(denied.header("content-type"), "application/json")
        XCTAssertTrue(denied.bodyText.contains("no key"), denied.bodyText)
        XCTAssertFalse(upstream.requests.contains { $0.uri == "/private" }, "upstream skipped")
        // The same connection carries on; upstream responses still go through both.
        let allowed = try client.request("GET", "/open")
        XCTAssertEqual(allowed.status, 200)
        XCTAssertEqual(allowed.header("x-high"), "200:none")
        XCTAssertEqual(allowed.header("x-low"), "200:none")
    }

    func testAsyncResponsePhaseOnAnExit() throws {
        try writeGate()
        try writeStatusTagger("waiter", priority: 10, extra: "weir.sleep(0.02)")
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("gate"), pluginRef("waiter")]
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<3 {
            let denied = try client.request("GET", "/private")
            XCTAssertEqual(denied.status, 401)
            XCTAssertEqual(denied.header("x-waiter"), "401:closed")
            XCTAssertTrue(denied.bodyText.contains("no key"), denied.bodyText)
        }
        XCTAssertEqual(try client.request("GET", "/open").header("x-waiter"), "200:none")
    }

    /// A response phase that fails on an exit gives the proxy's 500; one
    /// that exits replaces the exit once (the response phase is not rerun).
    /// The log phase runs once per request either way.
    func testFailingOrExitingResponsePhaseOnAnExit() throws {
        try writeGate()
        try folder.write("after", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:response(conf, ctx)
          ctx.responses = (ctx.responses or 0) + 1
          local path = weir.request.get_path()
          if path == "/private" and weir.request.get_header("x-mode") == "boom" then error("kaboom") end
          if path == "/private" and weir.request.get_header("x-mode") == "replace" then
            weir.response.exit(409, "replaced " .. ctx.responses, { ["x-replaced"] = "yes" })
          end
        end
        function P:log(conf, ctx)
          weir.http.request("http://127.0.0.1:\(upstream.port)/logged?id=" .. weir.request.get_id() ..
            "&responses=" .. tostring(ctx.responses), { timeout = 2 })
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("gate"), pluginRef("after")]
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()

        let failed = try client.request("GET", "/private", headers: [("x-mode", "boom")])
        XCTAssertEqual(failed.status, 500)
        XCTAssertEqual(failed.errorJSON?["error"], "plugin_failed")
        let failedID = try XCTUnwrap(failed.header("x-request-id"))
        XCTAssertEqual(failed.errorJSON?["request_id"], failedID)
        XCTAssertTrue(failed.errorJSON?["message"]?.contains("after") ?? false)

        let replaced = try client.request("GET", "/private", headers: [("x-mode", "replace")])
        XCTAssertEqual(replaced.status, 409)
        XCTAssertEqual(replaced.bodyText, "replaced 1", "the response phase ran once")
        XCTAssertEqual(replaced.header("x-replaced"), "yes")
        XCTAssertNil(replaced.header("x-gate"), "the first exit was replaced")
        let replacedID = try XCTUnwrap(replaced.header("x-request-id"))

        let next = try client.request("GET", "/open")
        XCTAssertEqual(next.status, 200, "the same connection carries on")
        // An upstream response has no x-request-id; the upstream got it.
        let nextID = try XCTUnwrap(upstream.requests.first { $0.uri == "/open" }?.header("x-request-id"))

        func logs(_ id: String) -> [String] {
            upstream.requests.map(\.uri).filter { $0.hasPrefix("/logged?id=\(id)&") }
        }
        XCTAssertTrue(waitUntil { logs(nextID).count == 1 }, "the log phase ran for the last request")
        for id in [failedID, replacedID] {
            XCTAssertTrue(waitUntil { logs(id).count == 1 }, "log phase for \(id)")
        }
        XCTAssertEqual(logs(failedID), ["/logged?id=\(failedID)&responses=1"])
        XCTAssertEqual(logs(replacedID), ["/logged?id=\(replacedID)&responses=1"])
        XCTAssertEqual(logs(nextID), ["/logged?id=\(nextID)&responses=1"])
    }
}
