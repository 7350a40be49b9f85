import CLua
import CLuaShims

/// A Lua thread anchored in the registry. Runs one function at a time via
/// `lua_resume`; after the function finishes (or after `reset()`), the same
/// thread can run the next one, so a request reuses one coroutine for all its
/// plugin calls.
///
/// A plain value (a thread pointer, its registry slot, two flags), not an
/// object: a request takes one from its runtime's pool and gives it back
/// per phase run, and as a class each of those moves (and every use in
/// `PluginRequest.drive`) cost retains and releases (~100 instructions per
/// request, callgrind weir-noop). Its state lives as long as the runtime
/// that made it; the methods that need the state take it. Copies share the
/// thread: keep one owner (the scope's `coroutine`, or the runtime's pool).
public struct LuaCoroutine {
    public enum ResumeResult {
        /// The function returned; its `count` results are on `thread`'s stack
        /// (call `clear()` after reading them).
        case finished(count: Int32)
        /// The function yielded `count` values (on `thread`'s stack).
        case yielded(count: Int32)
        /// The function raised. The thread is dead and must not be reused
        /// (`isDead`): after an error thrown from a hook (budget exceeded) Lua
        /// leaves the thread with hooks disabled, so a reused thread could
        /// loop forever unchecked.
        case failed(LuaError)

        /// The function returned nothing (its stack is empty).
        var finishedWithoutResults: Bool {
            if case .finished(count: 0) = self { return true }
            return false
        }
    }

    public let thread: LuaThread
    /// The state's main thread (lua_resume's `from`).
    private let main: LuaThread
    private var ref: Int32
    /// True while a function has been started and not yet finished or reset.
    public private(set) var isRunning = false
    /// True after a failure: release it, never run another function on it.
    public private(set) var isDead = false

    public init(state: LuaState) {
        self.main = state.main
        self.thread = lua_newthread(state.main)!
        self.ref = state.ref() // pops the thread, anchoring it
    }

    /// Drops the registry anchor; the thread is collected with its stack.
    public mutating func release(from state: LuaState) {
        guard ref != LUA_NOREF else { return }
        state.unref(ref)
        ref = LUA_NOREF
    }

    public var isReleased: Bool { ref == LUA_NOREF }

    /// For deinit paths that may run off the loop: queue the anchor for
    /// release by the owner instead of touching the state here.
    mutating func releaseLater(into runtime: LuaRuntime) {
        guard ref != LUA_NOREF else { return }
        let r = ref
        ref = LUA_NOREF
        runtime.orphan(r)
    }

    /// Starts the function that sits below `nargs` arguments on the thread's stack.
    public mutating func start(nargs: Int32, state: LuaState) -> ResumeResult {
        precondition(!isRunning && !isDead, "coroutine busy or dead")
        isRunning = true
        return resume(nargs: nargs, state: state)
    }

    /// Starts a fresh run of the phase chain runner (CLuaShims/chain.c,
    /// `weir_chain_start`): its list, where it starts and ends, a fresh
    /// budget and its ctx argument (`newCtx`: a new table, else nil) set
    /// and the runner resumed in one C call.
    mutating func startChain(listRef: Int32, first: Int32, last: Int32, checkExit: Int32, budget: Int64, newCtx: Bool,
                             unreadSelf: UInt64, unreadConf: UInt64,
                             cells: UnsafePointer<UnsafeMutablePointer<weir_call_cell>?>?, state: LuaState) -> ResumeResult {
        precondition(!isRunning && !isDead, "coroutine busy or dead")
        isRunning = true
        var nresults: Int32 = 0
        let status = weir_chain_start(thread, main, listRef, first, last, checkExit, budget, newCtx ? 1 : 0,
                                      unreadSelf, unreadConf, cells, &nresults)
        return outcome(status, nresults, state)
    }

    /// Resumes after a yield with `nargs` values pushed on the thread's stack.
    public mutating func resume(nargs: Int32, state: LuaState) -> ResumeResult {
        var nresults: Int32 = 0
        let status = weir_resume(thread, main, nargs, &nresults)
        return outcome(status, nresults, state)
    }

    /// What a resume's status means (the thread's stack as it left it).
    @inline(__always)
    private mutating func outcome(_ status: Int32, _ nresults: Int32, _ state: LuaState) -> ResumeResult {
        switch status {
        case LUA_OK:
            isRunning = false
            return .finished(count: nresults)
        case LUA_YIELD:
            return .yielded(count: nresults)
        default:
            return failure(state)
        }
    }

    /// The function raised: its error and traceback; the thread is dead.
    @inline(never)
    private mutating func failure(_ state: LuaState) -> ResumeResult {
        let message: String
        switch lua_type(thread, -1) {
        case LUA_TSTRING, LUA_TNUMBER: message = LuaState.stringOrNumber(at: -1, on: thread) ?? "error"
        default: message = "(error object is a \(LuaState.typeName(at: -1, on: thread)) value)"
        }
        _ = weir_traceback(state.main, thread, nil)
        let traceback = LuaState.string(at: -1, on: state.main) ?? ""
        state.pop()
        isRunning = false
        isDead = true
        // The chain runner (CLuaShims/chain.c) is the C function at the
        // bottom of a phase's coroutine: a line that names nothing.
        let trimmed = traceback.replacingPrefix("stack traceback:\n").replacingSuffix("\n\t[C]: in ?")
        return .failed(LuaError(state.expandChunkNames(message), traceback: trimmed))
    }

    /// Abandons whatever the thread was doing (closing to-be-closed
    /// variables) and empties its stack, ready for the next function.
    public mutating func reset() {
        _ = weir_resetthread(thread)
        isRunning = false
    }

    /// Empties the stack after reading a finished function's results.
    public func clear() { lua_settop(thread, 0) }
}

extension String {
    func replacingPrefix(_ prefix: String) -> String {
        hasPrefix(prefix) ? String(dropFirst(prefix.count)) : self
    }

    func replacingSuffix(_ suffix: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) : self
    }
}
