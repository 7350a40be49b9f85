// plugins/key-auth through a running proxy with a real upstream; config via
// the real YAML loader.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginKeyAuthTests: UpstreamTestCase {
    private func yaml(plugin: String) -> String {
        """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: all
            match: { paths: [/] }
            upstream: backend
            plugins:
              - \(plugin)
        access_log: off
        consumers:
          - name: alice
            credentials:
              key-auth: [{ key: alice-key-1 }, { key: alice-key-2 }]
          - name: bob
            credentials:
              key-auth: [{ key: bob-key }]
        """
    }

    func testValidKeyInHeaderOrQueryIdentifiesTheConsumerAndIsHidden() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "name: key-auth"), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        let viaHeader = try client.request("GET", "/h", headers: [("ApiKey", "alice-key-2")])
        XCTAssertEqual(viaHeader.status, 200)
        let seenHeader = try XCTUnwrap(upstream.requests.first { $0.uri == "/h" })
        XCTAssertEqual(seenHeader.header("x-consumer-name"), "alice")
        XCTAssertNil(seenHeader.header("apikey"), "hide_credentials defaults to true")

        let viaQuery = try client.request("GET", "/q?x=1&apikey=bob-key")
        XCTAssertEqual(viaQuery.status, 200)
        let seenQuery = try XCTUnwrap(upstream.requests.first { $0.uri.hasPrefix("/q") })
        XCTAssertEqual(seenQuery.uri, "/q?x=1", "the key is removed from the query")
        XCTAssertEqual(seenQuery.header("x-consumer-name"), "bob")
    }

    /// A header key with hide_credentials: every apikey line goes, the
    /// client's own identity lines go, X-Consumer-Name is set once, and the
    /// key's query argument is still stripped when the request also has a
    /// query (key-auth learns there is one from identify_header_credential's
    /// third result, not from get_raw_query).
    func testHeaderKeyHidesEveryKeyLineAndTheQueryKeyAndReplacesClientIdentityLines() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "name: key-auth"), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        let response = try client.request("GET", "/both?apikey=bob-key&x=1", headers: [
            ("X-Consumer-Name", "mallory"), ("apikey", "alice-key-1"), ("X-Anonymous-Consumer", "true"),
            ("APIKEY", "other"), ("x-other", "kept")])
        XCTAssertEqual(response.status, 200)
        let seen = try XCTUnwrap(upstream.requests.first { $0.uri.hasPrefix("/both") })
        XCTAssertEqual(seen.uri, "/both?x=1", "the query's key is removed too")
        XCTAssertEqual(seen.headers.filter { $0.0.lowercased() == "x-consumer-name" }.map { $0.1 }, ["alice"])
        XCTAssertNil(seen.header("apikey"))
        XCTAssertNil(seen.header("x-anonymous-consumer"))
        XCTAssertEqual(seen.header("x-other"), "kept")

        let plain = try client.request("GET", "/plain", headers: [("apikey", "bob-key")])
        XCTAssertEqual(plain.status, 200)
        let seenPlain = try XCTUnwrap(upstream.requests.first { $0.uri == "/plain" })
        XCTAssertEqual(seenPlain.header("x-consumer-name"), "bob")
        XCTAssertNil(seenPlain.header("apikey"))
    }

    /// The hidden key header is read and cleared in one pass while the
    /// upstream request has no edit list (ExchangePlugins.withRequestHeaderClearing);
    /// after request-id set X-Request-ID (a name the proxy gives meaning
    /// to: the edit list is made) it is read, then cleared in the edit
    /// list. The upstream sees the same request either way.
    func testHiddenKeyHeaderGoesWithOrWithoutAnEditListBeforeIt() throws {
        for (n, plugins) in ["name: key-auth", "name: request-id\n      - name: key-auth"].enumerated() {
            let proxy = try startShippedPluginProxy(yaml: yaml(plugin: plugins), upstream: upstream)
            defer { proxy.stop() }
            let client = try proxy.connect()
            for (path, key) in [("/first\(n)", "alice-key-1"), ("/second\(n)", "bob-key")] {
                let response = try client.request("GET", path, headers: [
                    ("apikey", key), ("X-Consumer-Name", "mallory"), ("APIKEY", "other"), ("x-other", "kept")])
                XCTAssertEqual(response.status, 200, plugins)
                let seen = try XCTUnwrap(upstream.requests.first { $0.uri == path }, plugins)
                XCTAssertEqual(seen.headers.filter { $0.0.lowercased() == "x-consumer-name" }.map { $0.1 },
                               [key == "bob-key" ? "bob" : "alice"], plugins)
                XCTAssertNil(seen.header("apikey"), plugins)
                XCTAssertEqual(seen.header("x-other"), "kept", plugins)
            }
        }
    }

    func testMissingAndWrongKeysGet401WithWWWAuthenticate() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "name: key-auth"), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        let missing = try client.request("GET", "/missing")
        XCTAssertEqual(missing.status, 401)
        XCTAssertEqual(missing.header("www-authenticate"), "Key realm=\"weir\"")
        XCTAssertEqual(missing.header("content-type"), "application/json")
        XCTAssertTrue(missing.bodyText.contains("No API key found in request"), missing.bodyText)

        let wrong = try client.request("GET", "/wrong", headers: [("apikey", "nope")])
        XCTAssertEqual(wrong.status, 401)
        XCTAssertEqual(wrong.header("www-authenticate"), "Key realm=\"weir\"")
        XCTAssertTrue(wrong.bodyText.contains("Invalid authentication credentials"), wrong.bodyText)

        let empty = try client.request("GET", "/empty?apikey=")
        XCTAssertEqual(empty.status, 401)
        // An empty header value reaches the plugin as "" (not as absent): no key.
        let emptyHeader = try client.request("GET", "/empty-header", headers: [("apikey", "")])
        XCTAssertEqual(emptyHeader.status, 401)
        XCTAssertTrue(emptyHeader.bodyText.contains("No API key found in request"), emptyHeader.bodyText)
        XCTAssertFalse(upstream.requests.contains { ["/missing", "/wrong"].contains($0.uri) || $0.uri.hasPrefix("/empty") })
    }

    func testConfiguredNamesHeaderOnlyAndCredentialsKept() throws {
        let plugin = "{ name: key-auth, config: { key_names: [x-api-key], key_in_query: false, hide_credentials: false } }"
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: plugin), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/q?x-api-key=bob-key").status, 401, "query lookup is off")
        XCTAssertEqual(try client.request("GET", "/old", headers: [("apikey", "bob-key")]).status, 401)
        XCTAssertEqual(try client.request("GET", "/kept", headers: [("x-api-key", "bob-key")]).status, 200)
        let seen = try XCTUnwrap(upstream.requests.first { $0.uri == "/kept" })
        XCTAssertEqual(seen.header("x-api-key"), "bob-key")
        XCTAssertEqual(seen.header("x-consumer-name"), "bob")
    }

    func testAnonymousLetsUnauthenticatedRequestsThroughAsThatConsumer() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "{ name: key-auth, config: { anonymous: guest } }"),
                                                upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/anon", headers: [("apikey", "nope")]).status, 200)
        let anon = try XCTUnwrap(upstream.requests.first { $0.uri == "/anon" })
        XCTAssertEqual(anon.header("x-consumer-name"), "guest")
        XCTAssertEqual(anon.header("x-anonymous-consumer"), "true")
        XCTAssertNil(anon.header("apikey"))
        XCTAssertEqual(try client.request("GET", "/known", headers: [("apikey", "alice-key-1")]).status, 200)
        let known = try XCTUnwrap(upstream.requests.first { $0.uri == "/known" })
        XCTAssertEqual(known.header("x-consumer-name"), "alice")
        XCTAssertNil(known.header("x-anonymous-consumer"))
    }

    /// weir.client.identify sets X-Consumer-Name and sets or removes
    /// X-Anonymous-Consumer in one go (ExchangePlugins.identify): whatever
    /// the client sent under those names, in any case and any number of
    /// lines, never reaches the upstream, both while the proxy's own lines
    /// are still bytes and once a query change made the edit list.
    func testClientSentIdentityLinesNeverReachTheUpstream() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "{ name: key-auth, config: { anonymous: guest } }"),
                                                upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let forged = [("X-Consumer-Name", "mallory"), ("X-Anonymous-Consumer", "true"), ("x-anonymous-consumer", "yes"),
                      ("x-consumer-NAME", "eve")]
        XCTAssertEqual(try client.request("GET", "/known", headers: [("apikey", "alice-key-1")] + forged).status, 200)
        XCTAssertEqual(try client.request("GET", "/anon", headers: forged).status, 200)
        // The key in the query: hiding it changes the query first (the edit list).
        XCTAssertEqual(try client.request("GET", "/query?apikey=bob-key&x=1", headers: forged).status, 200)
        XCTAssertEqual(try client.request("GET", "/query-anon?apikey=nope", headers: forged).status, 200)
        for (uri, consumer, anonymous) in [("/known", "alice", []), ("/anon", "guest", ["true"]),
                                           ("/query?x=1", "bob", []), ("/query-anon", "guest", ["true"])] {
            let seen = try XCTUnwrap(upstream.requests.first { $0.uri == uri }, uri)
            XCTAssertEqual(seen.headerValues("x-consumer-name"), [consumer], uri)
            XCTAssertEqual(seen.headerValues("x-anonymous-consumer"), anonymous, uri)
            XCTAssertNil(seen.header("apikey"), uri)
        }
    }

    /// The usual config (one name, in the header, hidden, no anonymous,
    /// preflights authenticated) takes key-auth's short path; configs just
    /// outside it take the general one. Both answer the same requests alike.
    func testUsualConfigAndConfigsOutsideItAnswerAlike() throws {
        let configs = ["name: key-auth",
                       "{ name: key-auth, config: { key_names: [apikey, x-api-key] } }",
                       "{ name: key-auth, config: { run_on_preflight: false } }"]
        for (i, plugin) in configs.enumerated() {
            let proxy = try startShippedPluginProxy(yaml: yaml(plugin: plugin), upstream: upstream)
            defer { proxy.stop() }
            let client = try proxy.connect()
            let p = "/c\(i)"
            XCTAssertEqual(try client.request("GET", "\(p)/h", headers: [("apikey", "alice-key-1")]).status, 200, plugin)
            XCTAssertEqual(try client.request("GET", "\(p)/q?apikey=bob-key&x=1").status, 200, plugin)
            XCTAssertEqual(try client.request("GET", "\(p)/hq?x=2&apikey=bob-key", headers: [("apikey", "alice-key-2")]).status, 200, plugin)
            let wrongHeader = try client.request("GET", "\(p)/wq?apikey=bob-key", headers: [("apikey", "nope")])
            XCTAssertEqual(wrongHeader.status, 401, plugin)
            XCTAssertTrue(wrongHeader.bodyText.contains("Invalid authentication credentials"), plugin)
            let none = try client.request("GET", "\(p)/none?x=1")
            XCTAssertEqual(none.status, 401, plugin)
            XCTAssertTrue(none.bodyText.contains("No API key found in request"), plugin)
            // A CORS preflight without a key: authenticated unless run_on_preflight is false.
            XCTAssertEqual(try client.request("OPTIONS", "\(p)/pre").status, i == 2 ? 200 : 401, plugin)
            for (uri, consumer) in [("\(p)/h", "alice"), ("\(p)/q?x=1", "bob"), ("\(p)/hq?x=2", "alice")] {
                let seen = try XCTUnwrap(upstream.requests.first { $0.uri == uri }, "\(plugin) \(uri)")
                XCTAssertEqual(seen.headerValues("x-consumer-name"), [consumer], "\(plugin) \(uri)")
                XCTAssertNil(seen.header("apikey"), "\(plugin) \(uri)")
            }
            XCTAssertFalse(upstream.requests.contains { $0.uri.hasPrefix("\(p)/wq") || $0.uri.hasPrefix("\(p)/none") }, plugin)
        }
    }

    func testSchemaDefaultsAndBadValuesAreRefusedWithTheirPath() throws {
        // The defaults (key_names [apikey], header and query, hide_credentials)
        // are exercised by the tests above, which give no config.
        XCTAssertThrowsError(try startShippedPluginProxy(
            yaml: yaml(plugin: "{ name: key-auth, config: { hide_credentials: maybe } }"), upstream: upstream)) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config.hide_credentials"), "\(error)")
        }
        XCTAssertThrowsError(try startShippedPluginProxy(
            yaml: yaml(plugin: "{ name: key-auth, config: { key_names: [] } }"), upstream: upstream)) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config.key_names"), "\(error)")
        }
        XCTAssertThrowsError(try startShippedPluginProxy(
            yaml: yaml(plugin: "{ name: key-auth, config: { key_nmes: [a] } }"), upstream: upstream)) { error in
            XCTAssertTrue("\(error)".contains("key_nmes"), "\(error)")
        }
    }
}
