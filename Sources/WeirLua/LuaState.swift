import CLua
import CLuaShims
import WeirCore

/// A raw `lua_State *` (the main state or one of its threads).
public typealias LuaThread = OpaquePointer

/// An error from loading or running Lua code, with the Lua position in the
/// message (`file:line: reason`) and a traceback when one exists.
public struct LuaError: Error, CustomStringConvertible, Equatable, Sendable {
    public var message: String
    public var traceback: String?
    public init(_ message: String, traceback: String? = nil) {
        self.message = message
        self.traceback = traceback
    }
    public var description: String { message }
}

/// What a Swift function exposed to Lua asks the C trampoline to do once
/// the Swift frame has returned (DESIGN.md "Lua bridging rules" 2).
public enum NativeReturn {
    /// Return this many values from the top of the stack.
    case values(Int32)
    /// Raise a Lua error with this message.
    case error(String)
    /// Yield the coroutine with this many values from the top of the stack.
    case yield(Int32)
    /// Not these arguments (or not in this phase): the trampoline calls the
    /// native's Lua fallback with the caller's arguments (one that raises
    /// the SDK's message at the caller's line), or returns `false` when the
    /// native has none (`weir_with_fallback`, CLuaShims.h).
    case fallback
}

/// A Swift function callable from Lua. It reads its arguments from the
/// thread's stack and pushes its results; it must never call a Lua API that
/// can raise other than by allocation (no `luaL_check*`, no metamethods:
/// use the raw accessors).
public typealias NativeFunction = (LuaThread) -> NativeReturn

/// A registered native, held in a class so the closure is stored at its
/// own calling convention: in an array (or tuple array) of bare closures
/// Swift keeps each one behind a pair of reabstraction thunks, one pair per
/// generic container it went through, and every call from Lua paid for all
/// of them.
final class NativeBox {
    let call: NativeFunction
    init(_ call: @escaping NativeFunction) { self.call = call }
}

/// The natives an SDK part registers, by name (see LuaRuntime.makeNatives).
/// `append((name, closure))` boxes the closure straight from the caller's
/// argument, so it never sits in a generic container.
struct NativeList: ExpressibleByArrayLiteral {
    private(set) var entries: [(name: String, box: NativeBox)] = []

    init() {}
    /// Array literals are for cold natives only: the literal's elements pass
    /// through a generic array first (a thunk pair per call stays).
    init(arrayLiteral elements: (String, NativeFunction)...) {
        for (name, function) in elements { append((name, function)) }
    }
    mutating func append(_ entry: (String, NativeFunction)) {
        entries.append((entry.0, NativeBox(entry.1)))
    }
    mutating func append(contentsOf other: NativeList) {
        entries.append(contentsOf: other.entries)
    }
}

/// The C dispatcher of a bare state (a runtime installs its own,
/// `runtimeNativeDispatch`, which answers its hot natives itself and sends
/// the others here).
private let nativeDispatch: weir_dispatch_fn = { thread, context, functionID, yieldCount in
    // The state is not retained for the call: it outlives every call into it.
    Unmanaged<LuaState>.fromOpaque(context!)._withUnsafeGuaranteedRef { state in
        state.callRegisteredNative(functionID, on: thread!, yieldCount: yieldCount!)
    }
}

extension NativeReturn {
    /// The trampoline's code for this result (`weir_dispatch_fn`).
    @inline(__always)
    func code(on thread: LuaThread, yieldCount: UnsafeMutablePointer<Int32>) -> Int32 {
        switch self {
        case .values(let n):
            return n
        case .error(let message):
            LuaState.push(message, on: thread)
            return WEIR_CALL_ERROR
        case .yield(let n):
            yieldCount.pointee = n
            return WEIR_CALL_YIELD
        case .fallback:
            return WEIR_CALL_FALLBACK
        }
    }

    /// A hot native's code (a result count or WEIR_CALL_FALLBACK) as a
    /// NativeReturn, for calls through its box.
    init(code: Int32) {
        self = code == WEIR_CALL_FALLBACK ? .fallback : .values(code)
    }
}

/// Owns one `lua_State`. Not thread-safe: a state is confined to the thread
/// (event loop) that uses it; the runtime built on top checks that.
///
/// The state carries a memory cap (enforced by the C allocator: Lua raises
/// "not enough memory" inside the script) and an instruction budget that the
/// caller sets per phase call (`setBudget`).
public final class LuaState {
    public let main: LuaThread
    /// The state's C bookkeeping (allocator, budget, chain runner); lives as long as the state.
    let info: UnsafeMutablePointer<weir_state_info>
    /// Each registered native, retained once here (released in deinit).
    fileprivate var natives: ContiguousArray<Unmanaged<NativeBox>> = []
    public let memoryLimit: Int
    /// Chunk names loaded so far, to undo Lua's truncation of long ones.
    private var chunkNames: Set<String> = []

    /// - Parameters:
    ///   - memoryLimit: bytes the state may allocate; 0 = unlimited.
    ///   - hookInterval: instructions between budget checks (0 disables budgets).
    public init(memoryLimit: Int = 64 << 20, hookInterval: Int = 1000) throws {
        guard let L = weir_newstate(memoryLimit, Int32(hookInterval)) else {
            throw LuaError("cannot create a Lua state (out of memory)")
        }
        self.main = L
        self.info = weir_info(L)
        self.memoryLimit = memoryLimit
        weir_set_dispatch(L, nativeDispatch, Unmanaged.passUnretained(self).toOpaque())
        luaL_openlibs(L)
        // Coroutines a script creates must be visible to the budget watchdog.
        // (A throw here still runs deinit, which closes the state.)
        if hookInterval > 0 && weir_track_coroutines(L) != LUA_OK {
            throw LuaError("cannot create a Lua state (out of memory)")
        }
        // The collector is the gateway's (see `collectsGenerationally`).
        if weir_guard_collectgarbage(L) != LUA_OK {
            throw LuaError("cannot create a Lua state (out of memory)")
        }
    }

    deinit {
        weir_set_dispatch(main, nil, nil)
        weir_close(main)
        for native in natives { native.release() }
    }

    // MARK: Natives

    /// Registers a Swift function and pushes it (a C closure) on `thread`.
    public func pushNative(_ function: @escaping NativeFunction, on thread: LuaThread? = nil) {
        pushNative(NativeBox(function), on: thread)
    }

    func pushNative(_ native: NativeBox, on thread: LuaThread? = nil) {
        natives.append(Unmanaged.passRetained(native))
        weir_push_native(thread ?? main, Int32(natives.count - 1))
    }

    /// How many natives are registered (the next one's id).
    var nativeCount: Int { natives.count }

    /// Calls registered native `id` through its box.
    @inline(__always)
    func callRegisteredNative(_ id: Int32, on thread: LuaThread, yieldCount: UnsafeMutablePointer<Int32>) -> Int32 {
        // The box is not retained for the call: the state holds it until it closes.
        natives[Int(id)]._withUnsafeGuaranteedRef { $0.call(thread) }.code(on: thread, yieldCount: yieldCount)
    }

    // MARK: Loading and calling

    /// Compiles `code` and leaves the chunk function on the stack. Syntax
    /// errors come back as `path:line: reason`.
    public func load(_ code: String, chunkName: String) throws {
        chunkNames.insert(chunkName)
        var code = code
        let status = code.withUTF8 { buf in
            buf.withMemoryRebound(to: CChar.self) { chars in
                weir_load(main, chars.baseAddress, chars.count, "@" + chunkName)
            }
        }
        if status != LUA_OK {
            let message = LuaState.string(at: -1, on: main) ?? "cannot load \(chunkName)"
            weir_pop(main, 1)
            throw LuaError(expandChunkNames(message))
        }
    }

    /// Protected call of the function below `nargs` arguments on the main
    /// stack. On success `nresults` values are left on the stack.
    public func pcall(nargs: Int32, nresults: Int32) throws {
        let status = weir_pcall(main, nargs, nresults)
        if status != LUA_OK {
            let full = LuaState.string(at: -1, on: main) ?? "(error object is not a string)"
            weir_pop(main, 1)
            var error = LuaState.splitTraceback(full)
            error.message = expandChunkNames(error.message)
            throw error
        }
    }

    /// Lua shortens chunk names longer than 60 bytes to "...<tail>" in
    /// messages; put the full file path back so errors read `path:line: reason`.
    public func expandChunkNames(_ message: String) -> String {
        guard message.hasPrefix("..."), let colon = message.firstIndex(of: ":") else { return message }
        let tail = message[message.index(message.startIndex, offsetBy: 3)..<colon]
        guard let full = chunkNames.first(where: { $0.hasSuffix(tail) }) else { return message }
        return full + message[colon...]
    }

    /// Splits "message\nstack traceback:\n..." as produced by the C message handler.
    static func splitTraceback(_ full: String) -> LuaError {
        if let range = full.range(of: "\nstack traceback:\n") {
            return LuaError(String(full[..<range.lowerBound]), traceback: String(full[range.upperBound...]))
        }
        return LuaError(full)
    }

    /// Sets the instruction budget for the next run (0 = unlimited).
    public func setBudget(_ instructions: Int) { weir_set_budget(main, Int64(instructions)) }
    public var budgetExhausted: Bool { weir_info(main).pointee.budget_exhausted != 0 }

    // MARK: Memory

    /// Bytes currently allocated (exact, from the allocator).
    public var bytesUsed: Int { weir_bytes_used(main) }
    /// Kilobytes as Lua's collector counts them (`collectgarbage("count")`).
    public var gcCountKB: Int { Int(weir_gc_count_kb(main)) }
    public func collectGarbage() { weir_full_gc(main) }
    /// The collector is generational (every state is made so: weir_newstate).
    ///
    /// Plugins keep it so: their `collectgarbage` refuses "stop",
    /// "incremental", "generational", "setpause" and "setstepmul" with a
    /// Lua error (one state serves every plugin of its event loop); a full
    /// collection, "step", "count" and "isrunning" work as in plain Lua.
    /// Debian's Lua is 5.4.4, whose generational mode has a known bug
    /// (lua.org/bugs.html, fixed in 5.4.5: "GC not setting a proper target
    /// for next cycle after a full collection in generational mode"): after
    /// a full collection (`collectgarbage()`, `collectGarbage()`) the point
    /// of the next major collection is computed from a stale estimate, so it
    /// may come early or late. GCTests runs plugins that collect on every
    /// request: the mode stays generational and the heap flat.
    public var collectsGenerationally: Bool { weir_gc_is_generational(main) != 0 }

    // MARK: Registry references

    /// Pops the top value of the main stack into the registry.
    public func ref() -> Int32 { luaL_ref(main, weir_registryindex()) }
    public func unref(_ ref: Int32) { luaL_unref(main, weir_registryindex(), ref) }
    public func pushRef(_ ref: Int32, on thread: LuaThread? = nil) {
        lua_rawgeti(thread ?? main, weir_registryindex(), lua_Integer(ref))
    }

    public var top: Int32 { lua_gettop(main) }
    public func pop(_ n: Int32 = 1) { weir_pop(main, n) }

    // MARK: Values (static helpers usable on any thread of the state)

    public static func push(_ string: String, on L: LuaThread) {
        var string = string
        string.withUTF8 { buf in
            buf.withMemoryRebound(to: CChar.self) { chars in
                _ = lua_pushlstring(L, chars.baseAddress, chars.count)
            }
        }
    }

    /// The string at `index`, or nil if the value is not a string (numbers
    /// are not converted: conversion would allocate in place).
    public static func string(at index: Int32, on L: LuaThread) -> String? {
        var length = 0
        guard let p = weir_tostring(L, index, &length) else { return nil }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: length), as: UTF8.self)
    }

    /// The bytes of the string at `index`, nil if the value is not a string.
    /// Valid only while that value stays on the stack: for lookups that
    /// need no Swift String (shared dictionary keys, credential values).
    @inline(__always)
    public static func bytes(at index: Int32, on L: LuaThread) -> UnsafeRawBufferPointer? {
        var length = 0
        guard let p = weir_tostring(L, index, &length) else { return nil }
        return UnsafeRawBufferPointer(start: p, count: length)
    }

    /// A header name argument, lower-cased (ASCII: header names are tokens),
    /// built from the Lua string's bytes in one step; nil if not a string.
    public static func headerName(at index: Int32, on L: LuaThread) -> String? {
        var length = 0
        guard let p = weir_tostring(L, index, &length) else { return nil }
        let bytes = UnsafeRawBufferPointer(start: p, count: length)
        guard bytes.contains(where: { $0 >= 0x41 && $0 <= 0x5a }) else {
            return String(decoding: bytes, as: UTF8.self)
        }
        return String(unsafeUninitializedCapacity: length) { out in
            for i in 0..<length {
                let b = bytes[i]
                out[i] = b >= 0x41 && b <= 0x5a ? b | 0x20 : b
            }
            return length
        }
    }

    /// A string or number argument as a string; nil for anything else.
    public static func stringOrNumber(at index: Int32, on L: LuaThread) -> String? {
        switch lua_type(L, index) {
        case LUA_TSTRING: return string(at: index, on: L)
        case LUA_TNUMBER:
            if lua_isinteger(L, index) != 0 { return String(lua_tointegerx(L, index, nil)) }
            return String(lua_tonumberx(L, index, nil))
        default: return nil
        }
    }

    public static func typeName(at index: Int32, on L: LuaThread) -> String {
        String(cString: lua_typename(L, lua_type(L, index)))
    }

    /// Pushes a config value as plain Lua data (maps and arrays become tables).
    public static func push(_ value: ConfigValue, on L: LuaThread) {
        // Each nesting level needs a few slots; configs are shallow.
        _ = lua_checkstack(L, 4)
        switch value {
        case .null: lua_pushnil(L)
        case .bool(let b): lua_pushboolean(L, b ? 1 : 0)
        case .int(let i): lua_pushinteger(L, lua_Integer(i))
        case .double(let d): lua_pushnumber(L, d)
        case .string(let s): push(s, on: L)
        case .array(let items):
            lua_createtable(L, Int32(items.count), 0)
            for (i, item) in items.enumerated() {
                push(item, on: L)
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
        case .map(let entries):
            lua_createtable(L, 0, Int32(entries.count))
            for (key, item) in entries {
                push(key, on: L)
                push(item, on: L)
                lua_rawset(L, -3)
            }
        }
    }

    /// Reads plain Lua data (no metamethods are invoked). A table whose keys
    /// are exactly 1...n is an array, an empty table is an empty map, other
    /// tables need string keys. Functions, userdata and threads are refused.
    public static func value(at index: Int32, on L: LuaThread, depth: Int = 0) throws -> ConfigValue {
        let index = lua_absindex(L, index)
        switch lua_type(L, index) {
        case LUA_TNIL, LUA_TNONE: return .null
        case LUA_TBOOLEAN: return .bool(lua_toboolean(L, index) != 0)
        case LUA_TNUMBER:
            if lua_isinteger(L, index) != 0 { return .int(Int(lua_tointegerx(L, index, nil))) }
            return .double(lua_tonumberx(L, index, nil))
        case LUA_TSTRING: return .string(string(at: index, on: L) ?? "")
        case LUA_TTABLE:
            guard depth < 64 else { throw LuaError("table nested deeper than 64 levels") }
            guard lua_checkstack(L, 3) != 0 else { throw LuaError("Lua stack overflow") }
            var map: [String: ConfigValue] = [:]
            var indexed: [Int: ConfigValue] = [:]
            lua_pushnil(L)
            while lua_next(L, index) != 0 {
                let item: ConfigValue
                do { item = try value(at: -1, on: L, depth: depth + 1) } catch { weir_pop(L, 2); throw error }
                if lua_type(L, -2) == LUA_TSTRING, let key = string(at: -2, on: L) {
                    map[key] = item
                } else if lua_isinteger(L, -2) != 0 {
                    indexed[Int(lua_tointegerx(L, -2, nil))] = item
                } else {
                    let keyType = typeName(at: -2, on: L)
                    weir_pop(L, 2)
                    throw LuaError("table has a \(keyType) key; only string keys or array indexes are allowed")
                }
                weir_pop(L, 1)
            }
            if indexed.isEmpty { return .map(map) }
            guard map.isEmpty, (1...indexed.count).allSatisfy({ indexed[$0] != nil }) else {
                throw LuaError("table mixes array items and named keys (or has holes)")
            }
            return .array((1...indexed.count).map { indexed[$0]! })
        default:
            throw LuaError("cannot convert a \(typeName(at: index, on: L)) value")
        }
    }
}
