// Renders the running config back to YAML for the admin `/config`
// endpoint, with secrets replaced by "<redacted>": every consumer
// credential value, and plugin config values under keys that name a
// secret (password, secret, token, key, ...).

import Yams

/// The running config as YAML (same key names as the config file), secrets redacted.
public func redactedYAML(_ config: WeirConfig) -> String {
    config.redactedYAML()
}

extension WeirConfig {
    public func redactedYAML() -> String {
        let node = ConfigRendering.render(self)
        return (try? Yams.serialize(node: node, sortKeys: false)) ?? "# failed to render config\n"
    }
}

public enum ConfigRedaction {
    public static let placeholder = "<redacted>"

    /// Whether a plugin config key names a secret. Matches on the last
    /// `_`/`-` separated word so `key_names` or `hide_credentials` (plain
    /// settings) stay visible while `api_key`, `client_secret`,
    /// `password`, `auth_token` are hidden.
    public static func isSecretKey(_ key: String) -> Bool {
        let lower = key.lowercased()
        let words = lower.split(whereSeparator: { $0 == "_" || $0 == "-" || $0 == "." })
        guard let last = words.last else { return false }
        let secretWords: Set<Substring> = [
            "password", "passwd", "pass", "secret", "key", "apikey", "token", "credential", "credentials",
            "private", "privatekey", "signature",
        ]
        if secretWords.contains(last) && !(last == "credentials" && words.count > 1 && words[0] == "hide") {
            return true
        }
        return lower.contains("password") || lower.contains("secret") || lower.hasSuffix("token")
    }

    /// Plugin config with secret-named keys redacted, recursively.
    public static func redactPluginConfig(_ value: ConfigValue) -> ConfigValue {
        switch value {
        case .map(let map):
            var result: [String: ConfigValue] = [:]
            for (key, inner) in map {
                result[key] = isSecretKey(key) ? redactAll(inner) : redactPluginConfig(inner)
            }
            return .map(result)
        case .array(let items):
            return .array(items.map(redactPluginConfig))
        default:
            return value
        }
    }

    /// Every scalar leaf replaced (credentials are secret throughout);
    /// booleans and nulls carry no secret and stay.
    public static func redactAll(_ value: ConfigValue) -> ConfigValue {
        switch value {
        case .map(let map): return .map(map.mapValues(redactAll))
        case .array(let items): return .array(items.map(redactAll))
        case .null, .bool: return value
        case .int, .double, .string: return .string(placeholder)
        }
    }
}

enum ConfigRendering {
    static func seq(_ nodes: [Node]) -> Node { .sequence(Node.Sequence(nodes)) }
    static func map(_ pairs: [(Node, Node)]) -> Node { .mapping(Node.Mapping(pairs)) }

    static func render(_ config: WeirConfig) -> Node {
        var pairs: [(Node, Node)] = []
        pairs.append(("listeners", seq(config.listeners.map(render))))
        pairs.append(("upstreams", seq(config.upstreams.map(render))))
        pairs.append(("routes", seq(config.routes.map(render))))
        pairs.append(("plugins", plugins(config.plugins)))
        pairs.append(("plugin_paths", seq(config.pluginPaths.map { Node($0) })))
        pairs.append(("consumers", seq(config.consumers.map(render))))
        if let admin = config.admin { pairs.append(("admin", map([("listen", Node(admin.listen.description))]))) }
        if let workers = config.workers { pairs.append(("workers", Node(String(workers)))) }
        switch config.accessLog {
        case .off: pairs.append(("access_log", "off"))
        case .stdout: pairs.append(("access_log", "stdout"))
        case .file(let path): pairs.append(("access_log", Node(path)))
        }
        pairs.append(("forwarded", map([("trusted_proxies", seq(config.forwarded.trustedProxies.map { Node($0) }))])))
        pairs.append(("drain_timeout", Node(config.drainTimeout.description)))
        if !config.sharedDicts.isEmpty {
            pairs.append(("shared_dicts", seq(config.sharedDicts.map {
                map([("name", Node($0.name)), ("items", Node(String($0.capacity)))])
            })))
        }
        pairs.append(("lua", map([("instruction_budget", Node(String(config.lua.instructionBudget))),
                                  ("memory_limit", Node(String(config.lua.memoryLimit)))])))
        return map(pairs)
    }

    static func render(_ listener: ListenerConfig) -> Node {
        var pairs: [(Node, Node)] = [
            ("name", Node(listener.name)),
            ("listen", Node(listener.listen.description)),
            ("protocol", Node(listener.protocol.rawValue)),
        ]
        if let max = listener.maxConnections { pairs.append(("max_connections", Node(String(max)))) }
        let limits = listener.limits
        var limitPairs: [(Node, Node)] = [
            ("max_request_line", Node(String(limits.maxRequestLineBytes))),
            ("max_header_bytes", Node(String(limits.maxHeaderBytes))),
            ("max_header_count", Node(String(limits.maxHeaderCount))),
        ]
        if let body = limits.maxBodyBytes { limitPairs.append(("max_body", Node(String(body)))) }
        limitPairs.append(("header_timeout", Node(limits.headerTimeout.description)))
        limitPairs.append(("keepalive_timeout", Node(limits.keepAliveTimeout.description)))
        pairs.append(("limits", map(limitPairs)))
        if listener.protocol.isStream {
            if let upstream = listener.upstream { pairs.append(("upstream", Node(upstream))) }
            if !listener.sniRoutes.isEmpty {
                pairs.append(("sni_routes", seq(listener.sniRoutes.map { route in
                    map([("server_names", seq(route.serverNames.map { Node($0) })), ("upstream", Node(route.upstream))])
                })))
            }
            if !listener.plugins.isEmpty { pairs.append(("plugins", plugins(listener.plugins))) }
            let stream = listener.stream
            pairs.append(("idle_timeout", Node(stream.idleTimeout.description)))
            if let connect = stream.connectTimeout { pairs.append(("connect_timeout", Node(connect.description))) }
            if listener.protocol == .tls {
                pairs.append(("client_hello_timeout", Node(stream.clientHelloTimeout.description)))
                pairs.append(("max_client_hello", Node(String(stream.maxClientHelloBytes))))
            }
        }
        if let tls = listener.tls { pairs.append(("tls", render(tls))) }
        return map(pairs)
    }

    /// File paths only: certificates and keys are never read into /config.
    static func render(_ tls: ListenerTLSConfig) -> Node {
        var pairs: [(Node, Node)] = [
            ("certificates", seq(tls.certificates.map { certificate in
                var c: [(Node, Node)] = [("cert", Node(certificate.cert)), ("key", Node(certificate.key))]
                if !certificate.serverNames.isEmpty { c.append(("server_names", seq(certificate.serverNames.map { Node($0) }))) }
                return map(c)
            })),
            ("default_certificate", Node(String(tls.defaultCertificate))),
            ("min_version", Node(tls.minVersion.rawValue)),
        ]
        if let ciphers = tls.ciphers { pairs.append(("ciphers", seq(ciphers.map { Node($0) }))) }
        pairs.append(("alpn", seq(tls.alpn.map { Node($0) })))
        if let ca = tls.clientCA {
            pairs.append(("client_ca", Node(ca)))
            pairs.append(("client_auth", Node(tls.clientAuth.rawValue)))
        }
        pairs.append(("handshake_timeout", Node(tls.handshakeTimeout.description)))
        return map(pairs)
    }

    static func render(_ upstream: UpstreamConfig) -> Node {
        var pairs: [(Node, Node)] = [
            ("name", Node(upstream.name)),
            ("balancer", Node(upstream.balancer.rawValue)),
        ]
        if upstream.balancer == .consistentHash {
            switch upstream.hashOn {
            case .clientIP: pairs.append(("hash_on", "client_ip"))
            case .header(let name): pairs.append(("hash_on", Node("header:\(name)")))
            case .cookie(let name): pairs.append(("hash_on", Node("cookie:\(name)")))
            }
        }
        pairs.append(("targets", seq(upstream.targets.map {
            map([("address", Node($0.address.description)), ("weight", Node(String($0.weight)))])
        })))
        var health: [(Node, Node)] = []
        if let active = upstream.healthCheck.active {
            var typePairs: [(Node, Node)] = []
            switch active.type {
            case .grpc: typePairs = [("type", Node(active.type.rawValue)), ("service", Node(active.grpcService))]
            case .tcp: typePairs = [("type", Node(active.type.rawValue))]
            case .http: break
            }
            var activePairs = typePairs
            if active.type != .tcp { activePairs.append(("path", Node(active.path))) }
            activePairs += [
                ("interval", Node(active.interval.description)),
                ("timeout", Node(active.timeout.description)),
                ("healthy", Node(String(active.healthy))),
                ("unhealthy", Node(String(active.unhealthy))),
            ]
            if active.type != .tcp {
                activePairs.append(("healthy_statuses", Node("\(active.healthyStatuses.lowerBound)-\(active.healthyStatuses.upperBound)")))
            }
            health.append(("active", map(activePairs)))
        }
        if let passive = upstream.healthCheck.passive {
            health.append(("passive", map([
                ("consecutive_failures", Node(String(passive.consecutiveFailures))),
                ("ejection", Node(passive.ejection.description)),
                ("max_ejection", Node(passive.maxEjection.description)),
            ])))
        }
        if !health.isEmpty { pairs.append(("health_check", map(health))) }
        var timeouts: [(Node, Node)] = [
            ("connect", Node(upstream.timeouts.connect.description)),
            ("read", Node(upstream.timeouts.read.description)),
            ("write", Node(upstream.timeouts.write.description)),
        ]
        if let request = upstream.timeouts.request { timeouts.append(("request", Node(request.description))) }
        pairs.append(("timeouts", map(timeouts)))
        pairs.append(("retries", Node(String(upstream.retries))))
        var pool: [(Node, Node)] = [
            ("max_idle", Node(String(upstream.pool.maxIdle))),
            ("idle_timeout", Node(upstream.pool.idleTimeout.description)),
        ]
        if let maxRequests = upstream.pool.maxRequests { pool.append(("max_requests", Node(String(maxRequests)))) }
        pairs.append(("pool", map(pool)))
        if upstream.upstreamProtocol != .http1 {
            pairs.append(("protocol", Node(upstream.upstreamProtocol.rawValue)))
            pairs.append(("http2", map([
                ("max_connections", Node(String(upstream.http2.maxConnections))),
                ("max_concurrent_streams", Node(String(upstream.http2.maxConcurrentStreams))),
            ])))
        }
        if !upstream.plugins.isEmpty { pairs.append(("plugins", plugins(upstream.plugins))) }
        if let tls = upstream.tls {
            var t: [(Node, Node)] = [("enabled", "true"), ("verify", Node(tls.verify ? "true" : "false"))]
            if let ca = tls.ca { t.append(("ca", Node(ca))) }
            if let sni = tls.sni { t.append(("sni", Node(sni))) }
            if let cert = tls.cert { t.append(("cert", Node(cert))) }
            if let key = tls.key { t.append(("key", Node(key))) }
            pairs.append(("tls", map(t)))
        }
        return map(pairs)
    }

    static func render(_ route: RouteConfig) -> Node {
        var match: [(Node, Node)] = []
        if !route.match.hosts.isEmpty { match.append(("hosts", seq(route.match.hosts.map { Node($0) }))) }
        if !route.match.paths.isEmpty {
            match.append(("paths", seq(route.match.paths.map { pattern -> Node in
                switch pattern {
                case .prefix(let p): return Node(p)
                case .exact(let p): return Node("= " + p)
                case .regex(let r): return Node("~ " + r)
                }
            })))
        }
        if !route.match.methods.isEmpty { match.append(("methods", seq(route.match.methods.map { Node($0) }))) }
        if !route.match.headers.isEmpty {
            match.append(("headers", map(route.match.headers.map { (Node($0.name), seq($0.values.map { Node($0) })) })))
        }
        var pairs: [(Node, Node)] = [("name", Node(route.name))]
        if !match.isEmpty { pairs.append(("match", map(match))) }
        pairs.append(("upstream", Node(route.upstream)))
        if route.stripPath { pairs.append(("strip_path", "true")) }
        if let rewrite = route.rewritePath { pairs.append(("rewrite_path", Node(rewrite))) }
        if route.preserveHost { pairs.append(("preserve_host", "true")) }
        if let body = route.maxBodyBytes { pairs.append(("max_body", Node(String(body)))) }
        if !route.plugins.isEmpty { pairs.append(("plugins", plugins(route.plugins))) }
        return map(pairs)
    }

    static func render(_ consumer: ConsumerConfig) -> Node {
        var pairs: [(Node, Node)] = [("name", Node(consumer.name))]
        if !consumer.groups.isEmpty { pairs.append(("groups", seq(consumer.groups.map { Node($0) }))) }
        if !consumer.credentials.isEmpty {
            pairs.append(("credentials", map(consumer.credentials.keys.sorted().map {
                (Node($0), value(ConfigRedaction.redactAll(consumer.credentials[$0]!)))
            })))
        }
        if !consumer.plugins.isEmpty { pairs.append(("plugins", plugins(consumer.plugins))) }
        return map(pairs)
    }

    static func plugins(_ plugins: [PluginRef]) -> Node {
        seq(plugins.map { plugin in
            var pairs: [(Node, Node)] = [("name", Node(plugin.name))]
            if plugin.config != .map([:]) { pairs.append(("config", value(ConfigRedaction.redactPluginConfig(plugin.config)))) }
            if !plugin.enabled { pairs.append(("enabled", "false")) }
            return map(pairs)
        })
    }

    static func value(_ value: ConfigValue) -> Node {
        switch value {
        case .null: return Node("null")
        case .bool(let b): return Node(b ? "true" : "false")
        case .int(let i): return Node(String(i))
        case .double(let d): return Node(String(d))
        case .string(let s): return Node(s, Tag(.str), .doubleQuoted)
        case .array(let items): return seq(items.map { self.value($0) })
        case .map(let dictionary): return map(dictionary.keys.sorted().map { (Node($0), self.value(dictionary[$0]!)) })
        }
    }
}
