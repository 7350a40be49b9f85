import CLuaShims
import WeirCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The Lua version string this binary was built against ("Lua 5.4").
public var luaVersion: String { String(cString: weir_lua_version()) }

/// The Lua side of the SDK (`lua/weir/*.lua`), read once and handed to
/// every Lua state. Found in, first match wins: an explicit directory, the
/// `WEIR_LUA_DIR` environment variable, `./lua`, `<executable>/../lua`,
/// `<executable>/../share/weir/lua`, and this source tree's `lua/` (so tests
/// and development builds work from any directory).
public struct LuaSDK: Sendable {
    public var directory: String
    public var initSource: String
    public var jsonSource: String

    public init(directory: String) throws {
        self.directory = directory
        self.initSource = try readFile(directory + "/weir/init.lua")
        self.jsonSource = try readFile(directory + "/weir/json.lua")
    }

    public static func locate(explicit: String? = nil) throws -> LuaSDK {
        var candidates: [String] = []
        if let explicit = explicit { candidates.append(explicit) }
        if let env = getenv("WEIR_LUA_DIR") { candidates.append(String(cString: env)) }
        candidates.append("lua")
        if let exe = executableDirectory() {
            candidates.append(exe + "/../lua")
            candidates.append(exe + "/../share/weir/lua")
        }
        // Sources/WeirLua/PluginLibrary.swift -> repository root.
        let sourceRoot = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false).dropLast(3).joined(separator: "/")
        candidates.append(sourceRoot + "/lua")
        for dir in candidates where fileExists(dir + "/weir/init.lua") {
            return try LuaSDK(directory: dir)
        }
        throw LuaError("cannot find the Lua SDK (weir/init.lua); looked in: " + candidates.joined(separator: ", ") + " (set WEIR_LUA_DIR)")
    }

    private static func executableDirectory() -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        let path = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
    }
}

/// A plugin found on disk, with its schema and handler metadata checked.
public struct PluginDefinition: Sendable {
    public var name: String
    public var directory: String
    public var handlerPath: String
    public var handlerSource: String
    public var schemaPath: String
    public var schema: PluginSchema
    public var priority: Int
    public var version: String
    public var phases: Set<PluginPhase>
    /// The handler's `BODY_FILTER_IF`: its body_filter is only wanted when
    /// one of these config paths (dot-separated) holds a non-empty value.
    public var bodyFilterIf: [String]? = nil
}

/// A plugin with a validated config (defaults applied).
public struct ConfiguredPlugin: Sendable {
    public var definition: PluginDefinition
    public var config: ConfigValue
    public init(definition: PluginDefinition, config: ConfigValue) {
        self.definition = definition; self.config = config
    }
    public var name: String { definition.name }

    /// This plugin, with this config, filters response bodies: it has a
    /// body_filter and (when its handler sets `BODY_FILTER_IF`) one of the
    /// named config paths is set. Chains without one keep responses as the
    /// upstream framed them (no re-chunking).
    public var filtersBody: Bool {
        guard definition.phases.contains(.bodyFilter) else { return false }
        guard let paths = definition.bodyFilterIf else { return true }
        return paths.contains { path in
            var value = config
            for key in path.split(separator: ".") {
                guard case .map(let entries) = value, let next = entries[String(key)] else { return false }
                value = next
            }
            switch value {
            case .null, .bool(false): return false
            case .string(let s): return !s.isEmpty
            case .array(let a): return !a.isEmpty
            case .map(let m): return !m.isEmpty
            default: return true
            }
        }
    }
}

/// The plugins of one generation: located on the search paths, compiled
/// once in a scratch Lua state to check them, and their schemas parsed.
/// Immutable and Sendable: built off the event loops, then handed to one
/// `LuaRuntime` per loop.
public final class PluginLibrary: Sendable {
    public let plugins: [String: PluginDefinition]
    public let sdk: LuaSDK
    public let searchPaths: [String]

    /// Loads `names` from `searchPaths` (first folder holding
    /// `<name>/handler.lua` wins). Throws on the first plugin that is missing,
    /// does not compile (`file:line: reason`), has the wrong shape, or has a
    /// bad schema.
    public init(names: [String], searchPaths: [String], sdk: LuaSDK) throws {
        self.sdk = sdk
        self.searchPaths = searchPaths
        let scratch = try LuaRuntime(sdk: sdk, eventLoop: nil, options: LuaRuntimeOptions())
        var found: [String: PluginDefinition] = [:]
        for name in Set(names).sorted() {
            guard PluginLibrary.isValidName(name) else {
                throw LuaError("invalid plugin name \"\(name)\" (letters, digits, '-' and '_' only)")
            }
            let tried = searchPaths.map { "\($0)/\(name)/handler.lua" }
            guard let index = tried.firstIndex(where: fileExists) else {
                throw LuaError("plugin \"\(name)\" not found (looked for " + tried.joined(separator: ", ") + ")")
            }
            let directory = "\(searchPaths[index])/\(name)"
            let handlerPath = tried[index]
            let schemaPath = directory + "/schema.lua"
            let handlerSource = try readFile(handlerPath)
            guard fileExists(schemaPath) else {
                throw LuaError("\(schemaPath): missing (every plugin needs one; `return { fields = {} }` for no config)")
            }
            let schemaValue = try scratch.evaluate(try readFile(schemaPath), chunkName: schemaPath)
            let schema = try PluginSchema.parse(schemaValue, file: schemaPath)
            let info = try scratch.inspectHandler(source: handlerSource, path: handlerPath, name: name)
            found[name] = PluginDefinition(name: name, directory: directory, handlerPath: handlerPath,
                                           handlerSource: handlerSource, schemaPath: schemaPath, schema: schema,
                                           priority: info.priority, version: info.version, phases: info.phases,
                                           bodyFilterIf: info.bodyFilterIf)
        }
        self.plugins = found
    }

    static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2d || c == 0x5f
        }
    }

    /// Validates a list of plugin references (as in the config) against
    /// their schemas. `path` is the list's config path (`routes[0].plugins`);
    /// problems read `routes[0].plugins[1].config.minute: expected integer, got string`.
    /// Disabled references are skipped.
    /// `upstreams`: the config's upstream names, for `format = "upstream"`
    /// fields (nil: not checked, e.g. a plugin list validated on its own).
    public func configure(_ refs: [PluginRef], path: String,
                          upstreams: Set<String>? = nil) -> Result<[ConfiguredPlugin], SchemaErrors> {
        var problems: [SchemaProblem] = []
        var out: [ConfiguredPlugin] = []
        for (i, ref) in refs.enumerated() where ref.enabled {
            guard let definition = plugins[ref.name] else {
                problems.append(SchemaProblem(path: "\(path)[\(i)].name", reason: "unknown plugin \"\(ref.name)\""))
                continue
            }
            let configPath = "\(path)[\(i)].config"
            switch definition.schema.validate(ref.config, path: configPath) {
            case .success(let config):
                if let upstreams {
                    for (at, name) in definition.schema.upstreamReferences(in: config, path: configPath) where !upstreams.contains(name) {
                        let known = upstreams.sorted().map { "\"\($0)\"" }.joined(separator: ", ")
                        problems.append(SchemaProblem(path: at, reason: "no upstream named \"\(name)\" (configured: \(known.isEmpty ? "none" : known))"))
                    }
                }
                out.append(ConfiguredPlugin(definition: definition, config: config))
            case .failure(let errors): problems.append(contentsOf: errors.problems)
            }
        }
        return problems.isEmpty ? .success(out) : .failure(SchemaErrors(problems: problems))
    }
}

func fileExists(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
}

func readFile(_ path: String) throws -> String {
    guard let f = fopen(path, "rb") else {
        throw LuaError("\(path): cannot open (\(String(cString: strerror(errno))))")
    }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&chunk, 1, chunk.count, f)
        if n > 0 { bytes.append(contentsOf: chunk[0..<n]) }
        if n < chunk.count { break }
    }
    return String(decoding: bytes, as: UTF8.self)
}
