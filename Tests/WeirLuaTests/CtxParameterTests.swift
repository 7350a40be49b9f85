import CLua
import CLuaShims
import XCTest
@testable import WeirLua

/// A phase function that declares `ctx` but never reads it is called
/// without it (CLuaShims/paramuse.c reads its bytecode once, at load), so a
/// request whose plugins leave ctx alone makes no table. Every way of
/// reading the parameter must still count as a read: a miss would hand the
/// plugin nil instead of the request's table.
final class CtxParameterTests: XCTestCase {
    /// What weir_function_reads_param says about parameter 2 of `function(self, conf, ctx) <body> end`.
    private func readsCtx(_ body: String, file: StaticString = #filePath, line: UInt = #line) throws -> Bool {
        let state = try LuaState()
        try state.load("return function(self, conf, ctx)\n\(body)\nend", chunkName: "=t")
        try state.pcall(nargs: 0, nresults: 1)
        defer { state.pop() }
        return weir_function_reads_param(state.main, -1, 2) != 0
    }

    func testBodiesThatNeverReadCtx() throws {
        for body in [
            "",
            "local x = conf.a",
            "weir.log.info(conf.name, self.VERSION)",
            "local t = { 1, 2, conf }; return #t",
            "for i = 1, 3 do conf[i] = i end",
            "for k, v in pairs(conf) do print(k, v) end",
            "local f = function(a) return a + 1 end; return f(2)",
            "local n = 0; local f = function() n = n + 1 end; f()",
            "ctx = nil",                           // written, never read
            "if conf.x then return 403, 'no' end",
            "return conf.a .. conf.b, select('#', 1, 2)",
        ] {
            XCTAssertFalse(try readsCtx(body), body)
        }
    }

    func testEveryKindOfReadCounts() throws {
        for body in [
            "ctx.a = 1",
            "local x = ctx.a",
            "local x = ctx[conf.k]",
            "ctx[conf.k] = conf.v",
            "ctx[1] = 2",
            "local x = ctx[1]",
            "local c = ctx",
            "return ctx",
            "return 1, ctx",
            "print(ctx)",
            "print(conf, ctx)",
            "conf.f(ctx)",
            "return conf.f(ctx)",
            "ctx:method()",
            "local n = #ctx",
            "if ctx then return end",
            "if ctx == conf then return end",
            "if ctx == 1 then return end",
            "if ctx < 2 then return end",
            "local s = 'a' .. ctx",
            "local s = ctx .. 'a'",
            "local t = { ctx }",
            "local t = { x = ctx }",
            "conf.x = ctx",
            "saved = ctx",
            "local n = ctx + 1",
            "local n = 1 + ctx",
            "local n = -ctx",
            "local b = not ctx",
            "local x = ctx or {}",
            "for k, v in pairs(ctx) do end",
            "for k, v in next, ctx do end",
            "for i = ctx, 3 do end",
            "local f = function() return ctx end",
            "local f = function() ctx = 1 end",
            "local f = function() return function() return ctx.a end end",
            "local x <close> = ctx",
        ] {
            XCTAssertTrue(try readsCtx(body), body)
        }
    }

    func testCFunctionsAndNonFunctionsCountAsReading() throws {
        let state = try LuaState()
        lua_pushcclosure(state.main, weir_chain_runner, 0)
        XCTAssertNotEqual(weir_function_reads_param(state.main, -1, 2), 0)
        lua_pushinteger(state.main, 1)
        XCTAssertNotEqual(weir_function_reads_param(state.main, -1, 2), 0)
        state.pop(2)
        XCTAssertEqual(state.top, 0)
    }

    /// Through a chain: a plugin that declares ctx without reading it, then
    /// one that fills it, then one that reads it as its argument and one
    /// through weir.ctx: all see the same table.
    func testChainSharesCtxWhenSomePluginsSkipIt() throws {
        let h = Harness()
        h.folder.add("idle", handler: """
        return { PRIORITY = 4, VERSION = "1", request = function(self, conf, ctx) end }
        """)
        h.folder.add("filler", handler: """
        return { PRIORITY = 3, VERSION = "1", request = function(self, conf, ctx) ctx.trail = "a" end }
        """)
        h.folder.add("reader", handler: """
        return { PRIORITY = 2, VERSION = "1", request = function(self, conf, ctx) ctx.trail = ctx.trail .. "b" end }
        """)
        h.folder.add("sdkreader", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          weir.upstream.request.set_header("x-trail", weir.ctx.trail .. "c")
        end }
        """)
        try h.load(["idle", "filler", "reader", "sdkreader"])
        let chain = try h.chain("idle", "filler", "reader", "sdkreader")
        XCTAssertEqual(chain.byPhase[PluginPhase.request.luaID].map { $0.plugin.phaseTakesCtx[PluginPhase.request.luaID] },
                       [false, true, true, false])
        let idleOnly = try h.chain("idle")
        XCTAssertFalse(idleOnly.phaseTakesCtx[PluginPhase.request.luaID])
        let request = h.newRequest()
        let results = try h.runRequest(chain, request: request)
        guard case .continue = results[0] else { return XCTFail("\(results)") }
        XCTAssertEqual(request.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-trail=abc"])
    }

    /// A chain with only a request phase makes weir.ctx for the runner
    /// alone (anchored nowhere): it is still one table for every plugin of
    /// the phase, across a wait, through `weir.ctx` (also from a coroutine
    /// the plugin made), and a reused scope's next request starts with a
    /// fresh one.
    func testARequestOnlyChainsCtxIsOneTableForThePhaseAndFreshPerRequest() throws {
        let h = Harness()
        h.folder.add("filler", handler: """
        return { PRIORITY = 4, VERSION = "1", request = function(self, conf, ctx)
          if ctx.trail then error("ctx kept from another request: " .. ctx.trail) end
          ctx.trail = weir.request.get_id()
        end }
        """)
        h.folder.add("waiter", handler: """
        return { PRIORITY = 3, VERSION = "1", request = function(self, conf, ctx)
          weir.sleep(0.001)
          ctx.trail = ctx.trail .. "+wait"
        end }
        """)
        h.folder.add("byname", handler: """
        return { PRIORITY = 2, VERSION = "1", request = function()
          local t = coroutine.wrap(function() return weir.ctx end)()
          t.trail = t.trail .. "+name"
          if weir.ctx ~= t then error("two ctx tables") end
        end }
        """)
        h.folder.add("reader", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          weir.upstream.request.set_header("x-trail", ctx.trail .. "+param")
        end }
        """)
        try h.load(["filler", "waiter", "byname", "reader"])
        let chain = try h.chain("filler", "waiter", "byname", "reader")
        XCTAssertFalse(chain.hasPhasesAfterRequest)
        let request = h.newRequest()
        request.requestID = "req-a"
        let scope = h.begin(request)
        XCTAssertEqual(try h.run(scope, .request, chain), .continue)
        XCTAssertEqual(request.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-trail=req-a+wait+name+param"])
        try h.onLoop { scope.finish(); scope.detach() }
        let next = h.newRequest()
        next.requestID = "req-b"
        try h.onLoop { h.runtime.restartRequest(scope, next, connection: nil) }
        XCTAssertEqual(try h.run(scope, .request, chain), .continue)
        XCTAssertEqual(next.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-trail=req-b+wait+name+param"])
        try h.onLoop { scope.finish() }
    }

    /// The runner passes nil for a self or conf the phase function never
    /// reads; every function that reads one (directly, through a nested
    /// function, as vararg) still gets it.
    func testSelfAndConfArePassedToEveryFunctionThatReadsThem() throws {
        let h = Harness()
        h.folder.add("neither", handler: """
        return { PRIORITY = 5, VERSION = "1", request = function(self, conf, ctx) ctx.trail = "n" end }
        """)
        h.folder.add("selfish", handler: """
        local P = { PRIORITY = 4, VERSION = "1", tag = "s" }
        function P:request(conf, ctx) ctx.trail = ctx.trail .. self.tag end
        return P
        """, schema: "return { fields = { v = { type = 'string', default = 'x' } } }")
        h.folder.add("confy", handler: """
        return { PRIORITY = 3, VERSION = "1", request = function(self, conf, ctx)
          local get = function() return conf.v end
          ctx.trail = ctx.trail .. get()
        end }
        """, schema: "return { fields = { v = { type = 'string', default = 'c' } } }")
        h.folder.add("varargs", handler: """
        return { PRIORITY = 2, VERSION = "1", request = function(...)
          local self, conf, ctx = ...
          ctx.trail = ctx.trail .. self.VERSION .. conf.v
        end }
        """, schema: "return { fields = { v = { type = 'string', default = 'v' } } }")
        h.folder.add("writer", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          weir.upstream.request.set_header("x-trail", ctx.trail)
        end }
        """)
        try h.load(["neither", "selfish", "confy", "varargs", "writer"])
        let chain = try h.chain("neither", "selfish", "confy", "varargs", "writer")
        let request = PluginPhase.request.luaID
        // Entry i is bit i: neither (1) and writer (5) read neither; selfish (2) reads only self; confy (3) only conf.
        XCTAssertEqual(chain.phaseUnreadSelf[request], 0b10_1010)
        XCTAssertEqual(chain.phaseUnreadConf[request], 0b10_0110)
        let req = h.newRequest()
        guard case .continue = try h.runRequest(chain, request: req)[0] else { return XCTFail() }
        XCTAssertEqual(req.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-trail=nsc1v"])
    }
}
