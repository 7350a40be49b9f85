import CLua
import CLuaShims

/// What the log phase knows about a finished request: the fields of the JSON
/// access log, plus the consumer. `weir.log.serialize()` returns it as a
/// table (http-log ships it, tracing builds its span from it).
public struct PluginAccessRecord: Sendable {
    /// Wall-clock start, seconds since 1970.
    public var startTime: Double
    public var listener: String
    public var clientAddress: String
    public var method: String
    public var path: String
    public var route: String?
    public var upstream: String?
    /// "host:port" of the target the final attempt went to.
    public var upstreamTarget: String?
    public var status: Int
    public var bytesIn: Int
    public var bytesOut: Int
    /// Seconds from the first request byte to the end of the response.
    public var totalDuration: Double
    /// Seconds from the upstream connect to the end of the response, if any.
    public var upstreamDuration: Double?
    public var attempts: Int

    public init(startTime: Double, listener: String, clientAddress: String, method: String, path: String,
                route: String?, upstream: String?, upstreamTarget: String?, status: Int, bytesIn: Int,
                bytesOut: Int, totalDuration: Double, upstreamDuration: Double?, attempts: Int) {
        self.startTime = startTime; self.listener = listener; self.clientAddress = clientAddress
        self.method = method; self.path = path; self.route = route; self.upstream = upstream
        self.upstreamTarget = upstreamTarget; self.status = status; self.bytesIn = bytesIn
        self.bytesOut = bytesOut; self.totalDuration = totalDuration
        self.upstreamDuration = upstreamDuration; self.attempts = attempts
    }
}

extension LuaRuntime {
    /// `weir.metrics.count(event, n)`: adds to the current plugin's counter
    /// `event` (on /metrics as weir_plugin_events_total{plugin, event}).
    func makeMetricsNatives() -> [(String, NativeFunction)] {
        [("metrics_count", { [unowned self] L in
            guard let event = LuaState.string(at: 1, on: L) else {
                return .error("weir.metrics.count: event must be a string")
            }
            let n = lua_isinteger(L, 2) != 0 ? Int(lua_tointegerx(L, 2, nil)) : 1
            self.options.observer?.pluginEventCounted(plugin: self.currentPlugin.isEmpty ? "-" : self.currentPlugin,
                                                      event: event, count: n)
            return .values(0)
        })]
    }

    /// `weir.log.serialize()` (log phase): the request's access record as a
    /// table, built only when a plugin asks. nil when the proxy keeps no record
    /// (contexts outside the data path).
    func makeAccessRecordNatives() -> [(String, NativeFunction)] {
        [("log_serialize", scopeNative("weir.log.serialize") { L, scope in
            guard let request = scope.context, let r = request.accessRecord() else {
                lua_pushnil(L); return .values(1)
            }
            lua_createtable(L, 0, 17)
            // Raw sets on a fresh table: no metamethod can run (bridging rules).
            func set(_ key: String, _ value: String?) {
                guard let value else { return }
                LuaState.push(key, on: L); LuaState.push(value, on: L); lua_rawset(L, -3)
            }
            func set(_ key: String, _ value: Int) {
                LuaState.push(key, on: L); lua_pushinteger(L, lua_Integer(value)); lua_rawset(L, -3)
            }
            func set(_ key: String, _ value: Double?) {
                guard let value else { return }
                LuaState.push(key, on: L); lua_pushnumber(L, value); lua_rawset(L, -3)
            }
            set("started_at", r.startTime)
            set("request_id", request.requestID)
            set("listener", r.listener)
            set("client", r.clientAddress)
            set("method", r.method)
            set("path", r.path)
            set("route", r.route)
            set("upstream", r.upstream)
            set("upstream_target", r.upstreamTarget)
            set("status", r.status)
            set("bytes_in", r.bytesIn)
            set("bytes_out", r.bytesOut)
            set("duration_ms", r.totalDuration * 1000)
            set("upstream_duration_ms", r.upstreamDuration.map { $0 * 1000 })
            set("attempts", r.attempts)
            set("consumer", request.consumer)
            return .values(1)
        })]
    }
}
