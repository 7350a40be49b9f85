import WeirCore
import XCTest
@testable import WeirLua

final class PluginLoadingTests: XCTestCase {
    func loadError(_ setup: (PluginFolder) -> Void, names: [String]) -> String {
        let folder = PluginFolder()
        setup(folder)
        do {
            _ = try PluginLibrary(names: names, searchPaths: [folder.path], sdk: Harness.sdk)
            return "no error"
        } catch { return "\(error)" }
    }

    func testMissingPluginListsWhereItLooked() {
        let message = loadError({ _ in }, names: ["nope"])
        XCTAssertTrue(message.hasPrefix("plugin \"nope\" not found (looked for "), message)
        XCTAssertTrue(message.contains("/nope/handler.lua"), message)
    }

    func testSyntaxErrorGivesFileAndLine() {
        var dir = ""
        let message = loadError({ dir = $0.add("broken", handler: "local P = { PRIORITY = 1, VERSION = '1' }\nfunction P:request(\n  return P\n") }, names: ["broken"])
        XCTAssertTrue(message.hasPrefix(dir + "/handler.lua:3:"), message)
    }

    func testRuntimeErrorWhileLoadingGivesFileAndLine() {
        var dir = ""
        let message = loadError({ dir = $0.add("boom", handler: "local x = nil\nreturn x.field\n") }, names: ["boom"])
        XCTAssertTrue(message.hasPrefix(dir + "/handler.lua:2: attempt to index"), message)
    }

    func testWrongShapesAreNamed() {
        func shapeError(_ handler: String) -> String {
            var dir = ""
            let m = loadError({ dir = $0.add("p", handler: handler) }, names: ["p"])
            return m.replacingOccurrences(of: dir + "/handler.lua: ", with: "")
        }
        XCTAssertEqual(shapeError("return 5"), "must return a table, got number")
        XCTAssertEqual(shapeError("return { VERSION = '1', request = function() end }"), "PRIORITY must be an integer, got nil")
        XCTAssertEqual(shapeError("return { PRIORITY = 1, request = function() end }"), "VERSION must be a string, got nil")
        XCTAssertEqual(shapeError("return { PRIORITY = 1, VERSION = '1', request = 'x' }"), "request must be a function, got string")
        XCTAssertEqual(shapeError("return { PRIORITY = 1, VERSION = '1' }"),
                       "defines none of connection, request, response, body_filter, log")
    }

    func testInheritedPhaseFunctionsAreFound() throws {
        let folder = PluginFolder()
        folder.add("child", handler: """
        local Base = { PRIORITY = 5, VERSION = "2.0" }
        function Base:request(conf, ctx) end
        return setmetatable({}, { __index = Base })
        """)
        let library = try PluginLibrary(names: ["child"], searchPaths: [folder.path], sdk: Harness.sdk)
        XCTAssertEqual(library.plugins["child"]?.phases, [.request])
        XCTAssertEqual(library.plugins["child"]?.priority, 5)
        XCTAssertEqual(library.plugins["child"]?.version, "2.0")
    }

    func testMissingSchemaIsAnError() {
        var dir = ""
        let message = loadError({ dir = $0.add("noschema", handler: "return { PRIORITY = 1, VERSION = '1', log = function() end }", schema: nil) }, names: ["noschema"])
        XCTAssertTrue(message.hasPrefix(dir + "/schema.lua: missing"), message)
    }

    func testFirstSearchPathWins() throws {
        let first = PluginFolder(), second = PluginFolder()
        first.add("dup", handler: "return { PRIORITY = 1, VERSION = 'first', log = function() end }")
        second.add("dup", handler: "return { PRIORITY = 1, VERSION = 'second', log = function() end }")
        second.add("only-second", handler: "return { PRIORITY = 1, VERSION = 'x', log = function() end }")
        let library = try PluginLibrary(names: ["dup", "only-second"], searchPaths: [first.path, second.path], sdk: Harness.sdk)
        XCTAssertEqual(library.plugins["dup"]?.version, "first")
        XCTAssertEqual(library.plugins["only-second"]?.directory, second.path + "/only-second")
    }

    func testConfigureReportsUnknownPluginsAndBadConfigsWithPaths() throws {
        let folder = PluginFolder()
        folder.add("limit", handler: "return { PRIORITY = 1, VERSION = '1', request = function() end }",
                   schema: "return { fields = { minute = { type = 'integer', required = true } } }")
        let library = try PluginLibrary(names: ["limit"], searchPaths: [folder.path], sdk: Harness.sdk)
        let refs = [PluginRef(name: "limit", config: .map(["minute": .string("ten")])), PluginRef(name: "ghost")]
        guard case .failure(let errors) = library.configure(refs, path: "routes[0].plugins") else { return XCTFail("expected errors") }
        XCTAssertEqual(errors.problems.map(\.description), [
            "routes[0].plugins[0].config.minute: expected integer, got string",
            "routes[0].plugins[1].name: unknown plugin \"ghost\"",
        ])
    }

    func testChainOrderIsPriorityDescendingThenName() throws {
        let h = Harness()
        for (name, priority) in [("zeta", 10), ("alpha", 10), ("high", 1000), ("low", -5), ("mid", 500)] {
            h.folder.add(name, handler: "return { PRIORITY = \(priority), VERSION = '1', request = function() weir.ctx.order = (weir.ctx.order or '') .. '\(name),' end }")
        }
        try h.load(["zeta", "alpha", "high", "low", "mid"])
        h.folder.add("recorder", handler: """
        local weir = require "weir"
        return { PRIORITY = -100, VERSION = '1', request = function() return 200, weir.ctx.order end }
        """)
        try h.load(["zeta", "alpha", "high", "low", "mid", "recorder"])
        let chain = try h.chain("low", "zeta", "mid", "alpha", "recorder", "high")
        XCTAssertEqual(chain.names, ["high", "mid", "alpha", "zeta", "low", "recorder"])
        let result = try h.runRequest(chain)[0]
        XCTAssertEqual(result.exitValue?.bodyString, "high,mid,alpha,zeta,low,")
    }
}
