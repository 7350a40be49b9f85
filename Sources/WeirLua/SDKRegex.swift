import CLua
import CLuaShims

/// Compiled patterns of `weir.re`, per Lua state (one per event loop, so no
/// lock). Patterns normally come from plugin configs, so the set is small;
/// the cap only guards against a plugin that builds patterns per request.
final class RegexCache {
    private var compiled: [String: Regex<AnyRegexOutput>] = [:]
    private static let capacity = 256

    /// The compiled pattern, or the reason it does not compile.
    func regex(_ pattern: String) -> Result<Regex<AnyRegexOutput>, RegexSyntaxError> {
        if let hit = compiled[pattern] { return .success(hit) }
        switch RegexSyntax.compile(pattern) {
        case .success(let regex):
            if compiled.count >= Self.capacity { compiled.removeAll(keepingCapacity: true) }
            compiled[pattern] = regex
            return .success(regex)
        case .failure(let error):
            return .failure(error)
        }
    }
}

public struct RegexSyntaxError: Error, Sendable, CustomStringConvertible {
    public var description: String
}

/// The regular expressions of `weir.re` and of `format = "regex"` schema
/// fields: Swift's `Regex` syntax (PCRE/ICU-style: classes, anchors,
/// groups, alternation, quantifiers, `(?i)`), so a pattern that passes
/// config validation is the one the plugin runs.
public enum RegexSyntax {
    public static func compile(_ pattern: String) -> Result<Regex<AnyRegexOutput>, RegexSyntaxError> {
        do { return .success(try Regex(pattern)) } catch {
            return .failure(RegexSyntaxError(description: "invalid regular expression \"\(pattern)\": \(error)"))
        }
    }
}

extension LuaRuntime {
    /// `weir.re.find(subject, pattern)` -> from, to (1-based byte positions of
    /// the first match, as `string.find`), nil when there is none, or
    /// `nil, err` for a pattern that does not compile.
    func makeRegexNatives() -> NativeList {
        let cache = RegexCache()
        return [("re_find", { L in
            guard let subject = LuaState.string(at: 1, on: L), let pattern = LuaState.string(at: 2, on: L) else {
                return .error("weir.re.find: expected subject and pattern strings")
            }
            switch cache.regex(pattern) {
            case .failure(let error):
                lua_pushnil(L); LuaState.push(error.description, on: L); return .values(2)
            case .success(let regex):
                guard let match = subject.firstMatch(of: regex) else { lua_pushnil(L); return .values(1) }
                let from = subject.utf8.distance(from: subject.startIndex, to: match.range.lowerBound)
                let to = subject.utf8.distance(from: subject.startIndex, to: match.range.upperBound)
                lua_pushinteger(L, lua_Integer(from + 1))
                lua_pushinteger(L, lua_Integer(to))
                return .values(2)
            }
        })]
    }
}
