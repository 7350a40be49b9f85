// The chain runner records each completed plugin call in its loop's C
// cell (a4fc5a4), Swift only the call a run stopped in (exit, failure,
// a call that waited). Through a running gateway on two loops, with a
// reload while a request waits inside a plugin (its old generation
// finishes it): every call is counted once, under its plugin and outcome.

import Foundation
import WeirCore
@testable import WeirProxy
import XCTest

final class PluginCallCountsAcrossReloadTests: PluginFolderTestCase {
    func testEveryCallIsCountedOnceUnderItsPluginAndOutcome() throws {
        try folder.write("a-first", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 300, VERSION = "1" }
        function P:request()
          if weir.request.get_path() == "/wait" then weir.sleep(0.3) end
        end
        return P
        """)
        try folder.write("b-gate", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 200, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_path() == "/deny" then return 403, "no" end
        end
        return P
        """)
        try folder.write("c-last", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request()
          if weir.request.get_path() == "/fail" then error("failing on purpose") end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("a-first"), pluginRef("b-gate"), pluginRef("c-last")]
        }
        let metrics = PluginMetrics()
        let proxy = try PluginProxy(config: config, folder: folder, loops: 2, metrics: metrics)
        defer { proxy.stop() }

        let (ok, deny, fail) = (12, 5, 3)
        func send() throws {
            // Four connections: both loops serve some.
            let clients = try (0..<4).map { _ in try proxy.connect() }
            for (i, client) in clients.enumerated() {
                for n in 0..<ok where n % 4 == i { XCTAssertEqual(try client.request("GET", "/ok").status, 200) }
                for n in 0..<deny where n % 4 == i { XCTAssertEqual(try client.request("GET", "/deny").status, 403) }
                for n in 0..<fail where n % 4 == i { XCTAssertEqual(try client.request("GET", "/fail").status, 500) }
            }
        }
        try send()
        // A request waiting in a-first across the reload.
        let waiting = try proxy.connect()
        try waiting.send("GET /wait HTTP/1.1\r\nHost: test.local\r\n\r\n")
        if case .failure(let error) = proxy.generations.reload(config: config) { XCTFail("reload: \(error)") }
        try send()
        XCTAssertEqual(try waiting.readResponse().status, 200)

        let all = 2 * (ok + deny + fail) + 1
        let text = metrics.renderPrometheus()
        func calls(_ plugin: String, _ outcome: String) -> String {
            "weir_plugin_calls_total{plugin=\"\(plugin)\",phase=\"request\",outcome=\"\(outcome)\"} "
        }
        func value(_ prefix: String) -> Int {
            guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) else { return 0 }
            return Int(line.dropFirst(prefix.count)) ?? -1
        }
        XCTAssertEqual(value(calls("a-first", "completed")), all, text)
        XCTAssertEqual(value(calls("a-first", "exited")), 0, text)
        XCTAssertEqual(value(calls("b-gate", "completed")), all - 2 * deny, text)
        XCTAssertEqual(value(calls("b-gate", "exited")), 2 * deny, text)
        XCTAssertEqual(value(calls("c-last", "completed")), all - 2 * deny - 2 * fail, text)
        XCTAssertEqual(value(calls("c-last", "failed")), 2 * fail, text)
        XCTAssertEqual(value("weir_plugin_duration_seconds_count{plugin=\"a-first\",phase=\"request\"} "), all, text)
        XCTAssertEqual(value("weir_plugin_duration_seconds_count{plugin=\"b-gate\",phase=\"request\"} "), all, text)
        XCTAssertEqual(value("weir_plugin_duration_seconds_count{plugin=\"c-last\",phase=\"request\"} "), all - 2 * deny, text)
        // The histogram's +Inf bucket (cumulative) holds every call, the waiting one too.
        XCTAssertEqual(value("weir_plugin_duration_seconds_bucket{plugin=\"a-first\",phase=\"request\",le=\"+Inf\"} "), all, text)
    }
}
