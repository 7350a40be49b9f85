import CLua
import CLuaShims
import NIOCore
import WeirCore
import XCTest
@testable import WeirLua

/// The chain runner (CLuaShims/chain.c): a phase's plugins run in one
/// resume. What each plugin sees and what Swift learns must be as when
/// every plugin was a resume of its own: order, shared ctx, waits in the
/// middle, which plugin exited or failed, per-plugin timings and log tags,
/// and a fresh instruction budget per plugin.
final class ChainRunnerTests: XCTestCase {
    final class Recorder: PluginPhaseObserver, @unchecked Sendable {
        var calls: [String] = []
        var nanoseconds: [String: UInt64] = [:]
        func pluginPhaseCompleted(plugin: String, phase: PluginPhase, nanoseconds: UInt64, outcome: PluginCallOutcome) {
            calls.append("\(plugin).\(phase.rawValue).\(outcome)")
            self.nanoseconds[plugin] = nanoseconds
        }
    }

    /// An observer whose recorders have cells, as the proxy's metrics do:
    /// the runner records the calls that complete, Swift the rest.
    final class CellObserver: PluginPhaseObserver, @unchecked Sendable {
        final class CellRecorder: PluginCallRecorder {
            let calls = PluginCallCell()
            var cell: PluginCallCell? { calls }
            func record(nanoseconds: UInt64, outcome: PluginCallOutcome) {
                calls.record(nanoseconds: nanoseconds, outcome: outcome)
            }
        }
        var recorders: [String: CellRecorder] = [:]
        var uncelled: [String] = []
        func recorder(plugin: String, phase: PluginPhase, eventLoop: ObjectIdentifier?) -> PluginCallRecorder? {
            let recorder = CellRecorder()
            recorders["\(plugin).\(phase.rawValue)"] = recorder
            return recorder
        }
        func pluginPhaseCompleted(plugin: String, phase: PluginPhase, nanoseconds: UInt64, outcome: PluginCallOutcome) {
            uncelled.append("\(plugin).\(phase.rawValue)")
        }
        /// "count completed/exited/failed" of one plugin's phase.
        func summary(_ key: String) -> String {
            guard let s = recorders[key]?.calls.snapshot else { return "none" }
            XCTAssertEqual(s.buckets.reduce(0, +), s.count, key)
            return "\(s.count) \(s.outcomes.map(String.init).joined(separator: "/"))"
        }
        func sum(_ key: String) -> UInt64 { recorders[key]?.calls.snapshot.sumNanoseconds ?? 0 }
    }

    private func harness(_ recorder: PluginPhaseObserver) -> Harness {
        let h = Harness()
        h.options.observer = recorder
        h.folder.add("first", handler: """
        return { PRIORITY = 3, VERSION = "1",
          request = function(self, conf, ctx) ctx.trail = "a"; weir.log.info("one") end,
          log = function(self, conf, ctx) weir.log.info("log " .. ctx.trail) end }
        """)
        h.folder.add("second", handler: """
        return { PRIORITY = 2, VERSION = "1",
          request = function(self, conf, ctx)
            local mode = weir.request.get_header("x-mode")
            if mode == "fail" then error("boom") end
            if mode == "exit" then return 403, "no" end
            weir.sleep(0.002)
            ctx.trail = ctx.trail .. "b"
            weir.log.info("two")
          end }
        """)
        h.folder.add("third", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf)
            weir.log.info("three")
            weir.upstream.request.set_header("x-trail", weir.ctx.trail .. "c")
          end }
        """)
        return h
    }

    func testPluginsRunInOrderAcrossAWaitWithSharedCtxTagsAndTimings() throws {
        let recorder = Recorder()
        let h = harness(recorder)
        try h.load(["first", "second", "third"])
        let request = h.newRequest()
        let results = try h.runRequest(try h.chain("first", "second", "third"), phases: [.request, .log], request: request)
        guard case .continue = results[0] else { return XCTFail("\(results)") }
        XCTAssertEqual(request.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-trail=abc"])
        XCTAssertEqual(h.logs.records.map { "\($0.plugin): \($0.message)" },
                       ["first: one", "second: two", "third: three", "first: log ab"])
        XCTAssertEqual(recorder.calls, ["first.request.completed", "second.request.completed",
                                        "third.request.completed", "first.log.completed"])
        // The wait counts toward the plugin that waited (at least its 2 ms).
        XCTAssertGreaterThanOrEqual(recorder.nanoseconds["second"] ?? 0, 2_000_000)
    }

    func testAFailureNamesThePluginAndStopsTheChain() throws {
        let recorder = Recorder()
        let h = harness(recorder)
        try h.load(["first", "second", "third"])
        let request = h.newRequest()
        request.headers = [("x-mode", "fail")]
        let failure = try h.runRequest(try h.chain("first", "second", "third"), request: request)[0].failure
        XCTAssertEqual(failure?.plugin, "second")
        XCTAssertTrue(failure?.message.hasSuffix("boom") ?? false, "\(String(describing: failure))")
        // The traceback points into the plugin and ends there (no runner line).
        XCTAssertTrue(failure?.traceback?.contains("second/handler.lua") ?? false, "\(String(describing: failure?.traceback))")
        XCTAssertFalse(failure?.traceback?.hasSuffix("[C]: in ?") ?? true)
        XCTAssertTrue(request.upstreamHeaders.isEmpty)
        XCTAssertEqual(recorder.calls, ["first.request.completed", "second.request.failed"])
    }

    func testAnExitInTheMiddleSkipsTheRestAndTheLogPhaseStillRuns() throws {
        let recorder = Recorder()
        let h = harness(recorder)
        try h.load(["first", "second", "third"])
        let request = h.newRequest()
        request.headers = [("x-mode", "exit")]
        let results = try h.runRequest(try h.chain("first", "second", "third"), phases: [.request, .log], request: request)
        XCTAssertEqual(results[0].exitValue?.status, 403)
        XCTAssertTrue(request.upstreamHeaders.isEmpty)
        XCTAssertEqual(recorder.calls, ["first.request.completed", "second.request.exited", "first.log.completed"])
        XCTAssertEqual(h.logs.records.map(\.message), ["one", "log a"])
    }

    func testTheRunnerRecordsCompletedCallsInTheCellsAcrossAWait() throws {
        let observer = CellObserver()
        let h = harness(observer)
        try h.load(["first", "second", "third"])
        let chain = try h.chain("first", "second", "third")
        for _ in 0..<2 {
            guard case .continue = try h.runRequest(chain, phases: [.request, .log])[0] else { return XCTFail() }
        }
        XCTAssertEqual(observer.summary("first.request"), "2 2/0/0")
        XCTAssertEqual(observer.summary("second.request"), "2 2/0/0")
        XCTAssertEqual(observer.summary("third.request"), "2 2/0/0")
        XCTAssertEqual(observer.summary("first.log"), "2 2/0/0")
        // The wait counts toward the plugin that waited (2 ms each time),
        // not toward the one after it.
        XCTAssertGreaterThanOrEqual(observer.sum("second.request"), 4_000_000)
        XCTAssertLessThan(observer.sum("third.request"), observer.sum("second.request"))
        XCTAssertEqual(observer.uncelled, [])
        // Durations in nanoseconds against the histogram's bounds: each
        // 2 ms wait falls in the (1 ms, 2.5 ms] or a later bucket.
        let second = try XCTUnwrap(observer.recorders["second.request"]).calls.snapshot
        XCTAssertEqual(second.buckets[0] + second.buckets[1], 0, "\(second.buckets)")
    }

    func testWithCellsAnExitOrAFailureIsRecordedOnceAsSuch() throws {
        let observer = CellObserver()
        let h = harness(observer)
        try h.load(["first", "second", "third"])
        let chain = try h.chain("first", "second", "third")
        for mode in ["exit", "fail"] {
            let request = h.newRequest()
            request.headers = [("x-mode", mode)]
            _ = try h.runRequest(chain, request: request)
        }
        XCTAssertEqual(observer.summary("first.request"), "2 2/0/0")
        XCTAssertEqual(observer.summary("second.request"), "2 0/1/1")
        XCTAssertEqual(observer.summary("third.request"), "0 0/0/0")
    }

    /// A plugin that ran long enough to have its budget counted must not
    /// leave the next plugin of the same resume unwatched: a runaway there
    /// is still stopped, and named.
    func testARunawayAfterALongPluginInTheSameResumeIsStopped() throws {
        weir_watchdog_set_tick(100_000) // 0.1 ms: the first plugin is surely counted
        defer { weir_watchdog_set_tick(UInt64(WEIR_WATCHDOG_DEFAULT_TICK_NS)) }
        let h = Harness()
        h.options.instructionBudget = 5_000_000
        h.folder.add("long", handler: """
        return { PRIORITY = 2, VERSION = "1", request = function() local s = 0 for i = 1, 400000 do s = s + i end end }
        """)
        h.folder.add("spin", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          if weir.request.get_header("x-spin") then while true do end end
        end }
        """)
        try h.load(["long", "spin"])
        let chain = try h.chain("long", "spin")
        let request = h.newRequest()
        request.headers = [("x-spin", "1")]
        let failure = try h.runRequest(chain, request: request)[0].failure
        XCTAssertEqual(failure?.plugin, "spin")
        XCTAssertTrue(failure?.message.contains("instruction budget exceeded") ?? false, "\(String(describing: failure))")
        guard case .continue = try h.runRequest(chain)[0] else { return XCTFail("the next request should run") }
    }

    /// The runner's list is its closure's upvalues (at most 255): a chain
    /// longer than WEIR_CHAIN_MAX_ENTRIES has no runner and runs an entry
    /// per resume, with the same order, shared ctx and exit as a short one.
    func testAChainTooLongForTheRunnerRunsEachEntryOnItsOwn() throws {
        let h = Harness()
        let count = Int(WEIR_CHAIN_MAX_ENTRIES) + 5
        let names = (1...count).map { String(format: "p%03d", $0) }
        for (i, name) in names.enumerated() {
            h.folder.add(name, handler: """
            return { PRIORITY = \(1000 - i), VERSION = "1", request = function(self, conf, ctx)
              ctx.trail = (ctx.trail or "") .. "\(name)."
              if "\(name)" == weir.request.get_header("x-exit-at") then return 403, "no" end
              if "\(name)" == "\(names.last!)" then weir.upstream.request.set_header("x-trail", ctx.trail) end
            end }
            """)
        }
        try h.load(names)
        let long = try h.chain(names.map { PluginRef(name: $0) })
        let short = try h.chain(names.prefix(3).map { PluginRef(name: $0) })
        XCTAssertEqual(long.phaseLists[PluginPhase.request.luaID], LUA_NOREF)
        XCTAssertNotEqual(short.phaseLists[PluginPhase.request.luaID], LUA_NOREF)
        let request = h.newRequest()
        guard case .continue = try h.runRequest(long, request: request)[0] else { return XCTFail() }
        XCTAssertEqual(request.upstreamHeaders.map(\.1), [names.map { $0 + "." }.joined()])
        let exiting = h.newRequest()
        exiting.headers = [("x-exit-at", names[count - 2])]
        XCTAssertEqual(try h.runRequest(long, request: exiting)[0].exitValue?.status, 403)
        XCTAssertTrue(exiting.upstreamHeaders.isEmpty)
    }
}
