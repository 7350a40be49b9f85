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

    init(config: WeirConfig, loops: Int = 2) throws {
        var config = config
        config.pluginPaths = [shippedPluginsRepoRoot + "/plugins"]
        harness = try ProxyHarness(config: config, loops: loops)
        var logger = Logger(label: "weir.test.shipped-plugins")
        logger.logLevel = .critical
        do {
            generations = try GenerationManager(server: harness.server, config: config, configPath: nil,
                                                baseDirectory: shippedPluginsRepoRoot, metrics: nil, logger: logger)
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
func startShippedPluginProxy(yaml: String, upstream: TestUpstream, loops: Int = 2) throws -> ShippedPluginProxy {
    let text = yaml.replacingOccurrences(of: "UPSTREAM", with: "127.0.0.1:\(upstream.port)")
    return try ShippedPluginProxy(config: try ConfigLoader.parse(yaml: text), loops: loops)
}
