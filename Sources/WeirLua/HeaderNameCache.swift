import CLua
import CLuaShims
import Foundation
import WeirCore

/// The Swift `String` of a header name argument, kept per Lua string.
///
/// Plugins pass the same few constant names request after request
/// (rate-limiting's five RateLimit headers, key-auth's `apikey`), and Lua
/// interns short strings: one object, at one address, per distinct text
/// while it lives. A small table from that address to the lower-cased Swift
/// String saves building (allocating, UTF-8 validating, later freeing) the
/// same String on every call.
///
/// Each cached Lua string is pinned (kept in a registry table, slot by slot)
/// for as long as it holds its slot: it cannot be collected, so no other
/// string can appear at its address, and a hit is the address alone (no
/// byte comparison; a name written with upper case, `X-Consumer-Name`, hits
/// like any other). A replaced entry's string is unpinned with it.
///
/// The same works for header *values* that are constants of the plugin
/// (rate-limiting's limits and reset texts, a consumer's name): a cache made
/// with `lowercased: false` keeps the text as it is.
///
/// Each entry also keeps whether its text can be written into a head as is
/// (a name: a token; a value: no CR/LF/NUL), checked once when cached: the
/// header setters pass only checked names and values on, so the proxy does
/// not scan the same constant bytes on every request.
///
/// One per Lua state, used only on its event loop (like the state).
final class HeaderNameCache {
    private let lowercased: Bool
    /// Registry reference of the table that pins the cached strings (slot + 1 -> string).
    private let pinsRef: Int32

    /// - Parameter L: a thread of the state the cache serves (the pin table lives in its registry).
    init(lowercased: Bool = true, on L: LuaThread) {
        self.lowercased = lowercased
        lua_createtable(L, Int32(2 * Self.pairCount), 0)
        pinsRef = luaL_ref(L, weir_registryindex())
    }

    // 128 slots in pairs (two-way): the few names of a plugin chain rarely
    // share a pair, and when two do, both still stay. Direct-mapped by
    // `address >> 4` a 64-slot table lost a name to a collision in some runs
    // (the strings' addresses differ from run to run): ~900 instructions per
    // request each time.
    private static let pairCount = 64                  // a power of two
    private var addresses = [UnsafeRawPointer?](repeating: nil, count: 2 * pairCount)
    private var names = [String](repeating: "", count: 2 * pairCount)
    private var fits = [Bool](repeating: false, count: 2 * pairCount)
    /// Per pair, the slot (0/1) the next new name replaces.
    private var nextVictim = [UInt8](repeating: 0, count: pairCount)

    /// The last integer value written as text, and its text (a value cache's):
    /// rate-limiting writes the same remaining count twice per request
    /// (`X-RateLimit-Remaining-<Period>` and `RateLimit-Remaining`).
    private var lastInteger: lua_Integer = 0
    private var lastIntegerText = "0"

    /// `format(value)`, made once for a value repeated from the previous call.
    func integerText(_ value: lua_Integer, _ format: (lua_Integer) -> String) -> String {
        if value != lastInteger {
            lastInteger = value
            lastIntegerText = format(value)
        }
        return lastIntegerText
    }

    /// The header name at `index`, lower-cased (as it is for a value cache);
    /// nil if it is not a string.
    @inline(__always)
    func name(at index: Int32, on L: LuaThread) -> String? { checkedText(at: index, on: L)?.text }

    /// The string at `index` (lower-cased for a name cache) and whether it
    /// fits a head as is: a token for a name cache, no CR/LF/NUL for a value
    /// cache (`HTTPFieldSyntax`). nil if it is not a string.
    func checkedText(at index: Int32, on L: LuaThread) -> (text: String, fits: Bool)? {
        var length = 0
        guard let p = weir_tostring(L, index, &length) else { return nil }
        let address = UnsafeRawPointer(p)
        // A multiplicative hash of the address: its low bits carry little
        // (TStrings are 16-byte aligned and allocated close together).
        let hash = UInt(bitPattern: Int(bitPattern: address)) &* 0x9E37_79B9_7F4A_7C15
        let pair = Int(truncatingIfNeeded: hash >> 58) & (Self.pairCount - 1)
        if addresses[2 * pair] == address { return (names[2 * pair], fits[2 * pair]) }
        if addresses[2 * pair + 1] == address { return (names[2 * pair + 1], fits[2 * pair + 1]) }
        guard let name = lowercased ? LuaState.headerName(at: index, on: L) : LuaState.string(at: index, on: L) else { return nil }
        let bytes = UnsafeRawBufferPointer(start: address, count: length)
        let fit = lowercased ? HTTPFieldSyntax.isToken(bytes) : HTTPFieldSyntax.isValidFieldValue(bytes)
        // Only short strings are interned (LUAI_MAXSHORTLEN 40): a long one
        // is a fresh object each time, not worth a slot.
        if length <= 40 {
            let slot = 2 * pair + Int(nextVictim[pair])
            nextVictim[pair] ^= 1
            let absolute = lua_absindex(L, index)
            lua_rawgeti(L, weir_registryindex(), lua_Integer(pinsRef))   // pins
            lua_pushvalue(L, absolute)                                    // pins, string
            lua_rawseti(L, -2, lua_Integer(slot + 1))                     // pins (the old string unpinned)
            weir_pop(L, 1)
            addresses[slot] = address
            names[slot] = name
            fits[slot] = fit
        }
        return (name, fit)
    }
}

/// The other direction: Swift Strings the SDK hands to Lua request after
/// request (the matched route's name, the authenticated consumer), pushed as
/// the Lua string made the first time instead of a new one per call
/// (`lua_pushlstring` hashes the text and looks it up in the intern table
/// each time). A few entries, the oldest replaced first; each entry's Lua
/// string is held by a registry reference while it has the entry.
///
/// One per Lua state, used only on its event loop (like the state).
final class RecentLuaStrings {
    private static let count = 4
    private var strings = [String?](repeating: nil, count: count)
    private var refs = [Int32](repeating: LUA_NOREF, count: count)
    private var nextVictim = 0

    /// Pushes `string` as a Lua string.
    func push(_ string: String, on L: LuaThread) {
        // `==` first compares the strings' representations: the same String
        // (a route's name, the consumer an auth plugin set) costs a few
        // instructions.
        for i in 0..<Self.count where strings[i] == string {
            lua_rawgeti(L, weir_registryindex(), lua_Integer(refs[i]))
            return
        }
        let slot = nextVictim
        nextVictim = (nextVictim + 1) % Self.count
        luaL_unref(L, weir_registryindex(), refs[slot])                  // no-op for LUA_NOREF
        LuaState.push(string, on: L)
        lua_pushvalue(L, -1)
        refs[slot] = luaL_ref(L, weir_registryindex())
        strings[slot] = string
    }
}
