import XCTest
@testable import WeirCore

final class UpstreamHealthTests: XCTestCase {
    private func upstream(targets: Int, failures: Int? = 3, ejection: TimeSpan = .seconds(10),
                          healthy: Int = 2, unhealthy: Int = 3) -> UpstreamConfig {
        var upstream = UpstreamConfig()
        upstream.targets = (0..<targets).map { TargetConfig(address: HostPort(host: "127.0.0.1", port: 9000 + $0)) }
        var active = ActiveHealthCheck()
        active.healthy = healthy
        active.unhealthy = unhealthy
        upstream.healthCheck.active = active
        if let failures = failures {
            var passive = PassiveHealthCheck()
            passive.consecutiveFailures = failures
            passive.ejection = ejection
            upstream.healthCheck.passive = passive
        }
        return upstream
    }

    let second: UInt64 = 1_000_000_000

    func testStartsHealthy() {
        let health = UpstreamHealth(upstream: upstream(targets: 3))
        XCTAssertEqual(health.healthyCount, 3)
        XCTAssertTrue(health.isHealthy(0, now: 0))
        XCTAssertEqual(health.status(1, now: 0), .healthy)
    }

    func testPassiveEjectionAfterConsecutiveFailuresThenRetry() {
        let health = UpstreamHealth(upstream: upstream(targets: 2, failures: 3, ejection: .seconds(10)))
        let t0: UInt64 = 1000 * second
        health.recordFailure(0, now: t0)
        health.recordFailure(0, now: t0)
        XCTAssertTrue(health.isHealthy(0, now: t0), "two failures are below the threshold")
        health.recordFailure(0, now: t0)
        XCTAssertFalse(health.isHealthy(0, now: t0), "third consecutive failure ejects")
        XCTAssertEqual(health.status(0, now: t0), .ejected)
        XCTAssertFalse(health.isHealthy(0, now: t0 + 9 * second))
        XCTAssertTrue(health.isHealthy(1, now: t0), "other targets unaffected")
        XCTAssertTrue(health.isHealthy(0, now: t0 + 10 * second), "tried again after the ejection")
        XCTAssertEqual(health.ejectionCount(0), 1)
        // The failure run started over: one more failure does not eject again...
        health.recordFailure(0, now: t0 + 11 * second)
        XCTAssertTrue(health.isHealthy(0, now: t0 + 11 * second))
        // ...but a fresh run of three does, for twice as long (no success in between).
        health.recordFailure(0, now: t0 + 11 * second)
        health.recordFailure(0, now: t0 + 11 * second)
        XCTAssertFalse(health.isHealthy(0, now: t0 + 11 * second))
        XCTAssertFalse(health.isHealthy(0, now: t0 + 30 * second), "backoff: second ejection lasts 20s")
        XCTAssertTrue(health.isHealthy(0, now: t0 + 31 * second))
        XCTAssertEqual(health.ejectionCount(0), 2)
    }

    func testEjectionBackoffIsCappedAndResetBySuccess() {
        var config = upstream(targets: 1, failures: 1, ejection: .seconds(10))
        config.healthCheck.passive?.maxEjection = .seconds(35)
        let health = UpstreamHealth(upstream: config)
        var now: UInt64 = 1000 * second
        var durations: [UInt64] = []
        for _ in 0..<4 {
            health.recordFailure(0, now: now)
            var back = now
            while !health.isHealthy(0, now: back) { back += second }
            durations.append((back - now) / second)
            now = back
        }
        XCTAssertEqual(durations, [10, 20, 35, 35])
        health.recordSuccess(0)
        health.recordFailure(0, now: now)
        XCTAssertTrue(health.isHealthy(0, now: now + 10 * second), "a success resets the backoff")
    }

    func testSuccessResetsFailureRun() {
        let health = UpstreamHealth(upstream: upstream(targets: 1, failures: 3))
        health.recordFailure(0, now: second)
        health.recordFailure(0, now: second)
        health.recordSuccess(0)
        health.recordFailure(0, now: second)
        health.recordFailure(0, now: second)
        XCTAssertTrue(health.isHealthy(0, now: second), "the run was broken by a success")
    }

    func testFailuresWhileEjectedDoNotExtendEjection() {
        let health = UpstreamHealth(upstream: upstream(targets: 1, failures: 1, ejection: .seconds(10)))
        health.recordFailure(0, now: 100 * second)
        health.recordFailure(0, now: 105 * second)
        XCTAssertTrue(health.isHealthy(0, now: 110 * second))
        XCTAssertEqual(health.ejectionCount(0), 1)
    }

    func testNoPassiveConfigNeverEjects() {
        let health = UpstreamHealth(upstream: upstream(targets: 1, failures: nil))
        for _ in 0..<100 { health.recordFailure(0, now: second) }
        XCTAssertTrue(health.isHealthy(0, now: second))
    }

    func testActiveChecksFlipAfterThresholds() {
        let health = UpstreamHealth(upstream: upstream(targets: 2, healthy: 2, unhealthy: 3))
        health.recordProbe(0, healthy: false)
        health.recordProbe(0, healthy: false)
        XCTAssertTrue(health.isHealthy(0, now: 0))
        health.recordProbe(0, healthy: true)      // breaks the failure run
        health.recordProbe(0, healthy: false)
        health.recordProbe(0, healthy: false)
        XCTAssertTrue(health.isHealthy(0, now: 0))
        health.recordProbe(0, healthy: false)
        XCTAssertFalse(health.isHealthy(0, now: 0), "three consecutive failed probes")
        XCTAssertEqual(health.status(0, now: 0), .unhealthy)
        XCTAssertEqual(health.healthyCount, 1)
        health.recordProbe(0, healthy: true)
        XCTAssertFalse(health.isHealthy(0, now: 0), "one good probe is not enough")
        health.recordProbe(0, healthy: false)
        health.recordProbe(0, healthy: true)
        XCTAssertFalse(health.isHealthy(0, now: 0), "the success run was broken")
        health.recordProbe(0, healthy: true)
        XCTAssertTrue(health.isHealthy(0, now: 0), "two consecutive good probes")
        XCTAssertEqual(health.healthyCount, 2)
    }

    func testActiveRecoveryClearsPassiveEjection() {
        let health = UpstreamHealth(upstream: upstream(targets: 1, failures: 1, ejection: .seconds(3600), healthy: 1, unhealthy: 1))
        health.recordFailure(0, now: second)
        health.recordProbe(0, healthy: false)
        XCTAssertFalse(health.isHealthy(0, now: second))
        health.recordProbe(0, healthy: true)
        XCTAssertTrue(health.isHealthy(0, now: second), "passing active checks brings it back")
    }

    func testReloadKeepsStateOfTargetsThatStay() {
        let old = upstream(targets: 3, failures: 1, ejection: .seconds(60), unhealthy: 1)
        let before = UpstreamHealth(upstream: old)
        before.recordFailure(0, now: 100 * second)      // ejected
        before.recordProbe(1, healthy: false)            // down by active check
        var new = old
        new.targets = [old.targets[1], TargetConfig(address: HostPort(host: "127.0.0.1", port: 9999)), old.targets[0]]
        let after = UpstreamHealth(upstream: new, inheritingFrom: before)
        XCTAssertEqual(after.status(0, now: 100 * second), .unhealthy, "old target 1 moved to index 0, still down")
        XCTAssertEqual(after.status(1, now: 100 * second), .healthy, "a new target starts healthy")
        XCTAssertEqual(after.status(2, now: 100 * second), .ejected, "old target 0 moved to index 2, still ejected")
        XCTAssertTrue(after.isHealthy(2, now: 160 * second))
        XCTAssertEqual(UpstreamHealth(upstream: new, inheritingFrom: nil).healthyCount, 3)
    }

    func testConcurrentReportsAreSafe() {
        let health = UpstreamHealth(upstream: upstream(targets: 4, failures: 1_000_000))
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            for index in 0..<10_000 {
                if index % 2 == 0 { health.recordFailure(worker, now: second) } else { health.recordSuccess(worker) }
                _ = health.isHealthy((worker + 1) % 4, now: second)
            }
        }
        XCTAssertEqual(health.healthyCount, 4)
    }
}
