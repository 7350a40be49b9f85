// Upgrade requests on connections with reused exchanges
// (`DownstreamHandler.keepForReuse`): an accepted Upgrade begins the spare
// exchange and still becomes a tunnel; a refused one ends its client
// connection after the normal response, and its upstream connection is not
// pooled (`checkUpgradeResponse`): the upstream was asked to switch
// protocols and may have stopped parsing HTTP (NIO's HTTP server does), so
// a pooled one held the next client's request until the read timeout (504).

import Foundation
import WeirCore
@testable import WeirProxy
import XCTest

final class ExchangeReuseUpgradeTests: UpstreamTestCase {
    private let upgradeHead = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        + "Sec-WebSocket-Version: 13\r\n"

    func testARefusedUpgradesUpstreamConnectionServesNoOtherClient() throws {
        var config = ProxyHarness.config(targets: [upstream.address])
        config.upstreams[0].timeouts.read = .seconds(2)
        let proxy = try ProxyHarness(config: config, loops: 1)
        defer { proxy.stop() }

        let refusing = try proxy.connect()
        XCTAssertEqual(try refusing.request("GET", "/first").status, 200)
        try refusing.send("GET /refused HTTP/1.1\r\nHost: a\r\n" + upgradeHead + "\r\n")
        let refused = try refusing.readResponse()
        XCTAssertEqual(refused.status, 200)
        XCTAssertEqual(refused.bodyText, "ok from upstream")
        XCTAssertTrue(refusing.waitForClose(), "after a refused upgrade the client connection carries no more requests")
        XCTAssertEqual(upstream.requests.last?.header("upgrade")?.lowercased(), "websocket")

        // Another client on the same loop and upstream: served on a fresh
        // upstream connection, not on the one asked to upgrade (whose NIO
        // server no longer parses requests: a 504 after the read timeout).
        let other = try proxy.connect()
        let response = try other.request("GET", "/other-client")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(upstream.requests.map(\.uri), ["/first", "/refused", "/other-client"])
        XCTAssertEqual(upstream.connectionsAccepted, 2)
    }

    func testUpgradeAfterReusedExchangesBecomesATunnel() throws {
        let echo = try RawUpstream.upgradeEcho(group: group)
        defer { echo.stop() }
        let config = ProxyHarness.config(targets: [upstream.address]) { config in
            var tunnel = UpstreamConfig()
            tunnel.name = "tunnel"
            tunnel.targets = [TargetConfig(address: echo.address)]
            config.upstreams.append(tunnel)
            var ws = RouteConfig()
            ws.name = "ws"
            ws.upstream = "tunnel"
            ws.match.paths = [PathPattern.prefix("/ws")]
            config.routes.insert(ws, at: 0)
        }
        let proxy = try ProxyHarness(config: config, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/one").status, 200)
        XCTAssertEqual(try client.request("POST", "/sink", body: "abc").status, 200)
        try client.send("GET /ws HTTP/1.1\r\nHost: a\r\n" + upgradeHead + "\r\n")
        XCTAssertEqual(try client.readResponse().status, 101)
        XCTAssertEqual(client.readLine(), "hello-from-upstream")
        for message in ["ping 1", "GET /not-a-request HTTP/1.1"] {
            try client.send(message + "\n")
            XCTAssertEqual(client.readLine(), message)
        }
        XCTAssertEqual(upstream.requests.map(\.uri), ["/one", "/sink"], "tunnelled bytes are not requests")
    }
}
