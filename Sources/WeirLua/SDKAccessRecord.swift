import CLua
import CLuaShims
#if canImport(Glibc)
import Glibc
#endif

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

extension PluginAccessRecord {
    /// The record as one JSON object (`weir.log.serialize_json()`): the keys
    /// of `weir.log.serialize()` plus `time` (ISO 8601 UTC, milliseconds), in
    /// a fixed order, absent values left out. Built in Swift because
    /// exporters (http-log) send one per request and encoding in Lua under
    /// the instruction-budget hook costs ~100x more.
    func json(requestID: String, consumer: String?) -> String {
        var out = JSONObjectWriter()
        out.string("time", Self.iso8601(startTime))
        out.number("started_at", startTime)
        out.string("request_id", requestID)
        out.string("listener", listener)
        out.string("client", clientAddress)
        out.string("method", method)
        out.string("path", path)
        out.string("route", route)
        out.string("upstream", upstream)
        out.string("upstream_target", upstreamTarget)
        out.integer("status", status)
        out.integer("bytes_in", bytesIn)
        out.integer("bytes_out", bytesOut)
        out.number("duration_ms", totalDuration * 1000)
        out.number("upstream_duration_ms", upstreamDuration.map { $0 * 1000 })
        out.integer("attempts", attempts)
        out.string("consumer", consumer)
        return out.finish()
    }

    static func iso8601(_ seconds: Double) -> String {
        var whole = time_t(seconds.rounded(.down))
        var parts = tm()
        gmtime_r(&whole, &parts)
        let millis = Int((seconds - seconds.rounded(.down)) * 1000)
        func pad(_ v: Int, _ width: Int) -> String {
            let s = String(v)
            return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
        }
        return "\(pad(Int(parts.tm_year) + 1900, 4))-\(pad(Int(parts.tm_mon) + 1, 2))-\(pad(Int(parts.tm_mday), 2))T"
            + "\(pad(Int(parts.tm_hour), 2)):\(pad(Int(parts.tm_min), 2)):\(pad(Int(parts.tm_sec), 2)).\(pad(min(millis, 999), 3))Z"
    }
}

/// Appends `"key":value` pairs to a JSON object; nil values are skipped.
struct JSONObjectWriter {
    private var bytes: [UInt8] = [UInt8(ascii: "{")]

    private mutating func key(_ name: String) {
        if bytes.count > 1 { bytes.append(UInt8(ascii: ",")) }
        quoted(name)
        bytes.append(UInt8(ascii: ":"))
    }

    private mutating func quoted(_ text: String) {
        bytes.append(UInt8(ascii: "\""))
        for b in text.utf8 {
            switch b {
            case UInt8(ascii: "\""): bytes.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
            case UInt8(ascii: "\\"): bytes.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes.append(contentsOf: Array("\\u00".utf8))
                bytes.append(hex[Int(b >> 4)]); bytes.append(hex[Int(b & 0xf)])
            default: bytes.append(b)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }

    mutating func string(_ name: String, _ value: String?) {
        guard let value else { return }
        key(name); quoted(value)
    }

    mutating func integer(_ name: String, _ value: Int) {
        key(name); bytes.append(contentsOf: Array(String(value).utf8))
    }

    /// Finite doubles only (durations, timestamps); others are skipped.
    mutating func number(_ name: String, _ value: Double?) {
        guard let value, value.isFinite else { return }
        key(name); bytes.append(contentsOf: Array("\(value)".utf8))
    }

    mutating func finish() -> String {
        bytes.append(UInt8(ascii: "}"))
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension LuaRuntime {
    /// `weir.metrics.count(event, n)`: adds to the current plugin's counter
    /// `event` (on /metrics as weir_plugin_events_total{plugin, event}).
    func makeMetricsNatives() -> NativeList {
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
    func makeAccessRecordNatives() -> NativeList {
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
        }), ("log_serialize_json", scopeNative("weir.log.serialize_json") { L, scope in
            guard let request = scope.context, let r = request.accessRecord() else {
                lua_pushnil(L); return .values(1)
            }
            LuaState.push(r.json(requestID: request.requestID, consumer: request.consumer), on: L)
            return .values(1)
        })]
    }
}
