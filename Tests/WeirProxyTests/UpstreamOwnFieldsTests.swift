// The proxy's own upstream request lines are written two ways: as bytes
// (UpstreamOwnFields: a route without plugins, or whose plugins leave the
// upstream request alone) and as an edit list plugins can change
// (ExchangeDownstream.upstreamEdits, made once a plugin reads or edits the
// upstream request). Both must give the upstream the same head.

import Foundation
import NIOCore
import WeirCore
@testable import WeirProxy
import XCTest

final class UpstreamOwnFieldsTests: PluginFolderTestCase {
    /// Raw requests covering every own line: a trusted peer's X-Forwarded-*
    /// (several X-Forwarded-For lines), Via chains, a client X-Request-Id,
    /// hop-by-hop fields, a chunked body, HTTP/1.0, no X-Forwarded-Host to
    /// carry on.
    private let requests = [
        "GET /a HTTP/1.1\r\nHost: shop.example.com:8080\r\nX-Forwarded-For: 203.0.113.7, 10.0.0.1\r\nx-keep: 1\r\n"
            + "X-Forwarded-For: 198.51.100.2\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Proto: http\r\n"
            + "X-Forwarded-Host: front.example\r\nVia: 1.1 edge, 1.0 old\r\nVia: 2 cdn\r\nX-Request-Id: client-chosen\r\n"
            + "Connection: keep-alive, x-hop\r\nx-hop: gone\r\nKeep-Alive: timeout=5\r\n\r\n",
        "POST /b HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nVia: 1.1 one\r\n\r\n"
            + "5\r\nhello\r\n0\r\n\r\n",
        "GET /c HTTP/1.0\r\nHost: old.example.com\r\n\r\n",
        "GET /d HTTP/1.1\r\nHost: plain.example.com\r\nx-empty:\r\nX-Forwarded-For:\r\n\r\n",
    ]

    private func upstreamHeads(config: WeirConfig) throws -> [[String]] {
        try upstreamHeads(of: requests, oneConnection: false, config: config)
    }

    /// The upstream heads of `requests`, all sent on one keep-alive
    /// connection (so later requests may take the own lines from the
    /// connection's memo) or each on its own connection (never).
    private func upstreamHeads(of requests: [String], oneConnection: Bool, config: WeirConfig) throws -> [[String]] {
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let before = upstream.requests.count
        var shared: BlockingSocket? = nil
        for request in requests {
            let client = try oneConnection ? (shared ?? proxy.connect()) : proxy.connect()
            if oneConnection { shared = client }
            try client.send(request)
            XCTAssertEqual(try client.readResponse().status, 200, request)
        }
        let seen = upstream.requests.dropFirst(before)
        XCTAssertEqual(seen.count, requests.count)
        return seen.map { request in
            request.headers.map { name, value in
                let name = name.lowercased()
                // Each exchange has its own id: compare that there is one.
                if name == "x-request-id" {
                    XCTAssertFalse(value.isEmpty)
                    XCTAssertNotEqual(value, "client-chosen")
                    return "x-request-id: <id>"
                }
                return "\(name): \(value)"
            }
        }
    }

    /// A keep-alive connection's requests get the same own lines as each
    /// would alone, whether its inputs repeat (the memo's lines are copied)
    /// or change between requests (client Host, framing, HTTP version), and
    /// around requests whose lines carry their own values (a trusted peer's
    /// X-Forwarded-*, Via), which are never kept.
    func testOwnLinesKeptForAConnectionMatchFreshOnes() throws {
        let sequence = [
            "GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "GET /2 HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "GET /3 HTTP/1.1\r\nHost: b.example:8080\r\n\r\n",
            "GET /4 HTTP/1.1\r\nHost: b.example:8080\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\r\n",
            "GET /5 HTTP/1.1\r\nHost: b.example:8080\r\n\r\n",
            "POST /6 HTTP/1.1\r\nHost: b.example:8080\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "GET /7 HTTP/1.0\r\nHost: b.example:8080\r\nConnection: keep-alive\r\n\r\n",
            "GET /8 HTTP/1.1\r\nHost: b.example:8080\r\nVia: 1.1 front\r\n\r\n",
            "GET /9 HTTP/1.1\r\nHost: b.example:8080\r\nX-Forwarded-Host: front.example\r\n\r\n",
            "GET /10 HTTP/1.1\r\nHost: b.example:8080\r\n\r\n",
            "GET /11 HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ]
        for trusted in [true, false] {
            let config = ProxyHarness.config(targets: [upstream.address]) {
                if trusted { $0.forwarded.trustedProxies = ["127.0.0.0/8"] }
            }
            let kept = try upstreamHeads(of: sequence, oneConnection: true, config: config)
            let fresh = try upstreamHeads(of: sequence, oneConnection: false, config: config)
            XCTAssertEqual(kept, fresh, "trusted: \(trusted)")
            XCTAssertEqual(kept.count, sequence.count)
            XCTAssertEqual(kept.last?.filter { $0.hasPrefix("x-forwarded-host") || $0.hasPrefix("via") },
                           ["x-forwarded-host: a.example", "via: 1.1 weir"])
            XCTAssertEqual(kept[3].first { $0.hasPrefix("x-forwarded-for") },
                           trusted ? "x-forwarded-for: 203.0.113.9, 127.0.0.1" : "x-forwarded-for: 127.0.0.1")
            XCTAssertEqual(kept[6].first { $0.hasPrefix("via") }, "via: 1.0 weir")
        }
    }

    func testOwnLinesAsBytesMatchTheEditListPluginsUse() throws {
        // A plugin that reads the upstream request makes the exchange build
        // the edit list; one with nothing to do leaves the bytes writer on.
        try folder.write("reader", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 1, VERSION = "1" }
        function P:request(conf, ctx) weir.upstream.request.get_headers() end
        return P
        """)
        try folder.write("idle", handler: """
        local P = { PRIORITY = 1, VERSION = "1" }
        function P:request(conf, ctx) end
        return P
        """)
        let trusted: (inout WeirConfig) -> Void = { $0.forwarded.trustedProxies = ["127.0.0.0/8"] }
        let asBytes = try upstreamHeads(config: ProxyHarness.config(targets: [upstream.address], configure: trusted))
        let asEdits = try upstreamHeads(config: ProxyHarness.config(targets: [upstream.address]) {
            trusted(&$0)
            $0.plugins = [pluginRef("reader")]
        })
        let idlePlugin = try upstreamHeads(config: ProxyHarness.config(targets: [upstream.address]) {
            trusted(&$0)
            $0.plugins = [pluginRef("idle")]
        })
        XCTAssertEqual(asBytes, asEdits)
        XCTAssertEqual(asBytes, idlePlugin)
        let target = "127.0.0.1:\(upstream.port)"
        XCTAssertEqual(asBytes.first, [
            "x-keep: 1",
            "host: \(target)",
            "x-forwarded-for: 203.0.113.7, 10.0.0.1, 198.51.100.2, 127.0.0.1",
            "x-forwarded-proto: https",
            "x-forwarded-host: front.example",
            "via: 1.1 edge, 1.0 old, 2 cdn, 1.1 weir",
            "x-request-id: <id>",
        ])
        XCTAssertEqual(asBytes[1], [
            "host: \(target)", "transfer-encoding: chunked", "x-forwarded-for: 127.0.0.1", "x-forwarded-proto: http",
            "x-forwarded-host: api.example.com", "via: 1.1 one, 1.1 weir", "x-request-id: <id>",
        ])
        XCTAssertEqual(asBytes[2].first { $0.hasPrefix("via:") }, "via: 1.0 weir")
        XCTAssertEqual(asBytes[3].first { $0.hasPrefix("x-forwarded-for:") }, "x-forwarded-for: , 127.0.0.1")

        // An untrusted peer's X-Forwarded-* are replaced, both ways.
        let untrusted = try upstreamHeads(config: ProxyHarness.config(targets: [upstream.address]))
        let untrustedEdits = try upstreamHeads(config: ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("reader")]
        })
        XCTAssertEqual(untrusted, untrustedEdits)
        XCTAssertEqual(untrusted.first?.filter { $0.hasPrefix("x-forwarded") }, [
            "x-forwarded-for: 127.0.0.1", "x-forwarded-proto: http", "x-forwarded-host: shop.example.com:8080",
        ])
    }

    /// Plugins' header changes of names the proxy gives no meaning to are
    /// kept as bytes next to the own lines (PluginUpstreamLines) until
    /// something makes the edit list; either way the upstream gets the same
    /// head, and a later change of a proxy-owned name (Via) or a read of the
    /// upstream request takes the earlier changes over in order.
    func testPluginHeaderLinesAsBytesMatchTheEditList() throws {
        let edits = """
        local weir = require "weir"
        local u = weir.upstream.request
        u.set_header("x-keep", "replaced")        -- a client line replaced
        u.add_header("x-one", "1")
        u.add_header("x-two", "2")
        u.add_header("x-one", "1b")
        u.set_header("x-two", "2b")              -- an added line replaced, after x-one's
        u.clear_header("x-hop")                  -- a client line (also hop-by-hop) gone
        u.add_header("x-gone", "g")
        u.clear_header("x-gone")                 -- an added line gone
        u.set_header("X-Mixed-Case", 42)
        """
        func writeEdits(_ name: String, then more: String = "") throws {
            try folder.write(name, handler: """
            local P = { PRIORITY = 2, VERSION = "1" }
            function P:request(conf, ctx)
            \(edits)
            \(more)
            end
            return P
            """)
        }
        try writeEdits("edits")
        // The same edits, then a read of the upstream request: the edit list takes them over.
        try writeEdits("editsread", then: #"assert(u.get_headers()["x-two"] == "2b")"#)
        // The same edits, then one of a name the proxy owns (Via): the edit list again.
        try writeEdits("editsvia", then: #"u.add_header("via", "1.1 plugin")"#)
        // The same edits on a list made first (by a read).
        try folder.write("readfirst", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 3, VERSION = "1" }
        function P:request(conf, ctx) weir.upstream.request.get_headers() end
        return P
        """)
        let trusted: (inout WeirConfig) -> Void = { $0.forwarded.trustedProxies = ["127.0.0.0/8"] }
        func heads(_ plugins: [String]) throws -> [[String]] {
            try upstreamHeads(config: ProxyHarness.config(targets: [upstream.address]) {
                trusted(&$0)
                $0.plugins = plugins.map { pluginRef($0) }
            })
        }
        let asBytes = try heads(["edits"])
        XCTAssertEqual(asBytes, try heads(["editsread"]))
        XCTAssertEqual(asBytes, try heads(["readfirst", "edits"]))
        let first = try XCTUnwrap(asBytes.first)
        XCTAssertEqual(Array(first.suffix(6)), ["x-request-id: <id>", "x-keep: replaced", "x-one: 1", "x-one: 1b", "x-two: 2b",
                                                "x-mixed-case: 42"])
        XCTAssertFalse(first.contains { $0.hasPrefix("x-hop") || $0.hasPrefix("x-gone") }, "\(first)")
        // A later add of a name the proxy owns (Via) makes the edit list: the
        // same lines, the plugin's Via line last.
        let withVia = try heads(["editsvia"])
        XCTAssertEqual(withVia.first?.last, "via: 1.1 plugin")
        XCTAssertEqual(withVia.first.map { Array($0.dropLast()) }, first)
    }
}
