// Entry point for configs: read the file, substitute ${ENV}, parse YAML,
// read every section, then check the references between sections. All
// problems are thrown together as one ConfigErrors.

import Foundation
import Yams

public enum ConfigLoader {
    /// Reads, interpolates ${ENV}, parses YAML, validates. Throws ConfigErrors listing EVERY problem.
    ///
    /// Relative TLS file paths are resolved against the config file's
    /// folder. `fileChecks` (WeirProxy's `TLSFileCheck.issues`) checks what
    /// WeirCore cannot, the files a config names; its issues carry config
    /// paths and get the YAML line of that path, like every other issue.
    public static func load(path: String,
                            environment: [String: String] = ProcessInfo.processInfo.environment,
                            fileChecks: ((WeirConfig) -> [ConfigIssue])? = nil) throws -> WeirConfig {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigErrors(file: path, issues: [ConfigIssue(path: "", message: "cannot read config file: \(error.localizedDescription)")])
        }
        let directory = (path as NSString).deletingLastPathComponent
        return try parse(yaml: text, file: path, environment: environment,
                         baseDirectory: directory.isEmpty ? "." : directory, fileChecks: fileChecks)
    }

    /// `baseDirectory`: where relative TLS file paths point (nil: leave them as written).
    public static func parse(yaml: String, file: String = "<inline>", environment: [String: String] = [:],
                             baseDirectory: String? = nil,
                             fileChecks: ((WeirConfig) -> [ConfigIssue])? = nil) throws -> WeirConfig {
        let (text, environmentIssues) = EnvironmentInterpolation.interpolate(yaml, environment: environment)
        if !environmentIssues.isEmpty { throw ConfigErrors(file: file, issues: environmentIssues) }

        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            throw ConfigErrors(file: file, issues: [yamlSyntaxIssue(error)])
        }
        let reader = ConfigReader()
        var config = reader.readConfig(root)
        defaultActiveCheckTypes(&config, explicit: reader.explicitActiveCheckTypes)
        if let baseDirectory { config.resolveTLSPaths(against: baseDirectory) }
        var laterIssues = ConfigCrossChecks.check(config)
        // Files are only worth opening when the config itself reads cleanly.
        if let fileChecks, reader.issues.isEmpty, laterIssues.isEmpty { laterIssues += fileChecks(config) }
        let crossIssues = laterIssues.map { issue -> ConfigIssue in
            var located = issue
            located.line = issue.line ?? ConfigCrossChecks.line(for: issue.path, in: reader.lines)
            return located
        }
        // In file order, so the list reads top to bottom; stable for equal lines.
        let issues = (reader.issues + crossIssues).enumerated()
            .sorted { ($0.element.line ?? .max, $0.offset) < ($1.element.line ?? .max, $1.offset) }
            .map(\.element)
        if !issues.isEmpty { throw ConfigErrors(file: file, issues: issues) }
        return config
    }

    /// An active check without `type` probes with HTTP, except on an
    /// upstream only tcp/tls listeners use (no route): that one may not
    /// speak HTTP at all (redis, a TLS passthrough backend), so it gets a
    /// TCP connect check.
    static func defaultActiveCheckTypes(_ config: inout WeirConfig, explicit: Set<String>) {
        let routed = Set(config.routes.map(\.upstream))
        for i in config.upstreams.indices where config.upstreams[i].healthCheck.active != nil {
            let path = "upstreams[\(i)].health_check.active."
            guard !explicit.contains(path), !routed.contains(config.upstreams[i].name) else { continue }
            let streamOnly = config.listeners.contains { listener in
                listener.protocol.isStream && (listener.upstream == config.upstreams[i].name
                    || listener.sniRoutes.contains { $0.upstream == config.upstreams[i].name })
            }
            if streamOnly { config.upstreams[i].healthCheck.active?.type = .tcp }
        }
    }

    private static func yamlSyntaxIssue(_ error: Error) -> ConfigIssue {
        guard let yamlError = error as? YamlError else {
            return ConfigIssue(path: "", message: "invalid YAML: \(error)")
        }
        switch yamlError {
        case .scanner(let context, let problem, let mark, _),
             .parser(let context, let problem, let mark, _),
             .composer(let context, let problem, let mark, _):
            let detail = context.map { "\(problem) \($0.text)" } ?? problem
            return ConfigIssue(path: "", message: "invalid YAML: \(detail)", line: mark.line)
        default:
            return ConfigIssue(path: "", message: "invalid YAML: \(yamlError)")
        }
    }
}

/// Checks that span sections: unique names, references that resolve,
/// addresses that do not collide, routes that can never be selected.
enum ConfigCrossChecks {
    static func check(_ config: WeirConfig) -> [ConfigIssue] {
        var issues: [ConfigIssue] = []

        if config.listeners.isEmpty {
            issues.append(ConfigIssue(path: "listeners", message: "at least one listener is required"))
        }
        issues += duplicates(config.listeners.map(\.name), section: "listeners", what: "listener")
        issues += duplicates(config.upstreams.map(\.name), section: "upstreams", what: "upstream")
        issues += duplicates(config.routes.map(\.name), section: "routes", what: "route")
        issues += duplicates(config.consumers.map(\.name), section: "consumers", what: "consumer")

        // Port 0 means "any free port", so it never collides.
        var addresses: [HostPort: String] = [:]
        for (index, listener) in config.listeners.enumerated() where listener.listen.port != 0 {
            if let other = addresses[listener.listen] {
                issues.append(ConfigIssue(path: "listeners[\(index)].listen", message: "address \(listener.listen) is already used by \(other)"))
            } else {
                addresses[listener.listen] = "listeners[\(index)]"
            }
        }
        if let admin = config.admin, admin.listen.port != 0, let other = addresses[admin.listen] {
            issues.append(ConfigIssue(path: "admin.listen", message: "address \(admin.listen) is already used by \(other)"))
        }

        issues += checkStreamListeners(config)

        let upstreamNames = Set(config.upstreams.map(\.name))
        var firstRouteWithMatch: [RouteMatchConfig: Int] = [:]
        for (index, route) in config.routes.enumerated() {
            if !route.upstream.isEmpty && !upstreamNames.contains(route.upstream) {
                var message = "unknown upstream \"\(route.upstream)\""
                if let suggestion = closest(to: route.upstream, in: upstreamNames) { message += " (did you mean \"\(suggestion)\"?)" }
                issues.append(ConfigIssue(path: "routes[\(index)].upstream", message: message))
            }
            let key = normalized(route.match)
            if let earlier = firstRouteWithMatch[key] {
                issues.append(ConfigIssue(path: "routes[\(index)].match",
                                          message: "same match as routes[\(earlier)] (\"\(config.routes[earlier].name)\"), so this route can never be selected"))
            } else {
                firstRouteWithMatch[key] = index
            }
        }
        return issues
    }

    /// The line of `path`, or of its nearest parent that has one
    /// (`routes[3].match` was never a key if the route has no match).
    static func line(for path: String, in lines: [String: Int]) -> Int? {
        var current = Substring(path)
        while !current.isEmpty {
            if let line = lines[String(current)] { return line }
            guard let cut = current.lastIndex(where: { $0 == "." || $0 == "[" }) else { break }
            current = current[..<cut]
        }
        return nil
    }

    private static func duplicates(_ names: [String], section: String, what: String) -> [ConfigIssue] {
        var first: [String: Int] = [:]
        var issues: [ConfigIssue] = []
        for (index, name) in names.enumerated() where !name.isEmpty {
            if let earlier = first[name] {
                issues.append(ConfigIssue(path: "\(section)[\(index)].name", message: "duplicate \(what) name \"\(name)\" (also \(section)[\(earlier)])"))
            } else {
                first[name] = index
            }
        }
        return issues
    }

    /// Order-insensitive form of a match, to detect shadowed routes.
    private static func normalized(_ match: RouteMatchConfig) -> RouteMatchConfig {
        var result = match
        result.hosts = Array(Set(match.hosts)).sorted()
        result.paths = Array(Set(match.paths.isEmpty ? [.prefix("/")] : match.paths)).sorted { "\($0)" < "\($1)" }
        result.methods = Array(Set(match.methods)).sorted()
        result.headers = match.headers
            .map { HeaderMatch(name: $0.name.lowercased(), values: Array(Set($0.values)).sorted()) }
            .sorted { $0.name < $1.name }
        return result
    }

    /// The candidate within edit distance 2, for "did you mean" hints.
    static func closest(to word: String, in candidates: Set<String>) -> String? {
        let scored = candidates.map { ($0, editDistance(word, $0)) }.filter { $0.1 <= 2 }
        return scored.min { $0.1 < $1.1 || ($0.1 == $1.1 && $0.0 < $1.0) }?.0
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty { return b.count }
        var previous = Array(0...b.count)
        for i in 1...a.count {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...max(b.count, 1) where j <= b.count {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = current
        }
        return previous[b.count]
    }
}
