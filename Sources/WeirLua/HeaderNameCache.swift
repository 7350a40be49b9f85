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
/// lower-cased entry and is simply built each time.
///
/// One per Lua state, used only on its event loop (like the state).
final class HeaderNameCache {
    private static let slotCount = 64                  // a power of two
    private var addresses = [UnsafeRawPointer?](repeating: nil, count: slotCount)
    private var names = [String](repeating: "", count: slotCount)

    /// The header name at `index`, lower-cased; nil if it is not a string.
    func name(at index: Int32, on L: LuaThread) -> String? {
        var length = 0
        guard let p = weir_tostring(L, index, &length) else { return nil }
        let address = UnsafeRawPointer(p)
        // TString headers are 24+ bytes apart: the low 4 bits carry nothing.
        let slot = Int(truncatingIfNeeded: UInt(bitPattern: Int(bitPattern: address)) >> 4) & (Self.slotCount - 1)
        if addresses[slot] == address {
            let cached = names[slot]
            let same = cached.utf8.withContiguousStorageIfAvailable {
                $0.count == length && memcmp($0.baseAddress!, address, length) == 0
            }
            if same == true { return cached }
        }
        guard let name = LuaState.headerName(at: index, on: L) else { return nil }
        // Only short strings are interned (LUAI_MAXSHORTLEN 40): a long one
        // is a fresh object each time, not worth a slot.
        if length <= 40 {
            addresses[slot] = address
            names[slot] = name
        }
        return name
    }
}
