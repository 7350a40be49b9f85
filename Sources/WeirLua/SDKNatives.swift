import CLua
import CLuaShims
import NIOCore
import WeirCore

// The native half of the `weir` SDK: Swift functions behind C trampolines,
// reached from lua/weir/init.lua as N.<name>. Rules (DESIGN.md "Lua bridging
// rules"): never raise or yield from here — return .error / .yield and let
// the trampoline do it; read arguments defensively (the Lua wrappers check
// types first, but plugins could call N directly through debug tricks);
// use raw table access only.

/// Header names from plugins are usually lower-case already; skip the
/// Unicode-aware lowercased() (and its allocation) in that case.
@inline(__always)
func lowercasedHeaderName(_ name: String) -> String {
    for byte in name.utf8 where byte >= 0x41 && byte <= 0x5a { return name.lowercased() }
    return name
}

private func pushOptional(_ s: String?, on L: LuaThread) {
    if let s = s { LuaState.push(s, on: L) } else { lua_pushnil(L) }
}

/// `weir.client.get_tls()`: a fresh table each call (plugins may keep or change it).
func pushTLSInfo(_ tls: TLSConnectionInfo, on L: LuaThread) {
    func field(_ key: String, _ value: String?) {
        guard let value else { return }
        LuaState.push(value, on: L)
        lua_setfield(L, -2, key)
    }
    func list(_ key: String, _ values: [String]) {
        lua_createtable(L, Int32(values.count), 0)
        for (i, value) in values.enumerated() {
            LuaState.push(value, on: L)
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        lua_setfield(L, -2, key)
    }
    lua_createtable(L, 0, 6)
    field("version", tls.version)
    field("cipher", tls.cipher)
    field("sni", tls.serverName)
    field("alpn", tls.alpn)
    if let peer = tls.peer {
        lua_createtable(L, 0, 12)
        field("subject", peer.subject)
        field("issuer", peer.issuer)
        field("common_name", peer.commonName)
        field("fingerprint_sha256", peer.fingerprintSHA256)
        field("serial", peer.serial)
        field("spiffe_id", peer.spiffeID)
        lua_pushinteger(L, lua_Integer(peer.notBefore)); lua_setfield(L, -2, "not_before")
        lua_pushinteger(L, lua_Integer(peer.notAfter)); lua_setfield(L, -2, "not_after")
        lua_createtable(L, 0, 4)
        list("dns", peer.dnsNames)
        list("uri", peer.uris)
        list("ip", peer.ipAddresses)
        list("email", peer.emails)
        lua_setfield(L, -2, "san")
        lua_setfield(L, -2, "client_cert")
    }
}

func pushHeaderTable(_ headers: [(name: String, value: String)], on L: LuaThread) {
    // name -> value, or name -> { value1, value2 } when repeated.
    var order: [String] = []
    var values: [String: [String]] = [:]
    for (name, value) in headers {
        let key = lowercasedHeaderName(name)
        if values[key] == nil { order.append(key); values[key] = [value] } else { values[key]!.append(value) }
    }
    lua_createtable(L, 0, Int32(order.count))
    for key in order {
        let list = values[key]!
        LuaState.push(key, on: L)
        if list.count == 1 {
            LuaState.push(list[0], on: L)
        } else {
            lua_createtable(L, Int32(list.count), 0)
            for (i, v) in list.enumerated() {
                LuaState.push(v, on: L)
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
        }
        lua_rawset(L, -3)
    }
}

private func sharedValue(at index: Int32, on L: LuaThread) -> SharedDictionaries.Value? {
    switch lua_type(L, index) {
    case LUA_TSTRING: return .string(LuaState.string(at: index, on: L) ?? "")
    case LUA_TBOOLEAN: return .bool(lua_toboolean(L, index) != 0)
    case LUA_TNUMBER:
        if lua_isinteger(L, index) != 0 { return .integer(lua_tointegerx(L, index, nil)) }
        return .number(lua_tonumberx(L, index, nil))
    default: return nil
    }
}

private func pushShared(_ value: SharedDictionaries.Value?, on L: LuaThread) {
    switch value {
    case nil: lua_pushnil(L)
    case .string(let s)?: LuaState.push(s, on: L)
    case .integer(let i)?: lua_pushinteger(L, i)
    case .number(let d)?: lua_pushnumber(L, d)
    case .bool(let b)?: lua_pushboolean(L, b ? 1 : 0)
    }
}

private func number(at index: Int32, on L: LuaThread) -> Double? {
    lua_type(L, index) == LUA_TNUMBER ? lua_tonumberx(L, index, nil) : nil
}

/// The hot natives answer a bad argument with their Lua fallback (or
/// `false`, one result, when called as N.<name> without one) instead of an
/// error: Lua skips the per-argument `type()` checks and runs them only
/// then, for the message (lua/weir/init.lua).
@inline(__always)
private func badArgument(_ L: LuaThread) -> NativeReturn { .fallback }

/// A header value as the setters take it: a string, or an integer as text
/// (a float is formatted by the Lua side, as Lua writes it); with whether
/// it fits a head (see HeaderNameCache; an integer's text always does).
private func headerValue(at index: Int32, on L: LuaThread, cache: HeaderNameCache) -> (text: String, fits: Bool)? {
    withHeaderValue(at: index, on: L, cache: cache) { ($0, $1) }
}

/// `headerValue(at:on:cache:)` lent to `body`: a string's text borrowed
/// from the cache (HeaderNameCache.withText). nil (`body` not called) for
/// anything else.
@inline(__always)
private func withHeaderValue<R>(at index: Int32, on L: LuaThread, cache: HeaderNameCache, _ body: (String, Bool) -> R) -> R? {
    switch lua_type(L, index) {
    case LUA_TSTRING: return cache.withText(ofStringAt: index, on: L, body)
    case LUA_TNUMBER where lua_isinteger(L, index) != 0: return body(cache.integerText(lua_tointegerx(L, index, nil), decimalText), true)
    default: return nil
    }
}

/// `withHeaderValue` that also lends the value's UTF-8 bytes (valid during
/// `body` only: HeaderNameCache.withTextBytes).
@inline(__always)
private func withHeaderValueBytes<R>(at index: Int32, on L: LuaThread, cache: HeaderNameCache,
                                     _ body: (String, Bool, UnsafeRawBufferPointer) -> R) -> R? {
    switch lua_type(L, index) {
    case LUA_TSTRING: return cache.withTextBytes(ofStringAt: index, on: L, body)
    case LUA_TNUMBER where lua_isinteger(L, index) != 0:
        let text = cache.integerText(lua_tointegerx(L, index, nil), decimalText)
        return text.withContiguousUTF8 { body(text, true, UnsafeRawBufferPointer($0)) }
    default: return nil
    }
}

/// What a header setter hands the request (whose setters take only names
/// that are tokens and values without CR/LF/NUL, PluginRequestContext): a
/// name that is not a token names no line, so nothing changes; a value that
/// does not fit is refused, so `set` (= clear + add) only clears.
private enum HeaderChange {
    case apply, clearOnly, none

    @inline(__always)
    init(nameFits: Bool, valueFits: Bool, replaces: Bool) {
        if !nameFits { self = .none } else if valueFits { self = .apply } else { self = replaces ? .clearOnly : .none }
    }
}

/// An integer as decimal text: `String(Int)` goes through the generic
/// description path (~340 instructions).
private func decimalText(_ value: lua_Integer) -> String {
    withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 20) { buffer in
        String(decoding: UnsafeBufferPointer(start: buffer.baseAddress!, count: writeDecimal(value, to: buffer.baseAddress!)), as: UTF8.self)
    }
}

/// An integer's decimal digits (and sign) written at `out`; how many bytes
/// (at most 20). Two digits per division (a table of the pairs), written
/// backwards into a scratch and copied once: a digit at a time, with a
/// loop to count them first, was ~230 instructions for a 10-digit count
/// (rate-limiting writes two per request).
@inline(__always)
func writeDecimal(_ value: lua_Integer, to out: UnsafeMutablePointer<UInt8>) -> Int {
    var magnitude = value.magnitude
    var scratch: (UInt64, UInt64, UInt64) = (0, 0, 0)
    return withUnsafeMutableBytes(of: &scratch) { raw in
        let end = raw.baseAddress!.assumingMemoryBound(to: UInt8.self) + 24
        let pairs = decimalPairs.utf8Start
        var start = end
        while magnitude >= 100 {
            let pair = Int(truncatingIfNeeded: magnitude % 100) &* 2
            magnitude /= 100
            start -= 2
            start[0] = pairs[pair]
            start[1] = pairs[pair + 1]
        }
        if magnitude >= 10 {
            let pair = Int(truncatingIfNeeded: magnitude) &* 2
            start -= 2
            start[0] = pairs[pair]
            start[1] = pairs[pair + 1]
        } else {
            start -= 1
            start[0] = 0x30 + UInt8(truncatingIfNeeded: magnitude)
        }
        if value < 0 { start -= 1; start[0] = 0x2D }
        let length = end - start
        out.update(from: start, count: length)
        return length
    }
}

/// "00" through "99": the two digits of each number below 100.
private let decimalPairs: StaticString = """
    00010203040506070809101112131415161718192021222324252627282930313233343536373839\
    40414243444546474849505152535455565758596061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899
    """

/// The natives plugins call on every request: each has its own C entry
/// (`entry`, CLuaShims weir_set_hot_native) that calls its Swift function
/// directly, instead of a `NativeBox` closure and a `checkedRequestNative`
/// closure (~100 instructions less per call) or the dispatcher's switch on
/// the id (~25 less). Registered first (`installSDK`), so a case's raw
/// value is its native id (below WEIR_HOT_NATIVES). Each answers a result
/// count or WEIR_CALL_FALLBACK (never an error or a yield), so its result
/// is one Int32. A native joins by getting a case, an SDK name and a line
/// in `entry`.
enum HotNative: Int32, CaseIterable {
    case requestGetHeader, upstreamSetHeader, upstreamAddHeader, upstreamClearHeader
    case responseSetHeader, responseAddHeader, sharedDictIncr, sharedDictIncrGet, responseSetPrepared
    case requestGetRoute, clientGetConsumer, clientIdentify, requestGetRawQuery, clientFindCredential
    case clientIdentifyCredential, requestGetRouteAndConsumer, clientIdentifyHeaderCredential, sharedDictIncrSliding

    /// Its name in the SDK's native table (`N.<name>` in lua/weir/init.lua).
    var sdkName: String {
        switch self {
        case .requestGetHeader: return "req_get_header"
        case .upstreamSetHeader: return "up_set_header"
        case .upstreamAddHeader: return "up_add_header"
        case .upstreamClearHeader: return "up_clear_header"
        case .responseSetHeader: return "resp_set_header"
        case .responseAddHeader: return "resp_add_header"
        case .sharedDictIncr: return "shared_dict_incr"
        case .sharedDictIncrGet: return "shared_dict_incr_get"
        case .responseSetPrepared: return "resp_set_prepared"
        case .requestGetRoute: return "req_get_route"
        case .clientGetConsumer: return "client_get_consumer"
        case .clientIdentify: return "client_identify"
        case .requestGetRawQuery: return "req_get_raw_query"
        case .clientFindCredential: return "client_find_credential"
        case .clientIdentifyCredential: return "client_identify_credential"
        case .requestGetRouteAndConsumer: return "req_get_route_and_consumer"
        case .clientIdentifyHeaderCredential: return "client_identify_header_credential"
        case .sharedDictIncrSliding: return "shared_dict_incr_sliding"
        }
    }

    /// The box registered at its id: never called while the runtime's
    /// dispatcher is installed (it answers these ids itself).
    static func unreachableBox(_ native: HotNative) -> NativeFunction {
        { _ in .error("weir: \(native.sdkName) called outside its runtime") }
    }
}

/// The C dispatcher of a runtime's state: the only entry from Lua into
/// Swift. The runtime is not retained for the call: its state (and so
/// every call into it) does not outlive it (`LuaRuntime.deinit`).
let runtimeNativeDispatch: weir_dispatch_fn = { thread, context, functionID, yieldCount in
    // call_native (shims.c) passes the thread, the context it was given
    // with this dispatcher and its own counter: never nil (no checks per call).
    Unmanaged<LuaRuntime>.fromOpaque(context.unsafelyUnwrapped)._withUnsafeGuaranteedRef { runtime in
        runtime.dispatchNative(thread.unsafelyUnwrapped, functionID, yieldCount: yieldCount.unsafelyUnwrapped)
    }
}

extension HotNative {
    /// Its C entry (`weir_set_hot_native`, set by LuaRuntime): the C
    /// function Lua calls for it calls this directly, with the runtime as
    /// context (unretained, as for `runtimeNativeDispatch`), instead of the
    /// dispatcher and a switch on the id (~25 instructions a call).
    var entry: weir_hot_fn {
        switch self {
        case .requestGetHeader: return { L, c in hot(c) { $0.requestGetHeader(L!) } }
        case .upstreamSetHeader: return { L, c in hot(c) { $0.setUpstreamHeader(L!) } }
        case .upstreamAddHeader: return { L, c in hot(c) { $0.setHeader(L!, .upstreamAdd) } }
        case .upstreamClearHeader: return { L, c in hot(c) { $0.upstreamClearHeader(L!) } }
        case .responseSetHeader: return { L, c in hot(c) { $0.setHeader(L!, .responseSet) } }
        case .responseAddHeader: return { L, c in hot(c) { $0.setHeader(L!, .responseAdd) } }
        case .sharedDictIncr: return { L, c in hot(c) { $0.sharedDictIncr(L!, readsOther: false) } }
        case .sharedDictIncrGet: return { L, c in hot(c) { $0.sharedDictIncr(L!, readsOther: true) } }
        case .responseSetPrepared: return { L, c in hot(c) { $0.setPreparedResponseHeaders(L!) } }
        case .requestGetRoute: return { L, c in hot(c) { $0.pushRequestName(L!) { $0.matchedRouteName } } }
        case .clientGetConsumer: return { L, c in hot(c) { $0.pushRequestName(L!) { $0.consumer } } }
        case .clientIdentify: return { L, c in hot(c) { $0.clientIdentify(L!) } }
        case .requestGetRawQuery: return { L, c in hot(c) { $0.requestGetRawQuery(L!) } }
        // Any phase: only a call outside one goes to the fallback (its message).
        case .clientFindCredential:
            return { L, c in hot(c) { $0.currentScope == nil ? WEIR_CALL_FALLBACK : $0.credentialLookups.find(L!) } }
        case .clientIdentifyCredential: return { L, c in hot(c) { $0.clientIdentifyCredential(L!) } }
        case .requestGetRouteAndConsumer: return { L, c in hot(c) { $0.requestGetRouteAndConsumer(L!) } }
        case .clientIdentifyHeaderCredential: return { L, c in hot(c) { $0.clientIdentifyHeaderCredential(L!) } }
        case .sharedDictIncrSliding: return { L, c in hot(c) { $0.sharedDictIncrSliding(L!) } }
        }
    }
}

/// The runtime a hot native's C entry was given, borrowed for the call.
@inline(__always)
private func hot(_ context: UnsafeMutableRawPointer?, _ body: (LuaRuntime) -> Int32) -> Int32 {
    Unmanaged<LuaRuntime>.fromOpaque(context.unsafelyUnwrapped)._withUnsafeGuaranteedRef(body)
}

/// How a header setter native changes its header (`LuaRuntime.setHeader`;
/// the upstream request's set_header has its own, `setUpstreamHeader`).
private enum HeaderSetter {
    case upstreamAdd, responseSet, responseAdd

    var phases: UInt8 {
        switch self {
        case .upstreamAdd: return PluginPhase.request.mask
        case .responseSet, .responseAdd: return PluginPhase.responseWritePhases
        }
    }
}

extension LuaRuntime {
    /// Runs native `id` through its box. The hot natives (ids below
    /// WEIR_HOT_NATIVES) do not come here: their C entries call them
    /// directly (`HotNative.entry`); their boxes answer an error.
    @inline(__always)
    func dispatchNative(_ L: LuaThread, _ id: Int32, yieldCount: UnsafeMutablePointer<Int32>) -> Int32 {
        state.callRegisteredNative(id, on: L, yieldCount: yieldCount)
    }

    /// A hot native's request check, as `checkedRequestNative` without its
    /// closure: outside `phases` (a mask of `1 << luaID`) or with no
    /// request active it answers WEIR_CALL_FALLBACK, whose Lua fallback
    /// raises the SDK's message at the caller's line.
    @inline(__always)
    private func withCurrentRequest(_ phases: UInt8, _ body: (HotRequestContext) -> Int32) -> Int32 {
        guard let current = currentScope, phases & currentPhase.mask != 0 else { return WEIR_CALL_FALLBACK }
        // Borrowed for the call (see `currentScope`): no retain of the
        // scope, nor of its request (HotRequestContext).
        return current._withUnsafeGuaranteedRef { scope in
            guard let request = scope.hotContext else { return WEIR_CALL_FALLBACK }
            return body(request)
        }
    }

    /// `weir.request.get_header(name)`.
    @inline(__always)
    fileprivate func requestGetHeader(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.anyRequestPhase) { r in
            // The name (and its bytes) borrowed from the cache for the lookup.
            headerNames.withTextBytes(at: 1, on: L) { name, _, nameBytes in
                r.withRequestHeader(name, nameBytes: nameBytes) { value in
                    if let value { recentStrings.push(bytes: value, on: L) } else { lua_pushnil(L) }
                }
                return 1
            } ?? WEIR_CALL_FALLBACK
        }
    }

    /// `weir.upstream.request.add_header`, `weir.response.set_header` /
    /// `add_header` (name, value).
    @inline(__always)
    fileprivate func setHeader(_ L: LuaThread, _ setter: HeaderSetter) -> Int32 {
        withCurrentRequest(setter.phases) { r in
            // Name and value borrowed from their caches for the change.
            headerNames.withText(at: 1, on: L) { name, nameFits in
                withHeaderValue(at: 2, on: L, cache: headerValues) { value, valueFits in
                    switch HeaderChange(nameFits: nameFits, valueFits: valueFits, replaces: setter == .responseSet) {
                    case .apply:
                        switch setter {
                        case .upstreamAdd: r.addUpstreamHeader(name, value)
                        case .responseSet: r.setResponseHeader(name, value)
                        case .responseAdd: r.addResponseHeader(name, value)
                        }
                    case .clearOnly:   // a set's refused value still clears: responseSet only here
                        r.clearResponseHeader(name)
                    case .none:
                        break
                    }
                    return 0
                } ?? WEIR_CALL_FALLBACK
            } ?? WEIR_CALL_FALLBACK
        }
    }

    /// `weir.upstream.request.set_header(name, value)`: as `setHeader`, with
    /// the name's and value's bytes lent to the request too (it writes
    /// them as a wire line: PluginUpstreamLines). Its own function, not a
    /// case of `setHeader`: merged, the innermost closure was no longer
    /// inlined (+42 instructions per request on the bench chain, LTO).
    @inline(__always)
    fileprivate func setUpstreamHeader(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.request.mask) { r in
            headerNames.withTextBytes(at: 1, on: L) { name, nameFits, nameBytes in
                withHeaderValueBytes(at: 2, on: L, cache: headerValues) { value, valueFits, valueBytes in
                    switch HeaderChange(nameFits: nameFits, valueFits: valueFits, replaces: true) {
                    case .apply: r.setUpstreamHeader(name, value, nameBytes: nameBytes, valueBytes: valueBytes)
                    case .clearOnly: r.clearUpstreamHeader(name)
                    case .none: break
                    }
                    return 0
                } ?? WEIR_CALL_FALLBACK
            } ?? WEIR_CALL_FALLBACK
        }
    }

    /// `weir.upstream.request.clear_header(name)`.
    @inline(__always)
    fileprivate func upstreamClearHeader(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.request.mask) { r in
            guard let name = headerNames.name(at: 1, on: L) else { return WEIR_CALL_FALLBACK }
            r.clearUpstreamHeader(name)
            return 0
        }
    }

    /// `weir.request.get_route()` / `weir.client.get_consumer()`: the
    /// request's route or consumer name (the same few strings request after
    /// request: `recentStrings`), or nil.
    @inline(__always)
    fileprivate func pushRequestName(_ L: LuaThread, _ name: (HotRequestContext) -> String?) -> Int32 {
        withCurrentRequest(PluginPhase.anyRequestPhase) { r in
            if let name = name(r) { recentStrings.push(name, on: L) } else { lua_pushnil(L) }
            return 1
        }
    }

    /// `weir.request.get_route_and_consumer()`: get_route() and
    /// get_consumer() in one native call (rate-limiting counts by both on
    /// every request: one call's fixed cost, ~170 instructions, less).
    @inline(__always)
    fileprivate func requestGetRouteAndConsumer(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.anyRequestPhase) { r in
            if let route = r.matchedRouteName { recentStrings.push(route, on: L) } else { lua_pushnil(L) }
            if let consumer = r.consumer { recentStrings.push(consumer, on: L) } else { lua_pushnil(L) }
            return 2
        }
    }

    /// `weir.request.get_raw_query()`: the query without its `?`, "" without one.
    @inline(__always)
    fileprivate func requestGetRawQuery(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.anyRequestPhase) { r in
            if let query = r.rawQuery { LuaState.push(query, on: L) } else { recentStrings.push(bytes: UnsafeRawBufferPointer(start: nil, count: 0), on: L) }
            return 1
        }
    }

    /// `weir.client.identify(consumer, credential, anonymous)`: what every
    /// auth plugin does once it knows the client, in one call instead of
    /// three (authenticate, set_header x-consumer-name, and set or clear
    /// x-anonymous-consumer, which a client must not be able to send). The
    /// consumer is read through the value cache: the same few names request
    /// after request, checked once for whether they fit a header value.
    @inline(__always)
    fileprivate func clientIdentify(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.request.mask) { r in
            guard let consumer = headerValues.checkedText(at: 1, on: L), let credential = credentialName(at: 2, L) else {
                return WEIR_CALL_FALLBACK
            }
            r.identify(consumer.text, credential, nameFits: consumer.fits, anonymous: lua_toboolean(L, 3) != 0)
            return 0
        }
    }

    /// `weir.client.identify_credential(plugin, field, value[, hide])`:
    /// find_credential, and when it finds one, identify(consumer, plugin) — a
    /// key-style auth plugin's whole lookup in one call instead of two (the
    /// consumer's name is not bridged back in). With `hide`, then
    /// clear_header(hide) on the upstream request whether or not it found
    /// one (key-auth's hide_credentials: a third native call less). Results
    /// as find_credential's.
    @inline(__always)
    fileprivate func clientIdentifyCredential(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.request.mask) { r in
            // `hide` read first: a bad one falls back before anything changes.
            var hide: String?
            switch lua_type(L, 4) {
            case LUA_TSTRING: hide = headerNames.name(at: 4, on: L)
            case LUA_TNIL, LUA_TNONE: break
            default: return WEIR_CALL_FALLBACK
            }
            // A match identifies its consumer by the names the lookup kept
            // (no match: nil, nothing identified).
            let results = credentialLookups.find(L) { consumer, plugin, consumerFits in
                r.identify(consumer, plugin, nameFits: consumerFits, anonymous: false)
            }
            if results == WEIR_CALL_FALLBACK { return results }
            // After identify, as the plugin's clear_header after the call was.
            if let hide { r.clearUpstreamHeader(hide) }
            return results
        }
    }

    /// `weir.client.identify_header_credential(plugin, field, name[, hide])`:
    /// identify_credential(plugin, field, value) with the value of request
    /// header `name` as get_header reads it (no lookup when it is absent or
    /// empty), then with `hide` true clear_header(name) upstream — key-auth's
    /// header key in one call instead of get_header and identify_credential.
    /// find_credential's results on a match, else nil and the header's
    /// value (nil when absent); then whether the request has a query string
    /// (get_raw_query() ~= "": key-auth hides a query key only then, and
    /// learns it here instead of in a native call of its own).
    @inline(__always)
    fileprivate func clientIdentifyHeaderCredential(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.request.mask) { r in
            let hideType = lua_type(L, 4)
            guard hideType == LUA_TBOOLEAN || hideType == LUA_TNIL || hideType == LUA_TNONE,
                  lua_type(L, 1) == LUA_TSTRING, lua_type(L, 2) == LUA_TSTRING else { return WEIR_CALL_FALLBACK }
            // The name borrowed from the cache (a returned copy: a retain and
            // a release); nothing below looks a header name up again.
            return headerNames.withText(at: 3, on: L) { name, _ in
                identifyHeaderCredential(L, r, name: name, hides: hideType == LUA_TBOOLEAN && lua_toboolean(L, 4) != 0)
            } ?? WEIR_CALL_FALLBACK
        }
    }

    /// clientIdentifyHeaderCredential's work, `name` being the header's.
    @inline(__always)
    private func identifyHeaderCredential(_ L: LuaThread, _ r: HotRequestContext, name: String, hides: Bool) -> Int32 {
        // The hidden header cleared before identify when it cannot be
        // one of identify's two names (their lengths differ): the same
        // result, and with no upstream line added yet the clear has no
        // added line to look through (~80 instructions per request).
        let nameLength = name.utf8.count
        let clearsFirst = hides && nameLength != PluginIdentityFields.consumerNameLength
            && nameLength != PluginIdentityFields.anonymousConsumerLength
        // The value pushed as get_header pushes it (the same Lua string
        // request after request: the lookup's cache is by its address);
        // read and cleared in one call (one pass over the client's lines).
        // The same body twice, as closures written in place: one local
        // function for both captured `length` in a heap box (an allocation
        // per request, +1 k instructions on weir-auth-local under LTO).
        var length = -1
        if clearsFirst {
            r.withRequestHeaderClearing(name) { value in
                guard let value else { return }
                recentStrings.push(bytes: value, on: L)
                length = value.count
            }
        } else {
            r.withRequestHeader(name) { value in
                guard let value else { return }
                recentStrings.push(bytes: value, on: L)
                length = value.count
            }
        }
        if length < 0 {
            lua_pushnil(L); lua_pushnil(L)
        } else if length == 0 || credentialLookups.find(L, valueAt: -1, stringsChecked: true, matched: { consumer, plugin, consumerFits in
            r.identify(consumer, plugin, nameFits: consumerFits, anonymous: false)
        }) != 2 {
            // No match (find pushed nil) or nothing to look up: nil, the value.
            if length == 0 { lua_pushnil(L) }
            lua_pushvalue(L, -2)
        }
        // Otherwise after identify, as the plugin's clear_header after its lookup was.
        if hides && !clearsFirst { r.clearUpstreamHeader(name) }
        lua_pushboolean(L, r.rawQuery?.isEmpty == false ? 1 : 0)
        return 3
    }

    /// A credential name argument: a string (through the value cache: the
    /// same few names request after request), nil/none (`.some(nil)`), or
    /// anything else (nil: a bad argument).
    @inline(__always)
    func credentialName(at index: Int32, _ L: LuaThread) -> String?? {
        switch lua_type(L, index) {
        case LUA_TSTRING: return .some(headerValues.name(at: index, on: L))
        case LUA_TNIL, LUA_TNONE: return .some(nil)
        default: return nil
        }
    }

    /// `prepared:set(...)` (weir.response.prepare_headers): the handle at 1
    /// (its set's id at [1], read raw), then one value per line without a
    /// fixed value, each a string without CR, LF or NUL or an integer. The
    /// lines are written as bytes on the stack (the set's template, each
    /// value between its parts: an integer as its digits) and handed over
    /// at once: no String per value or line. Anything else (a float, a
    /// value with CR/LF, the wrong count) falls back: the Lua side sets the
    /// lines one by one, as set_header would.
    @inline(__always)
    fileprivate func setPreparedResponseHeaders(_ L: LuaThread) -> Int32 {
        withCurrentRequest(PluginPhase.responseWritePhases) { r in
            guard lua_type(L, 1) == LUA_TTABLE, let id = handleID(ofTableAt: 1, L) else { return WEIR_CALL_FALLBACK }
            return preparedHeaderLines.withSet(id) { lines in
                let count = lines.variableCount
                guard lua_gettop(L) == Int32(count) + 1 else { return WEIR_CALL_FALLBACK }
                // Into a fixed stack buffer, each value read once, as it is
                // written (no pass to measure first: ~50 instructions per
                // request for rate-limiting's three values).
                let written = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: Self.preparedRoom) { buffer -> Int in
                    let written = Self.writePreparedLines(lines, L, to: buffer.baseAddress!, capacity: Self.preparedRoom)
                    if written >= 0 { r.setResponseHeaders(lines, UnsafeRawBufferPointer(start: buffer.baseAddress!, count: written)) }
                    return written
                }
                if written >= 0 { return 0 }
                if written == Self.preparedFallback { return WEIR_CALL_FALLBACK }
                return setLongPreparedResponseHeaders(lines, L, r)
            } ?? WEIR_CALL_FALLBACK
        }
    }

    /// The stack room `prepared:set` writes a set's lines into; longer lines
    /// (long names or string values) are measured first
    /// (`setLongPreparedResponseHeaders`).
    private static let preparedRoom = 512
    /// `writePreparedLines`' answers other than a length.
    private static let preparedFallback = -1, preparedTooLong = -2

    /// `prepared:set` of lines that may not fit `preparedRoom`: the room
    /// measured (the template, at most 20 digits per integer, each string's
    /// bytes), then the lines written into it.
    @inline(never)
    private func setLongPreparedResponseHeaders(_ lines: PreparedHeaderLines, _ L: LuaThread, _ r: HotRequestContext) -> Int32 {
        var room = lines.wireTemplate.count
        for index in 2..<(Int32(lines.variableCount) + 2) {
            if lua_isinteger(L, index) != 0 { room += 20; continue }
            var length = 0
            guard lua_type(L, index) == LUA_TSTRING, weir_tostring(L, index, &length) != nil else { return WEIR_CALL_FALLBACK }
            room += length
        }
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: room) { buffer in
            let written = Self.writePreparedLines(lines, L, to: buffer.baseAddress!, capacity: room)
            guard written >= 0 else { return WEIR_CALL_FALLBACK }
            r.setResponseHeaders(lines, UnsafeRawBufferPointer(start: buffer.baseAddress!, count: written))
            return 0
        }
    }

    /// A prepared set's lines with the values at stack indices 2... written
    /// at `out`: how many bytes, `preparedFallback` for a value that is not
    /// an integer or a string without CR, LF or NUL, `preparedTooLong` when
    /// they would pass `capacity`. Each value is read once.
    @inline(__always)
    private static func writePreparedLines(_ lines: PreparedHeaderLines, _ L: LuaThread,
                                           to out: UnsafeMutablePointer<UInt8>, capacity: Int,
                                           firstValue: Int32 = 2, remaining: lua_Integer = 0, remainingSlots: UInt64 = 0) -> Int {
        let count = lines.variableCount
        return lines.wireTemplate.withUnsafeBufferPointer { template in
            lines.segmentEnds.withUnsafeBufferPointer { ends in
                var written = 0, start = 0
                // The last integer written and where its digits are: the same
                // count again (rate-limiting's remaining, in two lines) is a copy.
                var lastInteger: lua_Integer = 0, lastDigits = -1, lastLength = 0
                for i in 0..<ends.count {
                    (out + written).update(from: template.baseAddress! + start, count: ends[i] - start)
                    written += ends[i] - start
                    start = ends[i]
                    guard i < count else { break }
                    let index = Int32(i) + firstValue
                    // This value and the template's rest must fit.
                    let rest = template.count - start
                    // Bit i of `remainingSlots`: value i is `remaining` (dict:incr_sliding's set).
                    let substituted = remainingSlots & (1 << UInt64(i)) != 0
                    if substituted || lua_isinteger(L, index) != 0 {
                        guard written + 20 + rest <= capacity else { return preparedTooLong }
                        let value = substituted ? remaining : lua_tointegerx(L, index, nil)
                        if lastDigits >= 0 && value == lastInteger {
                            (out + written).update(from: out + lastDigits, count: lastLength)
                        } else {
                            lastInteger = value
                            lastDigits = written
                            lastLength = writeDecimal(value, to: out + written)
                        }
                        written += lastLength
                    } else {
                        var length = 0
                        guard lua_type(L, index) == LUA_TSTRING, let text = weir_tostring(L, index, &length),
                              HTTPFieldSyntax.isValidFieldValue(UnsafeRawBufferPointer(start: text, count: length)) else {
                            return preparedFallback
                        }
                        guard written + length + rest <= capacity else { return preparedTooLong }
                        UnsafeMutableRawPointer(out + written).copyMemory(from: text, byteCount: length)
                        written += length
                    }
                }
                return written
            }
        }
    }

    /// `dict:incr` and `dict:incr_get` themselves (lua/weir/init.lua): the
    /// first argument is the dictionary's table; anything else falls back.
    /// incr_get's other key is required here, so a missing one falls back
    /// to the message before anything changes.
    @inline(__always)
    fileprivate func sharedDictIncr(_ L: LuaThread, readsOther: Bool) -> Int32 {
        guard lua_type(L, 1) == LUA_TTABLE, !readsOther || lua_type(L, 6) == LUA_TSTRING,
              let id = handleID(ofTableAt: 1, L) else { return WEIR_CALL_FALLBACK }
        return options.shared.withDictionary(id: id) { target, now in
            if let target, let count = sharedIncrementCounter(L, target, readsOther: readsOther, now: now) { return count }
            // Not a counter (or bad arguments): the general path, which reads the time itself.
            return sharedIncrement(L, target?.takeUnretainedValue(), readsOther: readsOther)
        }
    }

    /// A handle's id (a dictionary's, a prepared header set's: lua/weir/init.lua
    /// puts it at the handle's [1], read raw: no metamethod may run under
    /// Swift), through the per-state cache by the table's address
    /// (`HandleIDs`). The caller has seen a table at `index`. nil: not
    /// such a handle.
    @inline(__always)
    func handleID(ofTableAt index: Int32, _ L: LuaThread) -> Int? {
        handleIDs.id(ofTableAt: index, L)
    }

    /// incr on `target` (nil: no such dictionary): key string, delta number
    /// (nil: 1), init number or nil, ttl number >= 0 (nil: 0), and with
    /// `readsOther` the other key (a string, or absent) to read after.
    /// A result count, or WEIR_CALL_FALLBACK for arguments it does not take.
    /// `now`: the dictionaries' time when the caller has it (nil: read here,
    /// and the counter path is not tried: N.shared_incr, a fallback).
    func sharedIncrement(_ L: LuaThread, _ target: SharedDictionaries.Dictionary?, readsOther: Bool, now: Double? = nil) -> Int32 {
        if let target, let now, let count = sharedIncrementCounter(L, Unmanaged.passUnretained(target), readsOther: readsOther, now: now) {
            return count
        }
        let initType = lua_type(L, 4), otherType = readsOther ? lua_type(L, 6) : LUA_TNONE
        let deltaType = lua_type(L, 3), ttlType = lua_type(L, 5)
        guard let key = LuaState.bytes(at: 2, on: L),
              deltaType == LUA_TNUMBER || deltaType == LUA_TNIL || deltaType == LUA_TNONE,
              initType == LUA_TNUMBER || initType == LUA_TNIL || initType == LUA_TNONE,
              otherType == LUA_TNONE || otherType == LUA_TSTRING else { return WEIR_CALL_FALLBACK }
        let delta = deltaType == LUA_TNUMBER ? sharedValue(at: 3, on: L)! : .integer(1)
        var ttl = 0.0
        if ttlType != LUA_TNIL && ttlType != LUA_TNONE {
            guard let t = number(at: 5, on: L), !(t < 0) else { return WEIR_CALL_FALLBACK }
            ttl = t
        }
        let time = now ?? options.shared.now()
        let hash = sharedKeyHashes.hash(of: key, at: 2, on: L)
        // incr_get: both keys under one lock of the dictionary.
        if let target, otherType == LUA_TSTRING, let otherKey = LuaState.bytes(at: 6, on: L) {
            let (result, other) = target.incrGet(key, hash: hash, delta, initial: sharedValue(at: 4, on: L), initialTTL: ttl,
                                                 other: otherKey, otherHash: sharedKeyHashes.hash(of: otherKey, at: 6, on: L), now: time)
            guard case .success(let v) = result else { return pushIncrFailure(result, L) }
            pushShared(v, on: L)
            pushShared(other, on: L)
            return 2
        }
        let result = target?.incr(key, hash: hash, delta, initial: sharedValue(at: 4, on: L),
                                  initialTTL: ttl, now: time) ?? .failure(.notFound)
        switch result {
        case .success(let v):
            pushShared(v, on: L)
            return 1
        case .failure: return pushIncrFailure(result, L)
        }
    }

    /// `sharedIncrement` on a counter, dict:incr's usual use (rate-limiting's
    /// windows, bench-counter): an integer delta (or none), an integer
    /// initial value (or none), a ttl >= 0 (or none) and, with `readsOther`,
    /// the other key (a string, or none), each argument's type read once
    /// and no `Value` made, copied or destroyed. nil when the arguments or
    /// the values met are anything else: nothing was changed, and the
    /// general path does the work (or falls back).
    @inline(__always)
    private func sharedIncrementCounter(_ L: LuaThread, _ target: Unmanaged<SharedDictionaries.Dictionary>, readsOther: Bool,
                                        now: Double) -> Int32? {
        guard let key = LuaState.bytes(at: 2, on: L) else { return nil }
        guard case .some(.some(let delta)) = integerArgument(at: 3, or: 1, L),
              case .some(let initial) = integerArgument(at: 4, or: nil, L) else { return nil }
        var ttl = 0.0
        let ttlType = lua_type(L, 5)
        if ttlType == LUA_TNUMBER {
            ttl = lua_tonumberx(L, 5, nil)
            guard !(ttl < 0) else { return nil }
        } else if ttlType != LUA_TNIL && ttlType != LUA_TNONE {
            return nil
        }
        var other: UnsafeRawBufferPointer?
        if readsOther {
            let otherType = lua_type(L, 6)
            if otherType == LUA_TSTRING { other = LuaState.bytes(at: 6, on: L) } else if otherType != LUA_TNONE { return nil }
        }
        let hash = sharedKeyHashes.hash(of: key, at: 2, on: L)
        var otherHash = 0
        if let other { otherHash = sharedKeyHashes.hash(of: other, at: 6, on: L) }
        // Borrowed (withDictionary lends it): a strong reference was retained for the whole native.
        let result = target._withUnsafeGuaranteedRef {
            $0.incrementCounter(key, hash: hash, by: delta, initial: initial, initialTTL: ttl, other: other, otherHash: otherHash, now: now)
        }
        switch result {
        case .counted(let count, let otherCount):
            lua_pushinteger(L, count)
            guard other != nil else { return 1 }
            if let otherCount { lua_pushinteger(L, otherCount) } else { lua_pushnil(L) }
            return 2
        case .notFound: return pushIncrFailure(.failure(.notFound), L)
        case .notCounter: return nil
        }
    }

    /// `dict:incr_sliding(key, prev_key, window, elapsed, limit, ttl
    /// [, headers, values...])` (lua/weir/init.lua, its fallback does the
    /// same in Lua): incr_get(key,
    /// 1, 0, ttl, prev_key), then the sliding estimate
    /// `prev * (window - elapsed) / window + count` computed as Lua computes
    /// it (an integer `elapsed`: the product in integers, wrapping), and
    /// within `limit` the remaining count `(limit - estimate) // 1 | 0`;
    /// over it the increment is taken back (as a `dict:incr(key, -1)`
    /// after it) and false, count, prev are answered. Here only integer
    /// counters, a window of 1...2^53, an integer limit of at most 2^53 in
    /// size (where Lua's mixed comparison is the Double one) and a finite
    /// elapsed; anything else falls back before anything changes. With a
    /// prepared header set, an admitted request's `headers:set(values...)`
    /// is made in the same call, `true` among the values standing for the
    /// remaining count (rate-limiting's RateLimit lines: one native call
    /// less per request).
    fileprivate func sharedDictIncrSliding(_ L: LuaThread) -> Int32 {
        // With a prepared header set (argument 8) and its values: made
        // when admitted, in a phase that may write response headers, each
        // value an integer or `true` (the remaining count), all checked
        // before the counter changes.
        guard lua_gettop(L) > 7, lua_type(L, 8) != LUA_TNIL else { return countSliding(L, set: nil, nil, 0) }
        return withCurrentRequest(PluginPhase.responseWritePhases) { r in
            guard lua_type(L, 8) == LUA_TTABLE, let setID = handleID(ofTableAt: 8, L) else { return WEIR_CALL_FALLBACK }
            return preparedHeaderLines.withSet(setID) { lines in
                let count = Int32(lines.variableCount)      // <= PreparedHeaderLines.maxLines (32)
                guard lua_gettop(L) == 8 + count, lines.wireTemplate.count + 20 * Int(count) <= Self.preparedRoom else {
                    return WEIR_CALL_FALLBACK
                }
                // Bit i: value i is `true` (the remaining count).
                var remainingSlots: UInt64 = 0
                for i in 0..<count {
                    switch lua_type(L, 9 + i) {
                    case LUA_TNUMBER where lua_isinteger(L, 9 + i) != 0: break
                    case LUA_TBOOLEAN where lua_toboolean(L, 9 + i) != 0: remainingSlots |= 1 << UInt64(i)
                    default: return WEIR_CALL_FALLBACK
                    }
                }
                return countSliding(L, set: Unmanaged.passUnretained(lines), r, remainingSlots)
            } ?? WEIR_CALL_FALLBACK
        }
    }

    /// dict:incr_sliding's count and decision (arguments 1 to 7), then
    /// `set`'s lines when admitted (their values checked by the caller).
    @inline(__always)
    private func countSliding(_ L: LuaThread, set: Unmanaged<PreparedHeaderLines>?, _ r: HotRequestContext?,
                              _ remainingSlots: UInt64) -> Int32 {
        guard lua_type(L, 1) == LUA_TTABLE, let id = handleID(ofTableAt: 1, L),
              let key = LuaState.bytes(at: 2, on: L), let prevKey = LuaState.bytes(at: 3, on: L),
              lua_isinteger(L, 4) != 0, lua_isinteger(L, 6) != 0 else { return WEIR_CALL_FALLBACK }
        let window = lua_tointegerx(L, 4, nil), limit = lua_tointegerx(L, 6, nil)
        let exact: Int64 = 1 << 53
        guard window > 0 && window <= exact && limit >= -exact && limit <= exact else { return WEIR_CALL_FALLBACK }
        // elapsed: an integer, or a finite float.
        let elapsedIsInteger = lua_isinteger(L, 5) != 0
        var elapsed = 0.0
        if !elapsedIsInteger {
            // A number (not a string converted): lua_tonumberx alone would take "1.5".
            guard lua_type(L, 5) == LUA_TNUMBER else { return WEIR_CALL_FALLBACK }
            elapsed = lua_tonumberx(L, 5, nil)
            guard elapsed.isFinite else { return WEIR_CALL_FALLBACK }
        }
        var ttl = 0.0
        switch lua_type(L, 7) {
        case LUA_TNUMBER:
            ttl = lua_tonumberx(L, 7, nil)
            guard !(ttl < 0) else { return WEIR_CALL_FALLBACK }
        case LUA_TNIL, LUA_TNONE: break
        default: return WEIR_CALL_FALLBACK
        }
        return options.shared.withDictionary(id: id) { target, now in
            guard let target else { return WEIR_CALL_FALLBACK }
            let hash = sharedKeyHashes.hash(of: key, at: 2, on: L)
            let prevHash = sharedKeyHashes.hash(of: prevKey, at: 3, on: L)
            let result = target._withUnsafeGuaranteedRef {
                $0.incrementCounter(key, hash: hash, by: 1, initial: 0, initialTTL: ttl, other: prevKey, otherHash: prevHash, now: now)
            }
            guard case .counted(let count, let prevCount) = result else { return WEIR_CALL_FALLBACK }
            let prev = prevCount ?? 0
            let estimate: Double
            if elapsedIsInteger {
                let span = window &- lua_tointegerx(L, 5, nil)
                estimate = Double(prev &* span) / Double(window) + Double(count)
            } else {
                estimate = Double(prev) * (Double(window) - elapsed) / Double(window) + Double(count)
            }
            if !(estimate > Double(limit)) {
                let remaining = (Double(limit) - estimate).rounded(.down)
                if remaining >= -9.223372036854775808e18 && remaining < 9.223372036854775808e18 {
                    if let set, let r {
                        set._withUnsafeGuaranteedRef {
                            setSlidingLines($0, L, r, remaining: lua_Integer(remaining), remainingSlots: remainingSlots)
                        }
                    }
                    lua_pushinteger(L, lua_Integer(remaining))
                    return 1
                }
                // No integer for it (Lua's `| 0` raises): the increment
                // taken back, and the fallback does it all again in Lua.
            }
            // Taken back as dict:incr(key, -1) would (nothing if the key
            // is gone or no longer a counter).
            _ = target._withUnsafeGuaranteedRef {
                $0.incrementCounter(key, hash: hash, by: -1, initial: nil, initialTTL: 0, other: nil, otherHash: 0, now: now)
            }
            if estimate > Double(limit) {
                lua_pushboolean(L, 0)
                lua_pushinteger(L, count)
                lua_pushinteger(L, prev)
                return 3
            }
            return WEIR_CALL_FALLBACK
        }
    }

    /// dict:incr_sliding's prepared set: its values from argument 9, `true`
    /// as `remaining` (all integers, so it fits `preparedRoom`: checked
    /// before the count).
    @inline(__always)
    private func setSlidingLines(_ lines: PreparedHeaderLines, _ L: LuaThread, _ r: HotRequestContext, remaining: lua_Integer,
                                 remainingSlots: UInt64) {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: Self.preparedRoom) { buffer in
            let written = Self.writePreparedLines(lines, L, to: buffer.baseAddress!, capacity: Self.preparedRoom,
                                                  firstValue: 9, remaining: remaining, remainingSlots: remainingSlots)
            if written >= 0 { r.setResponseHeaders(lines, UnsafeRawBufferPointer(start: buffer.baseAddress!, count: written)) }
        }
    }

    /// An integer argument: its value, `absent` for nil or none (`.some(nil)`
    /// when that is nil), or nil for anything else (a float too).
    @inline(__always)
    private func integerArgument(at index: Int32, or absent: lua_Integer?, _ L: LuaThread) -> lua_Integer?? {
        // The integer check first: the usual argument is one (two API calls, not three).
        if lua_isinteger(L, index) != 0 { return .some(lua_tointegerx(L, index, nil)) }
        switch lua_type(L, index) {
        case LUA_TNIL, LUA_TNONE: return .some(absent)
        default: return nil
        }
    }

    /// nil and the message of a failed incr: two results.
    private func pushIncrFailure(_ result: Result<SharedDictionaries.Value, SharedDictionaries.IncrError>, _ L: LuaThread) -> Int32 {
        lua_pushnil(L)
        switch result {
        case .failure(.notANumber): LuaState.push("not a number", on: L)
        default: LuaState.push("not found", on: L)
        }
        return 2
    }
}

extension LuaRuntime {
    typealias RequestNative = (LuaThread, PluginRequest, PluginRequestContext) -> NativeReturn

    /// Wraps a native that needs the current request.
    private func requestNative(_ name: String, _ body: @escaping RequestNative) -> NativeFunction {
        // unowned(unsafe): the state (and so every native) dies with the runtime.
        return { [unowned(unsafe) self] L in
            guard let current = self.currentScope else {
                return .error("\(name): no request is active (called outside a plugin phase?)")
            }
            // Borrowed for the call (see `currentScope`): no retain of the scope.
            return current._withUnsafeGuaranteedRef { scope in
                guard let request = scope.context else {
                    return .error("\(name) is not available in the connection phase")
                }
                return body(L, scope, request)
            }
        }
    }

    /// Wraps a hot native that plugins call directly (the SDK function is
    /// the native with a Lua fallback, `clib.with_fallback` in
    /// lua/weir/init.lua): outside `phases` (a mask of `1 << luaID`), or
    /// with no request active, it answers `.fallback`, whose phase check
    /// raises the SDK's message at the caller's line. No Lua wrapper runs on
    /// a good call (~150-200 instructions each).
    private func checkedRequestNative(_ phases: UInt8, _ body: @escaping RequestNative) -> NativeFunction {
        return { [unowned(unsafe) self] L in
            guard let current = self.currentScope, phases & (1 << UInt8(self.currentPhase.luaID)) != 0 else { return .fallback }
            return current._withUnsafeGuaranteedRef { scope in
                guard let request = scope.context else { return .fallback }
                return body(L, scope, request)
            }
        }
    }

    /// Wraps a native that works in any scope (request or connection).
    func scopeNative(_ name: String, _ body: @escaping (LuaThread, PluginRequest) -> NativeReturn) -> NativeFunction {
        return { [unowned(unsafe) self] L in
            guard let current = self.currentScope else {
                return .error("\(name): no request is active (called outside a plugin phase?)")
            }
            return current._withUnsafeGuaranteedRef { scope in body(L, scope) }
        }
    }

    /// Starts an async operation: only from the scope's own coroutine, which
    /// the runtime resumes when `future` completes.
    func suspend(_ name: String, _ L: LuaThread, _ scope: PluginRequest,
                         _ future: @autoclosure () -> EventLoopFuture<[AsyncValue]>) -> NativeReturn {
        guard let co = scope.coroutine, co.thread == L else {
            return .error("\(name) cannot be called from a coroutine created by the plugin; call it from the phase function itself")
        }
        guard lua_isyieldable(L) != 0 else {
            return .error("\(name) cannot suspend here (inside a metamethod or C call)")
        }
        scope.pending = future()
        return .yield(0)
    }

    /// Records an exit/reject and stops the plugin where it stands when it
    /// can (its own coroutine); from a plugin-made coroutine the call returns
    /// and the chain stops after the plugin returns.
    private func stopChain(_ L: LuaThread, _ scope: PluginRequest, _ exit: PluginExit) -> NativeReturn {
        if scope.exit == nil { scope.exit = exit }
        if let co = scope.coroutine, co.thread == L, lua_isyieldable(L) != 0 { return .yield(0) }
        return .values(0)
    }

    func makeNatives() -> NativeList {
        var n = NativeList()
        // The header natives' caches (see HeaderNameCache); the closures
        // live exactly as long as this state, and so as the runtime.
        let headerNames = self.headerNames
        let headerValues = self.headerValues

        // Per-request and per-connection tables.
        n.append(("ctx", requestNative("weir.ctx") { [unowned(unsafe) self] L, scope, _ in
            scope.pushCtx(on: L); self.publishCtx(scope.ctxRef); return .values(1)
        }))
        n.append(("conn_data", scopeNative("weir.conn") { L, scope in
            guard let connection = scope.connection else { lua_pushnil(L); return .values(1) }
            lua_rawgeti(L, weir_registryindex(), lua_Integer(connection.dataRef()))
            return .values(1)
        }))

        // weir.request
        n.append(("req_get_method", requestNative("weir.request.get_method") { L, _, r in LuaState.push(r.method, on: L); return .values(1) }))
        n.append(("req_get_path", requestNative("weir.request.get_path") { L, _, r in LuaState.push(r.path, on: L); return .values(1) }))
        // req_get_raw_query is a hot native (`HotNative.requestGetRawQuery`).
        n.append(("req_get_host", requestNative("weir.request.get_host") { L, _, r in pushOptional(r.host, on: L); return .values(1) }))
        n.append(("req_get_scheme", requestNative("weir.request.get_scheme") { L, _, r in LuaState.push(r.scheme, on: L); return .values(1) }))
        n.append(("req_get_id", requestNative("weir.request.get_id") { L, _, r in LuaState.push(r.requestID, on: L); return .values(1) }))
        n.append(("req_get_headers", requestNative("weir.request.get_headers") { L, _, r in
            pushHeaderTable(r.requestHeaders(), on: L); return .values(1)
        }))
        n.append(("req_get_body", requestNative("weir.request.get_body") { [unowned self] L, scope, r in
            let limit = lua_type(L, 1) == LUA_TNUMBER ? Int(lua_tointegerx(L, 1, nil)) : 1 << 20
            return self.suspend("weir.request.get_body", L, scope, r.readRequestBody(maxBytes: max(0, limit)).map { bytes in
                bytes.map { [AsyncValue.bytes($0)] } ?? [AsyncValue.value(.null)]
            })
        }))

        // weir.upstream.request and weir.upstream
        n.append(("up_get_headers", requestNative("weir.upstream.request.get_headers") { L, _, r in
            pushHeaderTable(r.upstreamRequestHeaders(), on: L); return .values(1)
        }))
        n.append(("up_get_raw_query", requestNative("weir.upstream.request.get_raw_query") { L, _, r in
            LuaState.push(r.upstreamRawQuery, on: L); return .values(1)
        }))
        n.append(("up_set_path", requestNative("weir.upstream.request.set_path") { L, _, r in
            guard let path = LuaState.string(at: 1, on: L) else { return .error("weir.upstream.request.set_path: path must be a string") }
            r.setUpstreamPath(path); return .values(0)
        }))
        n.append(("up_set_query", requestNative("weir.upstream.request.set_query") { L, _, r in
            r.setUpstreamQuery(LuaState.string(at: 1, on: L)); return .values(0)
        }))
        n.append(("up_set_method", requestNative("weir.upstream.request.set_method") { L, _, r in
            guard let method = LuaState.string(at: 1, on: L) else { return .error("weir.upstream.request.set_method: method must be a string") }
            r.setUpstreamMethod(method); return .values(0)
        }))
        n.append(("up_set_body", requestNative("weir.upstream.request.set_body") { L, _, r in
            var length = 0
            guard let p = weir_tostring(L, 1, &length) else { return .error("weir.upstream.request.set_body: body must be a string") }
            r.setUpstreamBody(Array(UnsafeRawBufferPointer(start: p, count: length))); return .values(0)
        }))
        n.append(("upstream_set_target", requestNative("weir.upstream.set_target") { L, _, r in
            guard let host = LuaState.string(at: 1, on: L), lua_isinteger(L, 2) != 0 else {
                return .error("weir.upstream.set_target: expected host and port")
            }
            lua_pushboolean(L, r.setUpstreamTarget(host: host, port: Int(lua_tointegerx(L, 2, nil))) ? 1 : 0)
            return .values(1)
        }))
        n.append(("upstream_set_upstream", requestNative("weir.upstream.set_upstream") { L, _, r in
            guard let name = LuaState.string(at: 1, on: L) else { return .error("weir.upstream.set_upstream: name must be a string") }
            lua_pushboolean(L, r.setUpstream(named: name) ? 1 : 0); return .values(1)
        }))
        n.append(("upstream_set_timeouts", requestNative("weir.upstream.set_timeouts") { L, _, r in
            r.setUpstreamTimeouts(connect: number(at: 1, on: L), send: number(at: 2, on: L), read: number(at: 3, on: L))
            return .values(0)
        }))
        n.append(("upstream_set_retries", requestNative("weir.upstream.set_retries") { L, _, r in
            guard lua_isinteger(L, 1) != 0 else { return .error("weir.upstream.set_retries: expected an integer") }
            r.setUpstreamRetries(Int(lua_tointegerx(L, 1, nil))); return .values(0)
        }))

        // weir.response
        n.append(("resp_get_status", requestNative("weir.response.get_status") { L, _, r in
            if let s = r.responseStatus { lua_pushinteger(L, lua_Integer(s)) } else { lua_pushnil(L) }
            return .values(1)
        }))
        n.append(("resp_set_status", requestNative("weir.response.set_status") { L, _, r in
            guard lua_isinteger(L, 1) != 0 else { return .error("weir.response.set_status: expected an integer") }
            r.setResponseStatus(Int(lua_tointegerx(L, 1, nil))); return .values(0)
        }))
        n.append(("resp_get_header", requestNative("weir.response.get_header") { L, _, r in
            guard let name = LuaState.headerName(at: 1, on: L) else { return .error("weir.response.get_header: name must be a string") }
            pushOptional(r.responseHeader(name), on: L); return .values(1)
        }))
        n.append(("resp_get_headers", requestNative("weir.response.get_headers") { L, _, r in
            pushHeaderTable(r.responseHeaders(), on: L); return .values(1)
        }))
        // set_header for each (name, value) pair, one crossing for several
        // (rate-limiting sets five per request). false at the first pair it
        // does not take; the pairs before it are set (set is idempotent, so
        // the Lua side's pair-by-pair retry sets them again harmlessly).
        n.append(("resp_set_headers", checkedRequestNative(PluginPhase.responseWritePhases) { L, _, r in
            let top = lua_gettop(L)
            guard top % 2 == 0 else { return badArgument(L) }
            var i: Int32 = 1
            while i < top {
                guard let name = headerNames.checkedText(at: i, on: L), let value = headerValue(at: i + 1, on: L, cache: headerValues) else {
                    return badArgument(L)
                }
                switch HeaderChange(nameFits: name.fits, valueFits: value.fits, replaces: true) {
                case .apply: r.setResponseHeader(name.text, value.text)
                case .clearOnly: r.clearResponseHeader(name.text)
                case .none: break
                }
                i += 2
            }
            return .values(0)
        }))
        // weir.response.prepare_headers(names, values): names an array of
        // strings, values an array of the same length of strings or false
        // (set per call). The id of the checked set, or nil and why not.
        n.append(("resp_prepare_headers", { [unowned(unsafe) self] L in
            var lines: [(name: String, value: String?)] = []
            let count = lua_type(L, 1) == LUA_TTABLE && lua_type(L, 2) == LUA_TTABLE ? Int(lua_rawlen(L, 1)) : -1
            var i = 1
            while i <= count {
                defer { weir_pop(L, 2); i += 1 }
                lua_rawgeti(L, 1, lua_Integer(i))
                lua_rawgeti(L, 2, lua_Integer(i))
                guard let name = LuaState.string(at: -2, on: L) else { break }
                lines.append((name, LuaState.string(at: -1, on: L)))
            }
            guard count >= 0, lines.count == count else { return .error("weir.response.prepare_headers: names must be strings") }
            switch self.preparedHeaderLines.id(of: lines) {
            case .success(let id): lua_pushinteger(L, lua_Integer(id)); return .values(1)
            case .failure(let error): lua_pushnil(L); LuaState.push(error.description, on: L); return .values(2)
            }
        }))
        n.append(("resp_clear_header", requestNative("weir.response.clear_header") { L, _, r in
            guard let name = LuaState.headerName(at: 1, on: L) else { return .error("weir.response.clear_header: name must be a string") }
            r.clearResponseHeader(name); return .values(0)
        }))
        n.append(("resp_exit", requestNative("weir.response.exit") { [unowned self] L, scope, _ in
            guard lua_isinteger(L, 1) != 0 else { return .error("weir.response.exit: status must be an integer") }
            let exit: PluginExit
            do { exit = try self.exitFromStack(statusIndex: 1, on: L) } catch { return .error("weir.response.exit: \(error)") }
            return self.stopChain(L, scope, exit)
        }))

        n.append(("resp_get_chunk", requestNative("weir.response.get_chunk") { L, scope, _ in
            scope.bodyChunk.withUnsafeBufferPointer { p in
                p.withMemoryRebound(to: CChar.self) { _ = lua_pushlstring(L, $0.baseAddress, $0.count) }
            }
            return .values(1)
        }))
        n.append(("resp_set_chunk", requestNative("weir.response.set_chunk") { L, scope, _ in
            var length = 0
            guard let p = weir_tostring(L, 1, &length) else { return .error("weir.response.set_chunk: expected a string") }
            scope.bodyChunk = Array(UnsafeRawBufferPointer(start: p, count: length))
            return .values(0)
        }))
        n.append(("resp_is_last_chunk", requestNative("weir.response.is_last_chunk") { L, scope, _ in
            lua_pushboolean(L, scope.isLastChunk ? 1 : 0); return .values(1)
        }))

        // weir.client (and the conn handle, which shares the peer accessors)
        n.append(("client_get_ip", scopeNative("weir.client.get_ip") { L, scope in
            pushOptional(scope.context?.clientIP ?? scope.connection?.context.clientIP, on: L); return .values(1)
        }))
        n.append(("client_get_port", scopeNative("weir.client.get_port") { L, scope in
            if let port = scope.context?.clientPort ?? scope.connection?.context.clientPort {
                lua_pushinteger(L, lua_Integer(port))
            } else { lua_pushnil(L) }
            return .values(1)
        }))
        // The consumer and credential names are the same strings request
        // after request (find_credential's result, a plugin's constant).
        n.append(("client_authenticate", checkedRequestNative(PluginPhase.request.mask) { [unowned(unsafe) self] L, _, r in
            guard let consumer = headerValues.name(at: 1, on: L), let credential = self.credentialName(at: 2, L) else { return badArgument(L) }
            r.authenticate(consumer: consumer, credential: credential); return .values(0)
        }))
        // client_identify is a hot native (`HotNative.clientIdentify`).
        n.append(("client_get_tls", scopeNative("weir.client.get_tls") { L, scope in
            if let tls = scope.context?.tls ?? scope.connection?.context.tls { pushTLSInfo(tls, on: L) } else { lua_pushnil(L) }
            return .values(1)
        }))
        n.append(("conn_get_sni", scopeNative("conn:get_sni") { L, scope in
            pushOptional(scope.connection?.context.serverName, on: L); return .values(1)
        }))
        n.append(("conn_get_alpn", scopeNative("conn:get_alpn") { L, scope in
            guard let offered = scope.connection?.context.offeredALPN, !offered.isEmpty else { lua_pushnil(L); return .values(1) }
            lua_createtable(L, Int32(offered.count), 0)
            for (i, proto) in offered.enumerated() {
                LuaState.push(proto, on: L)
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
            return .values(1)
        }))
        n.append(("conn_get_local_port", scopeNative("conn:get_local_port") { L, scope in
            if let port = scope.connection?.context.localPort { lua_pushinteger(L, lua_Integer(port)) } else { lua_pushnil(L) }
            return .values(1)
        }))
        n.append(("conn_get_listener", scopeNative("conn:get_listener") { L, scope in
            pushOptional(scope.connection?.context.listenerName, on: L); return .values(1)
        }))
        n.append(("conn_set_upstream", scopeNative("weir.upstream.set_upstream") { L, scope in
            guard let name = LuaState.string(at: 1, on: L) else { return .error("weir.upstream.set_upstream: name must be a string") }
            guard let connection = scope.connection, scope.context == nil else {
                return .error("weir.upstream.set_upstream: no connection phase is active")
            }
            if let problem = connection.context.chooseUpstream(named: name) {
                lua_pushnil(L); LuaState.push(problem, on: L); return .values(2)
            }
            lua_pushboolean(L, 1); return .values(1)
        }))
        n.append(("conn_reject", scopeNative("conn:reject") { [unowned self] L, scope in
            let reason = LuaState.string(at: 1, on: L) ?? "rejected by plugin"
            return self.stopChain(L, scope, PluginExit(status: 403, body: Array(reason.utf8), headers: []))
        }))

        // weir.log
        n.append(("log", { [unowned self] L in
            let level = PluginLogRecord.Level(rawValue: Int(lua_tointegerx(L, 1, nil))) ?? .info
            let message = LuaState.string(at: 2, on: L) ?? ""
            let scope = self.current
            self.options.log(PluginLogRecord(level: level, plugin: self.currentPlugin.isEmpty ? "-" : self.currentPlugin,
                                             requestID: scope?.context?.requestID ?? scope?.connection?.context.connectionID,
                                             phase: scope == nil ? nil : self.currentPhase, message: message))
            return .values(0)
        }))

        // weir.shared: the Lua side names a dictionary by the id from
        // shared_id (a name works too), so no name is bridged per call.
        let shared = options.shared
        func dictionary(_ L: LuaThread) -> SharedDictionaries.Dictionary? {
            if lua_isinteger(L, 1) != 0 { return shared.dictionary(id: Int(lua_tointegerx(L, 1, nil))) }
            return LuaState.string(at: 1, on: L).flatMap(shared.id(of:)).flatMap(shared.dictionary(id:))
        }
        n.append(("shared_id", { L in
            if let name = LuaState.string(at: 1, on: L), let id = shared.id(of: name) {
                lua_pushinteger(L, lua_Integer(id))
            } else {
                lua_pushnil(L)
            }
            return .values(1)
        }))
        let keyHashes = sharedKeyHashes
        n.append(("shared_get", { L in
            guard let key = LuaState.bytes(at: 2, on: L) else { return badArgument(L) }
            guard let target = dictionary(L) else { lua_pushnil(L); return .values(1) }
            pushShared(target.get(key, hash: keyHashes.hash(of: key, at: 2, on: L), now: shared.now()), on: L); return .values(1)
        }))
        n.append(("shared_set", { L in
            guard let key = LuaState.bytes(at: 2, on: L),
                  let value = sharedValue(at: 3, on: L) else { return .error("weir.shared.set: expected key and value") }
            _ = dictionary(L)?.set(key, value, ttl: number(at: 4, on: L) ?? 0, now: shared.now(), onlyIfAbsent: false)
            lua_pushboolean(L, 1); return .values(1)
        }))
        n.append(("shared_add", { L in
            guard let key = LuaState.bytes(at: 2, on: L),
                  let value = sharedValue(at: 3, on: L) else { return .error("weir.shared.add: expected key and value") }
            if dictionary(L)?.set(key, value, ttl: number(at: 4, on: L) ?? 0, now: shared.now(), onlyIfAbsent: true) == true {
                lua_pushboolean(L, 1); return .values(1)
            }
            lua_pushnil(L); LuaState.push("exists", on: L); return .values(2)
        }))
        // N.shared_incr(id or name, ...): dict:incr's and incr_get's
        // fallbacks (an unknown dictionary: nil, "not found"). dict:incr and
        // dict:incr_get themselves are hot natives (`sharedDictIncr`).
        n.append(("shared_incr", { [unowned(unsafe) self] L in
            NativeReturn(code: self.sharedIncrement(L, dictionary(L), readsOther: true))
        }))
        n.append(("shared_delete", { L in
            guard let key = LuaState.bytes(at: 2, on: L) else { return .error("weir.shared.delete: expected a key") }
            dictionary(L)?.delete(key); return .values(0)
        }))

        // weir.sleep: the reference async operation.
        n.append(("sleep", scopeNative("weir.sleep") { [unowned self] L, scope in
            let seconds = max(0, number(at: 1, on: L) ?? 0)
            let loop = self.eventLoop!
            return self.suspend("weir.sleep", L, scope,
                                loop.scheduleTask(in: .nanoseconds(Int64(seconds * 1e9))) { [AsyncValue]() }.futureResult)
        }))
        // weir.http.request(url, method, flat_headers, body, timeout, max_body, ssl_verify, ca_file, keepalive)
        n.append(("http_request", scopeNative("weir.http.request") { [unowned(unsafe) self] L, scope in
            guard let url = LuaState.string(at: 1, on: L) else { return .error("weir.http.request: url must be a string") }
            guard let parsed = OutboundHTTP.parse(url) else {
                lua_pushnil(L); LuaState.push("invalid url (expected http[s]://host[:port]/path): \(url)", on: L)
                return .values(2)
            }
            var request = OutboundRequest(host: parsed.host, port: parsed.port, target: parsed.target)
            if parsed.secure {
                request.tls = OutboundTLSSettings(verify: lua_type(L, 7) != LUA_TBOOLEAN || lua_toboolean(L, 7) != 0,
                                                  caFile: LuaState.string(at: 8, on: L))
            }
            if lua_type(L, 9) == LUA_TBOOLEAN { request.keepAlive = lua_toboolean(L, 9) != 0 }
            request.method = LuaState.string(at: 2, on: L) ?? "GET"
            if lua_type(L, 3) == LUA_TTABLE {
                let n = Int(lua_rawlen(L, 3))
                var k = 1
                while k + 1 <= n {
                    lua_rawgeti(L, 3, lua_Integer(k)); lua_rawgeti(L, 3, lua_Integer(k + 1))
                    if let name = LuaState.stringOrNumber(at: -2, on: L), let value = LuaState.stringOrNumber(at: -1, on: L) {
                        request.headers.append((name, value))
                    }
                    weir_pop(L, 2)
                    k += 2
                }
            }
            var length = 0
            if let p = weir_tostring(L, 4, &length) { request.body = Array(UnsafeRawBufferPointer(start: p, count: length)) }
            if let t = number(at: 5, on: L), t > 0 { request.timeout = .nanoseconds(Int64(t * 1e9)) }
            if let m = number(at: 6, on: L), m >= 0 { request.maxBodyBytes = Int(m) }
            return self.suspend("weir.http.request", L, scope, self.performOutbound(request)
                .map { [AsyncValue.httpResponse($0)] }
                .recover { [AsyncValue.value(.null), AsyncValue.value(.string("weir.http.request: \($0)"))] })
        }))

        // weir.timer.at / every
        n.append(("timer_start", { [unowned(unsafe) self] L in
            guard self.eventLoop != nil else { return .error("weir.timer: timers need an event loop (not available while loading)") }
            guard let seconds = number(at: 1, on: L), seconds >= 0, lua_type(L, 2) == LUA_TFUNCTION else {
                return .error("weir.timer: expected a delay and a function")
            }
            lua_pushvalue(L, 2)
            let ref = luaL_ref(L, weir_registryindex())
            self.startTimer(ref: ref, seconds: seconds, repeats: lua_toboolean(L, 3) != 0)
            lua_pushboolean(L, 1)
            return .values(1)
        }))
        n.append(contentsOf: makeRedisNatives())
        n.append(contentsOf: makeConsumerNatives())
        n.append(contentsOf: makeAccessRecordNatives())
        n.append(contentsOf: makeRegexNatives())
        n.append(contentsOf: makeMetricsNatives())
        n.append(contentsOf: makeCryptoNatives())
        return n
    }
}
