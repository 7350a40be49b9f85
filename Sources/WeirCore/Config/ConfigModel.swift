// The declarative configuration model: what `weir.yaml` says, after parsing
// and validation. Plain values with defaults, no I/O. The YAML shape is the
// user-facing contract (DESIGN.md "Config shape"): keys may be added, never
// renamed. The parser (ConfigLoader) maps YAML keys in snake_case onto these.

/// A span of time parsed from `250ms`, `2s`, `1m`, `1h`.
public struct TimeSpan: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var nanoseconds: Int64
    public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }
    public static func milliseconds(_ ms: Int64) -> TimeSpan { .init(nanoseconds: ms * 1_000_000) }
    public static func seconds(_ s: Int64) -> TimeSpan { .init(nanoseconds: s * 1_000_000_000) }
    public var milliseconds: Int64 { nanoseconds / 1_000_000 }
    public static func < (a: TimeSpan, b: TimeSpan) -> Bool { a.nanoseconds < b.nanoseconds }
    public var description: String {
        if nanoseconds % 1_000_000_000 == 0 { return "\(nanoseconds / 1_000_000_000)s" }
        return "\(nanoseconds / 1_000_000)ms"
    }
}

/// A host and port, from `127.0.0.1:8080`, `[::1]:8080` or `example.com:80`.
public struct HostPort: Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public init(host: String, port: Int) { self.host = host; self.port = port }
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

public enum ListenerProtocol: String, Sendable, CaseIterable {
    case http, https, tcp, tls
}

public enum ProxyMode: String, Sendable, CaseIterable {
    case gateway, sidecar
}

/// Limits applied to downstream requests. Defaults follow what nginx and
/// Envoy ship (see ANCHORS.md "Default limits").
public struct RequestLimits: Hashable, Sendable {
    /// Longest request line (method, target, version) accepted; longer gets 414.
    public var maxRequestLineBytes: Int = 8 * 1024
    /// Total bytes of all request headers; more gets 431.
    public var maxHeaderBytes: Int = 60 * 1024
    /// Number of request header fields; more gets 431.
    public var maxHeaderCount: Int = 100
    /// Request body size; larger gets 413. nil means unlimited (bodies stream).
    public var maxBodyBytes: Int? = nil
    /// Time allowed to receive the complete request head; then 408 and close.
    public var headerTimeout: TimeSpan = .seconds(30)
    /// Idle time allowed between requests on a keep-alive connection.
    public var keepAliveTimeout: TimeSpan = .seconds(60)
    public init() {}
}

public struct ListenerConfig: Hashable, Sendable {
    public var name: String = ""
    public var listen: HostPort = HostPort(host: "127.0.0.1", port: 8080)
    public var `protocol`: ListenerProtocol = .http
    /// Open downstream connections allowed on this listener; nil = unlimited.
    public var maxConnections: Int? = nil
    public var limits: RequestLimits = RequestLimits()
    /// tcp/tls listeners (StreamListenerConfig.swift): the upstream their
    /// connections go to (tls: when no `sni_routes` entry matches).
    public var upstream: String? = nil
    /// tls listeners: upstreams by the ClientHello's server name.
    public var sniRoutes: [SNIRoute] = []
    /// tcp/tls listeners: plugins whose connection phase runs for each
    /// connection (after the global ones).
    public var plugins: [PluginRef] = []
    public var stream: StreamSettings = StreamSettings()
    /// Required for `protocol: https`; not allowed on other protocols.
    public var tls: ListenerTLSConfig? = nil
    /// http/https listeners: downstream HTTP/2 (HTTP2ListenerConfig.swift).
    public var http2: HTTP2ListenerSettings = HTTP2ListenerSettings()
    public init() {}
}

public enum BalancerKind: String, Sendable, CaseIterable {
    case roundRobin = "round_robin"
    case leastRequest = "least_request"
    case consistentHash = "consistent_hash"
    case random
}

/// What `consistent_hash` hashes on.
public enum HashKey: Hashable, Sendable {
    case header(String)
    case cookie(String)
    case clientIP
}

public struct TargetConfig: Hashable, Sendable {
    public var address: HostPort
    public var weight: Int = 1
    public init(address: HostPort, weight: Int = 1) { self.address = address; self.weight = weight }
}

/// How an active health probe asks a target.
public enum ActiveHealthCheckType: String, Sendable, CaseIterable {
    /// HTTP/1.1 `GET path`; healthy when the status is in `healthy_statuses`.
    case http
    /// `grpc.health.v1.Health/Check` over HTTP/2 (prior knowledge);
    /// healthy when the answer is SERVING with grpc-status 0.
    case grpc
    /// A TCP connect; healthy when accepted (upstreams behind tcp/tls
    /// listeners, which may not speak HTTP at all).
    case tcp
}

public struct ActiveHealthCheck: Hashable, Sendable {
    /// Default: tcp for an upstream that only tcp/tls listeners use (no
    /// route), else http (resolved by ConfigLoader).
    public var type: ActiveHealthCheckType = .http
    /// The service name a gRPC probe asks about ("" = the whole server).
    public var grpcService: String = ""
    public var path: String = "/healthz"
    public var interval: TimeSpan = .seconds(5)
    public var timeout: TimeSpan = .seconds(1)
    /// Consecutive successes that bring an unhealthy target back.
    public var healthy: Int = 2
    /// Consecutive failures that mark a target unhealthy.
    public var unhealthy: Int = 3
    /// Statuses counted as healthy (default 200-399).
    public var healthyStatuses: ClosedRange<Int> = 200...399
    public init() {}
}

public struct PassiveHealthCheck: Hashable, Sendable {
    /// Consecutive connect failures or 5xx responses that eject a target.
    public var consecutiveFailures: Int = 5
    /// How long an ejected target stays out before it is tried again. A
    /// target ejected again without a success in between stays out twice as
    /// long each time (backoff), up to `maxEjection`.
    public var ejection: TimeSpan = .seconds(30)
    /// Cap for the backed-off ejection time (never below `ejection`).
    public var maxEjection: TimeSpan = .seconds(300)
    public init() {}
}

public struct HealthCheckConfig: Hashable, Sendable {
    public var active: ActiveHealthCheck? = nil
    public var passive: PassiveHealthCheck? = nil
    public init() {}
}

public struct UpstreamTimeouts: Hashable, Sendable {
    public var connect: TimeSpan = .seconds(5)
    /// Max time waiting for the next bytes of the upstream response.
    public var read: TimeSpan = .seconds(60)
    /// Max time waiting for the upstream to accept request bytes.
    public var write: TimeSpan = .seconds(60)
    /// Whole exchange, first byte sent to last byte received; nil = none.
    public var request: TimeSpan? = nil
    public init() {}
}

public struct ConnectionPoolConfig: Hashable, Sendable {
    /// Idle keep-alive connections kept per target per event loop.
    public var maxIdle: Int = 64
    public var idleTimeout: TimeSpan = .seconds(60)
    /// Requests sent over one upstream connection before it is retired; nil = unlimited.
    public var maxRequests: Int? = nil
    public init() {}
}

/// How the proxy talks to an upstream's targets.
public enum UpstreamProtocol: String, Sendable, CaseIterable {
    /// HTTP/1.1 keep-alive connections, one request at a time each.
    case http1
    /// HTTP/2 (prior knowledge on cleartext): requests are streams
    /// multiplexed over a few connections per target per event loop.
    case http2
}

/// HTTP/2 upstream connection settings (`http2:` on an upstream).
public struct UpstreamHTTP2Config: Hashable, Sendable {
    /// Connections per target per event loop; a new one opens only when
    /// every open one is at the server's SETTINGS_MAX_CONCURRENT_STREAMS.
    public var maxConnections: Int = 4
    /// Our own cap on concurrent streams per connection (the server's
    /// SETTINGS_MAX_CONCURRENT_STREAMS lowers it further).
    public var maxConcurrentStreams: Int = 100
    public init() {}
}

public struct UpstreamConfig: Hashable, Sendable {
    public var name: String = ""
    /// `protocol:` http1 (default) or http2.
    public var upstreamProtocol: UpstreamProtocol = .http1
    public var http2: UpstreamHTTP2Config = UpstreamHTTP2Config()
    public var balancer: BalancerKind = .roundRobin
    /// Only for `consistent_hash`; defaults to the client IP.
    public var hashOn: HashKey = .clientIP
    public var targets: [TargetConfig] = []
    public var healthCheck: HealthCheckConfig = HealthCheckConfig()
    public var timeouts: UpstreamTimeouts = UpstreamTimeouts()
    public var retries: Int = 1
    public var pool: ConnectionPoolConfig = ConnectionPoolConfig()
    /// Plugins attached to every route that uses this upstream.
    public var plugins: [PluginRef] = []
    /// TLS to the targets; nil (or `enabled: false`) = plain TCP.
    public var tls: UpstreamTLSConfig? = nil
    public init() {}
}

/// One path pattern of a route. In YAML: `/orders` is a prefix,
/// `= /orders` (or `=/orders`) is exact, `~ ^/orders/\d+$` is a regex.
public enum PathPattern: Hashable, Sendable {
    case prefix(String)
    case exact(String)
    case regex(String)
}

/// A header condition: the header must be present with one of `values`
/// (exact, case-sensitive), or merely present when `values` is empty.
public struct HeaderMatch: Hashable, Sendable {
    public var name: String
    public var values: [String]
    public init(name: String, values: [String]) { self.name = name; self.values = values }
}

public struct RouteMatchConfig: Hashable, Sendable {
    /// Exact host names or `*.example.com` wildcards; empty matches any host.
    public var hosts: [String] = []
    public var paths: [PathPattern] = []
    /// Upper-case methods; empty matches any method.
    public var methods: [String] = []
    public var headers: [HeaderMatch] = []
    public init() {}
}

/// A plugin attached globally, to a route, upstream or consumer.
/// `config` is the raw YAML value; the plugin's schema validates it.
public struct PluginRef: Hashable, Sendable {
    public var name: String
    public var config: ConfigValue
    public var enabled: Bool = true
    public init(name: String, config: ConfigValue = .map([:]), enabled: Bool = true) {
        self.name = name; self.config = config; self.enabled = enabled
    }
}

/// A schema-free config value (plugin configs, credentials) kept as parsed.
public indirect enum ConfigValue: Hashable, Sendable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([ConfigValue])
    case map([String: ConfigValue])
}

public struct RouteConfig: Hashable, Sendable {
    public var name: String = ""
    public var match: RouteMatchConfig = RouteMatchConfig()
    public var upstream: String = ""
    /// Remove the matched path prefix before forwarding (prefix paths only).
    public var stripPath: Bool = false
    /// Replace the forwarded path: a fixed path, or for regex paths a
    /// template with `$1`..`$9` capture references.
    public var rewritePath: String? = nil
    /// Forward the client's Host header instead of the target's address.
    public var preserveHost: Bool = false
    /// Route-specific body limit; overrides the listener's.
    public var maxBodyBytes: Int? = nil
    public var plugins: [PluginRef] = []
    public init() {}
}

public struct ConsumerConfig: Hashable, Sendable {
    public var name: String = ""
    public var groups: [String] = []
    /// Credentials per auth plugin, e.g. `key-auth: [{key: alice-key}]`.
    public var credentials: [String: ConfigValue] = [:]
    public var plugins: [PluginRef] = []
    public init() {}
}

public struct AdminConfig: Hashable, Sendable {
    public var listen: HostPort = HostPort(host: "127.0.0.1", port: 9901)
    public init() {}
}

public enum AccessLogTarget: Hashable, Sendable {
    case off
    case stdout
    case file(String)
}

/// How incoming X-Forwarded-For is treated.
public struct ForwardedConfig: Hashable, Sendable {
    /// Client addresses (CIDRs) whose X-Forwarded-For is trusted and appended
    /// to; from anyone else it is replaced by the peer address.
    public var trustedProxies: [String] = []
    public init() {}
}

public struct WeirConfig: Hashable, Sendable {
    public var listeners: [ListenerConfig] = []
    public var upstreams: [UpstreamConfig] = []
    public var routes: [RouteConfig] = []
    /// The global plugin chain.
    public var plugins: [PluginRef] = []
    /// Folders searched in order for `plugins/<name>/handler.lua`.
    public var pluginPaths: [String] = ["plugins"]
    public var consumers: [ConsumerConfig] = []
    public var admin: AdminConfig? = nil
    /// Event loops; nil means one per core.
    public var workers: Int? = nil
    public var accessLog: AccessLogTarget = .stdout
    public var forwarded: ForwardedConfig = ForwardedConfig()
    /// How long in-flight requests may run after SIGTERM before exit.
    public var drainTimeout: TimeSpan = .seconds(30)
    /// `weir.shared` dictionaries (process-wide, kept across reloads).
    public var sharedDicts: [SharedDictConfig] = []
    /// Limits for plugin code.
    public var lua: LuaLimitsConfig = LuaLimitsConfig()
    public init() {}
}

/// A `weir.shared` dictionary: `shared_dicts: [{ name: counters, size: 10m }]`
/// (or `items: 50000`). Entries beyond the item cap evict the least recently used.
public struct SharedDictConfig: Hashable, Sendable {
    public var name: String
    /// Item cap. From `items`, or from `size` at an assumed ~256 bytes per
    /// entry (nginx's `lua_shared_dict` sizes are bytes; ours caps entries).
    public var capacity: Int
    public init(name: String, capacity: Int) { self.name = name; self.capacity = capacity }
    public static let assumedBytesPerEntry = 256
}

/// `lua: { instruction_budget: 10000000, memory_limit: 64m }`.
public struct LuaLimitsConfig: Hashable, Sendable {
    /// VM instructions per plugin per phase call, counted once the call has
    /// run longer than the Lua watchdog's 10-20 ms (shorter calls are never
    /// counted; see lua/README.md "Limits"); 0 disables the budget.
    public var instructionBudget: Int = 10_000_000
    /// Bytes per Lua state (one state per event loop per generation).
    public var memoryLimit: Int = 64 << 20
    public init() {}
}

// MARK: - TLS

/// A TLS protocol version a listener may require as its minimum.
public enum TLSMinimumVersion: String, Sendable, CaseIterable {
    case v1_2 = "1.2"
    case v1_3 = "1.3"
}

/// Whether a listener asks clients for a certificate (`client_auth`).
public enum ClientCertificateMode: String, Sendable, CaseIterable {
    /// A client without a certificate signed by `client_ca` fails the handshake.
    case required
    /// A client may send none; one it sends must verify against `client_ca`.
    case optional
}

/// One certificate of a listener: PEM chain (leaf first) and its PEM key.
/// Paths are resolved against the config file's folder by `ConfigLoader.load`.
public struct TLSCertificateConfig: Hashable, Sendable {
    public var cert: String
    public var key: String
    /// Server names this certificate serves, exact or `*.example.com`;
    /// empty = the DNS names of the certificate itself (SANs, else the CN).
    public var serverNames: [String] = []
    public init(cert: String, key: String, serverNames: [String] = []) {
        self.cert = cert; self.key = key; self.serverNames = serverNames
    }
}

/// `tls:` on a `protocol: https` listener.
public struct ListenerTLSConfig: Hashable, Sendable {
    /// Chosen by the client's SNI: exact name, then the longest wildcard
    /// suffix; the default certificate (`default_certificate`, else the
    /// first) serves clients without SNI or with an unknown name.
    public var certificates: [TLSCertificateConfig] = []
    /// Index into `certificates` of the default certificate.
    public var defaultCertificate: Int = 0
    public var minVersion: TLSMinimumVersion = .v1_2
    /// OpenSSL-style TLS 1.2 cipher names (`ECDHE-RSA-AES128-GCM-SHA256`);
    /// nil = swift-nio-ssl's defaults. TLS 1.3 suites are not configurable.
    public var ciphers: [String]? = nil
    /// ALPN protocols offered, in server preference order.
    public var alpn: [String] = ["http/1.1"]
    /// PEM bundle of CAs that sign client certificates; nil = no client certificates asked.
    public var clientCA: String? = nil
    public var clientAuth: ClientCertificateMode = .required
    /// Time a client has to complete the handshake after connecting.
    public var handshakeTimeout: TimeSpan = .seconds(10)
    public init() {}

    /// Every file this block reads (for the reload watcher).
    public var files: [String] {
        certificates.flatMap { [$0.cert, $0.key] } + (clientCA.map { [$0] } ?? [])
    }
}

/// `tls:` on an upstream: TLS to its targets (and to their health checks).
public struct UpstreamTLSConfig: Hashable, Sendable {
    public var enabled: Bool = true
    /// PEM bundle of CAs trusted for the targets' certificates; nil = the system's.
    public var ca: String? = nil
    /// Verify the target's certificate chain and host name (off only for tests).
    public var verify: Bool = true
    /// Server name sent (SNI) and checked against the certificate; nil = the target's host.
    public var sni: String? = nil
    /// Client certificate and key presented to the targets (mTLS).
    public var cert: String? = nil
    public var key: String? = nil
    public init() {}

    public var files: [String] {
        [ca, cert, key].compactMap { $0 }
    }
}
