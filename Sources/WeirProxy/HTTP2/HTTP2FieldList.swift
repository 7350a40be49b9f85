import CNghttp2
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// An HTTP/2 header list as bytes: names and values written into one
/// buffer. Both ways: a request's list as nghttp2 decodes it (field by
/// field, no String per field), and a list for nghttp2 to send (a
/// response's HEADERS, trailers), handed over as an `nghttp2_nv` array
/// (nghttp2 copies it when the list is submitted). Names Weir sends are
/// lower case (RFC 9113 §8.2): it builds them so.
///
/// The bytes live in a ByteBuffer (plain memcpy writes; an `[UInt8]`'s
/// generic `append(contentsOf:)` cost ~400 instructions a field).
struct HTTP2FieldList {
    private var bytes: ByteBuffer
    /// Per field: name start, name length, value start, value length in `bytes`.
    private var spans: [(Int32, Int32, Int32, Int32)] = []

    init(capacity: Int = 0) {
        bytes = ByteBufferAllocator().buffer(capacity: max(capacity, 4) * 32)
        spans.reserveCapacity(capacity)
    }

    var count: Int { spans.count }

    /// Empties the list, keeping its storage (the connection's receiving list).
    mutating func removeAll() {
        bytes.clear()
        spans.removeAll(keepingCapacity: true)
    }

    /// A field as received (nghttp2's decoded bytes, copied).
    mutating func add(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) {
        add(name: UnsafeRawPointer(name.baseAddress!), name.count, lowercasing: false,
            value: UnsafeRawPointer(value.baseAddress!), value.count)
    }

    /// A field with a constant name (`:status`, `via`, `date`): only the
    /// value is a String.
    mutating func add(name: StaticString, value: String) {
        var value = value
        value.withUTF8 { v in
            add(name: UnsafeRawPointer(name.utf8Start), name.utf8CodeUnitCount, lowercasing: false,
                value: UnsafeRawPointer(v.baseAddress ?? UnsafePointer(bitPattern: 1)!), v.count)
        }
    }

    /// Disfavoured: a literal name picks the StaticString one (String is
    /// the default literal type).
    @_disfavoredOverload
    mutating func add(name: String, value: String) {
        var name = name, value = value
        name.withUTF8 { n in
            value.withUTF8 { v in
                add(name: UnsafeRawPointer(n.baseAddress ?? UnsafePointer(bitPattern: 1)!), n.count, lowercasing: false,
                    value: UnsafeRawPointer(v.baseAddress ?? UnsafePointer(bitPattern: 1)!), v.count)
            }
        }
    }

    /// A field from raw bytes (an HTTP/1 head's), the name lower-cased on the way.
    mutating func add(lowercasingName name: UnsafePointer<UInt8>, _ nameLength: Int,
                      value: UnsafePointer<UInt8>, _ valueLength: Int) {
        add(name: UnsafeRawPointer(name), nameLength, lowercasing: true, value: UnsafeRawPointer(value), valueLength)
    }

    /// One reservation and two copies per field (ByteBuffer.writeBytes went
    /// through a generic slice path, ~60 instructions a call).
    private mutating func add(name: UnsafeRawPointer, _ nameLength: Int, lowercasing: Bool,
                              value: UnsafeRawPointer, _ valueLength: Int) {
        let nameStart = bytes.writerIndex
        let count = nameLength + valueLength
        bytes.reserveCapacity(minimumWritableBytes: count)
        // The whole storage and an index move: `writeWithUnsafeMutableBytes`
        // slices its pointer with a generic `dropFirst` that is not inlined
        // (~57 instructions a call, ~10 fields a request).
        bytes.withVeryUnsafeMutableBytes { raw in
            let out = raw.baseAddress! + nameStart
            if lowercasing {
                let from = name.assumingMemoryBound(to: UInt8.self), to = out.assumingMemoryBound(to: UInt8.self)
                for i in 0..<nameLength {
                    let byte = from[i]
                    to[i] = byte &- UInt8(ascii: "A") < 26 ? byte | 0x20 : byte
                }
            } else {
                out.copyMemory(from: name, byteCount: nameLength)
            }
            (out + nameLength).copyMemory(from: value, byteCount: valueLength)
        }
        bytes.moveWriterIndex(forwardBy: count)
        spans.append((Int32(truncatingIfNeeded: nameStart), Int32(truncatingIfNeeded: nameLength),
                      Int32(truncatingIfNeeded: nameStart + nameLength), Int32(truncatingIfNeeded: valueLength)))
    }

    /// Calls `body` with each field's name and value bytes, in order (valid
    /// during the call only).
    func forEach(_ body: (_ name: UnsafeBufferPointer<UInt8>, _ value: UnsafeBufferPointer<UInt8>) throws -> Void) rethrows {
        try bytes.withUnsafeReadableBytes { raw in
            // All fields empty: no bytes, but every field is still visited.
            let base = raw.baseAddress.map { $0.assumingMemoryBound(to: UInt8.self) } ?? UnsafePointer(bitPattern: 1)!
            for (ns, nl, vs, vl) in spans {
                try body(UnsafeBufferPointer(start: base + Int(ns), count: Int(nl)),
                         UnsafeBufferPointer(start: base + Int(vs), count: Int(vl)))
            }
        }
    }

    /// The fields by position, as bytes: valid during `withFields` only.
    struct Fields {
        fileprivate let base: UnsafePointer<UInt8>
        fileprivate let spans: UnsafeBufferPointer<(Int32, Int32, Int32, Int32)>

        var count: Int { spans.count }

        func name(at index: Int) -> UnsafeBufferPointer<UInt8> {
            UnsafeBufferPointer(start: base + Int(spans[index].0), count: Int(spans[index].1))
        }

        func value(at index: Int) -> UnsafeBufferPointer<UInt8> {
            UnsafeBufferPointer(start: base + Int(spans[index].2), count: Int(spans[index].3))
        }
    }

    /// Calls `body` with the fields by position (a head is written from
    /// its pseudo-headers first, wherever they are in the list).
    func withFields<R>(_ body: (Fields) throws -> R) rethrows -> R {
        try bytes.withUnsafeReadableBytes { raw in
            let base = raw.baseAddress.map { $0.assumingMemoryBound(to: UInt8.self) } ?? UnsafePointer(bitPattern: 1)!
            return try spans.withUnsafeBufferPointer { try body(Fields(base: base, spans: $0)) }
        }
    }

    /// Whether `bytes` spell `text` exactly.
    @inline(__always)
    static func equals(_ bytes: UnsafeBufferPointer<UInt8>, _ text: StaticString) -> Bool {
        guard bytes.count == text.utf8CodeUnitCount else { return false }
        return memcmp(bytes.baseAddress!, text.utf8Start, bytes.count) == 0
    }

    /// The field at `index`, as Strings (tests and logs).
    func field(at index: Int) -> (name: String, value: String) {
        let (ns, nl, vs, vl) = spans[index]
        return (bytes.getString(at: Int(ns), length: Int(nl)) ?? "", bytes.getString(at: Int(vs), length: Int(vl)) ?? "")
    }

    /// Calls `body` with the list as nghttp2 takes it (valid during the call only).
    func withNameValues<R>(_ body: (UnsafePointer<nghttp2_nv>, Int) -> R) -> R {
        bytes.withUnsafeReadableBytes { raw in
            // nghttp2 only reads through these (the nv type's pointers are mutable in C).
            let base = UnsafeMutablePointer(mutating: raw.baseAddress.map { $0.assumingMemoryBound(to: UInt8.self) }
                                            ?? UnsafePointer(bitPattern: 1)!)
            return withUnsafeTemporaryAllocation(of: nghttp2_nv.self, capacity: max(spans.count, 1)) { nvs in
                for (i, (ns, nl, vs, vl)) in spans.enumerated() {
                    nvs[i] = nghttp2_nv(name: base + Int(ns), value: base + Int(vs), namelen: Int(nl), valuelen: Int(vl),
                                        flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue))
                }
                return body(UnsafePointer(nvs.baseAddress!), spans.count)
            }
        }
    }
}
