import CLuaShims

/// One plugin's calls in one phase on one event loop: a latency histogram
/// (the bounds of `MetricsRegistry.latencyBuckets`, in nanoseconds), the sum
/// of the durations and a count per outcome, in C memory (`weir_call_cell`)
/// so that the chain runner (CLuaShims/chain.c) records each completed call
/// itself, with no Swift call per plugin. Written only on its event loop;
/// `snapshot` may be read from any thread (relaxed loads: a scrape may miss
/// the call in progress).
public final class PluginCallCell {
    let pointer: UnsafeMutablePointer<weir_call_cell>

    public init() {
        pointer = .allocate(capacity: 1)
        pointer.initialize(to: weir_call_cell())
    }

    deinit {
        pointer.deinitialize(count: 1)
        pointer.deallocate()
    }

    /// Records one call (on the cell's event loop only).
    public func record(nanoseconds: UInt64, outcome: PluginCallOutcome) {
        weir_call_cell_record(pointer, nanoseconds, outcome.cellIndex)
    }

    public struct Snapshot: Sendable {
        /// Calls per bucket (not cumulative): bucket i counts durations up to
        /// `boundsNanoseconds[i]`, the last one the rest.
        public var buckets: [UInt64]
        public var count: UInt64
        public var sumNanoseconds: UInt64
        /// Completed, exited, failed.
        public var outcomes: [UInt64]
    }

    public var snapshot: Snapshot {
        var copy = weir_call_cell_snapshot(pointer)
        let buckets = withUnsafeBytes(of: &copy.buckets) { Array($0.bindMemory(to: UInt64.self)) }
        let outcomes = withUnsafeBytes(of: &copy.outcomes) { Array($0.bindMemory(to: UInt64.self)) }
        return Snapshot(buckets: buckets, count: copy.count, sumNanoseconds: copy.sum_ns, outcomes: outcomes)
    }

    /// The histogram's upper bounds in nanoseconds (CLuaShims.h).
    public static let boundsNanoseconds: [UInt64] = withUnsafeBytes(of: weir_latency_bounds_ns) {
        Array($0.bindMemory(to: UInt64.self))
    }
}

extension PluginCallOutcome {
    /// The outcome's slot in `weir_call_cell.outcomes`.
    var cellIndex: Int32 {
        switch self {
        case .completed: return 0
        case .exited: return 1
        case .failed: return 2
        }
    }
}
