// plugins/request-transformer and plugins/response-transformer through a
// running proxy with a real upstream; config via the real YAML loader.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginTransformerTests: UpstreamTestCase {
    private func start(routes: String) throws -> ShippedPluginProxy {
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
        \(routes)
        access_log: off
        consumers:
          - name: alice
            credentials:
              key-auth: [{ key: alice-key }]
        """
        return try startShippedPluginProxy(yaml: yaml, upstream: upstream)
    }

    func testRequestHeadersAndQueryInKongOrder() throws {
        let proxy = try start(routes: """
          - name: t
            match: { paths: [/t] }
            upstream: backend
            plugins:
              - name: request-transformer
                config:
                  remove: { headers: [X-Remove], querystring: [drop] }
                  rename: { headers: { x-old: x-renamed }, querystring: { old: renamed } }
                  replace: { headers: { x-rep: new, x-absent: v }, querystring: { rep: y, absent: v } }
                  add: { headers: { x-keep: added, x-added: a, x-renamed: not-added }, querystring: { keep: other, added: a } }
                  append: { headers: { x-multi: m2 }, querystring: { flag: f } }
        """)
        defer { proxy.stop() }
        let response = try proxy.connect().request("GET", "/t?drop=1&old=a&rep=x&keep=k&flag", headers: [
            ("x-remove", "1"), ("x-old", "v"), ("x-rep", "old"), ("x-keep", "client"), ("x-multi", "m1"),
        ])
        XCTAssertEqual(response.status, 200)
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertNil(seen.header("x-remove"))
        XCTAssertNil(seen.header("x-old"))
        XCTAssertEqual(seen.header("x-renamed"), "v", "renamed before add: add does not override it")
        XCTAssertEqual(seen.header("x-rep"), "new")
        XCTAssertNil(seen.header("x-absent"), "replace only touches present headers")
        XCTAssertEqual(seen.header("x-keep"), "client", "add only sets absent headers")
        XCTAssertEqual(seen.header("x-added"), "a")
        XCTAssertEqual(seen.headerValues("x-multi"), ["m1", "m2"])
        // Re-encoded with keys sorted; the bare flag keeps an empty value.
        XCTAssertEqual(seen.uri, "/t?added=a&flag=&flag=f&keep=k&renamed=a&rep=y")
    }

    /// The transformer works on the upstream request as earlier plugins left
    /// it: key-auth's hidden key is not brought back by re-encoding the query.
    func testKeepsEarlierPluginsChanges() throws {
        let proxy = try start(routes: """
          - name: k
            match: { paths: [/k] }
            upstream: backend
            plugins:
              - name: key-auth
              - { name: request-transformer, config: { add: { querystring: { x: "1" } } } }
          - name: untouched
            match: { paths: [/u] }
            upstream: backend
            plugins:
              - { name: request-transformer, config: { replace: { querystring: { absent: v } } } }
        """)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/k?apikey=alice-key&z=2").status, 200)
        XCTAssertEqual(upstream.lastRequest?.uri, "/k?x=1&z=2")
        XCTAssertEqual(try client.request("GET", "/u?b=2&a=1").status, 200)
        XCTAssertEqual(upstream.lastRequest?.uri, "/u?b=2&a=1", "nothing changed: the query is not re-encoded")
    }

    func testResponseHeaders() throws {
        let proxy = try start(routes: """
          - name: r
            match: { paths: [/r] }
            upstream: backend
            plugins:
              - name: response-transformer
                config:
                  rename: { headers: { x-upstream: x-served-by } }
                  replace: { headers: { x-absent: v } }
                  add: { headers: { x-new: "1", x-served-by: not-added } }
                  append: { headers: { x-served-by: extra } }
          - name: removed
            match: { paths: [/removed] }
            upstream: backend
            plugins:
              - { name: response-transformer, config: { remove: { headers: [X-Upstream] } } }
        """)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let renamed = try client.request("GET", "/r")
        XCTAssertEqual(renamed.status, 200)
        XCTAssertNil(renamed.header("x-upstream"))
        XCTAssertEqual(renamed.headerValues("x-served-by"), ["upstream", "extra"])
        XCTAssertEqual(renamed.header("x-new"), "1")
        XCTAssertNil(renamed.header("x-absent"))
        XCTAssertTrue(renamed.bodyText.contains("ok from upstream"), "the body is untouched")

        let removed = try client.request("GET", "/removed")
        XCTAssertEqual(removed.status, 200)
        XCTAssertNil(removed.header("x-upstream"))
    }

    /// An early exit of another plugin (here fault-injection) skips the rest
    /// of the request phase, but the response phase runs on the exit: it is
    /// transformed like an upstream response.
    func testEarlyExitIsTransformed() throws {
        let proxy = try start(routes: """
          - name: exit
            match: { paths: [/exit] }
            upstream: backend
            plugins:
              - { name: fault-injection, config: { abort_percent: 100, abort_status: 418 } }
              - { name: response-transformer, config: { add: { headers: { x-added: "1" } } } }
        """)
        defer { proxy.stop() }
        let response = try proxy.connect().request("GET", "/exit")
        XCTAssertEqual(response.status, 418)
        XCTAssertEqual(response.header("x-added"), "1", "documented in response-transformer/README.md")
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        let cases: [(String, String, String)] = [
            ("request-transformer", "{ add: { headers: [x-a] } }", "routes[0].plugins[0].config.add.headers"),
            ("request-transformer", "{ remove: { querystring: [\"\"] } }", "routes[0].plugins[0].config.remove.querystring"),
            ("request-transformer", "{ append: { body: { a: b } } }", "routes[0].plugins[0].config.append"),
            ("response-transformer", "{ rename: { headers: { a: [b] } } }", "routes[0].plugins[0].config.rename.headers"),
            ("response-transformer", "{ remove: { querystring: [a] } }", "routes[0].plugins[0].config.remove"),
        ]
        for (plugin, config, expected) in cases {
            XCTAssertThrowsError(try start(routes: """
              - name: all
                match: { paths: [/] }
                upstream: backend
                plugins:
                  - { name: \(plugin), config: \(config) }
            """), config) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(config): \(error)")
            }
        }
    }
}
