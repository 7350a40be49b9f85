// The L4 part of a listener (`protocol: tcp` and `protocol: tls`): where
// its connections go and how long they may sit idle. Read by
// `ConfigReader.readStreamKeys`, checked by `ConfigCrossChecks.checkStreamListeners`.
//
//   listeners:
//     - name: redis
//       listen: 127.0.0.1:6380
//       protocol: tcp
//       upstream: redis-pool          # where connections go (unless a plugin picks)
//       idle_timeout: 10m             # no byte either way for this long: close
//       connect_timeout: 2s           # overrides the upstream's timeouts.connect
//       plugins: [ { name: tcp-allow } ]   # connection-phase plugins
//     - name: edge
//       listen: 0.0.0.0:8443
//       protocol: tls                 # TLS passthrough: route by the ClientHello's SNI
//       sni_routes:
//         - { server_names: [api.example.com], upstream: api }
//         - { server_names: ["*.example.com"], upstream: web }
//       upstream: fallback            # no SNI, or a name no route lists
//       client_hello_timeout: 5s
//       max_client_hello: 16k

import Yams

/// One `sni_routes` entry of a `tls` listener.
public struct SNIRoute: Hashable, Sendable {
    /// Lower-case exact names or `*.suffix` wildcards.
    public var serverNames: [String]
    public var upstream: String
    public init(serverNames: [String], upstream: String) {
        self.serverNames = serverNames
        self.upstream = upstream
    }
}

/// Timeouts and limits of an L4 listener's connections.
public struct StreamSettings: Hashable, Sendable {
    /// No byte in either direction for this long closes both sides.
    public var idleTimeout: TimeSpan = .seconds(600)
    /// Overrides the chosen upstream's `timeouts.connect`; nil = the upstream's.
    public var connectTimeout: TimeSpan? = nil
    /// `tls` listeners: time allowed for the whole ClientHello to arrive.
    public var clientHelloTimeout: TimeSpan = .seconds(5)
    /// `tls` listeners: bytes buffered while waiting for the ClientHello.
    public var maxClientHelloBytes: Int = 16 * 1024
    public init() {}
}

extension ListenerProtocol {
    /// tcp and tls listeners relay bytes; http/https ones speak HTTP.
    public var isStream: Bool { self == .tcp || self == .tls }
}

extension ListenerConfig {
    /// The listener without what a reload may change (its L4 routing,
    /// plugins and stream settings): what must stay equal across reloads.
    public var fixedPart: ListenerConfig {
        var copy = self
        copy.upstream = nil
        copy.sniRoutes = []
        copy.plugins = []
        copy.stream = StreamSettings()
        // https listeners' certificates and TLS settings reload too.
        copy.tls = nil
        return copy
    }
}

extension ConfigReader {
    static let streamListenerKeys = ["upstream", "sni_routes", "plugins", "idle_timeout", "connect_timeout",
                                     "client_hello_timeout", "max_client_hello"]

    /// The L4 keys of a listener; reports them on an http/https listener
    /// and reports `sni_routes`/ClientHello keys on a tcp one.
    func readStreamKeys(_ f: Fields, into listener: inout ListenerConfig) {
        let present = Self.streamListenerKeys.filter { f[$0] != nil }
        guard listener.protocol.isStream else {
            for key in present {
                report(f.path(key), "only applies to tcp and tls listeners (this one is \(listener.protocol.rawValue))", f[key])
            }
            return
        }
        if listener.protocol == .tcp {
            for key in ["sni_routes", "client_hello_timeout", "max_client_hello"] where f[key] != nil {
                report(f.path(key), "only applies to tls listeners (this one is tcp)", f[key])
            }
        }
        if let n = f["upstream"] { listener.upstream = name(n, f.path("upstream")) }
        if let n = f["plugins"] { listener.plugins = readPlugins(n, f.path("plugins")) }
        if let n = f["idle_timeout"] { listener.stream.idleTimeout = duration(n, f.path("idle_timeout")) ?? listener.stream.idleTimeout }
        if let n = f["connect_timeout"] { listener.stream.connectTimeout = duration(n, f.path("connect_timeout")) }
        if let n = f["client_hello_timeout"] {
            listener.stream.clientHelloTimeout = duration(n, f.path("client_hello_timeout")) ?? listener.stream.clientHelloTimeout
        }
        if let n = f["max_client_hello"] {
            // A ClientHello needs at least its 5-byte record header and a
            // 4-byte handshake header; real ones are 200 bytes to a few KB
            // (post-quantum key shares ~1.3 KB more). 64 KiB is the most one
            // handshake message spread over records can sensibly take.
            if let bytes = size(n, f.path("max_client_hello"), min: 512) {
                if bytes > 64 * 1024 {
                    report(f.path("max_client_hello"), "must be at most 64k", n)
                } else {
                    listener.stream.maxClientHelloBytes = bytes
                }
            }
        }
        if let n = f["sni_routes"] {
            var seen: [String: String] = [:]
            for item in list(n, f.path("sni_routes")) {
                guard let route = readSNIRoute(item.node, item.path) else { continue }
                for (i, serverName) in route.serverNames.enumerated() {
                    let namePath = ConfigReader.join(item.path, "server_names") + "[\(i)]"
                    if let other = seen[serverName] {
                        report(namePath, "server name \"\(serverName)\" is already routed by \(other)", item.node)
                    } else {
                        seen[serverName] = item.path
                    }
                }
                listener.sniRoutes.append(route)
            }
        }
    }

    func readSNIRoute(_ node: Node, _ path: String) -> SNIRoute? {
        guard let f = fields(node, path, known: ["server_names", "upstream"], required: ["server_names", "upstream"]),
              let namesNode = f["server_names"], let upstreamNode = f["upstream"] else { return nil }
        var names: [String] = []
        let items = list(namesNode, f.path("server_names"), allowScalar: true)
        if items.isEmpty { report(f.path("server_names"), "at least one server name is required", namesNode) }
        for item in items {
            guard let text = nonEmptyString(item.node, item.path)?.lowercased() else { continue }
            // SNI carries DNS names only (RFC 6066 3: no IP literals, no port).
            if text.hasPrefix("*.") ? HostName.isValid(String(text.dropFirst(2))) : HostName.isValid(text) {
                names.append(text)
            } else {
                report(item.path, "invalid server name \"\(text)\" (expected a name like api.example.com or a wildcard like *.example.com)", item.node)
            }
        }
        guard let upstream = name(upstreamNode, f.path("upstream")), !names.isEmpty else { return nil }
        return SNIRoute(serverNames: names, upstream: upstream)
    }
}

extension ConfigCrossChecks {
    /// Upstream references of tcp/tls listeners, and that each can route
    /// somewhere.
    static func checkStreamListeners(_ config: WeirConfig) -> [ConfigIssue] {
        var issues: [ConfigIssue] = []
        let upstreamNames = Set(config.upstreams.map(\.name))
        func unknown(_ name: String, at path: String) {
            var message = "unknown upstream \"\(name)\""
            if let suggestion = closest(to: name, in: upstreamNames) { message += " (did you mean \"\(suggestion)\"?)" }
            issues.append(ConfigIssue(path: path, message: message))
        }
        for (index, listener) in config.listeners.enumerated() where listener.protocol.isStream {
            let path = "listeners[\(index)]"
            if let upstream = listener.upstream, !upstreamNames.contains(upstream) { unknown(upstream, at: path + ".upstream") }
            for (r, route) in listener.sniRoutes.enumerated() where !upstreamNames.contains(route.upstream) {
                unknown(route.upstream, at: path + ".sni_routes[\(r)].upstream")
            }
            // Plugins may pick the upstream (weir.upstream.set_upstream), so
            // a listener with plugins may leave `upstream` out.
            if listener.upstream == nil && listener.sniRoutes.isEmpty && listener.plugins.isEmpty {
                let what = listener.protocol == .tls ? "`upstream` or `sni_routes`" : "`upstream`"
                issues.append(ConfigIssue(path: path, message: "a \(listener.protocol.rawValue) listener needs \(what) "
                    + "(or plugins that choose one with weir.upstream.set_upstream)"))
            }
        }
        return issues
    }
}
