// Helpers for the tests of the shipped plugins (the repository's `plugins/`
// folder), run through a real proxy with a GenerationManager.

import Foundation
import Logging
import WeirCore
import WeirProxy
import XCTest

/// The repository root (this file is Tests/WeirProxyTests/<file>).
let shippedPluginsRepoRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
}()

/// A proxy whose plugins come from the repository's `plugins/` folder.
final class ShippedPluginProxy {
    let harness: ProxyHarness
    let generations: GenerationManager

    /// `extraPluginPaths` come after the shipped folder (test helpers).
    /// `metrics`: plugin metrics to feed (what /metrics shows), if a test reads them.
    init(config: WeirConfig, loops: Int = 2, extraPluginPaths: [String] = [], metrics: PluginMetrics? = nil) throws {
        var config = config
        config.pluginPaths = [shippedPluginsRepoRoot + "/plugins"] + extraPluginPaths
        harness = try ProxyHarness(config: config, loops: loops)
        var logger = Logger(label: "weir.test.shipped-plugins")
        logger.logLevel = .critical
        do {
            generations = try GenerationManager(server: harness.server, config: config, configPath: nil,
                                                baseDirectory: shippedPluginsRepoRoot, metrics: metrics, logger: logger)
        } catch {
            harness.stop()
            throw error
        }
    }

    func connect() throws -> BlockingSocket { try harness.connect() }
    func stop() {
        generations.stopWatching()
        harness.stop()
    }
}

/// Loads `yaml` through the real config loader and starts a proxy with it;
/// the error of either step is thrown (with its config path).
func startShippedPluginProxy(yaml: String, upstream: TestUpstream, loops: Int = 2,
                             extraPluginPaths: [String] = [], metrics: PluginMetrics? = nil) throws -> ShippedPluginProxy {
    let text = yaml.replacingOccurrences(of: "UPSTREAM", with: "127.0.0.1:\(upstream.port)")
    return try ShippedPluginProxy(config: try ConfigLoader.parse(yaml: text), loops: loops,
                                  extraPluginPaths: extraPluginPaths, metrics: metrics)
}

/// A test-only plugin `test-clock` (in a temporary folder): when a request
/// carries `x-test-clock: <seconds>`, `weir.time.now()` returns that value for
/// the plugins of this Lua state, so window edges are reached without
/// waiting. It runs first (highest priority) and does not yield, so the value
/// it sets is the one the following plugins of the same request read.
func writeTestClockPlugin(into folder: PluginFolder) throws {
    try folder.write("test-clock", handler: """
    local weir = require "weir"
    local real_now = weir.time.now
    local fixed
    weir.time.now = function() return fixed or real_now() end
    local P = { PRIORITY = 1000000, VERSION = "1" }
    function P:request(conf, ctx)
      fixed = tonumber(weir.request.get_header("x-test-clock"))
    end
    return P
    """)
}

