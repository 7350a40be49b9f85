import NIOCore
import WeirCore

/// Header names the data path needs by identity, recognised once while parsing.
public enum HTTP1KnownField: UInt8, Sendable {
    case other
    case host, contentLength, transferEncoding, connection, expect, upgrade
    case keepAlive, proxyConnection, te, trailer
    case xForwardedFor, xForwardedProto, xForwardedHost, forwarded, via, xRequestID
    /// Tagged so a forwarded response without one gets the proxy's (RFC 9110 §6.6.1).
    case date

    /// RFC 9110 §7.6.1 hop-by-hop fields (plus the de-facto Keep-Alive and
    /// Proxy-Connection); Connection may name more.
    public var isHopByHop: Bool {
        switch self {
        case .connection, .keepAlive, .proxyConnection, .te, .trailer, .transferEncoding, .upgrade: return true
        default: return false
        }
    }

    /// Forwarded in a trailer section: untagged fields, and Date (tagged only
    /// for the response head); framing and routing ones never (RFC 9110 §6.5.1).
    public var forwardedInTrailers: Bool { self == .other || self == .date }

    /// Classifies by length first, then by bytes (ASCII case-insensitive).
    /// Not inlined: its word compares unroll into a large body, and inlined
    /// into the parser it made the compiler outline the entry array's
    /// appends there (~50 instructions more per field line, callgrind).
    @inline(never)
    static func classify(_ p: UnsafePointer<UInt8>, _ n: Int) -> HTTP1KnownField {
        switch n {
        case 2: return HTTP1Bytes.equalsLower(p, n, "te") ? .te : .other
        case 3: return HTTP1Bytes.equalsLower(p, n, "via") ? .via : .other
        case 4:
            if HTTP1Bytes.equalsLower(p, n, "host") { return .host }
            return HTTP1Bytes.equalsLower(p, n, "date") ? .date : .other
        case 6: return HTTP1Bytes.equalsLower(p, n, "expect") ? .expect : .other
        case 7:
            if HTTP1Bytes.equalsLower(p, n, "upgrade") { return .upgrade }
            return HTTP1Bytes.equalsLower(p, n, "trailer") ? .trailer : .other
        case 9: return HTTP1Bytes.equalsLower(p, n, "forwarded") ? .forwarded : .other
        case 10:
            if HTTP1Bytes.equalsLower(p, n, "connection") { return .connection }
            return HTTP1Bytes.equalsLower(p, n, "keep-alive") ? .keepAlive : .other
        case 12: return HTTP1Bytes.equalsLower(p, n, "x-request-id") ? .xRequestID : .other
        case 14: return HTTP1Bytes.equalsLower(p, n, "content-length") ? .contentLength : .other
        case 15: return HTTP1Bytes.equalsLower(p, n, "x-forwarded-for") ? .xForwardedFor : .other
        case 16:
            if HTTP1Bytes.equalsLower(p, n, "x-forwarded-host") { return .xForwardedHost }
            return HTTP1Bytes.equalsLower(p, n, "proxy-connection") ? .proxyConnection : .other
        case 17:
            if HTTP1Bytes.equalsLower(p, n, "transfer-encoding") { return .transferEncoding }
            return HTTP1Bytes.equalsLower(p, n, "x-forwarded-proto") ? .xForwardedProto : .other
        default: return .other
        }
    }
}

/// One field line, as offsets into the head's bytes. Int32 keeps the entry
/// at 24 bytes; heads are bounded by `HTTP1Limits` far below 2 GiB.
public struct HTTP1FieldEntry: Sendable {
    /// Start of the line (= start of the name).
    public var nameStart: Int32
    public var nameLength: Int32
    /// Value with leading/trailing whitespace trimmed.
    public var valueStart: Int32
    public var valueLength: Int32
    /// Offset just past the line's CRLF: `nameStart..<lineEnd` is the whole line.
    public var lineEnd: Int32
    public var known: HTTP1KnownField
}

/// A set of field indices (which lines to drop when forwarding). The first
/// 64 live in one word; more only allocate when a head has that many fields.
public struct HTTP1FieldSet: Sendable, Equatable {
    @usableFromInline var low: UInt64 = 0
    @usableFromInline var high: [UInt64] = []

    public init() {}

    public var isEmpty: Bool { low == 0 && high.allSatisfy { $0 == 0 } }

    /// Inlined for indices below 64 (a bit set); the words above go
    /// through an out-of-line `insertHigh`: with its array growth inlined
    /// the whole insert stayed a call (~23 instructions a use, callgrind).
    @inline(__always)
    public mutating func insert(_ index: Int) {
        if index < 64 { low |= 1 << UInt64(index); return }
        insertHigh(index)
    }

    @inline(never)
    mutating func insertHigh(_ index: Int) {
        let word = (index - 64) >> 6
        while high.count <= word { high.append(0) }
        high[word] |= 1 << UInt64((index - 64) & 63)
    }

    @inlinable
    public func contains(_ index: Int) -> Bool {
        if index < 64 { return low & (1 << UInt64(index)) != 0 }
        let word = (index - 64) >> 6
        return word < high.count && high[word] & (1 << UInt64((index - 64) & 63)) != 0
    }

    /// Inlined for the usual sets (every index below 64): an OR. A call
    /// here cost ~20 instructions per use (routing, upstream heads).
    @inline(__always)
    public mutating func formUnion(_ other: HTTP1FieldSet) {
        low |= other.low
        if !other.high.isEmpty { formUnionHigh(other.high) }
    }

    @inline(never)
    mutating func formUnionHigh(_ otherHigh: [UInt64]) {
        for (i, w) in otherHigh.enumerated() {
            while high.count <= i { high.append(0) }
            high[i] |= w
        }
    }

    /// Calls `body` with each index below `count` in the set, in ascending
    /// order: a step per member (the usual set holds one or two), not per
    /// field line.
    @inline(__always)
    func forEachIndex(below count: Int, _ body: (Int) -> Void) {
        var word = count >= 64 ? low : low & ((1 << UInt64(count)) &- 1)
        while word != 0 {
            body(word.trailingZeroBitCount)
            word &= word &- 1
        }
        guard count > 64 else { return }
        for (k, w) in high.enumerated() {
            var word = w
            while word != 0 {
                let index = 64 + (k << 6) + word.trailingZeroBitCount
                if index >= count { return }
                body(index)
                word &= word &- 1
            }
        }
    }

    /// Whether every index in this set is also in `other`.
    public func isSubset(of other: HTTP1FieldSet) -> Bool {
        if low & ~other.low != 0 { return false }
        for (i, w) in high.enumerated() where w & ~(i < other.high.count ? other.high[i] : 0) != 0 { return false }
        return true
    }
}

/// The field section of a head or trailer: the original bytes plus an index.
/// Names and values are only turned into Strings when asked for.
public struct HTTP1Fields: Sendable {
    /// The bytes the entries' offsets point into (the whole head for heads).
    public let bytes: ByteBuffer
    public let entries: [HTTP1FieldEntry]
    /// A Connection field lists names other than close/keep-alive/upgrade
    /// (only then must hop-by-hop removal compare names against it).
    public let connectionNamesOtherFields: Bool

    init(bytes: ByteBuffer, entries: [HTTP1FieldEntry], connectionNamesOtherFields: Bool = false) {
        self.bytes = bytes
        self.entries = entries
        self.connectionNamesOtherFields = connectionNamesOtherFields
    }

    public var count: Int { entries.count }

    public func name(at i: Int) -> String {
        let e = entries[i]
        return string(at: Int(e.nameStart), length: Int(e.nameLength))
    }

    public func value(at i: Int) -> String {
        let e = entries[i]
        return string(at: Int(e.valueStart), length: Int(e.valueLength))
    }

    /// The bytes at `offset` (from the head's start) as a String, written
    /// in place: up to 15 ASCII bytes make a small String with no UTF-8
    /// validation pass (`getString` decodes and repairs every time: about
    /// twice the instructions for a Host value). Invalid UTF-8 is repaired
    /// the same way either way.
    private func string(at offset: Int, length: Int) -> String {
        bytes.withUnsafeReadableBytes { raw in
            String(unsafeUninitializedCapacity: length) { out in
                UnsafeMutableRawBufferPointer(out).copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + length)]))
                return length
            }
        }
    }

    /// Zero-copy view of one value.
    public func withValueBytes<R>(at i: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        let e = entries[i]
        return try bytes.withUnsafeReadableBytes { raw in
            try body(UnsafeRawBufferPointer(rebasing: raw[Int(e.valueStart)..<Int(e.valueStart + e.valueLength)]))
        }
    }

    /// The value of the first field named `name` (ASCII case-insensitive),
    /// read in place and handed to `body` (nil when there is none): one
    /// pass over the index, no copy of the name (`weir.request.get_header`).
    func withFirstValue(named name: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        name.withContiguousUTF8 { withFirstValue(named: UnsafeRawBufferPointer($0), body) }
    }

    /// `withFirstValue(named:_:)` of a name given as its UTF-8 bytes.
    func withFirstValue(named name: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer?) -> Void) {
        guard let np = name.baseAddress?.assumingMemoryBound(to: UInt8.self), name.count > 0 else { return body(nil) }
        bytes.withUnsafeReadableBytes { raw in
            let base = raw.baseAddress!.assumingMemoryBound(to: UInt8.self)
            entries.withUnsafeBufferPointer { entries in
                for e in entries where Int(e.nameLength) == name.count
                    && HTTP1Bytes.equalsIgnoringCase(base + Int(e.nameStart), np, name.count) {
                    return body(UnsafeRawBufferPointer(start: base + Int(e.valueStart), count: Int(e.valueLength)))
                }
                body(nil)
            }
        }
    }

    /// Index of the first field whose name equals `name` (ASCII case-insensitive).
    public func firstIndex(named name: String) -> Int? {
        var name = name
        return name.withUTF8 { n -> Int? in
            guard let np = n.baseAddress, n.count > 0 else { return nil }
            return bytes.withUnsafeReadableBytes { raw -> Int? in
                let base = raw.bindMemory(to: UInt8.self).baseAddress!
                for (i, e) in entries.enumerated() where Int(e.nameLength) == n.count {
                    if HTTP1Bytes.equalsIgnoringCase(base + Int(e.nameStart), np, n.count) { return i }
                }
                return nil
            }
        }
    }

    /// The fields named `name` (ASCII case-insensitive) as a set: no array
    /// is allocated (plugins' header setters run this per call). A name the
    /// parser tags (`HTTP1KnownField`) is matched on the tag alone; any
    /// other only against untagged lines of its length, compared in place.
    func fieldSet(named name: String) -> HTTP1FieldSet {
        fieldSet(named: name, kind: HTTP1KnownField.classify(name))
    }

    /// `fieldSet(named:)` for a name already classified (`kind` must be
    /// `HTTP1KnownField.classify(name)`).
    @inline(__always)
    func fieldSet(named name: String, kind: HTTP1KnownField) -> HTTP1FieldSet {
        var set = HTTP1FieldSet()
        guard !entries.isEmpty else { return set }
        if kind != .other {
            entries.withUnsafeBufferPointer { entries in
                for i in entries.indices where entries[i].known == kind { set.insert(i) }
            }
            return set
        }
        name.withContiguousUTF8 { scanOtherLines(named: UnsafeRawBufferPointer($0)) { i, _ in set.insert(i) } }
        return set
    }

    /// `fieldSet(named:kind:)` of a name the parser does not tag
    /// (`HTTP1KnownField.other`), given as its UTF-8 bytes, as the set's
    /// one word (`HTTP1FieldSet.low`); nil for a head of more than 64 lines.
    @inline(__always)
    func otherFieldLines(named name: UnsafeRawBufferPointer) -> UInt64? {
        guard entries.count <= 64 else { return nil }
        var set: UInt64 = 0
        scanOtherLines(named: name) { i, _ in set |= 1 << UInt64(i) }
        return set
    }

    /// `fieldSet(named:kind: .other)`, the first of those lines' value
    /// handed to `body` in the same pass (nil when there is none), read in
    /// place (ExchangePlugins.withRequestHeaderClearing). `name` is one the
    /// parser does not tag, so its lines are untagged ones.
    @inline(__always)
    func otherFieldSet(named name: String, firstValue body: (UnsafeRawBufferPointer?) -> Void) -> HTTP1FieldSet {
        var set = HTTP1FieldSet()
        name.withContiguousUTF8 { n in
            var first: UnsafeRawBufferPointer? = nil
            scanOtherLines(named: UnsafeRawBufferPointer(n), { i, value in
                set.insert(i)
                if first == nil { first = value }
            }, then: { body(first) })
        }
        return set
    }

    /// The one scan behind the lookups of an untagged name (`HTTP1KnownField.other`,
    /// UTF-8, ASCII case-insensitive): `visit` gets each such line's index
    /// and value bytes, in order; then `then` runs, while those bytes are
    /// still valid.
    @inline(__always)
    private func scanOtherLines(named name: UnsafeRawBufferPointer, _ visit: (Int, UnsafeRawBufferPointer) -> Void,
                                then: () -> Void = {}) {
        guard !entries.isEmpty, let np = name.baseAddress?.assumingMemoryBound(to: UInt8.self), name.count > 0 else {
            return then()
        }
        entries.withUnsafeBufferPointer { entries in
            bytes.withUnsafeReadableBytes { raw in
                let base = raw.bindMemory(to: UInt8.self).baseAddress!
                for i in entries.indices {
                    let e = entries[i]
                    guard e.known == .other, Int(e.nameLength) == name.count,
                          HTTP1Bytes.equalsIgnoringCase(base + Int(e.nameStart), np, name.count) else { continue }
                    visit(i, UnsafeRawBufferPointer(start: base + Int(e.valueStart), count: Int(e.valueLength)))
                }
                then()
            }
        }
    }

    /// `fieldSet(named:kind:)` of two names the parser does not tag
    /// (`HTTP1KnownField.other`), in one pass over the index.
    @inline(__always)
    func otherFieldSets(named first: String, _ second: String) -> (HTTP1FieldSet, HTTP1FieldSet) {
        var sets = (HTTP1FieldSet(), HTTP1FieldSet())
        guard !entries.isEmpty else { return sets }
        first.withContiguousUTF8 { a in
            second.withContiguousUTF8 { b in
                guard let ap = a.baseAddress, let bp = b.baseAddress else { return }
                entries.withUnsafeBufferPointer { entries in
                    bytes.withUnsafeReadableBytes { raw in
                        let base = raw.bindMemory(to: UInt8.self).baseAddress!
                        for i in entries.indices {
                            let e = entries[i]
                            guard e.known == .other else { continue }
                            let length = Int(e.nameLength)
                            if length == a.count && HTTP1Bytes.equalsIgnoringCase(base + Int(e.nameStart), ap, length) {
                                sets.0.insert(i)
                            } else if length == b.count && HTTP1Bytes.equalsIgnoringCase(base + Int(e.nameStart), bp, length) {
                                sets.1.insert(i)
                            }
                        }
                    }
                }
            }
        }
        return sets
    }

    /// Indices of the fields named `name` (ASCII case-insensitive), compared
    /// in place: no lower-cased copy of either side.
    func indices(named name: String) -> [Int] {
        var name = name
        return name.withUTF8 { n -> [Int] in
            guard let np = n.baseAddress, n.count > 0 else { return [] }
            return bytes.withUnsafeReadableBytes { raw -> [Int] in
                let base = raw.bindMemory(to: UInt8.self).baseAddress!
                var found: [Int] = []
                for (i, e) in entries.enumerated() where Int(e.nameLength) == n.count {
                    if HTTP1Bytes.equalsIgnoringCase(base + Int(e.nameStart), np, n.count) {
                        found.append(i)
                    }
                }
                return found
            }
        }
    }

    /// First value for `name`, as a String (allocates).
    public func first(named name: String) -> String? {
        firstIndex(named: name).map { value(at: $0) }
    }

    /// All (name, value) pairs as Strings: for plugins and tests, not the hot path.
    public func pairs() -> [(name: String, value: String)] {
        (0..<count).map { (name(at: $0), value(at: $0)) }
    }
}

/// Byte-level helpers shared by the parsers.
enum HTTP1Bytes {
    static let cr: UInt8 = 0x0D
    static let lf: UInt8 = 0x0A
    static let sp: UInt8 = 0x20
    static let htab: UInt8 = 0x09
    static let colon: UInt8 = 0x3A

    /// RFC 9110 tchar by byte value, as '1'/'0' characters: a StaticString
    /// is a constant in the binary (no lazy global initialisation per access).
    static let tcharTable: StaticString = "0000000000000000000000000000000001011111001101101111111111000000011111111111111111111111111000111111111111111111111111111110101000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"

    @inline(__always)
    static func isTChar(_ b: UInt8) -> Bool {
        tcharTable.utf8Start[Int(b)] == 0x31
    }

    /// For 8 bytes loaded little-endian: 0 when all are SP or visible ASCII
    /// (0x20...0x7E). Otherwise the lowest set bit is in the first byte that
    /// is not (CTL, HTAB, CR, DEL or obs-text); higher bits may be spurious
    /// (borrows/carries), so only the first is used.
    @inline(__always)
    static func nonPlainBytes(_ word: UInt64) -> UInt64 {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        let below20 = (word &- ones &* 0x20) & ~word & highs
        let above7E = ((word &+ ones) | word) & highs
        return below20 | above7E
    }

    /// For 8 bytes loaded little-endian: 0 when all are ASCII letters,
    /// digits or '-' (what nearly every field name is made of). Otherwise
    /// the lowest set bit is in the first byte that is not; exact per byte
    /// (each byte's 7 low bits are tested alone: no carries between bytes).
    /// A name's other tchars ('_', '.', ...) are left to `isTChar`.
    @inline(__always)
    static func nonNameBytes(_ word: UInt64) -> UInt64 {
        let low7: UInt64 = 0x7F7F_7F7F_7F7F_7F7F
        let highs: UInt64 = 0x8080_8080_8080_8080
        let ones: UInt64 = 0x0101_0101_0101_0101
        let x = word & low7
        // Letters: folded to lower case, in 0x61...0x7A.
        let folded = x | (ones &* 0x20)
        let letter = (folded &+ ones &* (0x80 - 0x61)) & ~(folded &+ ones &* (0x7F - 0x7A))
        // Digits: 0x30...0x39.
        let digit = (x &+ ones &* (0x80 - 0x30)) & ~(x &+ ones &* (0x7F - 0x39))
        // '-': the byte XOR 0x2D is zero.
        let y = x ^ (ones &* 0x2D)
        let dash = ~((y &+ low7) | y)
        let good = (letter | digit | dash) & ~word & highs
        return ~good & highs
    }

    /// field-vchar / SP / HTAB / obs-text: everything except CTLs and DEL.
    @inline(__always)
    static func isFieldValueByte(_ b: UInt8) -> Bool {
        b >= 0x20 ? b != 0x7F : b == 0x09
    }

    @inline(__always)
    static func isWhitespace(_ b: UInt8) -> Bool { b == sp || b == htab }

    /// Offset of the first LF in `n` bytes at `p`, nil if none.
    @inline(__always)
    static func findLF(_ p: UnsafePointer<UInt8>, _ n: Int) -> Int? {
        guard n > 0, let hit = memchr(p, Int32(lf), n) else { return nil }
        return UnsafeRawPointer(p).distance(to: UnsafeRawPointer(hit))
    }

    /// End of a head's first line (request or status line: the offset just
    /// past its CRLF), nil when no LF has arrived yet. Throws for a bare LF
    /// or a line longer than the limit. Shared by both heads' one-pass parse.
    @inline(__always)
    static func startLineEnd(_ p: UnsafePointer<UInt8>, _ n: Int, limits: HTTP1Limits) throws -> Int? {
        guard let lfOffset = findLF(p, n) else { return nil }
        guard lfOffset > 0, p[lfOffset - 1] == cr else { throw HTTP1ParseError.bareLF }
        if lfOffset - 1 > limits.maxStartLineBytes { throw HTTP1ParseError.startLineTooLong }
        return lfOffset + 1
    }

    /// Compares `n` bytes at `p` with a lowercase ASCII literal, ignoring case
    /// of `p`'s letters (the literal holds only letters, digits and '-').
    /// Byte for byte `p[i] | 0x20 == literal[i]`; every such literal byte
    /// already has 0x20 set, so a word compare `x | 0x20… == y | 0x20…` is
    /// the same test (the zero bytes a narrow load widens to agree too). A
    /// per-byte loop cost ~10 instructions a byte on every field name the
    /// parser classifies.
    @inline(__always)
    static func equalsLower(_ p: UnsafePointer<UInt8>, _ n: Int, _ literal: StaticString) -> Bool {
        guard n == literal.utf8CodeUnitCount else { return false }
        return wordwiseEqual(UnsafeRawPointer(p), UnsafeRawPointer(literal.utf8Start), n) { x, y in
            x | 0x2020_2020_2020_2020 == y | 0x2020_2020_2020_2020
        }
    }

    /// `n` bytes at `a` and `b` compared a word at a time by `same` (given
    /// two words of up to 8 bytes each, zero-extended when narrower): two
    /// overlapping loads cover any length from 2 to 16, longer runs take 8
    /// bytes per step. Shared by `equalsLower` and `equalsIgnoringCase`.
    @inline(__always)
    static func wordwiseEqual(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ n: Int,
                              _ same: (UInt64, UInt64) -> Bool) -> Bool {
        @inline(__always) func same16(_ o: Int) -> Bool {
            same(UInt64(a.loadUnaligned(fromByteOffset: o, as: UInt16.self)),
                 UInt64(b.loadUnaligned(fromByteOffset: o, as: UInt16.self)))
        }
        @inline(__always) func same32(_ o: Int) -> Bool {
            same(UInt64(a.loadUnaligned(fromByteOffset: o, as: UInt32.self)),
                 UInt64(b.loadUnaligned(fromByteOffset: o, as: UInt32.self)))
        }
        @inline(__always) func same64(_ o: Int) -> Bool {
            same(a.loadUnaligned(fromByteOffset: o, as: UInt64.self), b.loadUnaligned(fromByteOffset: o, as: UInt64.self))
        }
        switch n {
        case ..<1: return true
        case 1: return same(UInt64(a.load(as: UInt8.self)), UInt64(b.load(as: UInt8.self)))
        case 2...3: return same16(0) && same16(n - 2)
        case 4...7: return same32(0) && same32(n - 4)
        default:
            var i = 0
            while i + 8 < n {
                if !same64(i) { return false }
                i += 8
            }
            return same64(n - 8)
        }
    }

    static func equalsLower(_ p: UnsafePointer<UInt8>, _ lowered: UnsafeBufferPointer<UInt8>) -> Bool {
        for i in 0..<lowered.count {
            let a = p[i], b = lowered[i]
            if a != b && !(a >= 0x41 && a <= 0x5A && a | 0x20 == b) { return false }
        }
        return true
    }

    /// Calls `body` with each comma-separated element of a list value
    /// (RFC 9110 §5.6.1), whitespace trimmed, empty elements skipped.
    @inline(__always)
    static func forEachListElement(_ p: UnsafePointer<UInt8>, _ n: Int,
                                   _ body: (UnsafePointer<UInt8>, Int) throws -> Void) rethrows {
        var i = 0
        while i < n {
            var start = i
            while i < n && p[i] != 0x2C { i += 1 }
            var end = i
            while start < end && isWhitespace(p[start]) { start += 1 }
            while end > start && isWhitespace(p[end - 1]) { end -= 1 }
            if end > start { try body(p + start, end - start) }
            i += 1
        }
    }
}

/// Finds the end of a head (or trailer section) across reads, linearly: it
/// remembers how far it has looked, and enforces the size limits while the
/// bytes arrive, so an endless head is refused before it is buffered.
struct HTTP1HeadScanner {
    /// Whether the section starts with a start line (heads) or directly with
    /// field lines (trailers).
    let hasStartLine: Bool
    /// Bytes from the section start already searched for an LF.
    private var scanned = 0
    /// Start of the line being scanned.
    private var lineStart = 0
    /// End of the start line (past its CRLF), once seen.
    private var startLineEnd = -1
    /// Field lines seen so far (the count limit).
    private(set) var fieldLines = 0

    init(hasStartLine: Bool) {
        self.hasStartLine = hasStartLine
        if !hasStartLine { startLineEnd = 0 }
    }

    mutating func reset() { self = HTTP1HeadScanner(hasStartLine: hasStartLine) }

    /// Nothing of the current section scanned yet (its first read).
    var isFresh: Bool { scanned == 0 }

    /// Returns the section's length (through the empty line's CRLF) once it is
    /// complete, nil while more bytes are needed.
    mutating func scan(_ raw: UnsafeRawBufferPointer, limits: HTTP1Limits) throws -> Int? {
        let count = raw.count
        guard count > 0 else { return nil }
        let p = raw.bindMemory(to: UInt8.self).baseAddress!
        while scanned < count {
            guard let found = HTTP1Bytes.findLF(p + scanned, count - scanned) else {
                scanned = count
                break
            }
            let lf = scanned + found
            guard lf > 0, p[lf - 1] == HTTP1Bytes.cr else { throw HTTP1ParseError.bareLF }
            let lineLength = lf - 1 - lineStart
            if startLineEnd < 0 {
                if lineLength > limits.maxStartLineBytes { throw HTTP1ParseError.startLineTooLong }
                startLineEnd = lf + 1
            } else if lineLength == 0 {
                return lf + 1
            } else {
                fieldLines += 1
                if fieldLines > limits.maxFieldCount { throw HTTP1ParseError.tooManyFields }
                if lf + 1 - startLineEnd > limits.maxFieldBytes { throw HTTP1ParseError.headerSectionTooLarge }
            }
            lineStart = lf + 1
            scanned = lf + 1
        }
        // Incomplete: refuse as soon as the partial line already breaks a limit.
        if startLineEnd < 0 {
            if count - lineStart > limits.maxStartLineBytes + 1 { throw HTTP1ParseError.startLineTooLong }
        } else if count - startLineEnd > limits.maxFieldBytes + 2 {
            throw HTTP1ParseError.headerSectionTooLarge
        }
        return nil
    }

}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Framing facts gathered from the field lines in the same pass.
struct HTTP1FramingFacts {
    var contentLength: Int? = nil
    var contentLengthCount = 0
    var transferEncodingCount = 0
    /// Codings in order across all Transfer-Encoding lines, summarised.
    var codings = 0
    var lastCodingIsChunked = false
    var chunkedSeenBeforeLast = false
    var connectionClose = false
    var connectionKeepAlive = false
    var connectionUpgrade = false
    /// Connection lists names other than close/keep-alive/upgrade.
    var connectionNamesOthers = false
    var hostCount = 0
    var expectContinue = false
    var teTrailersOnly = true
    var teLines = 0
}

/// Parses and validates the field lines from `start` through the empty
/// line, finding each line's end as it goes: one pass over the bytes (the
/// whole head is usually in the first read; `HTTP1HeadScanner` only waits
/// for the rest when it is not). Returns the offset just past the empty
/// line's CRLF, or nil when the `available` bytes end before it. Enforces
/// the scanner's limits (field count, field section bytes from `start`) on
/// every complete line, so a complete head is refused for the same reasons.
/// Plain lines take `scanPlainFieldLine` (no search for the LF first);
/// every other line `parseFieldLineChecked`, which alone decides errors
/// (`HTTP1FieldLinesTests` requires the two ways to agree on any bytes).
@inline(__always)
func parseFieldLines(_ p: UnsafePointer<UInt8>, from start: Int, available: Int, limits: HTTP1Limits,
                     entries: inout [HTTP1FieldEntry], facts: inout HTTP1FramingFacts) throws -> Int? {
    var line = start
    while true {
        var step = try scanPlainFieldLine(p, at: line, from: start, available: available, limits: limits,
                                          entries: &entries, facts: &facts)
        if case .irregular = step {
            step = try parseFieldLineChecked(p, at: line, from: start, available: available, limits: limits,
                                             entries: &entries, facts: &facts)
        }
        switch step {
        case .field(let next): line = next
        case .headEnd(let end): return end
        case .incomplete, .irregular: return nil   // (the checked parse never answers .irregular)
        }
    }
}

/// What parsing one field line found.
enum HTTP1FieldLineStep {
    /// A field line, recorded; the next line starts at `next`.
    case field(next: Int)
    /// The empty line: the head ends at this offset.
    case headEnd(Int)
    /// The line's LF has not arrived.
    case incomplete
    /// Not a plain line (`scanPlainFieldLine` only): parse it checked.
    case irregular
}

/// The usual field line, parsed without first searching for its LF (a
/// `memchr` call per line): a token name, `:`, spaces, then SP / visible
/// ASCII up to CR LF, all within `available`; the LF is found where the
/// value's 8-byte validation stops. Anything else (HTAB, obs-text, a
/// malformed or incomplete line) is `.irregular` and left, untouched, to
/// `parseFieldLineChecked`, so errors and their order stay exactly its
/// own. A plain line can only fail the limits, checked as for every line.
@inline(__always)
func scanPlainFieldLine(_ p: UnsafePointer<UInt8>, at line: Int, from start: Int, available: Int, limits: HTTP1Limits,
                        entries: inout [HTTP1FieldEntry], facts: inout HTTP1FramingFacts) throws -> HTTP1FieldLineStep {
    var i = line
    guard i + 1 < available else { return .irregular }
    if p[i] == HTTP1Bytes.cr { return p[i + 1] == HTTP1Bytes.lf ? .headEnd(i + 2) : .irregular }
    // The name: letters, digits and '-' 8 bytes per step, then byte by byte
    // (other tchars, and the colon the name must end at).
    while i + 8 <= available {
        let other = HTTP1Bytes.nonNameBytes(UInt64(littleEndian: UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self)))
        if other != 0 { i &+= other.trailingZeroBitCount >> 3; break }
        i &+= 8
    }
    while i < available && HTTP1Bytes.isTChar(p[i]) { i &+= 1 }
    let nameLength = i - line
    guard nameLength > 0, i < available, p[i] == HTTP1Bytes.colon else { return .irregular }
    i &+= 1
    while i < available && p[i] == HTTP1Bytes.sp { i &+= 1 }
    let valueStart = i
    // SP and visible ASCII, 8 bytes per step; the first byte that is not
    // one of them must be the line's CR.
    while i + 8 <= available {
        let flags = HTTP1Bytes.nonPlainBytes(UInt64(littleEndian: UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self)))
        if flags != 0 { i &+= flags.trailingZeroBitCount >> 3; break }
        i &+= 8
    }
    while i < available && p[i] >= HTTP1Bytes.sp && p[i] < 0x7F { i &+= 1 }
    guard i + 1 < available, p[i] == HTTP1Bytes.cr, p[i + 1] == HTTP1Bytes.lf else { return .irregular }
    let lineEnd = i + 2
    if entries.count >= limits.maxFieldCount { throw HTTP1ParseError.tooManyFields }
    if lineEnd - start > limits.maxFieldBytes { throw HTTP1ParseError.headerSectionTooLarge }
    var valueEnd = i
    while valueEnd > valueStart && p[valueEnd - 1] == HTTP1Bytes.sp { valueEnd -= 1 }
    try recordFieldLine(p, line: line, nameLength: nameLength, valueStart: valueStart, valueEnd: valueEnd,
                        lineEnd: lineEnd, entries: &entries, facts: &facts)
    return .field(next: lineEnd)
}

/// One field line with every check, in the order that decides which error
/// a malformed line gets: the LF first (`.incomplete` until it arrives),
/// then the limits, then name, value and the framing fields.
func parseFieldLineChecked(_ p: UnsafePointer<UInt8>, at line: Int, from start: Int, available: Int, limits: HTTP1Limits,
                           entries: inout [HTTP1FieldEntry], facts: inout HTTP1FramingFacts) throws -> HTTP1FieldLineStep {
    guard let lfOffset = HTTP1Bytes.findLF(p + line, available - line) else { return .incomplete }
    let lineEnd = line + lfOffset + 1
    let cr = lineEnd - 2
    guard lfOffset > 0, p[cr] == HTTP1Bytes.cr else { throw HTTP1ParseError.bareLF }
    if cr == line { return .headEnd(lineEnd) }
    if entries.count >= limits.maxFieldCount { throw HTTP1ParseError.tooManyFields }
    if lineEnd - start > limits.maxFieldBytes { throw HTTP1ParseError.headerSectionTooLarge }
    // The line's only LF is at `cr + 1`: every loop below stops at `cr` at the latest.
    var i = line
    let first = p[i]
    if HTTP1Bytes.isWhitespace(first) { throw HTTP1ParseError.obsoleteLineFolding }
    while HTTP1Bytes.isTChar(p[i]) { i &+= 1 }
    let nameLength = i - line
    if p[i] != HTTP1Bytes.colon {
        if HTTP1Bytes.isWhitespace(p[i]) { throw HTTP1ParseError.whitespaceBeforeColon }
        if p[i] == HTTP1Bytes.cr && p[i + 1] != HTTP1Bytes.lf { throw HTTP1ParseError.bareCR }
        throw HTTP1ParseError.invalidFieldName
    }
    if nameLength == 0 { throw HTTP1ParseError.invalidFieldName }
    i += 1
    while HTTP1Bytes.isWhitespace(p[i]) { i &+= 1 }
    let valueStart = i
    // Validate up to the line's CR, 8 bytes per step while they are SP or
    // visible ASCII (a load may reach past the line within `available`:
    // the CR is flagged, so nothing after it is looked at); the exact
    // byte check handles the first flagged byte (HTAB, obs-text, or an
    // error) and the last few bytes of the buffer.
    while true {
        if i + 8 <= available {
            let flags = HTTP1Bytes.nonPlainBytes(UInt64(littleEndian: UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self)))
            if flags == 0 { i &+= 8; continue }
            i &+= flags.trailingZeroBitCount >> 3
        }
        if i >= cr { break }
        let b = p[i]
        if HTTP1Bytes.isFieldValueByte(b) { i &+= 1; continue }
        // A CR before the line's own is not followed by an LF.
        throw b == HTTP1Bytes.cr ? HTTP1ParseError.bareCR : HTTP1ParseError.invalidFieldValue
    }
    var valueEnd = cr
    while valueEnd > valueStart && HTTP1Bytes.isWhitespace(p[valueEnd - 1]) { valueEnd -= 1 }
    try recordFieldLine(p, line: line, nameLength: nameLength, valueStart: valueStart, valueEnd: valueEnd,
                        lineEnd: lineEnd, entries: &entries, facts: &facts)
    return .field(next: lineEnd)
}

/// A parsed field line into the head's index (and its framing facts).
@inline(__always)
func recordFieldLine(_ p: UnsafePointer<UInt8>, line: Int, nameLength: Int, valueStart: Int, valueEnd: Int, lineEnd: Int,
                     entries: inout [HTTP1FieldEntry], facts: inout HTTP1FramingFacts) throws {
    let known = HTTP1KnownField.classify(p + line, nameLength)
    let valueLength = valueEnd - valueStart
    switch known {
    case .host, .contentLength, .transferEncoding, .connection, .expect, .te:
        try noteKnownField(known, p + valueStart, valueLength, &facts)
    default:
        break
    }
    // Offsets fit: a head is bounded by `limits`, far below 2 GiB (no range checks).
    entries.append(HTTP1FieldEntry(nameStart: Int32(truncatingIfNeeded: line),
                                   nameLength: Int32(truncatingIfNeeded: nameLength),
                                   valueStart: Int32(truncatingIfNeeded: valueStart),
                                   valueLength: Int32(truncatingIfNeeded: valueLength),
                                   lineEnd: Int32(truncatingIfNeeded: lineEnd), known: known))
}

func noteKnownField(_ known: HTTP1KnownField, _ v: UnsafePointer<UInt8>, _ n: Int,
                            _ facts: inout HTTP1FramingFacts) throws {
    switch known {
    case .host:
        facts.hostCount += 1
    case .contentLength:
        facts.contentLengthCount += 1
        // The usual value, one plain number: no list split.
        if n > 0 && n <= 18 {
            var value = 0
            var k = 0
            while k < n {
                let d = v[k] &- 0x30
                if d > 9 { break }
                value = value &* 10 &+ Int(d)
                k &+= 1
            }
            if k == n {
                if let previous = facts.contentLength {
                    throw previous == value ? HTTP1ParseError.duplicateContentLength : HTTP1ParseError.conflictingContentLength
                }
                facts.contentLength = value
                return
            }
        }
        var sawElement = false
        // RFC 9110 §8.6 lets a recipient accept repeated identical lengths;
        // like nginx and llhttp we refuse any repetition: the head is
        // forwarded line by line and one length is unambiguous downstream.
        try HTTP1Bytes.forEachListElement(v, n) { e, len in
            sawElement = true
            guard len <= 18 else { throw HTTP1ParseError.invalidContentLength }
            var value = 0
            for k in 0..<len {
                let d = e[k] &- 0x30
                guard d <= 9 else { throw HTTP1ParseError.invalidContentLength }
                value = value * 10 + Int(d)
            }
            if let previous = facts.contentLength {
                throw previous == value ? HTTP1ParseError.duplicateContentLength : HTTP1ParseError.conflictingContentLength
            }
            facts.contentLength = value
        }
        if !sawElement { throw HTTP1ParseError.invalidContentLength }
    case .transferEncoding:
        facts.transferEncodingCount += 1
        HTTP1Bytes.forEachListElement(v, n) { e, len in
            if facts.lastCodingIsChunked { facts.chunkedSeenBeforeLast = true }
            facts.codings += 1
            facts.lastCodingIsChunked = HTTP1Bytes.equalsLower(e, len, "chunked")
        }
    case .connection:
        // The usual values, one token: no list split.
        if HTTP1Bytes.equalsLower(v, n, "keep-alive") { facts.connectionKeepAlive = true; return }
        if HTTP1Bytes.equalsLower(v, n, "close") { facts.connectionClose = true; return }
        HTTP1Bytes.forEachListElement(v, n) { e, len in
            if HTTP1Bytes.equalsLower(e, len, "close") { facts.connectionClose = true }
            else if HTTP1Bytes.equalsLower(e, len, "keep-alive") { facts.connectionKeepAlive = true }
            else if HTTP1Bytes.equalsLower(e, len, "upgrade") { facts.connectionUpgrade = true }
            else { facts.connectionNamesOthers = true }
        }
    case .expect:
        if HTTP1Bytes.equalsLower(v, n, "100-continue") { facts.expectContinue = true }
    case .te:
        facts.teLines += 1
        HTTP1Bytes.forEachListElement(v, n) { e, len in
            if !HTTP1Bytes.equalsLower(e, len, "trailers") { facts.teTrailersOnly = false }
        }
    default:
        break
    }
}
