// Request counts written without a lock (`RequestCellCounters`, each cell
// written by its loop's thread only) stay exact end to end: two event
// loops serving many connections at once, and a reload in the middle that
// gives every loop a new routing generation (new `LoopRouting`, whose
// `RequestCounter`s are looked up again) while the registry's cells stay.

import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOPosix
import WeirCore
@testable import WeirProxy
import XCTest

final class MetricsExactCountTests: UpstreamTestCase {
    /// N requests over 8 keep-alive connections from 4 threads, split
    /// between two routes and two status classes, half before and half
    /// after a reload: /metrics' counts are exactly the requests sent.
    func testTwoLoopsAndAReloadCountEveryRequestExactly() throws {
        let config = ProxyHarness.config(targets: [upstream.address]) { config in
            var other = RouteConfig()
            other.name = "other"
            other.upstream = "backend"
            other.match.paths = [PathPattern.prefix("/other")]
            other.stripPath = true
            config.routes.insert(other, at: 0)
        }
        let loops = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let observer = GatewayObserver(accessLog: nil)
        var logger = Logger(label: "weir.test.metrics")
        logger.logLevel = .critical
        let server = ProxyServer(config: config, group: loops, observer: observer, logger: logger)
        try server.start()
        let generations = try GenerationManager(server: server, config: config, configPath: nil, logger: logger)
        defer {
            generations.stopWatching()
            _ = try? server.waitForDrain(timeout: .seconds(2)).wait()
            server.shutdown()
            try? loops.syncShutdownGracefully()
        }
        let port = server.boundAddresses["web"]!.port!

        // Per connection and round: 3 to "all" (2 x 200, 1 x 404) and 2 to "other" (200, 503).
        let perRound = 25
        func round() throws {
            let failures = NIOLockedValueBox<[String]>([])
            DispatchQueue.concurrentPerform(iterations: 4) { t in
                do {
                    let clients = try (0..<2).map { _ in try BlockingSocket(port: port, timeoutSeconds: 10) }
                    for n in 0..<perRound {
                        for client in clients {
                            for (path, status) in [("/a\(t)-\(n)", 200), ("/status/404", 404), ("/b", 200),
                                                   ("/other/x", 200), ("/other/status/503", 503)] {
                                let response = try client.request("GET", path)
                                if response.status != status { failures.withLockedValue { $0.append("\(path): \(response.status)") } }
                            }
                        }
                    }
                } catch {
                    failures.withLockedValue { $0.append("\(error)") }
                }
            }
            XCTAssertEqual(failures.withLockedValue { $0 }, [])
        }
        try round()
        if case .failure(let error) = generations.reload(config: config) { XCTFail("reload: \(error)") }
        try round()

        // 4 threads x 2 connections x perRound, twice.
        let visits = 2 * 4 * 2 * perRound
        XCTAssertTrue(waitUntil {
            observer.metrics.snapshot().requestCount(route: "all") + observer.metrics.snapshot().requestCount(route: "other") == 5 * visits
        }, "every request recorded")
        let snapshot = observer.metrics.snapshot()
        let all = try XCTUnwrap(snapshot.requests[RouteUpstreamKey(route: "all", upstream: "backend")])
        let other = try XCTUnwrap(snapshot.requests[RouteUpstreamKey(route: "other", upstream: "backend")])
        XCTAssertEqual(all.byStatusClass, [0, 2 * visits, 0, visits, 0])
        XCTAssertEqual(other.byStatusClass, [0, visits, 0, 0, visits])
        XCTAssertEqual(all.total.count, 3 * visits)
        XCTAssertEqual(all.total.counts.reduce(0, +), 3 * visits)
        XCTAssertEqual(all.upstream.count, 3 * visits)
        XCTAssertEqual(other.total.count, 2 * visits)
        let text = observer.metrics.renderPrometheus()
        XCTAssertTrue(text.contains(#"weir_requests_total{route="all",upstream="backend",status_class="2xx"} \#(2 * visits)"#), text)
        XCTAssertTrue(text.contains(#"weir_requests_total{route="other",upstream="backend",status_class="5xx"} \#(visits)"#), text)
    }
}
