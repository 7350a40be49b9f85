import XCTest
@testable import WeirCore

final class BalancerTests: XCTestCase {
    private func upstream(_ kind: BalancerKind, weights: [Int], basePort: Int = 9000) -> UpstreamConfig {
        var upstream = UpstreamConfig()
        upstream.name = "u"
        upstream.balancer = kind
        upstream.targets = weights.enumerated().map {
            TargetConfig(address: HostPort(host: "10.0.0.\($0.offset + 1)", port: basePort + $0.offset), weight: $0.element)
        }
        var passive = PassiveHealthCheck()
        passive.consecutiveFailures = 1
        passive.ejection = .seconds(3600)
        upstream.healthCheck.passive = passive
        return upstream
    }

    private func counts(_ balancer: LoadBalancer, targets: Int, picks: Int, excluding: Int? = nil,
                        key: (Int) -> BalancerInput = { BalancerInput(clientIP: "192.0.2.\($0 % 250)") }) -> [Int] {
        var result = Array(repeating: 0, count: targets)
        for index in 0..<picks {
            guard let target = balancer.pick(key(index), excluding: excluding) else { XCTFail("no pick"); break }
            result[target] += 1
        }
        return result
    }

    // MARK: round_robin

    func testSmoothRoundRobinFollowsWeightsExactlyAndSmoothly() {
        let config = upstream(.roundRobin, weights: [5, 1, 1])
        let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
        let sequence = (0..<7).map { _ in balancer.pick(BalancerInput(clientIP: "1.1.1.1"), excluding: nil)! }
        XCTAssertEqual(sequence, [0, 0, 1, 0, 2, 0, 0], "nginx's smooth order for 5:1:1")
        XCTAssertEqual(counts(balancer, targets: 3, picks: 700), [500, 100, 100])
    }

    func testRoundRobinEqualWeightsRotates() {
        let config = upstream(.roundRobin, weights: [1, 1, 1])
        let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
        let sequence = (0..<6).map { _ in balancer.pick(BalancerInput(clientIP: "1.1.1.1"), excluding: nil)! }
        XCTAssertEqual(sequence, [0, 1, 2, 0, 1, 2])
    }

    // MARK: weights, exclusion and health for every kind

    func testWeightsAreHonouredByEveryBalancer() {
        for kind in [BalancerKind.roundRobin, .random, .leastRequest, .consistentHash] {
            let config = upstream(kind, weights: [3, 1])
            let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
            let picks = 20_000
            let result = counts(balancer, targets: 2, picks: picks, key: { BalancerInput(clientIP: "ip", hashKey: "user-\($0)") })
            let share = Double(result[0]) / Double(picks)
            XCTAssertEqual(share, 0.75, accuracy: 0.05, "\(kind): \(result)")
        }
    }

    func testExcludedTargetAvoidedWhenAnotherIsHealthy() {
        for kind in BalancerKind.allCases {
            let config = upstream(kind, weights: [1, 1, 1])
            let health = UpstreamHealth(upstream: config)
            let balancer = makeBalancer(for: config, health: health)
            let result = counts(balancer, targets: 3, picks: 3000, excluding: 1,
                                key: { BalancerInput(clientIP: "ip", hashKey: "k\($0)") })
            XCTAssertEqual(result[1], 0, "\(kind) picked the excluded target: \(result)")
            XCTAssertGreaterThan(result[0], 0, "\(kind)")
            XCTAssertGreaterThan(result[2], 0, "\(kind)")
            // The excluded target is still the last resort when it is the only healthy one.
            health.recordFailure(0, now: MonotonicClock.now())
            health.recordFailure(2, now: MonotonicClock.now())
            XCTAssertEqual(balancer.pick(BalancerInput(clientIP: "ip"), excluding: 1), 1, "\(kind)")
        }
    }

    func testUnhealthyTargetsAreSkippedAndNilWhenNoneHealthy() {
        for kind in BalancerKind.allCases {
            let config = upstream(kind, weights: [1, 2, 1])
            let health = UpstreamHealth(upstream: config)
            let balancer = makeBalancer(for: config, health: health)
            health.recordFailure(1, now: MonotonicClock.now())        // passive ejection (threshold 1)
            for _ in 0..<3 { health.recordProbe(2, healthy: false) }  // active: down after 3
            let result = counts(balancer, targets: 3, picks: 500, key: { BalancerInput(clientIP: "ip", hashKey: "k\($0)") })
            XCTAssertEqual(result, [500, 0, 0], "\(kind)")
            health.recordFailure(0, now: MonotonicClock.now())
            XCTAssertNil(balancer.pick(BalancerInput(clientIP: "ip"), excluding: nil), "\(kind)")
            XCTAssertNil(balancer.pick(BalancerInput(clientIP: "ip"), excluding: 0), "\(kind)")
        }
    }

    func testNoTargets() {
        for kind in BalancerKind.allCases {
            let config = upstream(kind, weights: [])
            XCTAssertNil(makeBalancer(for: config, health: UpstreamHealth(upstream: config)).pick(BalancerInput(clientIP: "ip"), excluding: nil))
        }
    }

    // MARK: least_request

    func testLeastRequestPrefersIdleTargets() {
        let config = upstream(.leastRequest, weights: [1, 1])
        let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
        for _ in 0..<10 { balancer.requestStarted(target: 0) }
        // With two targets both are always compared, so the idle one always wins.
        XCTAssertEqual(counts(balancer, targets: 2, picks: 200), [0, 200])
        for _ in 0..<10 { balancer.requestFinished(target: 0) }
        for _ in 0..<3 { balancer.requestStarted(target: 1) }
        XCTAssertEqual(counts(balancer, targets: 2, picks: 200), [200, 0])
    }

    func testLeastRequestSpreadsConcurrentLoad() {
        let config = upstream(.leastRequest, weights: [1, 1, 1, 1])
        let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
        var inFlight = [Int](repeating: 0, count: 4)
        for _ in 0..<400 {   // requests that never finish: P2C keeps the counts close
            let target = balancer.pick(BalancerInput(clientIP: "ip"), excluding: nil)!
            balancer.requestStarted(target: target)
            inFlight[target] += 1
        }
        XCTAssertLessThanOrEqual(inFlight.max()! - inFlight.min()!, 20, "\(inFlight)")
    }

    // MARK: consistent_hash

    func testConsistentHashIsStickyAndUsesClientIPWithoutKey() {
        let config = upstream(.consistentHash, weights: [1, 1, 1, 1])
        let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
        for user in 0..<100 {
            let input = BalancerInput(clientIP: "203.0.113.9", hashKey: "user-\(user)")
            let first = balancer.pick(input, excluding: nil)
            for _ in 0..<5 { XCTAssertEqual(balancer.pick(input, excluding: nil), first) }
        }
        let byIP = balancer.pick(BalancerInput(clientIP: "203.0.113.9"), excluding: nil)
        XCTAssertEqual(balancer.pick(BalancerInput(clientIP: "203.0.113.9", hashKey: nil), excluding: nil), byIP)
        // Another instance (another event loop, or after a restart) maps keys the same way.
        let other = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
        XCTAssertEqual(other.pick(BalancerInput(clientIP: "203.0.113.9"), excluding: nil), byIP)
    }

    /// Removing or adding one of N targets remaps only about 1/N of keys,
    /// and only keys that had to move.
    func testConsistentHashRemapsAboutOneNth() {
        let n = 10
        let keys = (0..<20_000).map { "session-\($0)" }
        func assignment(_ config: UpstreamConfig) -> [String] {
            let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
            return keys.map { config.targets[balancer.pick(BalancerInput(clientIP: "ip", hashKey: $0), excluding: nil)!].address.description }
        }
        let full = upstream(.consistentHash, weights: Array(repeating: 1, count: n))
        let before = assignment(full)

        var removed = full
        let gone = removed.targets.remove(at: 4).address.description
        let afterRemoval = assignment(removed)
        var moved = 0
        for (old, new) in zip(before, afterRemoval) where old != new {
            moved += 1
            XCTAssertEqual(old, gone, "only keys of the removed target may move")
        }
        let removedShare = Double(moved) / Double(keys.count)
        XCTAssertEqual(removedShare, 1.0 / Double(n), accuracy: 0.05, "moved \(moved)")

        var added = full
        added.targets.append(TargetConfig(address: HostPort(host: "10.0.0.99", port: 9999)))
        let afterAdding = assignment(added)
        var movedOnAdd = 0
        for (old, new) in zip(before, afterAdding) where old != new {
            movedOnAdd += 1
            XCTAssertEqual(new, "10.0.0.99:9999", "keys only move to the new target")
        }
        XCTAssertEqual(Double(movedOnAdd) / Double(keys.count), 1.0 / Double(n + 1), accuracy: 0.05, "moved \(movedOnAdd)")
    }

    func testConsistentHashUnhealthyTargetOnlyMovesItsOwnKeys() {
        let config = upstream(.consistentHash, weights: [1, 1, 1, 1, 1])
        let health = UpstreamHealth(upstream: config)
        let balancer = makeBalancer(for: config, health: health)
        let keys = (0..<5000).map { BalancerInput(clientIP: "ip", hashKey: "k\($0)") }
        let before = keys.map { balancer.pick($0, excluding: nil)! }
        health.recordFailure(2, now: MonotonicClock.now())
        let during = keys.map { balancer.pick($0, excluding: nil)! }
        for (old, new) in zip(before, during) {
            if old == 2 { XCTAssertNotEqual(new, 2) } else { XCTAssertEqual(old, new) }
        }
    }

    func testInFlightBookkeepingIsSafeForUnknownTargets() {
        let config = upstream(.leastRequest, weights: [1])
        let balancer = makeBalancer(for: config, health: UpstreamHealth(upstream: config))
        balancer.requestFinished(target: 0)   // never below zero
        balancer.requestStarted(target: 7)    // out of range is ignored
        XCTAssertEqual(balancer.pick(BalancerInput(clientIP: "ip"), excluding: nil), 0)
    }
}
