// plugins/cors and plugins/request-size-limiting through a running proxy
// with a real upstream.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginCORSTests: UpstreamTestCase {
    private func start(_ plugin: String, _ config: String) throws -> ShippedPluginProxy {
        try startShippedPluginProxy(yaml: """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: all
            match: { paths: [/] }
            upstream: backend
            plugins:
              - { name: \(plugin), config: \(config) }
        access_log: off
        """, upstream: upstream)
    }

    private func preflight(_ client: BlockingSocket, origin: String, path: String = "/pre") throws -> TestResponse {
        try client.request("OPTIONS", path, headers: [("Origin", origin), ("Access-Control-Request-Method", "PUT"),
                                                      ("Access-Control-Request-Headers", "x-a, content-type")])
    }

    func testPreflightAnsweredAtTheGatewayForAllowedOrigins() throws {
        let proxy = try start("cors", "{ origins: ['https://app.example.com', 'https://*.example.org'], methods: [GET, PUT], max_age: 600, credentials: true }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let exact = try preflight(client, origin: "https://APP.example.com")
        XCTAssertEqual(exact.status, 204)
        XCTAssertEqual(exact.header("access-control-allow-origin"), "https://APP.example.com")
        XCTAssertEqual(exact.header("access-control-allow-methods"), "GET,PUT")
        XCTAssertEqual(exact.header("access-control-allow-headers"), "x-a, content-type", "echoed when headers is empty")
        XCTAssertEqual(exact.header("access-control-max-age"), "600")
        XCTAssertEqual(exact.header("access-control-allow-credentials"), "true")
        XCTAssertEqual(exact.header("vary"), "Origin")
        let pattern = try preflight(client, origin: "https://a.b.example.org")
        XCTAssertEqual(pattern.header("access-control-allow-origin"), "https://a.b.example.org")
        for refused in ["https://evil.com", "https://example.org.evil.com", "http://app.example.com"] {
            let response = try preflight(client, origin: refused)
            XCTAssertEqual(response.status, 204)
            XCTAssertNil(response.header("access-control-allow-origin"), refused)
            XCTAssertNil(response.header("access-control-allow-methods"), refused)
        }
        XCTAssertFalse(upstream.requests.contains { $0.uri == "/pre" }, "preflights never reach the upstream")
    }

    func testActualRequestsGetHeadersOnlyForAllowedOrigins() throws {
        let proxy = try start("cors", "{ origins: ['https://app.example.com'], exposed_headers: [x-total, x-page] }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let allowed = try client.request("GET", "/data", headers: [("Origin", "https://app.example.com")])
        XCTAssertEqual(allowed.status, 200)
        XCTAssertEqual(allowed.header("access-control-allow-origin"), "https://app.example.com")
        XCTAssertEqual(allowed.header("access-control-expose-headers"), "x-total,x-page")
        XCTAssertEqual(allowed.header("vary"), "Origin")
        XCTAssertNil(allowed.header("access-control-allow-credentials"))
        let other = try client.request("GET", "/data", headers: [("Origin", "https://other.example.com")])
        XCTAssertEqual(other.status, 200, "not a CORS refusal: the browser enforces it")
        XCTAssertNil(other.header("access-control-allow-origin"))
        // A plain OPTIONS (no Access-Control-Request-Method) is not a preflight.
        XCTAssertEqual(try client.request("OPTIONS", "/plain").status, 200)
        XCTAssertTrue(upstream.requests.contains { $0.uri == "/plain" })
    }

    func testDefaultsAllowAnyOriginAndPreflightContinue() throws {
        do {
            let proxy = try start("cors", "{}")
            defer { proxy.stop() }
            let client = try proxy.connect()
            let response = try client.request("GET", "/any", headers: [("Origin", "https://x.test")])
            XCTAssertEqual(response.header("access-control-allow-origin"), "*")
            let pre = try preflight(client, origin: "https://x.test")
            XCTAssertEqual(pre.header("access-control-allow-methods"), "GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT")
        }
        let proxy = try start("cors", "{ preflight_continue: true, headers: [x-only] }")
        defer { proxy.stop() }
        let forwarded = try preflight(try proxy.connect(), origin: "https://x.test", path: "/forwarded")
        XCTAssertEqual(forwarded.status, 200)
        XCTAssertTrue(upstream.requests.contains { $0.uri == "/forwarded" })
        XCTAssertThrowsError(try start("cors", "{ max_age: -1 }")) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config.max_age"), "\(error)")
        }
    }

    func testRequestSizeLimitByContentLength() throws {
        let proxy = try start("request-size-limiting", "{ allowed_payload_size: 1, size_unit: kilobytes, require_content_length: true }")
        defer { proxy.stop() }
        let small = try proxy.connect().request("POST", "/small", body: String(repeating: "a", count: 1024))
        XCTAssertEqual(small.status, 200)
        let big = try proxy.connect().request("POST", "/big", body: String(repeating: "a", count: 1025))
        XCTAssertEqual(big.status, 413)
        XCTAssertTrue(big.bodyText.contains("Request size limit exceeded"), big.bodyText)
        XCTAssertFalse(upstream.requests.contains { $0.uri == "/big" })
        let chunkedClient = try proxy.connect()
        try chunkedClient.send("POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        let chunked = try chunkedClient.readResponse(forHead: false)
        XCTAssertEqual(chunked.status, 411)
        XCTAssertEqual(try proxy.connect().request("GET", "/nobody").status, 200)
    }

    func testRequestSizeDefaultsAndSchema() throws {
        do {
            let proxy = try start("request-size-limiting", "{}")
            defer { proxy.stop() }
            XCTAssertEqual(try proxy.connect().request("POST", "/default", body: "hello").status, 200)
            let huge = try proxy.connect().request("POST", "/huge", headers: [("Content-Length", "134217729")])
            XCTAssertEqual(huge.status, 413, "128 MiB + 1 by default")
        }
        XCTAssertThrowsError(try start("request-size-limiting", "{ size_unit: gigabytes }")) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config.size_unit"), "\(error)")
        }
    }
}
