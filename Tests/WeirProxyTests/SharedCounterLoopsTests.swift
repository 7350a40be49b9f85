// dict:incr / incr_get on a counter take a typed path
// (SharedDictionaries.Dictionary.incrementCounter, f79de1c); other values
// go the general way. Through a running gateway on two event loops (two
// Lua states, one dictionary): the counts are exact, the typed and the
// general path add to the same keys, and what is not a counter answers
// as before.

import Foundation
import WeirCore
import WeirProxy
import XCTest

final class SharedCounterLoopsTests: PluginFolderTestCase {
    func testCountersSharedByTwoLoopsAreExact() throws {
        try folder.write("counter", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request()
          local d = weir.shared.counts
          if weir.request.get_path() == "/read" then
            d:set("text", "x")
            local t, terr = d:incr("text", 1, 0)
            local m, merr = d:incr("missing", 1)
            local g, gother = d:incr_get("missing", 1, nil, nil, "total")
            local body = table.concat({ tostring(d:get("total")), tostring(d:get("pair")), tostring(d:get("float")),
              tostring(t) .. "/" .. tostring(terr), tostring(m) .. "/" .. tostring(merr), tostring(g) .. "/" .. tostring(gother) }, ",")
            return 200, body
          end
          local n = d:incr("total", 1, 0)
          local pair, total = d:incr_get("pair", 2, 10, 0, "total")
          d:incr("float", 0.5, 0)
          weir.response.set_header("x-seen", tostring(n) .. "/" .. tostring(pair) .. "/" .. tostring(total))
        end
        return P
        """)
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: 127.0.0.1:\(upstream.port) }] }
        routes:
          - { name: all, match: { paths: [/] }, upstream: backend }
        plugins:
          - name: counter
        access_log: off
        shared_dicts: [{ name: counts, items: 100 }]
        """
        let proxy = try PluginProxy(config: try ConfigLoader.parse(yaml: yaml), folder: folder, loops: 2)
        defer { proxy.stop() }
        let perConnection = 25
        let failures = NSLock()
        var failed: [String] = []
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            do {
                let clients = try (0..<2).map { _ in try proxy.connect() }
                for _ in 0..<perConnection {
                    for client in clients {
                        let response = try client.request("GET", "/count")
                        if response.status != 200 || response.header("x-seen") == nil {
                            failures.lock(); failed.append("\(response.status)"); failures.unlock()
                        }
                    }
                }
            } catch {
                failures.lock(); failed.append("\(error)"); failures.unlock()
            }
        }
        XCTAssertEqual(failed, [])
        let requests = 4 * 2 * perConnection
        let read = try proxy.connect().request("GET", "/read")
        XCTAssertEqual(read.status, 200)
        XCTAssertEqual(read.bodyText, "\(requests),\(10 + 2 * requests),\(0.5 * Double(requests)),nil/not a number,nil/not found,nil/not found",
                       read.bodyText)
    }
}
