import CLua
import NIOCore
import WeirCore
import XCTest
@testable import WeirLua

/// Each SDK function, through real plugins on a real event loop.
final class SDKTests: XCTestCase {
    /// A harness with one consumer, alice, with the key-auth credential { key = "a1" }.
    private static func harnessKnowingAlice() -> Harness {
        var alice = ConsumerConfig()
        alice.name = "alice"
        alice.credentials["key-auth"] = .array([.map(["key": .string("a1")])])
        let h = Harness()
        h.options.credentials = ConsumerCredentials(consumers: [alice])
        return h
    }

    /// A request of `h` to host api.example.com with `headers`.
    private static func request(on h: Harness, headers: [(String, String)]) -> TestRequest {
        let req = h.newRequest()
        req.headers = [("host", "api.example.com")] + headers
        return req
    }

    /// Loads one plugin whose request phase is `body` and returns its exit body.
    func requestBody(_ body: String, request: TestRequest? = nil, harness: Harness = Harness()) throws -> (String?, TestRequest, PhaseResult) {
        harness.folder.add("probe", handler: """
        local weir = require "weir"
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
        \(body)
        end }
        """)
        try harness.load(["probe"])
        let req = request ?? harness.newRequest()
        let result = try harness.runRequest(try harness.chain("probe"), request: req)[0]
        return (result.exitValue?.bodyString, req, result)
    }

    /// `body`: one error message per line, each raised at the probe
    /// plugin's own line (its pcall), not inside the SDK, ending with the
    /// expected message.
    private func assertRaisedAtProbeLines(_ body: String?, _ expected: [String], _ result: PhaseResult,
                                          file: StaticString = #filePath, line: UInt = #line) {
        let lines = (body ?? "").split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        assertRaisedAtProbeLines(lines, expected, result, file: file, line: line)
    }

    /// `assertRaisedAtProbeLines` of messages already split (a body that
    /// also carries results before them).
    private func assertRaisedAtProbeLines(_ lines: some Collection<String>, _ expected: [String], _ result: PhaseResult,
                                          file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(lines.count, expected.count, "\(result)", file: file, line: line)
        for (text, message) in zip(lines, expected) {
            XCTAssertTrue(text.hasSuffix(message), "\(text) should end with \(message)", file: file, line: line)
            XCTAssertTrue(text.hasPrefix("probe/handler.lua:") || text.contains("/probe/handler.lua:"), text, file: file, line: line)
        }
    }

    func testRequestAccessors() throws {
        let (body, _, result) = try requestBody("""
        local q = weir.request.get_query()
        local h = weir.request.get_headers()
        return 200, table.concat({
          weir.request.get_method(), weir.request.get_path(), weir.request.get_raw_query(),
          q.a, q.b[1], q.b[2], tostring(q.flag), weir.request.get_query_arg("b"),
          weir.request.get_header("X-Api-Key"), tostring(weir.request.get_header("missing")),
          h["x-api-key"], h.accept[1] .. h.accept[2],
          weir.request.get_host(), weir.request.get_scheme(), weir.request.get_id(),
        }, "|")
        """)
        XCTAssertEqual(body, "GET|/orders|a=1&b=two&b=three&flag|1|two|three|true|two|secret|nil|secret|ab|api.example.com|http|req-1", "\(result)")
    }

    /// get_header's values come from a per-state cache of the strings made
    /// for earlier values (RecentLuaStrings): a value repeated, one that
    /// changes, and values of the same length and end bytes (the same slot)
    /// each read as their own bytes, request after request.
    func testRequestHeaderValuesRepeatedAndChanged() throws {
        let harness = Harness()
        harness.folder.add("probe", handler: """
        local weir = require "weir"
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          return 200, tostring(weir.request.get_header("x-api-key")) .. "|" .. weir.request.get_raw_query()
        end }
        """)
        try harness.load(["probe"])
        let chain = try harness.chain("probe")
        let values = ["k1-aaaa1", "k1-aaaa1", "k1-aaaa1", "k1-bbbb1", "k1-aaaa1", "k1-bbbb1", "k1-bbbb1", "", "k1-aaaa1",
                      String(repeating: "v", count: 41), String(repeating: "v", count: 41), "k1-aaaa1"]
        for (i, value) in values.enumerated() {
            let request = harness.newRequest()
            request.headers = [("x-api-key", value)]
            request.rawQuery = i % 3 == 0 ? "a=1" : nil      // get_raw_query's "" goes through the same cache
            let result = try harness.runRequest(chain, request: request)[0]
            XCTAssertEqual(result.exitValue?.bodyString, value + "|" + (request.rawQuery ?? ""), "\(result)")
        }
    }

    func testUpstreamMutations() throws {
        let (_, req, result) = try requestBody("""
        weir.upstream.request.set_header("X-User", "alice")
        weir.upstream.request.add_header("x-tag", 1)
        weir.upstream.request.add_header("x-tag", "2")
        weir.upstream.request.clear_header("X-Remove")
        weir.upstream.request.set_path("/v2/orders")
        weir.upstream.request.set_query({ b = "x y", a = { "1", "2" } })
        weir.upstream.request.set_method("POST")
        weir.upstream.request.set_body("payload")
        assert(weir.upstream.set_target("10.1.1.1", 8081) == true)
        assert(weir.upstream.set_upstream("billing"))
        local ok, err = weir.upstream.set_upstream("nowhere")
        assert(ok == nil and err == "no upstream named 'nowhere'", err)
        weir.upstream.set_timeouts(1, nil, 2.5)
        weir.upstream.set_retries(3)
        """)
        XCTAssertEqual(result, .continue)
        XCTAssertEqual(req.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-user=alice", "x-tag=1", "x-tag=2"])
        XCTAssertEqual(req.clearedUpstreamHeaders, ["x-remove"])
        XCTAssertEqual(req.upstreamPath, "/v2/orders")
        XCTAssertEqual(req.upstreamQuery, .some("a=1&a=2&b=x%20y"))
        XCTAssertEqual(req.upstreamMethod, "POST")
        XCTAssertEqual(req.upstreamBody, Array("payload".utf8))
        XCTAssertEqual(req.upstreamTarget?.0, "10.1.1.1"); XCTAssertEqual(req.upstreamTarget?.1, 8081)
        XCTAssertEqual(req.upstreamName, "billing")
        XCTAssertEqual(req.timeouts?.0, 1); XCTAssertNil(req.timeouts?.1); XCTAssertEqual(req.timeouts?.2, 2.5)
        XCTAssertEqual(req.retries, 3)
    }

    func testResponseFunctionsInResponsePhase() throws {
        let h = Harness()
        h.folder.add("resp", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function() weir.response.set_header("x-early", "1") end,
          response = function()
            local before = weir.response.get_status() .. " " .. weir.response.get_header("Content-Type")
            weir.response.set_status(201)
            weir.response.set_header("x-before", before)
            weir.response.add_header("x-multi", "a")
            weir.response.add_header("x-multi", "b")
            weir.response.clear_header("content-type")
            local all = weir.response.get_headers()
            weir.response.set_header("x-count", #all["x-multi"])
          end,
          log = function() weir.log.info("final", weir.response.get_status()) end }
        """)
        try h.load(["resp"])
        let req = h.newRequest()
        let results = try h.runRequest(try h.chain("resp"), phases: [.request, .response, .log], request: req)
        XCTAssertEqual(results, [.continue, .continue, .continue])
        XCTAssertEqual(req.responseStatus, 201)
        XCTAssertEqual(req.response.map { "\($0.name)=\($0.value)" }, ["x-early=1", "x-before=200 text/plain", "x-multi=a", "x-multi=b", "x-count=2"])
        XCTAssertEqual(h.logs.records.last?.message, "final 201")
    }

    /// The hot functions leave argument checks to their natives (which answer
    /// false); a bad argument still raises the usual message at the caller's
    /// line, and values the natives do not take as is are still written.
    func testHotFunctionsCheckArgumentsThroughTheirNatives() throws {
        let h = Self.harnessKnowingAlice()
        let (body, req, result) = try requestBody("""
        local d = weir.shared.counters
        -- Each misuse from a function of this file, so the error names its line.
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        local out = {
          msg(function() weir.request.get_header(5) end),
          msg(function() weir.upstream.request.set_header(nil, "v") end),
          msg(function() weir.upstream.request.set_header("x-a", {}) end),
          msg(function() weir.upstream.request.clear_header(false) end),
          msg(function() weir.response.set_header("x-a", true) end),
          msg(function() weir.response.set_headers("x-a", "1", "x-b") end),
          msg(function() weir.response.set_headers("x-a", "1", 7, "2") end),
          msg(function() weir.client.authenticate(1) end),
          msg(function() weir.client.authenticate("alice", 2) end),
          msg(function() weir.client.find_credential("key-auth", "key", nil) end),
          msg(function() weir.client.identify_credential("key-auth", 2, "k") end),
          msg(function() weir.client.identify(nil, "key-auth") end),
          msg(function() weir.client.identify("alice", {}) end),
          msg(function() d:get(1) end),
          msg(function() d.get("k") end),
          msg(function() d:incr("n", "1") end),
          msg(function() d:incr("n", 1, "0") end),
          msg(function() d:incr("n", 1, 0, -1) end),
          msg(function() d.incr("n") end),
          msg(function() d.incr({ id = "x" }, "n") end),
        }
        -- what the natives take as is, and what the Lua side converts
        weir.upstream.request.set_header("x-int", 42)
        weir.upstream.request.set_header("x-neg", -1234567890123)
        weir.upstream.request.set_header("x-min", math.mininteger)
        weir.upstream.request.set_header("x-zero", 0)
        weir.upstream.request.set_header("x-float", 0.1)
        weir.response.set_header("x-float", 1 / 3)
        weir.response.set_headers("x-one", "1", "x-two", 2, "x-three", 3.0)
        weir.response.set_headers()
        d:set("f", false)
        assert(d:get("f") == false and d:incr("n", 2, 1, 0) == 3 and d:incr("n") == 4)
        assert(d:incr("n", nil, nil, nil) == 5 and d:incr("n", 0.5) == 5.5 and d:incr("fresh", 2, 10) == 12)
        local none, err = d:incr("absent")
        assert(none == nil and err == "not found")
        assert(select("#", d:incr("n", 1, 0, 0, "f")) == 1)   -- incr_get's fifth argument means nothing to incr
        assert(weir.client.find_credential("key-auth", "key", "a1") == "alice")
        weir.client.authenticate("alice")
        return 200, table.concat(out, "\\n")
        """, harness: h)
        let expected = [
            "bad argument #1 to 'weir.request.get_header' (string expected, got number)",
            "bad argument #1 to 'weir.upstream.request.set_header' (string expected, got nil)",
            "bad argument #2 to 'weir.upstream.request.set_header' (string or number expected, got table)",
            "bad argument #1 to 'weir.upstream.request.clear_header' (string expected, got boolean)",
            "bad argument #2 to 'weir.response.set_header' (string or number expected, got boolean)",
            "weir.response.set_headers: expected name, value pairs, got 3 arguments",
            "bad argument #3 to 'weir.response.set_headers' (string expected, got number)",
            "bad argument #1 to 'weir.client.authenticate' (string expected, got number)",
            "bad argument #2 to 'weir.client.authenticate' (string or nil expected, got number)",
            "bad argument #3 to 'weir.client.find_credential' (string expected, got nil)",
            "bad argument #2 to 'weir.client.identify_credential' (string expected, got number)",
            "bad argument #1 to 'weir.client.identify' (string expected, got nil)",
            "bad argument #2 to 'weir.client.identify' (string or nil expected, got table)",
            "bad argument #1 to 'weir.shared.get' (string expected, got number)",
            "weir.shared.get: call it as dict:get(...)",
            "bad argument #2 to 'weir.shared.incr' (number expected, got string)",
            "bad argument #3 to 'weir.shared.incr' (number expected, got string)",
            "bad argument #4 to 'weir.shared.incr' (non-negative number or nil expected, got number)",
            "weir.shared.incr: call it as dict:incr(...)",
            "weir.shared.incr: call it as dict:incr(...)",
        ]
        assertRaisedAtProbeLines(body, expected, result)
        XCTAssertEqual(req.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-int=42", "x-neg=-1234567890123", "x-min=-9223372036854775808", "x-zero=0", "x-float=0.1"])
        XCTAssertEqual(req.response.filter { $0.name != "content-type" }.map { "\($0.name)=\($0.value)" },   // the exit body's
                       ["x-a=1", "x-float=0.33333333333333", "x-one=1", "x-two=2", "x-three=3.0"])
        XCTAssertEqual(req.consumer, "alice")
        XCTAssertNil(req.credential)
    }

    /// weir.request.get_route_and_consumer: get_route() and get_consumer()
    /// as they are at the call (a consumer authenticated after one call is
    /// seen by the next).
    func testGetRouteAndConsumer() throws {
        let (body, _, result) = try requestBody("""
        local r1, c1 = weir.request.get_route_and_consumer()
        assert(r1 == weir.request.get_route() and c1 == nil, "before")
        weir.client.authenticate("alice")
        local r2, c2 = weir.request.get_route_and_consumer()
        assert(r2 == weir.request.get_route(), "route")
        return 200, tostring(r2) .. "|" .. tostring(c2) .. "|" .. select("#", weir.request.get_route_and_consumer())
        """)
        XCTAssertEqual(body, "nil|alice|2", "\(result)")
    }

    /// get_consumer's strings come from a small cache of recent Strings
    /// (matched on their bits first): more consumers than it holds, one
    /// made at run time (another String of the same text), and an earlier
    /// one again each read back as set.
    func testConsumerStringsThroughTheRecentCache() throws {
        let (body, _, result) = try requestBody("""
        local out = {}
        local long = "a-consumer-with-a-long-name"   -- not a small String: each authenticate makes another
        local names = { "alice", "bob", "carol", "dave", "erin", "al" .. string.lower("ICE"), "bob", "alice", long, long, "erin", long }
        for _, name in ipairs(names) do
          weir.client.authenticate(name)
          local a, b = weir.client.get_consumer(), select(2, weir.request.get_route_and_consumer())
          out[#out + 1] = a == b and a or (tostring(a) .. "~" .. tostring(b))
        end
        return 200, table.concat(out, ",")
        """)
        let long = "a-consumer-with-a-long-name"
        XCTAssertEqual(body, "alice,bob,carol,dave,erin,alice,bob,alice,\(long),\(long),erin,\(long)", "\(result)")
    }

    /// weir.client.identify_credential: no match changes nothing and
    /// answers nil; a match answers find_credential's results and has
    /// identified the client as identify(consumer, plugin) does; a bad
    /// argument raises find_credential's kind of message at the caller's line.
    func testIdentifyCredential() throws {
        let h = Self.harnessKnowingAlice()
        let (body, req, result) = try requestBody("""
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        local none = weir.client.identify_credential("key-auth", "key", "nope")
        assert(none == nil and weir.client.get_consumer() == nil)
        local bad = msg(function() weir.client.identify_credential("key-auth", 1, "a1") end)
        local consumer, credential = weir.client.identify_credential("key-auth", "key", "a1")
        return 200, table.concat({ consumer, credential.key, weir.client.get_consumer(), bad }, "|")
        """, harness: h)
        let parts = (body ?? "").split(separator: "|").map(String.init)
        XCTAssertEqual(parts.prefix(3), ["alice", "a1", "alice"], "\(result)")
        XCTAssertTrue(parts.count == 4 && parts[3].hasSuffix("bad argument #2 to 'weir.client.identify_credential' (string expected, got number)")
                      && parts[3].contains("probe/handler.lua:"), "\(parts)")
        XCTAssertEqual(req.consumer, "alice")
        XCTAssertEqual(req.credential, "key-auth")
        XCTAssertEqual(req.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-consumer-name=alice"])
        XCTAssertEqual(req.clearedUpstreamHeaders, ["x-anonymous-consumer"])
    }

    /// identify_credential's `hide`: that header is cleared upstream after
    /// the identification, whether a credential matched or not; a bad
    /// `hide` raises at the caller's line before anything changes.
    func testIdentifyCredentialHidesItsHeader() throws {
        let h = Self.harnessKnowingAlice()
        let (body, req, result) = try requestBody("""
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        local bad = msg(function() weir.client.identify_credential("key-auth", "key", "a1", 7) end)
        assert(weir.client.get_consumer() == nil, "a bad hide changes nothing")
        local none = weir.client.identify_credential("key-auth", "key", "nope", "X-Key-One")
        local consumer, credential = weir.client.identify_credential("key-auth", "key", "a1", "x-key-two")
        return 200, table.concat({ tostring(none), consumer, credential.key, bad }, "|")
        """, harness: h)
        let parts = (body ?? "").split(separator: "|").map(String.init)
        XCTAssertEqual(parts.prefix(3), ["nil", "alice", "a1"], "\(result)")
        XCTAssertTrue(parts.count == 4 && parts[3].hasSuffix("bad argument #4 to 'weir.client.identify_credential' (string or nil expected, got number)")
                      && parts[3].contains("probe/handler.lua:"), "\(parts)")
        XCTAssertEqual(req.consumer, "alice")
        XCTAssertEqual(req.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-consumer-name=alice"])
        XCTAssertEqual(req.clearedUpstreamHeaders, ["x-key-one", "x-anonymous-consumer", "x-key-two"])
    }

    /// weir.client.identify_header_credential: the header's value looked up
    /// as identify_credential would (a match identifies; no match answers
    /// nil and the value; an absent header nil, nil; an empty one nil, ""
    /// without a lookup), then with `hide` the header cleared upstream,
    /// found or not; a bad argument raises at the caller's line before
    /// anything changes.
    func testIdentifyHeaderCredential() throws {
        let h = Self.harnessKnowingAlice()
        let req = Self.request(on: h, headers: [("x-key", "a1"), ("x-wrong", "nope"), ("x-empty", "")])
        let (body, _, result) = try requestBody("""
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        local bad3 = msg(function() weir.client.identify_header_credential("key-auth", "key", 3) end)
        local bad4 = msg(function() weir.client.identify_header_credential("key-auth", "key", "x-key", "yes") end)
        assert(weir.client.get_consumer() == nil, "a bad argument changes nothing")
        local n1, v1, q1 = weir.client.identify_header_credential("key-auth", "key", "X-Wrong", true)
        local n2, v2 = weir.client.identify_header_credential("key-auth", "key", "x-absent")
        local n3, v3 = weir.client.identify_header_credential("key-auth", "key", "x-empty", false)
        assert(weir.client.get_consumer() == nil, "no match identifies no one")
        local consumer, credential, q4 = weir.client.identify_header_credential("key-auth", "key", "x-key", true)
        assert(q1 == true and q4 == true, "the third result: the request has a query string")
        return 200, table.concat({ tostring(n1), v1, tostring(n2), tostring(v2), tostring(n3), "[" .. v3 .. "]",
                                   consumer, credential.key, weir.client.get_consumer(), bad3, bad4 }, "|")
        """, request: req, harness: h)
        let parts = (body ?? "").split(separator: "|").map(String.init)
        XCTAssertEqual(parts.prefix(9), ["nil", "nope", "nil", "nil", "nil", "[]", "alice", "a1", "alice"], "\(result)")
        XCTAssertTrue(parts.count == 11
                      && parts[9].hasSuffix("bad argument #3 to 'weir.client.identify_header_credential' (string expected, got number)")
                      && parts[9].contains("probe/handler.lua:")
                      && parts[10].hasSuffix("bad argument #4 to 'weir.client.identify_header_credential' (boolean or nil expected, got string)")
                      && parts[10].contains("probe/handler.lua:"), "\(parts)")
        XCTAssertEqual(req.consumer, "alice")
        XCTAssertEqual(req.credential, "key-auth")
        XCTAssertEqual(req.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-consumer-name=alice"])
        // The hidden header is cleared before identify (its name is not one
        // of identify's: the upstream request is the same either way).
        XCTAssertEqual(req.clearedUpstreamHeaders, ["x-wrong", "x-key", "x-anonymous-consumer"])
    }

    /// A hidden header named as one of identify's lines is cleared after
    /// identify, as a clear_header after the lookup would: its added line
    /// goes too.
    func testIdentifyHeaderCredentialHidingAnIdentityNameClearsAfterIdentify() throws {
        let h = Self.harnessKnowingAlice()
        let req = Self.request(on: h, headers: [("x-consumer-name", "a1")])
        let (body, _, result) = try requestBody("""
        local consumer = weir.client.identify_header_credential("key-auth", "key", "x-consumer-name", true)
        return 200, consumer
        """, request: req, harness: h)
        XCTAssertEqual(body, "alice", "\(result)")
        XCTAssertEqual(req.clearedUpstreamHeaders, ["x-anonymous-consumer", "x-consumer-name"])
        XCTAssertTrue(req.upstreamHeaders.isEmpty, "\(req.upstreamHeaders)")
    }

    /// identify_header_credential's third result is false without a query
    /// string (key-auth then skips get_raw_query), whatever the header gave.
    func testIdentifyHeaderCredentialTellsThereIsNoQuery() throws {
        let h = Self.harnessKnowingAlice()
        let req = Self.request(on: h, headers: [("x-key", "a1")])
        req.rawQuery = nil
        let (body, _, result) = try requestBody("""
        local a, b, q1 = weir.client.identify_header_credential("key-auth", "key", "x-absent", true)
        local c, d, q2 = weir.client.identify_header_credential("key-auth", "key", "x-key")
        return 200, table.concat({ tostring(a), tostring(b), tostring(q1), c, d.key, tostring(q2), weir.request.get_raw_query() }, "|")
        """, request: req, harness: h)
        XCTAssertEqual(body, "nil|nil|false|alice|a1|false|", "\(result)")
    }

    /// The hot natives find a handle's id through a small cache by the
    /// handle table's address (HandleIDs, 16 slots): more prepared sets
    /// than it holds, used in turn with garbage collected between rounds
    /// (dropped handles too), each set still writes its own lines; a
    /// dictionary handle's calls between them count in their own dictionary.
    func testHandlesThroughTheIDCache() throws {
        let (body, req, result) = try requestBody("""
        local handles, d = {}, weir.shared.counters
        for i = 1, 40 do handles[i] = weir.response.prepare_headers({ { "x-fixed-" .. i, i }, "x-v-" .. i }) end
        for round = 1, 3 do
          for i = 1, 40 do
            handles[i]:set(round * 100 + i)
            d:incr("n", 1, 0)
            weir.response.prepare_headers({ "x-dropped-" .. (i % 5) }):set(i)
          end
          collectgarbage()
        end
        return 200, tostring(d:get("n"))
        """)
        XCTAssertEqual(body, "120", "\(result)")
        var lines: [String: [String]] = [:]
        for field in req.response { lines[field.name, default: []].append(field.value) }
        for i in 1...40 {
            XCTAssertEqual(lines["x-fixed-\(i)"], ["\(i)"], "\(i)")
            XCTAssertEqual(lines["x-v-\(i)"], ["\(300 + i)"], "\(i)")
        }
        for k in 0..<5 { XCTAssertEqual(lines["x-dropped-\(k)"], ["\(k == 0 ? 40 : 35 + k)"], "\(k)") }
    }

    /// weir.response.prepare_headers: names and fixed values checked once,
    /// each set = set_header of every line in order; what the native does
    /// not take (a float, CR/LF, the wrong count, not a handle) goes through
    /// the Lua side, with the usual messages at the caller's line.
    func testPreparedHeaders() throws {
        let (body, req, result) = try requestBody("""
        local h = weir.response.prepare_headers({ { "X-Limit", 10 }, "x-remaining", { "x-policy", "10;w=60" }, "X-Reset" })
        local again = weir.response.prepare_headers({ { "x-limit", "10" }, "X-REMAINING", { "x-policy", "10;w=60" }, "x-reset" })
        assert(again[1] == h[1], "the same lines share one set")
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        local out = {
          msg(function() h:set(1) end),
          msg(function() h.set(1, 2) end),
          msg(function() h:set({}, "1") end),
          msg(function() weir.response.prepare_headers("x-a") end),
          msg(function() weir.response.prepare_headers({ "bad name" }) end),
          msg(function() weir.response.prepare_headers({ "x-a", "X-A" }) end),
          msg(function() weir.response.prepare_headers({ { "x-a", "a\\r\\nb" } }) end),
          msg(function() weir.response.prepare_headers({ { "x-a" } }) end),
          msg(function() weir.response.prepare_headers({ 5 }) end),
          msg(function() weir.response.prepare_headers({}) end),
        }
        h:set(7, "30")                          -- the native
        h:set("bad\\r\\nvalue", 29)              -- refused: x-remaining only cleared, as set_header does
        assert(weir.response.prepare_headers({ "x-one" }):set(1.5) == nil)   -- a float: written as Lua writes it
        -- Integers' digits written by the native, an empty value, a colon in one.
        weir.response.prepare_headers({ "x-min", "x-max", { "x-fixed", "" }, "x-zero", "x-text" }):set(math.mininteger, math.maxinteger, 0, "a: b")
        local digits = weir.response.prepare_headers({ "x-d1", "x-d2", "x-d3", "x-d4", "x-d5", "x-d6" })
        digits:set(9, 10, 99, 100, -1, 1000000007)
        return 200, table.concat(out, "\\n")
        """)
        let expected = [
            "weir.response.prepare_headers' set: expected 2 values, got 1",
            "weir.response.prepare_headers' set: call it as handle:set(...) on a handle from weir.response.prepare_headers",
            "bad argument #1 to 'weir.response.prepare_headers' set' (string or number expected, got table)",
            "bad argument #1 to 'weir.response.prepare_headers' (table expected, got string)",
            "weir.response.prepare_headers: line 1: 'bad name' is not a header name (token)",
            "weir.response.prepare_headers: line 2: 'x-a' is given twice",
            "weir.response.prepare_headers: line 1 ('x-a'): the value contains CR, LF or NUL",
            "weir.response.prepare_headers: line 1: the value of { name, value } must be a string or a number, got nil",
            "weir.response.prepare_headers: line 1: the name must be a string, got number",
            "weir.response.prepare_headers: no header lines",
        ]
        assertRaisedAtProbeLines(body, expected, result)
        XCTAssertEqual(req.response.filter { $0.name != "content-type" }.map { "\($0.name)=\($0.value)" },
                       ["x-limit=10", "x-policy=10;w=60", "x-reset=29", "x-one=1.5", "x-min=-9223372036854775808",
                        "x-max=9223372036854775807", "x-fixed=", "x-zero=0", "x-text=a: b",
                        "x-d1=9", "x-d2=10", "x-d3=99", "x-d4=100", "x-d5=-1", "x-d6=1000000007"])
    }

    func testEarlyExitByReturnSkipsRestOfChainAndBuildsJSON() throws {
        let h = Harness()
        h.folder.add("auth", handler: """
        return { PRIORITY = 100, VERSION = "1", request = function(self, conf)
          if not weir.request.get_header(conf.header) then
            return 401, { message = "missing " .. conf.header }, { ["WWW-Authenticate"] = "Key", ["x-list"] = { "a", "b" } }
          end
        end }
        """, schema: "return { fields = { header = { type = 'string', default = 'x-api-key' } } }")
        h.folder.add("after", handler: "return { PRIORITY = 1, VERSION = '1', request = function() weir.upstream.request.set_header('x-after', '1') end }")
        try h.load(["auth", "after"])
        let chain = try h.chain([PluginRef(name: "auth", config: .map(["header": .string("x-token")])), PluginRef(name: "after")])
        let req = h.newRequest()
        let exit = try h.runRequest(chain, request: req)[0].exitValue
        XCTAssertEqual(exit?.status, 401)
        XCTAssertEqual(exit?.bodyString, #"{"message":"missing x-token"}"#)
        XCTAssertEqual(Set(exit?.headers.map { "\($0.name)=\($0.value)" } ?? []),
                       ["www-authenticate=Key", "x-list=a", "x-list=b", "content-type=application/json"])
        XCTAssertTrue(req.upstreamHeaders.isEmpty, "the rest of the chain must be skipped")
        // With the header present the chain continues.
        let ok = h.newRequest()
        ok.headers.append(("x-token", "t"))
        XCTAssertEqual(try h.runRequest(chain, request: ok)[0], .continue)
        XCTAssertEqual(ok.upstreamHeaders.first?.0, "x-after")
    }

    func testExitStopsThePluginImmediately() throws {
        let (_, req, result) = try requestBody("""
        weir.response.exit(429, "slow down", { ["retry-after"] = 5 })
        weir.upstream.request.set_header("x-not-reached", "1")
        """)
        XCTAssertEqual(result.exitValue, PluginExit(status: 429, body: Array("slow down".utf8), headers: [HeaderField("retry-after", "5")]))
        XCTAssertTrue(req.upstreamHeaders.isEmpty)
    }

    func testClientAndConsumer() throws {
        let (body, req, _) = try requestBody("""
        local before = tostring(weir.client.get_consumer())
        weir.client.authenticate("alice", "alice-key")
        return 200, before .. " " .. weir.client.get_consumer() .. " " .. weir.client.get_ip() .. ":" .. weir.client.get_port()
        """)
        XCTAssertEqual(body, "nil alice 10.0.0.7:51234")
        XCTAssertEqual(req.consumer, "alice")
        XCTAssertEqual(req.credential, "alice-key")
    }

    /// identify = authenticate + the upstream's X-Consumer-Name, and
    /// X-Anonymous-Consumer set for an anonymous consumer, else removed (a
    /// client must not be able to claim it); a consumer name that cannot be
    /// a header value only clears X-Consumer-Name, as set_header would.
    func testIdentifyAuthenticatesAndTellsTheUpstream() throws {
        let (_, known, knownResult) = try requestBody("""
        weir.client.identify("alice", "key-auth")
        """)
        XCTAssertEqual(knownResult, .continue)
        XCTAssertEqual(known.consumer, "alice")
        XCTAssertEqual(known.credential, "key-auth")
        XCTAssertEqual(known.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-consumer-name=alice"])
        XCTAssertEqual(known.clearedUpstreamHeaders, ["x-anonymous-consumer"])

        let (body, anonymous, _) = try requestBody("""
        weir.client.identify("guest", nil, true)
        return 200, weir.client.get_consumer()
        """)
        XCTAssertEqual(body, "guest")
        XCTAssertNil(anonymous.credential)
        XCTAssertEqual(anonymous.upstreamHeaders.map { "\($0.0)=\($0.1)" }, ["x-consumer-name=guest", "x-anonymous-consumer=true"])
        XCTAssertEqual(anonymous.clearedUpstreamHeaders, [])

        let (_, odd, _) = try requestBody("""
        weir.client.identify("bad\\r\\nname")
        """)
        XCTAssertEqual(odd.consumer, "bad\r\nname")
        XCTAssertEqual(odd.upstreamHeaders.count, 0)
        XCTAssertEqual(odd.clearedUpstreamHeaders, ["x-consumer-name", "x-anonymous-consumer"])
    }

    func testFindCredentialReturnsTheConsumerAndOneTablePerCredential() throws {
        let h = Harness()
        var alice = ConsumerConfig()
        alice.name = "alice"
        alice.credentials["key-auth"] = .array([.map(["key": .string("a1"), "label": .string("main")]), .map(["key": .string("a2")])])
        h.options.credentials = ConsumerCredentials(consumers: [alice])
        let (body, _, result) = try requestBody("""
        local c1, t1 = weir.client.find_credential("key-auth", "key", "a1")
        local _, t1again = weir.client.find_credential("key-auth", "label", "main")
        local c2, t2 = weir.client.find_credential("key-auth", "key", "a2")
        local none = weir.client.find_credential("key-auth", "key", "a3")
        return 200, table.concat({ c1, t1.key, t1.label, tostring(rawequal(t1, t1again)), c2, t2.key,
          tostring(rawequal(t1, t2)), tostring(none) }, "|")
        """, harness: h)
        XCTAssertEqual(body, "alice|a1|main|true|alice|a2|false|nil", "\(result)")
    }

    /// find_credential's per-string cache (CredentialLookups) answers as a
    /// lookup does: the same value asked under another field or plugin, more
    /// keys than slots, keys built at run time, collections in between.
    func testFindCredentialAnswersAreTheLookupsAcrossRepeatsAndCollections() throws {
        let h = Harness()
        var alice = ConsumerConfig(), bob = ConsumerConfig()
        alice.name = "alice"
        bob.name = "bob"
        alice.credentials["key-auth"] = .array((0..<150).map { .map(["key": .string("a\($0)")]) })
        bob.credentials["key-auth"] = .array((0..<150).map { .map(["key": .string("b\($0)")]) })
        bob.credentials["other-auth"] = .array([.map(["key": .string("a1")])])
        h.options.credentials = ConsumerCredentials(consumers: [alice, bob])
        let (body, _, result) = try requestBody("""
        local find, bad = weir.client.find_credential, {}
        for round = 1, 3 do
          for i = 0, 149 do
            local a, b = "a" .. i, "b" .. i
            if find("key-auth", "key", a) ~= "alice" then bad[#bad + 1] = a end
            if find("key-auth", "key", a) ~= "alice" then bad[#bad + 1] = a .. " again" end
            if find("key-auth", "key", b) ~= "bob" then bad[#bad + 1] = b end
            if find("key-auth", "label", a) ~= nil then bad[#bad + 1] = a .. " as label" end
            if find("key-auth", "key", "x" .. i) ~= nil then bad[#bad + 1] = "x" .. i end
          end
          if find("other-auth", "key", "a1") ~= "bob" then bad[#bad + 1] = "a1 under other-auth" end
          if find("key-auth", "key", "a1") ~= "alice" then bad[#bad + 1] = "a1 back under key-auth" end
          collectgarbage()
        end
        return 200, #bad == 0 and "ok" or table.concat(bad, ",")
        """, harness: h)
        XCTAssertEqual(body, "ok", "\(result)")
    }

    func testCtxIsSharedAcrossPluginsAndPhasesButNotRequests() throws {
        let h = Harness()
        h.folder.add("writer", handler: """
        return { PRIORITY = 2, VERSION = "1",
          request = function(self, conf, ctx) assert(ctx.seen == nil, "ctx leaked between requests"); ctx.seen = "w" end }
        """)
        h.folder.add("reader", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf, ctx) weir.ctx.seen = weir.ctx.seen .. "+r" end,
          log = function(self, conf, ctx) weir.log.warn("ctx", ctx.seen, weir.ctx == ctx) end }
        """)
        try h.load(["writer", "reader"])
        let chain = try h.chain("writer", "reader")
        for _ in 0..<2 {
            XCTAssertEqual(try h.runRequest(chain, phases: [.request, .log]), [.continue, .continue])
        }
        let record = h.logs.records.last
        XCTAssertEqual(record?.message, "ctx w+r true")
        XCTAssertEqual(record?.plugin, "reader")
        XCTAssertEqual(record?.requestID, "req-1")
        XCTAssertEqual(record?.level, .warn)
        XCTAssertEqual(record?.phase, .log)
    }

    /// A finished, detached scope restarted for the next request of its
    /// context (the proxy reuses each request's context object with its
    /// scope): same object, a fresh weir.ctx, the last request's exit gone.
    func testRestartedScopeStartsFresh() throws {
        let h = Harness()
        h.folder.add("writer", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf, ctx)
            assert(ctx.seen == nil and weir.ctx.seen == nil, "ctx leaked between requests")
            ctx.seen = weir.request.get_id()
            if ctx.seen == "req-a" then return 403 end
          end,
          log = function(self, conf, ctx) weir.log.warn(ctx.seen, weir.ctx == ctx) end }
        """)
        try h.load(["writer"])
        let chain = try h.chain("writer")
        let request = h.newRequest()
        request.requestID = "req-a"
        let scope = h.begin(request)
        guard case .exit(let exit) = try h.run(scope, .request, chain) else { return XCTFail("expected the exit") }
        XCTAssertEqual(exit.status, 403)
        XCTAssertEqual(try h.run(scope, .log, chain), .continue)
        try h.onLoop { scope.finish() }
        XCTAssertTrue(scope.isFinished)
        try h.onLoop { scope.detach() }
        XCTAssertNil(scope.context)
        request.requestID = "req-b"
        try h.onLoop { h.runtime.restartRequest(scope, request, connection: nil) }
        XCTAssertTrue(scope.context === request)
        XCTAssertFalse(scope.isFinished)
        XCTAssertEqual(try h.run(scope, .request, chain), .continue)
        XCTAssertEqual(try h.run(scope, .log, chain), .continue)
        try h.onLoop { scope.finish() }
        XCTAssertEqual(h.logs.records.map(\.message), ["req-a true", "req-b true"])
        XCTAssertEqual(h.logs.records.map { $0.requestID ?? "" }, ["req-a", "req-b"])
    }

    func testLogLevels() throws {
        let h = Harness()
        _ = try requestBody("weir.log.debug('d', 1) weir.log.info('i') weir.log.warn('w', nil) weir.log.err('e', true)", harness: h)
        XCTAssertEqual(h.logs.records.map { "\($0.level):\($0.message)" }, ["debug:d 1", "info:i", "warn:w nil", "error:e true"])
        XCTAssertTrue(h.logs.records.allSatisfy { $0.plugin == "probe" && $0.requestID == "req-1" })
    }

    func testJSON() throws {
        let (body, _, result) = try requestBody("""
        local json = weir.json
        local s = json.encode({ name = "a\\"b\\n", list = { 1, 2.5, true }, empty = json.empty_array, none = json.null, n = -3 })
        local v, err = json.decode('{"x":[1,2,{"y":"z\\\\u00e9\\\\ud83d\\\\ude00"}],"t":true,"f":false,"n":null,"e":1.5e2}')
        assert(v, err)
        local bad1, e1 = json.decode('{"x":}')
        local bad2, e2 = json.decode('[1,2] x')
        local bad3, e3 = json.encode({ f = print })
        return 200, table.concat({ s, v.x[3].y, tostring(v.t), tostring(v.f), tostring(v.n == json.null), tostring(v.e),
          tostring(bad1), e1, e2, tostring(bad3), e3, json.encode("x"), json.encode(0.1) }, "|")
        """)
        XCTAssertEqual(body, #"{"empty":[],"list":[1,2.5,true],"n":-3,"name":"a\"b\n","none":null}|zé😀|true|false|true|150.0|nil|json decode: unexpected character '}' at position 6|json decode: trailing garbage at position 7|nil|json encode: cannot encode a function value|"x"|0.1"#, "\(result)")
    }

    func testCrypto() throws {
        let (body, _, result) = try requestBody("""
        local c = weir.crypto
        local r = c.random_bytes(16)
        local d, derr = c.base64_decode("%%%")
        return 200, table.concat({
          c.hex(c.sha256("abc")),
          c.hex(c.hmac_sha256("key", "The quick brown fox jumps over the lazy dog")),
          c.base64_encode("hello?>"), c.base64_encode("hello?>", true), c.base64_decode("aGVsbG8/Pg=="), c.base64_decode("aGVsbG8_Pg"),
          tostring(#r), tostring(r ~= c.random_bytes(16)),
          tostring(c.constant_time_equals("abc", "abc")), tostring(c.constant_time_equals("abc", "abd")), tostring(c.constant_time_equals("abc", "ab")),
          tostring(d), derr,
        }, "|")
        """)
        XCTAssertEqual(body, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad|f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8|aGVsbG8/Pg==|aGVsbG8_Pg|hello?>|hello?>|16|true|true|false|false|nil|invalid base64", "\(result)")
    }

    func testTimeNow() throws {
        let before = Date().timeIntervalSince1970
        let (body, _, _) = try requestBody("return 200, string.format('%.3f %s', weir.time.now(), tostring(weir.time.monotonic() > 0))")
        let parts = body?.split(separator: " ") ?? []
        let now = Double(parts.first ?? "") ?? 0
        XCTAssertGreaterThanOrEqual(now, before - 1)
        XCTAssertLessThan(now, before + 60)
        XCTAssertEqual(parts.last, "true")
    }

    func testCtxIsMadeOnlyWhenAHandlerTakesItOrReadsIt() throws {
        let h = Harness()
        // Declares no ctx parameter: is handed none, and no table is made for it.
        h.folder.add("bare", handler: """
        return { PRIORITY = 3, VERSION = "1", request = function(self, conf, ...) assert(select("#", ...) <= 1) end }
        """)
        h.folder.add("plain", handler: """
        return { PRIORITY = 2, VERSION = "1", request = function(self, conf) end,
          log = function(self, conf) weir.ctx.order = (weir.ctx.order or "") .. "plain" end }
        """)
        h.folder.add("taker", handler: """
        return { PRIORITY = 1, VERSION = "1", log = function(self, conf, ctx) weir.log.warn(ctx.order, tostring(ctx == weir.ctx)) end }
        """)
        try h.load(["bare", "plain", "taker"])
        let chain = try h.chain("bare", "plain", "taker")
        let scope = h.begin(h.newRequest())
        XCTAssertEqual(try h.run(scope, .request, chain), .continue)
        // bare is vararg (so it is handed ctx); plain takes (self, conf) only.
        XCTAssertNotEqual(scope.ctxRef, LUA_NOREF)
        try h.loop.submit { scope.finish() }.wait()

        let lean = try h.chain("plain")
        let leanScope = h.begin(h.newRequest())
        XCTAssertEqual(try h.run(leanScope, .request, lean), .continue)
        XCTAssertEqual(leanScope.ctxRef, LUA_NOREF, "weir.ctx made though no plugin touched it")
        // Read in the log phase through weir.ctx: made then, and the same table for the next plugin.
        let later = try h.chain("plain", "taker")
        XCTAssertEqual(try h.run(leanScope, .log, later), .continue)
        XCTAssertNotEqual(leanScope.ctxRef, LUA_NOREF)
        try h.loop.submit { leanScope.finish() }.wait()
        XCTAssertEqual(h.logs.records.last?.message, "plain true")
    }

    func testSharedDictionaryKeysAreComparedAsBytes() throws {
        let h = Harness()
        let (body, _, result) = try requestBody(#"""
        local d = weir.shared.counters
        local keys = { "", "a", "a\0", "a\0b", "ab", "\xff\xfe", "caf\xc3\xa9" }
        for i, k in ipairs(keys) do d:set(k, i) end
        d:delete("a\0")
        local out = {}
        for _, k in ipairs(keys) do out[#out + 1] = tostring(d:get(k)) end
        return 200, table.concat(out, ",")
        """#, harness: h)
        XCTAssertEqual(body, "1,2,nil,4,5,6,7", "\(result)")
        // The String API reaches the same entries.
        XCTAssertEqual(h.options.shared.get("counters", "café"), .integer(7))
        XCTAssertEqual(h.options.shared.get("counters", ""), .integer(1))
        XCTAssertNil(h.options.shared.get("counters", "a\u{0}"))
    }

    func testSharedDictionaryEvictsAndDeletesAcrossManyKeys() {
        let shared = SharedDictionaries(capacities: ["d": 50])
        for i in 0..<200 { shared.set("d", "key-\(i)", .integer(Int64(i)), ttl: 0) }
        XCTAssertEqual(shared.count("d"), 50)
        XCTAssertNil(shared.get("d", "key-149"))
        for i in 150..<200 { XCTAssertEqual(shared.get("d", "key-\(i)"), .integer(Int64(i))) }
        for i in stride(from: 150, to: 200, by: 2) { shared.delete("d", "key-\(i)") }
        XCTAssertEqual(shared.count("d"), 25)
        for i in 150..<200 { XCTAssertEqual(shared.get("d", "key-\(i)"), i % 2 == 0 ? nil : .integer(Int64(i))) }
        XCTAssertTrue(shared.add("d", "key-150", .bool(true), ttl: 0))
        XCTAssertEqual(shared.get("d", "key-150"), .bool(true))
    }

    /// The bucket table doubles many times over as keys arrive (16 buckets
    /// to begin with): every key stays reachable, counts and deletes stay
    /// right, and eviction still takes the least recently used.
    func testSharedDictionaryGrowsItsBucketsKeepingEveryKey() {
        let shared = SharedDictionaries(capacities: ["d": 5000])
        for i in 0..<5000 { shared.set("d", "k\(i)", .integer(Int64(i)), ttl: 0) }
        XCTAssertEqual(shared.count("d"), 5000)
        for i in 0..<5000 { XCTAssertEqual(shared.get("d", "k\(i)"), .integer(Int64(i))) }
        for i in stride(from: 0, to: 5000, by: 3) {
            XCTAssertEqual(shared.incr("d", "k\(i)", by: .integer(1), initial: nil, initialTTL: 0), .success(.integer(Int64(i + 1))))
        }
        for i in stride(from: 1, to: 5000, by: 3) { shared.delete("d", "k\(i)") }
        XCTAssertEqual(shared.count("d"), 5000 - 1667)
        // Refill to the cap, then one more: after the reads and increments
        // above, the least recently used left is k2 (k0 was incremented after
        // the reads, k1 deleted).
        for i in 5000..<6667 { shared.set("d", "k\(i)", .integer(Int64(i)), ttl: 0) }
        XCTAssertEqual(shared.count("d"), 5000)
        shared.set("d", "one-more", .bool(true), ttl: 0)
        XCTAssertEqual(shared.count("d"), 5000)
        XCTAssertNil(shared.get("d", "k2"), "the least recently used went")
        XCTAssertEqual(shared.get("d", "k0"), .integer(1))
        XCTAssertEqual(shared.get("d", "one-more"), .bool(true))
        for i in stride(from: 1, to: 5000, by: 3) { XCTAssertNil(shared.get("d", "k\(i)")) }
    }

    /// incr_get's two keys under one lock: `other` counts as used before the
    /// incremented key (so of the two it is evicted first), a new key that
    /// evicts `other` reads it as absent, and `other` may be the key itself
    /// (read after the increment).
    func testIncrGetTouchesTheOtherKeyFirstAndSeesEvictions() {
        let shared = SharedDictionaries(capacities: ["two": 2, "one": 1])
        func incrGet(_ name: String, _ key: String, _ other: String) -> (SharedDictionaries.Value?, SharedDictionaries.Value?) {
            let d = shared.dictionary(id: shared.id(of: name)!)!
            let (result, value) = SharedKey.withBytes(key) { k in
                SharedKey.withBytes(other) { o in
                    d.incrGet(k, hash: SharedKey.hash(k), .integer(1), initial: .integer(0), initialTTL: 0,
                              other: o, otherHash: SharedKey.hash(o), now: 1)
                }
            }
            return (try? result.get(), value)
        }
        shared.set("two", "prev", .integer(7), ttl: 0)
        XCTAssertTrue(incrGet("two", "cur", "prev") == (.integer(1), .integer(7)))
        XCTAssertTrue(incrGet("two", "cur", "prev") == (.integer(2), .integer(7)))
        shared.set("two", "third", .bool(true), ttl: 0)
        XCTAssertNil(shared.get("two", "prev"), "touched before cur: the least recently used of the two")
        XCTAssertEqual(shared.get("two", "cur"), .integer(2))

        shared.set("one", "prev", .integer(5), ttl: 0)
        XCTAssertTrue(incrGet("one", "cur", "prev") == (.integer(1), nil), "inserting cur evicted prev")
        XCTAssertTrue(incrGet("two", "same", "same") == (.integer(1), .integer(1)))
        XCTAssertTrue(incrGet("two", "same", "same") == (.integer(2), .integer(2)))
    }

    /// dict:incr_sliding: incr_get's count and a sliding window's estimate
    /// and decision in one native call, answering as its Lua fallback
    /// (which the native leaves floats, large limits and bad arguments to)
    /// computes it; a refused request's increment is taken back.
    func testSharedIncrSlidingDecidesAsTheLuaArithmetic() throws {
        let h = Harness()
        let (body, _, result) = try requestBody("""
        local d = weir.shared.counters
        d:set("p", 30)
        local out = {}
        local function add(...) local t = table.pack(...); for i = 1, t.n do t[i] = tostring(t[i]) end; out[#out + 1] = table.concat(t, ",") end
        -- prev 30 at 30.25 s of 60: 14.875 + count against 17
        for _ = 1, 4 do add(d:incr_sliding("w", "p", 60, 30.25, 17, 121)) end
        add(d:get("w"))
        -- as the Lua arithmetic, for floats and integers
        local function ref(count, prev, window, elapsed, limit)
          local e = prev * (window - elapsed) / window + count
          if not (e > limit) then return (limit - e) // 1 | 0 end
          return false
        end
        local same = true
        for i, case in ipairs({ { 0.0, 100 }, { 59.999, 31 }, { 12.3456789, 1000000000 }, { 30, 100 }, { 1, 60 }, { 0.5, 30 } }) do
          local r = d:incr_sliding("k" .. i, "p", 60, case[1], case[2])
          if r ~= ref(1, 30, 60, case[1], case[2]) or math.type(r) ~= math.type(ref(1, 30, 60, case[1], case[2])) then same = false end
        end
        add(same)
        add(d:incr_sliding("absent-prev", "none", 10, 2.5, 5))
        d:set("float", 1.5)
        add(d:incr_sliding("float", "p", 60, 30.25, 100))
        add(d:incr_sliding("huge-limit", "p", 60, 30.25, 1 << 60))
        d:set("word", "text")
        add(d:incr_sliding("word", "p", 60, 1, 5))
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        return 200, table.concat(out, "|") .. "|" .. table.concat({
          msg(function() d:incr_sliding("w", 7, 60, 1, 5) end),
          msg(function() d:incr_sliding("w", "p", "60", 1, 5) end),
          msg(function() d:incr_sliding("w", "p", 60, 1, 5, -1) end),
          msg(function() d:incr_sliding("w", "p", 0, 1, 5) end),
          msg(function() d:incr_sliding("nan", "p", 60, 0/0, 100) end),
          msg(function() d:incr_sliding("nan", "p", 60, math.huge, 100) end),
          msg(function() d:incr_sliding("nan", "p", 60, 1, 0/0) end),
          msg(function() d:incr_sliding("nan", "p", 60, 1, -math.huge) end),
          msg(function() d.incr_sliding("w") end) }, "|")
        """, harness: h)
        let parts = (body ?? "").split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        XCTAssertEqual(Array(parts.prefix(10)),
                       ["1", "0", "false,3,30", "false,3,30", "2", "true", "4", "82", "1152921504606846976", "nil,not a number"],
                       "\(result)")
        assertRaisedAtProbeLines(parts.dropFirst(10), [
            "bad argument #2 to 'weir.shared.incr_sliding' (string expected, got number)",
            "bad argument #3 to 'weir.shared.incr_sliding' (number expected, got string)",
            "bad argument #6 to 'weir.shared.incr_sliding' (non-negative number or nil expected, got number)",
            "bad argument #3 to 'weir.shared.incr_sliding' (positive window expected, got number)",
            "bad argument #4 to 'weir.shared.incr_sliding' (finite number expected, got number)",
            "bad argument #4 to 'weir.shared.incr_sliding' (finite number expected, got number)",
            "bad argument #5 to 'weir.shared.incr_sliding' (finite number expected, got number)",
            "bad argument #5 to 'weir.shared.incr_sliding' (finite number expected, got number)",
            "weir.shared.incr_sliding: call it as dict:incr_sliding(...)",
        ], result)
        XCTAssertEqual(h.options.shared.get("counters", "w"), .integer(2), "the refused requests' increments taken back")
        XCTAssertNil(h.options.shared.get("counters", "nan"), "a non-finite elapsed or limit counts nothing")
    }

    /// dict:incr_sliding with a prepared header set: an admitted request's
    /// set made in the same call (`true` = the remaining count), by the
    /// native or its fallback alike; none when refused or with nil; a bad
    /// set or value count raises before anything is counted.
    func testSharedIncrSlidingSetsThePreparedHeadersWhenAdmitted() throws {
        let h = Harness()
        let (body, req, result) = try requestBody("""
        local d = weir.shared.counters
        d:set("p", 30)
        local a = weir.response.prepare_headers({ { "x-limit", 17 }, "x-a-remaining", "x-a-also", "x-a-reset" })
        local b = weir.response.prepare_headers({ "x-b-remaining", "x-b-other", "x-b-reset" })
        local c = weir.response.prepare_headers({ "x-c" })
        local out = {}
        out[#out + 1] = d:incr_sliding("w", "p", 60, 30.25, 17, 121, a, true, true, 29)   -- the native: 1
        d:set("f", 1.5)                                                                  -- a float: the fallback
        out[#out + 1] = d:incr_sliding("f", "p", 60, 30.25, 100, 0, b, true, 7, 5)
        assert(d:incr_sliding("w", "p", 60, 30.25, 17, 121, a, true, true, 29) == 0)
        local r, n, p = d:incr_sliding("w", "p", 60, 30.25, 17, 121, c, true)          -- refused: no x-c
        out[#out + 1] = tostring(r) .. "," .. n .. "," .. p
        out[#out + 1] = d:incr_sliding("k", "p", 60, 0, 100, 0, nil, true)              -- nil: no set
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        out[#out + 1] = msg(function() d:incr_sliding("w", "p", 60, 1, 5, 0, a, true) end)
        out[#out + 1] = msg(function() d:incr_sliding("w", "p", 60, 1, 5, 0, {}, true) end)
        out[#out + 1] = d:get("w")
        return 200, table.concat(out, "|")
        """, harness: h)
        let parts = (body ?? "").split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        XCTAssertEqual(parts.count, 7, "\(result)")
        XCTAssertEqual(Array(parts.prefix(4)), ["1", "82", "false,3,30", "69"], "\(result)")
        assertRaisedAtProbeLines(parts.dropFirst(4).prefix(2), [
            "weir.shared.incr_sliding: the prepared set takes 3 values, got 1",
            "weir.shared.incr_sliding: argument #7 must be a handle from weir.response.prepare_headers (or nil)"], result)
        XCTAssertEqual(parts.last, "2", "a bad set counts nothing")
        XCTAssertEqual(req.response.filter { $0.name != "content-type" }.map { "\($0.name)=\($0.value)" },
                       ["x-b-remaining=82", "x-b-other=7", "x-b-reset=5",
                        "x-limit=17", "x-a-remaining=0", "x-a-also=0", "x-a-reset=29"], "set again: a's lines after b's")
    }

    /// dict:incr_get: incr, then another key's value, from one native call;
    /// failures and bad arguments answer as incr's do.
    func testSharedIncrGetIncrementsAndReadsTheOtherKey() throws {
        let h = Harness()
        let (body, _, result) = try requestBody("""
        local d = weir.shared.counters
        d:set("prev", 41)
        d:set("word", "text")
        local n1, p1 = d:incr_get("cur", 1, 0, 60, "prev")
        local n2, p2 = d:incr_get("cur", 2, 0, 60, "absent")
        local n3, e3 = d:incr_get("missing", 1, nil, 0, "prev")
        local n4, e4 = d:incr_get("word", 1, 0, 0, "prev")
        -- the native defaults delta and init_ttl; two results even when the other key is absent
        local n5, p5 = d:incr_get("fresh", nil, 5, nil, "prev")
        assert(n5 == 6 and p5 == 41 and select("#", d:incr_get("fresh", 1, 0, 0, "absent")) == 2)
        local function msg(f) local ok, err = pcall(f); assert(not ok); return err end
        return 200, table.concat({ n1, p1, n2, tostring(p2), tostring(n3), e3, tostring(n4), e4,
          msg(function() d:incr_get("cur", 1, 0, 0, 7) end),
          msg(function() d:incr_get("cur", 1, 0, 0) end),
          msg(function() d:incr_get("cur", "1", 0, 0, "prev") end),
          msg(function() d.incr_get("cur") end),
          msg(function() d.incr_get({ id = "x" }, "cur", 1, 0, 0, "prev") end) }, "|")
        """, harness: h)
        let parts = (body ?? "").split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        XCTAssertEqual(Array(parts.prefix(8)), ["1", "41", "3", "nil", "nil", "not found", "nil", "not a number"], "\(result)")
        assertRaisedAtProbeLines(parts.dropFirst(8), [
            "bad argument #5 to 'weir.shared.incr_get' (string expected, got number)",
            "bad argument #5 to 'weir.shared.incr_get' (string expected, got nil)",
            "bad argument #2 to 'weir.shared.incr_get' (number expected, got string)",
            "weir.shared.incr_get: call it as dict:incr_get(...)",
            "weir.shared.incr_get: call it as dict:incr_get(...)",
        ], result)
        XCTAssertEqual(h.options.shared.get("counters", "cur"), .integer(3))
    }

    func testSharedDictionaries() throws {
        let h = Harness()
        let (body, _, result) = try requestBody("""
        local d = weir.shared.counters
        assert(weir.shared.nope == nil)
        d:set("k", "v")
        local added, aerr = d:add("k", "other")
        local added2 = d:add("fresh", 1)
        local n1 = d:incr("hits", 1, 0)
        local n2 = d:incr("hits", 2)
        local missing, merr = d:incr("absent", 1)
        local nan, nerr = d:incr("k", 1)
        d:delete("fresh")
        local tiny = weir.shared.tiny
        tiny:set("a", 1) tiny:set("b", 2) tiny:get("a") tiny:set("c", 3)  -- evicts b (least recently used)
        return 200, table.concat({ d:get("k"), tostring(added), aerr, tostring(added2), n1, n2, tostring(missing), merr, nerr,
          tostring(d:get("fresh")), tostring(tiny:get("a")), tostring(tiny:get("b")), tostring(tiny:get("c")), tostring(d:get("hits") == 3) }, "|")
        """, harness: h)
        XCTAssertEqual(body, "v|nil|exists|true|1|3|nil|not found|not a number|nil|1|nil|3|true", "\(result)")
        // Visible from Swift (and so from every other event loop).
        XCTAssertEqual(h.options.shared.get("counters", "hits"), .integer(3))
    }

    /// dict:incr's counter path (`Dictionary.incrementCounter`, what the
    /// native tries first) against the general `incr`/`incrGet`: run the
    /// same operations both ways, the counter path followed by the general
    /// one wherever it answers `.notCounter` (as the native does). The
    /// answers, the values and the LRU order (what a full dictionary evicts)
    /// come out the same.
    func testCounterPathMatchesTheGeneralIncrement() {
        typealias Value = SharedDictionaries.Value
        struct Op { var key: String; var delta: Int64; var initial: Int64?; var ttl = 0.0; var other: String?; var now = 1.0 }
        let ops = [
            Op(key: "a", delta: 1, initial: 0, ttl: 5, other: nil),         // new, expires at 6
            Op(key: "a", delta: 2, initial: nil, other: nil),               // existing
            Op(key: "b", delta: 1, initial: nil, other: "a"),               // absent, no initial: not found
            Op(key: "b", delta: 1, initial: 10, other: "a"),                // new, other read
            Op(key: "b", delta: -3, initial: 0, other: "b"),                // other is the key itself
            Op(key: "s", delta: 1, initial: 0, other: nil),                 // a string: not a number
            Op(key: "b", delta: 1, initial: 0, other: "s"),                 // other not a counter
            Op(key: "big", delta: 1, initial: 0, other: nil),               // overflows to a float
            Op(key: "a", delta: 1, initial: 0, other: "b", now: 7),         // expired: starts again
            Op(key: "c", delta: 1, initial: 0, other: "a"),                 // full: evicts the least recently used
            Op(key: "x", delta: 1, initial: 0, other: nil), Op(key: "y", delta: 1, initial: 0, other: nil),
            Op(key: "z", delta: 1, initial: 0, other: nil),
            Op(key: "x", delta: 1, initial: 0, other: nil),                 // x used again: y is now the oldest of the three
            Op(key: "w", delta: 1, initial: 0, other: nil), Op(key: "v", delta: 1, initial: 0, other: nil),
        ]
        func run(counterFirst: Bool) -> [String] {
            let shared = SharedDictionaries(capacities: ["d": 4])
            shared.set("d", "s", .string("text"), ttl: 0)
            shared.set("d", "big", .integer(.max), ttl: 0)
            let d = shared.dictionary(id: shared.id(of: "d")!)!
            var log: [String] = []
            for op in ops {
                SharedKey.withBytes(op.key) { k in
                    let hash = SharedKey.hash(k)
                    func general(_ o: UnsafeRawBufferPointer?) -> String {
                        let initial = op.initial.map { Value.integer($0) }
                        guard let o else {
                            return "\(d.incr(k, hash: hash, .integer(op.delta), initial: initial, initialTTL: op.ttl, now: op.now))"
                        }
                        let (result, other) = d.incrGet(k, hash: hash, .integer(op.delta), initial: initial, initialTTL: op.ttl,
                                                        other: o, otherHash: SharedKey.hash(o), now: op.now)
                        return "\(result) \(String(describing: other))"
                    }
                    func both(_ o: UnsafeRawBufferPointer?) -> String {
                        guard counterFirst else { return general(o) }
                        switch d.incrementCounter(k, hash: hash, by: op.delta, initial: op.initial, initialTTL: op.ttl,
                                                  other: o, otherHash: o.map(SharedKey.hash) ?? 0, now: op.now) {
                        case .counted(let count, let other):
                            let result = "\(Result<Value, SharedDictionaries.IncrError>.success(.integer(count)))"
                            return o == nil ? result : "\(result) \(String(describing: other.map { Value.integer($0) }))"
                        case .notFound:
                            let result = "\(Result<Value, SharedDictionaries.IncrError>.failure(.notFound))"
                            return o == nil ? result : "\(result) \(String(describing: Value?.none))"
                        case .notCounter: return general(o)
                        }
                    }
                    if let other = op.other { log.append(SharedKey.withBytes(other) { both($0) }) } else { log.append(both(nil)) }
                }
            }
            for key in ["a", "b", "c", "s", "big", "x", "y", "z", "w", "v"] { log.append("\(key)=\(String(describing: shared.get("d", key)))") }
            return log
        }
        let general = run(counterFirst: false), counter = run(counterFirst: true)
        XCTAssertEqual(counter, general)
        XCTAssertEqual(general.count, ops.count + 10)
        XCTAssertEqual(Array(general.suffix(5)), ["x=Optional(WeirLua.SharedDictionaries.Value.integer(2))", "y=nil",
                                                  "z=Optional(WeirLua.SharedDictionaries.Value.integer(1))",
                                                  "w=Optional(WeirLua.SharedDictionaries.Value.integer(1))",
                                                  "v=Optional(WeirLua.SharedDictionaries.Value.integer(1))"])
        XCTAssertTrue(general[2].hasPrefix("failure(WeirLua.SharedDictionaries.IncrError.notFound)"), general[2])
        XCTAssertTrue(general[7].contains("number(9.2233"), general[7])
    }

    func testSharedDictionaryTTL() {
        final class Clock: @unchecked Sendable { var now = 100.0 }
        let clock = Clock()
        let shared = SharedDictionaries(capacities: ["d": 10], clock: { clock.now })
        shared.set("d", "k", .string("v"), ttl: 5)
        XCTAssertEqual(shared.incr("d", "c", by: .integer(1), initial: .integer(0), initialTTL: 1), .success(.integer(1)))
        clock.now = 104
        XCTAssertEqual(shared.get("d", "k"), .string("v"))
        XCTAssertNil(shared.get("d", "c"))
        clock.now = 106
        XCTAssertNil(shared.get("d", "k"))
        XCTAssertTrue(shared.add("d", "k", .bool(true), ttl: 0))
    }

    func testSleepYieldsAndResumesOnTheLoop() throws {
        let h = Harness()
        h.folder.add("sleeper", handler: """
        return { PRIORITY = 2, VERSION = "1", request = function(self, conf, ctx)
          local t0 = weir.time.monotonic()
          for i = 1, 3 do weir.sleep(0.01) end
          ctx.slept = weir.time.monotonic() - t0
          local ok = pcall(weir.sleep, 0)   -- yielding through pcall works in Lua 5.4
          weir.upstream.request.set_header("x-slept", ok and "yes" or "no")
        end }
        """)
        h.folder.add("next", handler: "return { PRIORITY = 1, VERSION = '1', request = function(s, c, ctx) return 200, string.format('%.2f', ctx.slept) end }")
        try h.load(["sleeper", "next"])
        let chain = try h.chain("sleeper", "next")
        // Two concurrent requests interleave on one loop and one Lua state.
        let reqs = [h.newRequest(), h.newRequest()]
        let futures = try h.onLoop { () -> [EventLoopFuture<PhaseResult>] in
            reqs.map { r in
                let scope = h.runtime.beginRequest(r)
                guard case .pending(let f) = scope.start(.request, chain: chain) else { fatalError("expected to suspend") }
                f.whenComplete { _ in scope.finish() }
                return f
            }
        }
        for (f, r) in zip(futures, reqs) {
            let exit = try f.wait().exitValue
            XCTAssertGreaterThanOrEqual(Double(exit?.bodyString ?? "0") ?? 0, 0.03)
            XCTAssertEqual(r.upstreamHeaders.first?.1, "yes")
        }
    }

    func testRequestBodyIsReadAsynchronously() throws {
        let (body, _, result) = try requestBody("""
        local b = weir.request.get_body(5)
        return 200, "got:" .. b
        """)
        XCTAssertEqual(body, "got:hello", "\(result)")
    }

    func testFinishWhileWaitingNeverResumesTheCoroutine() throws {
        let h = Harness()
        h.folder.add("slow", handler: """
        return { PRIORITY = 1, VERSION = '1', request = function()
          weir.sleep(0.02)
          weir.shared.counters:incr("resumed", 1, 0)
        end }
        """)
        try h.load(["slow"])
        let chain = try h.chain("slow")
        let future = try h.onLoop { () -> EventLoopFuture<PhaseResult> in
            let scope = h.runtime.beginRequest(h.newRequest())
            let f = scope.run(.request, chain: chain)
            scope.finish() // the client went away
            return f
        }
        XCTAssertEqual(try future.wait().failure?.message, "request finished while the plugin was waiting")
        // A complete request afterwards: its own sleep fires after the
        // abandoned one, and only it resumes.
        XCTAssertEqual(try h.runRequest(chain), [.continue])
        XCTAssertEqual(h.options.shared.get("counters", "resumed"), .integer(1))
    }
}

final class TimerTests: XCTestCase {
    func waitUntil(_ what: String, _ condition: () -> Bool) {
        // Polls; the limit only bounds a broken run, it is not a speed check.
        for _ in 0..<500 where !condition() { Thread.sleep(forTimeInterval: 0.01) }
        XCTAssertTrue(condition(), what)
    }

    func testTimersRunAfterTheRequestAndCanSleep() throws {
        let h = Harness()
        h.folder.add("timers", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          local id = weir.request.get_id()
          weir.timer.at(0.01, function()
            weir.sleep(0.001)
            weir.shared.counters:set("once", id)
            weir.log.info("timer ran", id)
          end)
          weir.timer.every(0.01, function() weir.shared.counters:incr("ticks", 1, 0) end)
          weir.timer.at(0, function() error("timer boom") end)
        end }
        """)
        try h.load(["timers"])
        XCTAssertEqual(try h.runRequest(try h.chain("timers")), [.continue])
        let shared = h.options.shared
        waitUntil("one-shot timer ran") { shared.get("counters", "once") == .string("req-1") }
        waitUntil("every-timer ticked 3 times") {
            if case .integer(let n)? = shared.get("counters", "ticks") { return n >= 3 }
            return false
        }
        waitUntil("failing timer logged") { h.logs.records.contains { $0.level == .error && $0.message.contains("timer boom") } }
        let failed = h.logs.records.first { $0.level == .error }
        XCTAssertEqual(failed?.plugin, "timers")
        XCTAssertEqual(failed?.phase, .timer)
        XCTAssertTrue(h.logs.records.contains { $0.message == "timer ran req-1" && $0.phase == .timer })
        // Stopping the runtime's timers (what a reload does to the old generation).
        XCTAssertEqual(try h.onLoop { h.runtime.activeTimerCount }, 1)
        try h.onLoop { h.runtime.stopTimers() }
        XCTAssertEqual(try h.onLoop { h.runtime.activeTimerCount }, 0)
        let ticks = shared.get("counters", "ticks")
        Thread.sleep(forTimeInterval: 0.05)
        XCTAssertEqual(shared.get("counters", "ticks"), ticks)
    }

    func testTimerAtLoadTimeIsRefused() throws {
        let folder = PluginFolder()
        let dir = folder.add("eager", handler: "weir.timer.at(1, function() end)\nreturn { PRIORITY = 1, VERSION = '1', log = function() end }")
        XCTAssertThrowsError(try PluginLibrary(names: ["eager"], searchPaths: [folder.path], sdk: Harness.sdk)) { error in
            XCTAssertEqual("\(error)", dir + "/handler.lua:1: weir.timer.at is not available in the init phase")
        }
    }
}

final class BodyFilterTests: XCTestCase {
    func testBodyFilterRewritesChunksInChainOrder() throws {
        let h = Harness()
        h.folder.add("upper", handler: """
        return { PRIORITY = 2, VERSION = "1", body_filter = function(self, conf, ctx)
          ctx.chunks = (ctx.chunks or 0) + 1
          weir.response.set_chunk(weir.response.get_chunk():upper())
        end }
        """)
        h.folder.add("trailer", handler: """
        return { PRIORITY = 1, VERSION = "1", body_filter = function(self, conf, ctx)
          if weir.response.is_last_chunk() then
            weir.response.set_chunk(weir.response.get_chunk() .. "|chunks=" .. ctx.chunks)
          end
        end, log = function() weir.response.get_chunk() end }
        """)
        try h.load(["upper", "trailer"])
        let chain = try h.chain("trailer", "upper")
        let scope = h.begin(h.newRequest())
        let out = try h.onLoop { () -> [String] in
            var parts: [String] = []
            for (chunk, last) in [("hello ", false), ("world", true)] {
                guard case .done(.continue) = scope.filterBody(Array(chunk.utf8), isLast: last, chain: chain) else { return ["unexpected"] }
                parts.append(String(decoding: scope.bodyChunk, as: UTF8.self))
            }
            return parts
        }
        XCTAssertEqual(out, ["HELLO ", "WORLD|chunks=2"])
        let log = try h.run(scope, .log, chain)
        XCTAssertTrue(log.failure?.message.hasSuffix("weir.response.get_chunk is not available in the log phase") ?? false, "\(log)")
        try h.onLoop { scope.finish() }
    }
}
