import CLua
import CLuaShims
import Foundation

/// The Swift `String` of a header name argument, kept per Lua string.
///
/// Plugins pass the same few constant names request after request
/// (rate-limiting's five RateLimit headers, key-auth's `apikey`), and Lua
/// interns short strings: one object, at one address, per distinct text
/// while it lives. A small direct-mapped table from that address to the
/// lower-cased Swift String saves building (allocating, UTF-8 validating,
/// later freeing) the same String on every call. A hit also compares the
/// bytes, so a string that a collection left at a recycled address is never
/// taken for the old one; a name with upper-case letters never matches its
/// lower-cased entry byte for byte, so it is compared with ASCII upper case
/// folded (`X-Consumer-Name`, as users write it, hits too).
///
/// The same works for header *values* that are constants of the plugin
/// (rate-limiting's limits and reset texts, a consumer's name): a cache made
/// with `lowercased: false` keeps the text as it is.
///
/// One per Lua state, used only on its event loop (like the state).
final class HeaderNameCache {
    private let lowercased: Bool

    init(lowercased: Bool = true) { self.lowercased = lowercased }

    // 128 slots in pairs (two-way): the few names of a plugin chain rarely
    // share a pair, and when two do, both still stay. Direct-mapped by
    // `address >> 4` a 64-slot table lost a name to a collision in some runs
    // (the strings' addresses differ from run to run): ~900 instructions per
    // request each time.
    private static let pairCount = 64                  // a power of two
    private var addresses = [UnsafeRawPointer?](repeating: nil, count: 2 * pairCount)
    private var names = [String](repeating: "", count: 2 * pairCount)
    /// Per pair, the slot (0/1) the next new name replaces.
    private var nextVictim = [UInt8](repeating: 0, count: pairCount)

    /// The header name at `index`, lower-cased (as it is for a value cache);
    /// nil if it is not a string.
    func name(at index: Int32, on L: LuaThread) -> String? {
        var length = 0
        guard let p = weir_tostring(L, index, &length) else { return nil }
        let address = UnsafeRawPointer(p)
        // A multiplicative hash of the address: its low bits carry little
        // (TStrings are 16-byte aligned and allocated close together).
        let hash = UInt(bitPattern: Int(bitPattern: address)) &* 0x9E37_79B9_7F4A_7C15
        let pair = Int(truncatingIfNeeded: hash >> 58) & (Self.pairCount - 1)
        for slot in (2 * pair)...(2 * pair + 1) where addresses[slot] == address {
            let cached = names[slot]
            let same = cached.utf8.withContiguousStorageIfAvailable {
                $0.count == length && (memcmp($0.baseAddress!, address, length) == 0
                                       || lowercased && Self.asciiLowercased(address, length, equals: $0.baseAddress!))
            }
            if same == true { return cached }
        }
        guard let name = lowercased ? LuaState.headerName(at: index, on: L) : LuaState.string(at: index, on: L) else { return nil }
        // Only short strings are interned (LUAI_MAXSHORTLEN 40): a long one
        // is a fresh object each time, not worth a slot.
        if length <= 40 {
            let slot = 2 * pair + Int(nextVictim[pair])
            nextVictim[pair] ^= 1
            addresses[slot] = address
            names[slot] = name
        }
        return name
    }

    /// Whether `bytes` with A-Z folded to a-z are `lower` (same length).
    /// Only A-Z are folded: another byte must match exactly, so a name whose
    /// Unicode lower-casing differs from itself is never taken for `lower`.
    private static func asciiLowercased(_ bytes: UnsafeRawPointer, _ length: Int, equals lower: UnsafePointer<UInt8>) -> Bool {
        let source = bytes.assumingMemoryBound(to: UInt8.self)
        for i in 0..<length {
            var byte = source[i]
            if byte &- 0x41 < 26 { byte |= 0x20 }
            if byte != lower[i] { return false }
        }
        return true
    }
}
