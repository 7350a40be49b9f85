import WeirCore

/// Response header lines a plugin prepares once (`weir.response.prepare_headers`)
/// and sets on many requests (`prepared:set(...)`): the names checked
/// (tokens, lower-cased, distinct) and the values that never change
/// (rate-limiting's `X-RateLimit-Limit-Minute: <limit>`) checked once, so a
/// request passes only the values that change and pays neither the name
/// checks nor the fixed values' (BENCHMARKS.md, ratelimit).
///
/// Setting them is `set_headers` of every (name, value) pair in order. A
/// `set` hands the request the lines as they are written
/// (`name: value\r\n` each, in order, checked): the fixed parts come from
/// `wireTemplate`, the values are written between them (an integer as its
/// digits), so a request makes no String per line (BENCHMARKS.md, pair4).
public final class PreparedHeaderLines {
    /// Lower-case tokens, distinct, in order.
    public let names: [String]
    /// The value of each line, or nil where it comes with each `set`.
    public let fixedValues: [String?]
    /// How many values a `set` passes (the nil `fixedValues`).
    public let variableCount: Int

    /// The lines' fixed bytes, cut where a value comes with each `set`:
    /// segment i (`wireTemplate[segmentEnds[i - 1]..<segmentEnds[i]]`, from
    /// 0 for the first) is written before value i; the last one, after the
    /// last value. `variableCount + 1` segments.
    public let wireTemplate: [UInt8]
    public let segmentEnds: [Int]

    /// What the context that applies the lines works out once from their
    /// names and keeps here (the proxy: which response lines they replace,
    /// PendingResponseHeaders); nil until it first applies them. Used only
    /// on the set's Lua state's event loop, like the state.
    public var derivedMasks: DerivedMasks?

    /// `flags` bit 0: some line is reviewed by the relay; bit 1: some name
    /// is a field the proxy gives meaning to (then the lines go as Strings,
    /// not as their wire bytes).
    public struct DerivedMasks {
        public var a: UInt64, b: UInt64, c: UInt64, flags: UInt64
        public init(_ a: UInt64, _ b: UInt64, _ c: UInt64, flags: UInt64) { (self.a, self.b, self.c, self.flags) = (a, b, c, flags) }
    }

    /// At most this many lines in one set (the proxy keeps a bit per line).
    public static let maxLines = 32

    /// The lines, or why they cannot be: a name that is not a token, a
    /// name given twice (case-insensitively), a fixed value with CR, LF or
    /// NUL, no lines or more than `maxLines`.
    public static func make(_ lines: [(name: String, value: String?)]) -> Result<PreparedHeaderLines, PreparedHeaderLinesError> {
        guard !lines.isEmpty else { return .failure(.init("no header lines")) }
        guard lines.count <= maxLines else { return .failure(.init("at most \(maxLines) lines, got \(lines.count)")) }
        var names: [String] = []
        for (i, line) in lines.enumerated() {
            guard HTTPFieldSyntax.isToken(line.name) else {
                return .failure(.init("line \(i + 1): '\(line.name)' is not a header name (token)"))
            }
            let name = line.name.lowercased()
            guard !names.contains(name) else { return .failure(.init("line \(i + 1): '\(name)' is given twice")) }
            if let value = line.value {
                var bytes = value
                guard bytes.withUTF8({ HTTPFieldSyntax.isValidFieldValue(UnsafeRawBufferPointer($0)) }) else {
                    return .failure(.init("line \(i + 1) ('\(name)'): the value contains CR, LF or NUL"))
                }
            }
            names.append(name)
        }
        return .success(PreparedHeaderLines(names: names, fixedValues: lines.map(\.value)))
    }

    private init(names: [String], fixedValues: [String?]) {
        self.names = names
        self.fixedValues = fixedValues
        self.variableCount = fixedValues.reduce(0) { $0 + ($1 == nil ? 1 : 0) }
        var template: [UInt8] = [], ends: [Int] = []
        var afterValue = false
        for (name, fixed) in zip(names, fixedValues) {
            if afterValue { template += [0x0D, 0x0A] }
            template += Array(name.utf8) + [0x3A, 0x20]                  // ": "
            if let fixed {
                template += Array(fixed.utf8) + [0x0D, 0x0A]
                afterValue = false
            } else {
                ends.append(template.count)
                afterValue = true
            }
        }
        if afterValue { template += [0x0D, 0x0A] }
        ends.append(template.count)
        wireTemplate = template
        segmentEnds = ends
    }

    /// The lines with `values` (the variable ones, in order, checked) as a
    /// `set` hands them to the request.
    public func wire(_ values: [String]) -> [UInt8] {
        precondition(values.count == variableCount, "expected \(variableCount) values")
        var out: [UInt8] = []
        var start = 0
        for (i, end) in segmentEnds.enumerated() {
            out += wireTemplate[start..<end]
            if i < values.count { out += Array(values[i].utf8) }
            start = end
        }
        return out
    }

    /// Each line of `wire` (what a `set` hands the request: `name: value\r\n`
    /// lines, names tokens, values without CR or LF) as its name and value bytes.
    @inline(__always)
    public static func forEachLine(inWire wire: UnsafeRawBufferPointer,
                                   _ body: (_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> Void) {
        guard let base = wire.baseAddress else { return }
        let bytes = base.assumingMemoryBound(to: UInt8.self)
        var i = 0
        while i < wire.count {
            var colon = i
            while bytes[colon] != 0x3A { colon += 1 }
            var end = colon + 2
            while bytes[end] != 0x0D { end += 1 }
            body(UnsafeRawBufferPointer(start: base + i, count: colon - i), UnsafeRawBufferPointer(start: base + colon + 2, count: end - colon - 2))
            i = end + 2
        }
    }

    /// Each line of `wire` as Strings (name, value): for the paths that
    /// take lines one by one.
    public static func forEachLine(inWire wire: UnsafeRawBufferPointer, _ body: (String, String) -> Void) {
        forEachLine(inWire: wire) { name, value in
            body(String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
        }
    }
}

public struct PreparedHeaderLinesError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// The prepared line sets of one Lua state, by id (the handle's `[1]`).
/// Preparing the same lines again answers the same id, so a plugin that
/// prepares per config (or, by mistake, per request) does not grow this;
/// distinct sets are capped (`limit`) since they live as long as the state.
final class PreparedHeaderLineSets {
    private(set) var sets: [PreparedHeaderLines] = []
    private var ids: [[String?]: Int] = [:]
    static let limit = 4096
    /// The sets again, unretained, for `withSet`: read through the array
    /// (a var of this class), a set cost a retain and release of the array
    /// per `prepared:set`. `sets` keeps them alive.
    private var unretained = UnsafeMutablePointer<Unmanaged<PreparedHeaderLines>>.allocate(capacity: 4)
    private var unretainedCapacity = 4
    private var unretainedCount = 0

    deinit { unretained.deallocate() }

    /// The id of these lines (made and checked the first time), or why not.
    func id(of lines: [(name: String, value: String?)]) -> Result<Int, PreparedHeaderLinesError> {
        let key = lines.flatMap { [$0.name.lowercased(), $0.value] }
        if let id = ids[key] { return .success(id) }
        guard sets.count < Self.limit else {
            return .failure(.init("more than \(Self.limit) distinct prepared header sets in one Lua state; prepare them once per config, not per request"))
        }
        switch PreparedHeaderLines.make(lines) {
        case .failure(let error): return .failure(error)
        case .success(let prepared):
            if sets.count == unretainedCapacity {
                let grown = UnsafeMutablePointer<Unmanaged<PreparedHeaderLines>>.allocate(capacity: 2 * unretainedCapacity)
                grown.moveInitialize(from: unretained, count: sets.count)
                unretained.deallocate()
                unretained = grown
                unretainedCapacity *= 2
            }
            (unretained + sets.count).initialize(to: Unmanaged.passUnretained(prepared))
            sets.append(prepared)
            unretainedCount = sets.count
            ids[key] = sets.count - 1
            return .success(sets.count - 1)
        }
    }

    /// The set with this id, unretained for the call (the array keeps it).
    @inline(__always)
    func withSet<R>(_ id: Int, _ body: (PreparedHeaderLines) -> R) -> R? {
        guard id >= 0, id < unretainedCount else { return nil }
        return unretained[id]._withUnsafeGuaranteedRef(body)
    }
}
