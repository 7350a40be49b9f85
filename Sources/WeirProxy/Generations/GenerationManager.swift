import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import WeirCore
import WeirLua

/// Owns the plugin generations of a running `ProxyServer` and hot reloads
/// them.
///
/// A reload reads the config, loads and compiles the plugins, validates
/// their configs and builds one Lua runtime per event loop, all on the
/// calling thread (never an event loop); then each loop swaps its
/// `LoopContext.plugins` reference on the loop itself. A request keeps the
/// generation it started on (`ExchangePlugins` holds it); the next request
/// on a keep-alive connection uses the new one. A replaced generation's
/// timers stop at once and its Lua states are freed with its last request.
///
/// What a reload may change: routes, upstreams (their targets, balancers,
/// pools, timeouts, health checks) and consumers; plugins (global, route,
/// upstream, consumer attachments and their configs), `plugin_paths`, the
/// plugin files, and `lua` limits. The routing (route table, upstreams,
/// per-loop balancers) swaps on each loop together with the plugins, so a
/// request sees one consistent generation; it keeps the routing it was
/// routed with (`RoutedRequest.routing`). Target pools are kept by address,
/// so unchanged targets keep their warm connections; upstream health
/// carries over by target address. Listeners and `shared_dicts` (and other
/// process settings) are fixed for the life of the process: a reload that
/// changes them is refused with a message saying so (restart to apply
/// them). `weir.shared` data lives in one process-wide
/// `SharedDictionaries`, so it survives every reload.
public final class GenerationManager: @unchecked Sendable {
    /// What `GET /status` reports.
    public struct Status: Sendable {
        public var generation: Int
        /// Wall-clock seconds since 1970 of the last reload attempt.
        public var lastReloadTime: Double?
        public var lastReloadSucceeded: Bool?
        public var lastReloadError: String?
        public var reloads: Int
        public var failedReloads: Int
    }

    public struct ReloadError: Error, CustomStringConvertible, Sendable {
        /// True when the config itself (YAML, a plugin config, a Lua file)
        /// is at fault, as opposed to the server.
        public var isConfigError: Bool
        public var description: String
    }

    private let server: ProxyServer
    private let configPath: String?
    private let baseDirectory: String
    private let sdk: LuaSDK
    public let shared: SharedDictionaries
    /// Per-plugin timings and outcomes, across generations (nil: not measured).
    public let metrics: PluginMetrics?
    private let logger: Logger
    /// Serialises reloads (a signal, the admin API and the watcher may race).
    private let reloadLock = NIOLock()
    private let stateLock = NIOLock()
    private var config: WeirConfig
    private var current: PluginGeneration?
    private var _status = Status(generation: 0, reloads: 0, failedReloads: 0)
    private var watcher: FileWatcher?
    private var reloadObservers: [@Sendable (WeirConfig) -> Void] = []

    /// Loads generation 1 from `config` and installs it on every loop of
    /// `server` (call before `server.start()` or right after). Throws with
    /// the file and line of a Lua error or the path of a bad plugin config.
    /// `configPath` is what reloads re-read (nil: only `reload(config:)`).
    public init(server: ProxyServer, config: WeirConfig, configPath: String?, baseDirectory: String? = nil,
                sdk: LuaSDK? = nil, metrics: PluginMetrics? = nil, logger: Logger) throws {
        self.server = server
        self.configPath = configPath
        self.baseDirectory = baseDirectory
            ?? configPath.map { ($0 as NSString).deletingLastPathComponent }.map { $0.isEmpty ? "." : $0 }
            ?? FileManager.default.currentDirectoryPath
        self.sdk = try sdk ?? LuaSDK.locate()
        self.shared = SharedDictionaries(capacities: Dictionary(config.sharedDicts.map { ($0.name, $0.capacity) },
                                                                uniquingKeysWith: { a, _ in a }))
        self.metrics = metrics
        self.logger = logger
        self.config = config
        let generation = try build(number: 1, config: config)
        install(generation, routing: nil)
        _status.generation = 1
    }

    public var status: Status { stateLock.withLock { _status } }
    /// The config of the generation serving now.
    public var currentConfig: WeirConfig { stateLock.withLock { config } }

    /// Called (on the reloading thread) after each successful reload with
    /// the new config, e.g. to restart active health checks.
    public func onReload(_ observer: @escaping @Sendable (WeirConfig) -> Void) {
        stateLock.withLock { reloadObservers.append(observer) }
    }
    public var generation: Int { status.generation }

    /// Re-reads the config file and swaps in a new generation. On failure
    /// the current generation keeps serving. Blocks: never call it on an
    /// event loop (`reloadInBackground` does the hop).
    @discardableResult
    public func reload() -> Result<Int, ReloadError> {
        guard let configPath else {
            return record(.failure(ReloadError(isConfigError: false, description: "no config file to reload from")))
        }
        return reloadLock.withLock {
            let config: WeirConfig
            do {
                config = try ConfigLoader.load(path: configPath, fileChecks: TLSFileCheck.issues)
            } catch {
                return record(.failure(ReloadError(isConfigError: true, description: "\(error)")))
            }
            return locked_reload(config: config)
        }
    }

    /// Swaps in a generation built from `config` (tests, embedding).
    @discardableResult
    public func reload(config: WeirConfig) -> Result<Int, ReloadError> {
        reloadLock.withLock { locked_reload(config: config) }
    }

    /// `reload()` on a background queue, completing on `loop`.
    public func reloadInBackground(on loop: EventLoop) -> EventLoopFuture<Result<Int, ReloadError>> {
        let promise = loop.makePromise(of: Result<Int, ReloadError>.self)
        DispatchQueue.global().async { promise.succeed(self.reload()) }
        return promise.futureResult
    }

    private func locked_reload(config newConfig: WeirConfig) -> Result<Int, ReloadError> {
        let start = DispatchTime.now().uptimeNanoseconds
        if let problem = Self.fixedPartsChanged(from: config, to: newConfig) {
            return record(.failure(ReloadError(isConfigError: true, description: problem)))
        }
        let number = status.generation + 1
        let generation: PluginGeneration
        var routing: ProxyRuntime? = nil
        let installTLS: () -> Void
        do {
            // Certificates and keys are re-read on every reload (a changed
            // file triggers one through the watcher); a bad one fails it.
            installTLS = try server.prepareTLS(config: newConfig)
            if Self.routingChanged(from: config, to: newConfig) {
                routing = try server.makeRouting(config: newConfig)
            }
            generation = try build(number: number, config: newConfig)
        } catch {
            return record(.failure(ReloadError(isConfigError: true, description: "\(error)")))
        }
        install(generation, routing: routing)
        installTLS()
        let observers = stateLock.withLock { () -> [@Sendable (WeirConfig) -> Void] in
            config = newConfig
            return reloadObservers
        }
        for observer in observers { observer(newConfig) }
        let ms = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
        logger.info("reloaded", metadata: ["generation": "\(number)", "plugins": "\(generation.library.plugins.count)",
                                           "ms": "\(String(format: "%.1f", ms))"])
        return record(.success(number))
    }

    private func build(number: Int, config: WeirConfig) throws -> PluginGeneration {
        var options = LuaRuntimeOptions()
        options.shared = shared
        options.credentials = ConsumerCredentials(consumers: config.consumers)
        options.instructionBudget = config.lua.instructionBudget
        options.memoryLimit = config.lua.memoryLimit
        options.observer = metrics
        options.outboundTLS = PluginOutboundTLS()
        let logger = self.logger
        options.log = { record in
            let level: Logger.Level
            switch record.level {
            case .debug: level = .debug
            case .info: level = .info
            case .warn: level = .warning
            case .error: level = .error
            }
            logger.log(level: level, "\(record.message)", metadata: [
                "plugin": "\(record.plugin)", "request_id": "\(record.requestID ?? "")",
                "phase": "\(record.phase?.rawValue ?? "")",
            ])
        }
        return try PluginGeneration.build(number: number, config: config, baseDirectory: baseDirectory, sdk: sdk,
                                          options: options, loops: server.loopContexts.map(\.loop))
    }

    /// Hands each loop its part of `generation` (and the new routing, if
    /// any, in the same hop) and retires the old one there.
    private func install(_ generation: PluginGeneration, routing: ProxyRuntime?) {
        let old = stateLock.withLock { () -> PluginGeneration? in
            defer { current = generation }
            return current
        }
        if let routing { server.adoptRouting(routing) }
        let swaps = zip(server.loopContexts, generation.perLoop).map { context, loopPlugins in
            context.loop.submit {
                if let routing { context.installRouting(routing) }
                let previous = context.plugins
                context.plugins = generation.isEmpty ? nil : loopPlugins
                previous?.retire()
                if previous == nil, let old {
                    // The old generation had no plugins on the data path, but may have timers.
                    old.perLoop.first { $0.loop === context.loop }?.retire()
                }
            }
        }
        // A reload only returns once every loop serves the new generation.
        for swap in swaps { try? swap.wait() }
    }

    /// Shutdown, after the drain: the current generation is retired like a
    /// reload's old one, so its `weir.batch` queues (http-log records,
    /// tracing spans) send what they hold before the process exits (each
    /// loop bounded by `LuaRuntimeOptions.retireFlushTimeout`). Blocks:
    /// never call it on an event loop.
    public func retireForShutdown() {
        guard let generation = stateLock.withLock({ current }) else { return }
        let flushes = generation.perLoop.map { loopPlugins in loopPlugins.loop.flatSubmit { loopPlugins.retire() } }
        for flush in flushes { try? flush.wait() }
    }

    @discardableResult
    private func record(_ result: Result<Int, ReloadError>) -> Result<Int, ReloadError> {
        stateLock.withLock {
            _status.lastReloadTime = Date().timeIntervalSince1970
            switch result {
            case .success(let number):
                _status.generation = number
                _status.lastReloadSucceeded = true
                _status.lastReloadError = nil
                _status.reloads += 1
            case .failure(let error):
                _status.lastReloadSucceeded = false
                _status.lastReloadError = error.description
                _status.failedReloads += 1
            }
        }
        if case .failure(let error) = result {
            logger.error("reload failed; the current generation keeps serving", metadata: ["error": "\(error.description)"])
        }
        return result
    }

    /// True when routes or upstreams differ other than in their plugins
    /// (plugin-only reloads keep the routing objects, balancer state included).
    static func routingChanged(from old: WeirConfig, to new: WeirConfig) -> Bool {
        func routing(_ c: WeirConfig) -> ([RouteConfig], [UpstreamConfig], [ListenerConfig]) {
            (c.routes.map { var x = $0; x.plugins = []; return x }, c.upstreams.map { var x = $0; x.plugins = []; return x },
             c.listeners.map { var x = $0; x.plugins = []; return x })   // tcp/tls listeners route by upstream/sni_routes
        }
        let a = routing(old), b = routing(new)
        return a.0 != b.0 || a.1 != b.1 || a.2 != b.2
    }

    /// nil when only reloadable parts differ; otherwise what changed.
    static func fixedPartsChanged(from old: WeirConfig, to new: WeirConfig) -> String? {
        func fixed(_ c: WeirConfig) -> WeirConfig {
            var c = c
            c.plugins = []
            c.pluginPaths = []
            c.lua = LuaLimitsConfig()
            c.consumers = []
            c.routes = []
            c.upstreams = []
            // A tcp/tls listener's routing, plugins and timeouts apply per
            // new connection, so they reload; its address and protocol do not.
            c.listeners = c.listeners.map(\.fixedPart)
            return c
        }
        let a = fixed(old), b = fixed(new)
        if a == b { return nil }
        var changed: [String] = []
        if a.listeners != b.listeners { changed.append("listeners") }
        if a.sharedDicts != b.sharedDicts { changed.append("shared_dicts") }
        if changed.isEmpty { changed.append("settings outside routes, upstreams, consumers and plugins") }
        return "reload can change routes, upstreams, consumers, plugins, their configs, plugin_paths, lua limits, "
            + "https listeners' tls and the upstream, sni_routes, plugins and timeouts of tcp/tls listeners; "
            + "this config also changes " + changed.joined(separator: ", ") + ": restart weir to apply that"
    }

    // MARK: Status

    /// `GET /status` body.
    public var statusJSON: String {
        let s = status
        var fields = ["\"generation\":\(s.generation)", "\"reloads\":\(s.reloads)", "\"failed_reloads\":\(s.failedReloads)"]
        if let t = s.lastReloadTime {
            fields.append("\"last_reload_time\":\"\(ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: t)))\"")
        }
        if let ok = s.lastReloadSucceeded { fields.append("\"last_reload_result\":\"\(ok ? "ok" : "failed")\"") }
        if let error = s.lastReloadError { fields.append("\"last_reload_error\":\(Self.jsonString(error))") }
        let watching = stateLock.withLock { watcher != nil }
        fields.append("\"watching\":\(watching)")
        if let tls = server.tls, !tls.listeners.isEmpty { fields.append("\"tls\":" + tls.statusJSON()) }
        return "{" + fields.joined(separator: ",") + "}\n"
    }

    public static func jsonString(_ s: String) -> String {
        var buffer = ByteBuffer()
        ProxyErrorResponse.writeJSONString(s, into: &buffer)
        return buffer.readString(length: buffer.readableBytes) ?? "\"\""
    }

    // MARK: Watching files

    /// Polls the config file and the plugin folders once per `interval`
    /// and reloads once a change has settled (no further change for one
    /// interval), so an editor's burst of writes triggers one reload.
    public func startWatching(interval: Double = 1.0) {
        stateLock.withLock {
            guard watcher == nil else { return }
            watcher = FileWatcher(interval: interval, paths: { [weak self] in self?.watchedPaths() ?? [] }) { [weak self] in
                self?.reload()
            }
        }
    }

    public func stopWatching() {
        let w = stateLock.withLock { () -> FileWatcher? in defer { watcher = nil }; return watcher }
        w?.stop()
    }

    private func watchedPaths() -> [String] {
        let (config, generation) = stateLock.withLock { (self.config, self.current) }
        var paths: [String] = configPath.map { [$0] } ?? []
        for path in config.pluginPaths { paths.append(path.hasPrefix("/") ? path : baseDirectory + "/" + path) }
        paths += ProxyTLS.files(of: config)
        for definition in generation?.library.plugins.values.sorted(by: { $0.name < $1.name }) ?? [] {
            paths.append(definition.handlerPath)
            paths.append(definition.schemaPath)
        }
        return paths
    }
}

/// Polls mtimes and sizes (stat) of a set of paths on a background queue.
final class FileWatcher: @unchecked Sendable {
    private let timer: DispatchSourceTimer
    private var lastSignature: [String]? = nil
    private var changedPending = false

    init(interval: Double, paths: @escaping () -> [String], onChange: @escaping () -> Void) {
        let queue = DispatchQueue(label: "weir.reload.watch")
        timer = DispatchSource.makeTimerSource(queue: queue)
        timer.schedule(deadline: .now() + interval, repeating: interval)
        timer.setEventHandler { [weak self] in
            guard let self else { return }
            let signature = paths().map(Self.signature)
            defer { self.lastSignature = signature }
            guard let last = self.lastSignature else { return }
            if signature != last {
                self.changedPending = true          // still changing: wait for it to settle
            } else if self.changedPending {
                self.changedPending = false
                onChange()
            }
        }
        timer.resume()
    }

    private static func signature(_ path: String) -> String {
        var st = stat()
        guard stat(path, &st) == 0 else { return path + ":absent" }
        return "\(path):\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec):\(st.st_size)"
    }

    func stop() { timer.cancel() }

    deinit { timer.cancel() }
}
