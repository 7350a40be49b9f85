import WeirCore

/// Every plugin reference of a config, validated against the library's
/// schemas and grouped by where it is attached.
public struct ValidatedPlugins: Sendable {
    public var global: [ConfiguredPlugin] = []
    /// By route name.
    public var routes: [String: [ConfiguredPlugin]] = [:]
    /// By upstream name.
    public var upstreams: [String: [ConfiguredPlugin]] = [:]
    /// By consumer name.
    public var consumers: [String: [ConfiguredPlugin]] = [:]
    /// By listener name (tcp/tls listeners; connection phase only).
    public var listeners: [String: [ConfiguredPlugin]] = [:]

    /// The connection-phase plugins of a tcp/tls listener: the global ones
    /// that have a connection phase, then the listener's own (a plugin at
    /// both levels runs once, with the listener's config).
    public func connectionPlugins(listener: String) -> [ConfiguredPlugin] {
        var byName: [String: ConfiguredPlugin] = [:]
        for plugin in global where plugin.definition.phases.contains(.connection) { byName[plugin.name] = plugin }
        for plugin in listeners[listener] ?? [] { byName[plugin.name] = plugin }
        return byName.keys.sorted().map { byName[$0]! }
    }

    /// The plugins for a request on `route` to `upstream` (by `consumer`,
    /// once known). A plugin attached at several levels runs once, with the
    /// most specific config: consumer, then route, then upstream, then global.
    public func effective(route: String?, upstream: String?, consumer: String? = nil) -> [ConfiguredPlugin] {
        var byName: [String: ConfiguredPlugin] = [:]
        for plugin in global { byName[plugin.name] = plugin }
        if let upstream = upstream { for plugin in upstreams[upstream] ?? [] { byName[plugin.name] = plugin } }
        if let route = route { for plugin in routes[route] ?? [] { byName[plugin.name] = plugin } }
        if let consumer = consumer { for plugin in consumers[consumer] ?? [] { byName[plugin.name] = plugin } }
        return byName.keys.sorted().map { byName[$0]! }
    }
}

extension PluginLibrary {
    /// The distinct plugin names a config refers to (enabled references only).
    public static func pluginNames(in config: WeirConfig) -> [String] {
        var names = Set<String>()
        let lists = [config.plugins] + config.routes.map(\.plugins) + config.upstreams.map(\.plugins) + config.consumers.map(\.plugins)
            + config.listeners.map(\.plugins)
        for list in lists { for ref in list where ref.enabled { names.insert(ref.name) } }
        return names.sorted()
    }

    /// Loads every plugin `config` refers to from its `plugin_paths`;
    /// relative paths are taken from `baseDirectory` (the config file's folder).
    public convenience init(config: WeirConfig, baseDirectory: String, sdk: LuaSDK) throws {
        let paths = config.pluginPaths.map { $0.hasPrefix("/") ? $0 : baseDirectory + "/" + $0 }
        try self.init(names: PluginLibrary.pluginNames(in: config), searchPaths: paths, sdk: sdk)
    }

    /// Validates every plugin reference of `config`, reporting all problems
    /// with their config paths (`routes[2].plugins[0].config.minute: ...`).
    public func validate(_ config: WeirConfig) -> Result<ValidatedPlugins, SchemaErrors> {
        var problems: [SchemaProblem] = []
        var out = ValidatedPlugins()
        let upstreamNames = Set(config.upstreams.map(\.name))
        func check(_ refs: [PluginRef], _ path: String) -> [ConfiguredPlugin] {
            var seen = Set<String>()
            for (i, ref) in refs.enumerated() where ref.enabled {
                if !seen.insert(ref.name).inserted {
                    problems.append(SchemaProblem(path: "\(path)[\(i)].name", reason: "plugin \"\(ref.name)\" is attached twice here"))
                }
            }
            switch configure(refs, path: path, upstreams: upstreamNames) {
            case .success(let plugins): return plugins
            case .failure(let errors): problems.append(contentsOf: errors.problems); return []
            }
        }
        out.global = check(config.plugins, "plugins")
        for (i, route) in config.routes.enumerated() { out.routes[route.name] = check(route.plugins, "routes[\(i)].plugins") }
        for (i, upstream) in config.upstreams.enumerated() { out.upstreams[upstream.name] = check(upstream.plugins, "upstreams[\(i)].plugins") }
        for (i, consumer) in config.consumers.enumerated() { out.consumers[consumer.name] = check(consumer.plugins, "consumers[\(i)].plugins") }
        for (i, listener) in config.listeners.enumerated() where !listener.plugins.isEmpty {
            let path = "listeners[\(i)].plugins"
            let configured = check(listener.plugins, path)
            // Only the connection phase runs on a tcp/tls listener (there is
            // no request): a plugin without one would silently do nothing.
            for plugin in configured where !plugin.definition.phases.contains(.connection) {
                let index = listener.plugins.firstIndex { $0.name == plugin.name } ?? 0
                problems.append(SchemaProblem(path: "\(path)[\(index)].name",
                                              reason: "plugin \"\(plugin.name)\" has no connection phase; only the connection phase runs on \(listener.protocol.rawValue) listeners"))
            }
            out.listeners[listener.name] = configured
        }
        return problems.isEmpty ? .success(out) : .failure(SchemaErrors(problems: problems))
    }
}
