import NIOCore
import NIOHTTP1
import WeirCore
import WeirLua

// Plugins' header changes as an edit list over a head that stays in its
// wire bytes: a field a plugin clears or replaces becomes a removed line
// index, a field it sets or adds an added line. The forwarded head is then
// written by `HTTP1HeadWriter`'s range copy, as without plugins; no field
// is turned into a String unless a plugin reads it. (Materialising the head
// as NIO's `HTTPHeaders` and re-serialising it cost ~40 k instructions per
// request under callgrind; see BENCHMARKS.md.)
//
// Plugin-set names and values reach the wire through these edits and the
// writer does not check them: the Lua SDK does, once per Lua string (a name
// that is not a token or a value with CR/LF/NUL never gets here; a
// `set_header` of such a value only clears: PluginRequestContext), and the
// proxy's own edits are constants.

/// What plugins changed on the upstream's response head: its field lines
/// and perhaps its status line (`weir.response.set_status`).
struct ResponseHeadChanges {
    private(set) var edits = HTTP1HeadEdits()
    var status: (code: Int, reason: String)?
    /// Some added line is Via, Date or hop-by-hop: the relay then looks at
    /// each (chains a Via, drops a hop-by-hop one); otherwise it writes
    /// `edits.added` as it is. Kept as lines are added, from the kind of
    /// name worked out for the lookup anyway.
    private(set) var addedNeedReview = false
    /// Some change named Content-Length (set, added or cleared): only then
    /// does the relay look the edited head up for it; otherwise the
    /// upstream's own Content-Length lines stand (found in its pass over
    /// the fields anyway).
    private(set) var touchesContentLength = false
    /// A prepared set's lines as written (PendingResponseHeaders.wireLines),
    /// after `edits.added` (empty then): the relay copies them as they are.
    /// Only when no response phase runs (ExchangePlugins.responseChangesWithoutResponsePhase);
    /// names the proxy gives no meaning to.
    private(set) var wireLines: [UInt8] = []

    init() {}

    /// The added lines' and wire lines' arrays, for their storage once the
    /// changes are spent (ExchangePlugins.recycle).
    mutating func withAddedStorage(_ body: (inout [HTTP1AddedField], inout [UInt8]) -> Void) { body(&edits.added, &wireLines) }

    /// The request phase's changes, taken out of `pending` (left empty):
    /// its added lines are moved, not copied (with the copies at the end of
    /// the response phase, ~1 k instructions per response: BENCHMARKS.md, pair2).
    /// `keepingWire` false: a prepared set's wire lines become `edits.added`
    /// lines (the response phase reads and edits those).
    init(taking pending: inout PendingResponseHeaders, on fields: HTTP1Fields, keepingWire: Bool = false) {
        take(&pending, on: fields, keepingWire: keepingWire)
    }

    /// `init(taking:)` into these changes, which are empty (`empty()`):
    /// the changes ExchangePlugins keeps and lends to the relay are filled
    /// in place, none made and destroyed per response.
    mutating func take(_ pending: inout PendingResponseHeaders, on fields: HTTP1Fields, keepingWire: Bool) {
        if !keepingWire { pending.materializeWireLines() }
        addedNeedReview = pending.addedNeedReview
        touchesContentLength = pending.touchesContentLength
        pending.moveEdits(into: &edits, wire: &wireLines, on: fields)
    }

    /// No change again, keeping the storage these changes still hold (after
    /// `withAddedStorage` lent it back). Each part is stored only when it
    /// holds something: a store over an empty value still releases it.
    mutating func empty() {
        // Line by line: removeAll(keepingCapacity:) destroys through the type's metadata.
        while !edits.added.isEmpty { edits.added.removeLast() }
        if !wireLines.isEmpty { wireLines.removeAll(keepingCapacity: true) }
        if !edits.removed.high.isEmpty { edits.removed = HTTP1FieldSet() } else { edits.removed.low = 0 }
        if edits.target != nil { edits.target = nil }
        if status != nil { status = nil }
        addedNeedReview = false
        touchesContentLength = false
    }

    /// Each of `wireLines` as name and value bytes.
    func forEachWireLine(_ body: (_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> Void) {
        wireLines.withUnsafeBytes { PreparedHeaderLines.forEachLine(inWire: $0, body) }
    }

    /// `set_header`: every line of that name goes, then one is added.
    mutating func setField(_ name: String, _ value: String, in fields: HTTP1Fields) {
        let kind = HTTP1KnownField.classify(name)
        edits.removeFields(named: name, kind: kind, in: fields)
        add(name, value, kind)
    }

    /// `add_header`: one more line, after the kept ones.
    mutating func addField(_ name: String, _ value: String) {
        add(name, value, HTTP1KnownField.classify(name))
    }

    mutating func removeFields(named name: String, in fields: HTTP1Fields) {
        let kind = HTTP1KnownField.classify(name)
        if kind == .contentLength { touchesContentLength = true }
        edits.removeFields(named: name, kind: kind, in: fields)
    }

    private mutating func add(_ name: String, _ value: String, _ kind: HTTP1KnownField) {
        if kind.isReviewedByRelay { addedNeedReview = true }
        if kind == .contentLength { touchesContentLength = true }
        edits.addField(name, value)
    }
}

extension HTTP1KnownField {
    /// A plugin-added response line of this kind is not written as it is
    /// (DownstreamHandler.relayWireResponseHead).
    var isReviewedByRelay: Bool { self == .via || self == .date || isHopByHop }
}

/// Response header changes plugins make before any response exists (the
/// request phase: rate-limiting's RateLimit headers), kept as their result
/// rather than as a list of operations: the lines to add, and which names'
/// lines in the response go. `set` = clear + add, so a set or clear drops
/// the earlier added lines of its name here, once; applying them to the
/// upstream's head is then one pass over its fields, which compares names
/// only for an untagged field whose length a removed name has, and no
/// checks (names and values come checked from the SDK:
/// PluginRequestContext). The common case, a few `set`s of distinct names,
/// is one array and a bit per line; a prepared set into empty changes
/// (rate-limiting's five lines) is their bytes as written.
struct PendingResponseHeaders {
    /// Lines added after the response's kept ones, in order.
    private(set) var added: [HTTP1AddedField] = []
    /// A prepared set's lines as written (`name: value\r\n` each), when it
    /// went into empty changes and names no field the proxy gives meaning to
    /// (`HTTP1KnownField.other`: none is reviewed by the relay or frames the
    /// body): the relay copies them in one go, no String per line made,
    /// copied or freed (~1.5 k instructions per request: BENCHMARKS.md,
    /// pair4). Every line replaces its name's lines (a `set`). Any other
    /// change first makes them `added` lines (`materializeWireLines`).
    private(set) var wireLines: [UInt8] = []
    /// A relayed response's wire-line storage (`reuseStorage`) with its old
    /// bytes still in: not lines of these changes. A prepared set of the same
    /// length (rate-limiting's, request after request) is copied over them,
    /// without Array's append (~110 instructions) or emptying (~80).
    private var spareWire: [UInt8] = []
    /// Bit i: `added[i]` came from a `set`, so the response's own lines of
    /// its name go (lines past the 64th record that in `clearedNames`).
    private var replacing: UInt64 = 0
    /// Names whose lines in the response go without a `set` line standing
    /// for them: `clear_header`, and sets past the 64th line.
    private var clearedNames: [String] = []
    /// See ResponseHeadChanges.addedNeedReview.
    private(set) var addedNeedReview = false
    /// Bit `count % 64` of every name seen: a name whose bit is clear has
    /// no line here and was not cleared, so most calls compare no names.
    private var nameLengths: UInt64 = 0
    /// What `edits(on:)` looks for in the response, of every name set or
    /// cleared (a name's lines never come back once it was): bit
    /// `count % 64` of the untagged ones, bit `rawValue` of the tagged ones
    /// (`HTTP1KnownField`: the parser tags a field by the same bytes).
    private var removedLengths: UInt64 = 0
    private var removedKinds: UInt64 = 0

    var isEmpty: Bool { added.isEmpty && clearedNames.isEmpty && wireLines.isEmpty }

    /// Some line set, added or cleared here is named Content-Length.
    var touchesContentLength: Bool {
        removedKinds & (1 << UInt64(HTTP1KnownField.contentLength.rawValue)) != 0 || addsContentLength
    }
    /// An `add` of Content-Length (a `set` or `clear` marks `removedKinds`).
    private var addsContentLength = false

    mutating func set(_ name: String, _ value: String) {
        if !wireLines.isEmpty { materializeWireLines() }
        if !isFirstOfItsLength(name) { dropAdded(named: name) }
        if added.count >= 64 { clearedNames.append(name) } else { replacing |= 1 << UInt64(added.count) }
        let kind = HTTP1KnownField.classify(name)
        noteRemoved(name, kind)
        append(name, value, kind)
    }

    /// `set` of each prepared line in order (`weir.response.prepare_headers`;
    /// `wire`: the lines as written). Into empty changes (the first plugin
    /// to touch the response, the common case) they go in at once: their
    /// names are distinct, so none drops another and no name is compared;
    /// as their bytes when no name is a field the proxy gives meaning to.
    mutating func set(_ lines: PreparedHeaderLines, wire: UnsafeRawBufferPointer) {
        guard isEmpty else {
            return PreparedHeaderLines.forEachLine(inWire: wire) { set($0, $1) }
        }
        let count = lines.names.count                     // <= PreparedHeaderLines.maxLines (32)
        // The names' bits, worked out on the set's first use and kept with it.
        let masks = lines.derivedMasks ?? Self.masks(of: lines)
        nameLengths |= masks.a
        removedLengths |= masks.b
        removedKinds |= masks.c
        if masks.flags == 0 {
            if spareWire.capacity != 0 {
                swap(&wireLines, &spareWire)                 // wireLines is empty here (isEmpty)
                if wireLines.count == wire.count {
                    wireLines.withUnsafeMutableBytes { $0.copyMemory(from: wire) }
                    return
                }
                wireLines.removeAll(keepingCapacity: true)
            }
            if wireLines.capacity < wire.count { wireLines.reserveCapacity(max(256, wire.count)) }
            wireLines.append(contentsOf: wire)
            return
        }
        if masks.flags & 1 != 0 { addedNeedReview = true }
        added.reserveCapacity(max(8, count))
        PreparedHeaderLines.forEachLine(inWire: wire) { added.append(HTTP1AddedField(name: $0, value: $1)) }
        replacing = (1 << UInt64(count)) - 1
    }

    /// The wire lines as `added` lines (each a `set`), for a change or a
    /// reader that takes lines one by one.
    mutating func materializeWireLines() {
        guard !wireLines.isEmpty else { return }
        assert(added.isEmpty && clearedNames.isEmpty, "wire lines are only the first changes")
        wireLines.withUnsafeBytes { wire in
            PreparedHeaderLines.forEachLine(inWire: wire) { added.append(HTTP1AddedField(name: $0, value: $1)) }
        }
        replacing = added.count >= 64 ? .max : (1 << UInt64(added.count)) - 1
        wireLines.removeAll(keepingCapacity: true)
    }

    /// A prepared set's `nameLengths`, `removedLengths` and `removedKinds`
    /// bits, and whether a line is reviewed by the relay (flags 1), kept
    /// with the set.
    private static func masks(of lines: PreparedHeaderLines) -> PreparedHeaderLines.DerivedMasks {
        var scratch = PendingResponseHeaders()
        for name in lines.names {
            scratch.nameLengths |= 1 << UInt64(name.utf8.count & 63)
            let kind = HTTP1KnownField.classify(name)
            scratch.noteRemoved(name, kind)
            if kind.isReviewedByRelay { scratch.addedNeedReview = true }
        }
        let masks = PreparedHeaderLines.DerivedMasks(scratch.nameLengths, scratch.removedLengths, scratch.removedKinds,
                                                     flags: (scratch.addedNeedReview ? 1 : 0) | (scratch.removedKinds != 0 ? 2 : 0))
        lines.derivedMasks = masks
        return masks
    }

    mutating func add(_ name: String, _ value: String) {
        if !wireLines.isEmpty { materializeWireLines() }
        _ = isFirstOfItsLength(name)
        let kind = HTTP1KnownField.classify(name)
        if kind == .contentLength { addsContentLength = true }
        append(name, value, kind)
    }

    mutating func clear(_ name: String) {
        if !wireLines.isEmpty { materializeWireLines() }
        noteRemoved(name, HTTP1KnownField.classify(name))
        if !isFirstOfItsLength(name) {
            dropAdded(named: name)
            if clearedNames.contains(where: { Self.sameLowercasedName($0, name) }) { return }
        }
        clearedNames.append(name)
    }

    @inline(__always)
    private mutating func noteRemoved(_ name: String, _ kind: HTTP1KnownField) {
        if kind == .other { removedLengths |= 1 << UInt64(name.utf8.count & 63) } else { removedKinds |= 1 << UInt64(kind.rawValue) }
    }

    /// The edits these changes make to the upstream's head: the added
    /// lines, and every field of a set or cleared name removed (what
    /// `fieldSet(named:)` of each such name would find, in one pass).
    func edits(on fields: HTTP1Fields) -> HTTP1HeadEdits {
        var lines = self
        lines.materializeWireLines()
        var edits = HTTP1HeadEdits(added: lines.added)
        edits.removed = removedFields(in: fields)
        return edits
    }

    /// The storage of a relayed response's added lines (emptied here) for
    /// `added`, so the next request's lines go in without an allocation
    /// (and the relayed array is not freed): only into headers that hold
    /// no storage.
    mutating func reuseStorage(_ storage: inout [HTTP1AddedField], wire: inout [UInt8]) {
        if added.isEmpty, added.capacity == 0, storage.capacity != 0 {
            // Line by line: removeAll(keepingCapacity:) destroys through the type's metadata.
            while !storage.isEmpty { storage.removeLast() }
            swap(&added, &storage)
        }
        // Kept with its bytes (emptied only if the next set's length differs).
        if wireLines.isEmpty, wireLines.capacity == 0, spareWire.capacity == 0, wire.capacity != 0 {
            swap(&spareWire, &wire)
        }
    }

    /// `edits(on:)` into `edits` (made empty first), the added lines and
    /// the wire lines moved out of here; these changes are empty afterwards.
    mutating func moveEdits(into edits: inout HTTP1HeadEdits, wire: inout [UInt8], on fields: HTTP1Fields) {
        edits.removed = removedFields(in: fields)
        if edits.target != nil { edits.target = nil }
        if edits.added.capacity != 0 { edits.added.removeAll() }
        swap(&edits.added, &added)
        if wire.capacity != 0 { wire.removeAll() }
        swap(&wire, &wireLines)
        // Emptied field by field: a new value stored over this one released
        // each array, empty ones too (~100 instructions per response).
        // `added` and `wireLines` are empty arrays now (swapped in above);
        // a spare is dropped, as a new value would.
        replacing = 0
        if !clearedNames.isEmpty { clearedNames = [] }
        if spareWire.capacity != 0 { spareWire = [] }
        addedNeedReview = false
        nameLengths = 0
        removedLengths = 0
        removedKinds = 0
        addsContentLength = false
    }

    /// The response's lines of every set or cleared name.
    private func removedFields(in fields: HTTP1Fields) -> HTTP1FieldSet {
        var removed = HTTP1FieldSet()
        guard removedLengths | removedKinds != 0 else { return removed }
        fields.entries.withUnsafeBufferPointer { entries in
            for i in entries.indices {
                let e = entries[i]
                if e.known != .other {
                    if removedKinds & (1 << UInt64(e.known.rawValue)) != 0 { removed.insert(i) }
                } else if removedLengths & (1 << UInt64(Int(e.nameLength) & 63)) != 0, removesUntagged(e, in: fields) {
                    removed.insert(i)
                }
            }
        }
        return removed
    }

    /// Whether an untagged field is named by a set (`replacing`) or cleared name.
    private func removesUntagged(_ e: HTTP1FieldEntry, in fields: HTTP1Fields) -> Bool {
        fields.bytes.withUnsafeReadableBytes { raw in
            let field = raw.baseAddress!.assumingMemoryBound(to: UInt8.self) + Int(e.nameStart)
            let length = Int(e.nameLength)
            func names(_ name: String) -> Bool {
                name.utf8.count == length && name.withContiguousUTF8 { n in
                    n.baseAddress.map { HTTP1Bytes.equalsIgnoringCase(field, $0, length) } ?? false
                }
            }
            var bits = replacing
            while bits != 0 {
                if names(added[bits.trailingZeroBitCount].name) { return true }
                bits &= bits - 1
            }
            if !wireLines.isEmpty {
                var found = false
                wireLines.withUnsafeBytes { wire in
                    PreparedHeaderLines.forEachLine(inWire: wire) { name, _ in
                        if !found, name.count == length { found = HTTP1Bytes.equalsIgnoringCase(field, name.baseAddress!.assumingMemoryBound(to: UInt8.self), length) }
                    }
                }
                if found { return true }
            }
            return clearedNames.contains(where: names)
        }
    }

    /// The same changes on a head the proxy makes (an error, a plugin's exit).
    func apply(to headers: inout HTTPHeaders) {
        guard wireLines.isEmpty else {
            var lines = self
            lines.materializeWireLines()
            return lines.apply(to: &headers)
        }
        var bits = replacing
        while bits != 0 {
            headers.remove(name: added[bits.trailingZeroBitCount].name)
            bits &= bits - 1
        }
        for name in clearedNames { headers.remove(name: name) }
        for field in added { headers.add(name: field.name, value: field.value) }
    }

    private mutating func append(_ name: String, _ value: String, _ kind: HTTP1KnownField) {
        if kind.isReviewedByRelay { addedNeedReview = true }
        // One allocation for a plugin's handful (rate-limiting sets 5).
        if added.isEmpty { added.reserveCapacity(8) }
        added.append(HTTP1AddedField(name: name, value: value))
    }

    /// Marks the length of `name` seen; false if it was seen before (then
    /// the name may have lines here: compare).
    private mutating func isFirstOfItsLength(_ name: String) -> Bool {
        let bit: UInt64 = 1 << UInt64(name.utf8.count & 63)
        defer { nameLengths |= bit }
        return nameLengths & bit == 0
    }

    /// Drops the added lines of `name` (a later set or clear of it), keeping
    /// the others' `replacing` bits with them.
    private mutating func dropAdded(named name: String) {
        guard added.contains(where: { Self.sameLowercasedName($0.name, name) }) else { return }
        var kept: [HTTP1AddedField] = []
        kept.reserveCapacity(added.count)
        var keptReplacing: UInt64 = 0
        for (i, field) in added.enumerated() where !Self.sameLowercasedName(field.name, name) {
            if i < 64, replacing & (1 << UInt64(i)) != 0 { keptReplacing |= 1 << UInt64(kept.count) }
            kept.append(field)
        }
        added = kept
        replacing = keptReplacing
    }

    /// Names the SDK passes are lower-case: equal bytes, the count first
    /// (most names differ in length).
    @inline(__always)
    private static func sameLowercasedName(_ a: String, _ b: String) -> Bool {
        a.utf8.count == b.utf8.count && a == b
    }
}

extension HTTP1HeadEdits {
    /// `set_header`: every line of that name goes, then one is added.
    mutating func setField(_ name: String, _ value: String, in fields: HTTP1Fields) {
        removeFields(named: name, in: fields)
        addField(name, value)
    }

    /// `add_header`: one more line, after the kept ones (a checked name and value).
    mutating func addField(_ name: String, _ value: String) {
        assert(HeadSerialization.isToken(name) && HeadSerialization.isValidFieldValue(value), "unchecked header \(name)")
        added.append(HTTP1AddedField(name: name, value: value))
    }

    /// `clear_header`: the original lines of that name (by index, compared
    /// on the bytes) and any added ones.
    mutating func removeFields(named name: String, in fields: HTTP1Fields) {
        removeFields(named: name, kind: HTTP1KnownField.classify(name), in: fields)
    }

    /// `removeFields(named:in:)` for a name already classified.
    mutating func removeFields(named name: String, kind: HTTP1KnownField, in fields: HTTP1Fields) {
        removeFields(named: name, lines: fields.fieldSet(named: name, kind: kind))
    }

    /// `removeFields(named:in:)` with the original lines of that name
    /// already looked up (`HTTP1Fields.fieldSet(named:)`, `RequestHead.fieldSet`).
    mutating func removeFields(named name: String, lines named: HTTP1FieldSet) {
        if !named.isEmpty { removed.formUnion(named) }
        if hasAddedField(named: name) { added.removeAll { $0.name.equalsIgnoringASCIICase(name) } }
    }

    /// `set_header` with the original lines already looked up: those lines
    /// and any added ones of the name go, then one is added.
    mutating func replaceFields(named name: String, lines named: HTTP1FieldSet, with value: String) {
        removeFields(named: name, lines: named)
        addField(name, value)
    }

    /// Whether some added line is named `name` (ASCII case-insensitive).
    /// Lengths first, on each name's stored count: the proxy's own lines
    /// (Host, X-Forwarded-*, Via, X-Request-Id) are usually all there and
    /// rarely share a plugin's name's length; a byte comparison per line
    /// (`equalsIgnoringASCIICase`, a call each) cost ~60 instructions a line.
    @inline(__always)
    func hasAddedField(named name: String) -> Bool {
        guard !added.isEmpty else { return false }
        let count = name.utf8.count
        return added.withUnsafeBufferPointer { fields in
            for field in fields where field.name.utf8.count == count && field.name.equalsIgnoringASCIICase(name) { return true }
            return false
        }
    }

    /// The first value of `name` in the edited head: kept original lines
    /// first (in order), then added ones, as the head will be written.
    func firstValue(named name: String, in fields: HTTP1Fields) -> String? {
        let named = fields.fieldSet(named: name)
        if !named.isEmpty {
            for i in 0..<fields.count where named.contains(i) && !removed.contains(i) { return fields.value(at: i) }
        }
        return added.first { $0.name.equalsIgnoringASCIICase(name) }?.value
    }

    /// Whether the edited head has a line named `name`.
    func hasField(named name: String, in fields: HTTP1Fields) -> Bool {
        if !fields.fieldSet(named: name).isSubset(of: removed) { return true }
        return added.contains { $0.name.equalsIgnoringASCIICase(name) }
    }

    /// Every line of the edited head, names lower-cased (`get_headers`).
    func fieldPairs(in fields: HTTP1Fields) -> [(name: String, value: String)] {
        var pairs: [(name: String, value: String)] = []
        pairs.reserveCapacity(fields.count + added.count)
        for i in 0..<fields.count where !removed.contains(i) {
            pairs.append((name: fields.name(at: i).lowercased(), value: fields.value(at: i)))
        }
        for field in added { pairs.append((name: field.name.lowercased(), value: field.value)) }
        return pairs
    }

    /// The upstream request's Host on each attempt (the target's label).
    /// The proxy puts Host first in `added`; a plugin's `set_header("host")`
    /// moved it (the target's label still wins, as for every attempt).
    mutating func replaceHost(_ value: String) {
        if let first = added.first, first.name == "host" {
            added[0].value = value
            return
        }
        added.removeAll { $0.name.equalsIgnoringASCIICase("host") }
        added.insert(HTTP1AddedField(name: "host", value: value), at: 0)
    }
}

extension HTTP1KnownField {
    /// The kind of a plugin-added field (the downstream rewriting drops
    /// hop-by-hop ones and joins a Via to the chain).
    static func classify(_ name: String) -> HTTP1KnownField {
        name.withContiguousUTF8 { bytes in bytes.baseAddress.map { classify($0, bytes.count) } ?? .other }
    }
}

extension String {
    /// ASCII case-insensitive equality (header names), on contiguous bytes
    /// (iterating `utf8` costs ~30 instructions a byte under callgrind).
    func equalsIgnoringASCIICase(_ other: String) -> Bool {
        guard utf8.count == other.utf8.count else { return false }
        return withContiguousUTF8 { pa in
            other.withContiguousUTF8 { pb in
                guard let x = pa.baseAddress, let y = pb.baseAddress else { return true }
                return HTTP1Bytes.equalsIgnoringCase(x, y, pa.count)
            }
        }
    }
}

/// A request target a plugin set (`set_path`, `set_query`): it goes into
/// the request line as is, so anything that would end or split that line
/// (SP, CR, LF, other controls) refuses it.
func isValidRequestTarget(_ target: String) -> Bool {
    guard !target.isEmpty else { return false }
    for byte in target.utf8 where byte <= 0x20 || byte == 0x7F { return false }
    return true
}

/// Plugins' header changes to the upstream request while the proxy still
/// writes its own lines as bytes (no edit list made: `UpstreamOwnFields`):
/// the client lines they drop and the lines they add, the added ones kept
/// as the wire bytes they will be (`name: value\r\n`, made once per call)
/// so the writer copies them in one go after the proxy's own lines. A
/// header set therefore costs neither the edit list of the proxy's own
/// lines (~670 instructions) nor a String line the writer walks again.
///
/// Only names the proxy gives no meaning to (`HTTP1KnownField.other`) come
/// here: a set, add or clear of any other name (Host, Via, X-Forwarded-*,
/// framing, hop-by-hop), and any read of the upstream request, make the
/// edit list, which takes these over (`move(into:)`), after the proxy's
/// own lines as they would have been. Names come lower-case from the SDK
/// (PluginRequestContext), so they are compared as they are.
struct PluginUpstreamLines {
    /// Client lines (by index) not forwarded.
    private(set) var removed = HTTP1FieldSet()
    /// The added lines, in order, as they are written: the first
    /// `byteCount` bytes of `storage`. The array keeps its size from
    /// request to request and a line is written into it in place (an
    /// append of a line made on the stack cost ~180 instructions a line).
    /// Where each line and its value start is not kept: the rare paths
    /// that need it (a clear of an added name, the edit list taking the
    /// lines over) read it back from the bytes (`lines`), where a
    /// list of the lines cost an append per line and emptying per request
    /// (~50 instructions per request for the chain's one line).
    private var storage: [UInt8] = []
    private(set) var byteCount = 0

    /// Where an added line and its value start in `storage` (its name is
    /// `storage[start..<valueStart - 2]`).
    private struct Line {
        var start: Int
        var valueStart: Int
        var end: Int

        /// The name's length.
        var nameCount: Int { valueStart - 2 - start }
    }

    /// The added lines' bytes, a copy (tests).
    var bytes: [UInt8] { Array(storage[0..<byteCount]) }

    /// The added lines' bytes, read in place.
    func withBytes<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        storage.withUnsafeBytes { body(UnsafeRawBufferPointer(rebasing: $0[0..<byteCount])) }
    }

    /// `set_header`: the client's `lines` of the name and any added line of
    /// it go, then one is added.
    mutating func set(_ name: String, _ value: String, clientLines: HTTP1FieldSet) {
        clear(name, clientLines: clientLines)
        add(name, value)
    }

    /// `set` from the name's and value's UTF-8 bytes (`name` is the same
    /// name as a String, for `clear`).
    /// `clientLines`: the client's lines of the name, all below 64 (the
    /// set's one word).
    mutating func set(_ name: String, nameBytes: UnsafeRawBufferPointer, valueBytes: UnsafeRawBufferPointer,
                      clientLines: UInt64) {
        removed.low |= clientLines
        if byteCount != 0 { removeAdded(name) }
        add(nameBytes: nameBytes, valueBytes: valueBytes)
    }

    /// `add_header` (a checked name and value).
    mutating func add(_ name: String, _ value: String) {
        name.withContiguousUTF8 { n in
            value.withContiguousUTF8 { v in add(nameBytes: UnsafeRawBufferPointer(n), valueBytes: UnsafeRawBufferPointer(v)) }
        }
    }

    /// `add` of a name and value given as their UTF-8 bytes (checked, the
    /// name lower-case): one copy each into `storage`.
    mutating func add(nameBytes name: UnsafeRawBufferPointer, valueBytes value: UnsafeRawBufferPointer) {
        assert(HTTPFieldSyntax.isToken(name) && HTTPFieldSyntax.isValidFieldValue(value), "unchecked header")
        let start = byteCount
        let valueStart = start + name.count + 2
        let end = valueStart + value.count + 2
        if storage.count < end { grow(to: end) }
        storage.withUnsafeMutableBytes { buffer in
            let base = buffer.baseAddress!
            if let n = name.baseAddress { (base + start).copyMemory(from: n, byteCount: name.count) }
            base.storeBytes(of: 0x3A, toByteOffset: valueStart - 2, as: UInt8.self)     // ": "
            base.storeBytes(of: 0x20, toByteOffset: valueStart - 1, as: UInt8.self)
            if let v = value.baseAddress { (base + valueStart).copyMemory(from: v, byteCount: value.count) }
            base.storeBytes(of: 0x0D, toByteOffset: end - 2, as: UInt8.self)
            base.storeBytes(of: 0x0A, toByteOffset: end - 1, as: UInt8.self)
        }
        byteCount = end
    }

    /// Room for `size` bytes in `storage` (at least 128, doubling).
    @inline(never)
    private mutating func grow(to size: Int) {
        storage.append(contentsOf: repeatElement(0, count: max(128, 2 * size) - storage.count))
    }

    /// `clear_header`: the client's `lines` of the name and any added line of it.
    /// Inlined: usually neither exists (key-auth's key header is the client's
    /// line at most; identify clears names no plugin added), a call and its
    /// arguments' copies cost ~60 instructions.
    @inline(__always)
    mutating func clear(_ name: String, clientLines: HTTP1FieldSet) {
        if !clientLines.isEmpty { removed.formUnion(clientLines) }
        if byteCount != 0 { removeAdded(name) }
    }

    /// The added lines named `name` removed.
    @inline(never)
    private mutating func removeAdded(_ name: String) {
        let lines = self.lines
        guard lines.contains(where: { named($0, name) }) else { return }
        var kept: [UInt8] = []
        kept.reserveCapacity(storage.count)
        var keptLines: [Line] = []
        for line in lines where !named(line, name) {
            let shift = kept.count - line.start
            kept.append(contentsOf: storage[line.start..<line.end])
            keptLines.append(Line(start: line.start + shift, valueStart: line.valueStart + shift, end: line.end + shift))
        }
        byteCount = kept.count
        kept.append(contentsOf: repeatElement(0, count: storage.count - kept.count))
        storage = kept
        assert(self.lines.count == keptLines.count, "the kept lines read back as written")
    }

    /// The added lines, read back from `storage`: a name is a token (no
    /// ':'), followed by ": "; a value has no CR (both checked before a
    /// line is added), followed by CRLF.
    private var lines: [Line] {
        var lines: [Line] = []
        storage.withUnsafeBufferPointer { s in
            var start = 0
            while start < byteCount {
                var colon = start
                while s[colon] != 0x3A { colon += 1 }
                var cr = colon + 2
                while s[cr] != 0x0D { cr += 1 }
                lines.append(Line(start: start, valueStart: colon + 2, end: cr + 2))
                start = cr + 2
            }
        }
        return lines
    }

    /// The edit list takes these changes over (it was just made: the
    /// proxy's own lines are its added lines so far); these are left empty.
    mutating func move(into edits: inout HTTP1HeadEdits) {
        edits.removed.formUnion(removed)
        for line in lines {
            edits.added.append(HTTP1AddedField(name: String(decoding: storage[line.start..<(line.valueStart - 2)], as: UTF8.self),
                                               value: String(decoding: storage[line.valueStart..<(line.end - 2)], as: UTF8.self)))
        }
        reset()
    }

    /// Empty again, keeping the arrays' storage for the next request.
    mutating func reset() {
        // An empty set stored over an empty one still releases its array:
        // only a set with lines past 64 gets a new one.
        if !removed.high.isEmpty { removed = HTTP1FieldSet() } else { removed.low = 0 }
        byteCount = 0
    }

    /// Whether `line` is named `name` (the same bytes: names come lower-cased).
    @inline(__always)
    private func named(_ line: Line, _ name: String) -> Bool {
        name.withContiguousUTF8 { n in
            guard n.count == line.nameCount else { return false }
            return storage.withUnsafeBufferPointer { s in
                for i in 0..<n.count where s[line.start + i] != n[i] { return false }
                return true
            }
        }
    }
}

extension RequestHead {
    /// The client's lines named `name`, classified already (`HTTP1Fields.fieldSet(named:kind:)`), read in place.
    @inline(__always)
    func fieldSet(named name: String, kind: HTTP1KnownField) -> HTTP1FieldSet { wire.fields.fieldSet(named: name, kind: kind) }
    /// The client's lines of two untagged names (`HTTP1Fields.otherFieldSets`), read in place.
    @inline(__always)
    func otherFieldSets(named first: String, _ second: String) -> (HTTP1FieldSet, HTTP1FieldSet) {
        wire.fields.otherFieldSets(named: first, second)
    }
}
