// A reload retires a generation: its requests still in flight run to their
// end on it (their plugin side, ExchangePlugins, is their scope and pins its
// Lua runtime), then nothing holds its Lua state any more: not the loop's
// spare plugin sides (they live in the retired LoopPlugins), not a finished
// request.

import Foundation
import WeirCore
@testable import WeirProxy
import WeirLua
import XCTest

final class PluginGenerationLifetimeTests: PluginFolderTestCase {
    private final class WeakRuntime: @unchecked Sendable { weak var runtime: LuaRuntime? }

    private func writeVersion(_ version: String) throws {
        try folder.write("lifetime", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_header("x-slow") then
            -- Held until the test says go (the shared dictionary outlives reloads).
            local flags = weir.shared.flags
            flags:set("entered", true)
            while not flags:get("go") do weir.sleep(0.01) end
          end
          weir.response.set_header("x-version", "\(version)")
        end
        return P
        """)
    }

    /// The runtime serving requests on the proxy's one loop now.
    private func currentRuntime(_ proxy: PluginProxy) throws -> WeakRuntime {
        let context = proxy.harness.server.loopContexts[0]
        let box = WeakRuntime()
        try context.loop.submit { box.runtime = context.plugins?.runtime }.wait()
        return box
    }

    func testARetiredGenerationLivesUntilItsLastRequestEndsThenIsFreed() throws {
        let path = folder.root + "/weir.yaml"
        try """
        listeners: [{ name: web, listen: 127.0.0.1:0 }]
        upstreams: [{ name: backend, targets: [127.0.0.1:\(upstream.port)] }]
        routes: [{ name: all, match: { paths: [/] }, upstream: backend }]
        plugins: [{ name: lifetime }]
        plugin_paths: [plugins]
        shared_dicts: [{ name: flags, items: 10 }]
        access_log: "off"
        """.write(toFile: path, atomically: true, encoding: .utf8)
        try writeVersion("A")
        let proxy = try PluginProxy(config: try ConfigLoader.load(path: path), folder: folder, configPath: path, loops: 1)
        defer { proxy.stop() }
        let fast = try proxy.connect()
        let slow = try proxy.connect()
        // Finished requests leave their plugin sides in the loop's spares.
        for _ in 0..<4 { XCTAssertEqual(try fast.request("GET", "/warm").header("x-version"), "A") }
        let old = try currentRuntime(proxy)
        XCTAssertNotNil(old.runtime)

        // A request held in its request phase while the reload happens.
        let flags = proxy.generations.shared
        let slowResult = NIOLockedBox<(status: Int, version: String?)?>(nil)
        let slowDone = DispatchGroup()
        DispatchQueue.global().async(group: slowDone) {
            let response = try? slow.request("GET", "/slow", headers: [("x-slow", "1")])
            slowResult.set(response.map { ($0.status, $0.header("x-version")) })
        }
        XCTAssertTrue(waitUntil { flags.get("flags", "entered") == .bool(true) }, "the slow request is in its request phase")
        try writeVersion("B")
        guard case .success = proxy.generations.reload() else { return XCTFail("reload failed") }
        XCTAssertEqual(try fast.request("GET", "/new").header("x-version"), "B")
        XCTAssertNil(slowResult.get(), "still held")
        XCTAssertNotNil(old.runtime, "the held request keeps its retired generation")

        flags.set("flags", "go", .bool(true), ttl: 0)
        slowDone.wait()
        let result = try XCTUnwrap(slowResult.get(), "the slow request got an answer")
        XCTAssertEqual(result.status, 200)
        XCTAssertEqual(result.version, "A", "it ran to its end on its own generation")
        XCTAssertTrue(waitUntil(timeout: 5) { old.runtime == nil },
                      "the retired generation's Lua runtime is freed once its last request ended")
        // Both connections keep serving on the new generation.
        XCTAssertEqual(try slow.request("GET", "/after").header("x-version"), "B")
        XCTAssertEqual(try fast.request("GET", "/after").header("x-version"), "B")
    }
}

/// A value set on one thread and read on another.
private final class NIOLockedBox<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func set(_ new: Value) { lock.lock(); value = new; lock.unlock() }
    func get() -> Value { lock.lock(); defer { lock.unlock() }; return value }
}
