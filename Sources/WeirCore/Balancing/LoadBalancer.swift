// Load balancers: which target of an upstream gets the next request.
// One balancer per upstream per event loop, so no locks: its counters and
// random state are only touched from that loop. Health is shared
// (UpstreamHealth, atomics) and consulted on every pick.
//
// Every balancer follows the same rules for `pick(_:excluding:)`:
//   - only healthy targets are picked;
//   - `excluding` (the target a retry just failed on) is avoided whenever
//     another healthy target exists, and used only as the last resort;
//   - nil means no target is healthy (the proxy answers 503).

public struct BalancerInput {
    public var clientIP: String
    /// Header/cookie value chosen by upstream.hashOn, nil if absent -> fall back to clientIP.
    public var hashKey: String?
    /// `MonotonicClock` nanoseconds the health checks compare against; the
    /// proxy passes its event loop's cached time (one clock read per event).
    public var now: UInt64

    public init(clientIP: String, hashKey: String? = nil, now: UInt64 = MonotonicClock.now()) {
        self.clientIP = clientIP
        self.hashKey = hashKey
        self.now = now
    }
}

/// One instance per upstream per event loop: NOT thread-safe, no locks needed.
public protocol LoadBalancer: AnyObject {
    /// Index into upstream.targets of a healthy target, never `excluding` when another healthy target exists; nil when none is healthy.
    func pick(_ input: BalancerInput, excluding: Int?) -> Int?
    func requestStarted(target: Int)
    func requestFinished(target: Int)
}

public func makeBalancer(for upstream: UpstreamConfig, health: UpstreamHealth) -> LoadBalancer {
    let targets = BalancerTargets(upstream: upstream, health: health)
    switch upstream.balancer {
    case .roundRobin: return SmoothWeightedRoundRobin(targets)
    case .leastRequest: return LeastRequestBalancer(targets)
    case .consistentHash: return ConsistentHashBalancer(targets, addresses: upstream.targets.map { $0.address.description })
    case .random: return WeightedRandomBalancer(targets)
    }
}

/// State every balancer shares: weights, in-flight counts, health, a PRNG.
/// A class held by a `let`: as a struct in the balancer's `var`, every
/// `isEligible` call copied it (a retain/release of its arrays and health
/// per target per pick, callgrind).
final class BalancerTargets {
    let weights: [Int]
    let health: UpstreamHealth
    var inFlight: [Int]
    var random: SplitMix64

    init(upstream: UpstreamConfig, health: UpstreamHealth) {
        precondition(health.targetCount == upstream.targets.count,
                     "UpstreamHealth was built for a different target list")
        self.weights = upstream.targets.map { max(1, $0.weight) }
        self.health = health
        self.inFlight = Array(repeating: 0, count: upstream.targets.count)
        self.random = SplitMix64(seed: UInt64.random(in: .min ... .max))
    }

    var count: Int { weights.count }

    @inline(__always)
    func isEligible(_ target: Int, excluding: Int?, now: UInt64) -> Bool {
        target != excluding && health.isHealthy(target, now: now)
    }

    /// The last resort when nothing else is eligible: the excluded target, if healthy.
    @inline(__always)
    func fallback(excluding: Int?, now: UInt64) -> Int? {
        guard let excluded = excluding, excluded >= 0, excluded < count, health.isHealthy(excluded, now: now) else { return nil }
        return excluded
    }

    /// Weighted random choice among eligible targets; nil if none.
    func weightedRandom(excluding: Int?, now: UInt64) -> Int? {
        var total = 0
        for target in 0..<count where isEligible(target, excluding: excluding, now: now) { total += weights[target] }
        guard total > 0 else { return nil }
        var point = Int(random.next(below: UInt64(total)))
        for target in 0..<count where isEligible(target, excluding: excluding, now: now) {
            point -= weights[target]
            if point < 0 { return target }
        }
        return nil   // health changed between the two passes; rare, caller retries with fallback
    }

    func started(_ target: Int) {
        if target >= 0 && target < count { inFlight[target] += 1 }
    }

    func finished(_ target: Int) {
        if target >= 0 && target < count && inFlight[target] > 0 { inFlight[target] -= 1 }
    }
}

/// Small fast PRNG (SplitMix64); the system generator costs a syscall.
struct SplitMix64 {
    private var state: UInt64
    init(seed: UInt64) { state = seed }

    @inline(__always)
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }

    /// Uniform in 0..<bound (Lemire's multiply-shift; bias negligible for our bounds).
    @inline(__always)
    mutating func next(below bound: UInt64) -> UInt64 {
        next().multipliedFullWidth(by: bound).high
    }
}

// MARK: - round_robin

/// Smooth weighted round robin (the nginx family): every pick adds each
/// eligible target's weight to its running score, picks the highest score
/// and subtracts the total from it. Weights 5:1:1 give a a b a c a a
/// rather than a a a a a b c, so no target gets a burst.
final class SmoothWeightedRoundRobin: LoadBalancer {
    private let targets: BalancerTargets
    private var scores: [Int]

    init(_ targets: BalancerTargets) {
        self.targets = targets
        self.scores = Array(repeating: 0, count: targets.count)
    }

    func pick(_ input: BalancerInput, excluding: Int?) -> Int? {
        let now = input.now
        var total = 0
        var best = -1
        for target in 0..<targets.count where targets.isEligible(target, excluding: excluding, now: now) {
            scores[target] += targets.weights[target]
            total += targets.weights[target]
            if best < 0 || scores[target] > scores[best] { best = target }
        }
        guard best >= 0 else { return targets.fallback(excluding: excluding, now: now) }
        scores[best] -= total
        return best
    }

    func requestStarted(target: Int) { targets.started(target) }
    func requestFinished(target: Int) { targets.finished(target) }
}

// MARK: - least_request

/// Power of two random choices: draw two targets at random (in proportion
/// to weight) and send to the one with fewer requests in flight on this
/// event loop; on a tie the first draw wins, so an idle upstream is
/// balanced exactly by weight.
final class LeastRequestBalancer: LoadBalancer {
    private let targets: BalancerTargets

    init(_ targets: BalancerTargets) { self.targets = targets }

    func pick(_ input: BalancerInput, excluding: Int?) -> Int? {
        let now = input.now
        guard let first = targets.weightedRandom(excluding: excluding, now: now) else {
            return targets.fallback(excluding: excluding, now: now)
        }
        // Draw the second among the others, so two eligible targets are always compared.
        guard let second = secondDraw(avoiding: first, excluding: excluding, now: now) else { return first }
        return targets.inFlight[second] < targets.inFlight[first] ? second : first
    }

    private func secondDraw(avoiding first: Int, excluding: Int?, now: UInt64) -> Int? {
        var total = 0
        for target in 0..<targets.count where target != first && targets.isEligible(target, excluding: excluding, now: now) {
            total += targets.weights[target]
        }
        guard total > 0 else { return nil }
        var point = Int(targets.random.next(below: UInt64(total)))
        for target in 0..<targets.count where target != first && targets.isEligible(target, excluding: excluding, now: now) {
            point -= targets.weights[target]
            if point < 0 { return target }
        }
        return nil
    }

    func requestStarted(target: Int) { targets.started(target) }
    func requestFinished(target: Int) { targets.finished(target) }
}

// MARK: - random

/// Weighted random among healthy targets.
final class WeightedRandomBalancer: LoadBalancer {
    private let targets: BalancerTargets

    init(_ targets: BalancerTargets) { self.targets = targets }

    func pick(_ input: BalancerInput, excluding: Int?) -> Int? {
        let now = input.now
        return targets.weightedRandom(excluding: excluding, now: now) ?? targets.fallback(excluding: excluding, now: now)
    }

    func requestStarted(target: Int) { targets.started(target) }
    func requestFinished(target: Int) { targets.finished(target) }
}

// MARK: - consistent_hash

/// A hash ring with virtual nodes: each target owns `pointsPerWeight *
/// weight` points placed by hashing its address (not its index), so adding
/// or removing one of N targets moves only the keys whose nearest point
/// changes, about 1/N of them. A key goes to the first point clockwise
/// from its hash whose target is eligible; when a target is down its keys
/// spread over the others and come back when it recovers.
final class ConsistentHashBalancer: LoadBalancer {
    static let pointsPerWeight = 160
    static let maxPoints = 1 << 20

    private let targets: BalancerTargets
    private let ringHashes: [UInt64]
    private let ringTargets: [Int32]

    init(_ targets: BalancerTargets, addresses: [String]) {
        self.targets = targets
        let totalWeight = targets.weights.reduce(0, +)
        // Keep the ring bounded even for large weights.
        let perWeight = max(1, min(Self.pointsPerWeight, Self.maxPoints / max(1, totalWeight)))
        var points: [(UInt64, Int32)] = []
        points.reserveCapacity(totalWeight * perWeight)
        for (index, address) in addresses.enumerated() {
            for replica in 0..<(targets.weights[index] * perWeight) {
                points.append((StableHash.hash("\(address)#\(replica)"), Int32(index)))
            }
        }
        // Ties (astronomically rare) are ordered by address index for determinism.
        points.sort { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
        ringHashes = points.map(\.0)
        ringTargets = points.map(\.1)
    }

    func pick(_ input: BalancerInput, excluding: Int?) -> Int? {
        guard !ringHashes.isEmpty else { return nil }
        let now = input.now
        let keyHash = StableHash.hash(input.hashKey ?? input.clientIP)
        var index = firstPoint(atOrAfter: keyHash)
        // Walk clockwise; once every target has been seen there is nothing more to find.
        var seen = 0
        var lastTarget: Int32 = -1
        for _ in 0..<ringHashes.count {
            let target = ringTargets[index]
            if target != lastTarget {
                if targets.isEligible(Int(target), excluding: excluding, now: now) { return Int(target) }
                lastTarget = target
                seen += 1
                if seen > targets.count * 4 { break }   // plenty of distinct looks; fall back to a scan
            }
            index = index + 1 == ringHashes.count ? 0 : index + 1
        }
        for target in 0..<targets.count where targets.isEligible(target, excluding: excluding, now: now) { return target }
        return targets.fallback(excluding: excluding, now: now)
    }

    private func firstPoint(atOrAfter hash: UInt64) -> Int {
        var low = 0, high = ringHashes.count
        while low < high {
            let middle = (low + high) / 2
            if ringHashes[middle] < hash { low = middle + 1 } else { high = middle }
        }
        return low == ringHashes.count ? 0 : low
    }

    func requestStarted(target: Int) { targets.started(target) }
    func requestFinished(target: Int) { targets.finished(target) }
}

/// A process-independent 64-bit string hash (Swift's Hasher is seeded per
/// process, which would move keys between targets across restarts).
enum StableHash {
    static func hash(_ text: String) -> UInt64 {
        var hash = FNV1a.offsetBasis
        for byte in text.utf8 { hash = FNV1a.step(hash, byte) }
        // MurmurHash3's finalizer spreads FNV's weak high bits over the ring.
        hash ^= hash >> 33
        hash &*= 0xff51_afd7_ed55_8ccd
        hash ^= hash >> 33
        hash &*= 0xc4ce_b9fe_1a85_ec53
        hash ^= hash >> 33
        return hash
    }
}
