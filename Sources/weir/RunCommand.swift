import ArgumentParser
import Atomics
import Foundation
import Logging
import NIOCore
import NIOPosix
import WeirAdmin
import WeirCore
import WeirProxy

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the proxy on a config file.",
        discussion: """
            Logs go to stderr; the access log goes where `access_log` says (stdout by default).
            SIGTERM or SIGINT: stop accepting, let in-flight requests finish for up to
            `drain_timeout`, then exit 0. A second signal exits at once.
            SIGUSR1: reopen the access log file (after logrotate renamed it).
            SIGHUP, `weir reload`, POST /reload on the admin listener, or a change to the config
            file or a plugin file (polled once a second, see --no-watch): hot reload of the plugins
            (a new generation; in-flight requests finish on the old one; a failed reload keeps
            serving and is shown on GET /status).
            Exit status: 0 after a clean shutdown, 1 on a bad config or a listener that
            cannot bind, 2 for a mode this build does not offer.
            """
    )

    @Option(name: .shortAndLong, help: "Path to the YAML config file.")
    var config: String

    @Option(help: "gateway (centralized, north-south) or sidecar (per replica; not available yet).")
    var mode: String = ProxyMode.gateway.rawValue

    @Option(help: "Event loop threads (default: the config's `workers`, else one per core).")
    var workers: Int?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Flag(inversion: .prefixedNo, help: "Reload when the config file or a plugin file changes (polled once a second).")
    var watch: Bool = true

    func validate() throws {
        guard ProxyMode(rawValue: mode) != nil else {
            throw ValidationError("--mode must be one of: \(ProxyMode.allCases.map(\.rawValue).joined(separator: ", ")) (got \"\(mode)\")")
        }
        if let workers = workers, workers < 1 { throw ValidationError("--workers must be at least 1") }
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of: \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    func run() throws {
        // Before any thread starts (see SignalWatcher): a stop, reload or
        // log-reopen signal sent during the start-up waits for its watcher.
        SignalWatcher.blockBeforeStartingThreads(SignalWatcher.terminationSignals + [SIGHUP, SIGUSR1])
        if ProxyMode(rawValue: mode) == .sidecar {
            printError("weir: sidecar mode is not available yet; use --mode gateway")
            throw ExitCode(2)
        }
        let check = ConfigCheck.run(path: config)
        guard let weirConfig = check.config else {
            printError(check.message)
            throw ExitCode(check.exitCode)
        }
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "weir")
        // A closed stdout pipe (access log) must be an EPIPE the writer
        // counts, not a signal that kills the gateway.
        signal(SIGPIPE, SIG_IGN)
        let exitCode = Gateway(config: weirConfig, configPath: config, watch: watch,
                               workers: workers ?? weirConfig.workers ?? System.coreCount,
                               logger: logger).runUntilSignalled()
        if exitCode != 0 { throw ExitCode(exitCode) }
    }
}

/// Everything `weir run` starts, in order, and stops in reverse.
final class Gateway {
    private let config: WeirConfig
    private let configPath: String
    private let watch: Bool
    private let workers: Int
    private let logger: Logger

    init(config: WeirConfig, configPath: String, watch: Bool, workers: Int, logger: Logger) {
        self.config = config
        self.configPath = configPath
        self.watch = watch
        self.workers = workers
        self.logger = logger
    }

    /// Starts serving and blocks until a signal ends the drain. Returns the exit code.
    func runUntilSignalled() -> Int32 {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: workers)
        defer { try? group.syncShutdownGracefully() }

        let accessLog: AccessLogWriter?
        do {
            accessLog = try AccessLogWriter.make(target: config.accessLog)
        } catch {
            printError("weir: \(error)")
            return 1
        }
        defer { accessLog?.shutdown() }
        let observer = GatewayObserver(accessLog: accessLog)

        let proxy = ProxyServer(config: config, group: group, observer: observer, logger: logger)
        let pluginMetrics = PluginMetrics()
        let generations: GenerationManager
        do {
            // Plugins first (a bad plugin refuses to start), then the listeners.
            generations = try GenerationManager(server: proxy, config: config, configPath: configPath,
                                                metrics: pluginMetrics, logger: logger)
            try proxy.start()
        } catch {
            printError("weir: \(error)")
            return 1
        }
        if watch { generations.startWatching() }
        defer { generations.stopWatching() }
        let config = self.config
        observer.metrics.setHealthSource { Gateway.targetHealth(config: generations.currentConfig, proxy: proxy) }

        let checker = ActiveHealthCheckers(group: group, proxy: proxy, logger: logger)
        checker.replace(upstreams: config.upstreams)
        // A reload may change upstreams: probe the new set (health state
        // itself carries over by target address, see UpstreamHealth).
        generations.onReload { newConfig in checker.replace(upstreams: newConfig.upstreams) }

        let ready = ManagedAtomic<Bool>(false)
        var admin: AdminServer?
        if let adminConfig = config.admin {
            let endpoints = AdminEndpoints(
                isReady: { ready.load(ordering: .relaxed) },
                metricsText: { observer.metrics.renderPrometheus() + pluginMetrics.renderPrometheus() },
                configText: { generations.currentConfig.redactedYAML() },
                upstreamsJSON: {
                    UpstreamStatusReport.json(upstreams: generations.currentConfig.upstreams,
                                              health: { proxy.upstreamHealth(named: $0) })
                },
                routes: Gateway.reloadRoutes(generations))
            let server = AdminServer(listen: adminConfig.listen, group: group, endpoints: endpoints, logger: logger)
            do {
                try server.start().wait()
            } catch {
                printError("weir: admin listener could not bind \(adminConfig.listen): \(error)")
                checker.stop()
                proxy.shutdown()
                return 1
            }
            logger.info("admin listening", metadata: ["address": "\(server.boundAddress.map(hostPortText) ?? "\(adminConfig.listen)")"])
            admin = server
        }
        // Signals arrive on their own queue; the main thread waits for the drain.
        let drained = DispatchSemaphore(value: 0)
        let signalCount = ManagedAtomic<Int>(0)
        let drainTimeout = TimeAmount.nanoseconds(config.drainTimeout.nanoseconds)
        let logger = self.logger
        let signals = SignalWatcher.onTermination { signalNumber in
            let count = signalCount.loadThenWrappingIncrement(ordering: .relaxed) + 1
            if count > 1 {
                logger.warning("second signal: exiting without waiting for the drain")
                exit(1)
            }
            logger.info("draining", metadata: ["signal": "\(signalNumber)", "timeout": "\(config.drainTimeout)",
                                               "connections": "\(proxy.activeConnections)"])
            ready.store(false, ordering: .relaxed)
            checker.stop()
            proxy.waitForDrain(timeout: drainTimeout).whenComplete { _ in drained.signal() }
        }
        // SIGHUP: hot reload (off the signal queue's thread, never on a loop).
        let hangup = SignalWatcher([SIGHUP]) { _ in generations.reload() }
        // SIGUSR1 (as in nginx): reopen the access log file after logrotate
        // moved it. SIGHUP is kept for config reload.
        let reopen = SignalWatcher([SIGUSR1]) { _ in
            do {
                try accessLog?.reopen()
                logger.info("access log reopened")
            } catch {
                logger.error("access log reopen failed", metadata: ["error": "\(error)"])
            }
        }
        // Ready only once signals are watched, so "ready" always means a
        // SIGTERM from here on drains instead of killing (one sent earlier
        // is pending, blocked since `run()` began, and drains too).
        ready.store(true, ordering: .relaxed)
        self.logger.info("weir started", metadata: ["workers": "\(workers)", "mode": "gateway",
                                                    "active_health_checks": "\(checker.targetCount)"])
        drained.wait()
        signals.cancel()
        reopen.cancel()
        hangup.cancel()
        // Records and spans still queued by http-log / tracing go out first.
        generations.retireForShutdown()

        proxy.shutdown()
        if let admin = admin { try? admin.stop().wait() }
        logger.info("stopped")
        return 0
    }

    /// `POST /reload` (200 with the new generation, 400 with the error for a
    /// bad config or plugin, 500 otherwise) and `GET /status`.
    static func reloadRoutes(_ generations: GenerationManager) -> [AdminRoute] {
        [
            AdminRoute(method: .POST, path: "/reload") { _, loop in
                generations.reloadInBackground(on: loop).map { result in
                    switch result {
                    case .success(let number):
                        return AdminResponse(status: .ok, contentType: "application/json",
                                             body: "{\"status\":\"reloaded\",\"generation\":\(number)}\n")
                    case .failure(let error):
                        return AdminResponse(status: error.isConfigError ? .badRequest : .internalServerError,
                                             contentType: "application/json",
                                             body: "{\"status\":\"failed\",\"error\":\(GenerationManager.jsonString(error.description))}\n")
                    }
                }
            },
            AdminRoute(method: .GET, path: "/status") { _, loop in
                loop.makeSucceededFuture(AdminResponse(status: .ok, contentType: "application/json", body: generations.statusJSON))
            },
        ]
    }

    /// The active health checker of the current upstream set; a reload
    /// stops the old checker and starts one for the new upstreams.
    final class ActiveHealthCheckers: @unchecked Sendable {
        private let group: EventLoopGroup
        private let proxy: ProxyServer
        private let logger: Logger
        private let lock = NSLock()
        private var current: ActiveHealthChecker?
        private var stopped = false

        init(group: EventLoopGroup, proxy: ProxyServer, logger: Logger) {
            self.group = group
            self.proxy = proxy
            self.logger = logger
        }

        var targetCount: Int { locked { current?.targetCount ?? 0 } }

        func replace(upstreams: [UpstreamConfig]) {
            let proxy = self.proxy
            let next = ActiveHealthChecker(upstreams: upstreams, eventLoop: group.next(), logger: logger,
                                           upstreamTLS: proxy.tls?.upstreams,
                                           sinkForUpstream: { proxy.upstreamHealth(named: $0) })
            let previous = locked { () -> ActiveHealthChecker? in
                guard !stopped else { return nil }
                defer { current = next }
                return current
            }
            previous?.stop()
            if locked({ current === next }) { next.start() }
        }

        private func locked<T>(_ body: () -> T) -> T {
            lock.lock()
            defer { lock.unlock() }
            return body()
        }

        func stop() {
            let previous = locked { () -> ActiveHealthChecker? in
                stopped = true
                defer { current = nil }
                return current
            }
            previous?.stop()
        }
    }

    /// Per-target health for the metrics, read at scrape time.
    static func targetHealth(config: WeirConfig, proxy: ProxyServer) -> [MetricsRegistry.TargetHealth] {
        let now = MonotonicClock.now()
        var result: [MetricsRegistry.TargetHealth] = []
        for upstream in config.upstreams {
            guard let health = proxy.upstreamHealth(named: upstream.name) else { continue }
            for (index, target) in upstream.targets.enumerated() where index < health.targetCount {
                result.append(.init(upstream: upstream.name, target: target.address.description,
                                    healthy: health.isHealthy(index, now: now)))
            }
        }
        return result
    }
}

/// `127.0.0.1:9901` / `[::1]:9901` rather than NIO's `[IPv4]127.0.0.1/127.0.0.1:9901`.
func hostPortText(_ address: SocketAddress) -> String {
    guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
    return HostPort(host: ip, port: port).description
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data((message + "\n").utf8))
}
