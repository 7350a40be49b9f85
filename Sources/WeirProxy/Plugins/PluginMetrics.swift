import NIOConcurrencyHelpers
import WeirLua

/// Per-plugin, per-phase call latency histograms and outcome counters for
/// `/metrics`:
///
/// - `weir_plugin_duration_seconds{plugin,phase}` histogram (wall time of
///   one plugin's phase call, async waits included)
/// - `weir_plugin_calls_total{plugin,phase,outcome}` (completed, exited, failed)
///
/// Fed by the Lua runtime on the event loops: each loop writes its own
/// lock-free `LoopCell`s (relaxed atomic adds, read as a snapshot by
/// `/metrics`); only the rare event counts take a lock. Kept across reloads.
public final class PluginMetrics: PluginPhaseObserver, @unchecked Sendable {
    struct Key: Hashable { let plugin: String; let phase: PluginPhase }
    struct EventKey: Hashable { let plugin: String; let event: String }
    struct Cell {
        var latency = LatencyHistogram()
        var outcomes = [0, 0, 0]   // completed, exited, failed
    }
    final class Shard {
        let lock = NIOLock()
        // A list, not a dictionary: hashing the plugin name on every call
        // cost ~1.7k instructions (callgrind, weir-lua bench); comparing a
        // phase and a short (inline) name against a few dozen entries is cheaper.
        var keys: [Key] = []
        var cells: [Cell] = []
        /// weir.metrics.count events: rare (per batch or per drop), so a
        /// dictionary is fine here.
        var events: [EventKey: Int] = [:]

        @inline(__always)
        func index(of key: Key) -> Int {
            for i in 0..<keys.count where keys[i].phase == key.phase && keys[i].plugin == key.plugin { return i }
            keys.append(key)
            cells.append(Cell())
            return keys.count - 1
        }
    }

    private let shards = PerThreadShards<Shard> { Shard() }

    /// One (event loop, plugin, phase) series, handed to the Lua runtime's
    /// chain entries so a call is recorded without finding the plugin by
    /// name. Lock-free: its loop is the only writer, and the chain runner
    /// records completed calls into its `PluginCallCell` directly (no Swift
    /// call per plugin); a /metrics scrape reads the cell with relaxed loads
    /// (a sample may be a call behind).
    final class LoopCell: PluginCallRecorder {
        let key: Key
        private let calls = PluginCallCell()

        init(key: Key) {
            self.key = key
        }

        var cell: PluginCallCell? { calls }

        func record(nanoseconds: UInt64, outcome: PluginCallOutcome) {
            calls.record(nanoseconds: nanoseconds, outcome: outcome)
        }

        /// What was recorded so far, for /metrics.
        var snapshot: Cell {
            let recorded = calls.snapshot
            var cell = Cell()
            for i in recorded.buckets.indices { cell.latency.counts[i] = Int(recorded.buckets[i]) }
            cell.latency.count = Int(recorded.count)
            cell.latency.sum = Double(recorded.sumNanoseconds) / 1e9
            for i in 0..<3 { cell.outcomes[i] = Int(recorded.outcomes[i]) }
            return cell
        }
    }
    struct LoopKey: Hashable { let loop: ObjectIdentifier?; let key: Key }
    private let loopCellsLock = NIOLock()
    /// Shared by every chain (and generation) on a loop: reloads add none.
    private var loopCells: [LoopKey: LoopCell] = [:]

    public init() {}

    public func recorder(plugin: String, phase: PluginPhase, eventLoop: ObjectIdentifier?) -> PluginCallRecorder? {
        let key = LoopKey(loop: eventLoop, key: Key(plugin: plugin, phase: phase))
        return loopCellsLock.withLock {
            if let cell = loopCells[key] { return cell }
            let cell = LoopCell(key: key.key)
            loopCells[key] = cell
            return cell
        }
    }

    public func pluginPhaseCompleted(plugin: String, phase: PluginPhase, nanoseconds: UInt64, outcome: PluginCallOutcome) {
        let shard = shards.current
        let key = Key(plugin: plugin, phase: phase)
        shard.lock.withLock {
            let i = shard.index(of: key)
            shard.cells[i].latency.observe(Double(nanoseconds) / 1e9)
            switch outcome {
            case .completed: shard.cells[i].outcomes[0] += 1
            case .exited: shard.cells[i].outcomes[1] += 1
            case .failed: shard.cells[i].outcomes[2] += 1
            }
        }
    }

    public func pluginEventCounted(plugin: String, event: String, count: Int) {
        let shard = shards.current
        shard.lock.withLock { shard.events[EventKey(plugin: plugin, event: event), default: 0] += count }
    }

    /// Prometheus text for the plugin metrics (empty when no plugin ran).
    public func renderPrometheus() -> String {
        var merged: [Key: Cell] = [:]
        var events: [EventKey: Int] = [:]
        for loopCell in loopCellsLock.withLock({ Array(loopCells.values) }) {
            let cell = loopCell.snapshot
            var m = merged[loopCell.key, default: Cell()]
            m.latency.merge(cell.latency)
            for i in 0..<3 { m.outcomes[i] += cell.outcomes[i] }
            merged[loopCell.key] = m
        }
        for shard in shards.allShards {
            shard.lock.withLock {
                for (key, n) in shard.events { events[key, default: 0] += n }
                for (key, cell) in zip(shard.keys, shard.cells) {
                    var m = merged[key, default: Cell()]
                    m.latency.merge(cell.latency)
                    for i in 0..<3 { m.outcomes[i] += cell.outcomes[i] }
                    merged[key] = m
                }
            }
        }
        guard !merged.isEmpty || !events.isEmpty else { return "" }
        let keys = merged.keys.sorted { ($0.plugin, $0.phase.rawValue) < ($1.plugin, $1.phase.rawValue) }
        var out = PrometheusWriter()
        if !events.isEmpty {
            out.header("weir_plugin_events_total", "Events counted by plugins (weir.metrics.count).", "counter")
            for key in events.keys.sorted(by: { ($0.plugin, $0.event) < ($1.plugin, $1.event) }) {
                out.sample("weir_plugin_events_total", [("plugin", key.plugin), ("event", key.event)], events[key]!)
            }
        }
        out.header("weir_plugin_calls_total", "Plugin phase calls by outcome (completed, exited, failed).", "counter")
        for key in keys {
            for (i, outcome) in ["completed", "exited", "failed"].enumerated() {
                out.sample("weir_plugin_calls_total",
                           [("plugin", key.plugin), ("phase", key.phase.rawValue), ("outcome", outcome)], merged[key]!.outcomes[i])
            }
        }
        out.header("weir_plugin_duration_seconds", "Wall time of one plugin's phase call, async waits included.", "histogram")
        for key in keys {
            out.histogram("weir_plugin_duration_seconds", [("plugin", key.plugin), ("phase", key.phase.rawValue)], merged[key]!.latency)
        }
        return out.text
    }
}
