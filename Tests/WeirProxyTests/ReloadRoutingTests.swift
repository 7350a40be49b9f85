// Hot reload of routes and upstreams through a running proxy (real
// sockets), and weir.upstream.request.set_body.

import Foundation
import NIOConcurrencyHelpers
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ReloadRoutingTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!
    var upstreamA: TestUpstream!
    var upstreamB: TestUpstream!
    var folder: PluginFolder!

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstreamA = try TestUpstream(name: "A", group: group)
        upstreamB = try TestUpstream(name: "B", group: group)
        folder = try PluginFolder()
    }

    override func tearDownWithError() throws {
        upstreamA.stop()
        upstreamB.stop()
        try group.syncShutdownGracefully()
        folder.remove()
    }

    /// Upstreams `a` (target A) and `b` (target B); `routes` maps a path
    /// prefix to an upstream name.
    private func config(routes: [(String, String)], aTargets: [TestUpstream]? = nil,
                        plugins: String = "") throws -> WeirConfig {
        let targets = (aTargets ?? [upstreamA]).map { "127.0.0.1:\($0.port)" }.joined(separator: ", ")
        let routeList = routes.enumerated().map { i, r in
            "{ name: r\(i), match: { paths: [\(r.0)] }, upstream: \(r.1)\(plugins) }"
        }.joined(separator: ", ")
        var config = try ConfigLoader.parse(yaml: """
        listeners: [{ name: web, listen: 127.0.0.1:0 }]
        upstreams:
          - { name: a, targets: [\(targets)] }
          - { name: b, targets: [127.0.0.1:\(upstreamB.port)] }
        routes: [\(routeList)]
        access_log: "off"
        """)
        config.pluginPaths = [folder.pluginsDir]
        return config
    }

    private func reload(_ proxy: PluginProxy, _ config: WeirConfig, file: StaticString = #filePath, line: UInt = #line) {
        if case .failure(let error) = proxy.generations.reload(config: config) {
            XCTFail("reload failed: \(error)", file: file, line: line)
        }
    }

    func testRouteAddedAndRemovedByReload() throws {
        let proxy = try PluginProxy(config: try config(routes: [("/a", "a")]), folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/a/1").bodyText, "ok from A")
        XCTAssertEqual(try client.request("GET", "/b/1").status, 404)

        reload(proxy, try config(routes: [("/a", "a"), ("/b", "b")]))
        // Same keep-alive connection: the new route serves.
        XCTAssertEqual(try client.request("GET", "/b/1").bodyText, "ok from B")
        XCTAssertEqual(try client.request("GET", "/a/2").bodyText, "ok from A")

        reload(proxy, try config(routes: [("/b", "b")]))
        XCTAssertEqual(try client.request("GET", "/a/3").status, 404)
        XCTAssertEqual(try client.request("GET", "/b/2").bodyText, "ok from B")
        XCTAssertEqual(proxy.generations.generation, 3)
    }

    func testChangingAnUpstreamsTargetsMovesTrafficAndKeepsWarmConnections() throws {
        let proxy = try PluginProxy(config: try config(routes: [("/", "a")]), folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<3 { XCTAssertEqual(try client.request("GET", "/x").bodyText, "ok from A") }
        XCTAssertEqual(upstreamA.connectionsAccepted, 1)

        // A reload that keeps target A (adds a route): its pooled connection is reused.
        reload(proxy, try config(routes: [("/", "a"), ("/other", "b")]))
        for _ in 0..<3 { XCTAssertEqual(try client.request("GET", "/x").bodyText, "ok from A") }
        XCTAssertEqual(upstreamA.connectionsAccepted, 1, "an unchanged target keeps its keep-alive connection")

        // Upstream a now points at B: traffic moves.
        reload(proxy, try config(routes: [("/", "a")], aTargets: [upstreamB]))
        let before = upstreamA.requests.count
        for _ in 0..<3 { XCTAssertEqual(try client.request("GET", "/x").bodyText, "ok from B") }
        XCTAssertEqual(upstreamA.requests.count, before)
    }

    /// The request in flight during the reload finishes on A; the next one
    /// on the same keep-alive connection goes to B.
    func testInFlightRequestFinishesOnTheOldUpstream() throws {
        let proxy = try PluginProxy(config: try config(routes: [("/", "a")]), folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        try client.send("GET /slow/400 HTTP/1.1\r\nHost: test.local\r\n\r\n")
        // Wait until A has the request (it answers 400 ms later).
        let deadline = Date().addingTimeInterval(5)
        while upstreamA.connectionsAccepted == 0 && Date() < deadline { usleep(2_000) }
        reload(proxy, try config(routes: [("/", "b")]))
        let inFlight = try client.readResponse()
        XCTAssertEqual(inFlight.status, 200)
        XCTAssertEqual(inFlight.bodyText, "slow from A")
        XCTAssertEqual(try client.request("GET", "/next").bodyText, "ok from B")
    }

    /// Requests flow on several keep-alive connections with zero failures
    /// while 60 reloads switch the route between upstream a and b.
    func testSoakReloadingRouteBetweenUpstreams() throws {
        let toA = try config(routes: [("/", "a")]), toB = try config(routes: [("/", "b")])
        let proxy = try PluginProxy(config: toA, folder: folder)
        defer { proxy.stop() }
        let stop = ManagedFlag()
        let failures = NIOLockedValueBox<[String]>([])
        let counts = NIOLockedValueBox<[String: Int]>([:])
        let clients = try (0..<4).map { _ in try proxy.connect() }
        let done = DispatchGroup()
        for (i, client) in clients.enumerated() {
            DispatchQueue.global().async(group: done) {
                var n = 0
                while !stop.isSet {
                    n += 1
                    do {
                        let r = try client.request("GET", "/c\(i)/\(n)")
                        if r.status == 200 && (r.bodyText == "ok from A" || r.bodyText == "ok from B") {
                            counts.withLockedValue { $0[r.bodyText, default: 0] += 1 }
                        } else {
                            failures.withLockedValue { $0.append("\(r.status) \(r.bodyText)") }
                        }
                    } catch {
                        failures.withLockedValue { $0.append("\(error)") }
                        return
                    }
                }
            }
        }
        for round in 0..<60 {
            guard case .success = proxy.generations.reload(config: round % 2 == 0 ? toB : toA) else {
                XCTFail("reload \(round) failed"); break
            }
            usleep(5_000)
        }
        stop.set()
        done.wait()
        XCTAssertEqual(failures.withLockedValue { $0 }, [])
        XCTAssertEqual(proxy.generations.generation, 61)
        let seen = counts.withLockedValue { $0 }
        XCTAssertGreaterThan(seen["ok from A", default: 0], 0)
        XCTAssertGreaterThan(seen["ok from B", default: 0], 0)
        // The last config routes to a.
        for client in clients { XCTAssertEqual(try client.request("GET", "/last").bodyText, "ok from A") }
        // Counted while the clients are certainly open: an optimised build
        // may free `clients` (closing the sockets) right after their last use.
        withExtendedLifetime(clients) {
            XCTAssertEqual(proxy.harness.observer.closed, 0, "no connection was closed or reset")
        }
    }

    func testListenerChangeIsRefusedAndRoutingKeepsServing() throws {
        let proxy = try PluginProxy(config: try config(routes: [("/", "a")]), folder: folder)
        defer { proxy.stop() }
        var changed = try config(routes: [("/", "b")])
        changed.listeners[0].listen = HostPort(host: "127.0.0.1", port: 1)
        guard case .failure(let error) = proxy.generations.reload(config: changed) else { return XCTFail("should fail") }
        XCTAssertTrue(error.description.contains("listeners"), error.description)
        XCTAssertEqual(try proxy.connect().request("GET", "/").bodyText, "ok from A")
    }

    // MARK: set_body

    func testSetBodyReplacesTheForwardedBody() throws {
        try folder.write("rebody", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          weir.upstream.request.set_body("replaced:" .. weir.request.get_method())
        end
        return P
        """)
        let proxy = try PluginProxy(config: try config(routes: [("/echo", "a")], plugins: ", plugins: [{ name: rebody }]"),
                                    folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()

        // With an original body (Content-Length).
        let post = try client.request("POST", "/echo", body: "the client's original body")
        XCTAssertEqual(post.status, 200)
        XCTAssertEqual(post.bodyText, "replaced:POST")
        XCTAssertEqual(upstreamA.lastRequest?.header("content-length"), "13")
        XCTAssertEqual(upstreamA.lastRequest?.bodyBytes, 13)

        // With a chunked original body: Transfer-Encoding dropped.
        try client.send("PUT /echo HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        let put = try client.readResponse()
        XCTAssertEqual(put.bodyText, "replaced:PUT")
        XCTAssertEqual(upstreamA.lastRequest?.header("content-length"), "12")
        XCTAssertNil(upstreamA.lastRequest?.header("transfer-encoding"))

        // Without an original body.
        let get = try client.request("GET", "/echo")
        XCTAssertEqual(get.bodyText, "replaced:GET")
        XCTAssertEqual(upstreamA.lastRequest?.header("content-length"), "12")
        XCTAssertEqual(upstreamA.lastRequest?.bodyBytes, 12)
        // The connection stays usable.
        XCTAssertEqual(try client.request("POST", "/echo", body: "x").bodyText, "replaced:POST")
    }
}
