// plugins/traffic-split through a running proxy with two real upstreams
// (stable and canary); config via the real YAML loader.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginTrafficSplitTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!
    var stable: TestUpstream!
    var canary: TestUpstream!

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        stable = try TestUpstream(name: "stable", group: group)
        canary = try TestUpstream(name: "canary", group: group)
    }

    override func tearDownWithError() throws {
        stable.stop()
        canary.stop()
        try group.syncShutdownGracefully()
    }

    private func start(config: String, upstreams extra: String = "") throws -> ShippedPluginProxy {
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: stable, targets: [{ address: UPSTREAM }] }
          - { name: canary, targets: [{ address: 127.0.0.1:\(canary.port) }] }
        \(extra)
        routes:
          - name: app
            match: { paths: [/] }
            upstream: stable
            plugins:
              - { name: traffic-split, config: \(config) }
        access_log: off
        """
        return try startShippedPluginProxy(yaml: yaml, upstream: stable)
    }

    /// 1,000 requests with weight 20: the canary's count is binomial
    /// (mean 200, sd ~12.6); 140..260 is ±4.7 sd, so the test does not
    /// flake, whatever the random seed.
    func testWeightedShareWithinTolerance() throws {
        let proxy = try start(config: "{ split: [{ upstream: canary, weight: 20 }] }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        var toCanary = 0
        for _ in 0..<1000 {
            let response = try client.request("GET", "/w")
            XCTAssertEqual(response.status, 200)
            if response.header("x-upstream") == "canary" { toCanary += 1 }
        }
        XCTAssertTrue((140...260).contains(toCanary), "canary got \(toCanary) of 1000 at weight 20")
        XCTAssertEqual(canary.requests.count, toCanary)
        XCTAssertEqual(stable.requests.count, 1000 - toCanary)
    }

    func testWeightsZeroAndHundred() throws {
        let none = try start(config: "{ split: [{ upstream: canary, weight: 0 }] }")
        for _ in 0..<50 { XCTAssertEqual(try none.connect().request("GET", "/z").header("x-upstream"), "stable") }
        none.stop()
        let all = try start(config: "{ split: [{ upstream: canary, weight: 100 }] }")
        defer { all.stop() }
        let client = try all.connect()
        for _ in 0..<50 { XCTAssertEqual(try client.request("GET", "/a").header("x-upstream"), "canary") }
    }

    /// Header and cookie rules, exact and regex; a matching rule wins over
    /// the weights (weight 0 for canary here would keep everything stable).
    func testMatchRulesTakePrecedenceOverWeights() throws {
        let proxy = try start(config: """
        { match: [
            { upstream: canary, headers: { x-canary: "1" } },
            { upstream: canary, cookie_regex: { beta: "^(on|yes)$" } },
            { upstream: canary, header_regex: { user-agent: "Mobile/[0-9]+" }, cookies: { region: eu } } ],
          split: [{ upstream: stable, weight: 100 }] }
        """)
        defer { proxy.stop() }
        let client = try proxy.connect()
        func upstream(_ headers: [(String, String)]) throws -> String? {
            try client.request("GET", "/m", headers: headers).header("x-upstream")
        }
        XCTAssertEqual(try upstream([("x-canary", "1")]), "canary")
        XCTAssertEqual(try upstream([("x-canary", "10")]), "stable", "exact means exact")
        XCTAssertEqual(try upstream([("cookie", "a=b; beta=yes")]), "canary")
        XCTAssertEqual(try upstream([("cookie", "beta=maybe")]), "stable")
        XCTAssertEqual(try upstream([("user-agent", "X Mobile/15"), ("cookie", "region=eu")]), "canary")
        XCTAssertEqual(try upstream([("user-agent", "X Mobile/15"), ("cookie", "region=us")]), "stable",
                       "every condition of a rule must hold")
        XCTAssertEqual(try upstream([("user-agent", "Desktop"), ("cookie", "region=eu")]), "stable")
        XCTAssertEqual(try upstream([]), "stable")
    }

    func testUnknownUpstreamAndBadRegexRefusedAtLoad() throws {
        let cases: [(String, String)] = [
            ("{ split: [{ upstream: nowhere, weight: 10 }] }", "routes[0].plugins[0].config.split[0].upstream: no upstream named \"nowhere\""),
            ("{ match: [{ upstream: canary }, { upstream: gone, headers: { a: b } }] }", "routes[0].plugins[0].config.match[1].upstream: no upstream named \"gone\""),
            ("{ match: [{ upstream: canary, header_regex: { a: \"(unclosed\" } }] }", "routes[0].plugins[0].config.match[0].header_regex.a: invalid regular expression"),
            ("{ split: [{ upstream: canary, weight: 101 }] }", "routes[0].plugins[0].config.split[0].weight"),
            ("{ split: [{ upstream: canary }] }", "routes[0].plugins[0].config.split[0].weight: required field missing"),
        ]
        for (config, expected) in cases {
            XCTAssertThrowsError(try start(config: config), config) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(config): \(error)")
            }
        }
    }
}
