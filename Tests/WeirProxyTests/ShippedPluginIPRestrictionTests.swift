// plugins/ip-restriction through a running proxy with a real upstream, over
// IPv4 (127.0.0.1) and IPv6 (::1, with curl as the client).

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginIPRestrictionTests: UpstreamTestCase {
    private func start(_ config: String, listen: String = "127.0.0.1:0") throws -> ShippedPluginProxy {
        try startShippedPluginProxy(yaml: """
        listeners:
          - { name: web, listen: "\(listen)" }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: all
            match: { paths: [/] }
            upstream: backend
            plugins:
              - { name: ip-restriction, config: \(config) }
        access_log: off
        """, upstream: upstream)
    }

    private func status(_ config: String) throws -> (Int, String) {
        let proxy = try start(config)
        defer { proxy.stop() }
        let response = try proxy.connect().request("GET", "/ip")
        return (response.status, response.bodyText)
    }

    /// Status of a GET over IPv6 to the proxy listening on [::1].
    private func statusOverIPv6(_ config: String) throws -> Int {
        let proxy = try start(config, listen: "[::1]:0")
        defer { proxy.stop() }
        let curl = Process()
        curl.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        curl.arguments = ["-g", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                          "http://[::1]:\(proxy.harness.port)/ip6"]
        let out = Pipe()
        curl.standardOutput = out
        try curl.run()
        curl.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return try XCTUnwrap(Int(text), "curl printed \(text)")
    }

    func testAllowAndDenyOverIPv4() throws {
        XCTAssertEqual(try status("{ allow: [127.0.0.0/8] }").0, 200)
        XCTAssertEqual(try status("{ allow: [127.0.0.1] }").0, 200)
        XCTAssertEqual(try status("{ allow: [10.0.0.0/8, '::1'] }").0, 403)
        XCTAssertEqual(try status("{ allow: ['::ffff:127.0.0.0/104'] }").0, 200, "IPv4-mapped CIDR matches IPv4")
        XCTAssertEqual(try status("{ deny: [127.0.0.0/31] }").0, 403)
        XCTAssertEqual(try status("{ deny: [127.0.0.2/31] }").0, 200)
        XCTAssertEqual(try status("{ deny: [127.0.0.1/32], allow: [127.0.0.0/8] }").0, 403, "deny wins")
        XCTAssertEqual(try status("{ deny: [0.0.0.0/0] }").0, 403)
        let (code, body) = try status("{ deny: [127.0.0.1], status: 401, message: go away }")
        XCTAssertEqual(code, 401)
        XCTAssertTrue(body.contains("go away"), body)
        let (defaultCode, defaultBody) = try status("{ deny: [127.0.0.1] }")
        XCTAssertEqual(defaultCode, 403)
        XCTAssertTrue(defaultBody.contains("Your IP address is not allowed"), defaultBody)
        XCTAssertFalse(upstream.requests.isEmpty)
    }

    func testAllowAndDenyOverIPv6() throws {
        XCTAssertEqual(try statusOverIPv6("{ allow: ['::1'] }"), 200)
        XCTAssertEqual(try statusOverIPv6("{ allow: ['::/64'] }"), 200)
        XCTAssertEqual(try statusOverIPv6("{ allow: ['0:0:0:0:0:0:0:1/128'] }"), 200)
        XCTAssertEqual(try statusOverIPv6("{ allow: ['fe80::/10', 127.0.0.1] }"), 403)
        XCTAssertEqual(try statusOverIPv6("{ deny: ['::0/127'] }"), 403)
        XCTAssertEqual(try statusOverIPv6("{ deny: ['::2/127'] }"), 200)
    }

    /// Entries that are not addresses or CIDRs are refused at config load,
    /// with the path of the bad element (schema `format = "cidr"`).
    func testMalformedEntriesAreRefusedAtLoad() throws {
        let cases = [("{ allow: [300.1.1.1/8] }", "config.allow[0]"),
                     ("{ allow: ['1::2::3'] }", "config.allow[0]"),
                     ("{ deny: [10.0.0.1, 10.0.0.0/33] }", "config.deny[1]")]
        for (config, path) in cases {
            XCTAssertThrowsError(try start(config), config) { error in
                XCTAssertTrue("\(error)".contains("routes[0].plugins[0].\(path)"), "\(error)")
            }
        }
        XCTAssertThrowsError(try start("{ allow: 10.0.0.0/8 }")) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config.allow"), "\(error)")
        }
        // Neither list: a restriction that restricts nothing.
        XCTAssertThrowsError(try start("{ status: 401 }")) { error in
            XCTAssertTrue("\(error)".contains("routes[0].plugins[0].config: set at least one of allow, deny (none is set)"), "\(error)")
        }
    }
}
