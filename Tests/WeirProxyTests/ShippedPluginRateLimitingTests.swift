// plugins/rate-limiting through a running proxy with a real upstream. Window
// edges are reached with the test-only `test-clock` plugin (x-test-clock
// header sets weir.time.now), so no test depends on real timing.

import Foundation
import NIOConcurrencyHelpers
import NIOPosix
import WeirCore
import WeirProxy
import WeirTestSupport
import XCTest

final class ShippedPluginRateLimitingTests: UpstreamTestCase {
    var helpers: PluginFolder!

    override func setUpWithError() throws {
        try super.setUpWithError()
        helpers = try PluginFolder()
        try writeTestClockPlugin(into: helpers)
    }

    override func tearDownWithError() throws {
        try super.tearDownWithError()
        helpers.remove()
    }

    /// `after`: more plugins of the route (names from `helpers`), listed after rate-limiting.
    private func start(_ config: String, workers: Int = 2, sharedDicts: Bool = true,
                       after: [String] = []) throws -> ShippedPluginProxy {
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: all
            match: { paths: [/] }
            upstream: backend
            plugins:
              - { name: rate-limiting, config: \(config) }
        \(after.map { "      - { name: \($0) }" }.joined(separator: "\n"))
        plugins:
          - name: test-clock
        access_log: off
        \(sharedDicts ? "shared_dicts: [{ name: rate-limiting, items: 1000 }]" : "")
        """
        return try startShippedPluginProxy(yaml: yaml, upstream: upstream, loops: workers,
                                           extraPluginPaths: [helpers.pluginsDir])
    }

    private func get(_ client: BlockingSocket, at clock: Double, _ headers: [(String, String)] = []) throws -> TestResponse {
        try client.request("GET", "/r", headers: [("x-test-clock", String(clock))] + headers)
    }

    func testLimitHeadersAnd429() throws {
        let proxy = try start("{ minute: 3 }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        for remaining in [2, 1, 0] {
            let ok = try get(client, at: 6000)
            XCTAssertEqual(ok.status, 200)
            XCTAssertEqual(ok.header("ratelimit-limit"), "3")
            XCTAssertEqual(ok.header("ratelimit-remaining"), String(remaining))
            XCTAssertEqual(ok.header("ratelimit-reset"), "60")
            XCTAssertEqual(ok.header("x-ratelimit-limit-minute"), "3")
        }
        let refused = try get(client, at: 6030)
        XCTAssertEqual(refused.status, 429)
        XCTAssertEqual(refused.header("content-type"), "application/json")
        XCTAssertTrue(refused.bodyText.contains("API rate limit exceeded"), refused.bodyText)
        XCTAssertEqual(refused.header("ratelimit-remaining"), "0")
        XCTAssertEqual(refused.header("ratelimit-reset"), "30")
        // 3 in this window, none before: the next fits when this window's 3
        // weigh at most 2 in the next one, i.e. 20 s into it: 30 + 20 s.
        XCTAssertEqual(refused.header("retry-after"), "50")
        XCTAssertEqual(upstream.requests.count, 3, "refused requests never reach the upstream")
    }

    /// Two periods: each has its X-RateLimit-* pair, the tighter one speaks
    /// for RateLimit-*, and the refused one (with every remaining count 0)
    /// once it is exhausted.
    func testSeveralPeriodsTheTightestSpeaks() throws {
        let proxy = try start("{ second: 5, minute: 3 }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let first = try get(client, at: 6000.5)
        XCTAssertEqual(first.status, 200)
        XCTAssertEqual(first.header("x-ratelimit-limit-second"), "5")
        XCTAssertEqual(first.header("x-ratelimit-remaining-second"), "4")
        XCTAssertEqual(first.header("x-ratelimit-limit-minute"), "3")
        XCTAssertEqual(first.header("x-ratelimit-remaining-minute"), "2")
        XCTAssertEqual(first.header("ratelimit-limit"), "3", "the minute has fewer left")
        XCTAssertEqual(first.header("ratelimit-remaining"), "2")
        XCTAssertEqual(first.header("ratelimit-reset"), "60")
        for _ in 0..<2 { XCTAssertEqual(try get(client, at: 6000.5).status, 200) }
        let refused = try get(client, at: 6000.5)
        XCTAssertEqual(refused.status, 429)
        XCTAssertEqual(refused.header("x-ratelimit-remaining-second"), "0")
        XCTAssertEqual(refused.header("x-ratelimit-remaining-minute"), "0")
        XCTAssertEqual(refused.header("ratelimit-limit"), "3", "the refused period")
        XCTAssertEqual(refused.header("ratelimit-reset"), "60")
        // 3 admitted in this minute, none before: the next fits 20 s into the next minute, 59.5 + 20 s from now.
        XCTAssertEqual(refused.header("retry-after"), "80")
    }

    /// A full window followed by a burst at the start of the next one: the
    /// previous window's weight keeps the total within the limit for any
    /// sliding window, exactly as computed.
    func testWindowEdgeBurstCannotPassTwiceTheLimit() throws {
        let proxy = try start("{ second: 10 }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        func admitted(at clock: Double, tries: Int) throws -> Int {
            var n = 0
            for _ in 0..<tries where try get(client, at: clock).status == 200 { n += 1 }
            return n
        }
        XCTAssertEqual(try admitted(at: 1000.9, tries: 15), 10, "end of window 1000")
        XCTAssertEqual(try admitted(at: 1001.05, tries: 15), 0, "start of 1001: the previous 10 still weigh 9.5")
        XCTAssertEqual(try admitted(at: 1001.5, tries: 15), 5, "half way: 10 * 0.5 + 5 = 10")
        XCTAssertEqual(try admitted(at: 1002.5, tries: 15), 7, "next window: 5 * 0.5 + 7 <= 10")
        XCTAssertEqual(try admitted(at: 1010.0, tries: 15), 10, "after a quiet window the full limit again")
    }

    /// RateLimit-Remaining is the limit minus the sliding estimate, rounded
    /// down; RateLimit-Reset the whole seconds to the window's end, rounded
    /// up, from a clock between whole seconds.
    func testRemainingAndResetBetweenWholeSeconds() throws {
        let proxy = try start("{ minute: 10 }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<6 { XCTAssertEqual(try get(client, at: 6059.0).status, 200) }
        // 6 * (60 - 30.25) / 60 + 1 = 3.975 -> 6 left; 29.75 s to 6120 -> 30.
        let middle = try get(client, at: 6090.25)
        XCTAssertEqual(middle.header("ratelimit-remaining"), "6")
        XCTAssertEqual(middle.header("x-ratelimit-remaining-minute"), "6")
        XCTAssertEqual(middle.header("ratelimit-reset"), "30")
        // 6 * 0.1 / 60 + 2 = 2.01 -> 7 left; 0.1 s to the end -> 1.
        let late = try get(client, at: 6119.9)
        XCTAssertEqual(late.header("ratelimit-remaining"), "7")
        XCTAssertEqual(late.header("ratelimit-reset"), "1")
    }

    /// Two event loops, many concurrent clients: exactly the limit passes.
    func testExactAcrossEventLoops() throws {
        let proxy = try start("{ hour: 50, limit_by: ip }", workers: 2)
        defer { proxy.stop() }
        let admitted = NIOLockedValueBox(0)
        let refused = NIOLockedValueBox(0)
        let failures = NIOLockedValueBox<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            do {
                let client = try proxy.connect()
                for _ in 0..<15 {
                    let status = try get(client, at: 7200 + 1800).status
                    if status == 200 { admitted.withLockedValue { $0 += 1 } }
                    else if status == 429 { refused.withLockedValue { $0 += 1 } }
                    else { failures.withLockedValue { $0.append("status \(status)") } }
                }
            } catch {
                failures.withLockedValue { $0.append("\(error)") }
            }
        }
        XCTAssertEqual(failures.withLockedValue { $0 }, [])
        XCTAssertEqual(admitted.withLockedValue { $0 }, 50)
        XCTAssertEqual(refused.withLockedValue { $0 }, 70)
    }

    func testLimitByHeaderAndConsumerFallBackToIP() throws {
        let proxy = try start("{ minute: 1, limit_by: header, header_name: x-tenant }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try get(client, at: 600, [("x-tenant", "a")]).status, 200)
        XCTAssertEqual(try get(client, at: 600, [("x-tenant", "a")]).status, 429)
        XCTAssertEqual(try get(client, at: 600, [("x-tenant", "b")]).status, 200, "another tenant has its own count")
        XCTAssertEqual(try get(client, at: 600).status, 200, "no header: counted by IP")
        XCTAssertEqual(try get(client, at: 600).status, 429)
    }

    /// Counters are per route, and `limit_by: route` gives all clients of a
    /// route one budget. A helper plugin echoes `weir.request.get_route()`
    /// and `get_route_and_consumer()` (no consumer here).
    func testCountersArePerRouteAndLimitByRoute() throws {
        try helpers.write("route-echo", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 1, VERSION = "1" }
        function P:response(conf, ctx)
          weir.response.set_header("x-route", weir.request.get_route() or "(nil)")
          local route, consumer = weir.request.get_route_and_consumer()
          weir.response.set_header("x-route-and-consumer", (route or "(nil)") .. "/" .. (consumer or "(nil)"))
        end
        return P
        """)
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: a
            match: { paths: [/a] }
            upstream: backend
            plugins:
              - { name: rate-limiting, config: { minute: 1, limit_by: header, header_name: x-tenant } }
          - name: b
            match: { paths: [/b] }
            upstream: backend
            plugins:
              - { name: rate-limiting, config: { minute: 1, limit_by: header, header_name: x-tenant } }
          - name: shared
            match: { paths: [/shared] }
            upstream: backend
            plugins:
              - { name: rate-limiting, config: { minute: 2, limit_by: route } }
          - match: { paths: [/] }
            upstream: backend
        plugins:
          - name: test-clock
          - name: route-echo
        access_log: off
        shared_dicts: [{ name: rate-limiting, items: 1000 }]
        """
        let proxy = try startShippedPluginProxy(yaml: yaml, upstream: upstream, loops: 2,
                                                extraPluginPaths: [helpers.pluginsDir])
        defer { proxy.stop() }
        let client = try proxy.connect()
        func get(_ path: String, tenant: String) throws -> TestResponse {
            try client.request("GET", path, headers: [("x-test-clock", "600"), ("x-tenant", tenant)])
        }
        let first = try get("/a", tenant: "t1")
        XCTAssertEqual(first.status, 200)
        XCTAssertEqual(first.header("x-route"), "a")
        XCTAssertEqual(first.header("x-route-and-consumer"), "a/(nil)")
        XCTAssertEqual(try get("/a", tenant: "t1").status, 429)
        let onB = try get("/b", tenant: "t1")
        XCTAssertEqual(onB.status, 200, "the same tenant has its own budget on another route")
        XCTAssertEqual(onB.header("x-route"), "b")
        XCTAssertEqual(onB.header("x-route-and-consumer"), "b/(nil)")
        XCTAssertEqual(try get("/b", tenant: "t1").status, 429)
        // limit_by route: the two tenants share the route's 2 requests.
        XCTAssertEqual(try get("/shared", tenant: "t1").status, 200)
        XCTAssertEqual(try get("/shared", tenant: "t2").status, 200)
        XCTAssertEqual(try get("/shared", tenant: "t3").status, 429)
        XCTAssertEqual(try get("/other", tenant: "t1").header("x-route"), "route-3",
                       "an unnamed route has the loader's name: route-<index>")
    }

    func testHiddenHeadersAndCustomError() throws {
        let proxy = try start("{ second: 1, hide_client_headers: true, error_code: 503, error_message: slow down }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let ok = try get(client, at: 50.5)
        XCTAssertEqual(ok.status, 200)
        XCTAssertNil(ok.header("ratelimit-limit"))
        let refused = try get(client, at: 50.5)
        XCTAssertEqual(refused.status, 503)
        XCTAssertTrue(refused.bodyText.contains("slow down"), refused.bodyText)
        XCTAssertNotNil(refused.header("retry-after"))
    }

    func testMissingDictionary() throws {
        do {
            let proxy = try start("{ minute: 1 }", sharedDicts: false)
            defer { proxy.stop() }
            XCTAssertEqual(try get(try proxy.connect(), at: 1).status, 200, "fault_tolerant lets it through")
        }
        let proxy = try start("{ minute: 1, fault_tolerant: false }", sharedDicts: false)
        defer { proxy.stop() }
        let failed = try get(try proxy.connect(), at: 1)
        XCTAssertEqual(failed.status, 500, "not fault tolerant: the request fails (the reason is logged)")
        XCTAssertEqual(failed.errorJSON?["error"], "plugin_failed")
        XCTAssertEqual(upstream.requests.count, 1, "only the fault-tolerant request reached the upstream")
    }

    /// A window counter that is not a number (another plugin wrote text
    /// under its key): the usual config's request (limit_by consumer, one
    /// period) reports the counter failure like the general path, let
    /// through when fault_tolerant, failed otherwise.
    func testCounterThatIsNotANumberFailsAsTheConfigSays() throws {
        // Before rate-limiting (PRIORITY 910): text under the key of the
        // window of second 60 of the client without a consumer (its IP).
        try helpers.write("test-spoil", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 5000, VERSION = "1" }
        function P:request(conf, ctx)
          weir.shared["rate-limiting"]:set("rl|3:all|consumer|9:127.0.0.1|minute|60", "text")
        end
        return P
        """)
        for (config, status) in [("{ minute: 5 }", 200), ("{ minute: 5, fault_tolerant: false }", 500)] {
            let proxy = try start(config, workers: 1, after: ["test-spoil"])
            defer { proxy.stop() }
            let response = try get(try proxy.connect(), at: 61.5)
            XCTAssertEqual(response.status, status, config)
            XCTAssertNil(response.header("ratelimit-remaining"), config)
        }
        XCTAssertEqual(upstream.requests.count, 1, "only the fault-tolerant request reached the upstream")
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        let cases: [(String, String)] = [
            ("{ minute: many }", "routes[0].plugins[0].config.minute"),
            ("{ minute: 0 }", "routes[0].plugins[0].config.minute"),
            ("{ minute: 5, limit_by: planet }", "routes[0].plugins[0].config.limit_by"),
            ("{ minute: 5, redis: { port: 70000 } }", "routes[0].plugins[0].config.redis.port"),
            // No period at all: refused at load (schema at_least_one_of), not a 500 per request.
            ("{ limit_by: ip }", "routes[0].plugins[0].config: set at least one of second, minute, hour, day (none is set)"),
            // limit_by header without a header to count (schema required_when): was a 500 on every request.
            ("{ minute: 5, limit_by: header }", "routes[0].plugins[0].config.header_name: required when limit_by is \"header\""),
        ]
        for (config, expected) in cases {
            XCTAssertThrowsError(try start(config), config) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(config): \(error)")
            }
        }
        // Defaults: policy local, limit_by consumer (-> IP when anonymous), fault tolerant.
        let proxy = try start("{ minute: 5, redis: {} }")
        proxy.stop()
    }

    // MARK: policy redis (a real redis-server)

    /// Two event loops, concurrent clients, counters in Redis: exactly the
    /// limit passes; the window edge behaves as with policy local.
    func testRedisPolicyIsExactAndSlides() throws {
        try XCTSkipUnless(RedisServerProcess.isAvailable, "redis-server not installed")
        let redis = try RedisServerProcess()
        defer { redis.kill() }
        let proxy = try start("{ hour: 40, second: 10, limit_by: header, header_name: x-who, policy: redis, redis: { port: \(redis.port) } }")
        defer { proxy.stop() }
        let admitted = NIOLockedValueBox(0)
        let other = NIOLockedValueBox<[Int]>([])
        DispatchQueue.concurrentPerform(iterations: 6) { _ in
            guard let client = try? proxy.connect() else { other.withLockedValue { $0.append(-1) }; return }
            for _ in 0..<10 {
                let status = (try? self.get(client, at: 36000.5, [("x-who", "burst")]).status) ?? -1
                if status == 200 { admitted.withLockedValue { $0 += 1 } }
                else if status != 429 { other.withLockedValue { $0.append(status) } }
            }
        }
        XCTAssertEqual(other.withLockedValue { $0 }, [])
        XCTAssertEqual(admitted.withLockedValue { $0 }, 10, "the per-second limit, exactly")
        let client = try proxy.connect()
        func admittedCount(at clock: Double) throws -> Int {
            var n = 0
            for _ in 0..<15 where try get(client, at: clock, [("x-who", "edge")]).status == 200 { n += 1 }
            return n
        }
        XCTAssertEqual(try admittedCount(at: 2000.9), 10)
        XCTAssertEqual(try admittedCount(at: 2001.05), 0)
        XCTAssertEqual(try admittedCount(at: 2001.5), 5)
        let limited = try get(client, at: 2001.5, [("x-who", "edge")])
        XCTAssertEqual(limited.status, 429)
        XCTAssertEqual(limited.header("ratelimit-limit"), "10")
        XCTAssertEqual(limited.header("x-ratelimit-limit-hour"), "40")
    }

    func testRedisDownIsFaultTolerantOrFails() throws {
        let port = try refusingPort()
        do {
            let proxy = try start("{ minute: 1, policy: redis, redis: { port: \(port), timeout: 0.5 } }")
            defer { proxy.stop() }
            XCTAssertEqual(try get(try proxy.connect(), at: 1).status, 200, "fault_tolerant lets it through")
        }
        let proxy = try start("{ minute: 1, policy: redis, fault_tolerant: false, redis: { port: \(port), timeout: 0.5 } }")
        defer { proxy.stop() }
        XCTAssertEqual(try get(try proxy.connect(), at: 1).status, 500)
    }
}
