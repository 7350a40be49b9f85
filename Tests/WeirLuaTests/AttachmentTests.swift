import NIOCore
import WeirCore
import XCTest
@testable import WeirLua

final class AttachmentTests: XCTestCase {
    func makeConfig() -> WeirConfig {
        var config = WeirConfig()
        config.plugins = [PluginRef(name: "tag", config: .map(["value": .string("global")])), PluginRef(name: "audit")]
        var route = RouteConfig(); route.name = "orders"; route.upstream = "orders-up"
        route.plugins = [PluginRef(name: "tag", config: .map(["value": .string("route")]))]
        var other = RouteConfig(); other.name = "other"; other.upstream = "orders-up"
        var upstream = UpstreamConfig(); upstream.name = "orders-up"
        upstream.plugins = [PluginRef(name: "tag", config: .map(["value": .string("upstream")]))]
        var consumer = ConsumerConfig(); consumer.name = "alice"
        consumer.plugins = [PluginRef(name: "tag", config: .map(["value": .string("consumer")]))]
        config.routes = [route, other]
        config.upstreams = [upstream]
        config.consumers = [consumer]
        return config
    }

    func library(_ folder: PluginFolder) throws -> PluginLibrary {
        folder.add("tag", handler: "return { PRIORITY = 2, VERSION = '1', request = function(s, conf) weir.upstream.request.add_header('x-tag', conf.value) end }",
                   schema: "return { fields = { value = { type = 'string', required = true } } }")
        folder.add("audit", handler: "return { PRIORITY = 1, VERSION = '1', log = function() end }")
        var config = makeConfig()
        config.pluginPaths = [(folder.path as NSString).lastPathComponent]
        return try PluginLibrary(config: config, baseDirectory: (folder.path as NSString).deletingLastPathComponent, sdk: Harness.sdk)
    }

    func testMostSpecificConfigWins() throws {
        let folder = PluginFolder()
        let validated = try library(folder).validate(makeConfig()).get()
        func tag(_ plugins: [ConfiguredPlugin]) -> String? {
            plugins.first { $0.name == "tag" }?.config.mapValue?["value"].flatMap { if case .string(let s) = $0 { return s }; return nil }
        }
        XCTAssertEqual(tag(validated.effective(route: "orders", upstream: "orders-up")), "route")
        XCTAssertEqual(tag(validated.effective(route: "other", upstream: "orders-up")), "upstream")
        XCTAssertEqual(tag(validated.effective(route: nil, upstream: nil)), "global")
        XCTAssertEqual(tag(validated.effective(route: "orders", upstream: "orders-up", consumer: "alice")), "consumer")
        XCTAssertEqual(validated.effective(route: "orders", upstream: "orders-up").map(\.name), ["audit", "tag"])
    }

    func testValidateReportsEveryScopeWithPaths() throws {
        let folder = PluginFolder()
        let lib = try library(folder)
        var config = makeConfig()
        config.routes[1].plugins = [PluginRef(name: "tag", config: .map(["value": .int(3)])), PluginRef(name: "tag", config: .map(["value": .string("x")]))]
        config.consumers[0].plugins = [PluginRef(name: "tag", config: .map([:]))]
        guard case .failure(let errors) = lib.validate(config) else { return XCTFail("expected errors") }
        XCTAssertEqual(errors.problems.map(\.description), [
            "routes[1].plugins[1].name: plugin \"tag\" is attached twice here",
            "routes[1].plugins[0].config.value: expected string, got integer",
            "consumers[0].plugins[0].config.value: required field missing",
        ])
    }

    func testObserverSeesEveryPluginCall() throws {
        final class Recorder: PluginPhaseObserver, @unchecked Sendable {
            var calls: [String] = []
            func pluginPhaseCompleted(plugin: String, phase: PluginPhase, nanoseconds: UInt64, outcome: PluginCallOutcome) {
                calls.append("\(plugin).\(phase.rawValue).\(outcome)")
            }
        }
        let recorder = Recorder()
        let h = Harness()
        h.options.observer = recorder
        h.folder.add("ok", handler: "return { PRIORITY = 3, VERSION = '1', request = function() weir.sleep(0.001) end, log = function() error('x') end }")
        h.folder.add("stop", handler: "return { PRIORITY = 2, VERSION = '1', request = function() return 204 end }")
        try h.load(["ok", "stop"])
        _ = try h.runRequest(try h.chain("ok", "stop"), phases: [.request, .log])
        XCTAssertEqual(recorder.calls, ["ok.request.completed", "stop.request.exited", "ok.log.failed"])
    }

    func testScopeDroppedWithoutFinishIsReclaimed() throws {
        let h = Harness()
        h.folder.add("p", handler: "return { PRIORITY = 1, VERSION = '1', request = function(s, c, ctx) ctx.big = string.rep('z', 100000) end }")
        try h.load(["p"])
        let chain = try h.chain("p")
        let baseline = try h.onLoop { () -> Int in h.runtime.state.collectGarbage(); return h.runtime.state.bytesUsed }
        try h.onLoop {
            for _ in 0..<50 {
                let scope = h.runtime.beginRequest(h.newRequest())
                _ = scope.start(.request, chain: chain)
                // dropped: no finish()
            }
        }
        let after = try h.onLoop { () -> Int in
            _ = h.runtime.beginRequest(h.newRequest()) // releases the orphans' refs
            h.runtime.state.collectGarbage()
            return h.runtime.state.bytesUsed
        }
        XCTAssertLessThan(after, baseline + 200_000, "50 x 100 KB ctx tables should have been reclaimed")
    }
}
