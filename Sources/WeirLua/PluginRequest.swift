import CLua
import CLuaShims
import NIOCore
import WeirCore

/// A value handed back to a coroutine when an async SDK call completes.
enum AsyncValue {
    case value(ConfigValue)
    case bytes([UInt8])
    /// Pushed as { status = n, headers = { name = value | {values} }, body = "..." }.
    case httpResponse(OutboundResponse)
    /// Pushed by the closure (exactly one value), e.g. a Redis reply (SDKRedis.swift).
    case pushed((LuaThread) -> Void)
}

/// The plugin scope of one request (or of one connection's connection
/// phase): its coroutine, `weir.ctx` table, exit state and the phase runner.
/// Confined to the runtime's event loop. Keeps its runtime (generation)
/// alive until the request is finished, so a reload never pulls a Lua state
/// from under a running request.
///
/// Open for one kind of subclass: a request's plugin side that is its own
/// request context (the proxy's `ExchangePlugins`, see `adoptAsOwnContext`),
/// so the two are one object, reused as a whole, with no link between them
/// to set and clear per request. Every member is final outside this module.
open class PluginRequest {
    public let runtime: LuaRuntime
    /// The request (nil in a connection or timer scope, and while a
    /// finished scope with a separate context waits to be reused: `detach`).
    public var context: PluginRequestContext? {
        if let own = ownContext { return own }
        return separateContext
    }
    /// A context object other than this scope (tests, tools): held.
    private var separateContext: PluginRequestContext? {
        didSet { hotContext = HotRequestContext(separateContext) }
    }
    /// This scope itself, as a subclass that is its request context
    /// (`adoptAsOwnContext`): not retained (it is self), never cleared.
    private unowned(unsafe) var ownContext: PluginRequestContext?
    /// `ownContext` is set (a flag: reading the existential retains and releases it).
    private var isOwnContext = false
    /// `context` as the hot natives call it, without retaining it (`HotRequestContext`).
    private(set) var hotContext: HotRequestContext?
    public private(set) var connection: PluginConnection?

    var coroutine: LuaCoroutine?
    /// The registry slot that anchors this request's `weir.ctx` (== ctxSlot
    /// while the request has one; LUA_NOREF before it is made).
    private(set) var ctxRef: Int32 = LUA_NOREF
    /// A registry slot taken on the scope's first `weir.ctx` and kept while
    /// the scope lives (a reused scope serves many requests): each request
    /// stores its table there and `finish` leaves `false` in it (never nil:
    /// a hole could make luaL_ref's length-based numbering hand the slot out
    /// again). luaL_ref and luaL_unref per request cost ~530 instructions.
    private var ctxSlot: Int32 = LUA_NOREF
    /// This request's `weir.ctx` lives only as the running chain runner's
    /// ctx argument (`runnerCtxDiesWithPhase`); cleared when the request finishes.
    private var ctxOnRunnerStack = false
    /// `entries` are a request phase of a chain with no later phase (`runnerCtxDiesWithPhase`).
    private var ctxCanDieWithPhase = false
    /// Set by weir.response.exit / conn:reject; ends the chain.
    var exit: PluginExit?
    /// The async operation the coroutine is waiting for (set by an SDK native before yielding).
    var pending: EventLoopFuture<[AsyncValue]>?
    public private(set) var isFinished = false
    /// The response body chunk the body_filter phase is working on.
    public internal(set) var bodyChunk: [UInt8] = []
    public private(set) var isLastChunk = false

    // The phase run in progress.
    private var phase: PluginPhase = .request
    private var entries: [PluginChain.Entry] = []
    /// The chain whose `phase` lists `entries`, `listRef`, `listTakesCtx`
    /// and `recorders` hold (nil after a switch to a consumer's chain).
    private var entriesChain: PluginChain?
    private var index = 0
    /// The chain runner's list of `entries` (LUA_NOREF: one call per resume).
    private var listRef: Int32 = LUA_NOREF
    /// The last entry (1-based) of the runner's current run.
    private var runLast = 0
    /// `entries` whose function never reads self / conf (PluginChain.phaseUnreadSelf).
    private var unreadSelf: UInt64 = 0
    private var unreadConf: UInt64 = 0
    /// Whether a non-nil first result stops the runner (an exit).
    private var checksExit: Int32 { phase == .request || phase == .response ? 1 : 0 }
    private var listTakesCtx = false
    /// `entries`' metrics recorders (PluginChain.phaseRecorders).
    private var recorders: [PluginCallRecorder?] = []
    /// `entries`' metrics cells for the chain runner (PluginChain.phaseCells):
    /// when set, the runner records the calls that complete and Swift only
    /// the one it stopped in.
    private var cells: UnsafePointer<UnsafeMutablePointer<weir_call_cell>?>?
    private var serial = 0
    private var savedBudget = LuaRuntime.BudgetSnapshot()
    /// Start of the current plugin call, when an observer wants timings.
    private var callStart: UInt64 = 0
    private var promise: EventLoopPromise<PhaseResult>?

    /// A scope for `request` (nil: a connection or timer scope, or a
    /// subclass that adopts itself as its context next).
    public init(runtime: LuaRuntime, request: PluginRequestContext?, connection: PluginConnection?) {
        self.runtime = runtime
        self.separateContext = request
        self.hotContext = HotRequestContext(request)
        self.connection = connection
    }

    /// A subclass that is its own request context says so once, right
    /// after `init(runtime:request: nil, connection:)`: `context` is then
    /// this object for its whole life, through every request it serves
    /// (`LuaRuntime.restartRequest(_:connection:)`).
    public final func adoptAsOwnContext(_ me: PluginRequestContext) {
        precondition(me === self && separateContext == nil, "only a scope itself can be its own context")
        ownContext = me
        isOwnContext = true
        hotContext = HotRequestContext(me)
    }

    deinit {
        // Possibly off the loop: queue the refs (the ctx slot, and the
        // coroutine of a scope dropped without finish()); the runtime
        // releases them on its loop at the next begin.
        if ctxSlot != LUA_NOREF { runtime.orphan(ctxSlot) }
        guard !isFinished else { return }
        coroutine?.releaseLater(into: runtime)
    }

    // MARK: Reuse

    /// A finished scope drops what ties it to its request (the request
    /// context, connection, consumer lookup, body chunk) so that it can wait
    /// for the next request of its runtime without keeping that request
    /// alive (see `LuaRuntime.restartRequest`).
    public final func detach() {
        precondition(isFinished, "only a finished scope can be detached")
        // Its own context stays: it is this object.
        if separateContext != nil { separateContext = nil }
        // Stored only when set: storing nil or [] over nil or [] still
        // destroys the old value (a release call each, per request).
        if connection != nil { connection = nil }
        // A scope that is its own context set it once for all its requests.
        if !isOwnContext, consumerChain != nil { consumerChain = nil }
        if consumerSeen != nil { consumerSeen = nil }
        if !bodyChunk.isEmpty { bodyChunk = [] }
    }

    /// Starts another request on a finished, detached scope: the state a
    /// new scope would have (the coroutine and weir.ctx were released by
    /// `finish`; the phase fields are set by each `start`).
    /// `request` nil: the scope is its own context (`adoptAsOwnContext`).
    func restart(request: PluginRequestContext?, connection: PluginConnection?) {
        // `finish` left `pending` nil.
        precondition(isFinished && separateContext == nil && promise == nil && pending == nil && coroutine == nil
                     && ctxRef == LUA_NOREF && (request == nil) == isOwnContext,
                     "only a finished, detached scope can be restarted")
        if let request { separateContext = request }
        if connection != nil { self.connection = connection }
        isFinished = false
        if exit != nil { exit = nil }
        isLastChunk = false
        savedBudget = LuaRuntime.BudgetSnapshot()
    }

    /// Starts another request on this finished scope that is its own
    /// context (`adoptAsOwnContext`): `LuaRuntime.restartRequest` without
    /// a context to link.
    public final func restartOwnRequest(connection: PluginConnection?) {
        runtime.willRestartRequest()
        restart(request: nil, connection: connection)
    }

    /// The plugin whose phase function runs now (asked by natives).
    var runningPlugin: String {
        let i = listRef != LUA_NOREF ? Int(runtime.state.info.pointee.chain_entry) - 1 : index
        return i >= 0 && i < entries.count ? entries[i].name : ""
    }

    /// The per-request `weir.ctx` table, created on first use; pushed on
    /// `thread` and anchored in the registry, so later phases and
    /// `weir.ctx` find it.
    func pushCtx(on thread: LuaThread) {
        if ctxRef != LUA_NOREF {
            runtime.state.pushRef(ctxRef, on: thread)
            return
        }
        if ctxOnRunnerStack, let co = coroutine, weir_chain_push_ctx(co.thread, thread) != 0 {
            // Made for the runner alone, now asked for by name (weir.ctx):
            // anchored like any request's from here on.
            ctxOnRunnerStack = false
        } else {
            // One hash slot: the table is made only for a phase function
            // that reads ctx (CtxParameterTests), which mostly stores a key,
            // and the first key then needs no rehash (luaH_resize, ~250
            // instructions). Four slots cost more than they saved (weir-noop
            // when every request made the table, callgrind).
            lua_createtable(thread, 0, 1)
        }
        lua_pushvalue(thread, -1)
        if ctxSlot == LUA_NOREF {
            lua_xmove(thread, runtime.state.main, 1)
            ctxSlot = runtime.state.ref()
        } else {
            // A reused scope's slot: anchored from the thread (no read back
            // from the registry, ~40).
            lua_rawseti(thread, weir_registryindex(), lua_Integer(ctxSlot))
        }
        ctxRef = ctxSlot
    }

    /// Whether `weir.ctx`, as the chain runner's ctx argument, is made by
    /// the runner's start (`weir_chain_start`) for this phase alone. When no later phase
    /// of this request can see the table (a request phase of a chain with
    /// no response, body_filter or log phase, and no consumer chain to
    /// switch to), it is made on the runner's stack and anchored nowhere:
    /// it dies with the phase, with no registry slot to set and clear per
    /// request (~150 instructions). A native that asks for it by name
    /// (`weir.ctx`) finds it there (`pushCtx`).
    private var runnerCtxDiesWithPhase: Bool {
        ctxRef == LUA_NOREF && !ctxOnRunnerStack && ctxCanDieWithPhase && consumerChain == nil
    }

    // MARK: Running a phase

    public enum Outcome {
        case done(PhaseResult)
        /// A plugin is waiting on an async operation; the result follows.
        case pending(EventLoopFuture<PhaseResult>)
    }

    /// Runs `phase` for every plugin of `chain` that implements it, in order.
    /// Completes synchronously unless a plugin waits on an async SDK call.
    public final func start(_ phase: PluginPhase, chain: PluginChain) -> Outcome {
        // Debug builds only: reading the existential loop retains and releases it.
        assert(runtime.eventLoop?.inEventLoop ?? true, "plugin phase started off its runtime's event loop")
        precondition(promise == nil, "a phase is already running for this request")
        precondition(chain.owner == ObjectIdentifier(runtime), "chain belongs to another runtime (generation or event loop)")
        guard !isFinished else {
            return .done(.failed(PluginFailure(plugin: "", phase: phase, message: "request already finished", traceback: nil)))
        }
        self.index = 0
        if exit != nil { self.exit = nil }  // a nil store over nil still destroys the old value
        if chain !== entriesChain || phase != self.phase {
            // A reused scope mostly runs the same chain's same phase as its
            // last request: its lists are kept (storing them again cost two
            // retains and two releases per phase).
            self.phase = phase
            entriesChain = chain
            entries = chain.byPhase[phase.luaID]
            listRef = chain.phaseLists[phase.luaID]
            listTakesCtx = chain.phaseTakesCtx[phase.luaID]
            recorders = chain.phaseRecorders[phase.luaID]
            cells = chain.phaseCells[phase.luaID]
            ctxCanDieWithPhase = phase == .request && !chain.hasPhasesAfterRequest
            unreadSelf = chain.phaseUnreadSelf[phase.luaID]
            unreadConf = chain.phaseUnreadConf[phase.luaID]
        }
        if entries.isEmpty { return .done(.continue) }
        if let result = drive(resumeWith: nil) { return .done(result) }
        let promise = runtime.eventLoop!.makePromise(of: PhaseResult.self)
        self.promise = promise
        return .pending(promise.futureResult)
    }

    /// Runs the body_filter phase over one chunk of the response body; the
    /// plugins may replace it (read `bodyChunk` afterwards). Like `start`, it
    /// can be pending if a plugin waits on an async SDK call.
    public final func filterBody(_ chunk: [UInt8], isLast: Bool, chain: PluginChain) -> Outcome {
        bodyChunk = chunk
        isLastChunk = isLast
        return start(.bodyFilter, chain: chain)
    }

    /// `start` as a future.
    public final func run(_ phase: PluginPhase, chain: PluginChain) -> EventLoopFuture<PhaseResult> {
        switch start(phase, chain: chain) {
        case .done(let result): return runtime.eventLoop!.makeSucceededFuture(result)
        case .pending(let future): return future
        }
    }

    /// Ends the scope: abandons a waiting coroutine, releases the coroutine
    /// and `weir.ctx`. Idempotent. Any phase still waiting completes with
    /// `.failed` ("request finished while ...").
    public final func finish() {
        guard !isFinished else { return }
        isFinished = true
        ctxOnRunnerStack = false
        if let co = coroutine {
            runtime.recycle(co)
            coroutine = nil
        }
        if ctxRef != LUA_NOREF {
            runtime.unpublishCtx(ctxRef)
            ctxRef = LUA_NOREF
            if pending != nil || promise != nil {
                // Abandoned mid-phase: a callback still holds this scope, so
                // it is not reused soon; the slot goes back now.
                runtime.state.unref(ctxSlot)
                ctxSlot = LUA_NOREF
            } else {
                let L = runtime.state.main
                lua_pushboolean(L, 0)                   // the table goes; the slot stays this scope's
                lua_rawseti(L, weir_registryindex(), lua_Integer(ctxSlot))
            }
        }
        if pending != nil { pending = nil }  // a nil store over nil still calls release
        if let promise = promise {
            self.promise = nil
            let plugin = index < entries.count ? entries[index].name : ""
            promise.succeed(.failed(PluginFailure(plugin: plugin, phase: phase,
                                                  message: "request finished while the plugin was waiting", traceback: nil)))
        }
    }

    /// The call of `entries[index]` ended now with `outcome`.
    private func report(_ outcome: PluginCallOutcome) {
        guard runtime.options.observer != nil else { return }
        let now = weir_monotonic_ns()
        record(index, nanoseconds: now &- callStart, outcome)
        callStart = now // the next plugin of the chain starts here
    }

    /// The chain runner returned or stopped in entry `stopped` after
    /// starting at `first`: entries first..<stopped completed, each ending
    /// when the next started (the runner's marks). Records them when the
    /// runner did not (no cells) and takes the start of `stopped`.
    private func noteRunnerMarks(from first: Int, stoppedIn stopped: Int) {
        guard runtime.options.observer != nil else { return }
        let info = runtime.state.info.pointee
        // Entry k is the runner's k + 1: it started at mark k + 1.
        guard stopped + 1 < Int(info.chain_marks_capacity) else { return }
        if cells == nil {
            var start = info.chain_marks[first + 1]
            for k in first..<stopped {
                let next = info.chain_marks[k + 2]
                record(k, nanoseconds: next &- start, .completed)
                start = next
            }
        }
        callStart = info.chain_marks[stopped + 1]
    }

    private func record(_ k: Int, nanoseconds: UInt64, _ outcome: PluginCallOutcome) {
        if k < recorders.count, let recorder = recorders[k] {
            recorder.record(nanoseconds: nanoseconds, outcome: outcome)
        } else {
            runtime.options.observer?.pluginPhaseCompleted(plugin: entries[k].name, phase: phase, nanoseconds: nanoseconds, outcome: outcome)
        }
    }

    private func fail(_ entry: PluginChain.Entry, _ message: String, _ traceback: String? = nil) -> PhaseResult {
        report(.failed)
        return .failed(PluginFailure(plugin: entry.name, phase: phase, message: message, traceback: traceback))
    }

    /// Pushes an async SDK call's results for the coroutine to resume with.
    private func push(_ values: [AsyncValue], on thread: LuaThread) {
        _ = lua_checkstack(thread, Int32(values.count + 2))
        for value in values {
            switch value {
            case .value(let v): LuaState.push(v, on: thread)
            case .bytes(let b): b.withUnsafeBufferPointer { p in
                p.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(thread, $0.baseAddress, $0.count) }
            }
            case .httpResponse(let response):
                lua_createtable(thread, 0, 3)
                lua_pushinteger(thread, lua_Integer(response.status))
                lua_setfield(thread, -2, "status")
                pushHeaderTable(response.headers.map { (name: $0.0, value: $0.1) }, on: thread)
                lua_setfield(thread, -2, "headers")
                response.body.withUnsafeBufferPointer { p in
                    p.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(thread, $0.baseAddress, $0.count) }
                }
                lua_setfield(thread, -2, "body")
            case .pushed(let push): push(thread)
            }
        }
    }

    /// Runs plugins from `index` on. Returns nil when suspended on `pending`.
    /// A phase with a runner list runs its whole chain in one resume
    /// (CLuaShims/chain.c); the runner's `chain_entry` says where it stopped
    /// (exit, error, yield). Other phases start one phase function per resume.
    private func drive(resumeWith values: [AsyncValue]?) -> PhaseResult? {
        // A flag, not a copy of `values` to clear (the copy retained and
        // released the array, nil too: a call each per phase).
        var resuming = values != nil
        while index < entries.count {
            // A value: this copy runs it and is stored back after the
            // resume (natives read only the stored one's `thread` meanwhile).
            if coroutine == nil { coroutine = runtime.acquireCoroutine() }
            var co = coroutine!
            let thread = co.thread
            let info = runtime.state.info
            let first = index
            let result: LuaCoroutine.ResumeResult
            if resuming, let values {
                resuming = false
                push(values, on: thread)
                runtime.budget = savedBudget
                runtime.enter(self, phase: phase, serial: serial)
                // Another request's chain may have run on this state meanwhile.
                info.pointee.chain_entry = Int32(index + 1)
                if listRef != LUA_NOREF {
                    info.pointee.chain_last = Int32(runLast)
                    info.pointee.chain_check_exit = checksExit
                    info.pointee.chain_unread_self = unreadSelf
                    info.pointee.chain_unread_conf = unreadConf
                    info.pointee.chain_cells = cells
                    // The waiting call's start, for the runner to time it when it completes.
                    if index + 1 < Int(info.pointee.chain_marks_capacity) { info.pointee.chain_marks[index + 1] = callStart }
                }
                result = co.resume(nargs: Int32(values.count), state: runtime.state)
            } else if listRef != LUA_NOREF {
                serial = runtime.nextPhaseSerial()
                // A consumer named by an auth plugin may switch the request
                // phase's chain: then each plugin runs on its own (switchToConsumerChain).
                runLast = phase == .request && consumerChain != nil ? index + 1 : entries.count
                // The capacity tested here: the C call cost ~18 per phase call.
                if info.pointee.chain_timing != 0 && info.pointee.chain_marks_capacity < Int32(entries.count + 2) {
                    _ = weir_chain_reserve_marks(thread, Int32(entries.count + 2))
                }
                runtime.enter(self, phase: phase, serial: serial)
                let budget = Int64(runtime.options.instructionBudget)
                if !listTakesCtx || runnerCtxDiesWithPhase {
                    // The runner (with its list) pushed, where it starts and
                    // ends, a fresh budget, its ctx (nil, or a table for this
                    // phase alone) and the resume, in one C call.
                    if listTakesCtx { ctxOnRunnerStack = true }
                    result = co.startChain(listRef: listRef, first: Int32(index + 1), last: Int32(runLast), checkExit: checksExit,
                                           budget: budget, newCtx: listTakesCtx, unreadSelf: unreadSelf, unreadConf: unreadConf,
                                           cells: cells, state: runtime.state)
                } else {
                    _ = weir_chain_prepare(thread, listRef, Int32(index + 1), Int32(runLast), checksExit, budget)
                    pushCtx(on: thread)  // anchored: a later phase sees it
                    info.pointee.chain_unread_self = unreadSelf
                    info.pointee.chain_unread_conf = unreadConf
                    info.pointee.chain_cells = cells
                    result = co.start(nargs: 1, state: runtime.state)
                }
            } else {
                let entry = entries[index]
                serial = runtime.nextPhaseSerial()
                _ = lua_checkstack(thread, 5)  // fn, self, conf, ctx (and its copy in pushCtx)
                runtime.state.pushRef(entry.plugin.phaseRefs[phase.luaID], on: thread)
                var nargs: Int32 = 3
                if phase == .timer {
                    nargs = 0 // fn()
                } else {
                    runtime.state.pushRef(entry.plugin.handlerRef, on: thread)
                    runtime.state.pushRef(entry.confRef, on: thread)
                    if phase == .connection, let connection = connection {
                        do {
                            try runtime.pushConnHandle(serial: serial, dataRef: connection.dataRef(), on: thread)
                        } catch let error as LuaError {
                            co.clear()
                            return fail(entry, error.message, error.traceback)
                        } catch { return fail(entry, "\(error)") }
                    } else if entry.plugin.phaseTakesCtx[phase.luaID] {
                        pushCtx(on: thread)
                    } else {
                        nargs = 2 // fn(self, conf): weir.ctx stays unmade until something reads it
                    }
                }
                runtime.state.setBudget(runtime.options.instructionBudget)
                runtime.enter(self, phase: phase, serial: serial)
                if runtime.options.observer != nil { callStart = weir_monotonic_ns() }
                result = co.start(nargs: nargs, state: runtime.state)
            }
            runtime.leave()
            coroutine = co
            let ranList = listRef != LUA_NOREF
            if ranList {
                // Plugins before the one it stopped in ran to completion.
                let stopped = Int(info.pointee.chain_entry) - 1
                // A run with cells that went to its end recorded every call
                // itself: no call stopped, so none of its marks is needed.
                if cells == nil || !result.finishedWithoutResults { noteRunnerMarks(from: first, stoppedIn: stopped) }
                index = stopped
            }
            // The entry it stopped in is read only on the paths that need it:
            // a copy of it costs two retains and two releases.
            switch result {
            case .finished(let count):
                if (phase == .request || phase == .response), count > 0, lua_type(thread, -count) != LUA_TNIL, exit == nil {
                    do {
                        exit = try runtime.readExit(count: count, from: thread)
                    } catch let error as LuaError {
                        co.clear()
                        return fail(entries[index], error.message, error.traceback)
                    } catch { co.clear(); return fail(entries[index], "\(error)") }
                }
                // No results: lua_resume left the stack empty (the function
                // and its arguments are gone), nothing to clear.
                if count > 0 { co.clear() }
                // A list with cells ran to its end: the runner recorded its
                // last call (even one that asked for an exit from a
                // coroutine of its own, which does not stop the list).
                let recorded = ranList && count == 0 && cells != nil
                if let exit = exit {
                    if !recorded { report(.exited) }
                    return .exit(exit)
                }
                if !recorded { report(.completed) }
                index += 1
                if phase == .request, consumerChain != nil { switchToConsumerChain(after: entries[index - 1]) }
            case .yielded(let count):
                weir_pop(thread, count)
                if let exit = exit {
                    co.reset()
                    coroutine = co
                    report(.exited)
                    return .exit(exit)
                }
                if let pending = pending {
                    savedBudget = runtime.budget
                    let loop = runtime.eventLoop!
                    pending.hop(to: loop).whenComplete { [self] outcome in
                        // An already-completed future (a bodyless get_body, an
                        // immediate error) calls back right here, before `start`
                        // has made the promise its caller waits on: resume on
                        // the next tick instead, never from inside `drive`.
                        loop.execute { self.resumeAfterPending(outcome, from: pending) }
                    }
                    return nil
                }
                co.reset()
                coroutine = co
                return fail(entries[index], "attempt to yield from a plugin phase function (only weir async functions such as weir.sleep may suspend a plugin)")
            case .failed(let error):
                runtime.recycle(co) // dead: released, a fresh thread serves the next call
                coroutine = nil
                if runtime.state.budgetExhausted {
                    runtime.state.setBudget(0)
                }
                return fail(entries[index], error.message, error.traceback)
            }
        }
        // The phase ran to its end: its coroutine goes back to the pool now,
        // not at finish(). A request waiting on its upstream then holds no
        // Lua thread, so with hundreds of requests in flight the pool still
        // covers them instead of creating and collecting threads per request.
        // Its last call finished and emptied its stack (`.finished` above).
        if let co = coroutine {
            coroutine = nil
            runtime.recycleFinished(co)
        }
        return .continue
    }

    // MARK: Consumer-specific plugin configs

    /// Asked, in the request phase, after each plugin that leaves a consumer
    /// authenticated (`context.consumer`) that this scope has not seen yet:
    /// the chain to use from then on for that consumer (consumer configs win
    /// over route, upstream and global ones), or nil to keep the current one.
    /// The proxy sets it only when some consumer has plugins of its own.
    /// `detach` drops it, except on a scope that is its own context (set
    /// once by its owner for every request it serves).
    public var consumerChain: ((String) -> PluginChain?)?
    private var consumerSeen: String?

    /// Kong's rule: a plugin's config is picked when its turn comes, so once
    /// an auth plugin named the consumer, the rest of the request phase runs
    /// the consumer's chain from the same position. Plugins that already ran
    /// (the auth plugin and those before it) are not run again; a consumer's
    /// plugin ordered before the auth plugin misses this request phase (the
    /// consumer was not known at its turn) but runs in the later phases.
    private func switchToConsumerChain(after entry: PluginChain.Entry) {
        guard let consumer = context?.consumer, consumer != consumerSeen else { return }
        consumerSeen = consumer
        guard let chain = consumerChain?(consumer) else { return }
        let priority = entry.plugin.definition.priority
        let name = entry.name
        // A chain is ordered by PRIORITY (descending), then name: the
        // plugins after this one's turn are a suffix of the consumer's chain.
        entriesChain = nil
        entries = chain.byPhase[phase.luaID]
        index = entries.firstIndex {
            let p = $0.plugin.definition.priority
            return p < priority || (p == priority && $0.name > name)
        } ?? entries.count
        listRef = chain.phaseLists[phase.luaID]
        listTakesCtx = chain.phaseTakesCtx[phase.luaID]
        recorders = chain.phaseRecorders[phase.luaID]
        cells = chain.phaseCells[phase.luaID]
        ctxCanDieWithPhase = false
        unreadSelf = chain.phaseUnreadSelf[phase.luaID]
        unreadConf = chain.phaseUnreadConf[phase.luaID]
    }

    /// Runs a timer callback as a one-entry chain in the `.timer` phase.
    func runTimer(_ timer: LuaTimer) -> EventLoopFuture<PhaseResult> {
        let definition = PluginDefinition(name: timer.plugin, directory: "", handlerPath: "", handlerSource: "",
                                          schemaPath: "", schema: PluginSchema(fields: [:]), priority: 0, version: "",
                                          phases: [.timer])
        let plugin = CompiledPlugin(definition: definition, handlerRef: LUA_REFNIL)
        plugin.phaseRefs[PluginPhase.timer.luaID] = timer.ref
        return run(.timer, chain: PluginChain(entries: [.init(plugin: plugin, confRef: LUA_REFNIL)], owner: runtime))
    }

    private func resumeAfterPending(_ outcome: Result<[AsyncValue], Error>, from future: EventLoopFuture<[AsyncValue]>) {
        // Finished (request aborted) or superseded: the coroutine is gone.
        guard !isFinished, let waiting = pending, waiting === future else { return }
        pending = nil
        let values: [AsyncValue]
        switch outcome {
        case .success(let v): values = v
        case .failure(let error): values = [.value(.null), .value(.string("\(error)"))]
        }
        guard let result = drive(resumeWith: values) else { return }
        let promise = self.promise
        self.promise = nil
        promise?.succeed(result)
    }
}

/// The plugin scope of one downstream connection: the `conn.data` table
/// that the connection phase fills and request phases read as `weir.conn`.
public final class PluginConnection {
    public let runtime: LuaRuntime
    public let context: PluginConnectionContext
    private var dataTableRef: Int32 = LUA_NOREF
    public private(set) var isClosed = false

    init(runtime: LuaRuntime, context: PluginConnectionContext) {
        self.runtime = runtime
        self.context = context
    }

    deinit {
        if !isClosed && dataTableRef != LUA_NOREF {
            runtime.orphan(dataTableRef)
        }
    }

    func dataRef() -> Int32 {
        if dataTableRef == LUA_NOREF {
            lua_createtable(runtime.state.main, 0, 4)
            dataTableRef = runtime.state.ref()
        }
        return dataTableRef
    }

    /// Runs the connection phase. `.exit` means a plugin rejected the
    /// connection (status 403, the reason as body): close it.
    public func runConnectionPhase(chain: PluginChain) -> EventLoopFuture<PhaseResult> {
        let scope = PluginRequest(runtime: runtime, request: nil, connection: self)
        let future = scope.run(.connection, chain: chain)
        future.whenComplete { _ in scope.finish() }
        return future
    }

    /// Releases the connection's data table. Idempotent.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        if dataTableRef != LUA_NOREF {
            runtime.state.unref(dataTableRef)
            dataTableRef = LUA_NOREF
        }
    }
}
