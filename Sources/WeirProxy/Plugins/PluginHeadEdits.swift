import NIOCore

// Plugins' header changes as an edit list over a head that stays in its
// wire bytes: a field a plugin clears or replaces becomes a removed line
// index, a field it sets or adds an added line. The forwarded head is then
// written by `HTTP1HeadWriter`'s range copy, as without plugins; no field
// is turned into a String unless a plugin reads it. (Materialising the head
// as NIO's `HTTPHeaders` and re-serialising it cost ~40 k instructions per
// request under callgrind; see BENCHMARKS.md.)
//
// Plugin-set names and values reach the wire through these edits and the
// writer does not check them, so they are checked here: a name that is not
// a token or a value with CR/LF/NUL is dropped (a `set_header` of such a
// value still removes the field's old lines, as `set` = clear + add).

/// What plugins changed on the upstream's response head: its field lines
/// and perhaps its status line (`weir.response.set_status`).
struct ResponseHeadChanges {
    var edits = HTTP1HeadEdits()
    var status: (code: Int, reason: String)?
}

extension HTTP1HeadEdits {
    /// `set_header`: every line of that name goes, then one is added.
    mutating func setField(_ name: String, _ value: String, in fields: HTTP1Fields) {
        removeFields(named: name, in: fields)
        addField(name, value)
    }

    /// `add_header`: one more line, after the kept ones.
    mutating func addField(_ name: String, _ value: String) {
        guard HeadSerialization.isToken(name), HeadSerialization.isValidFieldValue(value) else { return }
        added.append(HTTP1AddedField(name: name, value: value))
    }

    /// `clear_header`: the original lines of that name (by index, compared
    /// on the bytes) and any added ones.
    mutating func removeFields(named name: String, in fields: HTTP1Fields) {
        removed.formUnion(fields.fieldSet(named: name))
        if !added.isEmpty, added.contains(where: { $0.name.equalsIgnoringASCIICase(name) }) {
            added.removeAll { $0.name.equalsIgnoringASCIICase(name) }
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
        var name = name
        return name.withUTF8 { bytes in bytes.baseAddress.map { classify($0, bytes.count) } ?? .other }
    }
}

extension String {
    /// ASCII case-insensitive equality (header names), on contiguous bytes
    /// (iterating `utf8` costs ~30 instructions a byte under callgrind).
    func equalsIgnoringASCIICase(_ other: String) -> Bool {
        guard utf8.count == other.utf8.count else { return false }
        var a = self, b = other
        return a.withUTF8 { pa in
            b.withUTF8 { pb in
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
