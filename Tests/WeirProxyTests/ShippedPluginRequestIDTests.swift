// plugins/request-id through a running proxy with a real upstream.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginRequestIDTests: UpstreamTestCase {
    private func start(_ config: String) throws -> ShippedPluginProxy {
        try startShippedPluginProxy(yaml: """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - { name: all, match: { paths: [/] }, upstream: backend }
        plugins:
          - { name: request-id, config: \(config) }
        access_log: off
        """, upstream: upstream)
    }

    func testGeneratesAUUIDSentUpstreamAndEchoed() throws {
        let proxy = try start("{}")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let response = try client.request("GET", "/one")
        XCTAssertEqual(response.status, 200)
        let id = try XCTUnwrap(response.header("x-request-id"))
        XCTAssertNotNil(id.range(of: "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
                                 options: .regularExpression), id)
        XCTAssertEqual(upstream.requests.first { $0.uri == "/one" }?.header("x-request-id"), id)
        let other = try client.request("GET", "/two").header("x-request-id")
        XCTAssertNotEqual(other, id, "a new id per request")
    }

    func testTrustsAWellFormedIncomingIDOnly() throws {
        let proxy = try start("{ max_length: 20 }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let kept = try client.request("GET", "/kept", headers: [("X-Request-ID", "abc-123")])
        XCTAssertEqual(kept.header("x-request-id"), "abc-123")
        XCTAssertEqual(upstream.requests.first { $0.uri == "/kept" }?.header("x-request-id"), "abc-123")
        let long = String(repeating: "x", count: 21)
        let replaced = try client.request("GET", "/long", headers: [("X-Request-ID", long)])
        XCTAssertNotEqual(replaced.header("x-request-id"), long)
        XCTAssertEqual(replaced.header("x-request-id")?.count, 36)
        let spaced = try client.request("GET", "/spaced", headers: [("X-Request-ID", "a b")])
        XCTAssertNotEqual(spaced.header("x-request-id"), "a b")
    }

    func testCustomHeaderUntrustedGatewayGeneratorNoEcho() throws {
        let proxy = try start("{ header_name: x-correlation-id, trust_incoming: false, generator: gateway, echo_downstream: false }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let response = try client.request("GET", "/c", headers: [("x-correlation-id", "from-client")])
        XCTAssertEqual(response.status, 200)
        XCTAssertNil(response.header("x-correlation-id"), "echo off")
        let seen = try XCTUnwrap(upstream.requests.first { $0.uri == "/c" })
        XCTAssertNotNil(seen.header("x-request-id"))
        XCTAssertEqual(seen.header("x-correlation-id"), seen.header("x-request-id"),
                       "the gateway's own request id, not the client's")
    }

    func testSchemaRefusesBadValues() throws {
        XCTAssertThrowsError(try start("{ generator: counter }")) { error in
            XCTAssertTrue("\(error)".contains("plugins[0].config.generator"), "\(error)")
        }
        XCTAssertThrowsError(try start("{ header_name: '' }")) { error in
            XCTAssertTrue("\(error)".contains("plugins[0].config.header_name"), "\(error)")
        }
    }
}
