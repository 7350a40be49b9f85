import Atomics
import NIOConcurrencyHelpers

/// The gateway's metrics: request counts, latency histograms, connection
/// gauges and upstream health, rendered as Prometheus text (format 0.0.4).
///
/// Why hand-written instead of swift-metrics + swift-prometheus: every
/// request is recorded on an event loop, and those libraries resolve a
/// metric object per label set through a shared lock-protected factory (or
/// need us to cache handles per label set ourselves) and then update atomics
/// shared by all loops. Here each event loop has its own shard, the data
/// path keeps a `RequestCounter` per loop and route (the (route, upstream)
/// cell found once; samples from other callers find it per record), and
/// the scrape merges the shards. The text format is small and fully covered by
/// tests (`AdminMetricsTests`).
///
/// Measured cost (release, one thread, 2M records, on the shared 2-core dev
/// machine under load): ~0.12-0.2 µs per `recordRequest`; with the access
/// log on as well, ~0.4 µs per request in total.
public final class MetricsRegistry: @unchecked Sendable {
    /// Histogram upper bounds in seconds: 0.5 ms .. 10 s.
    public static let latencyBuckets: [Double] = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    ]

    /// One target's health, as reported at scrape time.
    public struct TargetHealth: Sendable {
        public var upstream: String
        public var target: String
        public var healthy: Bool
        public init(upstream: String, target: String, healthy: Bool) {
            self.upstream = upstream; self.target = target; self.healthy = healthy
        }
    }

    private let shards = PerThreadShards<MetricsShard> { MetricsShard() }
    private let healthLock = NIOLock()
    private var healthSource: (@Sendable () -> [TargetHealth])?
    private let extraLock = NIOLock()
    private var extraCounters: [(name: String, help: String, read: @Sendable () -> Int)] = []
    private let streams = StreamCounterTable()

    public init() {}

    /// tcp/tls listeners: the live counters of (listener, upstream); look
    /// up once per connection (L4/StreamObservability.swift).
    public func streamCounters(listener: String, upstream: String?) -> StreamCounters {
        streams.counters(listener: listener, upstream: upstream)
    }

    // MARK: recording (event loops; cheap)

    public func recordRequest(_ record: AccessRecord) {
        recordRequest(RequestSample(route: record.route, upstream: record.upstream, status: record.status,
                                    bytesIn: record.bytesIn, bytesOut: record.bytesOut,
                                    totalDuration: record.totalDuration, upstreamDuration: record.upstreamDuration))
    }

    public func recordRequest(_ sample: RequestSample) {
        let shard = shards.current
        // lock()/unlock() rather than withLock: a closure would copy the sample.
        shard.lock.lock()
        let cell = shard.cells[shard.cellIndex(route: sample.route, upstream: sample.upstream)]
        shard.lock.unlock()
        // This thread is the cell's only writer: no lock for the counts.
        cell.add(status: sample.status, bytesIn: sample.bytesIn, bytesOut: sample.bytesOut,
                 totalDuration: sample.totalDuration, upstreamDuration: sample.upstreamDuration)
    }

    /// The calling thread's cell for (route, upstream), for a caller that
    /// records that pair's requests on this thread many times: an event
    /// loop keeps one per route (`LoopRouting.requestCounter`), so a request
    /// costs no thread-local lookup, name comparison or sample copy.
    public func requestCounter(route: String?, upstream: String?) -> RequestCounter {
        let shard = shards.current
        let cell = shard.lock.withLock { shard.cells[shard.cellIndex(route: route, upstream: upstream)] }
        return RequestCounter(cell: cell)
    }

    public func connectionOpened(listener: String) {
        let shard = shards.current
        shard.lock.withLock { shard.connections[listener, default: ConnectionCell()].opened += 1 }
    }

    public func connectionClosed(listener: String) {
        let shard = shards.current
        shard.lock.withLock { shard.connections[listener, default: ConnectionCell()].closed += 1 }
    }

    // MARK: sources read at scrape time

    /// Where upstream target health comes from (e.g. the proxy's
    /// `UpstreamHealth` objects). Called once per scrape.
    public func setHealthSource(_ source: @escaping @Sendable () -> [TargetHealth]) {
        healthLock.withLock { healthSource = source }
    }

    /// A counter owned elsewhere (e.g. dropped access-log lines), read at scrape time.
    public func addExternalCounter(name: String, help: String, read: @escaping @Sendable () -> Int) {
        extraLock.withLock { extraCounters.append((name, help, read)) }
    }

    // MARK: scrape

    /// A consistent-enough snapshot: each shard is read under its own lock.
    public func snapshot() -> MetricsSnapshot {
        var requests: [RouteUpstreamKey: RequestCell] = [:]
        var connections: [String: ConnectionCell] = [:]
        for shard in shards.allShards {
            shard.lock.withLock {
                for (i, key) in shard.keys.enumerated() { requests[key, default: RequestCell()].merge(shard.cells[i].read()) }
                for (key, cell) in shard.connections {
                    connections[key, default: ConnectionCell()].opened += cell.opened
                    connections[key, default: ConnectionCell()].closed += cell.closed
                }
            }
        }
        let health = healthLock.withLock { healthSource }?() ?? []
        let extras = extraLock.withLock { extraCounters }.map { (name: $0.name, help: $0.help, value: $0.read()) }
        return MetricsSnapshot(requests: requests, connections: connections, health: health, externalCounters: extras,
                               streams: streams.snapshot())
    }

    /// Prometheus text exposition format 0.0.4.
    public func renderPrometheus() -> String {
        snapshot().renderPrometheus()
    }
}

public struct RouteUpstreamKey: Hashable, Sendable {
    public var route: String
    public var upstream: String
}

/// A latency histogram with the registry's fixed buckets. `counts[i]` is the
/// number of observations in (bound[i-1], bound[i]]; the last slot is +Inf.
public struct LatencyHistogram: Sendable {
    public var counts = [Int](repeating: 0, count: MetricsRegistry.latencyBuckets.count + 1)
    public var sum: Double = 0
    public var count: Int = 0

    /// The slot of `counts` an observation of `seconds` falls in.
    @inline(__always)
    static func bucket(of seconds: Double) -> Int {
        let bounds = MetricsRegistry.latencyBuckets
        for i in 0..<bounds.count where seconds <= bounds[i] { return i }
        return bounds.count
    }

    @inline(__always)
    mutating func observe(_ seconds: Double) {
        counts[Self.bucket(of: seconds)] += 1
        sum += seconds
        count += 1
    }

    mutating func merge(_ other: LatencyHistogram) {
        for i in 0..<counts.count { counts[i] += other.counts[i] }
        sum += other.sum
        count += other.count
    }
}

/// Everything recorded for one (route, upstream) pair, as a scrape reads
/// it (the live counts are `RequestCellCounters`).
public struct RequestCell: Sendable {
    /// Requests by status class: index 0 = 1xx ... 4 = 5xx.
    public var byStatusClass = [Int](repeating: 0, count: 5)
    public var bytesIn = 0
    public var bytesOut = 0
    public var total = LatencyHistogram()
    public var upstream = LatencyHistogram()

    mutating func merge(_ other: RequestCell) {
        for i in 0..<5 { byStatusClass[i] += other.byStatusClass[i] }
        bytesIn += other.bytesIn
        bytesOut += other.bytesOut
        total.merge(other.total)
        upstream.merge(other.upstream)
    }
}

public struct ConnectionCell: Sendable {
    public var opened = 0
    public var closed = 0
}

/// One (route, upstream) cell in one thread's shard, found once
/// (`MetricsRegistry.requestCounter`) and used on that thread only.
public final class RequestCounter: @unchecked Sendable {
    /// Keeps `slots` allocated (the shard keeps the cell too).
    private let cell: RequestCellCounters
    /// `cell.slots`, held here so a record reads no field of the cell
    /// object (and retains nothing) before writing.
    private let slots: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>

    init(cell: RequestCellCounters) {
        self.cell = cell
        self.slots = cell.slots
    }

    public func add(status: Int, bytesIn: Int, bytesOut: Int, totalDuration: Double, upstreamDuration: Double?) {
        RequestCellCounters.record(into: slots, status: status, bytesIn: bytesIn, bytesOut: bytesOut,
                                totalDuration: totalDuration, upstreamDuration: upstreamDuration)
    }
}

/// The live counts of one (route, upstream) cell of one thread's shard:
/// fixed slots in one allocation that lives as long as the shard.
///
/// Why no lock: a cell is written only by its shard's thread (an event
/// loop), so each count is a plain load and store on that thread: no
/// lock, no read-modify-write instruction. The stores are atomic
/// (releasing; a plain `mov` on x86 and arm64) so a scrape on another
/// thread reads whole values, never torn ones; it reads each slot
/// acquiring (`read()`). A scrape can see one request's status count
/// and not yet its bytes: each value is exact, their sum across slots is
/// "consistent enough", as with the per-shard lock before (each counted
/// request shows in full by the next scrape). The request path costs
/// ~100 instructions less than locking the shard (BENCHMARKS.md core5).
final class RequestCellCounters {
    /// Slot layout: counts by status class, bytes in and out, then the
    /// two histograms (bucket counts, sum as Double bits, count).
    private static let statusClasses = 0
    private static let bytesInSlot = 5
    private static let bytesOutSlot = 6
    private static let bucketCount = MetricsRegistry.latencyBuckets.count + 1
    private static let totalHistogram = 7
    private static let upstreamHistogram = totalHistogram + bucketCount + 2
    private static let slotCount = upstreamHistogram + bucketCount + 2

    let slots: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>

    init() {
        slots = .allocate(capacity: Self.slotCount)
        slots.initialize(repeating: UnsafeAtomic<UInt64>.Storage(0), count: Self.slotCount)
    }

    deinit {
        slots.deinitialize(count: Self.slotCount)
        slots.deallocate()
    }

    /// The owning thread only.
    @inline(__always)
    private static func bump(_ slots: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>, _ slot: Int, by n: UInt64) {
        let value = UnsafeAtomic<UInt64>(at: slots + slot)
        value.store(value.load(ordering: .relaxed) &+ n, ordering: .releasing)
    }

    @inline(__always)
    private static func observe(_ slots: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>, histogram base: Int,
                                _ seconds: Double) {
        bump(slots, base + LatencyHistogram.bucket(of: seconds), by: 1)
        let sum = UnsafeAtomic<UInt64>(at: slots + base + bucketCount)
        let total = Double(bitPattern: sum.load(ordering: .relaxed)) + seconds
        sum.store(total.bitPattern, ordering: .releasing)
        bump(slots, base + bucketCount + 1, by: 1)
    }

    /// One finished request; the cell's own thread only.
    @inline(__always)
    static func record(into slots: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>, status: Int, bytesIn: Int,
                    bytesOut: Int, totalDuration: Double, upstreamDuration: Double?) {
        let classIndex = min(max(status / 100, 1), 5) - 1
        bump(slots, statusClasses + classIndex, by: 1)
        bump(slots, bytesInSlot, by: UInt64(truncatingIfNeeded: bytesIn))
        bump(slots, bytesOutSlot, by: UInt64(truncatingIfNeeded: bytesOut))
        observe(slots, histogram: totalHistogram, totalDuration)
        if let upstreamDuration { observe(slots, histogram: upstreamHistogram, upstreamDuration) }
    }

    func add(status: Int, bytesIn: Int, bytesOut: Int, totalDuration: Double, upstreamDuration: Double?) {
        Self.record(into: slots, status: status, bytesIn: bytesIn, bytesOut: bytesOut,
                 totalDuration: totalDuration, upstreamDuration: upstreamDuration)
    }

    /// The counts so far, from any thread.
    func read() -> RequestCell {
        func slot(_ i: Int) -> UInt64 { UnsafeAtomic<UInt64>(at: slots + i).load(ordering: .acquiring) }
        func histogram(_ base: Int) -> LatencyHistogram {
            var h = LatencyHistogram()
            for i in 0..<Self.bucketCount { h.counts[i] = Int(truncatingIfNeeded: slot(base + i)) }
            h.sum = Double(bitPattern: slot(base + Self.bucketCount))
            h.count = Int(truncatingIfNeeded: slot(base + Self.bucketCount + 1))
            return h
        }
        var cell = RequestCell()
        for i in 0..<5 { cell.byStatusClass[i] = Int(truncatingIfNeeded: slot(Self.statusClasses + i)) }
        cell.bytesIn = Int(truncatingIfNeeded: slot(Self.bytesInSlot))
        cell.bytesOut = Int(truncatingIfNeeded: slot(Self.bytesOutSlot))
        cell.total = histogram(Self.totalHistogram)
        cell.upstream = histogram(Self.upstreamHistogram)
        return cell
    }
}

final class MetricsShard {
    let lock = NIOLock()
    // Cells in an array with a key index, so the common case (the same
    // route as the previous request, whose name Strings share storage and
    // compare by pointer) skips hashing altogether.
    var keys: [RouteUpstreamKey] = []
    /// Appended under `lock`; each cell's counts are written without it
    /// by this shard's thread (`RequestCellCounters`).
    var cells: [RequestCellCounters] = []
    var index: [RouteUpstreamKey: Int] = [:]
    // The previous request's names, compared in place (a String whose
    // storage is shared compares by pointer): the common case builds no
    // key, so no String is retained or released per request.
    var lastRoute: String? = "\u{0}"
    var lastUpstream: String? = "\u{0}"
    var lastIndex = 0
    var connections: [String: ConnectionCell] = [:]

    /// Call with `lock` held. A nil name is keyed as "".
    @inline(__always)
    func cellIndex(route: String?, upstream: String?) -> Int {
        if route == lastRoute && upstream == lastUpstream { return lastIndex }
        let key = RouteUpstreamKey(route: route ?? "", upstream: upstream ?? "")
        let i: Int
        if let existing = index[key] {
            i = existing
        } else {
            i = cells.count
            keys.append(key)
            cells.append(RequestCellCounters())
            index[key] = i
        }
        lastRoute = route
        lastUpstream = upstream
        lastIndex = i
        return i
    }
}

/// The merged view a scrape renders.
public struct MetricsSnapshot: Sendable {
    public var requests: [RouteUpstreamKey: RequestCell]
    public var connections: [String: ConnectionCell]
    public var health: [MetricsRegistry.TargetHealth]
    public var externalCounters: [(name: String, help: String, value: Int)]
    /// tcp/tls listeners, by (listener, upstream).
    public var streams: [StreamCounterKey: StreamCounterValues] = [:]

    /// Total requests counted for a route (all upstreams and statuses).
    public func requestCount(route: String) -> Int {
        requests.filter { $0.key.route == route }.reduce(0) { $0 + $1.value.byStatusClass.reduce(0, +) }
    }

    public func renderPrometheus() -> String {
        var out = PrometheusWriter()
        let sortedRequests = requests.sorted { ($0.key.route, $0.key.upstream) < ($1.key.route, $1.key.upstream) }
        let classNames = ["1xx", "2xx", "3xx", "4xx", "5xx"]

        out.header("weir_requests_total", "Requests completed, by route, upstream and status class.", "counter")
        for (key, cell) in sortedRequests {
            for (i, n) in cell.byStatusClass.enumerated() where n > 0 {
                out.sample("weir_requests_total",
                           [("route", key.route), ("upstream", key.upstream), ("status_class", classNames[i])], n)
            }
        }

        out.header("weir_request_bytes_total", "Request body bytes received from clients, by route.", "counter")
        for (route, cells) in group(sortedRequests, by: \.route) {
            out.sample("weir_request_bytes_total", [("route", route)], cells.reduce(0) { $0 + $1.bytesIn })
        }
        out.header("weir_response_bytes_total", "Response bytes sent to clients, by route.", "counter")
        for (route, cells) in group(sortedRequests, by: \.route) {
            out.sample("weir_response_bytes_total", [("route", route)], cells.reduce(0) { $0 + $1.bytesOut })
        }

        out.header("weir_request_duration_seconds",
                   "Time from first request byte to last response byte, by route.", "histogram")
        for (route, cells) in group(sortedRequests, by: \.route) {
            var merged = LatencyHistogram()
            for cell in cells { merged.merge(cell.total) }
            out.histogram("weir_request_duration_seconds", [("route", route)], merged)
        }

        out.header("weir_upstream_duration_seconds",
                   "Time spent on the upstream (connect to last byte), by upstream.", "histogram")
        for (upstream, cells) in group(sortedRequests, by: \.upstream) where !upstream.isEmpty {
            var merged = LatencyHistogram()
            for cell in cells { merged.merge(cell.upstream) }
            if merged.count > 0 { out.histogram("weir_upstream_duration_seconds", [("upstream", upstream)], merged) }
        }

        let sortedConnections = connections.sorted { $0.key < $1.key }
        out.header("weir_active_connections", "Open downstream connections, by listener.", "gauge")
        for (listener, cell) in sortedConnections {
            out.sample("weir_active_connections", [("listener", listener)], cell.opened - cell.closed)
        }
        out.header("weir_connections_total", "Downstream connections accepted, by listener.", "counter")
        for (listener, cell) in sortedConnections {
            out.sample("weir_connections_total", [("listener", listener)], cell.opened)
        }

        renderStreams(into: &out)

        out.header("weir_upstream_target_healthy", "1 if the upstream target is considered healthy, else 0.", "gauge")
        for item in health.sorted(by: { ($0.upstream, $0.target) < ($1.upstream, $1.target) }) {
            out.sample("weir_upstream_target_healthy", [("upstream", item.upstream), ("target", item.target)],
                       item.healthy ? 1 : 0)
        }

        for counter in externalCounters {
            out.header(counter.name, counter.help, "counter")
            out.sample(counter.name, [], counter.value)
        }
        return out.text
    }

    private func group(_ sorted: [(key: RouteUpstreamKey, value: RequestCell)],
                       by label: KeyPath<RouteUpstreamKey, String>) -> [(String, [RequestCell])] {
        var order: [String] = []
        var cells: [String: [RequestCell]] = [:]
        for (key, cell) in sorted {
            let name = key[keyPath: label]
            if cells[name] == nil { order.append(name) }
            cells[name, default: []].append(cell)
        }
        return order.sorted().map { ($0, cells[$0]!) }
    }
}

/// Builds Prometheus text exposition format 0.0.4.
struct PrometheusWriter {
    private(set) var text = ""

    mutating func header(_ name: String, _ help: String, _ type: String) {
        text += "# HELP \(name) \(Self.escapeHelp(help))\n# TYPE \(name) \(type)\n"
    }

    mutating func sample(_ name: String, _ labels: [(String, String)], _ value: Int) {
        text += name + Self.labelSet(labels) + " \(value)\n"
    }

    mutating func sample(_ name: String, _ labels: [(String, String)], _ value: Double) {
        text += name + Self.labelSet(labels) + " " + Self.formatDouble(value) + "\n"
    }

    mutating func histogram(_ name: String, _ labels: [(String, String)], _ h: LatencyHistogram) {
        var cumulative = 0
        for (i, bound) in MetricsRegistry.latencyBuckets.enumerated() {
            cumulative += h.counts[i]
            sample(name + "_bucket", labels + [("le", Self.formatDouble(bound))], cumulative)
        }
        cumulative += h.counts[MetricsRegistry.latencyBuckets.count]
        sample(name + "_bucket", labels + [("le", "+Inf")], cumulative)
        sample(name + "_sum", labels, h.sum)
        sample(name + "_count", labels, h.count)
    }

    static func labelSet(_ labels: [(String, String)]) -> String {
        if labels.isEmpty { return "" }
        return "{" + labels.map { "\($0.0)=\"\(escapeLabelValue($0.1))\"" }.joined(separator: ",") + "}"
    }

    /// Label values escape backslash, double quote and line feed.
    static func escapeLabelValue(_ value: String) -> String {
        guard value.contains(where: { $0 == "\\" || $0 == "\"" || $0 == "\n" }) else { return value }
        var out = ""
        for ch in value {
            switch ch {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(ch)
            }
        }
        return out
    }

    /// HELP text escapes backslash and line feed only.
    static func escapeHelp(_ value: String) -> String {
        value.replacingOccurrences("\\", "\\\\").replacingOccurrences("\n", "\\n")
    }

    static func formatDouble(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value > 0 ? "+Inf" : "-Inf" }
        return "\(value)"
    }
}

extension String {
    // Avoids pulling Foundation into the data-path module just for this.
    fileprivate func replacingOccurrences(_ target: Character, _ replacement: String) -> String {
        var out = ""
        for ch in self { if ch == target { out += replacement } else { out.append(ch) } }
        return out
    }
}
