// Lua plugins on the HTTP/1.1 data path, through a running proxy on
// loopback with a real upstream.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import WeirTestSupport
import XCTest

final class PluginProxyTests: PluginFolderTestCase {
    /// request adds an upstream header and an early response header,
    /// response sets a header from the upstream status, log runs after the
    /// response (it calls the upstream's /logged, which the test waits for).
    func testEveryPhaseThroughTheProxy() throws {
        try folder.write("phases", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          ctx.seen = weir.request.get_header("x-in") or "none"
          weir.upstream.request.set_header("x-added", conf.value .. ":" .. ctx.seen)
          weir.upstream.request.clear_header("x-drop")
          weir.response.set_header("x-early", "yes")
        end
        function P:response(conf, ctx)
          weir.response.set_header("x-upstream-status", tostring(weir.response.get_status()))
          weir.response.set_header("x-ctx", ctx.seen)
        end
        function P:log(conf, ctx)
          weir.http.request("http://127.0.0.1:\(upstream.port)/logged?id=" .. weir.request.get_id(), { timeout = 2 })
        end
        return P
        """, schema: "return { fields = { value = { type = \"string\", default = \"v\", description = \"prefix\" } } }")
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("phases", .map(["value": .string("global")]))]
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let response = try client.request("GET", "/hello", headers: [("x-in", "abc"), ("x-drop", "1")])
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "ok from upstream")
        XCTAssertEqual(response.header("x-early"), "yes")
        XCTAssertEqual(response.header("x-upstream-status"), "200")
        XCTAssertEqual(response.header("x-ctx"), "abc")
        let seen = upstream.requests.first { $0.uri == "/hello" }
        XCTAssertEqual(seen?.header("x-added"), "global:abc")
        XCTAssertNil(seen?.header("x-drop"))
        let id = try XCTUnwrap(seen?.header("x-request-id"))
        XCTAssertTrue(waitUntil { self.upstream.requests.contains { $0.uri == "/logged?id=\(id)" } },
                      "the log phase ran after the response")
        // The same keep-alive connection serves the next request.
        XCTAssertEqual(try client.request("GET", "/again").status, 200)
    }

    /// Request scopes are reused across the requests of a loop (no log
    /// phase: each finished scope goes back to the spares): every request
    /// still starts with an empty ctx and sees only its own values.
    func testReusedScopesStartEachRequestFresh() throws {
        try folder.write("fresh", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          weir.response.set_header("x-fresh", ctx.id == nil and weir.ctx.id == nil and "yes" or "no")
          ctx.id = weir.request.get_id()
        end
        function P:response(conf, ctx)
          weir.response.set_header("x-ctx", ctx.id == weir.request.get_id() and "own" or tostring(ctx.id))
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("fresh")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for i in 0..<4 {
            let response = try client.request("GET", "/r\(i)")
            XCTAssertEqual(response.status, 200)
            XCTAssertEqual(response.header("x-fresh"), "yes", "request \(i)")
            XCTAssertEqual(response.header("x-ctx"), "own", "request \(i)")
        }
    }

    /// A finished request's plugin side (ExchangePlugins) and its scope
    /// serve later requests of the loop: what one request's plugins set
    /// (consumer, method, path, headers, early response headers, an exit)
    /// never reaches the next one.
    func testReusedRequestSidesCarryNothingOver() throws {
        try folder.write("setter", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          local up = weir.upstream.request
          up.set_header("x-consumer-seen", tostring(weir.client.get_consumer()))
          local case = weir.request.get_header("x-case")
          if case == "set" then
            weir.client.authenticate("alice")
            up.set_method("PUT")
            up.set_header("x-set", "1")
            up.set_path("/changed")
            weir.response.set_header("x-early", "1")
          elseif case == "exit" then
            return 418, "teapot"
          end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("setter")] }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for round in 0..<3 {
            let set = try client.request("GET", "/a", headers: [("x-case", "set")])
            XCTAssertEqual(set.status, 200)
            XCTAssertEqual(set.header("x-early"), "1")
            XCTAssertEqual(upstream.lastRequest?.method, "PUT")
            XCTAssertEqual(upstream.lastRequest?.uri, "/changed")

            let plain = try client.request("GET", "/plain")
            XCTAssertEqual(plain.status, 200, "round \(round)")
            XCTAssertNil(plain.header("x-early"), "round \(round)")
            let seen = try XCTUnwrap(upstream.lastRequest)
            XCTAssertEqual(seen.method, "GET", "round \(round)")
            XCTAssertEqual(seen.uri, "/plain", "round \(round)")
            XCTAssertNil(seen.header("x-set"), "round \(round)")
            XCTAssertEqual(seen.header("x-consumer-seen"), "nil", "round \(round)")

            let exit = try client.request("GET", "/e", headers: [("x-case", "exit")])
            XCTAssertEqual(exit.status, 418)
            XCTAssertEqual(try client.request("GET", "/after-exit").status, 200, "round \(round)")
            XCTAssertEqual(upstream.lastRequest?.uri, "/after-exit")
        }
    }

    /// `weir.request.get_path` on reused request sides: a plain target's
    /// path is made from the head when asked (ExchangePlugins.path), a
    /// target with a query, dot segments or the absolute form gives the
    /// routed path; neither leaks into the next request of the loop.
    func testRequestPathOnReusedSides() throws {
        try folder.write("path", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_header("x-ask") then
            weir.response.set_header("x-path", weir.request.get_path())
            weir.response.set_header("x-path-again", weir.request.get_path())
            weir.response.set_header("x-query", weir.request.get_raw_query())
          end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("path")] }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let cases: [(target: String, path: String, query: String)] = [
            ("/plain", "/plain", ""), ("/q?x=1", "/q", "x=1"), ("/plain2", "/plain2", ""),
            ("/a/../b/./c", "/b/c", ""), ("/last", "/last", ""),
            ("http://example.test/abs?y=2", "/abs", "y=2"), ("/", "/", ""),
        ]
        for round in 0..<2 {
            for c in cases {
                // A request that does not ask comes in between: the path
                // made for one request is not the next one's.
                XCTAssertEqual(try client.request("GET", "/between").status, 200)
                let response = try client.request("GET", c.target, headers: [("x-ask", "1")])
                XCTAssertEqual(response.status, 200, "\(c.target) round \(round)")
                XCTAssertEqual(response.header("x-path"), c.path, "\(c.target) round \(round)")
                XCTAssertEqual(response.header("x-path-again"), c.path, "\(c.target) round \(round)")
                XCTAssertEqual(response.header("x-query"), c.query, "\(c.target) round \(round)")
            }
        }
    }

    func testEarlyExitSkipsTheUpstream() throws {
        try folder.write("gate", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_header("x-key") ~= "secret" then
            return 401, { message = "no key" }, { ["x-gate"] = "closed" }
          end
        end
        function P:response(conf, ctx)
          weir.response.set_header("x-response-phase", "ran")
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("gate")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let denied = try client.request("GET", "/private")
        XCTAssertEqual(denied.status, 401)
        XCTAssertEqual(denied.header("x-gate"), "closed")
        XCTAssertEqual(denied.header("content-type"), "application/json")
        XCTAssertTrue(denied.bodyText.contains("no key"), denied.bodyText)
        XCTAssertFalse(upstream.requests.contains { $0.uri == "/private" }, "upstream skipped")
        let allowed = try client.request("GET", "/private", headers: [("x-key", "secret")])
        XCTAssertEqual(allowed.status, 200)
        XCTAssertEqual(allowed.header("x-response-phase"), "ran")
    }

    func testFailingPluginGives500WithRequestIDAndTheNextRequestWorks() throws {
        try folder.write("flaky", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_path() == "/boom" then error("kaboom") end
          if weir.request.get_path() == "/loop" then while true do end end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("flaky")]
            $0.lua.instructionBudget = 100_000
        }
        let metrics = PluginMetrics()
        let proxy = try PluginProxy(config: config, folder: folder, metrics: metrics)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for path in ["/boom", "/loop"] {
            let failed = try client.request("GET", path)
            XCTAssertEqual(failed.status, 500)
            XCTAssertEqual(failed.errorJSON?["error"], "plugin_failed")
            XCTAssertEqual(failed.errorJSON?["request_id"], failed.header("x-request-id"))
            XCTAssertTrue(failed.errorJSON?["message"]?.contains("flaky") ?? false)
            XCTAssertFalse(upstream.requests.contains { $0.uri == path })
            XCTAssertEqual(try client.request("GET", "/fine").status, 200, "same connection carries on")
        }
        let text = metrics.renderPrometheus()
        XCTAssertTrue(text.contains("weir_plugin_calls_total{plugin=\"flaky\",phase=\"request\",outcome=\"failed\"} 2"), text)
        XCTAssertTrue(text.contains("weir_plugin_calls_total{plugin=\"flaky\",phase=\"request\",outcome=\"completed\"} 2"), text)
        XCTAssertTrue(text.contains("weir_plugin_duration_seconds_count{plugin=\"flaky\",phase=\"request\"} 4"), text)
        // Every call lands in a bucket (cumulative +Inf = count) and adds to the sum.
        XCTAssertTrue(text.contains("weir_plugin_duration_seconds_bucket{plugin=\"flaky\",phase=\"request\",le=\"+Inf\"} 4"), text)
        let sumLine = text.split(separator: "\n").first { $0.hasPrefix("weir_plugin_duration_seconds_sum{plugin=\"flaky\",phase=\"request\"}") }
        XCTAssertGreaterThan(sumLine.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0, 0, text)
    }

    func testRouteConfigWinsOverGlobal() throws {
        try folder.write("tag", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx) weir.response.set_header("x-tag", conf.tag) end
        return P
        """, schema: "return { fields = { tag = { type = \"string\", required = true, description = \"tag\" } } }")
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("tag", .map(["tag": .string("global")]))]
            var special = RouteConfig()
            special.name = "special"
            special.upstream = "backend"
            special.match.paths = [PathPattern.prefix("/special")]
            special.plugins = [pluginRef("tag", .map(["tag": .string("route")]))]
            $0.routes.insert(special, at: 0)
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/special/x").header("x-tag"), "route")
        XCTAssertEqual(try client.request("GET", "/other").header("x-tag"), "global")
    }

    func testConnectionPhaseRejects() throws {
        try folder.write("door", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:connection(conf, conn)
          if conf.closed then conn:reject("closed") end
          conn.data.port = conn:get_port()
        end
        function P:request(conf, ctx)
          weir.response.set_header("x-conn-port", tostring(weir.conn.port))
        end
        return P
        """, schema: "return { fields = { closed = { type = \"boolean\", default = false, description = \"reject all\" } } }")
        var config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("door")] }
        let open = try PluginProxy(config: config, folder: folder)
        let response = try open.connect().request("GET", "/")
        XCTAssertEqual(response.status, 200)
        XCTAssertNotNil(Int(response.header("x-conn-port") ?? ""), "request phase read conn.data")
        open.stop()

        config.plugins = [pluginRef("door", .map(["closed": .bool(true)]))]
        let closed = try PluginProxy(config: config, folder: folder)
        defer { closed.stop() }
        let client = try closed.connect()
        XCTAssertTrue(client.waitForClose(), "rejected connection is closed")
        XCTAssertFalse(upstream.requests.contains { $0.uri == "/" && $0.header("x-conn-port") != nil })
    }

    func testAsyncSleepAndHTTPInTheRequestPhase() throws {
        try folder.write("async", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          weir.sleep(0.02)
          local res, err = weir.http.request("http://127.0.0.1:\(upstream.port)/status/204", { timeout = 2 })
          if not res then return 502, err end
          weir.upstream.request.set_header("x-side-status", tostring(res.status))
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("async")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for i in 0..<3 {
            let response = try client.request("POST", "/post/\(i)", body: "payload \(i)")
            XCTAssertEqual(response.status, 200)
            let seen = upstream.requests.first { $0.uri == "/post/\(i)" }
            XCTAssertEqual(seen?.header("x-side-status"), "204")
            XCTAssertEqual(seen?.bodyBytes, "payload \(i)".utf8.count, "body held while the plugin waited, then forwarded")
        }
    }

    func testUnknownPluginAndBadConfigAreRefusedWithPaths() throws {
        try folder.write("tag", handler: "local P = { PRIORITY = 1, VERSION = '1' } function P:request() end return P",
                         schema: "return { fields = { tag = { type = \"string\", required = true, description = \"t\" } } }")
        var config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("nope")] }
        XCTAssertThrowsError(try PluginProxy(config: config, folder: folder)) { error in
            XCTAssertTrue("\(error)".contains("nope"), "\(error)")
        }
        config.plugins = []
        config.routes[0].plugins = [pluginRef("tag", .map(["tag": .int(3)]))]
        XCTAssertThrowsError(try PluginProxy(config: config, folder: folder)) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config.tag"), "\(error)")
        }
    }
}

extension PluginProxyTests {
    /// Clients that leave while a plugin waits (weir.sleep): every scope is
    /// finished (abandoned mid-phase: no log phase), the next clients are
    /// served, and memory stays flat over many such aborts.
    func testAbortedRequestsReleaseTheirScopes() throws {
        try folder.write("slow", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          ctx.big = string.rep("x", 16 * 1024)   -- per-request garbage that must be freed
          if weir.request.get_path() == "/slow" then weir.sleep(1) end
        end
        function P:log(conf, ctx)
          weir.http.request("http://127.0.0.1:\(upstream.port)/logged", { timeout = 5 })
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("slow")]
        }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        func abortSome(_ count: Int) throws {
            for _ in 0..<count {
                let client = try proxy.connect()
                try client.send("GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
                client.closeWithReset()   // the proxy sees the connection go at once
            }
        }
        func logRuns() -> Int {   // aborted requests the proxy has recorded (status 499)
            proxy.harness.observer.records.filter { $0.status == 499 }.count
        }
        // The first batches grow the Lua heap up to where its collector
        // settles (garbage up to ~2x live data before a cycle); after that
        // the same work must not need more memory.
        try abortSome(300)
        XCTAssertTrue(waitUntil(timeout: 30) { logRuns() >= 300 }, "every request aborted (\(logRuns()))")
        try abortSome(300)
        XCTAssertTrue(waitUntil(timeout: 30) { logRuns() >= 600 }, "every request aborted (\(logRuns()))")
        let before = currentRSS()
        try abortSome(900)
        XCTAssertTrue(waitUntil(timeout: 60) { logRuns() >= 1500 }, "every request aborted (\(logRuns()))")
        let after = currentRSS()
        XCTAssertLessThan(after - before, 16 << 20, "RSS \(before) -> \(after)")
        XCTAssertEqual(try proxy.connect().request("GET", "/fast").status, 200)
    }
}

extension PluginProxyTests {
    /// body_filter rewrites the upstream body chunk by chunk (the length
    /// changes, so the response is re-framed) and appends at the last chunk.
    func testBodyFilterRewritesTheResponse() throws {
        try folder.write("upper", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:body_filter(conf, ctx)
          local chunk = weir.response.get_chunk()
          if weir.response.is_last_chunk() then
            weir.response.set_chunk(chunk .. "|end")
          else
            weir.response.set_chunk(string.upper(chunk) .. "+")
          end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("upper")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let response = try client.request("GET", "/plain")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "OK FROM UPSTREAM+|end")
        XCTAssertNil(response.header("content-length"))
        // Keep-alive still works after a re-framed response.
        XCTAssertEqual(try client.request("GET", "/again").bodyText, "OK FROM UPSTREAM+|end")
    }
}

extension PluginProxyTests {
    /// weir.request.get_body in the request phase: the plugin sees the body
    /// (capped at max_bytes) and the upstream still gets all of it.
    func testRequestBodyInTheRequestPhase() throws {
        try folder.write("body", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          local body = weir.request.get_body(10)
          if body == "forbidden!" then return 403, "no" end
          weir.upstream.request.set_header("x-body-head", body or "nil")
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("body")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let big = String(repeating: "abcdefghij", count: 10_000)
        XCTAssertEqual(try client.request("POST", "/sink", body: big).bodyText, String(big.utf8.count))
        XCTAssertEqual(upstream.requests.last { $0.uri == "/sink" }?.header("x-body-head"), "abcdefghij")
        XCTAssertEqual(try client.request("POST", "/sink", body: "forbidden!").status, 403)
        XCTAssertEqual(try client.request("GET", "/nobody").status, 200)
        XCTAssertEqual(upstream.requests.last { $0.uri == "/nobody" }?.header("x-body-head"), "nil")
        XCTAssertEqual(try client.request("POST", "/sink", body: "short").bodyText, "5")
        XCTAssertEqual(upstream.requests.last { $0.uri == "/sink" }?.header("x-body-head"), "short")
    }
}

extension PluginProxyTests {
    /// A connection phase that waits (weir.http to a policy service) holds
    /// the connection's requests until it decides; a reject closes it
    /// without any request reaching the upstream.
    func testAsyncConnectionPhaseHoldsRequestsUntilItDecides() throws {
        try folder.write("gatekeeper", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:connection(conf, conn)
          local res = weir.http.request("http://127.0.0.1:\(upstream.port)/status/" .. conf.verdict, { timeout = 2 })
          weir.sleep(0.05)
          if not res or res.status ~= 200 then conn:reject("denied") end
          conn.data.checked = "yes"
        end
        function P:request(conf, ctx)
          weir.upstream.request.set_header("x-checked", weir.conn.checked or "no")
        end
        return P
        """, schema: "return { fields = { verdict = { type = \"integer\", default = 200, description = \"status\" } } }")
        var config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("gatekeeper")] }
        let allowed = try PluginProxy(config: config, folder: folder)
        let client = try allowed.connect()
        let response = try client.request("GET", "/held")   // sent at once, before the phase decided
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(upstream.requests.last { $0.uri == "/held" }?.header("x-checked"), "yes")
        allowed.stop()

        config.plugins = [pluginRef("gatekeeper", .map(["verdict": .int(403)]))]
        let denied = try PluginProxy(config: config, folder: folder)
        defer { denied.stop() }
        let rejected = try denied.connect()
        try rejected.send("GET /sneaky HTTP/1.1\r\nHost: t\r\n\r\n")
        XCTAssertTrue(rejected.waitForClose())
        XCTAssertFalse(upstream.requests.contains { $0.uri == "/sneaky" }, "no request passed before the reject")
    }
}

extension PluginProxyTests {
    /// Plugins attached to a consumer run once an auth plugin named that
    /// consumer: the rest of the request phase and the later phases use the
    /// consumer's config, and a plugin attached to both the route and the
    /// consumer runs once per phase (with the consumer's config), as in Kong.
    func testConsumerPluginsRunAfterAuthentication() throws {
        try folder.write("auth", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 1000, VERSION = "1" }
        function P:request(conf, ctx)
          local user = weir.request.get_header("x-user")
          if user then weir.client.authenticate(user) end
        end
        return P
        """)
        try folder.write("tag", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 10, VERSION = "1" }
        function P:request(conf, ctx)
          ctx.tag_runs = (ctx.tag_runs or 0) + 1
          weir.response.set_header("x-tag", conf.tag)
          weir.response.set_header("x-tag-runs", ctx.tag_runs)
        end
        function P:response(conf, ctx) weir.response.set_header("x-tag-response", conf.tag) end
        return P
        """, schema: "return { fields = { tag = { type = \"string\", required = true, description = \"tag\" } } }")
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("auth")]
            $0.routes[0].plugins = [pluginRef("tag", .map(["tag": .string("route")]))]
            var alice = ConsumerConfig()
            alice.name = "alice"
            alice.plugins = [pluginRef("tag", .map(["tag": .string("alice")]))]
            var bob = ConsumerConfig()
            bob.name = "bob"
            $0.consumers = [alice, bob]
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let anonymous = try client.request("GET", "/a")
        XCTAssertEqual(anonymous.header("x-tag"), "route")
        XCTAssertEqual(anonymous.header("x-tag-runs"), "1")
        XCTAssertEqual(anonymous.header("x-tag-response"), "route")
        let alice = try client.request("GET", "/a", headers: [("x-user", "alice")])
        XCTAssertEqual(alice.header("x-tag"), "alice")
        XCTAssertEqual(alice.header("x-tag-runs"), "1", "route + consumer attachment: the request phase runs once")
        XCTAssertEqual(alice.header("x-tag-response"), "alice")
        let bob = try client.request("GET", "/a", headers: [("x-user", "bob")])
        XCTAssertEqual(bob.header("x-tag"), "route")
        XCTAssertEqual(bob.header("x-tag-runs"), "1")
        XCTAssertEqual(bob.header("x-tag-response"), "route")
    }
}

extension PluginProxyTests {
    /// weir.upstream.set_timeouts (read) and set_retries apply to this request only.
    func testPerRequestTimeoutsAndRetries() throws {
        try folder.write("patience", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_header("x-impatient") then weir.upstream.set_timeouts(nil, nil, 0.1) end
          if weir.request.get_header("x-no-retry") then weir.upstream.set_retries(0) end
        end
        return P
        """)
        let refused = HostPort(host: "127.0.0.1", port: try refusingPort())
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("patience")]
            var flaky = UpstreamConfig()
            flaky.name = "flaky"
            flaky.targets = [TargetConfig(address: refused), TargetConfig(address: self.upstream.address)]
            flaky.retries = 1
            flaky.balancer = .roundRobin
            $0.upstreams.append(flaky)
            var route = RouteConfig()
            route.name = "flaky"
            route.upstream = "flaky"
            route.match.paths = [PathPattern.prefix("/flaky")]
            $0.routes.insert(route, at: 0)
        }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)   // one balancer: a fixed order
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/slow/400").status, 200, "upstream read timeout is 5 s")
        let impatient = try client.request("GET", "/slow/400", headers: [("x-impatient", "1")])
        XCTAssertEqual(impatient.status, 504)
        // Round robin over [refused, ok]: with a retry every request succeeds;
        // without, one of two consecutive requests meets the refused target.
        XCTAssertEqual(try client.request("GET", "/flaky/1").status, 200)
        XCTAssertEqual(try client.request("GET", "/flaky/2").status, 200)
        let statuses = try (0..<2).map { _ in try proxy.connect().request("GET", "/flaky/x", headers: [("x-no-retry", "1")]).status }
        XCTAssertTrue(statuses.contains(502), "\(statuses)")
    }
}

extension PluginProxyTests {
    /// A log phase that waits still reads the request afterwards (the
    /// handler has moved on to the next request by then).
    func testLogPhaseReadsTheRequestAfterWaiting() throws {
        try folder.write("late", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx) end
        function P:log(conf, ctx)
          weir.sleep(0.05)
          weir.http.request("http://127.0.0.1:\(upstream.port)/late?path=" .. weir.request.get_path()
            .. "&status=" .. tostring(weir.response.get_status()) .. "&h=" .. (weir.request.get_header("x-h") or ""), { timeout = 2 })
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("late")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/first", headers: [("x-h", "1")]).status, 200)
        XCTAssertEqual(try client.request("GET", "/second", headers: [("x-h", "2")]).status, 200)
        XCTAssertTrue(waitUntil { self.upstream.requests.contains { $0.uri == "/late?path=/first&status=200&h=1" } },
                      "\(upstream.requests.map(\.uri))")
        XCTAssertTrue(waitUntil { self.upstream.requests.contains { $0.uri == "/late?path=/second&status=200&h=2" } })
    }
}

extension PluginProxyTests {
    /// weir.upstream.set_target sends the request to that configured target,
    /// bypassing the balancer; any other address is refused to the plugin
    /// (nil, err) and the balancer decides.
    func testSetTargetPicksAConfiguredTarget() throws {
        let other = try TestUpstream(name: "other", group: group)
        defer { other.stop() }
        try folder.write("pin", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          local port = weir.request.get_header("x-port")
          if port then
            local ok, err = weir.upstream.set_target("127.0.0.1", tonumber(port))
            if not ok then weir.response.set_header("x-refused", err) end
          end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address, other.address]) { $0.plugins = [pluginRef("pin")] }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<4 {
            XCTAssertEqual(try client.request("GET", "/", headers: [("x-port", String(other.port))]).bodyText, "ok from other")
        }
        for _ in 0..<4 {
            XCTAssertEqual(try client.request("GET", "/", headers: [("x-port", String(upstream.port))]).bodyText, "ok from upstream")
        }
        // Not a configured target (a live server, even): refused to the plugin, and the
        // balancer decides (round robin: both configured targets answer, the stranger never).
        let stranger = try TestUpstream(name: "stranger", group: group)
        defer { stranger.stop() }
        let answers = try (0..<4).map { _ in try client.request("GET", "/", headers: [("x-port", String(stranger.port))]) }
        XCTAssertEqual(Set(answers.map(\.bodyText)), ["ok from upstream", "ok from other"])
        XCTAssertEqual(Set(answers.map { $0.header("x-refused") }), ["127.0.0.1:\(stranger.port) is not a target of any configured upstream"])
        XCTAssertEqual(stranger.requests.count, 0)
    }
}

extension PluginProxyTests {
    /// A response phase and a body filter that both wait (weir.sleep) while
    /// the upstream keeps sending a large body: what arrives meanwhile is
    /// held, then relayed whole and in order after each phase ends.
    func testWaitingResponsePhaseAndBodyFilterHoldThenRelayTheBody() throws {
        try folder.write("slowresp", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:response(conf, ctx)
          weir.sleep(0.03)
          weir.response.set_header("x-waited", "yes")
        end
        function P:body_filter(conf, ctx)
          if not ctx.filtered then weir.sleep(0.03) end
          ctx.filtered = (ctx.filtered or 0) + #weir.response.get_chunk()
          if weir.response.is_last_chunk() then
            weir.response.set_chunk(weir.response.get_chunk() .. "|" .. ctx.filtered)
          end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("slowresp")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<2 {
            let response = try client.request("GET", "/big/300000")
            XCTAssertEqual(response.status, 200)
            XCTAssertEqual(response.header("x-waited"), "yes")
            XCTAssertEqual(response.bodyText.hasSuffix("|300000"), true, "every upstream byte passed the filter once")
            XCTAssertEqual(response.body.count, 300000 + "|300000".utf8.count)
        }
    }
}
