#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// A frozen open-addressing hash table keyed by byte strings, looked up by a
// precomputed FNV-1a hash plus the key bytes. The route table hashes a
// request path once, left to right, and gets the hash of every prefix on
// the way; this table lets it probe each prefix without building a String.

/// FNV-1a, 64-bit: cheap, incremental (hash of a prefix extends to the
/// hash of a longer prefix), good enough spread for an index we verify.
@usableFromInline
enum FNV1a {
    @usableFromInline static let offsetBasis: UInt64 = 0xcbf2_9ce4_8422_2325
    @usableFromInline static let prime: UInt64 = 0x0000_0100_0000_01b3

    @inline(__always) @usableFromInline
    static func step(_ hash: UInt64, _ byte: UInt8) -> UInt64 { (hash ^ UInt64(byte)) &* prime }

    static func hash<C: Collection>(_ bytes: C) -> UInt64 where C.Element == UInt8 {
        var hash = offsetBasis
        for byte in bytes { hash = step(hash, byte) }
        return hash
    }
}

/// Maps byte-string keys to a range of some external array (the candidates
/// stored for that key). Built once, then read-only. Storage is raw memory
/// owned by the table: lookups run on every request, and plain arrays here
/// cost a retain/release pair and a bounds check per probe.
final class ByteKeyTable: @unchecked Sendable {
    // @unchecked: the buffers are written only in init and freed in deinit.
    private struct Slot {
        var hash: UInt64 = 0          // 0 marks an empty slot
        var keyStart: Int32 = 0
        var keyLength: Int32 = 0
        var valueStart: Int32 = 0
        var valueCount: Int32 = 0
    }

    private let slots: UnsafeMutableBufferPointer<Slot>
    private let keyBytes: UnsafeMutableBufferPointer<UInt8>
    private let mask: Int
    let isEmpty: Bool
    /// Set of key lengths present (bit n = some key has length n, for n < 64,
    /// bit 63 = some key is 63 bytes or longer). Lets lookups skip lengths
    /// that cannot match without probing.
    let lengthMask: UInt64

    /// `entries`: each distinct key with its value range.
    init(entries: [(key: [UInt8], values: Range<Int>)]) {
        var capacity = 4
        while capacity < entries.count * 2 { capacity <<= 1 }
        var slots = [Slot](repeating: Slot(), count: capacity)
        var keyBytes: [UInt8] = []
        var lengthMask: UInt64 = 0
        let mask = capacity - 1
        for entry in entries {
            let hash = ByteKeyTable.nonZero(FNV1a.hash(entry.key))
            var index = ByteKeyTable.slotIndex(hash, mask)
            while slots[index].hash != 0 { index = (index + 1) & mask }
            slots[index] = Slot(hash: hash, keyStart: Int32(keyBytes.count), keyLength: Int32(entry.key.count),
                                valueStart: Int32(entry.values.lowerBound), valueCount: Int32(entry.values.count))
            keyBytes.append(contentsOf: entry.key)
            lengthMask |= 1 << UInt64(min(entry.key.count, 63))
        }
        self.slots = UnsafeMutableBufferPointer<Slot>.allocate(capacity: capacity)
        _ = self.slots.initialize(from: slots)
        self.keyBytes = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: max(1, keyBytes.count))
        _ = self.keyBytes.initialize(from: keyBytes)
        self.mask = mask
        self.isEmpty = entries.isEmpty
        self.lengthMask = lengthMask
    }

    deinit {
        slots.deallocate()
        keyBytes.deallocate()
    }

    @inline(__always)
    func mayContain(length: Int) -> Bool {
        lengthMask & (1 << UInt64(min(length, 63))) != 0
    }

    /// The value range for the key `bytes[0..<length]` whose FNV-1a hash is `hash`.
    @inline(__always)
    func find(hash rawHash: UInt64, bytes: UnsafeBufferPointer<UInt8>, length: Int) -> Range<Int>? {
        if isEmpty || !mayContain(length: length) { return nil }
        let hash = ByteKeyTable.nonZero(rawHash)
        var index = ByteKeyTable.slotIndex(hash, mask)
        let slotBase = slots.baseAddress.unsafelyUnwrapped
        while true {
            let slot = slotBase[index]
            if slot.hash == 0 { return nil }
            if slot.hash == hash && Int(slot.keyLength) == length && keyEquals(slot.keyStart, bytes, length) {
                let start = Int(slot.valueStart)
                return start..<(start + Int(slot.valueCount))
            }
            index = (index + 1) & mask
        }
    }

    @inline(__always)
    private func keyEquals(_ keyStart: Int32, _ bytes: UnsafeBufferPointer<UInt8>, _ length: Int) -> Bool {
        guard length > 0 else { return true }
        return memcmp(keyBytes.baseAddress.unsafelyUnwrapped + Int(keyStart), bytes.baseAddress.unsafelyUnwrapped, length) == 0
    }

    @inline(__always)
    private static func nonZero(_ hash: UInt64) -> UInt64 { hash == 0 ? 1 : hash }

    @inline(__always)
    private static func slotIndex(_ hash: UInt64, _ mask: Int) -> Int {
        // Fold the high bits in: FNV's low bits alone cluster for similar keys.
        Int(truncatingIfNeeded: ((hash ^ (hash >> 29)) &* 0xbf58_476d_1ce4_e5b9) >> 32) & mask
    }
}
