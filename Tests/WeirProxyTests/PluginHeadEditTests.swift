// Plugins' header changes as edits on the wire head (Plugins/PluginHeadEdits.swift):
// what the upstream and the client receive when plugins set, add, clear
// and read headers, change the path, query, method and status, and what
// is refused (names and values that would break the framing).

import Foundation
import NIOCore
import NIOHTTP1
import WeirCore
@testable import WeirProxy
import WeirTestSupport
import XCTest

final class PluginHeadEditTests: PluginFolderTestCase {
    /// Request phase edits on the client's own lines and on added ones;
    /// get_headers sees the head as it will be written.
    private let requestEdits = """
    local weir = require "weir"
    local P = { PRIORITY = 100, VERSION = "1" }
    function P:request(conf, ctx)
      local up = weir.upstream.request
      up.set_header("x-replace", "new")
      up.add_header("x-multi", "a")
      up.add_header("x-multi", "b")
      up.add_header("x-later", "first")
      up.set_header("x-later", "second")
      up.clear_header("x-secret")
      up.set_header("x-evil", "a\\r\\nx-injected: 1")
      up.add_header("bad name", "v")
      up.add_header("x-nul", "a\\0b")
      local h = up.get_headers()
      ctx.view = tostring(h["x-replace"]) .. "|" .. tostring(h["x-secret"]) .. "|" .. tostring(h["x-later"])
        .. "|" .. tostring(h["x-evil"]) .. "|" .. type(h["x-multi"]) .. "|" .. tostring(h["host"] ~= nil)
      ctx.original = tostring(weir.request.get_header("x-secret"))
      if weir.request.get_header("x-case") == "path" then
        up.set_path("/bad path")           -- refused: a space would split the request line
        up.set_query("a=1&b=2")
        ctx.query = up.get_raw_query()
      elseif weir.request.get_header("x-case") == "method" then
        ctx.refused = tostring(pcall(up.set_method, "GET\\r\\nX-Smuggled: 1"))  -- the SDK raises
        up.set_method("PUT")
      elseif weir.request.get_header("x-case") == "newpath" then
        up.set_path("/moved")
      end
    end
    function P:response(conf, ctx)
      weir.response.set_header("x-view", ctx.view)
      weir.response.set_header("x-original", ctx.original)
      if ctx.query then weir.response.set_header("x-query", ctx.query) end
      if ctx.refused then weir.response.set_header("x-refused", ctx.refused) end
    end
    return P
    """

    func testRequestHeaderEditsReachTheUpstreamAndBadOnesAreDropped() throws {
        try folder.write("edits", handler: requestEdits)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("edits")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let response = try client.request("GET", "/h?x=1", headers: [
            ("X-Replace", "old1"), ("x-replace", "old2"), ("X-Secret", "s3cr3t"), ("x-evil", "client"), ("x-keep", "k"),
        ])
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.header("x-view"), "new|nil|second|nil|table|true")
        XCTAssertEqual(response.header("x-original"), "s3cr3t", "weir.request.get_header reads the client's head")
        let seen = try XCTUnwrap(upstream.requests.first { $0.uri == "/h?x=1" })
        XCTAssertEqual(seen.headerValues("x-replace"), ["new"])
        XCTAssertEqual(seen.headerValues("x-multi"), ["a", "b"])
        XCTAssertEqual(seen.headerValues("x-later"), ["second"])
        XCTAssertEqual(seen.headerValues("x-keep"), ["k"])
        XCTAssertNil(seen.header("x-secret"))
        // set_header with a CR/LF value: the old lines go, nothing is added.
        XCTAssertNil(seen.header("x-evil"))
        XCTAssertNil(seen.header("x-injected"))
        XCTAssertNil(seen.header("x-nul"))
        XCTAssertFalse(seen.headers.contains { $0.0.contains(" ") })
        // The proxy's own edits are still there.
        XCTAssertEqual(seen.headerValues("host"), ["127.0.0.1:\(upstream.port)"])
        XCTAssertNotNil(seen.header("x-request-id"))
        XCTAssertEqual(seen.header("x-forwarded-for"), "127.0.0.1")

        // Path with a space refused, query set; read back in the same phase.
        let pathCase = try client.request("GET", "/p?old=1", headers: [("x-case", "path")])
        XCTAssertEqual(pathCase.status, 200)
        XCTAssertEqual(pathCase.header("x-query"), "a=1&b=2")
        XCTAssertEqual(upstream.lastRequest?.uri, "/p?a=1&b=2")

        // A method that is not upper-case letters is refused; a valid one is sent.
        let methodCase = try client.request("GET", "/m", headers: [("x-case", "method")])
        XCTAssertEqual(methodCase.status, 200)
        XCTAssertEqual(methodCase.header("x-refused"), "false")
        XCTAssertEqual(upstream.lastRequest?.method, "PUT")
        XCTAssertEqual(upstream.lastRequest?.uri, "/m")
        XCTAssertNil(upstream.lastRequest?.header("x-smuggled"))

        let moved = try client.request("GET", "/old?keep=1", headers: [("x-case", "newpath")])
        XCTAssertEqual(moved.status, 200)
        XCTAssertEqual(upstream.lastRequest?.uri, "/moved?keep=1")
    }

    /// A plugin that sets Host does not beat the target's label (every
    /// attempt sets it), and a retry on another target keeps the plugin's
    /// other edits.
    func testHostFromAPluginIsReplacedPerAttemptAndEditsSurviveARetry() throws {
        try folder.write("host", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          weir.upstream.request.set_header("host", "plugin.example")
          weir.upstream.request.set_header("x-plugin", "kept")
        end
        return P
        """)
        let second = try TestUpstream(name: "second", group: group)
        defer { second.stop() }
        let dead = HostPort(host: "127.0.0.1", port: try refusingPort())
        let config = ProxyHarness.config(targets: [dead, second.address]) {
            $0.upstreams[0].retries = 1
            $0.upstreams[0].balancer = .roundRobin
            $0.plugins = [pluginRef("host")]
        }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)   // one balancer: a fixed order
        defer { proxy.stop() }
        let client = try proxy.connect()
        for _ in 0..<2 {
            XCTAssertEqual(try client.request("GET", "/r").status, 200)
        }
        let seen = try XCTUnwrap(second.lastRequest)
        XCTAssertEqual(seen.headerValues("host"), ["127.0.0.1:\(second.port)"])
        XCTAssertEqual(seen.header("x-plugin"), "kept")
    }

    /// Header edits that leave the framing alone take the plain head path
    /// (the client's method and framing): a chunked body still arrives
    /// chunked, and a header the proxy itself adds (`via`) that a plugin
    /// replaces appears once; `set_method` still goes out.
    func testHeaderEditsKeepTheClientsFraming() throws {
        try folder.write("tag", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          weir.upstream.request.set_header("x-consumer-name", "bench")
          weir.upstream.request.set_header("Via", "1.1 plugin")
          if weir.request.get_header("x-case") == "method" then weir.upstream.request.set_method("PUT") end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("tag")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        try client.send("POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        let response = try client.readResponse()
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "11", "the upstream read the whole chunked body")
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertEqual(seen.header("transfer-encoding"), "chunked")
        XCTAssertEqual(seen.header("x-consumer-name"), "bench")
        XCTAssertEqual(seen.headerValues("via"), ["1.1 plugin"])
        XCTAssertEqual(seen.method, "POST")

        let put = try client.request("GET", "/m", headers: [("x-case", "method")])
        XCTAssertEqual(put.status, 200)
        XCTAssertEqual(upstream.lastRequest?.method, "PUT")
        XCTAssertEqual(upstream.lastRequest?.header("x-consumer-name"), "bench")
    }

    /// Response phase edits on the upstream's head: replaced, added and
    /// cleared lines, a new status with its reason, a hop-by-hop field a
    /// plugin sets is dropped (the connection stays reusable), bad values
    /// are dropped, and get_header reads the edited head.
    private let responseEdits = """
    local weir = require "weir"
    local P = { PRIORITY = 100, VERSION = "1" }
    function P:request(conf, ctx)
      weir.response.set_header("x-early", "from-request")
      weir.response.set_header("x-early-cleared", "x")
      weir.response.clear_header("x-early-cleared")
    end
    function P:response(conf, ctx)
      local before = weir.response.get_header("x-upstream")
      weir.response.set_header("x-upstream", "replaced")
      weir.response.add_header("x-two", "1")
      weir.response.add_header("x-two", "2")
      weir.response.add_header("via", "1.1 plugin-hop")
      weir.response.clear_header("content-type")
      weir.response.set_header("connection", "close")
      weir.response.set_header("x-evil", "a\\r\\nset-cookie: stolen")
      weir.response.set_header("x-read-back", before .. ">" .. weir.response.get_header("x-upstream")
        .. ">" .. tostring(weir.response.get_header("content-type")) .. ">" .. weir.response.get_header("x-early"))
      if weir.request.get_path() == "/created" then weir.response.set_status(201) end
      weir.response.set_header("x-status", tostring(weir.response.get_status()))
    end
    return P
    """

    func testResponseHeaderEditsOnTheUpstreamHead() throws {
        try folder.write("resp", handler: responseEdits)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("resp")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let response = try client.request("GET", "/plain")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "ok from upstream")
        XCTAssertEqual(response.headerValues("x-upstream"), ["replaced"])
        XCTAssertEqual(response.headerValues("x-two"), ["1", "2"])
        XCTAssertNil(response.header("content-type"))
        XCTAssertEqual(response.header("x-early"), "from-request")
        XCTAssertNil(response.header("x-early-cleared"))
        XCTAssertNil(response.header("x-evil"))
        XCTAssertNil(response.header("set-cookie"))
        XCTAssertNil(response.header("connection"), "a plugin's hop-by-hop field is not relayed")
        XCTAssertEqual(response.header("x-read-back"), "upstream>replaced>nil>from-request")
        XCTAssertEqual(response.header("x-status"), "200")
        XCTAssertEqual(response.headerValues("via"), ["1.1 plugin-hop, 1.1 weir"], "a plugin's Via joins the chain")
        XCTAssertNotNil(response.header("content-length"))

        let created = try client.request("GET", "/created")
        XCTAssertEqual(created.status, 201, "the same keep-alive connection, status changed by the plugin")
        XCTAssertEqual(created.header("x-status"), "201")
        XCTAssertEqual(created.bodyText, "ok from upstream")
    }

    /// Response headers set in the request phase (before any response
    /// exists, as rate-limiting does) are kept as their result: a later set
    /// or clear of a name drops its earlier lines, a refused value (CR/LF)
    /// only clears, a name that is not a token changes nothing. The same on
    /// the upstream's head and on a plugin's exit response.
    func testRequestPhaseResponseHeadersOnUpstreamAndExitResponses() throws {
        try folder.write("early", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          local r = weir.response
          r.add_header("x-multi", "a")
          r.add_header("x-multi", "b")
          r.add_header("x-reset", "1")
          r.set_header("x-reset", "2")
          r.add_header("x-gone", "1")
          r.clear_header("x-gone")
          r.add_header("x-gone", "back")
          r.set_headers("x-pair-a", "1", "x-pair-b", 7, "x-upstream", "a\\r\\nx-injected: 1", "x-after-bad", "kept")
          r.add_header("bad name", "v")
          r.set_header("x-nul", "a\\0b")
          if weir.request.get_path() == "/hop" then
            r.add_header("via", "1.1 early-hop")
            r.set_header("connection", "close")
          end
          if weir.request.get_path() == "/exit" then return 418, { message = "teapot" } end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("early")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for path in ["/plain", "/exit", "/plain"] {
            let response = try client.request("GET", path)
            XCTAssertEqual(response.status, path == "/exit" ? 418 : 200, path)
            XCTAssertEqual(response.headerValues("x-multi"), ["a", "b"], path)
            XCTAssertEqual(response.headerValues("x-reset"), ["2"], path)
            XCTAssertEqual(response.headerValues("x-gone"), ["back"], path)
            XCTAssertEqual(response.header("x-pair-a"), "1", path)
            XCTAssertEqual(response.header("x-pair-b"), "7", path)
            XCTAssertEqual(response.header("x-after-bad"), "kept", path)
            XCTAssertNil(response.header("x-upstream"), "\(path): a refused value clears the upstream's line")
            XCTAssertNil(response.header("x-injected"), path)
            XCTAssertNil(response.header("x-nul"), path)
            XCTAssertFalse(response.headers.contains { $0.0.contains(" ") }, path)
        }
        // A Via or hop-by-hop line among them: the relay still chains the
        // Via and drops the hop-by-hop one (the connection stays reusable).
        let hop = try client.request("GET", "/hop")
        XCTAssertEqual(hop.status, 200)
        XCTAssertEqual(hop.headerValues("via"), ["1.1 early-hop, 1.1 weir"])
        XCTAssertNil(hop.header("connection"))
        XCTAssertEqual(hop.headerValues("x-reset"), ["2"])
        XCTAssertEqual(try client.request("GET", "/plain").status, 200, "the same connection")
    }

    /// weir.response.prepare_headers' lines set in the request phase (into
    /// empty changes: at once; after another change: line by line) and in
    /// the response phase: the same as set_header of each line, on the
    /// upstream's head (its own line of a set name replaced), on an exit
    /// response, and with a Via among them (chained by the relay).
    func testPreparedResponseHeaders() throws {
        try folder.write("prepared", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        local lines = weir.response.prepare_headers({ { "x-fixed", "f" }, "x-upstream", "x-count", "via" })
        local late = weir.response.prepare_headers({ "x-late", { "x-fixed", "again" } })
        function P:request(conf, ctx)
          if weir.request.get_path() == "/after" then weir.response.set_header("x-count", "before") end
          lines:set("replaced", 3, "1.1 prepared-hop")
          if weir.request.get_path() == "/exit" then return 418, { message = "teapot" } end
        end
        function P:response(conf, ctx)
          if weir.request.get_path() == "/late" then late:set(weir.response.get_status()) end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("prepared")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for path in ["/plain", "/after", "/exit", "/late", "/plain"] {
            let response = try client.request("GET", path)
            XCTAssertEqual(response.status, path == "/exit" ? 418 : 200, path)
            XCTAssertEqual(response.headerValues("x-fixed"), [path == "/late" ? "again" : "f"], path)
            XCTAssertEqual(response.headerValues("x-upstream"), ["replaced"], path)
            XCTAssertEqual(response.headerValues("x-count"), ["3"], path)
            XCTAssertEqual(response.headerValues("x-late"), path == "/late" ? ["200"] : [], path)
            XCTAssertEqual(response.headerValues("via"), [path == "/exit" ? "1.1 prepared-hop" : "1.1 prepared-hop, 1.1 weir"], path)
        }
    }

    /// A prepared set of names the proxy gives no meaning to, set in the
    /// request phase with no response phase after it, goes to the relay as
    /// its wire bytes (PendingResponseHeaders.wireLines): the same lines as
    /// set_header of each, over HTTP/1.1 and HTTP/2, on an exit response,
    /// and taken line by line when another change follows it.
    func testPreparedLinesRelayedAsTheirBytes() throws {
        try folder.write("wire", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        local lines = weir.response.prepare_headers({ { "x-fixed", "f" }, "x-upstream", "x-count", "x-note" })
        function P:request(conf, ctx)
          local path = weir.request.get_path()
          lines:set("replaced", -42, "a b;c")
          if path == "/after" then weir.response.set_header("x-count", "later") end
          if path == "/twice" then lines:set("again", 0, "second") end
          if path == "/exit" then return 418, { message = "teapot" } end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("wire")] }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for path in ["/plain", "/after", "/twice", "/exit", "/plain"] {
            let response = try client.request("GET", path)
            XCTAssertEqual(response.status, path == "/exit" ? 418 : 200, path)
            XCTAssertEqual(response.headerValues("x-fixed"), ["f"], path)
            XCTAssertEqual(response.headerValues("x-upstream"), [path == "/twice" ? "again" : "replaced"], path)
            XCTAssertEqual(response.headerValues("x-count"), [path == "/after" ? "later" : path == "/twice" ? "0" : "-42"], path)
            XCTAssertEqual(response.headerValues("x-note"), [path == "/twice" ? "second" : "a b;c"], path)
        }
        let result = try runProgram("/usr/bin/curl", ["-sS", "--http2-prior-knowledge", "--max-time", "10", "-D", "-",
                                                      "http://127.0.0.1:\(proxy.harness.port)/plain"])
        XCTAssertEqual(result.status, 0, result.err)
        XCTAssertTrue(result.out.hasPrefix("HTTP/2 200"), result.out)
        for line in ["x-fixed: f", "x-upstream: replaced", "x-count: -42", "x-note: a b;c"] {
            XCTAssertEqual(result.out.components(separatedBy: "\r\n").filter { $0 == line }.count, 1, line + " in " + result.out)
        }
        XCTAssertFalse(result.out.contains("x-upstream: " + upstream.name), result.out)

        // With a response phase after them, the lines are taken as lines:
        // the phase reads and replaces them like any other.
        try folder.write("reader", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 50, VERSION = "1" }
        function P:response(conf, ctx)
          weir.response.set_header("x-read", weir.response.get_header("x-count") .. "/" .. weir.response.get_header("x-upstream"))
          weir.response.set_header("x-note", "replaced in the response phase")
        end
        return P
        """)
        let both = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("wire"), pluginRef("reader")] }
        let withPhase = try PluginProxy(config: both, folder: folder, loops: 1)
        defer { withPhase.stop() }
        let response = try withPhase.connect().request("GET", "/plain")
        XCTAssertEqual(response.headerValues("x-read"), ["-42/replaced"])
        XCTAssertEqual(response.headerValues("x-note"), ["replaced in the response phase"])
        XCTAssertEqual(response.headerValues("x-fixed"), ["f"])
        XCTAssertEqual(response.headerValues("x-upstream"), ["replaced"])
    }

    /// The changes a head is relayed with are kept from response to
    /// response (ExchangePlugins.relayChanges, emptied after each relay):
    /// a response's status, lines, cleared lines and prepared lines never
    /// reach the next response on the connection, from either phase.
    func testRelayedChangesDoNotCarryOverToTheNextResponse() throws {
        try folder.write("once", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        local lines = weir.response.prepare_headers({ "x-wire-a", "x-wire-b" })
        function P:request(conf, ctx)
          local path = weir.request.get_path()
          if path == "/wire" then lines:set("1", "2") end
          if path == "/early" then weir.response.set_header("x-early", "e"); weir.response.clear_header("x-upstream") end
        end
        return P
        """)
        try folder.write("late", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 50, VERSION = "1" }
        function P:response(conf, ctx)
          if weir.request.get_path() == "/late" then
            weir.response.set_status(201)
            weir.response.add_header("x-late", "l")
            weir.response.clear_header("content-length")
          end
        end
        return P
        """)
        for plugins in [["once"], ["once", "late"]] {
            let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = plugins.map { pluginRef($0) } }
            let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
            defer { proxy.stop() }
            let client = try proxy.connect()
            let paths = plugins.count == 1 ? ["/wire", "/plain", "/early", "/plain", "/wire", "/early", "/plain"]
                                           : ["/late", "/plain", "/wire", "/late", "/early", "/plain"]
            for path in paths {
                let response = try client.request("GET", path)
                let what = "\(plugins) \(path)"
                XCTAssertEqual(response.status, path == "/late" ? 201 : 200, what)
                XCTAssertEqual(response.bodyText, "ok from upstream", what)
                XCTAssertEqual(response.headerValues("x-wire-a"), path == "/wire" ? ["1"] : [], what)
                XCTAssertEqual(response.headerValues("x-wire-b"), path == "/wire" ? ["2"] : [], what)
                XCTAssertEqual(response.headerValues("x-early"), path == "/early" ? ["e"] : [], what)
                XCTAssertEqual(response.headerValues("x-upstream"), path == "/early" ? [] : [upstream.name], what)
                XCTAssertEqual(response.headerValues("x-late"), path == "/late" ? ["l"] : [], what)
                XCTAssertEqual(response.headerValues("transfer-encoding"), path == "/late" ? ["chunked"] : [], what)
                XCTAssertEqual(response.headerValues("content-length").count, path == "/late" ? 0 : 1, what)
            }
        }
    }

    /// The relay frames the body by the edited head's Content-Length: a
    /// request-phase change that leaves it alone keeps the upstream's line
    /// (no chunking), a clear of it chunks the body, a set of it replaces it.
    func testRequestPhaseResponseHeadersAndTheResponseFraming() throws {
        try folder.write("framing", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          local path = weir.request.get_path()
          weir.response.set_headers("x-ratelimit-limit-minute", 5, "ratelimit-remaining", 4)
          if path == "/nolength" then weir.response.clear_header("content-length") end
          if path == "/newlength" then weir.response.set_header("content-length", "16") end
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("framing")] }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for path in ["/plain", "/nolength", "/newlength", "/plain"] {
            let response = try client.request("GET", path)
            XCTAssertEqual(response.status, 200, path)
            XCTAssertEqual(response.bodyText, "ok from upstream", path)
            XCTAssertEqual(response.header("x-ratelimit-limit-minute"), "5", path)
            XCTAssertEqual(response.header("ratelimit-remaining"), "4", path)
            if path == "/nolength" {
                XCTAssertNil(response.header("content-length"), path)
                XCTAssertEqual(response.headerValues("transfer-encoding"), ["chunked"], path)
            } else {
                XCTAssertEqual(response.headerValues("content-length"), ["16"], path)
                XCTAssertNil(response.header("transfer-encoding"), path)
            }
        }
    }

    /// PendingResponseHeaders against the operations done one by one on
    /// NIO's HTTPHeaders (set = replaceOrAdd): random sequences over names
    /// that share lengths, some past 64 added lines, give the same head.
    func testPendingResponseHeadersMatchOperationsDoneInOrder() {
        let names = ["x-a", "x-b", "x-cc", "x-dd", "ratelimit-limit", "ratelimit-reset", "x-upstream"]
        var seed: UInt64 = 0x9E37_79B9_7F4A_7C15
        func next(_ n: Int) -> Int {
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Int((seed >> 33) % UInt64(n))
        }
        for round in 0..<300 {
            let original = HTTPHeaders([("x-upstream", "u"), ("X-A", "orig"), ("content-type", "text/plain")])
            var expected = original
            var pending = PendingResponseHeaders()
            let count = round % 10 == 0 ? 150 : next(12)
            for i in 0..<count {
                let name = names[next(names.count)]
                switch next(3) {
                case 0:
                    expected.replaceOrAdd(name: name, value: "s\(i)")
                    pending.set(name, "s\(i)")
                case 1:
                    expected.add(name: name, value: "a\(i)")
                    pending.add(name, "a\(i)")
                default:
                    expected.remove(name: name)
                    pending.clear(name)
                }
            }
            var actual = original
            pending.apply(to: &actual)
            XCTAssertEqual(actual.map { "\($0.name.lowercased())=\($0.value)" }, expected.map { "\($0.name.lowercased())=\($0.value)" },
                           "round \(round)")
            XCTAssertEqual(pending.isEmpty, count == 0, "round \(round)")
        }
    }

    func testResponseEditsOnHTTP2Streams() throws {
        try folder.write("resp", handler: responseEdits)
        try folder.write("req", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 200, VERSION = "1" }
        function P:request(conf, ctx)
          weir.upstream.request.set_header("x-h2-added", "yes")
          weir.upstream.request.clear_header("x-drop")
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("req"), pluginRef("resp")]
        }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let result = try runProgram("/usr/bin/curl", ["-sS", "--http2-prior-knowledge", "--max-time", "10", "-D", "-",
                                                      "-H", "x-drop: 1", "http://127.0.0.1:\(proxy.harness.port)/created"])
        XCTAssertEqual(result.status, 0, result.err)
        XCTAssertTrue(result.out.hasPrefix("HTTP/2 201"), result.out)
        XCTAssertTrue(result.out.contains("x-upstream: replaced"), result.out)
        XCTAssertTrue(result.out.contains("x-two: 1") && result.out.contains("x-two: 2"), result.out)
        XCTAssertTrue(result.out.contains("x-early: from-request"), result.out)
        XCTAssertTrue(result.out.contains("x-status: 201"), result.out)
        XCTAssertFalse(result.out.contains("content-type"), result.out)
        XCTAssertFalse(result.out.contains("x-evil"), result.out)
        XCTAssertFalse(result.out.lowercased().contains("connection:"), result.out)
        let seen = try XCTUnwrap(upstream.requests.first { $0.uri == "/created" })
        XCTAssertEqual(seen.header("x-h2-added"), "yes")
        XCTAssertNil(seen.header("x-drop"))
    }

    /// The writer's method, target and status replacements.
    func testWriterReplacesMethodTargetAndStatusLine() throws {
        var parser = HTTP1RequestParser()
        var bytes = ByteBuffer(string: "GET /a?b HTTP/1.1\r\nHost: h\r\nX-One: 1\r\n\r\n")
        let request = try XCTUnwrap(try parser.parse(&bytes))
        var edits = HTTP1HeadEdits()
        var out = ByteBuffer()
        HTTP1HeadWriter.writeRequest(request, edits: edits, method: "PATCH", into: &out)
        XCTAssertEqual(String(buffer: out), "PATCH /a?b HTTP/1.1\r\nHost: h\r\nX-One: 1\r\n\r\n")
        edits.target = "/new"
        edits.setField("x-one", "2", in: request.fields)
        out.clear()
        HTTP1HeadWriter.writeRequest(request, edits: edits, method: "PATCH", into: &out)
        XCTAssertEqual(String(buffer: out), "PATCH /new HTTP/1.1\r\nHost: h\r\nx-one: 2\r\n\r\n")

        var responseParser = HTTP1ResponseParser()
        var responseBytes = ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: a\r\n\r\n")
        let response = try XCTUnwrap(try responseParser.parse(&responseBytes, requestMethod: .get))
        var responseEdits = HTTP1HeadEdits()
        responseEdits.removeFields(named: "x-a", in: response.fields)
        responseEdits.addField("x-b", "b")
        XCTAssertEqual(responseEdits.firstValue(named: "X-B", in: response.fields), "b")
        XCTAssertNil(responseEdits.firstValue(named: "x-a", in: response.fields))
        XCTAssertEqual(responseEdits.fieldPairs(in: response.fields).map { "\($0.name)=\($0.value)" }, ["content-length=0", "x-b=b"])
        out.clear()
        HTTP1HeadWriter.writeResponse(response, edits: responseEdits, status: (404, "Not Found"), into: &out)
        XCTAssertEqual(String(buffer: out), "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nx-b: b\r\n\r\n")
    }

    /// The lookup behind set/clear/get: a tagged name (Content-Length,
    /// X-Forwarded-For) matches on the parser's tag, any other on its bytes
    /// in any case, every line of the name, also past the 64 lines the
    /// set keeps without allocating.
    func testFieldLookupByNameTaggedUntaggedAndPastSixtyFourLines() throws {
        var parser = HTTP1RequestParser()
        var head = "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Tag: a\r\n"
        for i in 0..<70 { head += "X-Filler-\(i): f\r\n" }
        head += "x-forwarded-FOR: 2.2.2.2\r\nx-tag: b\r\nX-Tagx: c\r\n\r\n"
        var bytes = ByteBuffer(string: head)
        let request = try XCTUnwrap(try parser.parse(&bytes))
        let fields = request.fields

        let forwarded = fields.fieldSet(named: "X-FORWARDED-FOR")
        XCTAssertEqual((0..<fields.count).filter { forwarded.contains($0) }, [1, 73])
        let tag = fields.fieldSet(named: "x-TAG")
        XCTAssertEqual((0..<fields.count).filter { tag.contains($0) }, [2, 74])
        XCTAssertTrue(fields.fieldSet(named: "x-absent").isEmpty)
        XCTAssertTrue(fields.fieldSet(named: "").isEmpty)
        // weir.request.get_header's lookup: the first line of the name, in place.
        var firstValues: [String?] = []
        for name in ["X-TAG", "x-forwarded-for", "x-filler-69", "x-absent", ""] {
            fields.withFirstValue(named: name) { firstValues.append($0.map { String(decoding: $0, as: UTF8.self) }) }
        }
        XCTAssertEqual(firstValues, ["a", "1.1.1.1", "f", nil, nil])

        var edits = HTTP1HeadEdits()
        XCTAssertEqual(edits.firstValue(named: "x-tag", in: fields), "a")
        edits.removeFields(named: "X-Tag", in: fields)
        XCTAssertFalse(edits.hasField(named: "x-tag", in: fields))
        XCTAssertTrue(edits.hasField(named: "x-tagx", in: fields))
        XCTAssertTrue(tag.isSubset(of: edits.removed))
        XCTAssertFalse(forwarded.isSubset(of: edits.removed))
        edits.setField("X-Forwarded-For", "3.3.3.3", in: fields)
        XCTAssertEqual(edits.firstValue(named: "x-forwarded-for", in: fields), "3.3.3.3")
        var out = ByteBuffer()
        HTTP1HeadWriter.writeRequest(request, edits: edits, into: &out)
        let written = String(buffer: out)
        XCTAssertFalse(written.contains("1.1.1.1") || written.contains("2.2.2.2") || written.contains("X-Tag: a") || written.contains("x-tag: b"))
        XCTAssertTrue(written.contains("X-Filler-69: f\r\nX-Tagx: c\r\nX-Forwarded-For: 3.3.3.3\r\n\r\n"))
    }
}
