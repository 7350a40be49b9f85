import Atomics
import Logging
import NIOCore
import NIOHTTP1
import WeirCore

/// An upstream as the data path needs it: config, shared health, and the
/// `host:port` label of each target (Host header, logs).
final class UpstreamRuntime: Sendable {
    let index: Int
    let name: String
    let config: UpstreamConfig
    let health: UpstreamHealth
    let targetLabels: [String]

    /// `previous`: the same-named upstream of the generation before a
    /// reload; its targets' health carries over by address.
    init(index: Int, config: UpstreamConfig, previous: UpstreamRuntime? = nil) {
        self.index = index
        self.name = config.name
        self.config = config
        if let previous, previous.config == config {
            self.health = previous.health      // unchanged: keep the very same state
        } else {
            self.health = UpstreamHealth(upstream: config, inheritingFrom: previous?.health)
        }
        self.targetLabels = config.targets.map { $0.address.description }
    }
}

extension UpstreamHealth {
    func recordFailure(target: Int) { recordFailure(target, now: MonotonicClock.now()) }
    func recordSuccess(target: Int) { recordSuccess(target) }
}

/// One configured route as the data path reads it, made once per config
/// (not per request): a request refers to it instead of copying the
/// `RouteConfig` struct (a dozen retain/release pairs per copy, callgrind).
final class RouteRuntime: Sendable {
    let index: Int
    let config: RouteConfig
    let name: String
    let preserveHost: Bool
    let maxBodyBytes: Int?

    init(index: Int, config: RouteConfig) {
        self.index = index
        self.config = config
        self.name = config.name
        self.preserveHost = config.preserveHost
        self.maxBodyBytes = config.maxBodyBytes
    }
}

/// The route a request matched and where it goes. A class on purpose: the
/// exchange reads it many times per request.
final class RoutedRequest {
    let route: RouteRuntime
    let upstream: UpstreamRuntime
    /// Path after strip_path / rewrite_path, with the original query
    /// appended; nil when that is the client's request target as received
    /// (then the upstream request line is copied as is, and one shared
    /// `RoutedRequest` per route serves every such request: see
    /// `LoopContext.route`).
    let forwardURI: String?
    /// The routing generation the request started on: its balancers and
    /// pools serve every attempt, even after a reload swapped in another.
    let routing: LoopRouting
    /// `upstream`'s balancer and target pools in `routing`, looked up once
    /// here: through `routing`'s arrays each attempt copied the element
    /// out (a retain/release pair per use, callgrind).
    let balancer: any LoadBalancer
    let pools: [TargetPool]

    /// The observer's counter for this route's requests on this loop,
    /// once found (`requestCounter(observer:)`).
    private(set) var counter: RequestCounter?

    init(route: RouteRuntime, upstream: UpstreamRuntime, forwardURI: String?, routing: LoopRouting) {
        self.route = route
        self.upstream = upstream
        self.forwardURI = forwardURI
        self.routing = routing
        self.balancer = routing.balancer(for: upstream)
        self.pools = routing.pools[upstream.index]
    }

    /// Where the request is counted when the observer wants no access
    /// record (`LoopRouting.requestCounter`), kept here once found: the
    /// shared `RoutedRequest` of a route (`LoopContext.route`) serves all
    /// its requests forwarded as received, so they find it in one load.
    func requestCounter(observer: ProxyObserver) -> RequestCounter? {
        if let counter { return counter }
        counter = routing.requestCounter(route: route, upstream: upstream, observer: observer)
        return counter
    }

    /// `head` and `clientIP` are read for consistent_hash only: the other
    /// balancers get no copy of the fields or the address (each copy is a
    /// retain/release pair per request).
    func pickTarget(head: RequestHead, clientIP: @autoclosure () -> String,
                    excluding: Int?, now: UInt64) -> Int? {
        guard upstream.config.balancer == .consistentHash else {
            return balancer.pick(BalancerInput(clientIP: "", now: now), excluding: excluding)
        }
        var input = BalancerInput(clientIP: clientIP(), now: now)
        switch upstream.config.hashOn {
        case .header(let name): input.hashKey = head.wire.fields.first(named: name)
        case .cookie(let name): input.hashKey = LoopRouting.cookie(named: name, in: head.wire.fields)
        case .clientIP: break
        }
        return balancer.pick(input, excluding: excluding)
    }
}

/// Everything compiled from one config that every event loop reads.
/// Immutable after init, so shared without locks.
final class ProxyRuntime: @unchecked Sendable {
    let config: WeirConfig
    let routeTable: RouteTable
    /// Indexed like `config.routes` (and the route table's matches).
    let routes: [RouteRuntime]
    let upstreams: [UpstreamRuntime]
    /// route index -> upstream index
    private let routeUpstream: [Int]
    let trustedProxies: [CIDRBlock]
    /// tcp/tls listeners' routing, by listener name (L4/StreamRouting.swift).
    let streamRouting: [String: StreamListenerRouting]
    /// TLS contexts of TLS upstreams (shared across reloads; see Sources/WeirProxy/TLS/).
    let upstreamTLS: UpstreamTLSRegistry

    struct InvalidConfig: Error, CustomStringConvertible {
        let description: String
    }

    /// `previous`: the runtime a reload replaces (upstream health carries over).
    init(config: WeirConfig, previous: ProxyRuntime? = nil, upstreamTLS: UpstreamTLSRegistry? = nil) throws {
        self.config = config
        self.upstreamTLS = upstreamTLS ?? previous?.upstreamTLS ?? UpstreamTLSRegistry()
        self.routeTable = try RouteTable(routes: config.routes)
        self.routes = config.routes.enumerated().map { RouteRuntime(index: $0, config: $1) }
        self.upstreams = config.upstreams.enumerated().map { index, upstream in
            UpstreamRuntime(index: index, config: upstream, previous: previous?.upstreams.first { $0.name == upstream.name })
        }
        var byName: [String: Int] = [:]
        for upstream in upstreams { byName[upstream.name] = upstream.index }
        var routeUpstream: [Int] = []
        for (i, route) in config.routes.enumerated() {
            guard let index = byName[route.upstream] else {
                throw InvalidConfig(description: "routes[\(i)].upstream: unknown upstream \"\(route.upstream)\"")
            }
            routeUpstream.append(index)
        }
        for upstream in upstreams where upstream.config.targets.isEmpty {
            throw InvalidConfig(description: "upstream \"\(upstream.name)\" has no targets")
        }
        self.routeUpstream = routeUpstream
        self.trustedProxies = try config.forwarded.trustedProxies.map { try CIDRBlock(parsing: $0) }
        self.streamRouting = try Self.compileStreamRouting(config: config, upstreams: upstreams)
    }

    func upstream(forRoute routeIndex: Int) -> UpstreamRuntime { upstreams[routeUpstream[routeIndex]] }
}

/// One routing generation on one event loop: the compiled runtime plus this
/// loop's balancers and the target pools its upstreams use. A reload swaps
/// `LoopContext.routing`; a request keeps the `LoopRouting` it was routed
/// with (`RoutedRequest.routing`). Only touched on its loop.
final class LoopRouting {
    let runtime: ProxyRuntime
    /// [upstream][target]
    let pools: [[TargetPool]]
    private let balancers: [LoadBalancer]
    /// Per route, the observer's request counter for this loop (see
    /// `requestCounter`), made on first use.
    private var requestCounters: [RequestCounter?] = []
    /// The observer `requestCounters` came from (a server has one).
    private var countersObserver: ObjectIdentifier?

    init(runtime: ProxyRuntime, pools: [[TargetPool]]) {
        self.runtime = runtime
        self.pools = pools
        self.balancers = runtime.upstreams.map { makeBalancer(for: $0.config, health: $0.health) }
    }

    /// Where a finished request of `route` is counted when the observer
    /// wants no access record: the observer's counter for (route name,
    /// upstream name) on this loop, asked for once per route and kept, so
    /// a request pays no lookup of its cell (thread-local shard, name
    /// comparison) and copies no name. nil when the observer keeps none
    /// (then `requestCounted` takes a sample), or for a second observer.
    func requestCounter(route: RouteRuntime, upstream: UpstreamRuntime, observer: ProxyObserver) -> RequestCounter? {
        let owner = ObjectIdentifier(observer)
        if countersObserver == nil {
            countersObserver = owner
            requestCounters = Array(repeating: nil, count: runtime.routes.count)
        }
        guard owner == countersObserver else { return nil }
        if let counter = requestCounters[route.index] { return counter }
        guard let counter = observer.requestCounter(route: route.name, upstream: upstream.name) else { return nil }
        requestCounters[route.index] = counter
        return counter
    }

    /// tcp/tls connections have no request head: consistent_hash hashes the client IP.
    func pickStreamTarget(upstream: UpstreamRuntime, clientIP: String, excluding: Int?) -> Int? {
        balancers[upstream.index].pick(BalancerInput(clientIP: clientIP), excluding: excluding)
    }

    func balancer(for upstream: UpstreamRuntime) -> any LoadBalancer {
        balancers[upstream.index]
    }

    func balancerStarted(upstream: UpstreamRuntime, target: Int) {
        balancers[upstream.index].requestStarted(target: target)
    }

    func balancerFinished(upstream: UpstreamRuntime, target: Int) {
        balancers[upstream.index].requestFinished(target: target)
    }

    static func cookie(named name: String, in headers: HTTP1Fields) -> String? {
        for header in headers.values(named: "cookie") {
            for pair in header.split(separator: ";") {
                let trimmed = pair.trimmingASCIISpaces()
                guard let eq = trimmed.firstIndex(of: "=") else { continue }
                if trimmed[..<eq] == name[...] { return String(trimmed[trimmed.index(after: eq)...]) }
            }
        }
        return nil
    }
}


/// A listener's config plus what its connections share: the observer and
/// the open-connection count (for `max_connections`).
final class ListenerRuntime: Sendable {
    let name: String
    let config: ListenerConfig
    let scheme: String
    let observer: ProxyObserver?
    /// The observer takes `AccessRecord`s (read once: an observer's
    /// `wantsAccessRecords` does not change). Only then, or with plugins (a
    /// log phase reads one), does an exchange need its wall-clock start.
    let observerWantsAccessRecords: Bool
    let openConnections = ManagedAtomic<Int>(0)
    private let serverConnections: ManagedAtomic<Int>
    /// Set on https listeners: certificates and the TLS front of the pipeline.
    let tls: ListenerTLS?

    init(config: ListenerConfig, observer: ProxyObserver?, serverConnections: ManagedAtomic<Int>, tls: ListenerTLS? = nil) {
        self.name = config.name
        self.tls = tls
        self.config = config
        self.scheme = config.protocol == .https ? "https" : "http"
        self.observer = observer
        self.observerWantsAccessRecords = observer?.wantsAccessRecords ?? false
        self.serverConnections = serverConnections
    }

    /// Counts a new connection; false when the listener is full.
    func admitConnection() -> Bool {
        let now = openConnections.wrappingIncrementThenLoad(ordering: .relaxed)
        serverConnections.wrappingIncrement(ordering: .relaxed)
        if let max = config.maxConnections, now > max {
            connectionClosed()
            return false
        }
        return true
    }

    func connectionClosed() {
        openConnections.wrappingDecrement(ordering: .relaxed)
        serverConnections.wrappingDecrement(ordering: .relaxed)
    }
}

/// What `LoopContext.routeAsReceived` found for a request target.
enum TargetRouting {
    case routed(RoutedRequest)
    case noRoute
    /// Not the usual target (absolute form, `*`, a query, a path to
    /// normalize): route it as a String.
    case notPlain
}

/// Per-event-loop state: the current routing (pools, balancers), request
/// ids and the live connections (for drain). Only touched on its own loop,
/// so no locks.
final class LoopContext: @unchecked Sendable {
    let loop: EventLoop
    let requestIDs = RequestIDGenerator()
    /// The `Date` value for responses the proxy writes itself.
    let dateCache = HTTPDateCache()
    /// The time of the I/O event being handled, one clock read per event.
    let clock = LoopClock()
    /// The routing new requests use; swapped on the loop by a reload.
    private(set) var routing: LoopRouting {
        didSet { routedAsReceived = Array(repeating: nil, count: routing.runtime.routes.count) }
    }
    /// Per route of `routing`, the `RoutedRequest` of requests forwarded with
    /// their own target (`forwardURI` nil), made on first use: no object per
    /// request. Held here, not by `LoopRouting`, which each of them refers to.
    private var routedAsReceived: [RoutedRequest?] = []
    var runtime: ProxyRuntime { routing.runtime }
    /// Every live target pool, by target address and pool settings: a
    /// reload that keeps a target keeps its pool and so its warm
    /// keep-alive connections.
    private var poolsByKey: [String: TargetPool] = [:]
    private var connections: [ObjectIdentifier: DownstreamHandler] = [:]
    private var tunnels: [ObjectIdentifier: Channel] = [:]
    private var http2Connections: [ObjectIdentifier: HTTP2DownstreamConnection] = [:]
    private var sweepTask: RepeatedTask?
    private var draining = false
    /// This loop's plugins of the current generation; nil when the config
    /// attaches none. Swapped on the loop by a reload (see Generations/).
    var plugins: LoopPlugins? {
        didSet {
            // Idle connections let go of the old generation's plugin sides
            // (`DownstreamHandler.sparePlugins`): they pin its Lua state.
            guard oldValue !== plugins else { return }
            for handler in connections.values { handler.sparePlugins = nil }
        }
    }

    /// Per-exchange events worth a look when debugging (connect failures,
    /// timeouts, malformed input). Debug level: the access log already
    /// records every request's outcome.
    let logger: Logger

    init(loop: EventLoop, runtime: ProxyRuntime, logger: Logger) {
        self.loop = loop
        self.logger = logger
        var pools: [String: TargetPool] = [:]
        self.routing = LoopRouting(runtime: runtime, pools: Self.pools(for: runtime, loop: loop, reusing: [:], into: &pools))
        self.routedAsReceived = Array(repeating: nil, count: runtime.routes.count)
        self.poolsByKey = pools
    }

    /// The route for a request, on the current routing. `path` is normalized
    /// and without query; `query` is empty or starts with `?`;
    /// `targetIsPathAndQuery`: the client's request target is exactly `path`
    /// + `query` (origin-form, normalizing changed nothing), so a route that
    /// forwards the path unchanged forwards that target as is.
    func route(head: RequestHead, host: String, path: String, query: Substring,
               targetIsPathAndQuery: Bool) -> RoutedRequest? {
        let routing = self.routing
        let runtime = routing.runtime
        guard let match = runtime.routeTable.matchIndex(method: head.method.rawValue, host: host, path: path,
                                                        headers: RequestHeadLookup(head: head)) else { return nil }
        if targetIsPathAndQuery && match.forwardPath == path {
            return sharedRoutedRequest(routing: routing, routeIndex: match.routeIndex)
        }
        var forward = match.forwardPath
        if !query.isEmpty { forward += query }
        return RoutedRequest(route: runtime.routes[match.routeIndex], upstream: runtime.upstream(forRoute: match.routeIndex),
                             forwardURI: forward, routing: routing)
    }

    /// `route` for the usual request target, an origin-form path without
    /// a query that normalizing leaves as it is, routed by its bytes (no
    /// String of the target): `.notPlain` for any other target (the caller
    /// routes it as a String).
    func routeAsReceived(head: RequestHead, host: String, target: UnsafeBufferPointer<UInt8>) -> TargetRouting {
        guard RequestPath.isNormal(target), target.firstIndex(of: UInt8(ascii: "?")) == nil else { return .notPlain }
        // unowned(unsafe): `self.routing` holds all three for the whole
        // call (only `installRouting` replaces it, on this loop, never
        // during a match); strong locals were three retain/release pairs
        // per request (callgrind).
        unowned(unsafe) let routing = self.routing
        unowned(unsafe) let runtime = routing.runtime
        unowned(unsafe) let table = runtime.routeTable
        guard let match = table.matchIndex(method: head.method.rawValue, host: host, pathBytes: target,
                                           headers: RequestHeadLookup(head: head)) else { return .noRoute }
        if case .rewritten(let forward) = match.forwardPath, !forward.utf8.elementsEqual(target) {
            return .routed(RoutedRequest(route: runtime.routes[match.routeIndex], upstream: runtime.upstream(forRoute: match.routeIndex),
                                         forwardURI: forward, routing: routing))
        }
        return .routed(sharedRoutedRequest(routing: routing, routeIndex: match.routeIndex))
    }

    /// The `RoutedRequest` of `routeIndex`'s requests forwarded with their
    /// own target, made on first use (`routedAsReceived`).
    private func sharedRoutedRequest(routing: LoopRouting, routeIndex: Int) -> RoutedRequest {
        if let shared = routedAsReceived[routeIndex] { return shared }
        let runtime = routing.runtime
        let shared = RoutedRequest(route: runtime.routes[routeIndex], upstream: runtime.upstream(forRoute: routeIndex),
                                   forwardURI: nil, routing: routing)
        routedAsReceived[routeIndex] = shared
        return shared
    }

    private static func poolKey(_ upstream: UpstreamConfig, _ target: TargetConfig) -> String {
        "\(target.address)|\(upstream.pool)|\(upstream.timeouts.connect.nanoseconds)|\(upstream.upstreamProtocol)|\(upstream.http2)|\(upstream.tls.map { "tls \($0)" } ?? "plain")"
    }

    /// [upstream][target] pools for `runtime`, taken from `existing` where
    /// the key matches; every pool used is put in `used`.
    private static func pools(for runtime: ProxyRuntime, loop: EventLoop, reusing existing: [String: TargetPool],
                              into used: inout [String: TargetPool]) -> [[TargetPool]] {
        runtime.upstreams.map { upstream in
            upstream.config.targets.enumerated().map { index, target in
                let key = poolKey(upstream.config, target)
                if let pool = used[key] ?? existing[key] {
                    used[key] = pool
                    return pool
                }
                let pool = TargetPool(targetIndex: index, target: target, pool: upstream.config.pool,
                                      connectTimeout: .nanoseconds(upstream.config.timeouts.connect.nanoseconds), loop: loop,
                                      http2: upstream.config.upstreamProtocol == .http2 ? upstream.config.http2 : nil)
                if upstream.config.tls != nil {
                    let registry = runtime.upstreamTLS, name = upstream.name
                    pool.tls = { registry.context(forUpstream: name) }
                }
                used[key] = pool
                return pool
            }
        }
    }

    /// A reload: new requests route with `runtime`. Pools of targets that
    /// remain are kept; the others are retired (idle connections close now,
    /// busy ones when their exchange ends). Call on `loop`.
    func installRouting(_ runtime: ProxyRuntime) {
        loop.preconditionInEventLoop()
        var used: [String: TargetPool] = [:]
        let pools = Self.pools(for: runtime, loop: loop, reusing: poolsByKey, into: &used)
        for (key, pool) in poolsByKey where used[key] == nil { pool.retire() }
        poolsByKey = used
        routing = LoopRouting(runtime: runtime, pools: pools)
    }

    /// Starts the idle-connection sweeper.
    func start() {
        let shortest = runtime.upstreams.map { $0.config.pool.idleTimeout.nanoseconds }.min() ?? 60_000_000_000
        let interval = max(100_000_000, min(5_000_000_000, shortest / 2))
        sweepTask = loop.scheduleRepeatedTask(initialDelay: .nanoseconds(interval), delay: .nanoseconds(interval)) { [weak self] _ in
            guard let self else { return }
            let now = NIODeadline.now()
            for pool in self.poolsByKey.values { pool.sweep(now: now) }
        }
    }

    func stop() {
        sweepTask?.cancel()
        sweepTask = nil
        for pool in poolsByKey.values { pool.closeAll() }
    }

    // MARK: Live connections (drain)

    func register(_ handler: DownstreamHandler) {
        connections[ObjectIdentifier(handler)] = handler
        if draining { handler.beginDrain() }
    }

    func unregister(_ handler: DownstreamHandler) {
        connections.removeValue(forKey: ObjectIdentifier(handler))
    }

    /// The open HTTP/1.1 connections' handlers (tests: that a closed one
    /// is freed, see DownstreamLifetimeTests).
    var registeredHandlers: [DownstreamHandler] { Array(connections.values) }

    func beginDrain() {
        draining = true
        for handler in Array(connections.values) { handler.beginDrain() }
        for connection in Array(http2Connections.values) { connection.beginDrain() }
    }

    func forceCloseAll() {
        for handler in Array(connections.values) { handler.forceClose() }
        for channel in Array(tunnels.values) { channel.close(promise: nil) }
        for connection in Array(http2Connections.values) { connection.forceClose() }
    }

    /// Downstream HTTP/2 connections (drained with GOAWAY).
    func registerHTTP2(_ connection: HTTP2DownstreamConnection) {
        http2Connections[ObjectIdentifier(connection)] = connection
        if draining { connection.beginDrain() }
    }

    func unregisterHTTP2(_ connection: HTTP2DownstreamConnection) {
        http2Connections.removeValue(forKey: ObjectIdentifier(connection))
    }

    /// The open downstream HTTP/2 connections (tests: that a closed one is
    /// freed, see DownstreamLifetimeTests).
    var registeredHTTP2Connections: [HTTP2DownstreamConnection] { Array(http2Connections.values) }

    /// Downstream channels that became raw tunnels (after a 101).
    func registerTunnel(_ channel: Channel) {
        tunnels[ObjectIdentifier(channel)] = channel
    }

    func unregisterTunnel(_ channel: Channel) {
        tunnels.removeValue(forKey: ObjectIdentifier(channel))
    }
}
