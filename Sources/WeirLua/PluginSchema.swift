import WeirCore

/// A plugin's config schema, read from its `schema.lua`:
///
///     return { fields = { minute = { type = "integer", min = 1, required = true,
///                                    description = "requests per minute" } } }
///
/// Field keys: `type` (string, number, integer, boolean, array, map, record,
/// one_of), `default`, `required`, `min`/`max` (value for numbers, length for
/// strings, item count for arrays and maps), `one_of` (allowed values for
/// scalar types; alternative field specs for `type = "one_of"`), `elements`
/// (array items), `values` (map values; keys are strings), `fields`
/// (record fields), `description`, `format` (checked string formats).
/// Top level: `exactly_one_of = { "allow", "deny" }` and
/// `at_least_one_of = { "second", "minute" }` (names of fields of which a
/// config must set exactly one / at least one), and `required_when =
/// { { field = "header_name", when = "limit_by", is = "header" } }` (a field
/// required only when another has one of some values, or is set at all when
/// `is` is left out), checked at load.
public struct PluginSchema: Sendable, Equatable {
    public var fields: [String: SchemaField]
    /// Fields of which a config must set exactly one (empty: no constraint).
    public var exactlyOneOf: [String]
    /// Fields of which a config must set at least one (empty: no constraint).
    public var atLeastOneOf: [String]
    /// Fields required only under a condition on another field.
    public var requiredWhen: [ConditionalRequirement]
    public init(fields: [String: SchemaField], exactlyOneOf: [String] = [], atLeastOneOf: [String] = [],
                requiredWhen: [ConditionalRequirement] = []) {
        self.fields = fields
        self.exactlyOneOf = exactlyOneOf
        self.atLeastOneOf = atLeastOneOf
        self.requiredWhen = requiredWhen
    }

    /// Checks `config` and returns it with defaults applied, or every
    /// problem found, each prefixed with its path (`path` is the config's own
    /// path, e.g. `routes[0].plugins[1].config`).
    public func validate(_ config: ConfigValue, path: String) -> Result<ConfigValue, SchemaErrors> {
        var problems: [SchemaProblem] = []
        let record = SchemaField(type: .record(fields))
        let input: ConfigValue = config == .null ? .map([:]) : config
        let result = record.validate(input, path: path, problems: &problems)
        if problems.isEmpty, case .map(let set)? = result {
            func present(_ names: [String]) -> [String] { names.filter { set[$0] != nil && set[$0] != .null } }
            if !exactlyOneOf.isEmpty, case let found = present(exactlyOneOf), found.count != 1 {
                let which = found.isEmpty ? "none is set" : "\(found.joined(separator: " and ")) are set"
                problems.append(.init(path: path, reason: "set exactly one of \(exactlyOneOf.joined(separator: ", ")) (\(which))"))
            }
            if !atLeastOneOf.isEmpty, present(atLeastOneOf).isEmpty {
                problems.append(.init(path: path, reason: "set at least one of \(atLeastOneOf.joined(separator: ", ")) (none is set)"))
            }
            // Checked on the values with defaults applied (limit_by's default counts).
            for rule in requiredWhen where present([rule.field]).isEmpty && rule.holds(in: set) {
                problems.append(.init(path: "\(path).\(rule.field)", reason: "required when \(rule.conditionText)"))
            }
        }
        return problems.isEmpty ? .success(result ?? .map([:])) : .failure(SchemaErrors(problems: problems))
    }
}

extension PluginSchema {
    /// The values of `format = "upstream"` fields in a validated `config`,
    /// with their config paths. Alternatives of `one_of` fields are not
    /// searched (a format there is only checked field by field).
    public func upstreamReferences(in config: ConfigValue, path: String) -> [(path: String, name: String)] {
        var found: [(path: String, name: String)] = []
        func walk(_ field: SchemaField, _ value: ConfigValue?, _ path: String) {
            guard let value else { return }
            switch (field.type, value) {
            case (.string, .string(let s)) where field.format == .upstream:
                found.append((path, s))
            case (.record(let fields), .map(let entries)):
                for name in fields.keys.sorted() { walk(fields[name]!, entries[name], "\(path).\(name)") }
            case (.array(let element), .array(let items)):
                for (i, item) in items.enumerated() { walk(element, item, "\(path)[\(i)]") }
            case (.map(let spec), .map(let entries)):
                for key in entries.keys.sorted() { walk(spec, entries[key], "\(path).\(key)") }
            default:
                break
            }
        }
        walk(SchemaField(type: .record(fields)), config, path)
        return found
    }
}

/// `required_when` entry: `field` must be set when `when` is set (`values`
/// nil) or equals one of `values` (after defaults are applied).
public struct ConditionalRequirement: Sendable, Equatable {
    public var field: String
    public var when: String
    public var values: [ConfigValue]?

    public init(field: String, when: String, values: [ConfigValue]? = nil) {
        self.field = field
        self.when = when
        self.values = values
    }

    func holds(in config: [String: ConfigValue]) -> Bool {
        guard let value = config[when], value != .null else { return false }
        guard let values else { return true }
        return values.contains { $0.looselyEquals(value) }
    }

    /// `limit_by is "header"`, `limit_by is "a" or "b"`, `consumer_claim_name is set`.
    var conditionText: String {
        guard let values else { return "\(when) is set" }
        return "\(when) is " + values.map(\.literal).joined(separator: " or ")
    }
}

public struct SchemaProblem: Sendable, Equatable, CustomStringConvertible {
    public var path: String
    public var reason: String
    public var description: String { "\(path): \(reason)" }
}

/// Every problem found in one config, one per line.
public struct SchemaErrors: Error, Sendable, Equatable, CustomStringConvertible {
    public var problems: [SchemaProblem]
    public var description: String { problems.map(\.description).joined(separator: "\n") }
}

public indirect enum SchemaType: Sendable, Equatable {
    case string, number, integer, boolean
    case array(elements: SchemaField)
    case map(values: SchemaField)
    case record([String: SchemaField])
    case oneOf([SchemaField])

    var name: String {
        switch self {
        case .string: return "string"
        case .number: return "number"
        case .integer: return "integer"
        case .boolean: return "boolean"
        case .array: return "array"
        case .map: return "map"
        case .record: return "record"
        case .oneOf: return "one_of"
        }
    }
}

/// Formats a string field can require; checked with WeirCore's parsers.
public enum StringFormat: String, Sendable, Equatable, CaseIterable {
    /// An IPv4/IPv6 address or CIDR block (WeirCore's `CIDRBlock`).
    case cidr
    /// The name of an upstream of the same config. It needs the whole config,
    /// so it is checked by `PluginLibrary.configure(_:path:upstreams:)`
    /// (`PluginSchema.upstreamReferences`), not field by field.
    case upstream
    /// A regular expression in `weir.re`'s syntax (Swift `Regex`).
    case regex

    /// nil when `text` fits, else the reason.
    func problem(with text: String) -> String? {
        switch self {
        case .cidr:
            do { _ = try CIDRBlock(parsing: text); return nil } catch { return "\(error)" }
        case .upstream:
            return nil
        case .regex:
            if case .failure(let error) = RegexSyntax.compile(text) { return error.description }
            return nil
        }
    }
}

public struct SchemaField: Sendable, Equatable {
    public var type: SchemaType
    public var required = false
    public var defaultValue: ConfigValue? = nil
    public var min: Double? = nil
    public var max: Double? = nil
    /// Allowed values for scalar types.
    public var allowed: [ConfigValue]? = nil
    /// String values that are recognised but refused, with the reason (e.g. a
    /// policy whose backend is not available yet), so the error says why.
    public var unavailable: [String: String]? = nil
    /// A checked format for string values (`format = "cidr"`), so a value
    /// the plugin could not use is refused at config load, not on a request.
    public var format: StringFormat? = nil
    public var description: String? = nil

    public init(type: SchemaType) { self.type = type }

    /// Validates `value` (nil when absent); returns the value to use (nil =
    /// leave absent) and appends problems.
    func validate(_ value: ConfigValue?, path: String, problems: inout [SchemaProblem]) -> ConfigValue? {
        guard let value = value, value != .null else {
            if let d = defaultValue { return d }
            if required { problems.append(.init(path: path, reason: "required field missing")); return nil }
            // An absent record whose fields all have defaults (or are optional) is filled in.
            if case .record = type {
                var inner: [SchemaProblem] = []
                let filled = validate(.map([:]), path: path, problems: &inner)
                if inner.isEmpty, let filled = filled, filled != .map([:]) { return filled }
            }
            return nil
        }
        let count = problems.count
        func fail(_ reason: String) -> ConfigValue? {
            problems.append(.init(path: path, reason: reason)); return nil
        }
        var result = value
        switch type {
        case .string:
            guard case .string(let s) = value else { return fail("expected string, got \(value.schemaTypeName)") }
            checkBounds(Double(s.count), "length", path: path, problems: &problems)
        case .number:
            switch value {
            case .int(let i): checkBounds(Double(i), "value", path: path, problems: &problems)
            case .double(let d): checkBounds(d, "value", path: path, problems: &problems)
            default: return fail("expected number, got \(value.schemaTypeName)")
            }
        case .integer:
            switch value {
            case .int(let i): checkBounds(Double(i), "value", path: path, problems: &problems)
            case .double(let d) where d == d.rounded() && abs(d) < 9.0e15:
                result = .int(Int(d)); checkBounds(d, "value", path: path, problems: &problems)
            default: return fail("expected integer, got \(value.schemaTypeName)")
            }
        case .boolean:
            guard case .bool = value else { return fail("expected boolean, got \(value.schemaTypeName)") }
        case .array(let elements):
            let items: [ConfigValue]
            switch value {
            case .array(let a): items = a
            case .map(let m) where m.isEmpty: items = []
            default: return fail("expected array, got \(value.schemaTypeName)")
            }
            checkBounds(Double(items.count), "item count", path: path, problems: &problems)
            var out: [ConfigValue] = []
            for (i, item) in items.enumerated() {
                var element = elements
                element.required = true
                if let v = element.validate(item, path: "\(path)[\(i)]", problems: &problems) { out.append(v) }
            }
            result = .array(out)
        case .map(let values):
            let entries: [String: ConfigValue]
            switch value {
            case .map(let m): entries = m
            case .array(let a) where a.isEmpty: entries = [:]
            default: return fail("expected map, got \(value.schemaTypeName)")
            }
            checkBounds(Double(entries.count), "entry count", path: path, problems: &problems)
            var out: [String: ConfigValue] = [:]
            for key in entries.keys.sorted() {
                var spec = values
                spec.required = true
                if let v = spec.validate(entries[key], path: "\(path).\(key)", problems: &problems) { out[key] = v }
            }
            result = .map(out)
        case .record(let fields):
            let entries: [String: ConfigValue]
            switch value {
            case .map(let m): entries = m
            case .array(let a) where a.isEmpty: entries = [:]
            default: return fail("expected record, got \(value.schemaTypeName)")
            }
            var out: [String: ConfigValue] = [:]
            for key in entries.keys.sorted() where fields[key] == nil {
                problems.append(.init(path: "\(path).\(key)", reason: "unknown field"))
            }
            for name in fields.keys.sorted() {
                if let v = fields[name]!.validate(entries[name], path: "\(path).\(name)", problems: &problems) {
                    out[name] = v
                }
            }
            result = .map(out)
        case .oneOf(let alternatives):
            var reasons: [String] = []
            for alternative in alternatives {
                var inner: [SchemaProblem] = []
                var spec = alternative
                spec.required = true
                if let v = spec.validate(value, path: path, problems: &inner), inner.isEmpty { return v }
                reasons.append(contentsOf: inner.map(\.reason))
            }
            let names = alternatives.map(\.type.name).joined(separator: " or ")
            return fail("matches none of the allowed forms (\(names)): " + reasons.joined(separator: "; "))
        }
        if let allowed = allowed, problems.count == count, !allowed.contains(where: { $0.looselyEquals(result) }) {
            let list = allowed.map(\.literal).joined(separator: ", ")
            return fail("expected one of \(list), got \(result.literal)")
        }
        if problems.count == count, case .string(let s) = result, let reason = unavailable?[s] {
            return fail("\(result.literal) is \(reason)")
        }
        if problems.count == count, case .string(let s) = result, let format, let reason = format.problem(with: s) {
            return fail(reason)
        }
        return problems.count == count ? result : nil
    }

    private func checkBounds(_ x: Double, _ what: String, path: String, problems: inout [SchemaProblem]) {
        if let min = min, x < min { problems.append(.init(path: path, reason: "\(what) \(x.clean) is less than the minimum \(min.clean)")) }
        if let max = max, x > max { problems.append(.init(path: path, reason: "\(what) \(x.clean) is greater than the maximum \(max.clean)")) }
    }
}

// MARK: - Reading a schema from the value `schema.lua` returned

extension PluginSchema {
    /// Builds a schema from plain data; errors name the schema path
    /// (`fields.minute.type: unknown type "int"`).
    public static func parse(_ value: ConfigValue, file: String) throws -> PluginSchema {
        guard case .map(let top) = value else {
            throw LuaError("\(file): schema must return a table like { fields = { ... } }, got \(value.schemaTypeName)")
        }
        for key in top.keys where !["fields", "description", "name", "exactly_one_of", "at_least_one_of", "required_when"].contains(key) {
            throw LuaError("\(file): unknown top-level schema key \"\(key)\" (expected fields, exactly_one_of, at_least_one_of, required_when)")
        }
        guard let fieldsValue = top["fields"] else {
            throw LuaError("\(file): schema has no fields table (use fields = {} for a plugin without config)")
        }
        let fields = try parseFields(fieldsValue, path: "fields", file: file)
        // A field-group constraint: at least two names, each a field.
        func group(_ key: String) throws -> [String] {
            guard let list = top[key] else { return [] }
            guard case .array(let items) = list, items.count >= 2 else {
                throw LuaError("\(file): \(key) must list at least two field names")
            }
            return try items.map { item in
                guard case .string(let name) = item, fields[name] != nil else {
                    throw LuaError("\(file): \(key) names \(item.literal), which is not a field")
                }
                return name
            }
        }
        return PluginSchema(fields: fields, exactlyOneOf: try group("exactly_one_of"), atLeastOneOf: try group("at_least_one_of"),
                            requiredWhen: try parseRequiredWhen(top["required_when"], fields: fields, file: file))
    }

    /// `required_when = { { field = "header_name", when = "limit_by", is = "header" }, ... }`;
    /// `is` is one value or a list, and must fit the `when` field (so a
    /// misspelt value is a schema error, not a rule that never fires).
    static func parseRequiredWhen(_ value: ConfigValue?, fields: [String: SchemaField], file: String) throws -> [ConditionalRequirement] {
        guard let value else { return [] }
        guard case .array(let entries) = value, !entries.isEmpty else {
            throw LuaError("\(file): required_when must be a list of { field = ..., when = ..., is = ... }")
        }
        return try entries.enumerated().map { index, entry in
            let at = "\(file): required_when[\(index + 1)]"
            guard case .map(let rule) = entry else { throw LuaError("\(at) must be a table { field = ..., when = ..., is = ... }") }
            if let unknown = rule.keys.sorted().first(where: { !["field", "when", "is"].contains($0) }) {
                throw LuaError("\(at): unknown key \"\(unknown)\" (expected field, when, is)")
            }
            func name(_ key: String) throws -> String {
                guard case .string(let name)? = rule[key] else { throw LuaError("\(at): \(key) must name a field") }
                guard fields[name] != nil else { throw LuaError("\(at): \(key) names \"\(name)\", which is not a field") }
                return name
            }
            let field = try name("field"), when = try name("when")
            guard field != when else { throw LuaError("\(at): field and when name the same field") }
            var values: [ConfigValue]? = nil
            if let given = rule["is"] {
                if case .array(let list) = given { values = list } else { values = [given] }
                guard !values!.isEmpty else { throw LuaError("\(at): is must be a value or a non-empty list of values") }
                var condition = fields[when]!
                condition.required = true
                condition.defaultValue = nil
                for candidate in values! {
                    var problems: [SchemaProblem] = []
                    if condition.validate(candidate, path: "is", problems: &problems) == nil || !problems.isEmpty {
                        throw LuaError("\(at): is \(candidate.literal) cannot be a value of \(when): "
                                       + problems.map(\.reason).joined(separator: "; "))
                    }
                }
            }
            return ConditionalRequirement(field: field, when: when, values: values)
        }
    }

    static func parseFields(_ value: ConfigValue, path: String, file: String) throws -> [String: SchemaField] {
        switch value {
        case .map(let m):
            var out: [String: SchemaField] = [:]
            for (name, spec) in m { out[name] = try parseField(spec, path: "\(path).\(name)", file: file) }
            return out
        case .array(let a) where a.isEmpty: return [:]
        default: throw LuaError("\(file): \(path) must be a table of field specs, got \(value.schemaTypeName)")
        }
    }

    static func parseField(_ value: ConfigValue, path: String, file: String) throws -> SchemaField {
        func bad(_ reason: String) -> LuaError { LuaError("\(file): \(path): \(reason)") }
        guard case .map(let spec) = value else { throw bad("field spec must be a table, got \(value.schemaTypeName)") }
        let known: Set<String> = ["type", "default", "required", "min", "max", "one_of", "elements", "values", "fields", "description",
                                  "unavailable", "format"]
        if let unknown = spec.keys.sorted().first(where: { !known.contains($0) }) { throw bad("unknown schema key \"\(unknown)\"") }
        guard case .string(let typeName)? = spec["type"] else { throw bad("missing type") }
        let type: SchemaType
        switch typeName {
        case "string": type = .string
        case "number": type = .number
        case "integer": type = .integer
        case "boolean": type = .boolean
        case "array":
            guard let e = spec["elements"] else { throw bad("array needs elements = { type = ... }") }
            type = .array(elements: try parseField(e, path: "\(path).elements", file: file))
        case "map":
            let v = spec["values"] ?? .map(["type": .string("string")])
            type = .map(values: try parseField(v, path: "\(path).values", file: file))
        case "record":
            guard let f = spec["fields"] else { throw bad("record needs fields = { ... }") }
            type = .record(try parseFields(f, path: "\(path).fields", file: file))
        case "one_of":
            guard case .array(let alternatives)? = spec["one_of"], !alternatives.isEmpty else {
                throw bad("one_of needs one_of = { {type = ...}, ... }")
            }
            type = .oneOf(try alternatives.enumerated().map { try parseField($1, path: "\(path).one_of[\($0 + 1)]", file: file) })
        default:
            throw bad("unknown type \"\(typeName)\" (string, number, integer, boolean, array, map, record, one_of)")
        }
        var field = SchemaField(type: type)
        if let r = spec["required"] {
            guard case .bool(let b) = r else { throw bad("required must be a boolean") }
            field.required = b
        }
        for key in ["min", "max"] {
            guard let v = spec[key] else { continue }
            let number: Double
            switch v {
            case .int(let i): number = Double(i)
            case .double(let d): number = d
            default: throw bad("\(key) must be a number")
            }
            if key == "min" { field.min = number } else { field.max = number }
        }
        if case .oneOf = type {} else if let list = spec["one_of"] {
            guard case .array(let values) = list, !values.isEmpty else { throw bad("one_of must be a list of allowed values") }
            field.allowed = values
        }
        if let u = spec["unavailable"] {
            guard case .map(let reasons) = u else { throw bad("unavailable must be a table { value = \"reason\" }") }
            var table: [String: String] = [:]
            for (value, reason) in reasons {
                guard case .string(let text) = reason else { throw bad("unavailable.\(value) must be a string (the reason)") }
                table[value] = text
            }
            field.unavailable = table
        }
        if let f = spec["format"] {
            let names = StringFormat.allCases.map(\.rawValue).joined(separator: ", ")
            guard case .string(let name) = f, let format = StringFormat(rawValue: name) else {
                throw bad("format must be one of: \(names)")
            }
            guard case .string = type else { throw bad("format applies to string fields only") }
            field.format = format
        }
        if let d = spec["description"] {
            guard case .string(let s) = d else { throw bad("description must be a string") }
            field.description = s
        }
        if let d = spec["default"] {
            var problems: [SchemaProblem] = []
            var check = field
            check.defaultValue = nil
            check.required = true
            guard let normalized = check.validate(d, path: "default", problems: &problems), problems.isEmpty else {
                throw bad("default does not fit the field: " + problems.map(\.description).joined(separator: "; "))
            }
            field.defaultValue = normalized
        }
        return field
    }
}

extension ConfigValue {
    /// The schema type name of a value, for "expected X, got Y" messages.
    var schemaTypeName: String {
        switch self {
        case .null: return "nil"
        case .bool: return "boolean"
        case .int: return "integer"
        case .double: return "number"
        case .string: return "string"
        case .array: return "array"
        case .map: return "map"
        }
    }

    var literal: String {
        switch self {
        case .string(let s): return "\"\(s)\""
        case .int(let i): return String(i)
        case .double(let d): return d.clean
        case .bool(let b): return String(b)
        case .null: return "nil"
        case .array, .map: return schemaTypeName
        }
    }

    /// Equality that treats 1 and 1.0 alike.
    func looselyEquals(_ other: ConfigValue) -> Bool {
        switch (self, other) {
        case (.int(let a), .double(let b)), (.double(let b), .int(let a)): return Double(a) == b
        default: return self == other
        }
    }
}

extension Double {
    var clean: String { self == rounded() && abs(self) < 1e15 ? String(Int(self)) : String(self) }
}
