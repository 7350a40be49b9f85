import CLua
import CLuaShims
import NIOCore
import WeirCore
import XCTest
@testable import WeirLua

/// The runaway-script watchdog (CLuaShims/watchdog.c): Lua runs with no
/// hook; a call that outlives a watchdog tick gets the count hook, and the
/// instruction budget stops it. These cover what the hook-free fast path
/// could miss: coroutines a script makes itself, scripts that keep
/// re-entering Lua, and two event loops spinning at once.
final class WatchdogTests: XCTestCase {
    private func assertStopped(_ script: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let state = try LuaState(hookInterval: 1000)
        state.setBudget(100_000)
        try state.load(script, chunkName: "runaway.lua")
        XCTAssertThrowsError(try state.pcall(nargs: 0, nresults: 0), file: file, line: line) { error in
            XCTAssertTrue((error as? LuaError)?.message.contains("instruction budget exceeded") ?? false, "\(error)",
                          file: file, line: line)
        }
        XCTAssertTrue(state.budgetExhausted, file: file, line: line)
        // The thread is back on the hook-free path once the call is over.
        XCTAssertNil(lua_gethook(state.main), file: file, line: line)
        state.setBudget(0)
        try state.load("local s = 0 for i = 1, 100000 do s = s + i end return s", chunkName: "after.lua")
        try state.pcall(nargs: 0, nresults: 1)
        XCTAssertEqual(lua_tointegerx(state.main, -1, nil), 5_000_050_000, file: file, line: line)
        state.pop()
    }

    func testLoopInsideACoroutineTheScriptCreatedIsStopped() throws {
        try assertStopped("""
        local co = coroutine.create(function() while true do end end)
        while true do coroutine.resume(co) end
        """)
    }

    func testLoopInsideCoroutineWrapIsStoppedEvenUnderPcall() throws {
        try assertStopped("""
        while true do pcall(coroutine.wrap(function() while true do end end)) end
        """)
    }

    func testScriptThatKeepsResumingACoroutineStillLooksLikeOneLongCall() throws {
        // Every resume enters and leaves Lua; the watchdog must still see
        // one call that never ends.
        try assertStopped("""
        local step = coroutine.wrap(function() while true do coroutine.yield() end end)
        while true do step() end
        """)
    }

    func testCoroutinesBehaveAsBeforeUnderTheTrackingWrappers() throws {
        let state = try LuaState(hookInterval: 1000)
        state.setBudget(10_000_000)
        try state.load("""
        local gen = coroutine.wrap(function(a) local b = coroutine.yield(a + 1); return b * 2 end)
        local first, second = gen(1), gen(10)
        local co = coroutine.create(function(x) coroutine.yield(x, "y"); error("inner failure") end)
        local ok1, v1, v2 = coroutine.resume(co, 7)
        local ok2, err = coroutine.resume(co)
        local ok3, err3 = pcall(coroutine.wrap(function() error({ code = 42 }) end))
        return table.concat({ first, second, tostring(ok1), v1, v2, tostring(ok2), tostring(err:match("inner failure") ~= nil),
                              tostring(ok3), err3.code, coroutine.status(co) }, ",")
        """, chunkName: "co.lua")
        try state.pcall(nargs: 0, nresults: 1)
        XCTAssertEqual(LuaState.string(at: -1, on: state.main), "2,20,true,7,y,false,true,false,42,dead")
        state.pop()
    }

    /// Two event loops, each spinning in Lua until the other one shows up:
    /// possible only if neither loop waits for the other (nor for a shared
    /// watchdog) while it runs a long call.
    func testTwoEventLoopsSpinInLuaAtTheSameTime() throws {
        let shared = SharedDictionaries(capacities: ["counters": 100])
        let spinner = """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          local me, other = weir.request.get_header("x-me"), weir.request.get_header("x-other")
          local d = weir.shared.counters
          d:set(me, true)
          local spins = 0
          while not d:get(other) do spins = spins + 1 end
          return 200, me .. " saw " .. other
        end }
        """
        let harnesses = [Harness(), Harness()]
        for h in harnesses {
            h.options.shared = shared
            h.options.instructionBudget = 500_000_000   // only a deadlock would spend it
            h.folder.add("spinner", handler: spinner)
            try h.load(["spinner"])
        }
        var futures: [EventLoopFuture<PhaseResult>] = []
        for (i, h) in harnesses.enumerated() {
            let chain = try h.chain("spinner")
            let req = h.newRequest()
            req.headers = [("x-me", "loop\(i)"), ("x-other", "loop\(1 - i)")]
            futures.append(h.loop.flatSubmit {
                let scope = h.runtime.beginRequest(req)
                return scope.run(.request, chain: chain).always { _ in scope.finish() }
            })
        }
        // The harnesses own the event loops: kept to the end (an optimised
        // build may free them after their last use above, shutting the loops
        // down under the waits).
        try withExtendedLifetime(harnesses) {
            XCTAssertEqual(try futures[0].wait().exitValue?.bodyString, "loop0 saw loop1")
            XCTAssertEqual(try futures[1].wait().exitValue?.bodyString, "loop1 saw loop0")
        }
    }

    /// Runaway requests on two event loops at once are each stopped by their
    /// own budget, and both loops serve the next request.
    func testRunawaysOnTwoEventLoopsAreEachStopped() throws {
        let harnesses = [Harness(), Harness()]
        for h in harnesses {
            h.options.instructionBudget = 300_000
            h.folder.add("spin", handler: """
            return { PRIORITY = 1, VERSION = "1", request = function()
              if weir.request.get_path() == "/spin" then while true do end end
              return 200, "fine"
            end }
            """)
            try h.load(["spin"])
        }
        var futures: [EventLoopFuture<PhaseResult>] = []
        for h in harnesses {
            let chain = try h.chain("spin")
            let req = h.newRequest()
            req.path = "/spin"
            futures.append(h.loop.flatSubmit {
                let scope = h.runtime.beginRequest(req)
                return scope.run(.request, chain: chain).always { _ in scope.finish() }
            })
        }
        for (h, future) in zip(harnesses, futures) {
            let failure = try future.wait().failure
            XCTAssertTrue(failure?.message.contains("instruction budget exceeded (300000 instructions)") ?? false,
                          "\(String(describing: failure))")
            XCTAssertEqual(try h.runRequest(try h.chain("spin"))[0].exitValue?.bodyString, "fine")
        }
    }

    /// A call that yields (weir.sleep) and then spins is stopped in the
    /// stretch after the yield, and the budget state does not leak into the
    /// next request.
    func testRunawayAfterAYieldIsStopped() throws {
        let h = Harness()
        h.options.instructionBudget = 300_000
        h.folder.add("nap", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          weir.sleep(0.001)
          if weir.request.get_path() == "/spin" then while true do end end
          return 200, "rested"
        end }
        """)
        try h.load(["nap"])
        let spin = h.newRequest()
        spin.path = "/spin"
        let failure = try h.runRequest(try h.chain("nap"), request: spin)[0].failure
        XCTAssertTrue(failure?.message.contains("instruction budget exceeded") ?? false, "\(String(describing: failure))")
        XCTAssertEqual(try h.runRequest(try h.chain("nap"))[0].exitValue?.bodyString, "rested")
    }

    /// With no thread inside Lua the watchdog parks (no ticks waking a core
    /// every 10 ms); the next entry wakes it, and a runaway script is still
    /// stopped. Waits poll with a long timeout (sequencing only).
    func testIdleWatchdogParksAndTheNextEntryWakesIt() throws {
        let state = try LuaState(hookInterval: 1000)
        try state.load("return 1", chunkName: "short.lua")
        try state.pcall(nargs: 0, nresults: 1)
        state.pop()
        guard weir_watchdog_can_park() != 0 else {
            // No membarrier(2) here: the watchdog keeps ticking while idle.
            let ticks = weir_watchdog_ticks()
            XCTAssertTrue(poll { weir_watchdog_ticks() > ticks + 2 }, "ticks on without parking")
            XCTAssertEqual(weir_watchdog_parked(), 0)
            return try assertStopped("while true do end")
        }
        for round in 1...5 {
            XCTAssertTrue(poll { weir_watchdog_parked() != 0 }, "round \(round): parks once no thread is in Lua")
            let parks = weir_watchdog_parks(), ticks = weir_watchdog_ticks()
            // Bounded (seconds of Lua): a watchdog that failed to wake would
            // fail the test instead of hanging it.
            try assertStopped("local n = 0 for i = 1, 300000000 do n = n + 1 end")
            XCTAssertGreaterThan(weir_watchdog_ticks(), ticks, "round \(round): the entry woke it to catch the runaway")
            XCTAssertTrue(poll { weir_watchdog_parks() > parks }, "round \(round): parks again once idle")
        }
    }

    private func poll(_ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if condition() { return true }
            usleep(1000)
        }
        return false
    }
}
