import Logging
import NIOCore
import WeirCore
import WeirLua

/// One loaded set of plugins: the library (compiled-checked handlers and
/// schemas), every plugin reference of the config validated against its
/// schema, and one Lua runtime per event loop with its chains built.
///
/// Built off the event loops (startup, reload); each loop then adopts its
/// `LoopPlugins`. Requests pin the `LoopPlugins` they started on, so an old
/// generation's Lua state lives until its last request ends.
public final class PluginGeneration: @unchecked Sendable {
    public let number: Int
    public let library: PluginLibrary
    public let plugins: ValidatedPlugins
    /// One per event loop, in the order of `loops` given to `build`.
    let perLoop: [LoopPlugins]
    /// False when the config attaches no plugin anywhere: the data path
    /// then never touches the plugin runtime.
    public var isEmpty: Bool { perLoop.allSatisfy { !$0.hasChains } }

    struct InvalidPlugins: Error, CustomStringConvertible {
        let description: String
    }

    /// Loads and validates every plugin `config` refers to and builds one
    /// runtime per loop. Throws with the file and line of a Lua error, or the
    /// config path of a schema problem.
    static func build(number: Int, config: WeirConfig, baseDirectory: String, sdk: LuaSDK,
                      options: LuaRuntimeOptions, loops: [EventLoop]) throws -> PluginGeneration {
        let library = try PluginLibrary(config: config, baseDirectory: baseDirectory, sdk: sdk)
        let validated: ValidatedPlugins
        switch library.validate(config) {
        case .success(let v): validated = v
        case .failure(let errors): throw InvalidPlugins(description: "\(errors)")
        }
        var perLoop: [LoopPlugins] = []
        for loop in loops {
            perLoop.append(try LoopPlugins(generation: number, library: library, plugins: validated,
                                           config: config, options: options, loop: loop))
        }
        return PluginGeneration(number: number, library: library, plugins: validated, perLoop: perLoop)
    }

    private init(number: Int, library: PluginLibrary, plugins: ValidatedPlugins, perLoop: [LoopPlugins]) {
        self.number = number
        self.library = library
        self.plugins = plugins
        self.perLoop = perLoop
    }
}

/// The plugin chain of one route in one runtime.
struct RouteChain {
    let chain: PluginChain
    let filtersBody: Bool
}

/// A generation's plugins on one event loop: its Lua runtime and the chain
/// of each route (global + upstream + route plugins, most specific config
/// wins). Only used on `loop`.
final class LoopPlugins {
    let generation: Int
    let runtime: LuaRuntime
    let loop: EventLoop
    /// By route name; absent = the route runs no plugin.
    private let routeChains: [String: RouteChain]
    /// Global plugins that have a connection phase (run after accept).
    let connectionChain: PluginChain?
    let hasChains: Bool

    init(generation: Int, library: PluginLibrary, plugins: ValidatedPlugins, config: WeirConfig,
         options: LuaRuntimeOptions, loop: EventLoop) throws {
        self.generation = generation
        self.loop = loop
        // Built here, off the loop; handed over to `loop` before first use.
        let runtime = try LuaRuntime(library: library, eventLoop: loop, options: options)
        self.runtime = runtime
        var chains: [String: RouteChain] = [:]
        for route in config.routes {
            let effective = plugins.effective(route: route.name, upstream: route.upstream)
            if effective.isEmpty { continue }
            chains[route.name] = RouteChain(chain: try runtime.makeChain(effective),
                                            filtersBody: effective.contains { $0.definition.phases.contains(.bodyFilter) })
        }
        self.routeChains = chains
        let connectionPlugins = plugins.global.filter { $0.definition.phases.contains(.connection) }
        self.connectionChain = connectionPlugins.isEmpty ? nil : try runtime.makeChain(connectionPlugins)
        self.hasChains = !chains.isEmpty || connectionChain != nil
    }

    func chain(forRoute name: String) -> RouteChain? { routeChains[name] }

    /// This generation was replaced on this loop: its timers stop; the Lua
    /// state is freed when the last request holding it ends.
    func retire() {
        runtime.stopTimers()
        runtime.dropIdleCoroutines()
    }
}

extension PluginGeneration {
    /// `weir validate`: loads every plugin `config` refers to (syntax, handler
    /// shape, schema) and checks each plugin config against its schema,
    /// without creating runtimes. Throws with file:line or config paths.
    public static func check(config: WeirConfig, baseDirectory: String, sdk: LuaSDK? = nil) throws {
        guard !PluginLibrary.pluginNames(in: config).isEmpty else { return }
        let library = try PluginLibrary(config: config, baseDirectory: baseDirectory, sdk: sdk ?? LuaSDK.locate())
        if case .failure(let errors) = library.validate(config) { throw InvalidPlugins(description: "\(errors)") }
    }
}
