// weir.ctx of a chain with only a request phase lives on the chain
// runner's stack (PluginRequest.pushRunnerCtx, weir_chain_push_ctx), and
// the runner passes nil for a self or conf a phase function never reads
// (paramuse.c). Through a running gateway: every way a plugin can reach
// weir.ctx (its parameter, a closure, a coroutine it made, a `load`ed
// chunk, pcall, across a wait) finds the one table of its request, a
// later plugin's ctx parameter is that table, and no request sees
// another's. weir.client.identify (an in-place pass over the client's
// lines) called twice in one request leaves one line of each name.

import Foundation
import WeirCore
import WeirProxy
import XCTest

final class PluginCtxReachTests: PluginFolderTestCase {
    func testEveryWayToWeirCtxFindsTheRequestsOneTable() throws {
        try folder.write("first", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 300, VERSION = "1" }
        function P:request(conf, ctx)
          -- A table seen by an earlier request would already have a count.
          ctx.count = (ctx.count or 0) + 1
          ctx.mark = conf.mark
        end
        return P
        """, schema: #"return { fields = { mark = { type = "string", required = true, description = "mark" } } }"#)
        try folder.write("reach", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 200, VERSION = "1" }
        local function by_closure() return weir.ctx end
        function P.request()
          local a = by_closure()
          local b = coroutine.wrap(function() return weir.ctx end)()
          local c = load("return weir.ctx", "=reach", "t", { weir = weir })()
          local ok, d = pcall(function() return weir.ctx end)
          weir.sleep(0)
          local e = weir.ctx
          local same = ok and a == b and b == c and c == d and d == e
          weir.upstream.request.set_header("x-reach", (same and "same" or "different") .. ":" .. tostring(e.mark) .. ":" .. tostring(e.count))
          e.count = e.count + 100
        end
        return P
        """)
        try folder.write("last", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          weir.upstream.request.set_header("x-last", tostring(ctx.count) .. ":" .. tostring(ctx.mark))
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("first", .map(["mark": .string("m1")])), pluginRef("reach"), pluginRef("last")]
        }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let clients = try (0..<2).map { _ in try proxy.connect() }
        for n in 0..<4 {
            for client in clients { XCTAssertEqual(try client.request("GET", "/r\(n)").status, 200) }
        }
        XCTAssertEqual(upstream.requests.count, 8)
        for seen in upstream.requests {
            XCTAssertEqual(seen.header("x-reach"), "same:m1:1", seen.uri)
            XCTAssertEqual(seen.header("x-last"), "101:m1", seen.uri)
        }
    }

    func testIdentifyTwiceLeavesOneLineOfEachName() throws {
        try folder.write("twice", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          local path = weir.request.get_path()
          if path == "/anonymous-then-named" then
            weir.client.identify("anon", nil, true)
            weir.client.identify("bob", "key")
          elseif path == "/named-then-anonymous" then
            weir.client.identify("bob", "key")
            weir.client.identify("anon", nil, true)
          else
            weir.upstream.request.set_header("x-consumer-name", "set-by-plugin")
            weir.client.identify("alice")
            weir.client.identify("bob")
          end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { config in
            config.plugins = [pluginRef("twice")]
            config.consumers = ["alice", "bob", "anon"].map { name in
                var consumer = ConsumerConfig()
                consumer.name = name
                return consumer
            }
        }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let forged = [("X-Consumer-Name", "mallory"), ("x-anonymous-consumer", "true"), ("X-CONSUMER-NAME", "eve")]
        for path in ["/anonymous-then-named", "/named-then-anonymous", "/set-then-twice"] {
            XCTAssertEqual(try client.request("GET", path, headers: forged).status, 200)
        }
        let seen = upstream.requests
        XCTAssertEqual(seen.count, 3)
        guard seen.count == 3 else { return }
        XCTAssertEqual(seen[0].headerValues("x-consumer-name"), ["bob"])
        XCTAssertEqual(seen[0].headerValues("x-anonymous-consumer"), [])
        XCTAssertEqual(seen[1].headerValues("x-consumer-name"), ["anon"])
        XCTAssertEqual(seen[1].headerValues("x-anonymous-consumer"), ["true"])
        XCTAssertEqual(seen[2].headerValues("x-consumer-name"), ["bob"])
        XCTAssertEqual(seen[2].headerValues("x-anonymous-consumer"), [])
    }
}
