// Errors produced while loading and validating a config. Validation never
// stops at the first problem: every issue is collected with its config path
// (and YAML line when known) so `weir validate` can list them all at once.

/// One problem in a config, located by its path, e.g.
/// `routes[2].upstream: unknown upstream "ordrs"`.
public struct ConfigIssue: Error, Hashable, Sendable, CustomStringConvertible {
    /// Dotted config path with array indices: `routes[2].match.paths[0]`.
    public var path: String
    public var message: String
    /// 1-based YAML line of the offending node, when the parser gave one.
    public var line: Int?

    public init(path: String, message: String, line: Int? = nil) {
        self.path = path
        self.message = message
        self.line = line
    }

    public var description: String {
        let location = path.isEmpty ? "<root>" : path
        if let line = line { return "\(location): \(message) (line \(line))" }
        return "\(location): \(message)"
    }
}

/// All problems found in one config file.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    public var file: String
    public var issues: [ConfigIssue]

    public init(file: String, issues: [ConfigIssue]) {
        self.file = file
        self.issues = issues
    }

    public var description: String {
        let noun = issues.count == 1 ? "problem" : "problems"
        var text = "\(file): \(issues.count) \(noun) in config"
        for issue in issues { text += "\n  " + issue.description }
        return text
    }
}
