import Atomics
import NIOConcurrencyHelpers
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// One finished tcp/tls connection, as the access log sees it.
public struct StreamRecord: Sendable {
    /// How the connection ended. Strings, as they appear in the access log
    /// and in `weir_stream_connections_total{outcome=...}`.
    public enum Outcome: String, Sendable, CaseIterable {
        /// Relayed until one side closed (FIN or RST after the relay began).
        case closed
        case idleTimeout = "idle_timeout"
        /// A connection-phase plugin rejected it.
        case rejected
        case pluginFailed = "plugin_failed"
        /// No upstream applies (no SNI route, no `upstream`, no plugin choice).
        case noUpstream = "no_upstream"
        /// Every target is ejected by health checks.
        case noTarget = "no_target"
        case connectFailed = "connect_failed"
        case badClientHello = "bad_client_hello"
        case clientHelloTimeout = "client_hello_timeout"
        /// The client went away before the relay began.
        case clientClosed = "client_closed"
        /// The listener's `max_connections` was reached.
        case overLimit = "over_limit"
        /// Closed by a drain (shutdown) or a socket error.
        case aborted
    }

    /// Wall-clock accept time, seconds since 1970.
    public var startTime: Double
    public var connectionID: String
    public var listener: String
    /// "tcp" or "tls".
    public var protocolName: String
    public var clientAddress: String
    /// tls listeners: the ClientHello's server name.
    public var serverName: String?
    public var alpn: [String]
    public var upstream: String?
    public var upstreamTarget: String?
    public var outcome: Outcome
    /// Client -> upstream bytes.
    public var bytesIn: Int
    /// Upstream -> client bytes.
    public var bytesOut: Int
    /// Seconds from accept to the last side closing.
    public var duration: Double
    /// Seconds from the first connect attempt to the upstream accepting.
    public var connectDuration: Double?
    public var attempts: Int
}

/// Live counters of one (listener, upstream) pair: looked up once per
/// connection, then bumped with relaxed atomics on every read, so /metrics
/// shows bytes of long-lived connections while they flow.
public final class StreamCounters: Sendable {
    let bytesIn = ManagedAtomic<Int>(0)
    let bytesOut = ManagedAtomic<Int>(0)
    let active = ManagedAtomic<Int>(0)
    /// Indexed like `StreamRecord.Outcome.allCases`.
    let outcomes: [ManagedAtomic<Int>] = StreamRecord.Outcome.allCases.map { _ in ManagedAtomic<Int>(0) }

    func ended(_ outcome: StreamRecord.Outcome) {
        let index = StreamRecord.Outcome.allCases.firstIndex(of: outcome)!
        outcomes[index].wrappingIncrement(ordering: .relaxed)
    }
}

public struct StreamCounterKey: Hashable, Sendable {
    public var listener: String
    /// Empty when the connection ended before an upstream was chosen.
    public var upstream: String
}

/// A scrape-time copy of one `StreamCounters`.
public struct StreamCounterValues: Sendable {
    public var bytesIn: Int
    public var bytesOut: Int
    public var active: Int
    public var outcomes: [StreamRecord.Outcome: Int]
}

/// The registry's L4 part: counters by (listener, upstream).
final class StreamCounterTable: @unchecked Sendable {
    private let lock = NIOLock()
    private var counters: [StreamCounterKey: StreamCounters] = [:]

    func counters(listener: String, upstream: String?) -> StreamCounters {
        let key = StreamCounterKey(listener: listener, upstream: upstream ?? "")
        return lock.withLock {
            if let existing = counters[key] { return existing }
            let created = StreamCounters()
            counters[key] = created
            return created
        }
    }

    func snapshot() -> [StreamCounterKey: StreamCounterValues] {
        let all = lock.withLock { counters }
        return all.mapValues { c in
            var outcomes: [StreamRecord.Outcome: Int] = [:]
            for (i, outcome) in StreamRecord.Outcome.allCases.enumerated() {
                let n = c.outcomes[i].load(ordering: .relaxed)
                if n > 0 { outcomes[outcome] = n }
            }
            return StreamCounterValues(bytesIn: c.bytesIn.load(ordering: .relaxed), bytesOut: c.bytesOut.load(ordering: .relaxed),
                                       active: c.active.load(ordering: .relaxed), outcomes: outcomes)
        }
    }
}

extension MetricsSnapshot {
    func renderStreams(into out: inout PrometheusWriter) {
        guard !streams.isEmpty else { return }
        let sorted = streams.sorted { ($0.key.listener, $0.key.upstream) < ($1.key.listener, $1.key.upstream) }
        func labels(_ key: StreamCounterKey) -> [(String, String)] { [("listener", key.listener), ("upstream", key.upstream)] }
        out.header("weir_stream_connections_total", "tcp/tls listener connections ended, by listener, upstream and outcome.", "counter")
        for (key, value) in sorted {
            for outcome in StreamRecord.Outcome.allCases {
                guard let n = value.outcomes[outcome] else { continue }
                out.sample("weir_stream_connections_total", labels(key) + [("outcome", outcome.rawValue)], n)
            }
        }
        out.header("weir_stream_active_connections", "tcp/tls connections being relayed, by listener and upstream.", "gauge")
        for (key, value) in sorted where !key.upstream.isEmpty {
            out.sample("weir_stream_active_connections", labels(key), value.active)
        }
        out.header("weir_stream_received_bytes_total", "Bytes received from clients and relayed upstream (tcp/tls listeners).", "counter")
        for (key, value) in sorted where !key.upstream.isEmpty {
            out.sample("weir_stream_received_bytes_total", labels(key), value.bytesIn)
        }
        out.header("weir_stream_sent_bytes_total", "Bytes received from upstreams and relayed to clients (tcp/tls listeners).", "counter")
        for (key, value) in sorted where !key.upstream.isEmpty {
            out.sample("weir_stream_sent_bytes_total", labels(key), value.bytesOut)
        }
    }
}

/// The access-log line of a tcp/tls connection. Same file as the HTTP
/// lines; told apart by `"protocol":"tcp"|"tls"` (HTTP lines have
/// `method`). Field names are a contract: add, never rename. Built once
/// per connection, so plain String building is fine here.
enum StreamLogFormatter {
    static func jsonLine(_ r: StreamRecord) -> String {
        var buffer = ByteBufferAllocator().buffer(capacity: 512)
        buffer.writeString(#"{"time":""#)
        buffer.writeString(isoTime(r.startTime))
        buffer.writeString(#"","connection_id":"#); json(r.connectionID, &buffer)
        buffer.writeString(#","listener":"#); json(r.listener, &buffer)
        buffer.writeString(#","protocol":"#); json(r.protocolName, &buffer)
        buffer.writeString(#","client":"#); json(r.clientAddress, &buffer)
        buffer.writeString(#","sni":"#); json(r.serverName, &buffer)
        buffer.writeString(#","alpn":["#)
        for (i, proto) in r.alpn.enumerated() {
            if i > 0 { buffer.writeString(",") }
            json(proto, &buffer)
        }
        buffer.writeString(#"],"upstream":"#); json(r.upstream, &buffer)
        buffer.writeString(#","upstream_target":"#); json(r.upstreamTarget, &buffer)
        buffer.writeString(#","outcome":"#); json(r.outcome.rawValue, &buffer)
        buffer.writeString(#","bytes_in":\#(r.bytesIn),"bytes_out":\#(r.bytesOut)"#)
        buffer.writeString(#","duration_ms":\#(milliseconds(r.duration))"#)
        buffer.writeString(#","connect_ms":"#)
        buffer.writeString(r.connectDuration.map(milliseconds) ?? "null")
        buffer.writeString(#","attempts":\#(r.attempts)}"#)
        buffer.writeString("\n")
        return String(buffer: buffer)
    }

    private static func json(_ s: String?, _ buffer: inout ByteBuffer) {
        guard let s else { buffer.writeString("null"); return }
        ProxyErrorResponse.writeJSONString(s, into: &buffer)
    }

    private static func milliseconds(_ seconds: Double) -> String {
        let ms = (seconds * 1000 * 1000).rounded() / 1000
        return "\(ms)"
    }

    private static func isoTime(_ secondsSince1970: Double) -> String {
        let whole = secondsSince1970.rounded(.down)
        var t = time_t(whole)
        var parts = tm()
        gmtime_r(&t, &parts)
        func pad(_ v: Int32, _ width: Int) -> String {
            let text = String(v)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        let millis = min(max(Int32((secondsSince1970 - whole) * 1000), 0), 999)
        return "\(parts.tm_year + 1900)-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(millis, 3))Z"
    }
}
