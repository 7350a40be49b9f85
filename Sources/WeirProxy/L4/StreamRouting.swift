import WeirCore

/// Where one tcp/tls listener sends connections, compiled from its config:
/// the default upstream and, for tls, upstreams by server name. Part of a
/// `ProxyRuntime`, so a reload swaps it with the upstreams it points at.
struct StreamListenerRouting {
    let listener: ListenerConfig
    /// `upstream:` (tls: the fallback for a missing or unrouted SNI).
    let defaultUpstream: UpstreamRuntime?
    private let exact: [String: UpstreamRuntime]
    /// ".example.com" (from `*.example.com`) -> upstream.
    private let wildcard: [String: UpstreamRuntime]

    init(listener: ListenerConfig, upstreamsByName: [String: UpstreamRuntime]) throws {
        self.listener = listener
        func resolve(_ name: String, _ what: String) throws -> UpstreamRuntime {
            guard let upstream = upstreamsByName[name] else {
                throw ProxyRuntime.InvalidConfig(description: "listener \"\(listener.name)\" \(what): unknown upstream \"\(name)\"")
            }
            return upstream
        }
        defaultUpstream = try listener.upstream.map { try resolve($0, "upstream") }
        var exact: [String: UpstreamRuntime] = [:]
        var wildcard: [String: UpstreamRuntime] = [:]
        for route in listener.sniRoutes {
            let upstream = try resolve(route.upstream, "sni_routes")
            for name in route.serverNames {
                if name.hasPrefix("*.") { wildcard[String(name.dropFirst())] = upstream } else { exact[name] = upstream }
            }
        }
        self.exact = exact
        self.wildcard = wildcard
    }

    /// The upstream for a connection with this server name: an exact name,
    /// else the longest matching wildcard suffix (`*.example.com` covers
    /// `a.example.com` and `a.b.example.com`, as host routes do), else the
    /// listener's `upstream`. nil when none applies.
    func upstream(serverName: String?) -> UpstreamRuntime? {
        guard let name = serverName else { return defaultUpstream }
        if let upstream = exact[name] { return upstream }
        if !wildcard.isEmpty {
            var rest = Substring(name)
            while let dot = rest.firstIndex(of: ".") {
                rest = rest[dot...]
                if let upstream = wildcard[String(rest)] { return upstream }
                rest = rest.dropFirst()
            }
        }
        return defaultUpstream
    }
}

extension ProxyRuntime {
    /// Compiles every tcp/tls listener's routing (by listener name).
    static func compileStreamRouting(config: WeirConfig, upstreams: [UpstreamRuntime]) throws -> [String: StreamListenerRouting] {
        let byName = Dictionary(upstreams.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var result: [String: StreamListenerRouting] = [:]
        for listener in config.listeners where listener.protocol.isStream {
            result[listener.name] = try StreamListenerRouting(listener: listener, upstreamsByName: byName)
        }
        return result
    }
}
