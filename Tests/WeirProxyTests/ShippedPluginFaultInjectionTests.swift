// plugins/fault-injection through a running proxy with a real upstream;
// config via the real YAML loader. Percentages 0 and 100 make every
// outcome deterministic.

import Foundation
import NIOConcurrencyHelpers
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginFaultInjectionTests: UpstreamTestCase {
    /// One route per config in `routes` (path `/<name>`); one event loop, so a
    /// blocking delay would stall every other request.
    private func start(_ routes: [(name: String, config: String)]) throws -> ShippedPluginProxy {
        let routeYAML = routes.map { route in
            """
              - name: \(route.name)
                match: { paths: [/\(route.name)] }
                upstream: backend
                plugins:
                  - { name: fault-injection, config: \(route.config) }
            """
        }.joined(separator: "\n")
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
        \(routeYAML)
        access_log: off
        """
        return try startShippedPluginProxy(yaml: yaml, upstream: upstream, loops: 1)
    }

    func testAbortAtHundredAndZeroPercent() throws {
        let proxy = try start([
            ("always", "{ abort_percent: 100, abort_status: 502, abort_message: injected by test }"),
            ("never", "{ abort_percent: 0, abort_status: 502 }"),
            ("defaults", "{}"),
        ])
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<20 {
            let aborted = try client.request("GET", "/always")
            XCTAssertEqual(aborted.status, 502)
            XCTAssertEqual(aborted.header("content-type"), "application/json")
            XCTAssertTrue(aborted.bodyText.contains("injected by test"), aborted.bodyText)
            XCTAssertEqual(try client.request("GET", "/never").status, 200)
            XCTAssertEqual(try client.request("GET", "/defaults").status, 200, "defaults inject nothing")
        }
        XCTAssertFalse(upstream.requests.contains { $0.uri == "/always" }, "aborted requests never reach the upstream")
        XCTAssertEqual(upstream.requests.count, 40)
    }

    /// A 100% delay holds the request at least `delay` (a lower bound: a
    /// sleep cannot end early) and then aborts too when asked; a 0% delay
    /// passes straight through.
    func testDelayThenAbort() throws {
        let proxy = try start([
            ("slow", "{ delay_percent: 100, delay: 0.3 }"),
            ("slow-then-fail", "{ delay_percent: 100, delay: 0.3, abort_percent: 100 }"),
            ("not-delayed", "{ delay_percent: 0, delay: 100 }"),
        ])
        defer { proxy.stop() }
        let client = try proxy.connect()
        var started = Date()
        XCTAssertEqual(try client.request("GET", "/slow").status, 200)
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(started), 0.3)
        started = Date()
        let failed = try client.request("GET", "/slow-then-fail")
        XCTAssertEqual(failed.status, 503, "default abort status")
        XCTAssertTrue(failed.bodyText.contains("fault injected"), failed.bodyText)
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(started), 0.3)
        // delay_percent 0 with a 100 s delay: answered (else the test would hang).
        XCTAssertEqual(try client.request("GET", "/not-delayed").status, 200)
    }

    /// The delay yields: while one request sleeps on the only event loop,
    /// another request is served and answered first.
    func testDelayDoesNotBlockTheEventLoop() throws {
        let proxy = try start([
            ("slow", "{ delay_percent: 100, delay: 3 }"),
            ("fast", "{}"),
        ])
        defer { proxy.stop() }
        let slowDone = NIOLockedValueBox<Int?>(nil)
        let slowClient = try proxy.connect()
        let finished = expectation(description: "slow request answered")
        DispatchQueue.global().async {
            let status = try? slowClient.request("GET", "/slow").status
            slowDone.withLockedValue { $0 = status ?? -1 }
            finished.fulfill()
        }
        // Give the slow request time to reach its sleep (ordering only; the
        // assertion below holds however long this takes, short of 3 s).
        Thread.sleep(forTimeInterval: 0.2)
        XCTAssertEqual(try proxy.connect().request("GET", "/fast").status, 200)
        XCTAssertNil(slowDone.withLockedValue { $0 }, "the fast request was answered while the slow one slept")
        wait(for: [finished], timeout: 30)
        XCTAssertEqual(slowDone.withLockedValue { $0 }, 200)
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        let cases: [(String, String)] = [
            ("{ abort_percent: 101 }", "routes[0].plugins[0].config.abort_percent"),
            ("{ delay_percent: -1 }", "routes[0].plugins[0].config.delay_percent"),
            ("{ abort_status: 99 }", "routes[0].plugins[0].config.abort_status"),
            ("{ delay: soon }", "routes[0].plugins[0].config.delay"),
            // Either half of a delay alone would do nothing (schema required_when).
            ("{ delay_percent: 50 }", "routes[0].plugins[0].config.delay: required when delay_percent is set"),
            ("{ delay: 1 }", "routes[0].plugins[0].config.delay_percent: required when delay is set"),
        ]
        for (config, expected) in cases {
            XCTAssertThrowsError(try start([("all", config)]), config) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(config): \(error)")
            }
        }
    }
}
