import WeirCore
import XCTest
@testable import WeirLua

/// One test per failure class: each ends the request with .failed (or a
/// clear error) and leaves the worker's Lua state usable.
final class PhaseFailureTests: XCTestCase {
    let allPhases: [PluginPhase] = [.request, .response, .log]

    /// A plugin that must keep working after the failing one.
    func addHealthy(_ h: Harness) {
        h.folder.add("healthy", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          return 200, "ok " .. weir.request.get_path()
        end }
        """)
    }

    func assertHealthy(_ h: Harness, file: StaticString = #filePath, line: UInt = #line) throws {
        let result = try h.runRequest(try h.chain("healthy"))[0]
        XCTAssertEqual(result.exitValue?.bodyString, "ok /orders", file: file, line: line)
    }

    func testErrorInEachPhaseFailsWithPluginPhaseAndTraceback() throws {
        let h = Harness()
        h.folder.add("thrower", handler: """
        local P = { PRIORITY = 10, VERSION = "1" }
        local function explode(where) error("broke in " .. where) end
        function P:request(conf, ctx) explode("request") end
        function P:response(conf, ctx) explode("response") end
        function P:log(conf, ctx) explode("log") end
        return P
        """)
        addHealthy(h)
        try h.load(["thrower", "healthy"])
        let chain = try h.chain("thrower")
        let results = try h.runRequest(chain, phases: allPhases)
        for (phase, result) in zip(allPhases, results) {
            guard let failure = result.failure else { XCTFail("\(phase): expected failure, got \(result)"); continue }
            XCTAssertEqual(failure.plugin, "thrower")
            XCTAssertEqual(failure.phase, phase)
            XCTAssertTrue(failure.message.hasSuffix("thrower/handler.lua:2: broke in \(phase.rawValue)"), failure.message)
            XCTAssertTrue(failure.traceback?.contains("explode") ?? false, failure.traceback ?? "no traceback")
        }
        try assertHealthy(h)
    }

    func testErrorObjectThatIsNotAString() throws {
        let h = Harness()
        h.folder.add("tablethrow", handler: "return { PRIORITY = 1, VERSION = '1', request = function() error({ code = 1 }) end }")
        try h.load(["tablethrow"])
        let failure = try h.runRequest(try h.chain("tablethrow"))[0].failure
        XCTAssertEqual(failure?.message, "(error object is a table value)")
    }

    func testErrorInsideSDKCallbackPointsAtThePluginLine() throws {
        let h = Harness()
        h.folder.add("badarg", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          local v = weir.request.get_header(42)
        end }
        """)
        addHealthy(h)
        try h.load(["badarg", "healthy"])
        let failure = try h.runRequest(try h.chain("badarg"))[0].failure
        XCTAssertTrue(failure?.message.hasSuffix("badarg/handler.lua:2: bad argument #1 to 'weir.request.get_header' (string expected, got number)") ?? false,
                      failure?.message ?? "no failure")
        try assertHealthy(h)
    }

    func testErrorRaisedByNativeItself() throws {
        // A native reached through a stored function after the request ended
        // reports a clear error instead of touching a dead request.
        let h = Harness()
        h.folder.add("stash", handler: """
        local saved
        return { PRIORITY = 1, VERSION = "1", request = function()
          if saved then
            local ok, err = pcall(saved)
            return 200, tostring(ok) .. " " .. tostring(err)
          end
          saved = function() return weir.ctx end
        end, log = function() end }
        """)
        try h.load(["stash"])
        let chain = try h.chain("stash")
        XCTAssertEqual(try h.runRequest(chain)[0], .continue)
        // Second request: `saved` runs inside a phase again, so it simply sees that request.
        XCTAssertEqual(try h.runRequest(chain)[0].exitValue?.bodyString?.hasPrefix("true table:"), true)
    }

    func testWrongPhaseCallRaisesClearError() throws {
        let h = Harness()
        h.folder.add("latexit", handler: """
        return { PRIORITY = 1, VERSION = "1",
          log = function() weir.response.exit(403, "no") end,
          response = function() weir.upstream.request.set_header("x-late", "1") end }
        """)
        try h.load(["latexit"])
        let results = try h.runRequest(try h.chain("latexit"), phases: [.response, .log])
        XCTAssertTrue(results[0].failure?.message.hasSuffix("latexit/handler.lua:3: weir.upstream.request.set_header is not available in the response phase") ?? false, "\(results[0])")
        XCTAssertTrue(results[1].failure?.message.hasSuffix("latexit/handler.lua:2: weir.response.exit is not available in the log phase") ?? false, "\(results[1])")
    }

    /// The hot SDK functions are their natives (no Lua wrapper): outside
    /// their phases the native's Lua fallback raises the same message at the
    /// plugin's line, in a phase, at load time, and from a pcall.
    func testDirectNativesOutsideTheirPhases() throws {
        let h = Harness()
        h.folder.add("late", handler: """
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        return { PRIORITY = 1, VERSION = "1",
          log = function()
            local out = {
              msg(function() weir.upstream.request.clear_header("x-a") end),
              msg(function() weir.response.set_headers("x-a", "1") end),
              msg(function() weir.response.set_header("x-a", "1") end),
              msg(function() weir.client.authenticate("alice") end),
              msg(function() weir.client.identify("alice", "key-auth") end),
              msg(function() weir.client.identify_credential("key-auth", "key", "k") end),
              msg(function() weir.client.identify_header_credential("key-auth", "key", "apikey", true) end),
            }
            assert(weir.request.get_header("x-not-sent") == nil)   -- allowed in the log phase
            error(table.concat(out, "|"))
          end,
          response = function() weir.upstream.request.set_header("x-late", 1.5) end }
        """)
        try h.load(["late"])
        let results = try h.runRequest(try h.chain("late"), phases: [.response, .log])
        XCTAssertTrue(results[0].failure?.message.hasSuffix("late/handler.lua:16: weir.upstream.request.set_header is not available in the response phase") ?? false, "\(results[0])")
        let messages = (results[1].failure?.message ?? "").split(separator: "|").map(String.init)
        let functions = ["weir.upstream.request.clear_header", "weir.response.set_headers", "weir.response.set_header",
                         "weir.client.authenticate", "weir.client.identify", "weir.client.identify_credential",
                         "weir.client.identify_header_credential"]
        XCTAssertEqual(messages.count, functions.count, "\(results[1])")
        // Each at its own line (5-11), where the plugin called it.
        for (k, function) in functions.enumerated() where k < messages.count {
            XCTAssertTrue(messages[k].hasSuffix("late/handler.lua:\(5 + k): \(function) is not available in the log phase"), messages[k])
        }

        let folder = PluginFolder()
        let dir = folder.add("eager", handler: "weir.request.get_header('host')\nreturn { PRIORITY = 1, VERSION = '1', log = function() end }")
        XCTAssertThrowsError(try PluginLibrary(names: ["eager"], searchPaths: [folder.path], sdk: Harness.sdk)) { error in
            XCTAssertEqual("\(error)", dir + "/handler.lua:1: weir.request.get_header is not available in the init phase")
        }
        // The request accessors and find_credential that are natives too.
        for (k, call) in ["weir.request.get_route()", "weir.client.get_consumer()", "weir.request.get_raw_query()",
                          "weir.request.get_route_and_consumer()",
                          "weir.client.find_credential('key-auth', 'key', 'k')"].enumerated() {
            let dir = folder.add("eager\(k)", handler: "local v = \(call)\nreturn { PRIORITY = 1, VERSION = '1', log = function() end }")
            let function = String(call.prefix { $0 != "(" })
            XCTAssertThrowsError(try PluginLibrary(names: ["eager\(k)"], searchPaths: [folder.path], sdk: Harness.sdk)) { error in
                XCTAssertEqual("\(error)", dir + "/handler.lua:1: \(function) is not available in the init phase")
            }
        }
    }

    func testHandleUsedAfterItsPhase() throws {
        let h = Harness()
        h.folder.add("keeper", handler: """
        local kept
        return { PRIORITY = 1, VERSION = "1",
          connection = function(self, conf, conn)
            kept = conn
            conn.data.peer = conn:get_ip()
          end,
          request = function()
            return 200, weir.conn.peer .. " then " .. kept:get_ip()
          end }
        """)
        try h.load(["keeper"])
        let chain = try h.chain("keeper")
        let connection = try h.onLoop { h.runtime.beginConnection(TestConnection()) }
        XCTAssertEqual(try h.loop.flatSubmit { connection.runConnectionPhase(chain: chain) }.wait(), .continue)
        let scope = try h.onLoop { h.runtime.beginRequest(h.newRequest(), connection: connection) }
        let result = try h.run(scope, .request, chain)
        XCTAssertTrue(result.failure?.message.hasSuffix("keeper/handler.lua:8: conn:get_ip: conn handle used after its connection phase ended") ?? false, "\(result)")
        try h.onLoop { scope.finish(); connection.close() }
    }

    func testErrorInConnectionPhase() throws {
        let h = Harness()
        h.folder.add("connboom", handler: "return { PRIORITY = 1, VERSION = '1', connection = function(s, c, conn) local x = conn.data.missing.field end }")
        try h.load(["connboom"])
        let chain = try h.chain("connboom")
        let connection = try h.onLoop { h.runtime.beginConnection(TestConnection()) }
        let failure = try h.loop.flatSubmit { connection.runConnectionPhase(chain: chain) }.wait().failure
        XCTAssertEqual(failure?.phase, .connection)
        XCTAssertEqual(failure?.plugin, "connboom")
        XCTAssertTrue(failure?.message.contains("connboom/handler.lua:1: attempt to index a nil value (field 'missing')") ?? false, "\(String(describing: failure))")
        try h.onLoop { connection.close() }
    }

    func testConnectionRejection() throws {
        let h = Harness()
        h.folder.add("gate", handler: """
        return { PRIORITY = 1, VERSION = "1", connection = function(self, conf, conn)
          if conn:get_sni() ~= "allowed.example" then conn:reject("bad sni " .. conn:get_sni()) end
          error("not reached")
        end }
        """)
        try h.load(["gate"])
        let chain = try h.chain("gate")
        let connection = try h.onLoop { h.runtime.beginConnection(TestConnection()) }
        let result = try h.loop.flatSubmit { connection.runConnectionPhase(chain: chain) }.wait()
        XCTAssertEqual(result.exitValue?.status, 403)
        XCTAssertEqual(result.exitValue?.bodyString, "bad sni api.example.com")
        try h.onLoop { connection.close() }
    }

    func testInfiniteLoopHitsBudgetAndStateStaysUsable() throws {
        let h = Harness()
        h.options.instructionBudget = 200_000
        h.folder.add("spin", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          while true do pcall(function() while true do end end) end
        end }
        """)
        addHealthy(h)
        try h.load(["spin", "healthy"])
        for _ in 0..<3 {
            let failure = try h.runRequest(try h.chain("spin"))[0].failure
            XCTAssertEqual(failure?.plugin, "spin")
            XCTAssertTrue(failure?.message.contains("instruction budget exceeded (200000 instructions)") ?? false, "\(String(describing: failure))")
            try assertHealthy(h)
        }
    }

    func testMemoryBombHitsCapAndStateStaysUsable() throws {
        let h = Harness()
        h.options.memoryLimit = 8 << 20
        h.folder.add("bomb", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          local t = {}
          for i = 1, 1e9 do t[i] = string.rep("x", 64) .. i end
        end }
        """)
        addHealthy(h)
        try h.load(["bomb", "healthy"])
        for _ in 0..<3 {
            let failure = try h.runRequest(try h.chain("bomb"))[0].failure
            XCTAssertTrue(failure?.message.contains("not enough memory") ?? false, "\(String(describing: failure))")
            try assertHealthy(h)
        }
        let used = try h.onLoop { () -> Int in h.runtime.state.collectGarbage(); return h.runtime.state.bytesUsed }
        XCTAssertLessThan(used, 2 << 20)
    }

    func testMemoryCapReachedInsideNativeIsRaisedAfterSwiftReturns() throws {
        // get_headers builds a table in Swift; when that crosses the cap the
        // error is raised by the C trampoline once Swift has returned.
        let h = Harness()
        h.options.memoryLimit = 3 << 20
        h.folder.add("hog", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          local keep = {}
          local filler = {}
          -- fill close to the cap, then keep asking for header tables
          local ok = pcall(function() for i = 1, 1e9 do filler[i] = string.rep("y", 200) .. i end end)
          for i = 1, 1e6 do keep[i] = weir.request.get_headers() end
        end }
        """)
        addHealthy(h)
        try h.load(["hog", "healthy"])
        let req = h.newRequest()
        req.headers = (0..<200).map { ("x-h\($0)", String(repeating: "v", count: 100)) }
        let failure = try h.runRequest(try h.chain("hog"), request: req)[0].failure
        XCTAssertTrue(failure?.message.contains("not enough memory") ?? false, "\(String(describing: failure))")
        try assertHealthy(h)
    }

    func testMemoryCapReachedInsideAHotNativeIsRaisedAfterSwiftReturns() throws {
        // get_header is a hot native (its own C entry, no dispatcher): a
        // long value is a new Lua string per call. The table that keeps them
        // is grown before the filler, so the only allocations left in the
        // loop are the native's, and the cap is crossed inside it: the C
        // entry raises the overdraft (its message names the cap) once Swift
        // has returned.
        let h = Harness()
        h.options.memoryLimit = 8 << 20
        h.folder.add("hog", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          local keep = {}
          for i = 1, 100000 do keep[i] = false end
          local filler = {}
          pcall(function() for i = 1, 1e9 do filler[i] = string.rep("y", 200) .. i end end)
          -- Some room again (freed by the emergency collection of the
          -- next allocation that fails in Lua: the call's stack may grow),
          -- not enough for the strings the loop keeps.
          for i = 1, 2000 do filler[i] = false end
          for i = 1, 100000 do keep[i] = weir.request.get_header("x-big") end
        end }
        """)
        addHealthy(h)
        try h.load(["hog", "healthy"])
        let req = h.newRequest()
        req.headers = [("x-big", String(repeating: "v", count: 1000))]
        let failure = try h.runRequest(try h.chain("hog"), request: req)[0].failure
        XCTAssertTrue(failure?.message.contains("memory cap of") ?? false, "\(String(describing: failure))")
        try assertHealthy(h)
    }

    func testPlainYieldFromPhaseIsAnError() throws {
        let h = Harness()
        h.folder.add("yielder", handler: "return { PRIORITY = 1, VERSION = '1', request = function() coroutine.yield(1) end }")
        addHealthy(h)
        try h.load(["yielder", "healthy"])
        let failure = try h.runRequest(try h.chain("yielder"))[0].failure
        XCTAssertTrue(failure?.message.hasPrefix("attempt to yield from a plugin phase function") ?? false, "\(String(describing: failure))")
        try assertHealthy(h)
    }

    func testAsyncCallFromNestedCoroutineIsAClearError() throws {
        let h = Harness()
        h.folder.add("nested", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          local co = coroutine.create(function() weir.sleep(0.001) return "slept" end)
          local ok, err = coroutine.resume(co)
          -- the plugin sees the error as a normal coroutine failure
          return 200, tostring(ok) .. ": " .. tostring(err)
        end }
        """)
        addHealthy(h)
        try h.load(["nested", "healthy"])
        let body = try h.runRequest(try h.chain("nested"))[0].exitValue?.bodyString ?? ""
        XCTAssertTrue(body.hasPrefix("false: "), body)
        XCTAssertTrue(body.hasSuffix("weir.sleep cannot be called from a coroutine created by the plugin; call it from the phase function itself"), body)
        try assertHealthy(h)
    }

    func testAsyncCallFromWrappedCoroutineErrorPropagates() throws {
        let h = Harness()
        h.folder.add("wrapped", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          coroutine.wrap(function() weir.sleep(0.001) end)()
        end }
        """)
        try h.load(["wrapped"])
        let failure = try h.runRequest(try h.chain("wrapped"))[0].failure
        XCTAssertTrue(failure?.message.contains("weir.sleep cannot be called from a coroutine created by the plugin") ?? false, "\(String(describing: failure))")
    }

    func testExitFromNestedCoroutineStopsChainAfterPlugin() throws {
        let h = Harness()
        h.folder.add("nestedexit", handler: """
        return { PRIORITY = 2, VERSION = "1", request = function()
          coroutine.wrap(function() weir.response.exit(401, { message = "nope" }) end)()
          weir.ctx.after = true
        end }
        """)
        addHealthy(h)
        try h.load(["nestedexit", "healthy"])
        let exit = try h.runRequest(try h.chain("nestedexit", "healthy"))[0].exitValue
        XCTAssertEqual(exit?.status, 401)
        XCTAssertEqual(exit?.bodyString, #"{"message":"nope"}"#)
        XCTAssertEqual(exit?.headers, [HeaderField("content-type", "application/json")])
    }

    func testInvalidReturnedStatus() throws {
        let h = Harness()
        h.folder.add("badstatus", handler: "return { PRIORITY = 1, VERSION = '1', request = function() return 42, 'x' end }")
        try h.load(["badstatus"])
        let failure = try h.runRequest(try h.chain("badstatus"))[0].failure
        XCTAssertEqual(failure?.message, "plugin return value: status must be an integer 100-599, got 42")
    }
}
