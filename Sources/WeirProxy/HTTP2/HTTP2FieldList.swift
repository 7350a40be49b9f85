import CNghttp2
#if canImport(Glibc)
import Glibc
#endif

/// An HTTP/2 header list as bytes: names and values appended into one byte
/// array. Both ways: a request's list as nghttp2 decodes it (field by
/// field, no String per field), and a list for nghttp2 to send (a
/// response's HEADERS, trailers), handed over as an `nghttp2_nv` array
/// (nghttp2 copies it when the list is submitted). Names Weir sends are
/// lower case (RFC 9113 §8.2): it builds them so.
struct HTTP2FieldList {
    private var bytes: [UInt8] = []
    /// Per field: name start, name length, value start, value length in `bytes`.
    private var spans: [(Int32, Int32, Int32, Int32)] = []

    init(capacity: Int = 0) {
        spans.reserveCapacity(capacity)
        bytes.reserveCapacity(capacity * 32)
    }

    var count: Int { spans.count }

    mutating func removeAll() {
        bytes.removeAll(keepingCapacity: true)
        spans.removeAll(keepingCapacity: true)
    }

    /// A field as received (nghttp2's decoded bytes, copied).
    mutating func add(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) {
        let nameStart = Int32(bytes.count)
        bytes.append(contentsOf: name)
        let valueStart = Int32(bytes.count)
        bytes.append(contentsOf: value)
        spans.append((nameStart, Int32(name.count), valueStart, Int32(value.count)))
    }

    /// Calls `body` with each field's name and value bytes, in order (valid
    /// during the call only).
    func forEach(_ body: (_ name: UnsafeBufferPointer<UInt8>, _ value: UnsafeBufferPointer<UInt8>) throws -> Void) rethrows {
        try bytes.withUnsafeBufferPointer { raw in
            // All fields empty: no storage, but every field is still visited.
            let base = raw.baseAddress ?? UnsafePointer(bitPattern: 1)!
            for (ns, nl, vs, vl) in spans {
                try body(UnsafeBufferPointer(start: base + Int(ns), count: Int(nl)),
                         UnsafeBufferPointer(start: base + Int(vs), count: Int(vl)))
            }
        }
    }

    /// Whether `bytes` spell `text` exactly.
    @inline(__always)
    static func equals(_ bytes: UnsafeBufferPointer<UInt8>, _ text: StaticString) -> Bool {
        guard bytes.count == text.utf8CodeUnitCount else { return false }
        return memcmp(bytes.baseAddress!, text.utf8Start, bytes.count) == 0
    }

    mutating func add(name: String, value: String) {
        let nameStart = Int32(bytes.count)
        bytes.append(contentsOf: name.utf8)
        let valueStart = Int32(bytes.count)
        bytes.append(contentsOf: value.utf8)
        spans.append((nameStart, valueStart - nameStart, valueStart, Int32(bytes.count) - valueStart))
    }

    /// A field from raw bytes (an HTTP/1 head's), the name lower-cased on the way.
    mutating func add(lowercasingName name: UnsafePointer<UInt8>, _ nameLength: Int,
                      value: UnsafePointer<UInt8>, _ valueLength: Int) {
        let nameStart = Int32(bytes.count)
        for i in 0..<nameLength {
            let byte = name[i]
            bytes.append(byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte)
        }
        let valueStart = Int32(bytes.count)
        bytes.append(contentsOf: UnsafeBufferPointer(start: value, count: valueLength))
        spans.append((nameStart, Int32(nameLength), valueStart, Int32(valueLength)))
    }

    /// The field at `index`, as Strings (tests and logs).
    func field(at index: Int) -> (name: String, value: String) {
        let (ns, nl, vs, vl) = spans[index]
        return (String(decoding: bytes[Int(ns)..<Int(ns + nl)], as: UTF8.self),
                String(decoding: bytes[Int(vs)..<Int(vs + vl)], as: UTF8.self))
    }

    /// Calls `body` with the list as nghttp2 takes it (valid during the call only).
    func withNameValues<R>(_ body: (UnsafePointer<nghttp2_nv>, Int) -> R) -> R {
        bytes.withUnsafeBufferPointer { raw in
            // nghttp2 only reads through these (the nv type's pointers are mutable in C).
            let base = UnsafeMutablePointer(mutating: raw.baseAddress ?? UnsafePointer(bitPattern: 1)!)
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
