import NIOCore
import WeirCore

/// Checks the files a config's `tls:` blocks name (listeners and upstreams):
/// present, readable PEM, key matching its certificate, a TLS context
/// BoringSSL accepts. Pass to `ConfigLoader.load(path:fileChecks:)` so the
/// issues come out with their config path and YAML line.
public enum TLSFileCheck {
    public static func issues(_ config: WeirConfig) -> [ConfigIssue] {
        do {
            _ = try ProxyTLS.Contexts.build(config)
            return []
        } catch let problems as TLSFileProblems {
            return problems.issues
        } catch {
            return [ConfigIssue(path: "", message: "\(error)")]
        }
    }
}

/// All TLS state of a running proxy: each https listener's certificates
/// and each TLS upstream's client context. Built at start; a reload builds
/// everything anew first (`prepare`) and only swaps once all of it loaded,
/// so one bad file changes nothing.
public final class ProxyTLS: @unchecked Sendable {
    struct Contexts {
        var listeners: [String: (ListenerTLSConfig, ServerTLSContexts)] = [:]
        var upstreams: [String: UpstreamTLSContext] = [:]

        static func build(_ config: WeirConfig) throws -> Contexts {
            var result = Contexts()
            var problems: [ConfigIssue] = []
            for (index, listener) in config.listeners.enumerated() {
                guard listener.protocol == .https, let tls = listener.tls else { continue }
                do {
                    result.listeners[listener.name] = (tls, try ServerTLSContexts(config: tls, path: "listeners[\(index)].tls"))
                } catch let error as TLSFileProblems {
                    problems += error.issues
                }
            }
            do {
                result.upstreams = try UpstreamTLSRegistry.build(config)
            } catch let error as TLSFileProblems {
                problems += error.issues
            }
            if !problems.isEmpty { throw TLSFileProblems(issues: problems) }
            return result
        }
    }

    /// Per https listener, by listener name.
    let listeners: [String: ListenerTLS]
    public let upstreams: UpstreamTLSRegistry

    init(config: WeirConfig) throws {
        let built = try Contexts.build(config)
        var listeners: [String: ListenerTLS] = [:]
        for (name, (tls, contexts)) in built.listeners {
            listeners[name] = ListenerTLS(name: name, config: tls, contexts: contexts)
        }
        self.listeners = listeners
        self.upstreams = UpstreamTLSRegistry()
        upstreams.replaceAll(built.upstreams)
    }

    /// Loads everything `config` names; throws (changing nothing) if any
    /// file is bad. The returned closure installs it.
    func prepare(config: WeirConfig) throws -> () -> Void {
        let built = try Contexts.build(config)
        return { [self] in
            for (name, (tls, contexts)) in built.listeners {
                listeners[name]?.replace(config: tls, contexts: contexts)
            }
            upstreams.replaceAll(built.upstreams)
        }
    }

    /// Every TLS file of `config` (watched for hot reload).
    static func files(of config: WeirConfig) -> [String] {
        config.listeners.compactMap(\.tls).flatMap(\.files) + config.upstreams.compactMap(\.tls).flatMap(\.files)
    }

    /// `GET /status` part: what each https listener serves now.
    func statusJSON() -> String {
        let parts = listeners.keys.sorted().map { name -> String in
            let current = listeners[name]!.current
            let certs = current.certificates.map { served in
                "{\"cert\":\(GenerationManager.jsonString(served.certPath)),\"names\":["
                    + served.names.map { GenerationManager.jsonString($0) }.joined(separator: ",")
                    + "],\"not_after\":\(served.notAfter)}"
            }
            return "\(GenerationManager.jsonString(name)):[" + certs.joined(separator: ",") + "]"
        }
        return "{" + parts.joined(separator: ",") + "}"
    }
}
