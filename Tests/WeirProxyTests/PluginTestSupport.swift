// Helpers for the plugin and reload tests: plugin folders written to a
// temporary directory, and a proxy harness with a GenerationManager.

import Foundation
import Logging
import NIOCore
import WeirCore
import WeirProxy
import XCTest

/// A temporary folder holding `plugins/<name>/handler.lua` + `schema.lua`.
final class PluginFolder {
    let root: String
    var pluginsDir: String { root + "/plugins" }

    init() throws {
        root = NSTemporaryDirectory() + "weir-plugins-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: root + "/plugins", withIntermediateDirectories: true)
    }

    func write(_ name: String, handler: String, schema: String = "return { fields = {} }") throws {
        let dir = pluginsDir + "/" + name
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try handler.write(toFile: dir + "/handler.lua", atomically: true, encoding: .utf8)
        try schema.write(toFile: dir + "/schema.lua", atomically: true, encoding: .utf8)
    }

    func remove() { try? FileManager.default.removeItem(atPath: root) }
}

/// A proxy whose plugins come from a `PluginFolder`.
final class PluginProxy {
    let harness: ProxyHarness
    let generations: GenerationManager

    init(config: WeirConfig, folder: PluginFolder, configPath: String? = nil, loops: Int = 2,
         metrics: PluginMetrics? = nil) throws {
        var config = config
        config.pluginPaths = [folder.pluginsDir]
        harness = try ProxyHarness(config: config, loops: loops)
        var logger = Logger(label: "weir.test.plugins")
        logger.logLevel = .critical
        do {
            generations = try GenerationManager(server: harness.server, config: config, configPath: configPath,
                                                baseDirectory: folder.root, metrics: metrics, logger: logger)
        } catch {
            harness.stop()
            throw error
        }
    }

    func connect(timeoutSeconds: Int = 10) throws -> BlockingSocket { try harness.connect(timeoutSeconds: timeoutSeconds) }
    func stop() {
        generations.stopWatching()
        harness.stop()
    }
}

func pluginRef(_ name: String, _ config: ConfigValue? = nil) -> PluginRef {
    var ref = PluginRef(name: name)
    if let config { ref.config = config }
    return ref
}
