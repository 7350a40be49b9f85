import NIOConcurrencyHelpers
import NIOCore
import WeirCore
import XCTest
@testable import WeirLua

/// weir.re, weir.metrics, weir.batch, weir.log.serialize, json array shape
/// and the handler key BODY_FILTER_IF, through real plugins on a real loop.
final class SDKExportTests: XCTestCase {
    /// Counts weir.metrics.count events.
    final class EventCounter: PluginPhaseObserver, @unchecked Sendable {
        let events = NIOLockedValueBox<[String: Int]>([:])
        func pluginPhaseCompleted(plugin: String, phase: PluginPhase, nanoseconds: UInt64, outcome: PluginCallOutcome) {}
        func pluginEventCounted(plugin: String, event: String, count: Int) {
            events.withLockedValue { $0["\(plugin)/\(event)", default: 0] += count }
        }
        func count(_ key: String) -> Int { events.withLockedValue { $0[key] ?? 0 } }
    }

    private func run(_ body: String, harness: Harness = Harness(), phases: [PluginPhase] = [.request]) throws -> PhaseResult {
        harness.folder.add("probe", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 1, VERSION = "1" }
        function P:request(conf, ctx)
        \(body)
        end
        function P:log(conf, ctx) end
        return P
        """)
        try harness.load(["probe"])
        return try harness.runRequest(try harness.chain("probe"), phases: phases)[0]
    }

    func testRegexFind() throws {
        let result = try run("""
        local a, b = weir.re.find("x-Mobile/15 y", "Mobile/[0-9]+")
        local none = weir.re.find("desktop", "^(on|yes)$")
        local bad, err = weir.re.find("s", "(unclosed")
        local ci = weir.re.find("HELLO", "(?i)hello")
        return 200, table.concat({ a, b, tostring(none), tostring(bad), tostring(err ~= nil), ci }, "|")
        """)
        XCTAssertEqual(result.exitValue?.bodyString, "3|11|nil|nil|true|1", "\(result)")
        let misuse = try run("weir.re.find(1, 'a')")
        XCTAssertTrue(misuse.failure?.message.contains("bad argument #1 to 'weir.re.find' (string expected, got number)") ?? false, "\(misuse)")
    }

    func testJSONKeepsEmptyArrays() throws {
        let result = try run("""
        local doc = weir.json.decode('{"a":[],"b":{},"c":[1]}')
        table.remove(doc.c)
        return 200, weir.json.encode(doc)
        """)
        XCTAssertEqual(result.exitValue?.bodyString, #"{"a":[],"b":{},"c":[]}"#)
    }

    func testSerializeOnlyInLogPhase() throws {
        let result = try run("weir.log.serialize()")
        XCTAssertTrue(result.failure?.message.contains("weir.log.serialize is not available in the request phase") ?? false, "\(result)")
    }

    func testMetricsCountAndBatchQueue() throws {
        let harness = Harness()
        let counter = EventCounter()
        harness.options.observer = counter
        // Batches of 2; the send fails for the batch holding "fail" (retries
        // 1), so its items are dropped and counted; max_queued 3 drops the rest.
        let result = try run("""
        weir.metrics.count("custom", 2)
        _G.sent = _G.sent or {}
        local q = weir.batch.new{ name = "t", metric = "items", batch_size = 2, flush_interval = 0.02,
          max_queued = 3, retries = 1, retry_delay = 0.01,
          send = function(items)
            if items[1] == "fail" then return nil, "refused" end
            for _, v in ipairs(items) do _G.sent[#_G.sent + 1] = v end
            return true
          end }
        local pushed = {}
        for _, v in ipairs({ "a", "b", "fail", "x", "y" }) do pushed[#pushed + 1] = tostring(q:push(v)) end
        weir.sleep(0.3)
        local s = q:stats()
        return 200, table.concat(pushed, ",") .. " " .. table.concat(_G.sent, ",") ..
          " queued=" .. s.queued .. " dropped=" .. s.dropped .. " sent=" .. s.sent .. " failed=" .. s.failed_batches
        """, harness: harness)
        // a,b,fail queued (3 = max_queued; the full batch a,b is only sent
        // on the next tick), x and y dropped; then a,b sent; fail dropped after 2 attempts.
        XCTAssertEqual(result.exitValue?.bodyString, "true,true,true,false,false a,b queued=0 dropped=3 sent=2 failed=1", "\(result)")
        XCTAssertEqual(counter.count("probe/custom"), 2)
        XCTAssertEqual(counter.count("probe/items_sent"), 2)
        XCTAssertEqual(counter.count("probe/items_dropped"), 3)
        XCTAssertTrue(harness.logs.records.contains { $0.message.contains("t: batch of 1 dropped after 2 attempts: refused") },
                      "\(harness.logs.records.map(\.message))")
        let bad = try run("weir.batch.new{ send = function() end, batch_size = 0 }")
        XCTAssertTrue(bad.failure?.message.contains("batch_size must be a positive number") ?? false, "\(bad)")
    }

    func testBodyFilterIf() throws {
        let harness = Harness()
        harness.folder.add("filter", handler: """
        return { PRIORITY = 1, VERSION = "1", BODY_FILTER_IF = { "ops.json", "all" },
                 body_filter = function() end }
        """, schema: """
        return { fields = { ops = { type = "record", default = {}, fields = {
                   json = { type = "array", default = {}, elements = { type = "string" } } } },
                 all = { type = "boolean", default = false } } }
        """)
        harness.folder.add("always", handler: "return { PRIORITY = 1, VERSION = '1', body_filter = function() end }")
        harness.folder.add("broken", handler: "return { PRIORITY = 1, VERSION = '1', BODY_FILTER_IF = 'x', body_filter = function() end }")
        let library = try PluginLibrary(names: ["filter", "always"], searchPaths: [harness.folder.path], sdk: Harness.sdk)
        func filters(_ name: String, _ config: ConfigValue) throws -> Bool {
            try library.configure([PluginRef(name: name, config: config)], path: "plugins").get()[0].filtersBody
        }
        XCTAssertFalse(try filters("filter", .map([:])))
        XCTAssertTrue(try filters("filter", .map(["ops": .map(["json": .array([.string("a")])])])))
        XCTAssertTrue(try filters("filter", .map(["all": .bool(true)])))
        XCTAssertTrue(try filters("always", .map([:])))
        XCTAssertThrowsError(try PluginLibrary(names: ["broken"], searchPaths: [harness.folder.path], sdk: Harness.sdk)) { error in
            XCTAssertTrue("\(error)".contains("BODY_FILTER_IF must be a list of config paths, got string"), "\(error)")
        }
    }
}
