// The per-section readers: one function per YAML block of the config
// shape in DESIGN.md. Keys are snake_case; each reader lists the keys it
// knows so anything else is reported as unknown.

import Foundation
import Yams

extension ConfigReader {
    func readConfig(_ root: Node?) -> WeirConfig {
        var config = WeirConfig()
        guard let root = root else {
            report("", "config is empty")
            return config
        }
        guard let f = fields(root, "", known: [
            "listeners", "upstreams", "routes", "plugins", "plugin_paths", "consumers", "admin",
            "workers", "access_log", "forwarded", "drain_timeout", "shared_dicts", "lua",
        ]) else { return config }

        if let node = f["listeners"] {
            config.listeners = list(node, f.path("listeners")).compactMap { readListener($0.node, $0.path) }
        }
        if let node = f["upstreams"] {
            config.upstreams = list(node, f.path("upstreams")).compactMap { readUpstream($0.node, $0.path) }
        }
        if let node = f["routes"] {
            config.routes = list(node, f.path("routes")).enumerated().compactMap {
                readRoute($0.element.node, $0.element.path, index: $0.offset)
            }
        }
        if let node = f["plugins"] { config.plugins = readPlugins(node, f.path("plugins")) }
        if let node = f["plugin_paths"] { config.pluginPaths = stringList(node, f.path("plugin_paths")) }
        if let node = f["consumers"] {
            config.consumers = list(node, f.path("consumers")).compactMap { readConsumer($0.node, $0.path) }
        }
        if let node = f["admin"] { config.admin = readAdmin(node, f.path("admin")) }
        if let node = f["workers"] { config.workers = int(node, f.path("workers"), min: 1, max: 1024) }
        if let node = f["access_log"] { config.accessLog = readAccessLog(node, f.path("access_log")) ?? .stdout }
        if let node = f["forwarded"] { config.forwarded = readForwarded(node, f.path("forwarded")) }
        if let node = f["drain_timeout"] {
            config.drainTimeout = duration(node, f.path("drain_timeout"), positive: false) ?? config.drainTimeout
        }
        if let node = f["shared_dicts"] {
            var seen = Set<String>()
            for item in list(node, f.path("shared_dicts")) {
                guard let dict = readSharedDict(item.node, item.path) else { continue }
                guard seen.insert(dict.name).inserted else {
                    report(ConfigReader.join(item.path, "name"), "duplicate shared dictionary \"\(dict.name)\"", item.node)
                    continue
                }
                config.sharedDicts.append(dict)
            }
        }
        if let node = f["lua"] { config.lua = readLuaLimits(node, f.path("lua")) }
        return config
    }

    // MARK: Plugin runtime (weir.shared, Lua limits)

    func readSharedDict(_ node: Node, _ path: String) -> SharedDictConfig? {
        guard let f = fields(node, path, known: ["name", "size", "items"], required: ["name"]) else { return nil }
        guard let n = f["name"], let dictName = name(n, f.path("name")) else { return nil }
        if f["size"] != nil && f["items"] != nil {
            report(path, "give either size or items, not both")
            return nil
        }
        var capacity = 10_000
        if let n = f["items"] {
            guard let items = int(n, f.path("items"), min: 1) else { return nil }
            capacity = items
        } else if let n = f["size"] {
            guard let bytes = size(n, f.path("size"), min: SharedDictConfig.assumedBytesPerEntry) else { return nil }
            capacity = bytes / SharedDictConfig.assumedBytesPerEntry
        }
        return SharedDictConfig(name: dictName, capacity: capacity)
    }

    func readLuaLimits(_ node: Node, _ path: String) -> LuaLimitsConfig {
        var limits = LuaLimitsConfig()
        guard let f = fields(node, path, known: ["instruction_budget", "memory_limit"]) else { return limits }
        if let n = f["instruction_budget"] {
            limits.instructionBudget = int(n, f.path("instruction_budget"), min: 0) ?? limits.instructionBudget
        }
        if let n = f["memory_limit"] {
            limits.memoryLimit = size(n, f.path("memory_limit"), min: 1 << 20) ?? limits.memoryLimit
        }
        return limits
    }

    // MARK: Listeners

    func readListener(_ node: Node, _ path: String) -> ListenerConfig? {
        guard let f = fields(node, path, known: ["name", "listen", "protocol", "max_connections", "limits", "tls", "http2"]
                                + ConfigReader.streamListenerKeys,
                             required: ["name", "listen"]) else { return nil }
        var listener = ListenerConfig()
        if let n = f["name"] { listener.name = name(n, f.path("name")) ?? "" }
        if let n = f["listen"] { listener.listen = hostPort(n, f.path("listen"), allowPortZero: true) ?? listener.listen }
        if let n = f["protocol"] { listener.protocol = enumValue(n, f.path("protocol"), as: ListenerProtocol.self) ?? .http }
        if let n = f["max_connections"] { listener.maxConnections = int(n, f.path("max_connections"), min: 1) }
        if let n = f["limits"] { listener.limits = readLimits(n, f.path("limits")) }
        readStreamKeys(f, into: &listener)
        if let n = f["tls"] {
            listener.tls = readListenerTLS(n, f.path("tls"))
            if listener.protocol != .https {
                report(f.path("tls"), "only applies to protocol https (this listener is \(listener.protocol.rawValue))", n)
            }
        } else if listener.protocol == .https {
            report(f.path("protocol"), "https needs a tls block with at least one certificate", f["protocol"])
        }
        if let n = f["http2"] { listener.http2 = readHTTP2(n, f.path("http2"), protocol: listener.protocol) }
        return listener
    }

    func readLimits(_ node: Node, _ path: String) -> RequestLimits {
        var limits = RequestLimits()
        guard let f = fields(node, path, known: [
            "max_request_line", "max_header_bytes", "max_header_count", "max_body", "header_timeout", "keepalive_timeout",
        ]) else { return limits }
        if let n = f["max_request_line"] { limits.maxRequestLineBytes = size(n, f.path("max_request_line"), min: 16) ?? limits.maxRequestLineBytes }
        if let n = f["max_header_bytes"] { limits.maxHeaderBytes = size(n, f.path("max_header_bytes"), min: 64) ?? limits.maxHeaderBytes }
        if let n = f["max_header_count"] { limits.maxHeaderCount = int(n, f.path("max_header_count"), min: 1) ?? limits.maxHeaderCount }
        if let n = f["max_body"] { limits.maxBodyBytes = size(n, f.path("max_body")) }
        if let n = f["header_timeout"] { limits.headerTimeout = duration(n, f.path("header_timeout")) ?? limits.headerTimeout }
        if let n = f["keepalive_timeout"] { limits.keepAliveTimeout = duration(n, f.path("keepalive_timeout")) ?? limits.keepAliveTimeout }
        return limits
    }

    // MARK: Upstreams

    func readUpstream(_ node: Node, _ path: String) -> UpstreamConfig? {
        guard let f = fields(node, path, known: [
            "name", "balancer", "hash_on", "targets", "health_check", "timeouts", "retries", "pool", "plugins",
            "protocol", "http2", "tls",
        ], required: ["name", "targets"]) else { return nil }
        var upstream = UpstreamConfig()
        if let n = f["name"] { upstream.name = name(n, f.path("name")) ?? "" }
        if let n = f["balancer"] { upstream.balancer = enumValue(n, f.path("balancer"), as: BalancerKind.self) ?? .roundRobin }
        if let n = f["hash_on"] {
            upstream.hashOn = readHashKey(n, f.path("hash_on")) ?? .clientIP
            if upstream.balancer != .consistentHash {
                report(f.path("hash_on"), "only applies to balancer consistent_hash (this upstream uses \(upstream.balancer.rawValue))", n)
            }
        }
        if let n = f["targets"] {
            let items = list(n, f.path("targets"))
            if items.isEmpty, case .sequence = n { report(f.path("targets"), "at least one target is required", n) }
            var seen: [HostPort: String] = [:]
            for item in items {
                guard let target = readTarget(item.node, item.path) else { continue }
                if let first = seen[target.address] {
                    report(item.path, "duplicate target \(target.address) (already \(first))", item.node)
                } else {
                    seen[target.address] = item.path
                }
                upstream.targets.append(target)
            }
        }
        if let n = f["health_check"] { upstream.healthCheck = readHealthCheck(n, f.path("health_check")) }
        if let n = f["timeouts"] { upstream.timeouts = readTimeouts(n, f.path("timeouts")) }
        if let n = f["retries"] { upstream.retries = int(n, f.path("retries"), min: 0, max: 100) ?? upstream.retries }
        if let n = f["pool"] { upstream.pool = readPool(n, f.path("pool")) }
        if let n = f["plugins"] { upstream.plugins = readPlugins(n, f.path("plugins")) }
        if let n = f["protocol"] { upstream.upstreamProtocol = enumValue(n, f.path("protocol"), as: UpstreamProtocol.self) ?? .http1 }
        if let n = f["http2"] {
            upstream.http2 = readUpstreamHTTP2(n, f.path("http2"))
            if upstream.upstreamProtocol != .http2 {
                report(f.path("http2"), "only applies to protocol http2 (this upstream uses \(upstream.upstreamProtocol.rawValue))", n)
            }
        }
        if let n = f["tls"], let tls = readUpstreamTLS(n, f.path("tls")), tls.enabled { upstream.tls = tls }
        return upstream
    }

    func readUpstreamHTTP2(_ node: Node, _ path: String) -> UpstreamHTTP2Config {
        var config = UpstreamHTTP2Config()
        guard let f = fields(node, path, known: ["max_connections", "max_concurrent_streams"]) else { return config }
        if let n = f["max_connections"] { config.maxConnections = int(n, f.path("max_connections"), min: 1, max: 1000) ?? config.maxConnections }
        if let n = f["max_concurrent_streams"] {
            config.maxConcurrentStreams = int(n, f.path("max_concurrent_streams"), min: 1, max: 10_000) ?? config.maxConcurrentStreams
        }
        return config
    }

    func readHashKey(_ node: Node, _ path: String) -> HashKey? {
        guard let text = string(node, path) else { return nil }
        if text == "client_ip" { return .clientIP }
        for (prefix, make) in [("header:", HashKey.header), ("cookie:", HashKey.cookie)] where text.hasPrefix(prefix) {
            let key = String(text.dropFirst(prefix.count))
            guard ConfigReader.isToken(key) else {
                report(path, "invalid name \"\(key)\" in hash_on \"\(text)\"", node)
                return nil
            }
            return make(key)
        }
        report(path, "unknown hash_on \"\(text)\" (expected client_ip, header:<Name> or cookie:<name>)", node)
        return nil
    }

    /// A target is `{address: host:port, weight: N}` or just `host:port`.
    func readTarget(_ node: Node, _ path: String) -> TargetConfig? {
        if case .scalar = node {
            return hostPort(node, path, allowPortZero: false).map { TargetConfig(address: $0) }
        }
        guard let f = fields(node, path, known: ["address", "weight"], required: ["address"]) else { return nil }
        guard let addressNode = f["address"], let address = hostPort(addressNode, f.path("address"), allowPortZero: false) else {
            return nil
        }
        var target = TargetConfig(address: address)
        if let n = f["weight"] { target.weight = int(n, f.path("weight"), min: 1, max: 10_000) ?? 1 }
        return target
    }

    func readHealthCheck(_ node: Node, _ path: String) -> HealthCheckConfig {
        var check = HealthCheckConfig()
        guard let f = fields(node, path, known: ["active", "passive"]) else { return check }
        if let n = f["active"], let a = fields(n, f.path("active"), known: [
            "path", "interval", "timeout", "healthy", "unhealthy", "healthy_statuses", "type", "service",
        ]) {
            var active = ActiveHealthCheck()
            if let n = a["type"] { active.type = enumValue(n, a.path("type"), as: ActiveHealthCheckType.self) ?? .http }
            if let n = a["service"] {
                if active.type == .grpc {
                    active.grpcService = string(n, a.path("service")) ?? ""
                } else {
                    report(a.path("service"), "only applies to type grpc", n)
                }
            }
            if let n = a["path"], let p = nonEmptyString(n, a.path("path")) {
                if p.hasPrefix("/") { active.path = p } else { report(a.path("path"), "must start with \"/\"", n) }
            }
            if let n = a["interval"] { active.interval = duration(n, a.path("interval")) ?? active.interval }
            if let n = a["timeout"] { active.timeout = duration(n, a.path("timeout")) ?? active.timeout }
            if let n = a["healthy"] { active.healthy = int(n, a.path("healthy"), min: 1, max: 1000) ?? active.healthy }
            if let n = a["unhealthy"] { active.unhealthy = int(n, a.path("unhealthy"), min: 1, max: 1000) ?? active.unhealthy }
            if let n = a["healthy_statuses"] { active.healthyStatuses = readStatusRange(n, a.path("healthy_statuses")) ?? active.healthyStatuses }
            if a["type"] != nil { explicitActiveCheckTypes.insert(a.path("")) }
            if active.type == .tcp {
                for key in ["path", "healthy_statuses"] where a[key] != nil {
                    report(a.path(key), "does not apply to type tcp (a connect check)", a[key])
                }
            }
            if active.timeout > active.interval {
                report(a.path("timeout"), "must not exceed interval (\(active.interval))", n)
            }
            check.active = active
        }
        if let n = f["passive"], let p = fields(n, f.path("passive"), known: ["consecutive_failures", "ejection", "max_ejection"]) {
            var passive = PassiveHealthCheck()
            if let n = p["consecutive_failures"] {
                passive.consecutiveFailures = int(n, p.path("consecutive_failures"), min: 1, max: 1000) ?? passive.consecutiveFailures
            }
            if let n = p["ejection"] { passive.ejection = duration(n, p.path("ejection")) ?? passive.ejection }
            if let n = p["max_ejection"] {
                passive.maxEjection = duration(n, p.path("max_ejection")) ?? passive.maxEjection
                if passive.maxEjection < passive.ejection {
                    report(p.path("max_ejection"), "must not be shorter than ejection (\(passive.ejection))", n)
                }
            }
            check.passive = passive
        }
        return check
    }

    /// `200-399` or a single status `200`.
    func readStatusRange(_ node: Node, _ path: String) -> ClosedRange<Int>? {
        guard let text = string(node, path) else { return nil }
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
            .map { Int($0.trimmingCharacters(in: .whitespaces)) }
        if parts.count == 1, let only = parts[0], (100...599).contains(only) { return only...only }
        if parts.count == 2, let low = parts[0], let high = parts[1], (100...599).contains(low),
           (100...599).contains(high), low <= high {
            return low...high
        }
        report(path, "invalid status range \"\(text)\" (expected e.g. 200-399)", node)
        return nil
    }

    func readTimeouts(_ node: Node, _ path: String) -> UpstreamTimeouts {
        var timeouts = UpstreamTimeouts()
        guard let f = fields(node, path, known: ["connect", "read", "write", "request"]) else { return timeouts }
        if let n = f["connect"] { timeouts.connect = duration(n, f.path("connect")) ?? timeouts.connect }
        if let n = f["read"] { timeouts.read = duration(n, f.path("read")) ?? timeouts.read }
        if let n = f["write"] { timeouts.write = duration(n, f.path("write")) ?? timeouts.write }
        if let n = f["request"] { timeouts.request = duration(n, f.path("request")) }
        return timeouts
    }

    func readPool(_ node: Node, _ path: String) -> ConnectionPoolConfig {
        var pool = ConnectionPoolConfig()
        guard let f = fields(node, path, known: ["max_idle", "idle_timeout", "max_requests"]) else { return pool }
        if let n = f["max_idle"] { pool.maxIdle = int(n, f.path("max_idle"), min: 0) ?? pool.maxIdle }
        if let n = f["idle_timeout"] { pool.idleTimeout = duration(n, f.path("idle_timeout")) ?? pool.idleTimeout }
        if let n = f["max_requests"] { pool.maxRequests = int(n, f.path("max_requests"), min: 1) }
        return pool
    }

    // MARK: Routes

    func readRoute(_ node: Node, _ path: String, index: Int) -> RouteConfig? {
        guard let f = fields(node, path, known: [
            "name", "match", "upstream", "strip_path", "rewrite_path", "preserve_host", "max_body", "plugins",
        ], required: ["upstream"]) else { return nil }
        var route = RouteConfig()
        route.name = f["name"].flatMap { name($0, f.path("name")) } ?? "route-\(index)"
        var regexCaptureCount = 0
        if let n = f["match"] {
            (route.match, regexCaptureCount) = readRouteMatch(n, f.path("match"))
        }
        if let n = f["upstream"] { route.upstream = nonEmptyString(n, f.path("upstream")) ?? "" }
        if let n = f["strip_path"] { route.stripPath = bool(n, f.path("strip_path")) ?? false }
        if let n = f["preserve_host"] { route.preserveHost = bool(n, f.path("preserve_host")) ?? false }
        if let n = f["max_body"] { route.maxBodyBytes = size(n, f.path("max_body")) }
        if let n = f["rewrite_path"], let rewrite = nonEmptyString(n, f.path("rewrite_path")) {
            route.rewritePath = rewrite
            if !rewrite.hasPrefix("/") { report(f.path("rewrite_path"), "must start with \"/\"", n) }
            if route.stripPath { report(f.path("rewrite_path"), "cannot be combined with strip_path", n) }
            let references = RouteRewrite.captureReferences(in: rewrite)
            let hasNonRegexPath = route.match.paths.isEmpty || route.match.paths.contains {
                if case .regex = $0 { return false } else { return true }
            }
            if let highest = references.max(), hasNonRegexPath, regexCaptureCount > 0 {
                report(f.path("rewrite_path"), "refers to $\(highest), so every path of the route must be a regex (a prefix or exact match has no captures)", n)
            } else if let highest = references.max(), highest > regexCaptureCount {
                let detail = regexCaptureCount == 0
                    ? "but the route has no regex path with capture groups"
                    : "but the route's regex paths have only \(regexCaptureCount) capture group(s)"
                report(f.path("rewrite_path"), "refers to $\(highest) \(detail)", n)
            }
        }
        if let n = f["plugins"] { route.plugins = readPlugins(n, f.path("plugins")) }
        return route
    }

    /// Returns the match and the fewest capture groups among its regex paths
    /// (what a `$N` in rewrite_path may safely refer to).
    func readRouteMatch(_ node: Node, _ path: String) -> (RouteMatchConfig, Int) {
        var match = RouteMatchConfig()
        var captureCount = Int.max
        guard let f = fields(node, path, known: ["hosts", "paths", "methods", "headers"]) else { return (match, 0) }
        if let n = f["hosts"] {
            for item in list(n, f.path("hosts"), allowScalar: true) {
                guard let host = nonEmptyString(item.node, item.path)?.lowercased() else { continue }
                if host.contains(":") && !host.hasPrefix("[") {
                    report(item.path, "host \"\(host)\" must not include a port (the request's port is ignored)", item.node)
                } else if !HostName.isValidPattern(host) {
                    report(item.path, "invalid host \"\(host)\" (expected a name like api.example.com or a wildcard like *.example.com)", item.node)
                } else {
                    match.hosts.append(host)
                }
            }
        }
        if let n = f["paths"] {
            for item in list(n, f.path("paths"), allowScalar: true) {
                guard let text = nonEmptyString(item.node, item.path) else { continue }
                do {
                    let pattern = try PathPattern(parsing: text)
                    if case .regex(let source) = pattern {
                        let regex = try NSRegularExpression(pattern: source)
                        captureCount = min(captureCount, regex.numberOfCaptureGroups)
                    }
                    match.paths.append(pattern)
                } catch let error as ConfigValueError {
                    report(item.path, error.message, item.node)
                } catch {
                    report(item.path, "invalid regex \"\(text)\": \(error.localizedDescription)", item.node)
                }
            }
        }
        if let n = f["methods"] {
            for item in list(n, f.path("methods"), allowScalar: true) {
                guard let method = nonEmptyString(item.node, item.path)?.uppercased() else { continue }
                if ConfigReader.isToken(method) { match.methods.append(method) } else {
                    report(item.path, "invalid method \"\(method)\"", item.node)
                }
            }
        }
        if let n = f["headers"] {
            if case .mapping(let mapping) = n {
                var seen = Set<String>()
                for (keyNode, valueNode) in mapping {
                    let name = keyNode.string ?? ""
                    let headerPath = f.path("headers") + "." + name
                    guard ConfigReader.isToken(name) else {
                        report(headerPath, "invalid header name \"\(name)\"", keyNode); continue
                    }
                    guard seen.insert(name.lowercased()).inserted else {
                        report(headerPath, "duplicate header condition", keyNode); continue
                    }
                    // `Name:` (null) or `Name: []` means "present with any value".
                    let values = isNull(valueNode) ? [] : stringList(valueNode, headerPath)
                    match.headers.append(HeaderMatch(name: name, values: values))
                }
            } else {
                report(f.path("headers"), "expected a mapping of header name to value or list of values, got \(describe(n))", n)
            }
        }
        return (match, captureCount == .max ? 0 : captureCount)
    }

    // MARK: Plugins, consumers, admin, misc

    /// A plugin list: items are `{name, config, enabled}` or just a name.
    func readPlugins(_ node: Node, _ path: String) -> [PluginRef] {
        var plugins: [PluginRef] = []
        var seen = Set<String>()
        for item in list(node, path) {
            var plugin: PluginRef
            if case .scalar = item.node {
                guard let pluginName = name(item.node, item.path) else { continue }
                plugin = PluginRef(name: pluginName)
            } else {
                guard let f = fields(item.node, item.path, known: ["name", "config", "enabled"], required: ["name"]),
                      let nameNode = f["name"], let pluginName = name(nameNode, f.path("name")) else { continue }
                plugin = PluginRef(name: pluginName)
                if let n = f["config"] {
                    if case .mapping = n { plugin.config = configValue(n) } else {
                        report(f.path("config"), "expected a mapping, got \(describe(n))", n)
                    }
                }
                if let n = f["enabled"] { plugin.enabled = bool(n, f.path("enabled")) ?? true }
            }
            if !seen.insert(plugin.name).inserted {
                report(item.path, "plugin \"\(plugin.name)\" is listed twice in this chain", item.node)
                continue
            }
            plugins.append(plugin)
        }
        return plugins
    }

    func readConsumer(_ node: Node, _ path: String) -> ConsumerConfig? {
        guard let f = fields(node, path, known: ["name", "groups", "credentials", "plugins"], required: ["name"]) else {
            return nil
        }
        var consumer = ConsumerConfig()
        if let n = f["name"] { consumer.name = name(n, f.path("name")) ?? "" }
        if let n = f["groups"] { consumer.groups = stringList(n, f.path("groups")) }
        if let n = f["credentials"] {
            if case .mapping(let mapping) = n {
                for (keyNode, valueNode) in mapping {
                    guard let plugin = name(keyNode, f.path("credentials")) else { continue }
                    consumer.credentials[plugin] = configValue(valueNode)
                    checkPasswordCredentials(valueNode, ConfigReader.join(f.path("credentials"), plugin))
                }
            } else {
                report(f.path("credentials"), "expected a mapping of plugin name to credentials, got \(describe(n))", n)
            }
        }
        if let n = f["plugins"] { consumer.plugins = readPlugins(n, f.path("plugins")) }
        return consumer
    }

    func readAdmin(_ node: Node, _ path: String) -> AdminConfig? {
        guard let f = fields(node, path, known: ["listen"], required: ["listen"]) else { return nil }
        var admin = AdminConfig()
        if let n = f["listen"] { admin.listen = hostPort(n, f.path("listen"), allowPortZero: true) ?? admin.listen }
        return admin
    }

    /// `off` (or false), `stdout`, or a file path.
    func readAccessLog(_ node: Node, _ path: String) -> AccessLogTarget? {
        guard let text = nonEmptyString(node, path) else { return nil }
        switch text.lowercased() {
        case "off", "false", "no": return .off
        case "stdout", "-": return .stdout
        default: return .file(text)
        }
    }

    func readForwarded(_ node: Node, _ path: String) -> ForwardedConfig {
        var forwarded = ForwardedConfig()
        guard let f = fields(node, path, known: ["trusted_proxies"]) else { return forwarded }
        if let n = f["trusted_proxies"] {
            for item in list(n, f.path("trusted_proxies"), allowScalar: true) {
                guard let text = nonEmptyString(item.node, item.path) else { continue }
                do {
                    _ = try CIDRBlock(parsing: text)
                    forwarded.trustedProxies.append(text)
                } catch {
                    report(item.path, "\(error)", item.node)
                }
            }
        }
        return forwarded
    }
}

extension PathPattern {
    /// `/orders` prefix, `= /orders` (or `=/orders`) exact, `~ ^/orders/\d+$` regex.
    /// The regex itself is compiled by the caller.
    public init(parsing text: String) throws {
        if text.hasPrefix("~") {
            let source = String(text.dropFirst()).trimmingASCIIWhitespace()
            guard !source.isEmpty else { throw ConfigValueError("empty regex in path \"\(text)\"") }
            self = .regex(source)
            return
        }
        let isExact = text.hasPrefix("=")
        let path = isExact ? String(text.dropFirst()).trimmingASCIIWhitespace() : text
        guard path.hasPrefix("/") else {
            throw ConfigValueError("path \"\(text)\" must start with \"/\" (or \"= /\" for exact, \"~ \" for regex)")
        }
        if path.contains("?") || path.contains("#") {
            throw ConfigValueError("path \"\(text)\" must not contain a query string or fragment")
        }
        if path.contains(where: { $0 == " " || $0 == "\t" }) {
            throw ConfigValueError("path \"\(text)\" must not contain whitespace")
        }
        self = isExact ? .exact(path) : .prefix(path)
    }
}
