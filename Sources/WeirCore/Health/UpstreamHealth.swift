// Health state of one upstream's targets, shared by every event loop.
// Two independent signals decide whether a target may be picked:
//   - active: the health checker's probes flip a target down after
//     `active.unhealthy` consecutive failed probes and up again after
//     `active.healthy` consecutive good ones;
//   - passive: the data path reports request outcomes; after
//     `passive.consecutive_failures` failures in a row the target is ejected
//     for `passive.ejection`, then tried again (its failure count starts
//     over, so it needs a fresh run of failures to be ejected again). If it
//     is ejected again before any success, the ejection doubles each time
//     (backoff, capped at `passive.max_ejection`); a success resets it.
// A target is healthy when it is up by the active check and not ejected.
// With no passive config, outcomes are counted but never eject.
//
// Everything is atomics with relaxed ordering: a pick reading a value a
// few nanoseconds stale is harmless, and no lock sits on the request path.

import Atomics
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Monotonic nanoseconds (CLOCK_MONOTONIC), the clock `now:` arguments use.
/// Same clock as NIO's `NIODeadline.now().uptimeNanoseconds` on Linux.
public enum MonotonicClock {
    @inline(__always)
    public static func now() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
    }
}

/// What the admin endpoint and metrics show for one target.
public enum TargetHealthStatus: String, Sendable {
    case healthy
    /// Down by active health checks.
    case unhealthy
    /// Ejected by passive checks until its ejection ends.
    case ejected
}

/// Shared across event loops (atomics), one per upstream; read on every pick.
public final class UpstreamHealth: Sendable {
    public let targetCount: Int
    private let active: ActiveHealthCheck
    private let passive: PassiveHealthCheck?
    private let targets: [TargetHealthCells]

    /// Target addresses, in `upstream.targets` order.
    public let addresses: [HostPort]

    public init(upstream: UpstreamConfig) {
        self.targetCount = upstream.targets.count
        self.addresses = upstream.targets.map(\.address)
        self.active = upstream.healthCheck.active ?? ActiveHealthCheck()
        self.passive = upstream.healthCheck.passive
        self.targets = (0..<upstream.targets.count).map { _ in TargetHealthCells() }
    }

    deinit {
        for cells in targets { cells.destroy() }
    }

    /// For a config reload: targets whose address was already in `previous`
    /// keep their state (down stays down, an ejection keeps running), so a
    /// reload never sends traffic to a target known to be failing. New
    /// targets start healthy.
    public convenience init(upstream: UpstreamConfig, inheritingFrom previous: UpstreamHealth?) {
        self.init(upstream: upstream)
        guard let previous = previous else { return }
        var previousIndex: [HostPort: Int] = [:]
        for (index, address) in previous.addresses.enumerated() { previousIndex[address] = index }
        for (index, address) in addresses.enumerated() {
            guard let old = previousIndex[address] else { continue }
            targets[index].copyState(from: previous.targets[old])
        }
    }

    @inline(__always)
    public func isHealthy(_ target: Int, now: UInt64 /* monotonic ns */) -> Bool {
        let cells = targets[target]
        guard cells.activeUp.load(ordering: .relaxed) else { return false }
        let ejectedUntil = cells.ejectedUntil.load(ordering: .relaxed)
        return ejectedUntil == 0 || now >= ejectedUntil
    }

    // MARK: Passive

    /// A request to the target succeeded (got a response below 500).
    public func recordSuccess(_ target: Int) {
        let cells = targets[target]
        // Avoid stores (and the cache-line traffic) on the common path.
        if cells.consecutiveFailures.load(ordering: .relaxed) != 0 {
            cells.consecutiveFailures.store(0, ordering: .relaxed)
        }
        if cells.ejectionStreak.load(ordering: .relaxed) != 0 {
            cells.ejectionStreak.store(0, ordering: .relaxed)
        }
    }

    /// A connect failure or 5xx. Ejects after `passive.consecutive_failures`
    /// in a row for `passive.ejection`; afterwards the target is tried again.
    public func recordFailure(_ target: Int, now: UInt64) {
        let cells = targets[target]
        let failures = cells.consecutiveFailures.loadThenWrappingIncrement(ordering: .relaxed) + 1
        guard let passive = passive, failures >= passive.consecutiveFailures else { return }
        let ejectedUntil = cells.ejectedUntil.load(ordering: .relaxed)
        if ejectedUntil != 0 && now < ejectedUntil { return }   // already ejected
        // One caller wins the right to eject; the failure run starts over.
        let streak = cells.ejectionStreak.load(ordering: .relaxed)
        let duration = PassiveBackoff.ejection(passive, streak: streak)
        if cells.ejectedUntil.compareExchange(expected: ejectedUntil, desired: now &+ duration,
                                              ordering: .relaxed).exchanged {
            cells.consecutiveFailures.store(0, ordering: .relaxed)
            cells.ejectionStreak.store(streak + 1, ordering: .relaxed)
            cells.ejections.wrappingIncrement(ordering: .relaxed)
        }
    }

    // MARK: Active

    /// A probe result from the health checker. Flips the target down after
    /// `active.unhealthy` consecutive failures, up after `active.healthy`
    /// consecutive successes. Probes for one target come from one checker.
    public func recordProbe(_ target: Int, healthy: Bool) {
        let cells = targets[target]
        if healthy {
            cells.probeFailures.store(0, ordering: .relaxed)
            let successes = cells.probeSuccesses.loadThenWrappingIncrement(ordering: .relaxed) + 1
            if successes >= active.healthy && !cells.activeUp.load(ordering: .relaxed) {
                cells.activeUp.store(true, ordering: .relaxed)
                // A target that passes active checks is not held out by an old ejection.
                cells.ejectedUntil.store(0, ordering: .relaxed)
                cells.consecutiveFailures.store(0, ordering: .relaxed)
                cells.ejectionStreak.store(0, ordering: .relaxed)
            }
        } else {
            cells.probeSuccesses.store(0, ordering: .relaxed)
            let failures = cells.probeFailures.loadThenWrappingIncrement(ordering: .relaxed) + 1
            if failures >= active.unhealthy { cells.activeUp.store(false, ordering: .relaxed) }
        }
    }

    // MARK: Reading

    public var healthyCount: Int {
        let now = MonotonicClock.now()
        return (0..<targetCount).reduce(0) { $0 + (isHealthy($1, now: now) ? 1 : 0) }
    }

    public func status(_ target: Int, now: UInt64) -> TargetHealthStatus {
        let cells = targets[target]
        if !cells.activeUp.load(ordering: .relaxed) { return .unhealthy }
        let ejectedUntil = cells.ejectedUntil.load(ordering: .relaxed)
        return ejectedUntil != 0 && now < ejectedUntil ? .ejected : .healthy
    }

    /// How many times the target has been ejected by passive checks.
    public func ejectionCount(_ target: Int) -> Int {
        targets[target].ejections.load(ordering: .relaxed)
    }
}

/// Per-target atomics, each its own allocation (which also keeps targets'
/// hot counters off each other's cache lines). A struct of `UnsafeAtomic`
/// pointers, not a class of `ManagedAtomic` objects: every pick reads
/// `isHealthy`, and with objects each read retained and released the cells
/// and each atomic it loaded (5 pairs per pick, callgrind). The owning
/// `UpstreamHealth` destroys them in its deinit; nothing else keeps a copy.
private struct TargetHealthCells: @unchecked Sendable {
    let activeUp = UnsafeAtomic<Bool>.create(true)
    let probeSuccesses = UnsafeAtomic<Int>.create(0)
    let probeFailures = UnsafeAtomic<Int>.create(0)
    let consecutiveFailures = UnsafeAtomic<Int>.create(0)
    /// Monotonic ns until which the target is ejected; 0 = not ejected.
    let ejectedUntil = UnsafeAtomic<UInt64>.create(0)
    let ejections = UnsafeAtomic<Int>.create(0)
    /// Ejections since the last success: the backoff exponent.
    let ejectionStreak = UnsafeAtomic<Int>.create(0)

    func copyState(from other: TargetHealthCells) {
        activeUp.store(other.activeUp.load(ordering: .relaxed), ordering: .relaxed)
        probeSuccesses.store(other.probeSuccesses.load(ordering: .relaxed), ordering: .relaxed)
        probeFailures.store(other.probeFailures.load(ordering: .relaxed), ordering: .relaxed)
        consecutiveFailures.store(other.consecutiveFailures.load(ordering: .relaxed), ordering: .relaxed)
        ejectedUntil.store(other.ejectedUntil.load(ordering: .relaxed), ordering: .relaxed)
        ejections.store(other.ejections.load(ordering: .relaxed), ordering: .relaxed)
        ejectionStreak.store(other.ejectionStreak.load(ordering: .relaxed), ordering: .relaxed)
    }

    func destroy() {
        activeUp.destroy()
        probeSuccesses.destroy()
        probeFailures.destroy()
        consecutiveFailures.destroy()
        ejectedUntil.destroy()
        ejections.destroy()
        ejectionStreak.destroy()
    }
}

enum PassiveBackoff {
    /// `ejection * 2^streak`, capped at `max(maxEjection, ejection)`, in ns.
    static func ejection(_ passive: PassiveHealthCheck, streak: Int) -> UInt64 {
        let base = UInt64(max(0, passive.ejection.nanoseconds))
        let cap = max(base, UInt64(max(0, passive.maxEjection.nanoseconds)))
        let shift = UInt64(min(streak, 32))
        let (scaled, overflow) = base.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? cap : min(scaled, cap)
    }
}
