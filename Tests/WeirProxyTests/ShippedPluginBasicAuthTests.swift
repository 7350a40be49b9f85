// plugins/basic-auth through a running proxy with a real upstream; config via
// the real YAML loader. Passwords are given plain (hashed at load) and
// pre-hashed (pbkdf2-sha256$...).

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginBasicAuthTests: UpstreamTestCase {
    /// bob's password "hunter2", hashed by Python's hashlib.pbkdf2_hmac('sha256',
    /// b'hunter2', b'0123456789abcdef', 1000, 32) (an independent implementation).
    static let bobHash = "pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$pj4T35D2v4tYmC1sTJ1y5tcMADOdtnQGvuHmyYDQh2g"

    private func yaml(plugin: String, bobPassword: String = bobHash, extra: String = "") -> String {
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
              basic-auth: [{ username: alice, password: "open sesame", iterations: 1000 }]
          - name: bob
            credentials:
              basic-auth: [{ username: bob, password: "\(bobPassword)"\(extra) }]
        """
    }

    private func basic(_ user: String, _ password: String) -> (String, String) {
        ("Authorization", "Basic " + Data("\(user):\(password)".utf8).base64EncodedString())
    }

    func testPlainAndPreHashedPasswordsIdentifyTheConsumerAndTheHeaderIsHidden() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "name: basic-auth"), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        XCTAssertEqual(try client.request("GET", "/alice", headers: [basic("alice", "open sesame")]).status, 200)
        let alice = try XCTUnwrap(upstream.requests.first { $0.uri == "/alice" })
        XCTAssertEqual(alice.header("x-consumer-name"), "alice")
        XCTAssertNil(alice.header("authorization"), "hide_credentials defaults to true")

        // The scheme is case-insensitive; a pre-hashed credential verifies the same way.
        let bobHeader = ("authorization", "basic " + Data("bob:hunter2".utf8).base64EncodedString())
        XCTAssertEqual(try client.request("GET", "/bob", headers: [bobHeader]).status, 200)
        XCTAssertEqual(upstream.requests.first { $0.uri == "/bob" }?.header("x-consumer-name"), "bob")
    }

    func testMissingMalformedAndWrongCredentialsGet401EvenAfterASuccessIsCached() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "name: basic-auth"), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        let missing = try client.request("GET", "/missing")
        XCTAssertEqual(missing.status, 401)
        XCTAssertEqual(missing.header("www-authenticate"), "Basic realm=\"weir\"")
        XCTAssertEqual(missing.header("content-type"), "application/json")
        XCTAssertTrue(missing.bodyText.contains("No credentials found in request"), missing.bodyText)

        // A success is cached (cache_ttl 30 s): the wrong password right after must still fail,
        // also one that differs only in its last byte, and the right one must still pass.
        XCTAssertEqual(try client.request("GET", "/ok1", headers: [basic("bob", "hunter2")]).status, 200)
        for (i, password) in ["hunter3", "hunter", "hunter2 ", "", "HUNTER2"].enumerated() {
            let wrong = try client.request("GET", "/wrong\(i)", headers: [basic("bob", password)])
            XCTAssertEqual(wrong.status, 401, "password \(password)")
            XCTAssertTrue(wrong.bodyText.contains("Invalid authentication credentials"), wrong.bodyText)
            XCTAssertEqual(wrong.header("www-authenticate"), "Basic realm=\"weir\"")
        }
        XCTAssertEqual(try client.request("GET", "/ok2", headers: [basic("bob", "hunter2")]).status, 200)
        // alice's password under bob's name, an unknown user, garbage.
        XCTAssertEqual(try client.request("GET", "/swap", headers: [basic("bob", "open sesame")]).status, 401)
        XCTAssertEqual(try client.request("GET", "/nobody", headers: [basic("carol", "x")]).status, 401)
        XCTAssertEqual(try client.request("GET", "/bearer", headers: [("Authorization", "Bearer abc")]).status, 401)
        XCTAssertEqual(try client.request("GET", "/nocolon", headers: [("Authorization", "Basic " + Data("bob".utf8).base64EncodedString())]).status, 401)
        XCTAssertEqual(try client.request("GET", "/junk", headers: [("Authorization", "Basic !!!")]).status, 401)
        // The hash itself is not a password.
        XCTAssertEqual(try client.request("GET", "/hash", headers: [basic("bob", Self.bobHash)]).status, 401)
        let reached = Set(upstream.requests.map(\.uri))
        XCTAssertEqual(reached, ["/ok1", "/ok2"])
    }

    /// An unknown username runs the same PBKDF2 verification (against a
    /// dummy credential) as a known one, so timing does not reveal which
    /// usernames exist. Checked by its count, never by timing: every unknown
    /// username is counted, known ones (right or wrong password) and
    /// requests without a username are not.
    func testUnknownUsernamesRunTheDummyVerification() throws {
        let metrics = PluginMetrics()
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "{ name: basic-auth, config: { cache_ttl: 0 } }"),
                                                upstream: upstream, loops: 1, metrics: metrics)
        defer { proxy.stop() }
        let client = try proxy.connect()
        func unknownChecks() -> Int {
            let prefix = #"weir_plugin_events_total{plugin="basic-auth",event="unknown_username_checks"} "#
            let line = metrics.renderPrometheus().split(separator: "\n").first { $0.hasPrefix(prefix) }
            return line.flatMap { Int($0.dropFirst(prefix.count)) } ?? 0
        }
        XCTAssertEqual(try client.request("GET", "/bob", headers: [basic("bob", "hunter2")]).status, 200)
        XCTAssertEqual(try client.request("GET", "/bobwrong", headers: [basic("bob", "nope")]).status, 401)
        XCTAssertEqual(try client.request("GET", "/none").status, 401)
        XCTAssertEqual(try client.request("GET", "/junk", headers: [("Authorization", "Basic !!!")]).status, 401)
        XCTAssertEqual(unknownChecks(), 0, "known users and requests without a username take the real path")

        for (i, user) in ["carol", "dave", "", "Bob"].enumerated() {
            let answer = try client.request("GET", "/unknown\(i)", headers: [basic(user, "hunter2")])
            XCTAssertEqual(answer.status, 401)
            XCTAssertTrue(answer.bodyText.contains("Invalid authentication credentials"), "same answer as a wrong password")
        }
        XCTAssertEqual(unknownChecks(), 4, "each unknown username ran the dummy verification")
        XCTAssertEqual(Set(upstream.requests.map(\.uri)), ["/bob"])
    }

    func testCacheOffRealmAnonymousAndKeptCredentials() throws {
        let config = "{ name: basic-auth, config: { cache_ttl: 0, realm: api, hide_credentials: false, anonymous: guest } }"
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/kept", headers: [basic("bob", "hunter2")]).status, 200)
        let kept = try XCTUnwrap(upstream.requests.first { $0.uri == "/kept" })
        XCTAssertNotNil(kept.header("authorization"))
        XCTAssertEqual(kept.header("x-consumer-name"), "bob")
        XCTAssertNil(kept.header("x-anonymous-consumer"))

        XCTAssertEqual(try client.request("GET", "/anon", headers: [basic("bob", "nope")]).status, 200)
        let anon = try XCTUnwrap(upstream.requests.first { $0.uri == "/anon" })
        XCTAssertEqual(anon.header("x-consumer-name"), "guest")
        XCTAssertEqual(anon.header("x-anonymous-consumer"), "true")

        let realm = try startShippedPluginProxy(yaml: yaml(plugin: "{ name: basic-auth, config: { realm: api } }"), upstream: upstream)
        defer { realm.stop() }
        XCTAssertEqual(try realm.connect().request("GET", "/r").header("www-authenticate"), "Basic realm=\"api\"")
    }

    func testBadHashesIterationsAndSchemaValuesAreRefusedWithTheirPath() throws {
        let cases: [(String, String, String)] = [
            ("pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg", "", "consumers[1].credentials.basic-auth[0].password"),
            ("pbkdf2-sha256$10$MDEyMzQ1Njc4OWFiY2RlZg$pj4T35D2v4tYmC1sTJ1y5tcMADOdtnQGvuHmyYDQh2g", "", "iterations must be an integer"),
            ("pbkdf2-sha1$1000$MDEyMzQ1Njc4OWFiY2RlZg$pj4T35D2v4tYmC1sTJ1y5tcMADOdtnQGvuHmyYDQh2g", "", "unsupported password hash"),
            ("pbkdf2-sha256$1000$%%%$pj4T35D2v4tYmC1sTJ1y5tcMADOdtnQGvuHmyYDQh2g", "", "salt must be base64"),
            ("plain", ", iterations: 5", "consumers[1].credentials.basic-auth[0].iterations"),
            (Self.bobHash, ", iterations: 2000", "not allowed with a pre-hashed password"),
        ]
        for (password, extra, expected) in cases {
            XCTAssertThrowsError(try startShippedPluginProxy(
                yaml: yaml(plugin: "name: basic-auth", bobPassword: password, extra: extra), upstream: upstream)) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(password): \(error)")
                XCTAssertTrue("\(error)".contains("line"), "names the line: \(error)")
            }
        }
        XCTAssertThrowsError(try startShippedPluginProxy(
            yaml: yaml(plugin: "{ name: basic-auth, config: { cache_ttl: -1 } }"), upstream: upstream)) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config.cache_ttl"), "\(error)")
        }
    }
}
