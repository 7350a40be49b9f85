import CLua
import CLuaShims
import WeirCore
import XCTest
@testable import WeirLua

final class LuaStateTests: XCTestCase {
    func testSyntaxErrorNamesFileAndLine() throws {
        let state = try LuaState()
        XCTAssertThrowsError(try state.load("local x = 1\nlocal = 2\n", chunkName: "plugins/bad/handler.lua")) { error in
            let message = (error as! LuaError).message
            XCTAssertTrue(message.hasPrefix("plugins/bad/handler.lua:2:"), message)
        }
        XCTAssertEqual(state.top, 0)
    }

    func testRuntimeErrorHasTraceback() throws {
        let state = try LuaState()
        try state.load("local function inner() error('boom') end\ninner()\n", chunkName: "t.lua")
        XCTAssertThrowsError(try state.pcall(nargs: 0, nresults: 0)) { error in
            let e = error as! LuaError
            XCTAssertEqual(e.message, "t.lua:1: boom")
            XCTAssertTrue(e.traceback?.contains("inner") ?? false, e.traceback ?? "none")
        }
        XCTAssertEqual(state.top, 0)
    }

    func testConfigValuesRoundTrip() throws {
        let state = try LuaState()
        let value: ConfigValue = .map([
            "name": .string("x"), "n": .int(3), "f": .double(1.5), "on": .bool(true),
            "list": .array([.int(1), .string("two")]), "nested": .map(["k": .string("v")]),
        ])
        LuaState.push(value, on: state.main)
        XCTAssertEqual(try LuaState.value(at: -1, on: state.main), value)
        state.pop()
    }

    func testNativeErrorIsRaisedInLuaNotSwift() throws {
        let state = try LuaState()
        state.pushNative { L in
            LuaState.push("from swift", on: L)
            return .error("native failed")
        }
        lua_setglobal(state.main, "native")
        try state.load("local ok, err = pcall(native)\nassert(not ok)\nreturn err", chunkName: "n.lua")
        try state.pcall(nargs: 0, nresults: 1)
        XCTAssertEqual(LuaState.string(at: -1, on: state.main), "native failed")
        state.pop()
    }

    /// The first 256 natives are C functions with their id compiled in,
    /// later ones a closure holding it (CLuaShims weir_push_native): each
    /// reaches its own Swift function, and `with_fallback` wraps both kinds.
    /// A runtime's natives reach it through its own dispatcher (the hot
    /// ones, `HotNative`, through their own C entries): they are registered
    /// first, at their ids, and a state kept after its runtime is gone
    /// raises instead of reaching the freed runtime (its hot entries are
    /// cleared with the dispatcher).
    func testHotNativesAtTheirIdsAndAStateThatOutlivesItsRuntime() throws {
        var runtime: LuaRuntime? = try LuaRuntime(sdk: Harness.sdk, eventLoop: nil, options: LuaRuntimeOptions())
        let state = runtime!.state
        XCTAssertGreaterThan(state.nativeCount, HotNative.allCases.count)
        func callGetHeader() throws -> String {
            try state.load("local ok, err = pcall(weir.request.get_header, 'a'); assert(not ok); return err", chunkName: "probe.lua")
            try state.pcall(nargs: 0, nresults: 1)
            defer { state.pop() }
            return LuaState.string(at: -1, on: state.main) ?? ""
        }
        // No request is active: the hot native falls back to its Lua check.
        XCTAssertTrue(try callGetHeader().contains("weir.request.get_header"))
        runtime = nil
        XCTAssertTrue(try callGetHeader().contains("native function called on a closed runtime"))
    }

    func testNativesPastTheFixedEntriesAndTheirFallbacks() throws {
        let state = try LuaState()
        let L = state.main
        lua_createtable(L, 300, 0)
        for i in 1...300 {
            state.pushNative { L in
                if lua_type(L, 1) == LUA_TSTRING { return .fallback }
                lua_pushinteger(L, lua_Integer(i)); return .values(1)
            }
            lua_rawseti(L, -2, lua_Integer(i))
        }
        lua_setglobal(L, "natives")
        lua_pushcclosure(L, weir_with_fallback, 0)
        lua_setglobal(L, "with_fallback")
        try state.load("""
        local out = {}
        for _, i in ipairs({ 1, 256, 257, 300 }) do
          local f = natives[i]
          local g = with_fallback(f, function(arg) return "fallback " .. arg .. " " .. i end)
          out[#out + 1] = table.concat({ f(), tostring(f("x")), g(), g("y") }, ",")
        end
        local ok, err = pcall(with_fallback, print, print)
        out[#out + 1] = err
        return table.concat(out, ";")
        """, chunkName: "natives.lua")
        try state.pcall(nargs: 0, nresults: 1)
        XCTAssertEqual(LuaState.string(at: -1, on: L),
                       "1,false,1,fallback y 1;256,false,256,fallback y 256;257,false,257,fallback y 257;300,false,300,fallback y 300;"
                       + "with_fallback: argument #1 must be a native function")
        state.pop()
    }

    func testMemoryCapRaisesInsideLuaAndStateRecovers() throws {
        let state = try LuaState(memoryLimit: 4 << 20)
        try state.load("local t = {} for i = 1, 1e8 do t[i] = string.rep('x', 100) .. i end", chunkName: "bomb.lua")
        XCTAssertThrowsError(try state.pcall(nargs: 0, nresults: 0)) { error in
            XCTAssertTrue((error as! LuaError).message.contains("not enough memory"), "\(error)")
        }
        state.collectGarbage()
        XCTAssertLessThan(state.bytesUsed, 1 << 20)
        try state.load("return 1 + 1", chunkName: "after.lua")
        try state.pcall(nargs: 0, nresults: 1)
        XCTAssertEqual(lua_tointegerx(state.main, -1, nil), 2)
        state.pop()
    }

    /// The allocator's small-block free lists (shims.c): blocks of every
    /// class freed and taken again, resized within a class, across classes
    /// and across the small/large line both ways, keep their contents; the
    /// kept blocks stay under their bound and out of bytesUsed.
    func testSmallBlockCacheReusesAndResizesBlocks() throws {
        let state = try LuaState(memoryLimit: 16 << 20)
        state.collectGarbage()
        let baseline = state.bytesUsed
        try state.load("""
            local rounds = ...
            for round = 1, rounds do
              -- strings of every small length and past it (TString: 24 bytes + length + 1)
              local strings = {}
              for n = 1, 300 do strings[n] = string.rep(string.char(64 + n % 26), n) .. round end
              for n = 1, 300 do
                assert(strings[n] == string.rep(string.char(64 + n % 26), n) .. round, "string " .. n)
              end
              -- arrays and hashes grown one element at a time (each growth a resize)
              -- and shrunk again by a rehash after clearing most keys
              local t, h = {}, {}
              for i = 1, 40 do t[i] = i * round; h["k" .. i] = i + round end
              for i = 1, 40 do assert(t[i] == i * round and h["k" .. i] == i + round, "grown " .. i) end
              for i = 3, 40 do t[i] = nil; h["k" .. i] = nil end
              for i = 41, 60 do h["n" .. i] = i end
              assert(t[1] == round and t[2] == 2 * round and h.k1 == 1 + round and h.k2 == 2 + round, "shrunk")
              for i = 41, 60 do assert(h["n" .. i] == i, "rehashed " .. i) end
              strings, t, h = nil, nil, nil
              if round % 10 == 0 then collectgarbage() end
            end
            return true
            """, chunkName: "blocks.lua")
        lua_pushinteger(state.main, 200)
        try state.pcall(nargs: 1, nresults: 1)
        XCTAssertTrue(lua_toboolean(state.main, -1) != 0)
        state.pop()
        state.collectGarbage()
        let kept = state.info.pointee.small_cached_bytes
        XCTAssertGreaterThan(kept, 0, "freed small blocks are kept for reuse")
        XCTAssertLessThanOrEqual(kept, Int(WEIR_SMALL_CACHE_BYTES))
        // Kept blocks are not counted as used: the heap is back near where it was.
        XCTAssertLessThan(state.bytesUsed, baseline + (64 << 10))
    }

    func testInstructionBudgetStopsLoopsEvenUnderPcall() throws {
        let state = try LuaState(hookInterval: 1000)
        state.setBudget(100_000)
        // The script tries to swallow the error and keep going.
        try state.load("while true do pcall(function() while true do end end) end", chunkName: "loop.lua")
        XCTAssertThrowsError(try state.pcall(nargs: 0, nresults: 0)) { error in
            XCTAssertTrue((error as! LuaError).message.contains("instruction budget exceeded"), "\(error)")
        }
        XCTAssertTrue(state.budgetExhausted)
        state.setBudget(0)
        try state.load("local s = 0 for i = 1, 1000000 do s = s + i end return s", chunkName: "ok.lua")
        try state.pcall(nargs: 0, nresults: 1)
        XCTAssertEqual(lua_tointegerx(state.main, -1, nil), 500000500000)
        state.pop()
    }

    func testSHA256Vectors() {
        func hex(_ s: String) -> String {
            var out = [UInt8](repeating: 0, count: 32)
            let bytes = Array(s.utf8)
            weir_sha256(bytes, bytes.count, &out)
            return out.map { String(format: "%02x", $0) }.joined()
        }
        XCTAssertEqual(hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
                       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        XCTAssertEqual(hex(String(repeating: "a", count: 1000)),
                       "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3")
    }
}
