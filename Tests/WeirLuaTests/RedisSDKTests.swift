import Foundation
import NIOCore
import NIOPosix
import WeirCore
import WeirRedis
import WeirTestSupport
import XCTest
@testable import WeirLua

/// weir.redis from plugin code, through a real LuaRuntime on a real event
/// loop, against a real `redis-server` on a free loopback port started per
/// test. Results are checked with `redis-cli` (an independent client) where
/// the state on the server is what matters.
final class RedisSDKTests: XCTestCase {
    /// Renders what a weir.redis call returned, so one string can be
    /// compared: strings quoted, integers bare, weir.null as `null`, tables
    /// as [..], and `/err` after a value when an error came back.
    static let prelude = """
    local function show(v)
      if v == nil then return "nil" end
      if v == weir.null then return "null" end
      local t = type(v)
      if t == "table" then
        local parts = {}
        for i = 1, #v do parts[i] = show(v[i]) end
        return "[" .. table.concat(parts, ",") .. "]"
      end
      if t == "string" then return "'" .. v .. "'" end
      return tostring(v)
    end
    local out = {}
    local function add(v, err)
      out[#out + 1] = err == nil and show(v) or (show(v) .. "/" .. err)
    end
    local function result() return 200, table.concat(out, " ") end
    """

    private var server: RedisServerProcess!
    private var harness: Harness!

    override func setUpWithError() throws {
        try XCTSkipUnless(RedisServerProcess.isAvailable, "redis-server / redis-cli not installed")
        server = try RedisServerProcess()
        harness = Harness()
    }

    override func tearDownWithError() throws {
        if let h = harness { _ = try? RedisClients.shutdown(on: h.loop).wait() }
        harness = nil
        server = nil
    }

    /// Loads a plugin whose request phase is `body` (after the prelude and a
    /// `red` handle on the test server) and returns the request phase results.
    private func runRequestPhase(_ body: String, connect: String? = nil, requests: Int = 1) throws -> [PhaseResult] {
        let connectOptions = connect ?? "{ port = \(server.port), timeout = 1 }"
        harness.folder.add("t", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          \(Self.prelude)
          local red = weir.redis.connect\(connectOptions)
          \(body)
        end }
        """)
        try harness.load(["t"])
        let chain = try harness.chain("t")
        return try (0..<requests).map { _ in try harness.runRequest(chain)[0] }
    }

    /// Polls the server until `condition` holds; the bound only ends a broken
    /// run, it is not a speed check.
    private func waitForServer(_ what: String, _ condition: (RedisServerProcess) throws -> Bool) {
        let deadline = Date().addingTimeInterval(20)
        while !((try? condition(server)) ?? false) && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        XCTAssertTrue((try? condition(server)) ?? false, what)
    }

    private func body(_ result: PhaseResult, file: StaticString = #filePath, line: UInt = #line) -> String {
        if let failure = result.failure { XCTFail("plugin failed: \(failure)", file: file, line: line) }
        return result.exitValue?.bodyString ?? "<no exit: \(result)>"
    }

    func testEachCommandFunctionAndReplyConversion() throws {
        let result = try runRequestPhase("""
        add(red:set("s", "hello"))                      -- simple string
        add(red:get("s"))                               -- bulk string
        add(red:get("missing"))                         -- nil bulk: plain nil at top level
        add(red:incr("n"))                              -- integer
        add(red:incrby("n", 41))
        add(red:expire("n", 100))
        add(red:expire("missing", 100))
        add(red:command("MGET", "s", "missing", "n"))  -- array keeps its length: weir.null inside
        add(red:call("RPUSH", "l", "a", 2, 3.0, 2.5))   -- numbers as arguments
        add(red:command("LRANGE", "l", 0, -1))
        add(red:del("s", "l", "missing"))
        add(red:set("bin", "a\\0b\\255"))
        local bin = red:get("bin")
        add(#bin, nil)
        add(red:command("PING"))
        add(red:command("LRANGE", "nothing", 0, -1))    -- empty array
        return result()
        """)
        XCTAssertEqual(body(result[0]), "'OK' 'hello' nil 1 42 1 0 ['hello',null,'42'] 4 ['a','2','3','2.5'] 2 'OK' 4 'PONG' []")
        XCTAssertEqual(try server.cli("GET", "n"), "42")
        let ttl = Int(try server.cli("TTL", "n")) ?? -1
        XCTAssertTrue((1...100).contains(ttl), "TTL was \(ttl)")
        XCTAssertEqual(try server.cli("EXISTS", "s"), "0")
    }

    func testSetOptions() throws {
        let result = try runRequestPhase("""
        add(red:set("k", "v1", { ex = 50.0 }))
        add(red:set("k", "v2", { nx = true }))          -- exists: nil reply, no error
        add(red:set("new", 7, { nx = true, px = 60000 }))
        add(red:set("k", "v3", { xx = true }))
        add(red:get("k"))
        return result()
        """)
        XCTAssertEqual(body(result[0]), "'OK' nil 'OK' 'OK' 'v3'")
        XCTAssertEqual(try server.cli("GET", "new"), "7")
        XCTAssertGreaterThan(Int(try server.cli("PTTL", "new")) ?? -1, 0)
        // `xx` dropped the TTL `ex` set (SET without KEEPTTL), as Redis does.
        XCTAssertEqual(try server.cli("TTL", "k"), "-1")
    }

    func testErrorRepliesComeBackAsNilAndMessage() throws {
        try server.cli("SET", "str", "abc")
        try server.cli("LPUSH", "list", "x")
        let result = try runRequestPhase("""
        add(red:incr("str"))
        add(red:get("list"))
        add(red:command("NOSUCHCOMMAND", "x"))
        add(red:eval("return redis.call('INCR', KEYS[1])", { "str" }))
        add(red:command("SUBSCRIBE", "chan"))           -- refused by the client, never sent
        add(red:command("multi"))                       -- transactions would capture other requests' commands
        add(red:pipeline(function(p) p:incr("x"); p:command("EXEC") end))
        add(red:get("str"))                             -- the connection is still fine
        return result()
        """)
        let text = body(result[0])
        XCTAssertTrue(text.hasPrefix("nil/ERR value is not an integer or out of range"), text)
        XCTAssertTrue(text.contains("nil/WRONGTYPE Operation against a key holding the wrong kind of value"), text)
        XCTAssertTrue(text.contains("nil/ERR unknown command 'NOSUCHCOMMAND'"), text)
        XCTAssertTrue(text.contains("nil/ERR value is not an integer"), text)
        XCTAssertTrue(text.contains("nil/refused ("), text)
        XCTAssertTrue(text.contains("nil/refused (MULTI: transactions are not available"), text)
        XCTAssertTrue(text.contains("nil/refused (EXEC: transactions are not available"), text)
        XCTAssertTrue(text.hasSuffix("'abc'"), text)
        XCTAssertEqual(try server.cli("EXISTS", "x"), "0", "a refused pipeline sends nothing")
    }

    func testEvalScriptWithNoscriptFallbackAndPipeline() throws {
        let source = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
        let plugin = """
        add(red:eval("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}", { "k1" }, { "a1", 41 }))
        local script = red:script("\(source)")
        add(script:run({ "counter" }, { 5 }))
        add(script:run({ "counter" }, { 5 }))
        add(red:evalsha(script.sha1, { "counter" }, { 1 }))
        add(red:evalsha(string.rep("0", 40), {}, {}))
        local results, err = red:pipeline(function(p)
          p:incr("piped")
          p:expire("piped", 60)
          p:get("nope")
          p:command("INCR", "str-in-pipe")
          p:set("str-in-pipe", "x")
          p:incr("str-in-pipe")
          p:eval("return 'e'")
        end)
        add(results, err)
        add(red:pipeline(function(p) end))
        return result()
        """
        let results = try runRequestPhase(plugin)
        let sha = try server.cli("SCRIPT", "LOAD", source)  // the SHA-1 Redis computes
        XCTAssertEqual(body(results[0]),
                       "['k1','a1',42] 5 10 11 nil/NOSCRIPT No matching script. Please use EVAL. "
                       + "[1,1,null,1,'OK',[false,'ERR value is not an integer or out of range'],'e'] []")
        XCTAssertEqual(try server.cli("GET", "counter"), "11")
        XCTAssertGreaterThan(Int(try server.cli("TTL", "piped")) ?? -1, 0)

        // After SCRIPT FLUSH the next run gets NOSCRIPT and falls back to EVAL.
        try server.cli("SCRIPT", "FLUSH")
        XCTAssertEqual(try server.cli("SCRIPT", "EXISTS", sha), "0")
        let again = try harness.runRequest(try harness.chain("t"))[0]
        XCTAssertTrue(body(again).hasPrefix("['k1','a1',42] 16 21 22 "), body(again))
        XCTAssertEqual(try server.cli("SCRIPT", "EXISTS", sha), "1")
    }

    /// The shape a rate limiter has: INCR + EXPIRE per request in the
    /// request phase, the count forwarded upstream.
    func testRequestPhaseIncrAndExpireAcrossRequests() throws {
        harness.folder.add("limit", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          local red = weir.redis.connect{ port = \(server.port), timeout = 1 }
          local key = "rl:" .. weir.client.get_ip()
          local count, err = red:incr(key)
          if not count then return 500, err end
          if count == 1 then
            local ok, eerr = red:expire(key, 60)
            if not ok then return 500, eerr end
          end
          weir.upstream.request.set_header("x-count", tostring(count))
          if count > 3 then return 429, "too many" end
        end }
        """)
        try harness.load(["limit"])
        let chain = try harness.chain("limit")
        var seen: [String] = []
        for i in 1...5 {
            let request = harness.newRequest()
            let result = try harness.runRequest(chain, request: request)[0]
            seen.append(request.upstreamHeaders.first { $0.0 == "x-count" }?.1 ?? "-")
            if i <= 3 { XCTAssertEqual(result, .continue) } else { XCTAssertEqual(result.exitValue?.status, 429) }
        }
        XCTAssertEqual(seen, ["1", "2", "3", "4", "5"])
        XCTAssertEqual(try server.cli("GET", "rl:10.0.0.7"), "5")
        let ttl = Int(try server.cli("TTL", "rl:10.0.0.7")) ?? -1
        XCTAssertTrue((1...60).contains(ttl), "TTL was \(ttl)")
    }

    func testConcurrentRequestsShareTheLoopsPooledConnection() throws {
        harness.folder.add("incr", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          local red = weir.redis.connect{ port = \(server.port) }
          local n, err = red:incr("shared")
          return 200, tostring(n or err)
        end }
        """)
        try harness.load(["incr"])
        let chain = try harness.chain("incr")
        let h = harness!
        let futures = try h.onLoop { () -> [EventLoopFuture<PhaseResult>] in
            (0..<200).map { _ in
                let scope = h.runtime.beginRequest(h.newRequest())
                guard case .pending(let f) = scope.start(.request, chain: chain) else { fatalError("expected to suspend") }
                f.whenComplete { _ in scope.finish() }
                return f
            }
        }
        var values: [Int] = []
        for f in futures { values.append(Int(try f.wait().exitValue?.bodyString ?? "") ?? -1) }
        XCTAssertEqual(values.sorted(), Array(1...200))
        // One pooled connection carried all 200 (plus redis-cli's own).
        let client = try h.onLoop { RedisClients.forLoop(h.loop, RedisConfiguration(port: self.server.port)) }
        XCTAssertEqual(try h.onLoop { client.openConnections }, 1)
    }

    func testRedisDownFailsFastWithNilAndError() throws {
        let deadPort = try refusingPort()
        let results = try runRequestPhase("""
        add(red:get("k"))
        add(red:incr("k"))
        return result()
        """, connect: "{ port = \(deadPort), timeout = 0.5 }", requests: 1)
        let text = body(results[0])
        XCTAssertTrue(text.hasPrefix("nil/connection refused ("), text)
        // The second command falls in the reconnect backoff: refused at once, not sent.
        XCTAssertTrue(text.contains(" nil/unavailable ("), text)
    }

    func testServerKilledMidRunReturnsErrorsThenRecovers() throws {
        harness.folder.add("t", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          \(Self.prelude)
          local red = weir.redis.connect{ port = \(server.port), timeout = 0.5 }
          add(red:incr("k"))
          return result()
        end }
        """)
        try harness.load(["t"])
        let chain = try harness.chain("t")
        XCTAssertEqual(body(try runBounded(chain)), "1")
        server.kill()
        // The pooled connection dies with the server: nil, err, never a hang.
        let down = body(try runBounded(chain))
        XCTAssertTrue(down.hasPrefix("nil/closed (") || down.hasPrefix("nil/connection refused (")
                      || down.hasPrefix("nil/unavailable ("), down)
        try server.start()
        // After the backoff the next command reconnects (a fresh server: counts from 1).
        waitUntil("a request succeeds again") { (try? self.body(self.runBounded(chain))) == "1" }
    }

    /// Runs the chain's request phase like Harness.runRequest, but fails the
    /// test instead of hanging if the phase never completes.
    private func runBounded(_ chain: PluginChain) throws -> PhaseResult {
        let h = harness!
        let scope = h.begin(h.newRequest())
        let done = DispatchSemaphore(value: 0)
        let box = PhaseBox()
        h.loop.execute {
            scope.run(.request, chain: chain).whenComplete { box.result = $0; scope.finish(); done.signal() }
        }
        guard done.wait(timeout: .now() + 15) == .success else {
            XCTFail("request phase did not complete within 15 s (hang)")
            throw CancellationError()
        }
        return try box.result!.get()
    }

    /// Retries `attempt` until it returns true once (it may have side effects,
    /// so it is not evaluated again afterwards).
    private func waitUntil(_ what: String, _ attempt: () -> Bool) {
        let deadline = Date().addingTimeInterval(20)
        var succeeded = attempt()
        while !succeeded && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.02)
            succeeded = attempt()
        }
        XCTAssertTrue(succeeded, what)
    }

    func testCommandTimeoutReturnsTimeout() throws {
        // BLPOP blocks on the server for 2 s; the handle's timeout is 0.2 s.
        let results = try runRequestPhase("""
        add(red:command("BLPOP", "empty-list", 2))
        add(red:get("after"))      -- a fresh connection serves the next command
        return result()
        """, connect: "{ port = \(server.port), timeout = 0.2 }")
        XCTAssertEqual(body(results[0]), "nil/timeout nil")
    }

    func testProgrammerErrorsRaiseInThePluginsFrame() throws {
        let cases: [(String, String)] = [
            ("red:get(nil)", "bad argument #1 to 'red:get' (string expected, got nil)"),
            ("red:command(\"SET\", \"k\", {})", "bad argument #3 to 'red:command' (string or number expected, got table)"),
            ("red:incrby(\"k\", \"x\")", "bad argument #2 to 'red:incrby' (integer expected, got string)"),
            ("red:set(\"k\", \"v\", { ex = -1 })", "red:set: ex must be a positive integer (seconds)"),
            ("red:eval(\"return 1\", { 1 })", "red:eval: keys[1] must be a string"),
            ("red.get(\"k\")", "red:get: call it with ':' on a handle from weir.redis.connect"),
            ("red:del()", "red:del: expected at least one key"),
            ("red:pipeline(function(p) p:incr(5) end)", "bad argument #1 to 'pipeline:incr' (string expected, got number)"),
            ("weir.redis.connect{ port = 'x' }", "weir.redis.connect: port must be an integer in 1-65535"),
            ("weir.redis.connect{ timeout = 0 }", "weir.redis.connect: timeout must be a positive number of seconds"),
        ]
        for (index, (code, message)) in cases.enumerated() {
            let h = Harness()
            h.folder.add("bad\(index)", handler: """
            return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
              local red = weir.redis.connect{ port = \(server.port) }
              \(code)
            end }
            """)
            try h.load(["bad\(index)"])
            let result = try h.runRequest(try h.chain("bad\(index)"))[0]
            let failure = "\(result.failure.map { "\($0)" } ?? "no failure")"
            XCTAssertTrue(failure.contains(message), "\(code): \(failure)")
            // Raised at the plugin's own line (3), not inside the SDK.
            XCTAssertTrue(failure.contains("handler.lua:3:"), "\(code): \(failure)")
            _ = try? RedisClients.shutdown(on: h.loop).wait()
        }
    }

    func testTimerAndResponsePhasesCanUseRedis() throws {
        harness.folder.add("bg", handler: """
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf, ctx)
            weir.timer.at(0, function()
              local red = weir.redis.connect{ port = \(server.port) }
              red:set("from-timer", "yes")
            end)
          end,
          response = function(self, conf, ctx)
            local red = weir.redis.connect{ port = \(server.port) }
            weir.response.set_header("x-hits", tostring(red:incr("hits")))
          end }
        """)
        try harness.load(["bg"])
        let request = harness.newRequest()
        let bgChain = try harness.chain("bg")
        let bgScope = harness.begin(request)
        _ = try harness.run(bgScope, .request, bgChain)
        _ = try harness.run(bgScope, .response, bgChain)
        try harness.onLoop { bgScope.finish() }
        XCTAssertEqual(request.response.first { $0.name == "x-hits" }?.value, "1")
        waitForServer("timer's SET") { try $0.cli("GET", "from-timer") == "yes" }
        XCTAssertEqual(try server.cli("GET", "from-timer"), "yes")
    }

    /// Requests aborted (client gone) while their Redis call is in flight:
    /// the late reply is dropped, coroutines and references are released,
    /// the Lua heap returns to its baseline, and the connection stays usable.
    func testAbortWhileRedisCallPendingLeavesNoLeak() throws {
        harness.folder.add("pending", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          ctx.payload = string.rep("p", 512)
          local red = weir.redis.connect{ port = \(server.port) }
          local n = red:incr("aborted")
          local v = red:pipeline(function(p) p:get("aborted") end)  -- never reached when aborted
          weir.upstream.request.set_header("x-n", tostring(n))
        end }
        """)
        try harness.load(["pending"])
        let chain = try harness.chain("pending")
        let h = harness!
        var sent = 0
        func abortBatch(_ count: Int) throws {
            try h.onLoop {
                for _ in 0..<count {
                    let scope = h.runtime.beginRequest(h.newRequest())
                    guard case .pending = scope.start(.request, chain: chain) else { fatalError("expected to suspend on INCR") }
                    scope.finish() // the reply cannot have arrived within this tick
                }
            }
            sent += count
            // Every INCR reached the server; its reply came back to nobody.
            waitForServer("all INCRs applied") { try $0.cli("GET", "aborted") == String(sent) }
            XCTAssertEqual(try server.cli("GET", "aborted"), String(sent))
        }
        func settledHeapKB() throws -> Int {
            try h.onLoop {
                h.runtime.dropIdleCoroutines()
                h.runtime.state.collectGarbage()
                h.runtime.state.collectGarbage()
                return h.runtime.state.gcCountKB
            }
        }
        try abortBatch(50)
        let baseline = try settledHeapKB()
        try abortBatch(2000)
        let after = try settledHeapKB()
        XCTAssertLessThanOrEqual(after, baseline + 16, "Lua heap grew from \(baseline) KB to \(after) KB")
        // The shared connection is still in sync: a full request works.
        let request = h.newRequest()
        XCTAssertEqual(try h.runRequest(chain, request: request)[0], .continue)
        XCTAssertEqual(request.upstreamHeaders.first { $0.0 == "x-n" }?.1, String(sent + 1))
    }
}

private final class PhaseBox: @unchecked Sendable {
    var result: Result<PhaseResult, Error>?
}

