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

/// The chains of a request whose consumer is known (see `LoopPlugins.chains(route:consumer:)`).
struct ConsumerChains {
    let own: PluginChain
    let full: RouteChain
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
    /// tcp/tls listeners: global connection-phase plugins plus the
    /// listener's own, by listener name; absent = none to run.
    let streamConnectionChains: [String: PluginChain]
    let hasChains: Bool
    /// Some consumer has plugins of its own (requests then switch chains
    /// once authenticated).
    let hasConsumerPlugins: Bool
    private let validated: ValidatedPlugins
    private let upstreamOfRoute: [String: String]
    /// (route, consumer) -> chains, built on this loop on first use.
    private var consumerChains: [String: ConsumerChains] = [:]
    /// Finished requests' plugin sides, each with its scope, waiting for
    /// the next requests of this loop (here, not in the runtime: a scope
    /// holds its runtime).
    /// `spareCount` of them, in a fixed buffer of `maxSpares`: an array's
    /// removeLast and append cost a uniqueness and a capacity check each,
    /// per request. Allocated last in `init`, after everything that throws.
    private let spares: UnsafeMutablePointer<ExchangePlugins>
    private var spareCount = 0
    /// Enough for the requests finishing in one event-loop turn at a few
    /// hundred connections: with fewer, a busy loop frees them and
    /// allocates new ones every turn (~1.5 KB each with the scope).
    static let maxSpares = 256
    /// A reload replaced this generation on its loop (`retire`): a finished
    /// request's plugin side is no longer kept by its connection.
    private(set) var retired = false

    /// The plugin side of a new request: a spare when one is free.
    func beginRequest(chain: RouteChain, handler: any ExchangeDownstream, exchange: Exchange,
                      path: String?, query: Substring, connection: PluginConnection?) -> ExchangePlugins {
        while spareCount > 0 {
            spareCount -= 1
            var spare = (spares + spareCount).move()
            // A closure of an async phase may still hold a finished request's
            // object (it returns when it sees the request ended): not reused.
            guard isKnownUniquelyReferenced(&spare) else { continue }
            spare.begin(loopPlugins: self, chain: chain, handler: handler, exchange: exchange,
                        path: path, query: query, connection: connection)
            return spare
        }
        return ExchangePlugins(loopPlugins: self, chain: chain, handler: handler, exchange: exchange,
                               path: path, query: query, connection: connection)
    }

    /// Keeps a finished request's plugin side for a later request. Whether
    /// something else still holds it is checked when it is taken out.
    func takeBack(_ finished: consuming ExchangePlugins) {
        guard spareCount < Self.maxSpares else { return }
        (spares + spareCount).initialize(to: finished)
        spareCount += 1
    }

    deinit {
        spares.deinitialize(count: spareCount)
        spares.deallocate()
    }

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
                                            filtersBody: effective.contains { $0.filtersBody })
        }
        self.routeChains = chains
        self.validated = plugins
        self.upstreamOfRoute = Dictionary(config.routes.map { ($0.name, $0.upstream) }, uniquingKeysWith: { a, _ in a })
        let connectionPlugins = plugins.global.filter { $0.definition.phases.contains(.connection) }
        self.connectionChain = connectionPlugins.isEmpty ? nil : try runtime.makeChain(connectionPlugins)
        var streamChains: [String: PluginChain] = [:]
        for listener in config.listeners where listener.protocol.isStream {
            let effective = plugins.connectionPlugins(listener: listener.name)
            if !effective.isEmpty { streamChains[listener.name] = try runtime.makeChain(effective) }
        }
        self.streamConnectionChains = streamChains
        self.hasConsumerPlugins = !plugins.consumers.values.allSatisfy(\.isEmpty)
        self.hasChains = !chains.isEmpty || connectionChain != nil || !plugins.consumers.values.allSatisfy(\.isEmpty)
            || !streamChains.isEmpty
        self.spares = .allocate(capacity: Self.maxSpares)
    }

    /// Once an auth plugin named the consumer: the consumer's own plugins
    /// and the request's chain from then on, where the consumer's configs
    /// win. nil if the consumer has no plugins.
    func chains(route: String, consumer: String) -> ConsumerChains? {
        guard let own = validated.consumers[consumer], !own.isEmpty else { return nil }
        let key = route + "\u{0}" + consumer
        if let cached = consumerChains[key] { return cached }
        let upstream = upstreamOfRoute[route]
        let full = validated.effective(route: route, upstream: upstream, consumer: consumer)
        guard let ownChain = try? runtime.makeChain(own), let fullChain = try? runtime.makeChain(full) else { return nil }
        let chains = ConsumerChains(own: ownChain, full: RouteChain(
            chain: fullChain, filtersBody: full.contains { $0.filtersBody }))
        consumerChains[key] = chains
        return chains
    }

    /// The last route asked for and its chain: consecutive requests on one
    /// route find it by identity instead of hashing the route's name (~0.4k
    /// instructions per request). Holding the route keeps its identity from
    /// being reused by another object.
    private var lastRoute: RouteRuntime?
    private var lastRouteChain: RouteChain?

    /// The chain of `route` (nil: the route runs no plugin).
    func chain(for route: RouteRuntime) -> RouteChain? {
        if route === lastRoute { return lastRouteChain }
        let chain = routeChains[route.name]
        lastRoute = route
        lastRouteChain = chain
        return chain
    }

    /// This generation was replaced on this loop: its timers stop, its
    /// batch queues send what they hold (bounded by the runtime's
    /// `retireFlushTimeout`), then its keep-alive connections close; the Lua
    /// state is freed when the last request (or that flush) holding it ends.
    /// Completes when that flush is over.
    @discardableResult
    func retire() -> EventLoopFuture<Void> {
        retired = true
        runtime.stopTimers()
        runtime.dropIdleCoroutines()
        let runtime = self.runtime
        return runtime.flushBatchQueues(timeout: runtime.options.retireFlushTimeout).map {
            runtime.closeOutboundConnections()
        }
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
