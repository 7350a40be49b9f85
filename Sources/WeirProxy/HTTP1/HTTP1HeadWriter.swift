import NIOCore

/// A field line a forwarded head gets appended. A struct, not a
/// `(name:, value:)` tuple: an array of tuples is destroyed through the
/// runtime's generic tuple witnesses, one call per element and field (~1 k
/// instructions per request for the upstream head's added lines, callgrind).
public struct HTTP1AddedField: Sendable, Equatable {
    public var name: String
    public var value: String

    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// Changes to a head on its way through the proxy.
public struct HTTP1HeadEdits: Sendable {
    /// Field lines (by index) not to forward.
    public var removed = HTTP1FieldSet()
    /// Fields appended after the kept ones, in order.
    public var added: [HTTP1AddedField] = []
    /// Replaces the request target (requests only).
    public var target: String? = nil

    public init(removed: HTTP1FieldSet = HTTP1FieldSet(), added: [HTTP1AddedField] = [], target: String? = nil) {
        self.removed = removed
        self.added = added
        self.target = target
    }
}

extension HTTP1Fields {
    /// The hop-by-hop fields of this section (RFC 9110 §7.6.1): Connection and
    /// every field it names, Keep-Alive, Proxy-Connection, Trailer,
    /// Transfer-Encoding, Upgrade (unless `keepUpgrade`, for a tunnel) and TE
    /// (unless its only element is `trailers`, which may be forwarded).
    public func hopByHopFields(keepUpgrade: Bool = false) -> HTTP1FieldSet {
        var set = HTTP1FieldSet()
        for (i, e) in entries.enumerated() where e.known.isHopByHop {
            switch e.known {
            case .upgrade where keepUpgrade:
                continue
            case .te:
                let onlyTrailers = withValueBytes(at: i) { v -> Bool in
                    var only = true, any = false
                    HTTP1Bytes.forEachListElement(v.bindMemory(to: UInt8.self).baseAddress!, v.count) { p, n in
                        any = true
                        if !HTTP1Bytes.equalsLower(p, n, "trailers") { only = false }
                    }
                    return only && any
                }
                if onlyTrailers { continue }
            default:
                break
            }
            set.insert(i)
        }
        guard connectionNamesOtherFields else { return set }
        // Names listed in Connection (rare beyond close/keep-alive/upgrade): compare bytes.
        bytes.withUnsafeReadableBytes { raw in
            let base = raw.bindMemory(to: UInt8.self).baseAddress!
            for ce in entries where ce.known == .connection {
                HTTP1Bytes.forEachListElement(base + Int(ce.valueStart), Int(ce.valueLength)) { token, tokenLength in
                    for (i, e) in entries.enumerated() where Int(e.nameLength) == tokenLength && !set.contains(i) {
                        if keepUpgrade && e.known == .upgrade { continue }
                        if HTTP1Bytes.equalsIgnoringCase(base + Int(e.nameStart), token, tokenLength) { set.insert(i) }
                    }
                }
            }
        }
        return set
    }

    /// Every field of a kind (e.g. to drop client-supplied X-Forwarded-For).
    public func indices(of kind: HTTP1KnownField) -> HTTP1FieldSet {
        var set = HTTP1FieldSet()
        for (i, e) in entries.enumerated() where e.known == kind { set.insert(i) }
        return set
    }
}

extension HTTP1Bytes {
    /// `n` bytes at `a` and at `b` equal with ASCII letters compared
    /// without case (any other byte exactly). A word at a time
    /// (`wordwiseEqual`), both sides lower-cased in the word
    /// (`foldASCIIUpper`). The byte loop it replaces cost ~19
    /// instructions a byte (a plugin's `get_header` of "apikey": ~115 of
    /// its ~175, callgrind).
    static func equalsIgnoringCase(_ a: UnsafePointer<UInt8>, _ b: UnsafePointer<UInt8>, _ n: Int) -> Bool {
        wordwiseEqual(UnsafeRawPointer(a), UnsafeRawPointer(b), n) { x, y in
            x == y || foldASCIIUpper(x) == foldASCIIUpper(y)
        }
    }

    /// Each byte of `x` that is an ASCII capital ('A'...'Z') lower-cased,
    /// every other byte (bytes >= 0x80 too) as it is. Per byte, with the
    /// top bit cleared first so no sum carries into the next byte:
    /// h + 0x3F has its top bit set when h >= 0x41, h + 0x25 when h >= 0x5B.
    @inline(__always)
    static func foldASCIIUpper(_ x: UInt64) -> UInt64 {
        let h = x & 0x7F7F_7F7F_7F7F_7F7F
        let capital = (h &+ 0x3F3F_3F3F_3F3F_3F3F) & ~(h &+ 0x2525_2525_2525_2525) & ~x & 0x8080_8080_8080_8080
        return x | (capital >> 2)
    }
}

/// Writes forwarded heads by copying the original bytes: consecutive kept
/// field lines go out as one range copy; only edits are serialised.
public enum HTTP1HeadWriter {
    /// `<method> <target> HTTP/1.1\r\n`, kept fields, added fields, `\r\n`.
    /// The version is always 1.1: the proxy speaks 1.1 to every upstream.
    /// The whole head goes out as one reserved region: each separate
    /// ByteBuffer write costs ~150 instructions in NIO (callgrind).
    /// `method` replaces the client's (a plugin's `set_method`); it is a
    /// parameter, not part of `HTTP1HeadEdits`, because every field the
    /// edits carry is copied and released on every request (callgrind).
    /// `borrowing`: the head and edits are read where they are (they live
    /// in the exchange's objects), never copied and released.
    public static func writeRequest(_ head: borrowing HTTP1RequestHead, edits: borrowing HTTP1HeadEdits, method: String? = nil,
                                    into out: inout ByteBuffer) {
        writeRequest(head, edits: edits, method: method, tailBytes: 0, into: &out) { _, _ in }
    }

    /// `writeRequest` with lines the caller writes itself after the added
    /// fields: the proxy's own upstream lines (Host, X-Forwarded-*, Via,
    /// X-Request-Id) as bytes, without a String or an `HTTP1AddedField`
    /// each (`UpstreamOwnFields`). `writeTail` gets the writer and the
    /// head's bytes (to copy client values from) and must write exactly
    /// `tailBytes`.
    @inline(__always) // into its hot callers: the head is read in place, not copied
    static func writeRequest(_ head: borrowing HTTP1RequestHead, edits: borrowing HTTP1HeadEdits, method: String?,
                             tailBytes: Int, into out: inout ByteBuffer,
                             writeTail: (inout RawWriter, UnsafeRawPointer) -> Void) {
        let fields = head.fields
        // Without a new method or target, method SP target are copied as one range.
        let copiesRequestLine = method == nil && edits.target == nil
        let methodBytes = method.map { $0.utf8.count + 1 } ?? head.methodLength + 1
        let targetBytes = edits.target?.utf8.count ?? head.targetRange.count
        let size = (copiesRequestLine ? head.targetRange.upperBound : methodBytes + targetBytes) + 11
            + keptLineBytes(fields, removing: edits.removed)
            + (edits.added.isEmpty ? 0 : addedFieldBytes(edits.added)) + tailBytes + 2
        out.writeReserved(capacity: size) { dst in
            var w = RawWriter(dst)
            fields.bytes.withUnsafeReadableBytes { src in
                if copiesRequestLine {
                    w.copy(src.baseAddress!, head.targetRange.upperBound)
                } else {
                    if let method { w.copy(method); w.copy(" ") } else { w.copy(src.baseAddress!, methodBytes) }
                    if let target = edits.target {
                        w.copy(target)
                    } else {
                        w.copy(src.baseAddress! + head.targetRange.lowerBound, targetBytes)
                    }
                }
                w.copy(" HTTP/1.1\r\n")
                w.copyKeptLines(fields.entries, src.baseAddress!, removing: edits.removed)
                if !edits.added.isEmpty { w.copyAdded(edits.added) }
                writeTail(&w, src.baseAddress!)
            }
            w.copy("\r\n")
            precondition(w.offset == size, "forwarded head size miscounted")
            return w.offset
        }
    }

    /// `HTTP/1.1 <status> <reason>\r\n` (status and reason copied unless
    /// `status` replaces them: a plugin's `weir.response.set_status`), kept
    /// and added fields, `\r\n`.
    public static func writeResponse(_ head: HTTP1ResponseHead, edits: HTTP1HeadEdits,
                                     status: (code: Int, reason: String)? = nil, into out: inout ByteBuffer) {
        writeResponse(head, removed: edits.removed, added: edits.added, status: status, tailBytes: 0, into: &out) { _, _ in }
    }

    /// `writeResponse` with lines the caller writes itself after the added
    /// fields: the proxy's own lines (Via, framing, Connection) as bytes,
    /// without a String or an `HTTP1AddedField` per response. `writeTail`
    /// gets the writer and the head's bytes (to copy upstream values from)
    /// and must write exactly `tailBytes`.
    static func writeResponse(_ head: HTTP1ResponseHead, removed: HTTP1FieldSet, added: [HTTP1AddedField],
                              status: (code: Int, reason: String)?, tailBytes: Int, into out: inout ByteBuffer,
                              writeTail: (inout RawWriter, UnsafeRawPointer) -> Void) {
        let fields = head.fields
        let statusLineEnd = head.reasonRange.upperBound + 2
        // From the SP after the version through the status line's CRLF, or its replacement.
        let newStatusLine = status.map { " \($0.code) \($0.reason)\r\n" }
        let statusLineBytes = 8 + (newStatusLine?.utf8.count ?? statusLineEnd - 8)
        let size = statusLineBytes + keptLineBytes(fields, removing: removed)
            + (added.isEmpty ? 0 : addedFieldBytes(added)) + tailBytes + 2
        // NIO's writer here (not `writeReserved`): with it this function is
        // no longer inlined into `relayWireResponseHead`, which then copies
        // the head (callgrind: +220 instructions per response).
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { dst in
            var w = RawWriter(dst.baseAddress!)
            w.copy("HTTP/1.1")
            fields.bytes.withUnsafeReadableBytes { src in
                if let newStatusLine { w.copy(newStatusLine) } else { w.copy(src.baseAddress! + 8, statusLineEnd - 8) }
                w.copyKeptLines(fields.entries, src.baseAddress!, removing: removed)
                if !added.isEmpty { w.copyAdded(added) }
                writeTail(&w, src.baseAddress!)
            }
            w.copy("\r\n")
            precondition(w.offset == size, "forwarded head size miscounted")
            return w.offset
        }
    }

    /// A parsed head's field lines are contiguous (each starts where the
    /// previous one's CRLF ends), so the kept bytes are the whole field
    /// section less the removed lines: a step per removed line, not per line.
    private static func keptLineBytes(_ fields: HTTP1Fields, removing: HTTP1FieldSet) -> Int {
        fields.entries.withUnsafeBufferPointer { entries in
            guard let first = entries.first, let last = entries.last else { return 0 }
            var total = Int(last.lineEnd - first.nameStart)
            removing.forEachIndex(below: entries.count) { i in total -= Int(entries[i].lineEnd - entries[i].nameStart) }
            return total
        }
    }

    private static func addedFieldBytes(_ added: [HTTP1AddedField]) -> Int {
        var total = 0
        // Through the buffer: the elements are read in place, not copied (retained) one by one.
        added.withUnsafeBufferPointer { fields in
            for i in fields.indices { total += fields[i].name.utf8.count + fields[i].value.utf8.count + 4 }
        }
        return total
    }

    /// Copies into memory already reserved for the total (also used by
    /// HTTP2ServerStream for the HTTP/1.1 form of an HTTP/2 request head).
    struct RawWriter {
        let base: UnsafeMutableRawPointer
        var offset = 0
        init(_ base: UnsafeMutableRawPointer) { self.base = base }

        @inline(__always)
        mutating func copy(_ src: UnsafeRawPointer, _ n: Int) {
            (base + offset).copyMemory(from: src, byteCount: n)
            offset += n
        }

        @inline(__always)
        mutating func copy(_ s: StaticString) { copy(s.utf8Start, s.utf8CodeUnitCount) }

        /// Disfavoured: without it a literal (`w.copy(": ")`) picks this
        /// overload (String is the default literal type) and every literal
        /// costs a String's flag checks and a call (~45 instructions) where
        /// the StaticString one is an inlined copy.
        @_disfavoredOverload
        mutating func copy(_ s: String) {
            let n = s.utf8.count
            guard n > 0 else { return }
            if s.utf8.withContiguousStorageIfAvailable({ copy($0.baseAddress!, n) }) == nil {
                for b in s.utf8 { base.storeBytes(of: b, toByteOffset: offset, as: UInt8.self); offset += 1 }
            }
        }

        mutating func copyAdded(_ added: [HTTP1AddedField]) {
            added.withUnsafeBufferPointer { fields in
                for i in fields.indices { copyField(fields[i]) }
            }
        }

        private mutating func copyField(_ field: HTTP1AddedField) {
            copy(field.name)
            copy(": ")
            copy(field.value)
            copy("\r\n")
        }

        /// The kept lines of a parsed head (its field lines are contiguous):
        /// each run between removed lines goes out as one copy, found from
        /// the removed indices alone (a step per removed line, not per line).
        mutating func copyKeptLines(_ entries: [HTTP1FieldEntry], _ src: UnsafeRawPointer, removing: HTTP1FieldSet) {
            entries.withUnsafeBufferPointer { entries in
                guard let first = entries.first, let last = entries.last else { return }
                var runStart = Int(first.nameStart)
                removing.forEachIndex(below: entries.count) { i in
                    let removed = entries[i]
                    copy(src + runStart, Int(removed.nameStart) - runStart)
                    runStart = Int(removed.lineEnd)
                }
                copy(src + runStart, Int(last.lineEnd) - runStart)
            }
        }
    }

    public static func writeRequestLine(_ head: HTTP1RequestHead, target: String?, into out: inout ByteBuffer) {
        head.bytes.withUnsafeReadableBytes { raw in
            if let target {
                out.writeBytes(UnsafeRawBufferPointer(rebasing: raw[0..<head.methodLength + 1])) // method SP
                out.writeString(target)
            } else {
                // Method, SP and the target are contiguous in the original.
                out.writeBytes(UnsafeRawBufferPointer(rebasing: raw[0..<head.targetRange.upperBound]))
            }
        }
        out.writeStaticString(" HTTP/1.1\r\n")
    }

    public static func writeStatusLine(_ head: HTTP1ResponseHead, into out: inout ByteBuffer) {
        out.writeStaticString("HTTP/1.1")
        // From the SP after the version through the status line's CRLF.
        head.bytes.withUnsafeReadableBytes { raw in
            out.writeBytes(UnsafeRawBufferPointer(rebasing: raw[8..<head.reasonRange.upperBound + 2]))
        }
    }

    /// Copies every field line not in `removing`, coalescing runs of kept
    /// lines into one copy each.
    public static func writeFields(_ fields: HTTP1Fields, removing: HTTP1FieldSet, into out: inout ByteBuffer) {
        let entries = fields.entries
        guard !entries.isEmpty else { return }
        fields.bytes.withUnsafeReadableBytes { raw in
            var runStart = -1
            var runEnd = 0
            for i in entries.indices {
                let e = entries[i]
                if removing.contains(i) {
                    if runStart >= 0 { out.writeBytes(UnsafeRawBufferPointer(rebasing: raw[runStart..<runEnd])); runStart = -1 }
                } else {
                    if runStart < 0 { runStart = Int(e.nameStart) }
                    runEnd = Int(e.lineEnd)
                }
            }
            if runStart >= 0 { out.writeBytes(UnsafeRawBufferPointer(rebasing: raw[runStart..<runEnd])) }
        }
    }

    /// `name: value\r\n`. The caller guarantees a valid token and value
    /// (no CR/LF): these come from the proxy's config and plugins' setters.
    @inline(__always)
    public static func writeField(name: String, value: String, into out: inout ByteBuffer) {
        out.writeString(name)
        out.writeInteger(UInt16(0x3A20)) // ": "
        out.writeString(value)
        out.writeInteger(UInt16(0x0D0A))
    }
}
