import XCTest
@testable import WeirCore

/// `shared_dicts` and `lua` (the plugin runtime's config keys).
final class PluginRuntimeConfigTests: XCTestCase {
    private let base = """
    listeners: [{ name: web, listen: 127.0.0.1:8080 }]
    upstreams: [{ name: o, targets: [127.0.0.1:9001] }]
    routes: [{ name: r, match: { paths: [/] }, upstream: o }]

    """

    func testSharedDictsAndLuaLimits() throws {
        let config = try ConfigLoader.parse(yaml: base + """
        shared_dicts:
          - { name: bench, size: 10m }
          - { name: counters, items: 500 }
          - { name: plain }
        lua: { instruction_budget: 5000, memory_limit: 32m }
        """)
        XCTAssertEqual(config.sharedDicts, [
            SharedDictConfig(name: "bench", capacity: (10 << 20) / SharedDictConfig.assumedBytesPerEntry),
            SharedDictConfig(name: "counters", capacity: 500),
            SharedDictConfig(name: "plain", capacity: 10_000),
        ])
        XCTAssertEqual(config.lua.instructionBudget, 5000)
        XCTAssertEqual(config.lua.memoryLimit, 32 << 20)
        // GET /config shows them, in a form that parses back the same.
        let again = try ConfigLoader.parse(yaml: redactedYAML(config))
        XCTAssertEqual(again.sharedDicts, config.sharedDicts)
        XCTAssertEqual(again.lua, config.lua)
    }

    func testDefaults() throws {
        let config = try ConfigLoader.parse(yaml: base)
        XCTAssertEqual(config.sharedDicts, [])
        XCTAssertEqual(config.lua, LuaLimitsConfig())
    }

    func testBadValuesAreReportedWithPaths() {
        let yaml = base + """
        shared_dicts:
          - { name: a, size: 10m }
          - { name: b, size: lots }
          - { size: 1m }
          - { name: a }
          - { name: c, size: 1m, items: 3 }
        lua: { instruction_budget: -1, memory_limit: 1k, stack: 3 }
        """
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: yaml, file: "w.yaml")) { error in
            guard let errors = error as? ConfigErrors else { return XCTFail("unexpected \(error)") }
            let paths = Set(errors.issues.map(\.path))
            for expected in ["shared_dicts[4]", "shared_dicts[1].size", "shared_dicts[2].name", "shared_dicts[3].name",
                             "lua.instruction_budget", "lua.memory_limit", "lua.stack"] {
                XCTAssertTrue(paths.contains(expected), "missing issue for \(expected); got \(errors.description)")
            }
        }
    }
}
