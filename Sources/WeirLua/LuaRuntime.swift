import CLua
import CLuaShims
import NIOCore
import NIOConcurrencyHelpers
import Atomics
import WeirCore

public struct LuaRuntimeOptions: Sendable {
    /// Bytes one Lua state may allocate (per event loop per generation).
    public var memoryLimit: Int = 64 << 20
    /// Lua VM instructions one plugin may run in one phase call (across its
    /// yields) once the call has run longer than one or two watchdog ticks
    /// (10 ms each); 0 = unlimited. Calls shorter than that are never
    /// counted and run with no hook (see CLuaShims/watchdog.c); a runaway
    /// call ends after ~10-20 ms plus this many instructions.
    public var instructionBudget: Int = 10_000_000
    /// Instructions between budget checks once a call is being counted.
    public var hookInterval: Int = 1000
    /// The `weir.shared` dictionaries; shared by all runtimes (and reloads).
    public var shared: SharedDictionaries = SharedDictionaries(capacities: [:])
    /// Consumers' credentials, for `weir.client.find_credential` (auth plugins).
    public var credentials: ConsumerCredentials = ConsumerCredentials()
    /// Where `weir.log.*` lines go.
    public var log: @Sendable (PluginLogRecord) -> Void = { record in
        let id = record.requestID.map { " request_id=\($0)" } ?? ""
        print("[\(record.level)] plugin=\(record.plugin)\(id) \(record.message)")
    }
    /// How long a retired generation may take to send what its `weir.batch`
    /// queues hold (`flushBatchQueues`).
    public var retireFlushTimeout: TimeAmount = .seconds(5)
    /// Finished coroutines kept for reuse by later requests.
    public var maxIdleCoroutines: Int = 64
    /// Told about every plugin phase call (for /metrics); nil = no clock reads.
    public var observer: PluginPhaseObserver? = nil
    /// TLS for `weir.http.request` to https:// URLs; nil = https refused.
    public var outboundTLS: OutboundTLSProvider? = nil
    /// Keep-alive limits of `weir.http.request`'s connection pool.
    public var httpPool = OutboundPoolOptions()
    public init() {}
}

/// How one plugin's phase call ended.
public enum PluginCallOutcome: Sendable {
    case completed, exited, failed
}

/// Receives per-plugin, per-phase timings and outcomes (latency histograms
/// and failure counters on /metrics). Called on the event loop: keep it cheap.
public protocol PluginPhaseObserver: AnyObject, Sendable {
    /// `nanoseconds` is wall time from the call's start to its end,
    /// including any time spent waiting on async SDK calls.
    func pluginPhaseCompleted(plugin: String, phase: PluginPhase, nanoseconds: UInt64, outcome: PluginCallOutcome)
    /// `weir.metrics.count(event, n)`: a plugin's own counter (records
    /// dropped, spans exported).
    func pluginEventCounted(plugin: String, event: String, count: Int)
    /// A recorder for one plugin's calls in one phase on one event loop,
    /// asked once per chain entry when a chain is built, so the data path
    /// records without looking the plugin up. nil (the default): every call
    /// goes through `pluginPhaseCompleted`.
    func recorder(plugin: String, phase: PluginPhase, eventLoop: ObjectIdentifier?) -> PluginCallRecorder?
}

extension PluginPhaseObserver {
    public func pluginEventCounted(plugin: String, event: String, count: Int) {}
    public func recorder(plugin: String, phase: PluginPhase, eventLoop: ObjectIdentifier?) -> PluginCallRecorder? { nil }
}

/// Records one plugin's phase calls (see `PluginPhaseObserver.recorder`).
/// Called on the event loop the recorder was made for.
public protocol PluginCallRecorder: AnyObject {
    func record(nanoseconds: UInt64, outcome: PluginCallOutcome)
    /// Where the chain runner records this plugin's completed calls itself
    /// (no `record` call for them); nil: every call goes through `record`.
    /// A chain list uses the cells only when all its entries have one.
    var cell: PluginCallCell? { get }
}

extension PluginCallRecorder {
    public var cell: PluginCallCell? { nil }
}

/// A pending `weir.timer.at/every` callback.
final class LuaTimer {
    let ref: Int32
    let interval: Double
    let repeats: Bool
    let plugin: String
    var scheduled: Scheduled<Void>?
    var cancelled = false
    init(ref: Int32, interval: Double, repeats: Bool, plugin: String) {
        self.ref = ref; self.interval = interval; self.repeats = repeats; self.plugin = plugin
    }
}

/// A plugin compiled in one runtime's Lua state.
final class CompiledPlugin {
    let definition: PluginDefinition
    let handlerRef: Int32
    /// Registry refs of the phase functions, indexed by PluginPhase.luaID.
    var phaseRefs: [Int32] = Array(repeating: LUA_NOREF, count: PluginPhase.slotCount)
    /// Whether a phase function reads its `ctx` parameter (declared and read
    /// in its code or captured by a nested function, from its bytecode:
    /// CLuaShims/paramuse.c), or is vararg: only then is the request's
    /// `weir.ctx` table made for the call, so a request whose plugins never
    /// touch it creates no table and ref.
    var phaseTakesCtx: [Bool] = Array(repeating: true, count: PluginPhase.slotCount)
    /// Whether a phase function may read its `self` / `conf` parameter
    /// (the same bytecode test): the chain runner passes nil for one it
    /// provably never reads.
    var phaseReadsSelf: [Bool] = Array(repeating: true, count: PluginPhase.slotCount)
    var phaseReadsConf: [Bool] = Array(repeating: true, count: PluginPhase.slotCount)
    init(definition: PluginDefinition, handlerRef: Int32) {
        self.definition = definition; self.handlerRef = handlerRef
    }
}

/// An ordered plugin chain (PRIORITY descending, ties by name) with each
/// plugin's config table built once in this runtime's state.
public final class PluginChain {
    struct Entry {
        let plugin: CompiledPlugin
        let confRef: Int32
        /// The metrics recorder of each phase (by PluginPhase.luaID), if the
        /// runtime's observer gives one.
        var recorders: [PluginCallRecorder?] = []
        var name: String { plugin.definition.name }
        init(plugin: CompiledPlugin, confRef: Int32, recorders: [PluginCallRecorder?] = []) {
            self.plugin = plugin; self.confRef = confRef; self.recorders = recorders
        }
        @inline(__always)
        func recorder(_ phase: PluginPhase) -> PluginCallRecorder? {
            phase.luaID < recorders.count ? recorders[phase.luaID] : nil
        }
    }
    let entries: [Entry]
    /// Entries that implement each phase, indexed by PluginPhase.luaID.
    let byPhase: [[Entry]]
    /// byPhase's metrics recorders (same positions), so recording a call
    /// copies no entry.
    let phaseRecorders: [[PluginCallRecorder?]]
    /// byPhase's metrics cells (same positions) for the chain runner
    /// (`weir_state_info.chain_cells`), by PluginPhase.luaID: nil unless
    /// every entry of the phase has a recorder with a cell. The cells live
    /// as long as the recorders this chain holds.
    let phaseCells: [UnsafePointer<UnsafeMutablePointer<weir_call_cell>?>?]
    /// For the phases the chain runner runs (`PluginPhase.runsChainInOneResume`):
    /// registry ref of the runner closure (CLuaShims/chain.c) whose upvalues
    /// list byPhase's entries, 3 each (function, handler, conf), by
    /// PluginPhase.luaID; LUA_NOREF for the others (and for chains not made
    /// by `LuaRuntime.makeChain`, or longer than WEIR_CHAIN_MAX_ENTRIES).
    var phaseLists: [Int32] = Array(repeating: LUA_NOREF, count: PluginPhase.slotCount)
    /// Whether some entry's phase function declares ctx, by PluginPhase.luaID.
    var phaseTakesCtx: [Bool] = Array(repeating: false, count: PluginPhase.slotCount)
    /// The list entries (bit i for entry i, 1-based, up to 63) whose phase
    /// function never reads `self` / `conf`, by PluginPhase.luaID
    /// (`weir_state_info.chain_unread_self`/`_conf`).
    var phaseUnreadSelf: [UInt64] = Array(repeating: 0, count: PluginPhase.slotCount)
    var phaseUnreadConf: [UInt64] = Array(repeating: 0, count: PluginPhase.slotCount)
    /// The runtime whose Lua state holds this chain's references.
    let owner: ObjectIdentifier?
    /// Some plugin of the chain has a phase after the request phase: a
    /// request's `weir.ctx` must outlive its request phase.
    let hasPhasesAfterRequest: Bool
    /// Plugin names in run order.
    public var names: [String] { entries.map(\.name) }
    /// Whether any plugin of the chain implements `phase` (the proxy skips
    /// a phase's bookkeeping entirely when none does).
    public func runs(_ phase: PluginPhase) -> Bool { !byPhase[phase.luaID].isEmpty }

    init(entries: [Entry], owner: LuaRuntime?) {
        self.entries = entries
        self.owner = owner.map(ObjectIdentifier.init)
        var byPhase: [[Entry]] = Array(repeating: [], count: PluginPhase.slotCount)
        var phaseRecorders: [[PluginCallRecorder?]] = Array(repeating: [], count: PluginPhase.slotCount)
        for phase in PluginPhase.allCases {
            byPhase[phase.luaID] = entries.filter { $0.plugin.phaseRefs[phase.luaID] != LUA_NOREF }
            phaseRecorders[phase.luaID] = byPhase[phase.luaID].map { $0.recorder(phase) }
        }
        self.byPhase = byPhase
        self.phaseRecorders = phaseRecorders
        hasPhasesAfterRequest = [PluginPhase.response, .bodyFilter, .log].contains { !byPhase[$0.luaID].isEmpty }
        phaseCells = phaseRecorders.map { recorders in
            let cells = recorders.compactMap { $0?.cell }
            guard !cells.isEmpty, cells.count == recorders.count else { return nil }
            let list = UnsafeMutablePointer<UnsafeMutablePointer<weir_call_cell>?>.allocate(capacity: cells.count)
            list.initialize(from: cells.map(\.pointer), count: cells.count)
            return UnsafePointer(list)
        }
    }

    deinit {
        for cells in phaseCells { cells?.deallocate() }
    }
}

/// The Lua runtime of one event loop for one generation: a Lua state with
/// the `weir` SDK installed and the library's plugins compiled. Everything
/// here runs on `eventLoop` (checked in debug builds); build it on that loop
/// or hand it over before first use.
public final class LuaRuntime {
    public let state: LuaState
    public let eventLoop: EventLoop?
    public let options: LuaRuntimeOptions
    public let library: PluginLibrary?

    private var stateTableRef: Int32 = LUA_NOREF
    private var normalizeExitRef: Int32 = LUA_NOREF
    private var inspectHandlerRef: Int32 = LUA_NOREF
    private var makeConnHandleRef: Int32 = LUA_NOREF
    private var flushBatchesRef: Int32 = LUA_NOREF
    private var compiled: [String: CompiledPlugin] = [:]

    // The hot natives' per-state caches (SDKNatives.swift, `HotNative`).
    /// Header names plugins pass (lower-cased, checked once per Lua string).
    let headerNames: HeaderNameCache
    /// Header values and other constant strings plugins pass (as they are).
    let headerValues: HeaderNameCache
    /// `weir.shared` keys' hashes, per Lua string.
    let sharedKeyHashes: SharedKeyHashes
    /// `weir.client.find_credential`'s lookups and their recent matches.
    let credentialLookups: CredentialLookups
    /// The route's and the consumer's names as Lua strings (the same every
    /// request of a route / client).
    let recentStrings = RecentLuaStrings()
    /// `weir.response.prepare_headers`' sets, by id.
    let preparedHeaderLines = PreparedHeaderLineSets()
    /// The ids of the handles (dictionaries, prepared sets) the hot natives take.
    let handleIDs: HandleIDs

    /// The scope whose coroutine is running right now (set around every
    /// resume). Unretained: `enter` is only called by the scope's own
    /// `drive`, which holds the scope for the whole resume, and `leave`
    /// clears it right after; natives read it only inside that resume. A
    /// strong reference cost every native call a retain/release pair.
    private(set) var currentScope: Unmanaged<PluginRequest>?
    var current: PluginRequest? { currentScope?.takeUnretainedValue() }
    /// The plugin whose code is running (for weir.log tags, timers, metrics events).
    var currentPlugin: String { current?.runningPlugin ?? "" }
    var currentPhase: PluginPhase = .request
    private var phaseSerial = 0
    /// Idle coroutines (`options.maxIdleCoroutines` at most), `idleCount`
    /// of them: a fixed buffer, not an array (an append and a removeLast
    /// cost a uniqueness check and a capacity check each, per request).
    private let idleCoroutines: UnsafeMutablePointer<LuaCoroutine>
    private let idleCapacity: Int
    private var idleCount = 0
    private var timers: [ObjectIdentifier: LuaTimer] = [:]
    /// Refs of scopes dropped without finish(), released on the next begin.
    /// Append only through `orphan(_:)`.
    private let orphanedRefs = NIOLockedValueBox<[Int32]>([])
    /// Set after an append to `orphanedRefs`: every begin checks this
    /// instead of taking the lock (~110 instructions per request).
    private let hasOrphans = ManagedAtomic<Bool>(false)

    /// Queues a registry ref for release on the loop (from a deinit that
    /// may run anywhere).
    func orphan(_ ref: Int32) {
        orphanedRefs.withLockedValue { $0.append(ref) }
        hasOrphans.store(true, ordering: .releasing)
    }

    /// A runtime for `library` on `eventLoop`.
    public convenience init(library: PluginLibrary, eventLoop: EventLoop, options: LuaRuntimeOptions = LuaRuntimeOptions()) throws {
        try self.init(sdk: library.sdk, eventLoop: eventLoop, options: options, library: library)
    }

    /// A bare runtime (SDK installed, no plugins); `eventLoop` nil means
    /// it can load and inspect code but not run phases.
    public init(sdk: LuaSDK, eventLoop: EventLoop?, options: LuaRuntimeOptions, library: PluginLibrary? = nil) throws {
        let state = try LuaState(memoryLimit: options.memoryLimit, hookInterval: options.instructionBudget > 0 ? options.hookInterval : 0)
        self.state = state
        self.eventLoop = eventLoop
        self.options = options
        self.library = library
        self.idleCapacity = max(0, options.maxIdleCoroutines)
        self.idleCoroutines = .allocate(capacity: max(1, idleCapacity))
        self.headerNames = HeaderNameCache(on: state.main)
        self.headerValues = HeaderNameCache(lowercased: false, on: state.main)
        self.handleIDs = HandleIDs(on: state.main)
        self.sharedKeyHashes = SharedKeyHashes(on: state.main)
        self.credentialLookups = CredentialLookups(options.credentials, on: state.main)
        // Natives reach the runtime directly (the hot ones without a closure).
        weir_set_dispatch(state.main, runtimeNativeDispatch, Unmanaged.passUnretained(self).toOpaque())
        for hot in HotNative.allCases {
            let set = weir_set_hot_native(state.main, hot.rawValue, hot.entry)
            precondition(set == 1, "too many hot natives for WEIR_HOT_NATIVES")
        }
        try installSDK(sdk)
        // The chain runner records when each plugin starts only for an observer's histograms.
        state.info.pointee.chain_timing = options.observer != nil ? 1 : 0
        if let library = library {
            for name in library.plugins.keys.sorted() {
                compiled[name] = try compile(library.plugins[name]!)
            }
        }
    }

    // MARK: SDK installation

    private func installSDK(_ sdk: LuaSDK) throws {
        let L = state.main
        state.setBudget(0)
        try state.load(sdk.jsonSource, chunkName: sdk.directory + "/weir/json.lua")
        try state.pcall(nargs: 0, nresults: 1)            // json
        try state.load(sdk.initSource, chunkName: sdk.directory + "/weir/init.lua")
        lua_createtable(L, 0, 48)                            // N
        // The hot natives first: their ids are their raw values (their C entries, HotNative.entry).
        for hot in HotNative.allCases {
            LuaState.push(hot.sdkName, on: L)
            precondition(state.nativeCount == Int(hot.rawValue), "hot natives must be registered first")
            state.pushNative(NativeBox(HotNative.unreachableBox(hot)))
            lua_rawset(L, -3)
        }
        for (name, native) in makeNatives().entries {
            LuaState.push(name, on: L)
            state.pushNative(native)
            lua_rawset(L, -3)
        }
        lua_createtable(L, 2, 0)                             // S
        lua_pushinteger(L, 0); lua_rawseti(L, -2, 1)
        lua_pushinteger(L, 0); lua_rawseti(L, -2, 2)
        lua_pushvalue(L, -1)
        stateTableRef = state.ref()
        lua_rotate(L, -4, -1)                                // json to the top (after N, S)
        _ = weir_push_clib(L)
        try state.pcall(nargs: 4, nresults: 2)               // weir, internal
        for (key, slot) in [("normalize_exit", 0), ("inspect_handler", 1), ("make_conn_handle", 2), ("flush_batches", 3)] {
            lua_getfield(L, -1, key)
            let ref = state.ref()
            switch slot {
            case 0: normalizeExitRef = ref
            case 1: inspectHandlerRef = ref
            case 2: makeConnHandleRef = ref
            default: flushBatchesRef = ref
            }
        }
        state.pop()                                          // internal
        lua_pushvalue(L, -1)
        lua_setglobal(L, "weir")                             // also a global, like Kong's `kong`
        lua_getfield(L, weir_registryindex(), "_LOADED")
        lua_rotate(L, -2, 1)
        lua_setfield(L, -2, "weir")                          // package.loaded.weir = weir
        state.pop()
    }

    // MARK: Loading code

    /// Runs a chunk (e.g. a schema.lua) and returns its value as plain data.
    public func evaluate(_ source: String, chunkName: String) throws -> ConfigValue {
        state.setBudget(options.instructionBudget)
        try state.load(source, chunkName: chunkName)
        try state.pcall(nargs: 0, nresults: 1)
        defer { state.pop() }
        do {
            return try LuaState.value(at: -1, on: state.main)
        } catch let error as LuaError {
            throw LuaError("\(chunkName): \(error.message)")
        }
    }

    struct HandlerInfo {
        var priority: Int; var version: String; var phases: Set<PluginPhase>
        /// `BODY_FILTER_IF`: config paths of which one must be set for the
        /// body_filter to be wanted (nil: always, when there is one).
        var bodyFilterIf: [String]?
    }

    /// Runs handler.lua and checks its shape; leaves the handler and its
    /// phase-function table on the stack (handler below).
    private func loadHandler(source: String, path: String, name: String) throws -> HandlerInfo {
        let L = state.main
        state.setBudget(options.instructionBudget)
        try state.load(source, chunkName: path)
        try state.pcall(nargs: 0, nresults: 1)               // handler
        lua_pushvalue(L, -1)
        state.pushRef(inspectHandlerRef)
        lua_rotate(L, -2, 1)
        LuaState.push(name, on: L)
        do {
            try state.pcall(nargs: 2, nresults: 3)           // handler, priority, version, fns
        } catch let error as LuaError {
            state.pop()
            throw LuaError("\(path): \(error.message)", traceback: error.traceback)
        }
        let priority = Int(lua_tointegerx(L, -3, nil))
        let version = LuaState.string(at: -2, on: L) ?? ""
        var phases = Set<PluginPhase>()
        for phase in PluginPhase.allCases {
            if lua_getfield(L, -1, phase.rawValue) == LUA_TFUNCTION { phases.insert(phase) }
            state.pop()
        }
        var bodyFilterIf: [String]?
        LuaState.push("BODY_FILTER_IF", on: L)
        lua_rawget(L, -5)                                    // handler.BODY_FILTER_IF (raw: no metamethods)
        switch lua_type(L, -1) {
        case LUA_TNIL: break
        case LUA_TTABLE:
            var paths: [String] = []
            var i: lua_Integer = 1
            while lua_rawgeti(L, -1, i) == LUA_TSTRING {
                paths.append(LuaState.string(at: -1, on: L) ?? "")
                state.pop()
                i += 1
            }
            let strayType = lua_type(L, -1)
            state.pop()
            if strayType != LUA_TNIL || paths.isEmpty || Int(lua_rawlen(L, -1)) != paths.count {
                state.pop(5)
                throw LuaError("\(path): BODY_FILTER_IF must be a non-empty list of config paths (strings)")
            }
            bodyFilterIf = paths
        default:
            let typeName = String(cString: lua_typename(L, lua_type(L, -1)))
            state.pop(5)
            throw LuaError("\(path): BODY_FILTER_IF must be a list of config paths, got \(typeName)")
        }
        state.pop()
        lua_rotate(L, -3, -2)                                // handler, fns, priority, version
        state.pop(2)                                         // handler, fns
        return HandlerInfo(priority: priority, version: version, phases: phases, bodyFilterIf: bodyFilterIf)
    }

    func inspectHandler(source: String, path: String, name: String) throws -> HandlerInfo {
        let info = try loadHandler(source: source, path: path, name: name)
        state.pop(2)
        return info
    }

    private func compile(_ definition: PluginDefinition) throws -> CompiledPlugin {
        _ = try loadHandler(source: definition.handlerSource, path: definition.handlerPath, name: definition.name)
        let L = state.main
        var refs = Array(repeating: LUA_NOREF, count: PluginPhase.slotCount)
        var takesCtx = Array(repeating: true, count: PluginPhase.slotCount)
        var readsSelf = Array(repeating: true, count: PluginPhase.slotCount)
        var readsConf = Array(repeating: true, count: PluginPhase.slotCount)
        for phase in PluginPhase.allCases {
            if lua_getfield(L, -1, phase.rawValue) == LUA_TFUNCTION {
                // fn(self, conf, ctx): ctx is the third parameter (register
                // 2). A function that declares it but never reads it (most
                // do) is called without it, so no table is made for it.
                var info = lua_Debug()
                lua_pushvalue(L, -1)
                if lua_getinfo(L, ">u", &info) != 0 {
                    takesCtx[phase.luaID] = info.isvararg != 0
                        || (info.nparams >= 3 && weir_function_reads_param(L, -1, 2) != 0)
                    // Likewise self and conf (registers 0 and 1): the chain
                    // runner passes nil for one that is never read, instead
                    // of reading it from its list (~30 instructions each).
                    readsSelf[phase.luaID] = info.isvararg != 0
                        || (info.nparams >= 1 && weir_function_reads_param(L, -1, 0) != 0)
                    readsConf[phase.luaID] = info.isvararg != 0
                        || (info.nparams >= 2 && weir_function_reads_param(L, -1, 1) != 0)
                }
                refs[phase.luaID] = state.ref()
            } else {
                state.pop()
            }
        }
        state.pop()                                          // fns
        let plugin = CompiledPlugin(definition: definition, handlerRef: state.ref())
        plugin.phaseRefs = refs
        plugin.phaseTakesCtx = takesCtx
        plugin.phaseReadsSelf = readsSelf
        plugin.phaseReadsConf = readsConf
        return plugin
    }

    // MARK: Chains

    /// Builds a chain from validated plugins: ordered by PRIORITY (higher
    /// first), ties by name; each config becomes a Lua table once, here.
    public func makeChain(_ plugins: [ConfiguredPlugin]) throws -> PluginChain {
        let sorted = plugins.sorted {
            $0.definition.priority != $1.definition.priority
                ? $0.definition.priority > $1.definition.priority
                : $0.name < $1.name
        }
        var entries: [PluginChain.Entry] = []
        for configured in sorted {
            guard let plugin = compiled[configured.name] else {
                throw LuaError("plugin \"\(configured.name)\" is not in this runtime's library")
            }
            LuaState.push(configured.config, on: state.main)
            var recorders: [PluginCallRecorder?] = []
            if let observer = options.observer {
                let loop = eventLoop.map { ObjectIdentifier($0 as AnyObject) }
                recorders = Array(repeating: nil, count: PluginPhase.slotCount)
                for phase in PluginPhase.allCases where plugin.phaseRefs[phase.luaID] != LUA_NOREF {
                    recorders[phase.luaID] = observer.recorder(plugin: configured.name, phase: phase, eventLoop: loop)
                }
            }
            entries.append(.init(plugin: plugin, confRef: state.ref(), recorders: recorders))
        }
        let chain = PluginChain(entries: entries, owner: self)
        let L = state.main
        for phase in PluginPhase.allCases where phase.runsChainInOneResume {
            let phaseEntries = chain.byPhase[phase.luaID]
            // A longer chain (over 255 upvalues) runs an entry per resume.
            guard !phaseEntries.isEmpty, phaseEntries.count <= Int(WEIR_CHAIN_MAX_ENTRIES),
                  lua_checkstack(L, Int32(phaseEntries.count * 3 + 1)) != 0 else { continue }
            // fn, self, conf per entry, as the runner closure's upvalues
            // (chain.c): the runner passes the request's ctx to every entry
            // when any of them reads it.
            for (k, entry) in phaseEntries.enumerated() {
                state.pushRef(entry.plugin.phaseRefs[phase.luaID])
                state.pushRef(entry.plugin.handlerRef)
                state.pushRef(entry.confRef)
                if entry.plugin.phaseTakesCtx[phase.luaID] { chain.phaseTakesCtx[phase.luaID] = true }
                if k + 1 < 64 {
                    let bit = UInt64(1) << UInt64(k + 1)
                    if !entry.plugin.phaseReadsSelf[phase.luaID] { chain.phaseUnreadSelf[phase.luaID] |= bit }
                    if !entry.plugin.phaseReadsConf[phase.luaID] { chain.phaseUnreadConf[phase.luaID] |= bit }
                }
            }
            _ = weir_chain_make_runner(L, Int32(phaseEntries.count))
            chain.phaseLists[phase.luaID] = state.ref()
        }
        return chain
    }

    // MARK: Requests and connections

    /// Starts the plugin scope of one request. Call `finish()` when the
    /// request is over (after the log phase, or when it is aborted).
    public func beginRequest(_ context: PluginRequestContext, connection: PluginConnection? = nil) -> PluginRequest {
        willBeginRequest()
        return PluginRequest(runtime: self, request: context, connection: connection)
    }

    /// Called before a new scope of this runtime is made by its subclass's
    /// own initializer (one that is its own context, `PluginRequest.adoptAsOwnContext`).
    public func willBeginRequest() {
        eventLoop?.assertInEventLoop()
        releaseOrphans()
    }

    /// Starts another request on a finished, `detach`ed scope of this
    /// runtime (the proxy keeps each finished request's context object with
    /// its scope and reuses both: a scope allocated, initialised and
    /// released per request cost ~600 instructions).
    public func restartRequest(_ scope: PluginRequest, _ context: PluginRequestContext, connection: PluginConnection?) {
        // Debug builds only: reading the existential loop retains and releases it (per request).
        assert(eventLoop?.inEventLoop ?? true, "request restarted off its runtime's event loop")
        precondition(scope.runtime === self, "scope of another runtime")
        releaseOrphans()
        scope.restart(request: context, connection: connection)
    }

    /// What a new request on a reused scope of this runtime does first.
    func willRestartRequest() {
        // Debug builds only: reading the existential loop retains and releases it (per request).
        assert(eventLoop?.inEventLoop ?? true, "request restarted off its runtime's event loop")
        releaseOrphans()
    }

    /// Starts the plugin scope of one downstream connection.
    public func beginConnection(_ context: PluginConnectionContext) -> PluginConnection {
        eventLoop?.assertInEventLoop()
        releaseOrphans()
        return PluginConnection(runtime: self, context: context)
    }

    @inline(__always)
    private func releaseOrphans() {
        // Cleared before the list is taken: a ref queued meanwhile sets it again.
        guard hasOrphans.load(ordering: .relaxed) else { return }
        releaseQueuedOrphans()
    }

    private func releaseQueuedOrphans() {
        guard hasOrphans.exchange(false, ordering: .acquiring) else { return }
        let refs = orphanedRefs.withLockedValue { refs -> [Int32] in
            defer { refs.removeAll() }
            return refs
        }
        for ref in refs { state.unref(ref) }
    }

    // MARK: Internals used by PluginRequest

    func acquireCoroutine() -> LuaCoroutine {
        if idleCount > 0 {
            idleCount -= 1
            return (idleCoroutines + idleCount).move()
        }
        coroutinesCreated += 1
        return LuaCoroutine(state: state)
    }

    /// Lua threads this runtime has created (the pool's misses; tests).
    private(set) var coroutinesCreated = 0

    func recycle(_ co: LuaCoroutine) {
        var co = co
        if co.isDead { co.release(from: state); return }
        if co.isRunning { co.reset() } else { co.clear() }
        recycleFinished(co)
    }

    /// `recycle` for a coroutine whose last function finished and whose
    /// stack was emptied (`clear`): nothing to reset.
    @inline(__always)
    func recycleFinished(_ co: LuaCoroutine) {
        assert(!co.isDead && !co.isRunning && lua_gettop(co.thread) == 0, "coroutine not finished and cleared")
        if idleCount < idleCapacity {
            (idleCoroutines + idleCount).initialize(to: co)
            idleCount += 1
        } else {
            var co = co
            co.release(from: state)
        }
    }

    /// Drops idle coroutines (tests use it to measure the heap baseline).
    public func dropIdleCoroutines() {
        while idleCount > 0 {
            idleCount -= 1
            var co = (idleCoroutines + idleCount).move()
            co.release(from: state)
        }
    }

    func nextPhaseSerial() -> Int {
        phaseSerial += 1
        return phaseSerial
    }

    // What the SDK's state table S holds now (S[1] phase id, S[2] serial,
    // S[3] the request's weir.ctx table), so consecutive plugin calls of
    // one request's phase publish nothing.
    private var publishedPhase: PluginPhase?
    private var publishedSerial = 0
    private var publishedCtxRef: Int32 = LUA_NOREF

    /// Publishes the phase (and, for the connection phase, the serial that
    /// conn handles check; for request phases the `weir.ctx` table) to the
    /// Lua SDK and marks `scope` current.
    @inline(__always)
    func enter(_ scope: PluginRequest, phase: PluginPhase, serial: Int) {
        currentScope = Unmanaged.passUnretained(scope)
        currentPhase = phase
        // S[3] is published lazily: the first `weir.ctx` read of a call that
        // was not handed ctx asks the `ctx` native, which publishes it
        // (publishCtx). Here only another request's table must go; writing
        // this request's on every entry cost ~280 instructions per request,
        // and plugins take ctx as their argument (none of the shipped ones
        // reads weir.ctx).
        let ctxRef = publishedCtxRef == LUA_NOREF || phase == .connection || phase == .timer ? LUA_NOREF : scope.ctxRef
        let needsSerial = phase == .connection && serial != publishedSerial
        guard phase != publishedPhase || ctxRef != publishedCtxRef || needsSerial else { return }
        publish(phase: phase, serial: serial, ctxRef: ctxRef, needsSerial: needsSerial)
    }

    /// `enter`'s writes to S, when something changed (rarely per request).
    @inline(never)
    private func publish(phase: PluginPhase, serial: Int, ctxRef: Int32, needsSerial: Bool) {
        let L = state.main
        state.pushRef(stateTableRef)
        if phase != publishedPhase {
            lua_pushinteger(L, lua_Integer(phase.luaID)); lua_rawseti(L, -2, 1)
            publishedPhase = phase
        }
        if needsSerial {
            lua_pushinteger(L, lua_Integer(serial)); lua_rawseti(L, -2, 2)
            publishedSerial = serial
        }
        if ctxRef != publishedCtxRef {
            lua_pushnil(L)
            lua_rawseti(L, -2, 3)
            publishedCtxRef = LUA_NOREF
        }
        state.pop()
    }

    /// The current request's `weir.ctx` was just created (first touched by
    /// `weir.ctx` in a call that was not handed it): publish it in S[3] so
    /// later reads in this call find it without a native call.
    func publishCtx(_ ref: Int32) {
        guard ref != LUA_NOREF, ref != publishedCtxRef else { return }
        let L = state.main
        state.pushRef(stateTableRef)
        state.pushRef(ref)
        lua_rawseti(L, -2, 3)
        state.pop()
        publishedCtxRef = ref
    }

    /// A request's `weir.ctx` ref is being released: S[3] must not keep its
    /// table (nor match a later table that reuses the ref number).
    func unpublishCtx(_ ref: Int32) {
        guard ref != LUA_NOREF, ref == publishedCtxRef else { return }
        let L = state.main
        state.pushRef(stateTableRef)
        lua_pushnil(L); lua_rawseti(L, -2, 3)
        state.pop()
        publishedCtxRef = LUA_NOREF
    }

    func leave() {
        currentScope = nil
    }

    func pushConnHandle(serial: Int, dataRef: Int32, on thread: LuaThread) throws {
        let L = state.main
        state.pushRef(makeConnHandleRef)
        lua_pushinteger(L, lua_Integer(serial))
        state.pushRef(dataRef)
        try state.pcall(nargs: 2, nresults: 1)
        lua_xmove(L, thread, 1)
    }

    /// Reads `return status, body, headers` (the `count` values on top of
    /// `thread`) through the SDK's normalizer. Leaves the thread's stack as is.
    func readExit(count: Int32, from thread: LuaThread) throws -> PluginExit {
        let L = state.main
        state.pushRef(normalizeExitRef)
        lua_pushnil(L); lua_pushnil(L); lua_pushnil(L)
        for i in 0..<min(count, 3) {
            lua_pushvalue(thread, -count + i)
            lua_xmove(thread, L, 1)
            lua_copy(L, -1, -4 + i)
            state.pop()
        }
        state.setBudget(options.instructionBudget)
        try state.pcall(nargs: 3, nresults: 3)
        defer { state.pop(3) }
        return try exitFromStack(statusIndex: -3, on: L)
    }

    /// Builds a PluginExit from (status, body, flat header list) at statusIndex.
    func exitFromStack(statusIndex: Int32, on L: LuaThread) throws -> PluginExit {
        let i = lua_absindex(L, statusIndex)
        let status = Int(lua_tointegerx(L, i, nil))
        var body: [UInt8]? = nil
        if lua_type(L, i + 1) == LUA_TSTRING {
            var length = 0
            let p = weir_tostring(L, i + 1, &length)!
            body = Array(UnsafeRawBufferPointer(start: p, count: length))
        }
        var headers: [HeaderField] = []
        if lua_type(L, i + 2) == LUA_TTABLE {
            let n = Int(lua_rawlen(L, i + 2))
            var k = 1
            while k + 1 <= n {
                lua_rawgeti(L, i + 2, lua_Integer(k))
                lua_rawgeti(L, i + 2, lua_Integer(k + 1))
                let name = LuaState.stringOrNumber(at: -2, on: L) ?? ""
                let value = LuaState.stringOrNumber(at: -1, on: L) ?? ""
                weir_pop(L, 2)
                headers.append(HeaderField(name.lowercased(), value))
                k += 2
            }
        }
        return PluginExit(status: status, body: body, headers: headers)
    }

    /// The budget of a phase call, carried across its yields: whether the
    /// watchdog had started counting it, and what was left.
    struct BudgetSnapshot {
        var remaining: Int64 = 0
        var armed = false
    }

    var budget: BudgetSnapshot {
        get {
            let info = state.info
            return BudgetSnapshot(remaining: info.pointee.budget_remaining, armed: info.pointee.budget_armed != 0)
        }
        set {
            let info = state.info
            info.pointee.budget_limit = Int64(options.instructionBudget)
            info.pointee.budget_remaining = newValue.remaining
            info.pointee.budget_exhausted = 0
            // Armed: weir_resume hooks the coroutine before it runs again.
            info.pointee.budget_armed = newValue.armed ? 1 : 0
        }
    }

    // MARK: Timers (weir.timer.at / every)

    func startTimer(ref: Int32, seconds: Double, repeats: Bool) {
        let timer = LuaTimer(ref: ref, interval: seconds, repeats: repeats, plugin: currentPlugin.isEmpty ? "-" : currentPlugin)
        timers[ObjectIdentifier(timer)] = timer
        schedule(timer, after: seconds)
    }

    private func schedule(_ timer: LuaTimer, after seconds: Double) {
        // weak: a stopped, dropped runtime must not be kept alive by its timers.
        timer.scheduled = eventLoop!.scheduleTask(in: .nanoseconds(Int64(seconds * 1e9))) { [weak self] in
            self?.fire(timer)
        }
    }

    private func fire(_ timer: LuaTimer) {
        guard !timer.cancelled else { return }
        let scope = PluginRequest(runtime: self, request: nil, connection: nil)
        scope.runTimer(timer).whenComplete { [weak self] result in
            scope.finish()
            guard let self = self else { return }
            if case .success(.failed(let failure)) = result {
                let trace = failure.traceback.map { "\n" + $0 } ?? ""
                self.options.log(PluginLogRecord(level: .error, plugin: failure.plugin, requestID: nil, phase: .timer,
                                                 message: "timer failed: \(failure.message)\(trace)"))
            }
            if timer.repeats && !timer.cancelled {
                self.schedule(timer, after: timer.interval)
            } else {
                self.release(timer)
            }
        }
    }

    private func release(_ timer: LuaTimer) {
        guard timers.removeValue(forKey: ObjectIdentifier(timer)) != nil else { return }
        timer.cancelled = true
        timer.scheduled?.cancel()
        state.unref(timer.ref)
    }

    /// Cancels every pending timer (call on the loop when a generation is
    /// retired by a reload; `every` timers would otherwise run forever).
    public func stopTimers() {
        eventLoop?.assertInEventLoop()
        for timer in Array(timers.values) { release(timer) }
    }

    public var activeTimerCount: Int { timers.count }

    /// Sends what the `weir.batch` queues of this state still hold (http-log
    /// records, tracing spans), in a timer coroutine; from then on every
    /// push is sent at once. Call on the loop when a reload retired this
    /// generation, after `stopTimers`. The future completes when all queues
    /// are empty, or after `timeout`: the flush is then abandoned and what
    /// is still queued is lost (logged). It holds the runtime until then.
    public func flushBatchQueues(timeout: TimeAmount) -> EventLoopFuture<Void> {
        let loop = eventLoop!
        loop.assertInEventLoop()
        let done = loop.makePromise(of: Void.self)
        var finished = false
        let flush = LuaTimer(ref: flushBatchesRef, interval: 0, repeats: false, plugin: "weir.batch")
        let scope = PluginRequest(runtime: self, request: nil, connection: nil)
        let log = options.log
        let deadline = loop.scheduleTask(in: timeout) {
            guard !finished else { return }
            finished = true
            scope.finish()
            log(PluginLogRecord(level: .warn, plugin: "weir.batch", requestID: nil, phase: .timer,
                                message: "flushing the queues of a retired generation took longer than "
                                    + "\(timeout.nanoseconds / 1_000_000) ms; what they still held is lost"))
            done.succeed(())
        }
        scope.runTimer(flush).whenComplete { result in
            guard !finished else { return }
            finished = true
            deadline.cancel()
            scope.finish()
            if case .success(.failed(let failure)) = result {
                log(PluginLogRecord(level: .error, plugin: "weir.batch", requestID: nil, phase: .timer,
                                    message: "flushing the queues of a retired generation failed: \(failure.message)"))
            }
            done.succeed(())
        }
        return done.futureResult
    }

    /// `weir.http.request`'s keep-alive connections (made on first use).
    lazy var outboundPool = OutboundConnectionPool(loop: eventLoop!, tlsProvider: options.outboundTLS, options: options.httpPool)
    private var hasOutboundPool = false

    /// Closes `weir.http`'s idle keep-alive connections and keeps no more
    /// (call on the loop when a reload retires this generation; calls made
    /// after it, e.g. a final batch flush, still work on new connections).
    public func closeOutboundConnections() {
        eventLoop?.assertInEventLoop()
        if hasOutboundPool { outboundPool.close() }
    }

    func performOutbound(_ request: OutboundRequest) -> EventLoopFuture<OutboundResponse> {
        hasOutboundPool = true
        return outboundPool.perform(request)
    }

    deinit {
        // The state may outlive this runtime (a caller holding `state`): its
        // natives then raise "called on a closed runtime" instead of reaching it.
        weir_set_dispatch(state.main, nil, nil)
        // Pending timers are cancelled only on their loop. Off it (a runtime
        // dropped by another thread) a cancel races the loop's shutdown: it
        // takes the task out of the queue the closing loop would fail, then
        // fails the promise through a hop the closing loop refuses, and NIO
        // aborts on the leaked promise. Left alone, the task fires into the
        // weak reference and does nothing, or the loop fails it on shutdown.
        let onLoop = eventLoop?.inEventLoop ?? false
        for timer in timers.values {
            timer.cancelled = true
            if onLoop { timer.scheduled?.cancel() }
        }
        // Coroutines and chains live in the state; closing it frees them all
        // (the idle ones are plain values: only their buffer goes).
        idleCoroutines.deallocate()
    }
}
