// plugins/acl through a running proxy with a real upstream, key-auth in
// front to identify the consumer; config via the real YAML loader.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginACLTests: UpstreamTestCase {
    /// One route per case; alice is in admins and ops, bob in users, carol in none.
    private let yaml = """
    listeners:
      - { name: web, listen: 127.0.0.1:0 }
    upstreams:
      - { name: backend, targets: [{ address: UPSTREAM }] }
    routes:
      - name: allow
        match: { paths: [/allow] }
        upstream: backend
        plugins:
          - name: key-auth
          - { name: acl, config: { allow: [admins] } }
      - name: deny
        match: { paths: [/deny] }
        upstream: backend
        plugins:
          - { name: key-auth, config: { anonymous: guest } }
          - { name: acl, config: { deny: [users] } }
      - name: hidden
        match: { paths: [/hidden] }
        upstream: backend
        plugins:
          - name: key-auth
          - { name: acl, config: { allow: [ops], hide_groups_header: true } }
      - name: no-auth
        match: { paths: [/no-auth] }
        upstream: backend
        plugins:
          - { name: acl, config: { allow: [admins] } }
    access_log: off
    consumers:
      - name: alice
        groups: [admins, ops]
        credentials:
          key-auth: [{ key: alice-key }]
      - name: bob
        groups: [users]
        credentials:
          key-auth: [{ key: bob-key }]
      - name: carol
        credentials:
          key-auth: [{ key: carol-key }]
    """

    private func get(_ client: BlockingSocket, _ path: String, key: String? = nil,
                     spoofedGroups: String? = nil) throws -> TestResponse {
        var headers: [(String, String)] = []
        if let key { headers.append(("apikey", key)) }
        if let spoofedGroups { headers.append(("x-consumer-groups", spoofedGroups)) }
        return try client.request("GET", path, headers: headers)
    }

    private func assertRefused(_ response: TestResponse, _ status: Int, _ message: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(response.status, status, file: file, line: line)
        XCTAssertEqual(response.header("content-type"), "application/json", file: file, line: line)
        XCTAssertTrue(response.bodyText.contains(message), response.bodyText, file: file, line: line)
    }

    func testAllowListLetsMembersThroughWithTheirGroups() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml, upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        XCTAssertEqual(try get(client, "/allow", key: "alice-key", spoofedGroups: "root").status, 200)
        let seen = try XCTUnwrap(upstream.requests.first { $0.uri == "/allow" })
        XCTAssertEqual(seen.header("x-consumer-groups"), "admins, ops", "the client's value is replaced")

        assertRefused(try get(client, "/allow", key: "bob-key"), 403, "You cannot consume this service")
        assertRefused(try get(client, "/allow", key: "carol-key"), 403, "You cannot consume this service")
        XCTAssertEqual(try get(client, "/allow").status, 401, "key-auth refuses first without a key")
        XCTAssertEqual(upstream.requests.count, 1, "refused requests never reach the upstream")
    }

    func testDenyListAndAnonymousConsumerWithoutGroups() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml, upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        assertRefused(try get(client, "/deny", key: "bob-key"), 403, "You cannot consume this service")
        XCTAssertEqual(try get(client, "/deny", key: "alice-key").status, 200)
        XCTAssertEqual(upstream.lastRequest?.header("x-consumer-groups"), "admins, ops")
        // key-auth's anonymous consumer is not declared: no groups, not denied,
        // and a spoofed groups header is removed.
        XCTAssertEqual(try get(client, "/deny", spoofedGroups: "admins").status, 200)
        XCTAssertEqual(upstream.lastRequest?.header("x-consumer-name"), "guest")
        XCTAssertNil(upstream.lastRequest?.header("x-consumer-groups"))
    }

    func testHiddenGroupsHeaderAndNoConsumer() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml, upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()

        XCTAssertEqual(try get(client, "/hidden", key: "alice-key", spoofedGroups: "root").status, 200)
        XCTAssertNil(upstream.lastRequest?.header("x-consumer-groups"), "hide_groups_header: not sent, spoof removed")

        assertRefused(try get(client, "/no-auth"), 401, "Unauthorized")
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        let cases: [(String, String)] = [
            ("{ allow: admins }", "routes[0].plugins[0].config.allow"),
            ("{ allow: [\"\"] }", "routes[0].plugins[0].config.allow"),
            ("{ deny: [users], hide_groups_header: maybe }", "routes[0].plugins[0].config.hide_groups_header"),
            // exactly one of allow and deny (schema exactly_one_of), refused at load, not per request
            ("{ allow: [admins], deny: [users] }", "routes[0].plugins[0].config: set exactly one of allow, deny (allow and deny are set)"),
            ("{ hide_groups_header: true }", "routes[0].plugins[0].config: set exactly one of allow, deny (none is set)"),
        ]
        for (config, expected) in cases {
            let yaml = """
            listeners:
              - { name: web, listen: 127.0.0.1:0 }
            upstreams:
              - { name: backend, targets: [{ address: UPSTREAM }] }
            routes:
              - name: all
                match: { paths: [/] }
                upstream: backend
                plugins:
                  - { name: acl, config: \(config) }
            access_log: off
            """
            XCTAssertThrowsError(try startShippedPluginProxy(yaml: yaml, upstream: upstream), config) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(config): \(error)")
            }
        }
    }
}
