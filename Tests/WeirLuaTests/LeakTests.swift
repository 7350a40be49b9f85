import CLuaShims
import NIOCore
import WeirCore
import XCTest
@testable import WeirLua

/// Requests that end early (error, budget, memory cap, exit, abort while
/// waiting) must release their coroutine and references: after thousands of
/// them the Lua heap is back at its baseline.
final class LeakTests: XCTestCase {
    func testThousandsOfAbortedAndFailedRequestsLeaveTheHeapFlat() throws {
        // 500 of the requests below loop until stopped; a 1 ms watchdog tick
        // stops each after ~1-2 ms instead of ~10-20 ms.
        weir_watchdog_set_tick(1_000_000)
        defer { weir_watchdog_set_tick(UInt64(WEIR_WATCHDOG_DEFAULT_TICK_NS)) }
        let h = Harness()
        h.options.instructionBudget = 50_000
        h.options.memoryLimit = 16 << 20
        h.folder.add("mixed", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf, ctx)
            ctx.payload = string.rep("p", 512)   -- per-request garbage held by weir.ctx
            local kind = weir.request.get_header("x-kind")
            if kind == "error" then error("failed on purpose")
            elseif kind == "loop" then while true do end
            elseif kind == "bomb" then local t = {} for i = 1, 1e9 do t[i] = {} end
            elseif kind == "exit" then return 403, { denied = true }
            elseif kind == "sleep" then weir.sleep(10)   -- aborted before it wakes
            elseif kind == "nested" then
              local co = coroutine.create(function() coroutine.yield(ctx) end)
              coroutine.resume(co)                        -- left suspended forever
            end
            weir.upstream.request.set_header("x-ok", "1")
          end,
          log = function(self, conf, ctx) local _ = ctx.payload end }
        """)
        try h.load(["mixed"])
        let chain = try h.chain("mixed")
        let kinds = ["ok", "error", "loop", "bomb", "exit", "sleep", "nested"]

        func runBatch(_ count: Int) throws {
            try h.onLoop {
                for i in 0..<count {
                    let req = h.newRequest()
                    req.requestID = "r\(i)"
                    req.headers.append(("x-kind", kinds[i % kinds.count]))
                    let scope = h.runtime.beginRequest(req)
                    // Suspended requests are aborted (client gone) before they wake.
                    if case .done = scope.start(.request, chain: chain) {
                        _ = scope.start(.log, chain: chain)
                    }
                    scope.finish()
                }
            }
        }
        func settledHeapKB() throws -> Int {
            try h.onLoop {
                h.runtime.dropIdleCoroutines()
                h.runtime.state.collectGarbage()
                h.runtime.state.collectGarbage()
                return h.runtime.state.gcCountKB
            }
        }

        try runBatch(kinds.count * 10)   // warm up: interned strings, table sizes, pools
        let baseline = try settledHeapKB()
        try runBatch(kinds.count * 500)  // 3,500 requests, 2,500 of them ending early
        let after = try settledHeapKB()
        XCTAssertLessThanOrEqual(after, baseline + 16, "Lua heap grew from \(baseline) KB to \(after) KB")
        print("lua heap: baseline \(baseline) KB, after 3500 mixed requests \(after) KB")
    }
}

/// A request holds a Lua thread only while one of its phases runs: hundreds
/// of requests waiting on their upstream between the request and log
/// phases share the runtime's pool instead of each keeping a thread (which
/// made a busy loop create and collect threads per request).
final class CoroutinePoolTests: XCTestCase {
    func testTheCollectorIsGenerationalAndKeepsTheHeapFlat() throws {
        let h = Harness()
        h.folder.add("ctxfill", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf, ctx) ctx.key = "req:" .. weir.request.get_header("x-n") end }
        """)
        try h.load(["ctxfill"])
        let chain = try h.chain("ctxfill")
        XCTAssertTrue(try h.onLoop { h.runtime.state.collectsGenerationally })
        // Requests whose weir.ctx and strings die young: minor collections
        // free them (the heap does not grow with requests).
        let growth = try h.heapGrowth(warmup: 2_000, count: 20_000, chain: chain) { i, result in
            XCTAssertEqual(result, .continue, "request \(i)")
        }
        XCTAssertLessThan(growth, 64 * 1024, "heap grew with requests")
        XCTAssertTrue(try h.onLoop { h.runtime.state.collectsGenerationally }, "a full collection left generational mode")
    }

    func testRequestsBetweenPhasesHoldNoThread() throws {
        let h = Harness()
        h.folder.add("ctxkeeper", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf, ctx) ctx.id = weir.request.get_header("x-n") end,
          log = function(self, conf, ctx)
            if ctx.id ~= weir.request.get_header("x-n") then error("ctx lost: " .. tostring(ctx.id)) end
          end }
        """)
        try h.load(["ctxkeeper"])
        let chain = try h.chain("ctxkeeper")
        try h.onLoop {
            let before = h.runtime.coroutinesCreated
            // 300 requests in flight at once: all run their request phase,
            // then (as their upstreams answer) their log phase.
            var scopes: [PluginRequest] = []
            for i in 0..<300 {
                let req = h.newRequest()
                req.headers.append(("x-n", "\(i)"))
                let scope = h.runtime.beginRequest(req)
                guard case .done(.continue) = scope.start(.request, chain: chain) else {
                    return XCTFail("request phase of request \(i) did not continue")
                }
                scopes.append(scope)
            }
            for (i, scope) in scopes.enumerated() {
                guard case .done(.continue) = scope.start(.log, chain: chain) else {
                    return XCTFail("log phase of request \(i) failed (weir.ctx not kept across phases?)")
                }
                scope.finish()
            }
            XCTAssertLessThanOrEqual(h.runtime.coroutinesCreated - before, 1,
                                     "one pooled thread serves every phase that runs to its end")
        }
    }
}
