import XCTest
@testable import WeirLua

/// `collectgarbage` from plugins under the generational collector (Lua
/// 5.4.4, see LuaState.collectsGenerationally): the options a plugin may use
/// work and requests carry on; the ones that would change the collector of
/// every plugin on the loop are refused with a clear error.
final class GCTests: XCTestCase {
    func testPluginsThatCollectOnEveryRequestKeepTheModeAndAFlatHeap() throws {
        let h = Harness()
        h.folder.add("collector", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          local n = weir.request.get_header("x-n")
          -- Per-request garbage, some of it kept in ctx until the request ends.
          local junk = {}
          for i = 1, 50 do junk[i] = { i, n .. ":" .. i } end
          ctx.keep = junk
          local before = collectgarbage("count")
          collectgarbage()
          collectgarbage("collect")
          local stepped = collectgarbage("step")
          collectgarbage("step", 10)
          local after = collectgarbage("count")
          if type(before) ~= "number" or type(after) ~= "number" or type(stepped) ~= "boolean" then
            error("unexpected results " .. tostring(before) .. " " .. tostring(after) .. " " .. tostring(stepped))
          end
          assert(collectgarbage("isrunning") == true)
          assert(#ctx.keep == 50 and ctx.keep[50][2] == n .. ":50", "live data survived the collections")
          return 200, "ok " .. n
        end }
        """)
        try h.load(["collector"])
        let chain = try h.chain("collector")
        let growth = try h.heapGrowth(warmup: 200, count: 2_000, chain: chain) { i, result in
            XCTAssertEqual(result.exitValue?.bodyString, "ok \(i)")
        }
        XCTAssertLessThan(growth, 64 * 1024, "heap grew with requests")
        XCTAssertTrue(try h.onLoop { h.runtime.state.collectsGenerationally }, "a plugin's collections left generational mode")
    }

    func testOptionsThatChangeTheSharedCollectorAreRefused() throws {
        let h = Harness()
        h.folder.add("tuner", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
          local option = weir.request.get_header("x-option")
          if weir.request.get_header("x-pcall") then
            local ok, err = pcall(collectgarbage, option)
            return 200, tostring(ok) .. " " .. tostring(err)
          end
          collectgarbage(option)
          return 200, "changed"
        end }
        """)
        try h.load(["tuner"])
        let chain = try h.chain("tuner")
        for option in ["incremental", "generational", "stop", "setpause", "setstepmul"] {
            let req = h.newRequest()
            req.headers.append(("x-option", option))
            let failure = try h.runRequest(chain, request: req)[0].failure
            let message = failure?.message ?? ""
            XCTAssertTrue(message.contains("tuner/handler.lua:7: bad argument #1 to 'collectgarbage' (option \"\(option)\" "
                                           + "is not allowed in plugins"), message)
        }
        // Caught with pcall: the plugin goes on, and so does the next request.
        let caught = h.newRequest()
        caught.headers += [("x-option", "incremental"), ("x-pcall", "1")]
        let body = try h.runRequest(chain, request: caught)[0].exitValue?.bodyString ?? ""
        XCTAssertTrue(body.hasPrefix("false bad argument #1 to 'collectgarbage' (option \"incremental\" is not allowed"), body)
        let allowed = h.newRequest()
        allowed.headers.append(("x-option", "restart"))
        XCTAssertEqual(try h.runRequest(chain, request: allowed)[0].exitValue?.bodyString, "changed")
        let unknown = h.newRequest()
        unknown.headers += [("x-option", "sideways"), ("x-pcall", "1")]
        XCTAssertEqual(try h.runRequest(chain, request: unknown)[0].exitValue?.bodyString,
                       "false bad argument #1 to 'collectgarbage' (invalid option 'sideways')",
                       "other options reach the base library, which names the bad one")
        try h.onLoop {
            XCTAssertTrue(h.runtime.state.collectsGenerationally)
            XCTAssertEqual(h.runtime.state.gcCountKB > 0, true)
        }
    }
}
