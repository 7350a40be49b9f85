import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WeirAdmin
import WeirCore
import WeirProxy
import WeirTestSupport
import XCTest

/// Records every probe outcome per target, so tests see exactly what the
/// checker reported.
final class RecordingProbeSink: HealthProbeSink, @unchecked Sendable {
    private let results = NIOLockedValueBox<[Int: [Bool]]>([:])

    func recordProbe(_ target: Int, healthy: Bool) {
        results.withLockedValue { $0[target, default: []].append(healthy) }
    }

    func outcomes(_ target: Int) -> [Bool] { results.withLockedValue { $0[target] ?? [] } }
    func last(_ target: Int) -> Bool? { outcomes(target).last }
}

/// Keeps every log message, for asserting on what operators will see.
final class CapturingLogHandler: LogHandler, @unchecked Sendable {
    private let storage = NIOLockedValueBox<[(Logger.Level, String)]>([])
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        storage.withLockedValue { $0.append((event.level, event.message.description)) }
    }

    func messages(atLeast level: Logger.Level) -> [String] {
        storage.withLockedValue { $0.filter { $0.0 >= level }.map(\.1) }
    }
}

/// Active health checks against real NIO servers on loopback.
final class HealthCheckerTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!

    override func setUp() { group = MultiThreadedEventLoopGroup(numberOfThreads: 2) }
    override func tearDown() { try? group.syncShutdownGracefully() }

    private func upstream(_ name: String, ports: [Int], path: String = "/healthz") -> UpstreamConfig {
        var upstream = UpstreamConfig()
        upstream.name = name
        upstream.targets = ports.map { TargetConfig(address: HostPort(host: "127.0.0.1", port: $0)) }
        var active = ActiveHealthCheck()
        active.path = path
        active.interval = .milliseconds(50)
        // Stopped targets refuse at once; a generous timeout keeps a slow
        // probe on a loaded machine from marking a live target down.
        active.timeout = .seconds(2)
        upstream.healthCheck.active = active
        return upstream
    }

    /// On any port, or again on the port of a stopped one (retried while
    /// another socket briefly holds it).
    private func startDemo(port: Int = 0) throws -> (DemoUpstream, Int) {
        let demo = try retryWhilePortTaken {
            let demo = DemoUpstream(listen: HostPort(host: "127.0.0.1", port: port), bodySize: 16, group: group)
            try demo.start().wait()
            return demo
        }
        return (demo, try XCTUnwrap(demo.boundAddress?.port))
    }

    func testTargetGoesDownWhenItsServerStopsAndUpWhenItReturns() throws {
        let (first, firstPort) = try startDemo()
        let (second, secondPort) = try startDemo()
        defer { _ = try? second.stop().wait() }
        let sink = RecordingProbeSink()
        let checker = ActiveHealthChecker(upstreams: [upstream("orders", ports: [firstPort, secondPort])],
                                          eventLoop: group.next(), logger: Logger(label: "test"),
                                          sinkForUpstream: { $0 == "orders" ? sink : nil })
        XCTAssertEqual(checker.targetCount, 2)
        checker.start()
        defer { checker.stop() }

        OpsTestHTTP.eventually("both targets probed healthy") { sink.last(0) == true && sink.last(1) == true }

        try first.stop().wait()
        OpsTestHTTP.eventually("stopped target probed unhealthy") { sink.last(0) == false }
        XCTAssertEqual(sink.last(1), true, "the other target is unaffected")

        let (restarted, _) = try startDemo(port: firstPort)
        defer { _ = try? restarted.stop().wait() }
        OpsTestHTTP.eventually("restarted target probed healthy again") { sink.last(0) == true }
    }

    func testUpstreamHealthThresholdsTakeATargetOutAndBringItBack() throws {
        let (demo, port) = try startDemo()
        var config = upstream("orders", ports: [port])
        config.healthCheck.active?.unhealthy = 2
        config.healthCheck.active?.healthy = 2
        let health = UpstreamHealth(upstream: config)
        let logs = CapturingLogHandler()
        let checker = ActiveHealthChecker(upstreams: [config], eventLoop: group.next(),
                                          logger: Logger(label: "test", factory: { _ in logs }),
                                          sinkForUpstream: { _ in health })
        checker.start()
        defer { checker.stop() }
        XCTAssertEqual(health.healthyCount, 1)

        try demo.stop().wait()
        OpsTestHTTP.eventually("target taken out after 2 failed probes") { health.healthyCount == 0 }
        XCTAssertEqual(health.status(0, now: MonotonicClock.now()), .unhealthy)

        let (restarted, _) = try startDemo(port: port)
        defer { _ = try? restarted.stop().wait() }
        OpsTestHTTP.eventually("target back after 2 good probes") { health.healthyCount == 1 }
        OpsTestHTTP.eventually("both transitions logged") { logs.messages(atLeast: .info).count == 2 }
        XCTAssertEqual(logs.messages(atLeast: .info), ["target is unhealthy", "target is healthy again"])
    }

    func testStatusOutsideHealthyStatusesIsUnhealthy() throws {
        let (demo, port) = try startDemo()
        defer { _ = try? demo.stop().wait() }
        let sink = RecordingProbeSink()
        let checker = ActiveHealthChecker(upstreams: [upstream("broken", ports: [port], path: "/status/500")],
                                          eventLoop: group.next(), logger: Logger(label: "test"),
                                          sinkForUpstream: { _ in sink })
        checker.start()
        defer { checker.stop() }
        OpsTestHTTP.eventually("three probes recorded") { sink.outcomes(0).count >= 3 }
        XCTAssertFalse(sink.outcomes(0).contains(true))
    }

    func testProbeTimesOutOnATargetThatNeverAnswers() throws {
        // A listener that accepts but never responds: only the timeout can end the probe.
        let silent = try ServerBootstrap(group: group)
            .childChannelInitializer { $0.eventLoop.makeSucceededVoidFuture() }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? silent.close().wait() }
        let port = try XCTUnwrap(silent.localAddress?.port)
        let result = HealthProbe.run(on: group.next(), address: HostPort(host: "127.0.0.1", port: port),
                                     path: "/healthz", timeout: .milliseconds(200))
        XCTAssertThrowsError(try result.wait()) { error in
            XCTAssertTrue(error is HealthProbe.TimedOut, "\(error)")
        }
    }

    func testProbeFailureReasonsAreShort() throws {
        let port = try refusingPort()
        let result = HealthProbe.run(on: group.next(), address: HostPort(host: "127.0.0.1", port: port),
                                     path: "/healthz", timeout: .seconds(2))
        XCTAssertThrowsError(try result.wait()) { error in
            XCTAssertEqual(HealthProbe.describe(error), "connect failed: Connection refused")
        }
        XCTAssertEqual(HealthProbe.describe(HealthProbe.TimedOut()), "health probe timed out")
    }

    func testUpstreamsWithoutActiveCheckAreNotProbed() throws {
        var plain = UpstreamConfig()
        plain.name = "plain"
        plain.targets = [TargetConfig(address: HostPort(host: "127.0.0.1", port: 1))]
        let checker = ActiveHealthChecker(upstreams: [plain], eventLoop: group.next(), logger: Logger(label: "test"),
                                          sinkForUpstream: { _ in RecordingProbeSink() })
        XCTAssertEqual(checker.targetCount, 0)
    }
}
