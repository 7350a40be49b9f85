import WeirCore
import XCTest
@testable import WeirLua

final class PluginSchemaTests: XCTestCase {
    let schemaSource = """
    return { fields = {
      minute = { type = "integer", min = 1, required = true, description = "requests per minute" },
      limit_by = { type = "string", default = "consumer", one_of = { "consumer", "ip", "header" } },
      ratio = { type = "number", min = 0, max = 1, default = 0.5 },
      hide = { type = "boolean", default = false },
      paths = { type = "array", elements = { type = "string", min = 1 }, max = 3 },
      labels = { type = "map", values = { type = "string" } },
      redis = { type = "record", fields = {
        host = { type = "string", default = "127.0.0.1" },
        port = { type = "integer", default = 6379, min = 1, max = 65535 },
      } },
      window = { type = "one_of", one_of = { { type = "integer", min = 1 }, { type = "string", one_of = { "minute", "hour" } } } },
    } }
    """

    func schema() throws -> PluginSchema {
        let runtime = try LuaRuntime(sdk: Harness.sdk, eventLoop: nil, options: LuaRuntimeOptions())
        return try PluginSchema.parse(try runtime.evaluate(schemaSource, chunkName: "schema.lua"), file: "schema.lua")
    }

    func testDefaultsAreApplied() throws {
        let result = try schema().validate(.map(["minute": .int(100)]), path: "plugins[0].config").get()
        XCTAssertEqual(result, .map([
            "minute": .int(100), "limit_by": .string("consumer"), "ratio": .double(0.5), "hide": .bool(false),
            "redis": .map(["host": .string("127.0.0.1"), "port": .int(6379)]),
        ]))
    }

    func testEveryBadFieldIsReportedWithItsPath() throws {
        let config: ConfigValue = .map([
            "minute": .string("100"),
            "limit_by": .string("planet"),
            "ratio": .double(2),
            "paths": .array([.string("/a"), .string(""), .int(3), .string("/d")]),
            "labels": .map(["team": .int(1)]),
            "redis": .map(["port": .int(0), "bogus": .bool(true)]),
            "window": .bool(true),
            "extra": .int(1),
        ])
        guard case .failure(let errors) = try schema().validate(config, path: "plugins[0].config") else {
            return XCTFail("expected errors")
        }
        let lines = Set(errors.problems.map(\.description))
        for expected in [
            "plugins[0].config.minute: expected integer, got string",
            "plugins[0].config.limit_by: expected one of \"consumer\", \"ip\", \"header\", got \"planet\"",
            "plugins[0].config.ratio: value 2 is greater than the maximum 1",
            "plugins[0].config.paths: item count 4 is greater than the maximum 3",
            "plugins[0].config.paths[1]: length 0 is less than the minimum 1",
            "plugins[0].config.paths[2]: expected string, got integer",
            "plugins[0].config.labels.team: expected string, got integer",
            "plugins[0].config.redis.port: value 0 is less than the minimum 1",
            "plugins[0].config.redis.bogus: unknown field",
            "plugins[0].config.extra: unknown field",
        ] {
            XCTAssertTrue(lines.contains(expected), "missing: \(expected)\n got: \(errors)")
        }
        XCTAssertTrue(lines.contains { $0.hasPrefix("plugins[0].config.window: matches none of the allowed forms") }, "\(errors)")
    }

    func testRequiredFieldMissing() throws {
        guard case .failure(let errors) = try schema().validate(.map([:]), path: "routes[2].plugins[0].config") else {
            return XCTFail("expected errors")
        }
        XCTAssertEqual(errors.problems.map(\.description), ["routes[2].plugins[0].config.minute: required field missing"])
    }

    func testOneOfAcceptsEitherForm() throws {
        let s = try schema()
        XCTAssertNoThrow(try s.validate(.map(["minute": .int(1), "window": .int(60)]), path: "c").get())
        XCTAssertNoThrow(try s.validate(.map(["minute": .int(1), "window": .string("hour")]), path: "c").get())
        // 5.0 from YAML is an acceptable integer.
        XCTAssertEqual(try s.validate(.map(["minute": .double(5)]), path: "c").get().mapValue?["minute"], .int(5))
    }

    func testBadSchemasAreRefusedWithTheirPath() throws {
        let runtime = try LuaRuntime(sdk: Harness.sdk, eventLoop: nil, options: LuaRuntimeOptions())
        func parseError(_ source: String) -> String {
            do {
                _ = try PluginSchema.parse(try runtime.evaluate(source, chunkName: "s.lua"), file: "p/schema.lua")
                return "no error"
            } catch { return "\(error)" }
        }
        XCTAssertEqual(parseError("return { fields = { n = { type = 'int' } } }"),
                       "p/schema.lua: fields.n: unknown type \"int\" (string, number, integer, boolean, array, map, record, one_of)")
        XCTAssertEqual(parseError("return { fields = { n = { type = 'integer', default = 'x' } } }"),
                       "p/schema.lua: fields.n: default does not fit the field: default: expected integer, got string")
        XCTAssertEqual(parseError("return { fields = { a = { type = 'array' } } }"),
                       "p/schema.lua: fields.a: array needs elements = { type = ... }")
        XCTAssertEqual(parseError("return 42"), "p/schema.lua: schema must return a table like { fields = { ... } }, got integer")
        XCTAssertEqual(parseError("return { }"), "p/schema.lua: schema has no fields table (use fields = {} for a plugin without config)")
        XCTAssertEqual(parseError("return { at_least_one_of = { 'a' }, fields = { a = { type = 'integer' } } }"),
                       "p/schema.lua: at_least_one_of must list at least two field names")
        XCTAssertEqual(parseError("return { at_least_one_of = { 'a', 'b' }, fields = { a = { type = 'integer' } } }"),
                       "p/schema.lua: at_least_one_of names \"b\", which is not a field")
    }

    /// Field groups checked after the fields themselves: exactly one of
    /// allow/deny, at least one of the limits.
    func testFieldGroups() throws {
        let runtime = try LuaRuntime(sdk: Harness.sdk, eventLoop: nil, options: LuaRuntimeOptions())
        let schema = try PluginSchema.parse(try runtime.evaluate("""
            return { exactly_one_of = { "allow", "deny" }, at_least_one_of = { "second", "minute" }, fields = {
              allow = { type = "string" }, deny = { type = "string" },
              second = { type = "integer" }, minute = { type = "integer" } } }
            """, chunkName: "s.lua"), file: "s.lua")
        func problems(_ config: [String: ConfigValue]) -> [String] {
            guard case .failure(let errors) = schema.validate(.map(config), path: "c") else { return [] }
            return errors.problems.map(\.description)
        }
        XCTAssertEqual(problems(["allow": .string("a"), "minute": .int(1)]), [])
        XCTAssertEqual(problems(["allow": .string("a"), "second": .int(1), "minute": .int(1)]), [])
        XCTAssertEqual(problems(["allow": .string("a")]), ["c: set at least one of second, minute (none is set)"])
        XCTAssertEqual(problems(["minute": .int(1)]), ["c: set exactly one of allow, deny (none is set)"])
        XCTAssertEqual(problems(["allow": .string("a"), "deny": .string("b")]),
                       ["c: set exactly one of allow, deny (allow and deny are set)", "c: set at least one of second, minute (none is set)"])
    }

    /// required_when: a field required by another field's value (after its
    /// default is applied) or by its mere presence.
    func testRequiredWhen() throws {
        let runtime = try LuaRuntime(sdk: Harness.sdk, eventLoop: nil, options: LuaRuntimeOptions())
        let schema = try PluginSchema.parse(try runtime.evaluate("""
            return { required_when = {
                { field = "header_name", when = "limit_by", is = "header" },
                { field = "zone", when = "mode", is = { "a", "b" } },
                { field = "jwks", when = "claim" } },
              fields = {
                limit_by = { type = "string", default = "header", one_of = { "ip", "header" } }, header_name = { type = "string" },
                mode = { type = "string" }, zone = { type = "integer" },
                claim = { type = "string" }, jwks = { type = "string" } } }
            """, chunkName: "s.lua"), file: "s.lua")
        func problems(_ config: [String: ConfigValue]) -> [String] {
            guard case .failure(let errors) = schema.validate(.map(config), path: "c") else { return [] }
            return errors.problems.map(\.description)
        }
        XCTAssertEqual(problems([:]), ["c.header_name: required when limit_by is \"header\""], "the default counts")
        XCTAssertEqual(problems(["limit_by": .string("ip")]), [])
        XCTAssertEqual(problems(["header_name": .string("x-who")]), [])
        XCTAssertEqual(problems(["header_name": .string("x"), "mode": .string("b")]), ["c.zone: required when mode is \"a\" or \"b\""])
        XCTAssertEqual(problems(["header_name": .string("x"), "mode": .string("c")]), [])
        XCTAssertEqual(problems(["header_name": .string("x"), "mode": .string("a"), "zone": .int(1)]), [])
        XCTAssertEqual(problems(["header_name": .string("x"), "claim": .string("sub")]), ["c.jwks: required when claim is set"])
        XCTAssertEqual(problems(["header_name": .string("x"), "claim": .string("sub"), "jwks": .string("u")]), [])
    }

    func testBadRequiredWhenRulesAreRefused() throws {
        let runtime = try LuaRuntime(sdk: Harness.sdk, eventLoop: nil, options: LuaRuntimeOptions())
        func parseError(_ rules: String) -> String {
            let source = """
                return { required_when = \(rules), fields = {
                  by = { type = "string", one_of = { "ip", "header" } }, name = { type = "string" } } }
                """
            do {
                _ = try PluginSchema.parse(try runtime.evaluate(source, chunkName: "s.lua"), file: "p/schema.lua")
                return "no error"
            } catch { return "\(error)" }
        }
        XCTAssertEqual(parseError("{ { field = 'name', when = 'by', is = 'header' } }"), "no error")
        XCTAssertEqual(parseError("{ { field = 'name', when = 'by', is = 'heder' } }"),
                       "p/schema.lua: required_when[1]: is \"heder\" cannot be a value of by: expected one of \"ip\", \"header\", got \"heder\"")
        XCTAssertEqual(parseError("{ { field = 'nme', when = 'by' } }"), "p/schema.lua: required_when[1]: field names \"nme\", which is not a field")
        XCTAssertEqual(parseError("{ { field = 'name' } }"), "p/schema.lua: required_when[1]: when must name a field")
        XCTAssertEqual(parseError("{ { field = 'name', when = 'name' } }"), "p/schema.lua: required_when[1]: field and when name the same field")
        XCTAssertEqual(parseError("{ { field = 'name', when = 'by', if_match = 1 } }"),
                       "p/schema.lua: required_when[1]: unknown key \"if_match\" (expected field, when, is)")
        XCTAssertEqual(parseError("'name'"), "p/schema.lua: required_when must be a list of { field = ..., when = ..., is = ... }")
    }
}

extension ConfigValue {
    var mapValue: [String: ConfigValue]? { if case .map(let m) = self { return m }; return nil }
}
