// A kept-alive HTTP/1.1 connection reuses its finished exchange
// (`DownstreamHandler.keepForReuse`) and the request id is kept as bytes
// until something asks for its String (`Exchange.id`): through a running
// gateway, each request of one connection has its own id, the same one in
// every place it shows (the upstream's X-Request-Id, the access record, an
// error's X-Request-Id and JSON body, a plugin's weir.request.get_id()),
// and nothing of an earlier request shows in a later one's record.

import Foundation
import WeirCore
@testable import WeirProxy
import XCTest

final class ExchangeReuseRequestIDTests: PluginFolderTestCase {
    func testEveryRequestOfAConnectionHasItsOwnIDEverywhere() throws {
        // Copies the request id a plugin reads into an upstream header.
        try folder.write("show-id", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request()
          weir.upstream.request.set_header("x-plugin-saw-id", weir.request.get_id())
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { config in
            var gone = UpstreamConfig()
            gone.name = "gone"
            gone.targets = [TargetConfig(address: HostPort(host: "127.0.0.1", port: 1))]
            gone.timeouts.connect = .seconds(2)
            config.upstreams.append(gone)
            var dead = RouteConfig()
            dead.name = "dead"
            dead.upstream = "gone"
            dead.match.paths = [PathPattern.prefix("/dead")]
            var plugged = RouteConfig()
            plugged.name = "plugged"
            plugged.upstream = "backend"
            plugged.match.paths = [PathPattern.prefix("/plugged")]
            plugged.plugins = [pluginRef("show-id")]
            config.routes.insert(contentsOf: [dead, plugged], at: 0)
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let observer = proxy.harness.observer

        // A fresh connection's record of the request the reused exchange serves last.
        do {
            let fresh = try proxy.connect()
            XCTAssertEqual(try fresh.request("GET", "/reference").status, 200)
        }

        let client = try proxy.connect()
        // A body, a chunked response, a 404: fields a later request must not inherit.
        XCTAssertEqual(try client.request("POST", "/sink", body: String(repeating: "b", count: 3000)).status, 200)
        XCTAssertEqual(try client.request("GET", "/trailers").status, 200)
        XCTAssertEqual(try client.request("GET", "/status/404").status, 404)
        // An error answered by the proxy, after a reused exchange.
        let failed = try client.request("GET", "/dead/x")
        XCTAssertEqual(failed.status, 502)
        let errorID = try XCTUnwrap(failed.header("x-request-id"))
        XCTAssertTrue(failed.bodyText.contains("\"request_id\":\"\(errorID)\""), failed.bodyText)
        // The spare exchange now serves a request with a plugin scope.
        XCTAssertEqual(try client.request("GET", "/plugged").status, 200)
        // Three pipelined requests in one write.
        try client.send("GET /p1 HTTP/1.1\r\nHost: test.local\r\n\r\nGET /p2 HTTP/1.1\r\nHost: test.local\r\n\r\n"
                        + "GET /p3 HTTP/1.1\r\nHost: test.local\r\n\r\n")
        for _ in 0..<3 { XCTAssertEqual(try client.readResponse().status, 200) }
        XCTAssertEqual(try client.request("GET", "/reference").status, 200)

        XCTAssertTrue(waitUntil { observer.records.count == 10 }, "\(observer.records.count) records")
        let records = observer.records
        let upstreamSeen = upstream.requests
        let ids = records.map(\.requestID)
        XCTAssertEqual(Set(ids).count, ids.count, "one id per request: \(ids)")

        // Each proxied request's upstream X-Request-Id is its record's id.
        for seen in upstreamSeen {
            let id = try XCTUnwrap(seen.header("x-request-id"), seen.uri)
            let record = try XCTUnwrap(records.first { $0.requestID == id }, "no record for \(seen.uri) id \(id)")
            XCTAssertEqual(record.path, seen.uri)
            XCTAssertEqual(seen.headerValues("x-request-id").count, 1)
        }
        XCTAssertEqual(upstreamSeen.map(\.uri), ["/reference", "/sink", "/trailers", "/status/404", "/plugged",
                                                 "/p1", "/p2", "/p3", "/reference"])
        // The error's id, in its header and body, is its record's.
        let errorRecord = try XCTUnwrap(records.first { $0.path == "/dead/x" })
        XCTAssertEqual(errorRecord.requestID, errorID)
        XCTAssertEqual(errorRecord.status, 502)
        // The plugin read the id the upstream got.
        let plugged = try XCTUnwrap(upstreamSeen.first { $0.uri == "/plugged" })
        XCTAssertEqual(plugged.header("x-plugin-saw-id"), plugged.header("x-request-id"))

        // The last request on the long-lived connection (a reused exchange)
        // is recorded as the same request on a fresh connection was.
        let references = records.filter { $0.path == "/reference" }
        XCTAssertEqual(references.count, 2)
        if references.count == 2 {
            let (first, last) = (references[0], references[1])
            XCTAssertEqual(last.status, first.status)
            XCTAssertEqual(last.bytesIn, first.bytesIn)
            XCTAssertEqual(last.bytesOut, first.bytesOut)
            XCTAssertEqual(last.attempts, first.attempts)
            XCTAssertEqual(last.route, first.route)
            XCTAssertEqual(last.upstreamTarget, first.upstreamTarget)
            XCTAssertNotNil(last.upstreamDuration)
        }
        // Statuses and routes as sent, in order.
        let byPath = Dictionary(records.map { ($0.path, $0) }, uniquingKeysWith: { first, _ in first })
        XCTAssertEqual(byPath["/sink"]?.status, 200)
        XCTAssertEqual(byPath["/status/404"]?.status, 404)
        XCTAssertEqual(byPath["/dead/x"]?.route, "dead")
        XCTAssertEqual(byPath["/plugged"]?.route, "plugged")
        XCTAssertEqual(byPath["/p2"]?.route, "all")
        XCTAssertEqual(byPath["/p3"]?.attempts, 1)
    }
}
