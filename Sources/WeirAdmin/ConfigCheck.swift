import Foundation
import WeirCore
import WeirProxy

/// The outcome of checking a config file, shared by `weir validate` and the
/// startup of `weir run` (so both print the same list of problems).
public struct ConfigCheckResult: Sendable {
    /// The parsed config, when valid.
    public var config: WeirConfig?
    /// 0 valid, 1 invalid.
    public var exitCode: Int32
    /// What to print: "config OK" (stdout) or every problem (stderr).
    public var message: String

    public var isValid: Bool { config != nil }
}

public enum ConfigCheck {
    /// Loads and validates `path`, collecting every problem with its config path.
    public static func run(path: String,
                           environment: [String: String] = ProcessInfo.processInfo.environment) -> ConfigCheckResult {
        do {
            let config = try ConfigLoader.load(path: path, environment: environment, fileChecks: TLSFileCheck.issues)
            // Plugins: files found and compiled, configs checked against schemas.
            let base = (path as NSString).deletingLastPathComponent
            do {
                try PluginGeneration.check(config: config, baseDirectory: base.isEmpty ? "." : base)
            } catch {
                return ConfigCheckResult(config: nil, exitCode: 1, message: "\(path): plugins: \(error)")
            }
            let summary = "config OK: \(path) (\(config.listeners.count) listener(s), "
                + "\(config.upstreams.count) upstream(s), \(config.routes.count) route(s))"
            return ConfigCheckResult(config: config, exitCode: 0, message: summary)
        } catch let errors as ConfigErrors {
            return ConfigCheckResult(config: nil, exitCode: 1, message: errors.description)
        } catch {
            return ConfigCheckResult(config: nil, exitCode: 1, message: "\(path): \(error)")
        }
    }
}
