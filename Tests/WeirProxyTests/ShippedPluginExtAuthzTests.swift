// plugins/ext-authz through a running proxy, a real upstream and a real
// authorization service on loopback (ScriptedHTTPServer): allow with
// headers, deny with headers and body, slow service -> timeout, service
// down, failure_mode_allow.

import Foundation
import NIOCore
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginExtAuthzTests: UpstreamTestCase {
    var auth: ScriptedHTTPServer!

    override func setUpWithError() throws {
        try super.setUpWithError()
        // The token in Authorization decides.
        auth = try ScriptedHTTPServer(group: group) { request in
            switch request.header("authorization") {
            case "Bearer good":
                return ScriptedReply(status: 200, headers: [("x-user-id", "alice"), ("x-user-role", "admin"), ("x-session", "s1")])
            case "Bearer slow":
                return ScriptedReply(status: 200, delay: .seconds(3))
            case "Bearer broken":
                return ScriptedReply(status: 500, body: "oops")
            case "Bearer login":
                return ScriptedReply(status: 302, headers: [("location", "https://login.example/")])
            default:
                return ScriptedReply(status: 401, headers: [("www-authenticate", "Bearer realm=\"api\""),
                                                            ("content-type", "application/json"), ("x-secret", "no")],
                                     body: #"{"error":"bad token"}"#)
            }
        }
    }

    override func tearDownWithError() throws {
        auth.stop()
        try super.tearDownWithError()
    }

    private func start(_ config: String) throws -> ShippedPluginProxy {
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: api
            match: { paths: [/] }
            upstream: backend
            plugins:
              - name: ext-authz
                config: \(config)
        access_log: off
        """
        return try startShippedPluginProxy(yaml: yaml, upstream: upstream)
    }

    /// weir.http keeps the connection to the authorization service: five
    /// sequential checks arrive on one connection; a service answering
    /// `connection: close` gets a new connection for the next check.
    func testAuthorizationCallsReuseOneKeepAliveConnection() throws {
        let proxy = try start("{ url: \"\(auth.url)/check\" }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        for i in 0..<5 {
            XCTAssertEqual(try client.request("GET", "/k\(i)", headers: [("authorization", "Bearer good")]).status, 200)
        }
        XCTAssertEqual(auth.requests.count, 5)
        XCTAssertEqual(auth.connections, 1, "sequential calls share one keep-alive connection")

        auth.setScript { _ in ScriptedReply(status: 200, headers: [("connection", "close")]) }
        for i in 0..<2 {
            XCTAssertEqual(try client.request("GET", "/c\(i)", headers: [("authorization", "Bearer good")]).status, 200)
        }
        XCTAssertEqual(auth.requests.count, 7)
        XCTAssertEqual(auth.connections, 2, "the kept connection carried the first close answer; the next check needed a new one")
    }

    /// An https authorization service: its certificate is checked against
    /// ca_file (a test CA); with the system's CAs it is not trusted, so the
    /// call fails and status_on_error answers.
    func testHTTPSServiceIsVerifiedAgainstCAFile() throws {
        let pki = TestPKI.shared
        let secure = try ScriptedHTTPServer(group: group, tls: (pki.cert("localhost"), pki.key("localhost"))) { _ in
            ScriptedReply(status: 200, headers: [("x-user-id", "alice")])
        }
        defer { secure.stop() }
        do {
            let proxy = try start("{ url: \"\(secure.url)/check\", ca_file: \"\(pki.cert("ca"))\", upstream_headers: [x-user-id] }")
            defer { proxy.stop() }
            let client = try proxy.connect()
            for i in 0..<3 { XCTAssertEqual(try client.request("GET", "/s\(i)").status, 200) }
            XCTAssertEqual(upstream.lastRequest?.header("x-user-id"), "alice")
            XCTAssertEqual(secure.requests.count, 3)
            XCTAssertEqual(secure.connections, 1, "one TLS connection, kept alive")
        }
        let proxy = try start("{ url: \"\(secure.url)/check\" }")
        defer { proxy.stop() }
        XCTAssertEqual(try proxy.connect().request("GET", "/untrusted").status, 503, "status_on_error: the handshake failed")
        XCTAssertEqual(secure.requests.count, 3)
    }

    func testAllowCopiesSelectedHeadersAndSendsRequestContext() throws {
        let proxy = try start("""
        { url: "\(auth.url)/check", request_headers: [authorization, x-tenant],
          upstream_headers: [x-user-id, X-User-Role], client_headers_on_allow: [x-session] }
        """)
        defer { proxy.stop() }
        let response = try proxy.connect().request("GET", "/orders/1?full=1", headers: [
            ("authorization", "Bearer good"), ("x-tenant", "t1"), ("x-other", "not sent")])
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.header("x-session"), "s1")
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertEqual(seen.header("x-user-id"), "alice")
        XCTAssertEqual(seen.header("x-user-role"), "admin")
        XCTAssertNil(seen.header("x-session"), "not listed in upstream_headers")

        let check = try XCTUnwrap(auth.requests.last)
        XCTAssertEqual(check.method, "GET")
        XCTAssertEqual(check.uri, "/check")
        XCTAssertEqual(check.header("authorization"), "Bearer good")
        XCTAssertEqual(check.header("x-tenant"), "t1")
        XCTAssertNil(check.header("x-other"))
        XCTAssertEqual(check.header("x-forwarded-method"), "GET")
        XCTAssertEqual(check.header("x-forwarded-uri"), "/orders/1?full=1")
        XCTAssertEqual(check.header("x-forwarded-host"), "test.local")
        XCTAssertEqual(check.header("x-forwarded-for"), "127.0.0.1")
    }

    func testDenyPassesStatusBodyAndSelectedHeaders() throws {
        let proxy = try start("{ url: \"\(auth.url)/check\" }")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let denied = try client.request("GET", "/x", headers: [("authorization", "Bearer bad")])
        XCTAssertEqual(denied.status, 401)
        XCTAssertEqual(denied.header("www-authenticate"), "Bearer realm=\"api\"")
        XCTAssertEqual(denied.header("content-type"), "application/json")
        XCTAssertEqual(denied.bodyText, #"{"error":"bad token"}"#)
        XCTAssertNil(denied.header("x-secret"), "only client_headers go to the client")
        XCTAssertTrue(upstream.requests.isEmpty, "a denied request never reaches the upstream")

        let redirect = try client.request("GET", "/x", headers: [("authorization", "Bearer login")])
        XCTAssertEqual(redirect.status, 302)
        XCTAssertEqual(redirect.header("location"), "https://login.example/")
        XCTAssertTrue(upstream.requests.isEmpty)
    }

    func testConfiguredDenyStatusAndBody() throws {
        let proxy = try start("{ url: \"\(auth.url)/check\", deny_status: 403, deny_body: \"go away\", client_headers: [] }")
        defer { proxy.stop() }
        let denied = try proxy.connect().request("GET", "/x")
        XCTAssertEqual(denied.status, 403)
        XCTAssertEqual(denied.bodyText, "go away")
        XCTAssertNil(denied.header("www-authenticate"))
    }

    func testBodyIsSentWhenAsked() throws {
        let proxy = try start("{ url: \"\(auth.url)/check\", method: POST, include_body: 5 }")
        defer { proxy.stop() }
        let response = try proxy.connect().request("POST", "/x", headers: [("authorization", "Bearer good")], body: "0123456789")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(auth.requests.last?.method, "POST")
        XCTAssertEqual(auth.requests.last?.bodyText, "01234")
        XCTAssertEqual(upstream.lastRequest?.bodyBytes, 10, "the upstream still gets the whole body")
    }

    /// A slow service times out; a 5xx and a service that is down are
    /// failures too: status_on_error, or through with failure_mode_allow.
    func testTimeoutDownAndFailureModeAllow() throws {
        let strict = try start("{ url: \"\(auth.url)/check\", timeout: 0.2 }")
        let client = try strict.connect()
        let slow = try client.request("GET", "/x", headers: [("authorization", "Bearer slow")])
        XCTAssertEqual(slow.status, 503)
        let broken = try client.request("GET", "/x", headers: [("authorization", "Bearer broken")])
        XCTAssertEqual(broken.status, 503)
        XCTAssertTrue(upstream.requests.isEmpty)
        strict.stop()

        let lenient = try start("{ url: \"\(auth.url)/check\", timeout: 0.2, failure_mode_allow: true, upstream_headers: [x-user-id] }")
        defer { lenient.stop() }
        let allowed = try lenient.connect().request("GET", "/x", headers: [("authorization", "Bearer slow")])
        XCTAssertEqual(allowed.status, 200)
        XCTAssertEqual(upstream.lastRequest?.header("x-weir-auth-failure-mode-allowed"), "true")
        XCTAssertNil(upstream.lastRequest?.header("x-user-id"))

        // The service goes away: connection refused.
        auth.stop()
        let down = try lenient.connect().request("GET", "/y", headers: [("authorization", "Bearer good")])
        XCTAssertEqual(down.status, 200)
        XCTAssertEqual(upstream.requests.count, 2)
        let strictAgain = try start("{ url: \"\(auth.url)/check\", status_on_error: 500 }")
        defer { strictAgain.stop() }
        let refused = try strictAgain.connect().request("GET", "/z", headers: [("authorization", "Bearer good")])
        XCTAssertEqual(refused.status, 500)
        XCTAssertEqual(upstream.requests.count, 2)
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        let cases: [(String, String)] = [
            ("{ }", "routes[0].plugins[0].config.url: required field missing"),
            ("{ url: \"http://a:1/\", method: DELETE }", "routes[0].plugins[0].config.method"),
            ("{ url: \"http://a:1/\", timeout: 0 }", "routes[0].plugins[0].config.timeout"),
            ("{ url: \"http://a:1/\", deny_status: 200 }", "routes[0].plugins[0].config.deny_status"),
            ("{ url: \"http://a:1/\", upstream_headers: x-a }", "routes[0].plugins[0].config.upstream_headers"),
        ]
        for (config, expected) in cases {
            XCTAssertThrowsError(try start(config), config) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(config): \(error)")
            }
        }
    }
}
