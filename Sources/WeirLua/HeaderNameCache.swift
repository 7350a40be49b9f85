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
        slots = .allocate(capacity: 2 * Self.pairCount)
        let empty = HeaderText("", fits: false)
        for i in 0..<2 * Self.pairCount { (slots + i).initialize(to: Slot(address: nil, entry: .passRetained(empty))) }
    }

    deinit {
        for i in 0..<2 * Self.pairCount { slots[i].entry.release() }
        slots.deinitialize(count: 2 * Self.pairCount)
        slots.deallocate()
    }

    // 128 slots in pairs (two-way): the few names of a plugin chain rarely
    // share a pair, and when two do, both still stay. Direct-mapped by
    // `address >> 4` a 64-slot table lost a name to a collision in some runs
    // (the strings' addresses differ from run to run): ~900 instructions per
    // request each time.
    private static let pairCount = 64                  // a power of two
    /// One entry per slot, slots 2p and 2p + 1 forming pair p: the Lua
    /// string's address (nil: empty) and its text, whether it fits a head.
    /// The slot owns its entry (retained when stored, released when
    /// replaced and in deinit): a hit reads it without ARC and lends its
    /// text borrowed (`withText`).
    private struct Slot {
        var address: UnsafeRawPointer?
        var entry: Unmanaged<HeaderText>
    }
    /// Allocated once, freed in deinit: a hit (inlined into the hot natives)
    /// reads one slot through one pointer, where three Swift arrays cost a
    /// buffer load and a bounds check each (weir-lua: the three lookups per
    /// request ~110 instructions less, callgrind).
    private let slots: UnsafeMutablePointer<Slot>
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
    /// (A hit is inlined into the hot natives; a miss calls `cache`.)
    @inline(__always)
    func checkedText(at index: Int32, on L: LuaThread) -> (text: String, fits: Bool)? {
        withEntry(at: index, on: L, knownString: false) { ($0.text, $0.fits) }
    }

    /// `checkedText(at:on:)` lent to `body` instead of returned: a hit's
    /// text is the cached entry's, borrowed for the call (a returned copy
    /// cost a retain and a release of the String, ~30 instructions, per
    /// argument). nil (`body` not called) if it is not a string. `body`
    /// must not look up this cache again: a miss there could replace (and
    /// free) the entry it borrows.
    @inline(__always)
    func withText<R>(at index: Int32, on L: LuaThread, _ body: (String, Bool) -> R) -> R? {
        withEntry(at: index, on: L, knownString: false) { body($0.text, $0.fits) }
    }

    /// `withText(at:on:_:)` of a value whose type the caller has seen is a
    /// string (one lua_type call less).
    @inline(__always)
    func withText<R>(ofStringAt index: Int32, on L: LuaThread, _ body: (String, Bool) -> R) -> R? {
        withEntry(at: index, on: L, knownString: true) { body($0.text, $0.fits) }
    }

    /// `withText(at:on:_:)` that also lends the text's UTF-8 bytes (the
    /// entry's own: `HeaderText.bytes`), valid during `body` only.
    @inline(__always)
    func withTextBytes<R>(at index: Int32, on L: LuaThread, _ body: (String, Bool, UnsafeRawBufferPointer) -> R) -> R? {
        withEntry(at: index, on: L, knownString: false) { body($0.text, $0.fits, UnsafeRawBufferPointer($0.bytes)) }
    }

    /// `withTextBytes(at:on:_:)` of a value whose type the caller has seen is a string.
    @inline(__always)
    func withTextBytes<R>(ofStringAt index: Int32, on L: LuaThread, _ body: (String, Bool, UnsafeRawBufferPointer) -> R) -> R? {
        withEntry(at: index, on: L, knownString: true) { body($0.text, $0.fits, UnsafeRawBufferPointer($0.bytes)) }
    }

    /// The entry of the string at `index` lent to `body` (every lookup
    /// above is this one): a hit is the slot's, borrowed without ARC; a miss
    /// makes one (`cache`). nil if the value is not a string. `knownString`
    /// (a constant at each inlined call site): the caller has seen its type,
    /// so lua_tolstring is called without weir_tostring's type test.
    @inline(__always)
    private func withEntry<R>(at index: Int32, on L: LuaThread, knownString: Bool, _ body: (HeaderText) -> R) -> R? {
        var length = 0
        let p = knownString ? lua_tolstring(L, index, &length) : weir_tostring(L, index, &length)
        guard let p else { return nil }
        let address = UnsafeRawPointer(p)
        // A multiplicative hash of the address: its low bits carry little
        // (TStrings are 16-byte aligned and allocated close together).
        let hash = UInt(bitPattern: Int(bitPattern: address)) &* 0x9E37_79B9_7F4A_7C15
        let pair = Int(truncatingIfNeeded: hash >> 58) & (Self.pairCount - 1)
        let first = slots + 2 * pair
        if first.pointee.address == address { return first.pointee.entry._withUnsafeGuaranteedRef(body) }
        if first[1].address == address { return first[1].entry._withUnsafeGuaranteedRef(body) }
        guard let entry = cache(address, length: length, pair: pair, at: index, on: L) else { return nil }
        return body(entry)
    }

    /// A miss: makes the text, checks it, and (a short string) caches it in
    /// `pair`, pinning the Lua string.
    @inline(never)
    private func cache(_ address: UnsafeRawPointer, length: Int, pair: Int, at index: Int32, on L: LuaThread) -> HeaderText? {
        guard let name = lowercased ? LuaState.headerName(at: index, on: L) : LuaState.string(at: index, on: L) else { return nil }
        let bytes = UnsafeRawBufferPointer(start: address, count: length)
        let entry = HeaderText(name, fits: lowercased ? HTTPFieldSyntax.isToken(bytes) : HTTPFieldSyntax.isValidFieldValue(bytes))
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
            slots[slot].entry.release()
            slots[slot] = Slot(address: address, entry: .passRetained(entry))
        }
        return entry
    }
}

/// A cached text (HeaderNameCache): a class, so that a hit can lend its
/// `let` text borrowed.
final class HeaderText {
    let text: String
    let fits: Bool
    /// `text`'s UTF-8, owned (allocated here, freed in deinit): a setter
    /// that writes the bytes (PluginUpstreamLines) copies them in one go,
    /// where reading a small String's bytes spills it first (~40
    /// instructions a String).
    let bytes: UnsafeMutableRawBufferPointer

    init(_ text: String, fits: Bool) {
        self.text = text
        self.fits = fits
        let utf8 = text.utf8
        bytes = .allocate(byteCount: utf8.count, alignment: 1)
        bytes.copyBytes(from: utf8)
    }

    deinit { bytes.deallocate() }
}

/// The other direction: Swift Strings the SDK hands to Lua request after
/// request (the matched route's name, the authenticated consumer; and, as
/// bytes, header values), pushed as
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
    /// Each entry's String as its two words (zero: none), compared before
    /// `==`: the same String again (a route's name, the consumer an auth
    /// plugin set) matches on its bits, without the arrays' and Optional's
    /// checks and String's `==` (~100 -> ~35 instructions per push). Equal
    /// bits are the same text: `strings` keeps the storage they point to alive.
    private let bits: UnsafeMutablePointer<(UInt64, UInt64)> = {
        let bits = UnsafeMutablePointer<(UInt64, UInt64)>.allocate(capacity: count)
        bits.initialize(repeating: (0, 0), count: count)
        return bits
    }()

    /// Pushes `string` as a Lua string.
    @inline(__always)
    func push(_ string: String, on L: LuaThread) {
        let key = unsafeBitCast(string, to: (UInt64, UInt64).self)
        for i in 0..<Self.count where bits[i] == key {
            lua_rawgeti(L, weir_registryindex(), lua_Integer(refs[i]))
            return
        }
        pushComparing(string, on: L)
    }

    @inline(never)
    private func pushComparing(_ string: String, on L: LuaThread) {
        // The same text in another String (another representation).
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
        bits[slot] = unsafeBitCast(string, to: (UInt64, UInt64).self)
    }

    // Short byte strings (header values: a client sends the same API key
    // request after request) pushed as the Lua string made before:
    // `lua_pushlstring` hashes the bytes and walks the intern table (~180
    // instructions for weir-lua's 9-byte key, callgrind), a hit here is one
    // comparison and one registry read. Direct-mapped by length and end
    // bytes; a slot first only remembers the bytes it saw, and holds their
    // string (a registry reference) once they come again, so values that
    // never repeat (many clients' keys) cost a copy of their bytes each,
    // not a registry write.
    private static let valueSlots = 8                  // a power of two
    private static let valueRoom = 40                  // LUAI_MAXSHORTLEN: longer strings are not interned
    private let valueBytes = UnsafeMutablePointer<UInt8>.allocate(capacity: valueSlots * valueRoom)
    /// Per slot: the length of its bytes (-1: none), and the reference of
    /// their string (LUA_NOREF: seen once, not held).
    private let valueLengths: UnsafeMutablePointer<Int> = {
        let lengths = UnsafeMutablePointer<Int>.allocate(capacity: valueSlots)
        lengths.initialize(repeating: -1, count: valueSlots)
        return lengths
    }()
    private let valueRefs: UnsafeMutablePointer<Int32> = {
        let refs = UnsafeMutablePointer<Int32>.allocate(capacity: valueSlots)
        refs.initialize(repeating: LUA_NOREF, count: valueSlots)
        return refs
    }()

    deinit {
        bits.deallocate()
        valueBytes.deallocate()
        valueLengths.deallocate()
        valueRefs.deallocate()
    }

    /// Pushes the bytes `value` as a Lua string.
    @inline(__always)
    func push(bytes value: UnsafeRawBufferPointer, on L: LuaThread) {
        let count = value.count
        guard count <= Self.valueRoom else {
            lua_pushlstring(L, value.baseAddress?.assumingMemoryBound(to: CChar.self), count)
            return
        }
        var slot = count
        if count > 0, let base = value.baseAddress?.assumingMemoryBound(to: UInt8.self) {
            slot = count &* 31 &+ Int(base[0]) &* 7 &+ Int(base[count - 1])
        }
        slot &= Self.valueSlots - 1
        let same = valueLengths[slot] == count
            && (count == 0 || memcmp(valueBytes + slot * Self.valueRoom, value.baseAddress!, count) == 0)
        if same && valueRefs[slot] != LUA_NOREF {
            lua_rawgeti(L, weir_registryindex(), lua_Integer(valueRefs[slot]))
            return
        }
        pushNew(value, slot: slot, same: same, on: L)
    }

    /// Not held: the string made; held from now on if the slot saw the
    /// same bytes last, else the slot remembers these bytes.
    @inline(never)
    private func pushNew(_ value: UnsafeRawBufferPointer, slot: Int, same: Bool, on L: LuaThread) {
        lua_pushlstring(L, value.baseAddress?.assumingMemoryBound(to: CChar.self), value.count)
        if same {
            lua_pushvalue(L, -1)
            valueRefs[slot] = luaL_ref(L, weir_registryindex())
            return
        }
        luaL_unref(L, weir_registryindex(), valueRefs[slot])             // no-op for LUA_NOREF
        valueRefs[slot] = LUA_NOREF
        if let base = value.baseAddress { (valueBytes + slot * Self.valueRoom).update(from: base.assumingMemoryBound(to: UInt8.self), count: value.count) }
        valueLengths[slot] = value.count
    }
}

/// The ids of handle tables (a `weir.shared` dictionary's, a prepared
/// header set's: lua/weir/init.lua puts the id at the handle's [1]), kept
/// by the table's address: a hit is one `lua_topointer` and a comparison
/// instead of reading [1] (a `lua_rawgeti`, the integer checks and a pop,
/// ~100 instructions per `dict:incr` or `prepared:set`).
///
/// Each cached table is pinned (a registry table holds it while it has its
/// slot), so no other table can appear at its address while its id is
/// kept; a replaced entry's table is unpinned with it. The id is the one
/// the handle had when it was cached (the SDK never changes a handle's [1]).
///
/// One per Lua state, used only on its event loop (like the state).
final class HandleIDs {
    private static let slotCount = 16                  // a power of two
    /// Registry reference of the table that pins the cached handles (slot + 1 -> handle).
    private let pinsRef: Int32
    private let addresses: UnsafeMutablePointer<UnsafeRawPointer?>
    private let ids: UnsafeMutablePointer<Int>

    /// - Parameter L: a thread of the state it serves (the pin table lives in its registry).
    init(on L: LuaThread) {
        lua_createtable(L, Int32(Self.slotCount), 0)
        pinsRef = luaL_ref(L, weir_registryindex())
        addresses = .allocate(capacity: Self.slotCount)
        addresses.initialize(repeating: nil, count: Self.slotCount)
        ids = .allocate(capacity: Self.slotCount)
        ids.initialize(repeating: 0, count: Self.slotCount)
    }

    deinit {
        addresses.deallocate()
        ids.deallocate()
    }

    /// The id of the handle table at `index` (the caller has seen it is a
    /// table); nil when its [1] is not an integer (not a handle).
    @inline(__always)
    func id(ofTableAt index: Int32, _ L: LuaThread) -> Int? {
        guard let address = lua_topointer(L, index) else { return nil }
        let hash = UInt(bitPattern: Int(bitPattern: address)) &* 0x9E37_79B9_7F4A_7C15
        let slot = Int(truncatingIfNeeded: hash >> 60) & (Self.slotCount - 1)
        if addresses[slot] == address { return ids[slot] }
        return cache(address, slot: slot, at: index, L)
    }

    /// A miss: reads [1] raw (no metamethod may run under Swift) and, for
    /// a handle, caches its id in `slot`, pinning the table.
    @inline(never)
    private func cache(_ address: UnsafeRawPointer, slot: Int, at index: Int32, _ L: LuaThread) -> Int? {
        let absolute = lua_absindex(L, index)
        defer { weir_pop(L, 1) }
        guard lua_rawgeti(L, absolute, 1) == LUA_TNUMBER, lua_isinteger(L, -1) != 0 else { return nil }
        let id = Int(lua_tointegerx(L, -1, nil))
        lua_rawgeti(L, weir_registryindex(), lua_Integer(pinsRef))       // [1], pins
        lua_pushvalue(L, absolute)                                        // [1], pins, handle
        lua_rawseti(L, -2, lua_Integer(slot + 1))                         // [1], pins (the old handle unpinned)
        weir_pop(L, 1)
        addresses[slot] = address
        ids[slot] = id
        return id
    }
}
