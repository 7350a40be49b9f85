// Reads a composed YAML tree into the config model, collecting every
// problem instead of stopping at the first. Each `read*` function returns
// its best-effort value and appends issues (with config path and YAML
// line) for anything wrong; ConfigLoader throws once reading is done.

import Foundation
import Yams

final class ConfigReader {
    private(set) var issues: [ConfigIssue] = []
    /// YAML line of every key read, by config path, so checks that run
    /// after reading (ConfigCrossChecks) can still point at a line.
    private(set) var lines: [String: Int] = [:]
    /// `upstreams[i].health_check.active.` paths whose `type` was given
    /// (the others get their default from how the upstream is used).
    var explicitActiveCheckTypes: Set<String> = []

    func report(_ path: String, _ message: String, _ node: Node? = nil) {
        issues.append(ConfigIssue(path: path, message: message, line: node?.mark?.line))
    }

    // MARK: Mappings with known keys

    /// The keys of one YAML mapping, checked against the keys it may have.
    struct Fields {
        let path: String
        let node: Node
        private(set) var values: [String: Node] = [:]

        init(path: String, node: Node) { self.path = path; self.node = node }
        subscript(key: String) -> Node? { values[key] }
        func path(_ key: String) -> String { ConfigReader.join(path, key) }
        fileprivate mutating func set(_ key: String, _ value: Node) { values[key] = value }
    }

    static func join(_ base: String, _ key: String) -> String { base.isEmpty ? key : base + "." + key }

    /// Unknown keys, duplicate keys and missing required keys are reported;
    /// a key whose value is YAML null counts as absent.
    func fields(_ node: Node, _ path: String, known: [String], required: [String] = []) -> Fields? {
        guard case .mapping(let mapping) = node else {
            report(path, "expected a mapping with keys \(known.joined(separator: ", ")), got \(describe(node))", node)
            return nil
        }
        var result = Fields(path: path, node: node)
        var seen = Set<String>()
        for (keyNode, value) in expandingMergeKeys(mapping, path) {
            guard case .scalar(let keyScalar) = keyNode else {
                report(path, "mapping keys must be strings", keyNode)
                continue
            }
            let key = keyScalar.string
            if let line = keyNode.mark?.line { lines[result.path(key)] = line }
            if !seen.insert(key).inserted {
                report(result.path(key), "duplicate key", keyNode)
                continue
            }
            guard known.contains(key) else {
                if let suggestion = ConfigCrossChecks.closest(to: key, in: Set(known)) {
                    report(result.path(key), "unknown key (did you mean \"\(suggestion)\"?)", keyNode)
                } else {
                    report(result.path(key), "unknown key (expected one of: \(known.joined(separator: ", ")))", keyNode)
                }
                continue
            }
            if isNull(value) { continue }
            result.set(key, value)
        }
        for key in required where result[key] == nil {
            report(result.path(key), "required field is missing", node)
        }
        return result
    }

    /// YAML merge keys (`<<: *defaults`, or a list of aliases): the merged
    /// mappings' pairs come after the explicit ones, and an explicit key
    /// wins over a merged one.
    private func expandingMergeKeys(_ mapping: Node.Mapping, _ path: String) -> [(Node, Node)] {
        var explicit: [(Node, Node)] = []
        var merged: [(Node, Node)] = []
        for (keyNode, value) in mapping {
            guard case .scalar(let key) = keyNode, key.string == "<<", key.style == .plain else {
                explicit.append((keyNode, value))
                continue
            }
            let sources: [Node]
            if case .sequence(let list) = value { sources = Array(list) } else { sources = [value] }
            for source in sources {
                guard case .mapping(let inner) = source else {
                    report(ConfigReader.join(path, "<<"), "a merge key needs a mapping or a list of mappings", source)
                    continue
                }
                merged.append(contentsOf: expandingMergeKeys(inner, path).map { ($0.0, $0.1) })
            }
        }
        let explicitKeys = Set(explicit.compactMap { $0.0.string })
        var mergedKeys = Set<String>()
        for pair in merged {
            guard let key = pair.0.string, !explicitKeys.contains(key), mergedKeys.insert(key).inserted else { continue }
            explicit.append(pair)
        }
        return explicit
    }

    // MARK: Scalars

    func isNull(_ node: Node) -> Bool {
        guard case .scalar(let scalar) = node, scalar.style == .plain else { return false }
        return ["", "~", "null", "Null", "NULL"].contains(scalar.string)
    }

    func describe(_ node: Node) -> String {
        switch node {
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .scalar(let scalar): return "\"\(scalar.string)\""
        }
    }

    func string(_ node: Node, _ path: String) -> String? {
        guard case .scalar(let scalar) = node else {
            report(path, "expected a string, got \(describe(node))", node)
            return nil
        }
        return scalar.string
    }

    func nonEmptyString(_ node: Node, _ path: String) -> String? {
        guard let value = string(node, path) else { return nil }
        if value.isEmpty { report(path, "must not be empty", node); return nil }
        return value
    }

    func int(_ node: Node, _ path: String, min: Int? = nil, max: Int? = nil) -> Int? {
        guard case .scalar(let scalar) = node, let value = Int(scalar.string) else {
            report(path, "expected an integer, got \(describe(node))", node)
            return nil
        }
        if let min = min, value < min { report(path, "must be at least \(min), got \(value)", node); return nil }
        if let max = max, value > max { report(path, "must be at most \(max), got \(value)", node); return nil }
        return value
    }

    func bool(_ node: Node, _ path: String) -> Bool? {
        if case .scalar(let scalar) = node {
            switch scalar.string.lowercased() {
            case "true", "yes", "on": return true
            case "false", "no", "off": return false
            default: break
            }
        }
        report(path, "expected true or false, got \(describe(node))", node)
        return nil
    }

    /// `positive` refuses zero (timeouts, intervals).
    func duration(_ node: Node, _ path: String, positive: Bool = true) -> TimeSpan? {
        guard case .scalar(let scalar) = node else {
            report(path, "expected a duration like 250ms, 2s, 1m, got \(describe(node))", node)
            return nil
        }
        guard let span = TimeSpan(parsing: scalar.string) else {
            report(path, "invalid duration \"\(scalar.string)\" (use e.g. 250ms, 2s, 1m, 1h; a bare number is seconds)", node)
            return nil
        }
        if positive && span.nanoseconds == 0 { report(path, "must be greater than 0", node); return nil }
        return span
    }

    func size(_ node: Node, _ path: String, min: Int = 0) -> Int? {
        guard case .scalar(let scalar) = node else {
            report(path, "expected a size like 512, 64k, 8m, 1g, got \(describe(node))", node)
            return nil
        }
        guard let bytes = ByteSize.parse(scalar.string) else {
            report(path, "invalid size \"\(scalar.string)\" (use e.g. 512, 64k, 8m, 1g)", node)
            return nil
        }
        if bytes < min { report(path, "must be at least \(min) bytes", node); return nil }
        return bytes
    }

    func hostPort(_ node: Node, _ path: String, allowPortZero: Bool) -> HostPort? {
        guard let text = string(node, path) else { return nil }
        do {
            return try HostPort.parse(text, allowPortZero: allowPortZero)
        } catch {
            report(path, "\(error)", node)
            return nil
        }
    }

    func enumValue<E: RawRepresentable & CaseIterable>(_ node: Node, _ path: String, as: E.Type) -> E? where E.RawValue == String {
        guard let text = string(node, path) else { return nil }
        if let value = E(rawValue: text) { return value }
        let allowed = E.allCases.map { $0.rawValue }.joined(separator: " | ")
        report(path, "unknown value \"\(text)\" (expected \(allowed))", node)
        return nil
    }

    // MARK: Lists

    /// Elements of a YAML list with their paths. A lone scalar counts as a
    /// one-element list when `allowScalar` is set (`hosts: api.example.com`).
    func list(_ node: Node, _ path: String, allowScalar: Bool = false) -> [(node: Node, path: String)] {
        switch node {
        case .sequence(let sequence):
            for (offset, element) in sequence.enumerated() {
                if let line = element.mark?.line { lines["\(path)[\(offset)]"] = line }
            }
            return sequence.enumerated().map { ($0.element, "\(path)[\($0.offset)]") }
        case .scalar where allowScalar:
            return [(node, "\(path)[0]")]
        default:
            report(path, "expected a list, got \(describe(node))", node)
            return []
        }
    }

    func stringList(_ node: Node, _ path: String, allowScalar: Bool = true) -> [String] {
        list(node, path, allowScalar: allowScalar).compactMap { nonEmptyString($0.node, $0.path) }
    }

    // MARK: Raw values (plugin configs, credentials)

    func configValue(_ node: Node) -> ConfigValue {
        switch node {
        case .scalar(let scalar):
            guard scalar.style == .plain else { return .string(scalar.string) }
            if Self.isPlainWord(scalar.string) { return .string(scalar.string) }
            switch Resolver.default.resolveTag(of: node) {
            case .null: return .null
            case .bool: return node.bool.map(ConfigValue.bool) ?? .string(scalar.string)
            case .int: return node.int.map(ConfigValue.int) ?? .string(scalar.string)
            case .float: return node.float.map(ConfigValue.double) ?? .string(scalar.string)
            default: return .string(scalar.string)
            }
        case .sequence(let sequence):
            return .array(sequence.map(configValue))
        case .mapping(let mapping):
            var result: [String: ConfigValue] = [:]
            for (key, value) in mapping {
                result[key.string ?? "\(key)"] = configValue(value)
            }
            return .map(result)
        }
    }

    /// Words of YAML's default resolver that are not strings (bool, null).
    private static let nonStringWords: Set<String> = [
        "yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE",
        "on", "On", "ON", "off", "Off", "OFF", "null", "Null", "NULL",
    ]

    /// A plain scalar that starts with an ASCII letter and is none of those
    /// words is a string: every other tag Yams' default resolver knows (int,
    /// float, timestamp, merge, value, `~`) starts with a digit, sign, dot or
    /// symbol. Skips Yams' regex tag resolution, which was ~9% of loading
    /// 100,000 consumers (credentials are raw values).
    static func isPlainWord(_ text: String) -> Bool {
        guard let first = text.utf8.first,
              (first >= UInt8(ascii: "a") && first <= UInt8(ascii: "z")) || (first >= UInt8(ascii: "A") && first <= UInt8(ascii: "Z"))
        else { return false }
        return !nonStringWords.contains(text)
    }

    // MARK: Names

    /// Names end up in metrics labels and log lines, so keep them plain.
    func name(_ node: Node, _ path: String) -> String? {
        guard let value = nonEmptyString(node, path) else { return nil }
        let allowed = value.unicodeScalars.allSatisfy {
            ("a"..."z").contains($0) || ("A"..."Z").contains($0) || ("0"..."9").contains($0)
                || $0 == "-" || $0 == "_" || $0 == "."
        }
        if !allowed {
            report(path, "invalid name \"\(value)\" (use letters, digits, '-', '_' and '.')", node)
            return nil
        }
        return value
    }

    /// RFC 9110 token characters, used for header names and methods.
    static func isToken(_ text: String) -> Bool { HTTPFieldSyntax.isToken(text) }
}
