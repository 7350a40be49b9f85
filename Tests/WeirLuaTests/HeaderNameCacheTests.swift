import CLua
import CLuaShims
import XCTest
@testable import WeirLua

/// HeaderNameCache hands out the lower-cased name of whatever string is at
/// the index, cached or not: repeated, upper-case, colliding and long names,
/// and a string a collection left at a recycled address. The same for the
/// other per-Lua-string caches of the SDK's hot natives (RecentLuaStrings,
/// SharedKeyHashes).
final class HeaderNameCacheTests: XCTestCase {
    func testNamesAreAlwaysTheStringsOwn() throws {
        let state = try LuaState()
        let L = state.main
        let cache = HeaderNameCache(on: L)
        func name(_ s: String) -> String? {
            LuaState.push(s, on: L)
            defer { weir_pop(L, 1) }
            return cache.name(at: -1, on: L)
        }
        XCTAssertEqual(name("x-ratelimit-limit-minute"), "x-ratelimit-limit-minute")
        XCTAssertEqual(name("x-ratelimit-limit-minute"), "x-ratelimit-limit-minute", "a hit")
        XCTAssertEqual(name("X-Api-Key"), "x-api-key")
        XCTAssertEqual(name("X-Api-Key"), "x-api-key", "upper case: the same lower-cased name (cached under that string)")
        let long = "x-" + String(repeating: "long-name-", count: 6)
        XCTAssertEqual(name(long), long)
        // More names than slots, twice over: collisions replace entries, never mix them up.
        for round in 0..<2 {
            for i in 0..<200 { XCTAssertEqual(name("x-h\(i)"), "x-h\(i)", "round \(round)") }
        }
        // Strings freed and new ones made (likely at recycled addresses): each still reads as itself.
        for i in 0..<50 {
            _ = name("x-old-\(i)")
            try state.load("collectgarbage()", chunkName: "gc")
            try state.pcall(nargs: 0, nresults: 0)
            XCTAssertEqual(name("x-new-\(i)"), "x-new-\(i)")
        }
        lua_pushinteger(L, 5)
        XCTAssertNil(cache.name(at: -1, on: L), "not a string")
        weir_pop(L, 1)
    }

    /// Whether a text fits a head is worked out once and kept with it: a
    /// name must be a token, a value must have no CR/LF/NUL; hit or miss,
    /// the answer is the same.
    func testTextsKnowWhetherTheyFitAHead() throws {
        let state = try LuaState()
        let L = state.main
        let names = HeaderNameCache(on: L)
        let values = HeaderNameCache(lowercased: false, on: L)
        func checked(_ s: String, _ cache: HeaderNameCache) -> Bool? {
            LuaState.push(s, on: L)
            defer { weir_pop(L, 1) }
            return cache.checkedText(at: -1, on: L)?.fits
        }
        for round in 0..<2 {
            XCTAssertEqual(checked("X-RateLimit-Limit", names), true, "round \(round)")
            XCTAssertEqual(checked("bad name", names), false)
            XCTAssertEqual(checked("x-a:b", names), false)
            XCTAssertEqual(checked("", names), false)
            XCTAssertEqual(checked("!#$%&'*+-.^_`|~09azAZ", names), true)
            XCTAssertEqual(checked("Key realm=\"weir\" ok", values), true)
            XCTAssertEqual(checked("", values), true, "an empty value is a value")
            XCTAssertEqual(checked("a\r\nset-cookie: x", values), false)
            XCTAssertEqual(checked("a\u{0}b", values), false)
            XCTAssertEqual(checked("a\nb", values), false)
            let long = String(repeating: "v", count: 60) + "\r"
            XCTAssertEqual(checked(long, values), false, "a long (uncached) string is checked too")
        }
    }

    /// A name written with upper case (`X-Consumer-Name`, as users write
    /// it) is a hit too: the same cached String comes back (same storage),
    /// and a different-case spelling still reads as its own lower case.
    func testUpperCaseNamesHit() throws {
        let state = try LuaState()
        let L = state.main
        let cache = HeaderNameCache(on: L)
        func name(_ s: String) -> String? {
            LuaState.push(s, on: L)
            defer { weir_pop(L, 1) }
            return cache.name(at: -1, on: L)
        }
        func storage(_ s: String?) -> UnsafePointer<UInt8>? {
            s?.utf8.withContiguousStorageIfAvailable { $0.baseAddress } ?? nil
        }
        // Longer than 15 bytes: a heap String, so a rebuilt one has other storage.
        let first = name("X-RateLimit-Remaining-Minute")
        XCTAssertEqual(first, "x-ratelimit-remaining-minute")
        let second = name("X-RateLimit-Remaining-Minute")
        XCTAssertEqual(second, "x-ratelimit-remaining-minute")
        XCTAssertNotNil(storage(first))
        XCTAssertEqual(storage(first), storage(second), "the cached String, not a new one")
        XCTAssertEqual(name("x-ratelimit-REMAINING-minute"), "x-ratelimit-remaining-minute")
        XCTAssertEqual(name("X-Rate\u{C4}"), "x-rate\u{C4}", "only ASCII letters are folded")
        XCTAssertEqual(name("X-Rate\u{C4}"), "x-rate\u{C4}")
    }

    /// A value cache keeps the text as it is (case included), hit or not.
    func testValueCacheKeepsTheTextAsItIs() throws {
        let state = try LuaState()
        let L = state.main
        let cache = HeaderNameCache(lowercased: false, on: L)
        func value(_ s: String) -> String? {
            LuaState.push(s, on: L)
            defer { weir_pop(L, 1) }
            return cache.name(at: -1, on: L)
        }
        for _ in 0..<2 {
            XCTAssertEqual(value("Key realm=\"Weir\""), "Key realm=\"Weir\"")
            XCTAssertEqual(value("100"), "100")
            XCTAssertEqual(value("alice"), "alice")
        }
    }

    /// A pushed string is always the text asked for: repeated (from the
    /// cache), more strings than entries (entries replaced), and across
    /// collections (a replaced entry's string is let go, a kept one stays).
    func testRecentLuaStringsPushTheTextAskedFor() throws {
        let state = try LuaState()
        let L = state.main
        let recent = RecentLuaStrings()
        func pushed(_ s: String) -> String? {
            recent.push(s, on: L)
            defer { weir_pop(L, 1) }
            return LuaState.string(at: -1, on: L)
        }
        let route = "route-" + String(repeating: "x", count: 30)   // not a small String
        for round in 0..<3 {
            XCTAssertEqual(pushed(route), route, "round \(round)")
            XCTAssertEqual(pushed("bench-consumer"), "bench-consumer")
            for i in 0..<10 { XCTAssertEqual(pushed("consumer-\(i)"), "consumer-\(i)") }
            try state.load("collectgarbage()", chunkName: "gc")
            try state.pcall(nargs: 0, nresults: 0)
        }
        XCTAssertEqual(lua_gettop(L), 0, "push leaves exactly the string")
    }

    /// The cached hash of a key string is always SharedKey.hash of its bytes:
    /// hits, slot collisions (more keys than slots) and keys freed and made
    /// again (likely at recycled addresses).
    func testSharedKeyHashesMatchTheBytes() throws {
        let state = try LuaState()
        let L = state.main
        let hashes = SharedKeyHashes(on: L)
        func check(_ s: String, _ message: String) {
            LuaState.push(s, on: L)
            defer { weir_pop(L, 1) }
            let bytes = LuaState.bytes(at: -1, on: L)!
            XCTAssertEqual(hashes.hash(of: bytes, at: -1, on: L), SharedKey.hash(bytes), message)
        }
        let long = "rl|3:all|consumer|14:bench-consumer|minute|1764482400"
        for round in 0..<2 {
            check(long, "round \(round)")
            check(long, "a hit, round \(round)")
            for i in 0..<300 { check("k\(i)", "many keys, round \(round)") }
        }
        for i in 0..<50 {
            check("old-\(i)-" + long, "old")
            try state.load("collectgarbage()", chunkName: "gc")
            try state.pcall(nargs: 0, nresults: 0)
            check("new-\(i)-" + long, "new")
        }
        check("", "the empty key")
        XCTAssertEqual(lua_gettop(L), 0)
    }

    /// An integer value's text is the value's, repeated or not (the first
    /// call with 0 included: the remembered pair starts as 0 / "0").
    func testIntegerTextIsAlwaysTheValues() throws {
        let state = try LuaState()
        let cache = HeaderNameCache(lowercased: false, on: state.main)
        var formatted = 0
        func text(_ v: lua_Integer) -> String { cache.integerText(v) { formatted += 1; return String($0) } }
        for v: lua_Integer in [0, 0, 999_999_999, 999_999_999, 999_999_998, -5, -5, 0, .min, .max, .max] {
            XCTAssertEqual(text(v), String(v))
        }
        XCTAssertEqual(formatted, 6, "a value repeated from the previous call is not formatted again")
    }
}

