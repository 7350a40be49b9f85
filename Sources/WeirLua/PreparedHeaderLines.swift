import WeirCore

/// Response header lines a plugin prepares once (`weir.response.prepare_headers`)
/// and sets on many requests (`prepared:set(...)`): the names checked
/// (tokens, lower-cased, distinct) and the values that never change
/// (rate-limiting's `X-RateLimit-Limit-Minute: <limit>`) checked once, so a
/// request passes only the values that change and pays neither the name
/// checks nor the fixed values' (BENCHMARKS.md, ratelimit).
///
/// Setting them is `set_headers` of every (name, value) pair in order.
public final class PreparedHeaderLines {
    /// Lower-case tokens, distinct, in order.
    public let names: [String]
    /// The value of each line, or nil where it comes with each `set`.
    public let fixedValues: [String?]
    /// How many values a `set` passes (the nil `fixedValues`).
    public let variableCount: Int

    /// What the context that applies the lines works out once from their
    /// names and keeps here (the proxy: which response lines they replace,
    /// PendingResponseHeaders); nil until it first applies them. Used only
    /// on the set's Lua state's event loop, like the state.
    public var derivedMasks: DerivedMasks?

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
    }

    /// Each line's name and value: the fixed ones, and `values` in order
    /// for the others (`values.count == variableCount`).
    @inline(__always)
    public func forEachLine(_ values: UnsafeBufferPointer<String>, _ body: (String, String) -> Void) {
        var next = 0
        for i in names.indices {
            if let fixed = fixedValues[i] {
                body(names[i], fixed)
            } else {
                body(names[i], values[next])
                next += 1
            }
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
            sets.append(prepared)
            ids[key] = sets.count - 1
            return .success(sets.count - 1)
        }
    }

    /// The set with this id, unretained for the call (the array keeps it).
    @inline(__always)
    func withSet<R>(_ id: Int, _ body: (PreparedHeaderLines) -> R) -> R? {
        guard id >= 0, id < sets.count else { return nil }
        return sets.withUnsafeBufferPointer { Unmanaged.passUnretained($0[id])._withUnsafeGuaranteedRef(body) }
    }
}
