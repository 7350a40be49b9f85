import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import WeirAdmin
import WeirCore
import WeirTestSupport
import XCTest

/// The `weir` executable: validate, version, mode refusal, startup errors,
/// and SIGTERM drain, run as a real child process.
final class CLITests: XCTestCase {
    private var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("weir-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    // MARK: config checks (library + binary)

    static let badConfig = """
        listeners:
          - name: web
            listen: 127.0.0.1:notaport
        upstreams:
          - name: orders
            targets: [{ address: 127.0.0.1:9001 }]
            retrys: 2
        routes:
          - name: r1
            match: { paths: [/orders] }
            upstream: ordrs
        """

    func testConfigCheckListsEveryProblemWithItsPath() throws {
        let path = try write("bad.yaml", Self.badConfig)
        let result = ConfigCheck.run(path: path, environment: [:])
        XCTAssertFalse(result.isValid)
        XCTAssertEqual(result.exitCode, 1)
        XCTAssertTrue(result.message.contains("listeners[0].listen"), result.message)
        XCTAssertTrue(result.message.contains("upstreams[0].retrys"), result.message)
        XCTAssertTrue(result.message.contains("routes[0].upstream"), result.message)
        XCTAssertTrue(result.message.contains("ordrs"), result.message)
    }

    func testEveryExampleConfigIsValid() throws {
        let folder = Self.repoRoot.appendingPathComponent("examples")
        let files = try FileManager.default.contentsOfDirectory(atPath: folder.path).filter { $0.hasSuffix(".yaml") }
        XCTAssertTrue(files.contains("gateway.yaml"), "make run needs examples/gateway.yaml")
        for file in files {
            let result = ConfigCheck.run(path: folder.appendingPathComponent(file).path, environment: [:])
            XCTAssertTrue(result.isValid, "\(file): \(result.message)")
            XCTAssertEqual(result.exitCode, 0)
            XCTAssertTrue(result.message.hasPrefix("config OK"))
        }
    }

    func testValidateCommandExitCodesAndMessages() throws {
        let good = try Self.runWeir(["validate", "--config", Self.repoRoot.appendingPathComponent("examples/gateway.yaml").path])
        XCTAssertEqual(good.status, 0, good.stderr)
        XCTAssertTrue(good.stdout.hasPrefix("config OK"), good.stdout)

        let bad = try Self.runWeir(["validate", "--config", try write("bad.yaml", Self.badConfig)])
        XCTAssertEqual(bad.status, 1)
        for path in ["listeners[0].listen", "upstreams[0].retrys", "routes[0].upstream"] {
            XCTAssertTrue(bad.stderr.contains(path), "missing \(path) in:\n\(bad.stderr)")
        }

        let missing = try Self.runWeir(["validate", "--config", tempDir.appendingPathComponent("nope.yaml").path])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("cannot read config file"), missing.stderr)
    }

    /// Plugin configs are checked against their schemas by `weir validate`,
    /// conditional requirements (`required_when`) included.
    func testValidateRefusesAConditionallyRequiredPluginField() throws {
        let config = """
            plugin_paths: [\(Self.repoRoot.appendingPathComponent("plugins").path)]
            listeners: [{ name: web, listen: 127.0.0.1:0 }]
            upstreams: [{ name: app, targets: [{ address: 127.0.0.1:9001 }] }]
            routes:
              - name: r1
                match: { paths: [/] }
                upstream: app
                plugins:
                  - { name: rate-limiting, config: { minute: 10, limit_by: header } }
                  - { name: jwt, config: { consumer_claim_name: sub } }
            """
        let result = try Self.runWeir(["validate", "--config", try write("conditional.yaml", config)])
        XCTAssertEqual(result.status, 1, result.stdout)
        XCTAssertTrue(result.stderr.contains("routes[0].plugins[0].config.header_name: required when limit_by is \"header\""), result.stderr)
        XCTAssertTrue(result.stderr.contains("routes[0].plugins[1].config.jwks_uri: required when consumer_claim_name is set"), result.stderr)
    }

    func testVersion() throws {
        let result = try Self.runWeir(["version"])
        XCTAssertEqual(result.status, 0)
        XCTAssertTrue(result.stdout.hasPrefix("weir "), result.stdout)
    }

    func testSidecarModeIsRefused() throws {
        let config = Self.repoRoot.appendingPathComponent("examples/gateway.yaml").path
        let result = try Self.runWeir(["run", "--config", config, "--mode", "sidecar"])
        XCTAssertEqual(result.status, 2)
        XCTAssertTrue(result.stderr.contains("sidecar mode is not available yet"), result.stderr)

        let unknown = try Self.runWeir(["run", "--config", config, "--mode", "mesh"])
        XCTAssertNotEqual(unknown.status, 0)
        XCTAssertTrue(unknown.stderr.contains("--mode must be one of: gateway, sidecar"), unknown.stderr)
    }

    func testRunWithBadConfigPrintsTheSameListAsValidate() throws {
        let path = try write("bad.yaml", Self.badConfig)
        let run = try Self.runWeir(["run", "--config", path])
        let validate = try Self.runWeir(["validate", "--config", path])
        XCTAssertEqual(run.status, 1)
        XCTAssertEqual(run.stderr, validate.stderr)
    }

    func testReloadCommandReportsTheGatewaysAnswer() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let succeed = NIOLockedValueBox(true)
        let reload = AdminRoute(method: .POST, path: "/reload") { _, loop in
            loop.makeSucceededFuture(succeed.withLockedValue { $0 }
                ? AdminResponse.json(.ok, #"{"status":"reloaded","generation":2}"#)
                : AdminResponse.error(.unprocessableEntity, "plugins/x/handler.lua:3: syntax error"))
        }
        let withReload = AdminServer(listen: HostPort(host: "127.0.0.1", port: 0), group: group,
                                     endpoints: AdminEndpoints(isReady: { true }, metricsText: { "" }, configText: { "" },
                                                               routes: [reload]),
                                     logger: Logger(label: "test"))
        try withReload.start().wait()
        defer { try? withReload.stop().wait() }
        let reloadPort = try XCTUnwrap(withReload.boundAddress?.port)

        let ok = try Self.runWeir(["reload", "--admin", "127.0.0.1:\(reloadPort)"])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(ok.stdout.contains(#""generation":2"#), ok.stdout)

        succeed.withLockedValue { $0 = false }
        let failed = try Self.runWeir(["reload", "--admin", "127.0.0.1:\(reloadPort)"])
        XCTAssertEqual(failed.status, 1)
        XCTAssertTrue(failed.stderr.contains("handler.lua:3: syntax error"), failed.stderr)

        // An admin listener without /reload, found through a config file.
        let plain = AdminServer(listen: HostPort(host: "127.0.0.1", port: 0), group: group,
                                endpoints: AdminEndpoints(isReady: { true }, metricsText: { "" }, configText: { "" }),
                                logger: Logger(label: "test"))
        try plain.start().wait()
        defer { try? plain.stop().wait() }
        let config = try write("gw.yaml", """
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            admin: { listen: "127.0.0.1:\(try XCTUnwrap(plain.boundAddress?.port))" }
            """)
        let unsupported = try Self.runWeir(["reload", "--config", config])
        XCTAssertEqual(unsupported.status, 1)
        XCTAssertTrue(unsupported.stderr.contains("has no /reload endpoint"), unsupported.stderr)

        let unreachable = try Self.runWeir(["reload", "--admin", "127.0.0.1:\(try refusingPort())"])
        XCTAssertEqual(unreachable.status, 1)
        XCTAssertTrue(unreachable.stderr.contains("cannot reach the admin listener"), unreachable.stderr)
    }

    func testPortsInUseAreClearStartupErrors() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let occupied = try ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).wait()
        defer { try? occupied.close().wait() }
        let busyPort = try XCTUnwrap(occupied.localAddress?.port)

        let listenerBusy = try write("listener.yaml", """
            listeners: [{ name: web, listen: "127.0.0.1:\(busyPort)" }]
            """)
        let first = try Self.runWeir(["run", "--config", listenerBusy, "--workers", "1"])
        XCTAssertEqual(first.status, 1)
        XCTAssertTrue(first.stderr.contains("listener \"web\" could not bind 127.0.0.1:\(busyPort)"), first.stderr)

        let adminBusy = try write("admin.yaml", """
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            admin: { listen: "127.0.0.1:\(busyPort)" }
            """)
        let second = try Self.runWeir(["run", "--config", adminBusy, "--workers", "1"])
        XCTAssertEqual(second.status, 1)
        XCTAssertTrue(second.stderr.contains("admin listener could not bind 127.0.0.1:\(busyPort)"), second.stderr)
    }

    // MARK: serving and graceful shutdown

    func testSIGTERMLetsTheInFlightRequestFinishThenExitsZero() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let slowRequestArrived = DispatchSemaphore(value: 0)
        let origin = DemoUpstream(listen: HostPort(host: "127.0.0.1", port: 0), bodySize: 2048, group: group,
                                  onRequest: { head in if head.uri.hasPrefix("/delay/") { slowRequestArrived.signal() } })
        try origin.start().wait()
        defer { _ = try? origin.stop().wait() }
        let originPort = try XCTUnwrap(origin.boundAddress?.port)
        let accessLogPath = tempDir.appendingPathComponent("access.log").path
        let configPath = try write("gateway.yaml", """
            listeners:
              - { name: web, listen: "127.0.0.1:0" }
            upstreams:
              - name: demo
                targets: [{ address: "127.0.0.1:\(originPort)" }]
                health_check:
                  active: { path: /healthz, interval: 200ms, timeout: 100ms }
            routes:
              - { name: default, match: { paths: [/] }, upstream: demo }
            access_log: \(accessLogPath)
            drain_timeout: 10s
            admin: { listen: "127.0.0.1:0" }
            """)

        let weir = try WeirChildProcess(["run", "--config", configPath, "--workers", "1"])
        defer { weir.stop() }
        let process = weir.process
        let proxyPort = try weir.port(listener: "web"), adminPort = try weir.adminPort()

        // A normal request through the proxy shows up in /metrics.
        let plain = try OpsTestHTTP.request(port: proxyPort, path: "/hello", group: group)
        XCTAssertEqual(plain.status, 200)
        XCTAssertEqual(plain.body.utf8.count, 2048)
        let metrics = try OpsTestHTTP.request(port: adminPort, path: "/metrics", group: group).body
        XCTAssertTrue(metrics.contains(#"weir_requests_total{route="default",upstream="demo",status_class="2xx"} 1"#),
                      metrics)
        XCTAssertTrue(metrics.contains(#"weir_upstream_target_healthy{upstream="demo",target="127.0.0.1:\#(originPort)"} 1"#),
                      metrics)
        let config = try OpsTestHTTP.request(port: adminPort, path: "/config", group: group)
        XCTAssertEqual(config.status, 200)
        XCTAssertTrue(config.body.contains("127.0.0.1:\(originPort)"), config.body)

        let upstreams = try OpsTestHTTP.request(port: adminPort, path: "/upstreams", group: group)
        XCTAssertEqual(upstreams.status, 200)
        XCTAssertTrue(upstreams.body.contains(#""address":"127.0.0.1:\#(originPort)","weight":1,"status":"healthy""#),
                      upstreams.body)

        // A slow request is in flight (it reached the origin) when SIGTERM arrives.
        let slow = DispatchQueue.global().asyncResult {
            try OpsTestHTTP.request(port: proxyPort, path: "/delay/2500", group: group, timeout: .seconds(20))
        }
        XCTAssertEqual(slowRequestArrived.wait(timeout: .now() + 10), .success, "slow request never reached the origin")
        kill(process.processIdentifier, SIGTERM)

        // While draining, the admin listener stays up and says "not ready".
        OpsTestHTTP.eventually("admin /ready answers 503 while draining") {
            (try? OpsTestHTTP.request(port: adminPort, path: "/ready", group: group))?.status == 503
        }
        XCTAssertTrue(process.isRunning, "the in-flight request keeps the process alive")

        let response = try slow.wait(timeout: 20)
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.body.utf8.count, 2048, "the in-flight response is complete")

        try weir.waitForExit()
        let stderrText = weir.logText
        XCTAssertEqual(process.terminationReason, .exit)
        XCTAssertEqual(process.terminationStatus, 0, stderrText)
        XCTAssertTrue(stderrText.contains("draining"), stderrText)

        // Listener closed after exit, and both requests are in the access log.
        XCTAssertThrowsError(try OpsTestHTTP.request(port: proxyPort, path: "/", group: group))
        let log = try String(contentsOfFile: accessLogPath, encoding: .utf8)
        let entries = try log.split(separator: "\n").map {
            try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])
        }
        XCTAssertEqual(entries.compactMap { $0["path"] as? String }.sorted(), ["/delay/2500", "/hello"])
        XCTAssertTrue(entries.allSatisfy { $0["status"] as? Int == 200 && $0["route"] as? String == "default" })
    }

    /// SIGTERM: after the drain, http-log records still queued (an hour's
    /// flush interval) are sent to the collector before the process exits.
    func testSIGTERMSendsQueuedPluginRecordsBeforeExiting() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let origin = DemoUpstream(listen: HostPort(host: "127.0.0.1", port: 0), bodySize: 10, group: group)
        try origin.start().wait()
        defer { _ = try? origin.stop().wait() }
        let collector = try ScriptedHTTPServer(group: group)
        defer { collector.stop() }
        let configPath = try write("logged.yaml", """
            plugin_paths: [\(Self.repoRoot.appendingPathComponent("plugins").path)]
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            upstreams: [{ name: demo, targets: [{ address: "127.0.0.1:\(try XCTUnwrap(origin.boundAddress?.port))" }] }]
            routes:
              - name: all
                upstream: demo
                plugins:
                  - { name: http-log, config: { endpoint: "\(collector.url)/logs", flush_interval: 3600, batch_size: 1000 } }
            access_log: "off"
            drain_timeout: 5s
            admin: { listen: "127.0.0.1:0" }
            """)
        let weir = try WeirChildProcess(["run", "--config", configPath, "--workers", "2"])
        defer { weir.stop() }
        let proxyPort = try weir.port(listener: "web")
        for i in 0..<4 { XCTAssertEqual(try OpsTestHTTP.request(port: proxyPort, path: "/q\(i)", group: group).status, 200) }
        XCTAssertEqual(collector.requests.count, 0, "nothing sent before the shutdown (an hour's flush interval)")

        kill(weir.process.processIdentifier, SIGTERM)
        try weir.waitForExit()
        XCTAssertEqual(weir.process.terminationStatus, 0, weir.logText)
        let paths = collector.requests.flatMap { ($0.json as? [[String: Any]]) ?? [] }.compactMap { $0["path"] as? String }
        XCTAssertEqual(paths.sorted(), ["/q0", "/q1", "/q2", "/q3"], "every queued record arrived before the exit; weir's log:\n\(weir.logText)")
    }

    func testAccessLogGoesToStdoutByDefaultAndLogsToStderr() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let origin = DemoUpstream(listen: HostPort(host: "127.0.0.1", port: 0), bodySize: 10, group: group)
        try origin.start().wait()
        defer { _ = try? origin.stop().wait() }
        let configPath = try write("stdout.yaml", """
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            upstreams: [{ name: demo, targets: [{ address: "127.0.0.1:\(try XCTUnwrap(origin.boundAddress?.port))" }] }]
            routes: [{ name: all, upstream: demo }]
            admin: { listen: "127.0.0.1:0" }
            """)
        let stdoutPipe = Pipe()
        let weir = try WeirChildProcess(["run", "--config", configPath, "--workers", "1"], standardOutput: stdoutPipe)
        defer { weir.stop() }
        let proxyPort = try weir.port(listener: "web")
        XCTAssertEqual(try OpsTestHTTP.request(port: proxyPort, path: "/to-stdout", group: group).status, 200)
        // Read to the end while the child drains (bounded: a child that never
        // closes stdout fails the test instead of hanging the suite).
        let stdoutRead = DispatchQueue.global().asyncResult { stdoutPipe.fileHandleForReading.readDataToEndOfFile() }
        kill(weir.process.processIdentifier, SIGINT)
        try weir.waitForExit()
        let stdoutText = String(decoding: try stdoutRead.wait(timeout: 60), as: UTF8.self)
        let stderrText = weir.logText
        XCTAssertEqual(weir.process.terminationStatus, 0, stderrText)
        let lines = stdoutText.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "stdout carries only the access log:\n\(stdoutText)")
        let entry = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any])
        XCTAssertEqual(entry["path"] as? String, "/to-stdout")
        XCTAssertTrue(stderrText.contains("listening"), stderrText)
        XCTAssertFalse(stderrText.contains("/to-stdout"), "no access log on stderr")
    }

    /// A stop signal that arrives while the gateway is still starting (after
    /// its listeners bound, before its signal watchers were set up) is kept
    /// and drains once they are: it was once ignored, leaving a gateway that
    /// never stopped (and a test that waited forever).
    func testTerminationSignalDuringStartupDrainsAndExitsZero() throws {
        let configPath = try write("early.yaml", """
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            upstreams: [{ name: demo, targets: [{ address: "127.0.0.1:9" }] }]
            routes: [{ name: all, upstream: demo }]
            admin: { listen: "127.0.0.1:0" }
            """)
        for signalNumber in [SIGTERM, SIGINT] {
            // The listeners log "listening" from inside `weir run`, so the
            // signal below is sent during the start-up, never before it.
            let weir = try WeirChildProcess(["run", "--config", configPath, "--workers", "1"],
                                            readyLine: "[WeirProxy] listening")
            defer { weir.stop() }
            kill(weir.process.processIdentifier, signalNumber)
            try weir.waitForExit()
            XCTAssertEqual(weir.process.terminationReason, .exit, weir.logText)
            XCTAssertEqual(weir.process.terminationStatus, 0, weir.logText)
            XCTAssertTrue(weir.logText.contains("signal=\(signalNumber)"), weir.logText)
            XCTAssertTrue(weir.logText.contains("stopped"), weir.logText)
        }
    }

    /// Why the signal above is never lost: every thread of `weir run` blocks
    /// the signals it watches, so one that arrives before the dispatch
    /// signal source is set up (asynchronously, on Linux) stays pending for it.
    /// A thread that does not block them (e.g. one started before the mask
    /// was set) would take such a signal and drop or die of it.
    func testEveryGatewayThreadBlocksTheWatchedSignals() throws {
        let configPath = try write("mask.yaml", """
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            upstreams: [{ name: demo, targets: [{ address: "127.0.0.1:9" }] }]
            routes: [{ name: all, upstream: demo }]
            admin: { listen: "127.0.0.1:0" }
            """)
        let weir = try WeirChildProcess(["run", "--config", configPath, "--workers", "2"])
        defer { weir.stop() }
        let tasks = "/proc/\(weir.process.processIdentifier)/task"
        let threads = try FileManager.default.contentsOfDirectory(atPath: tasks)
        XCTAssertGreaterThan(threads.count, 2, "event loops and the dispatch manager run as threads")
        for thread in threads {
            let status = try String(contentsOfFile: "\(tasks)/\(thread)/status", encoding: .utf8)
            let blockedHex = try XCTUnwrap(status.split(separator: "\n").first { $0.hasPrefix("SigBlk:") })
                .dropFirst("SigBlk:".count).trimmingCharacters(in: .whitespaces)
            let blocked = try XCTUnwrap(UInt64(blockedHex, radix: 16), status)
            for signalNumber in [SIGTERM, SIGINT, SIGHUP, SIGUSR1] {
                XCTAssertNotEqual(blocked & (1 << UInt64(signalNumber - 1)), 0,
                                  "thread \(thread) does not block signal \(signalNumber):\n\(status)")
            }
        }
        kill(weir.process.processIdentifier, SIGTERM)
        try weir.waitForExit()
        XCTAssertEqual(weir.process.terminationStatus, 0, weir.logText)
    }

    // MARK: helpers

    private func write(_ name: String, _ text: String) throws -> String {
        let url = tempDir.appendingPathComponent(name)
        try text.write(to: url, atomically: true, encoding: .utf8)
        return url.path
    }

    static var repoRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    /// The `weir` binary built alongside this test bundle (same scratch
    /// folder and configuration), or `$WEIR_BINARY`.
    static func weirBinary() throws -> URL {
        if let override = ProcessInfo.processInfo.environment["WEIR_BINARY"] {
            return URL(fileURLWithPath: override)
        }
        var candidates: [URL] = []
        for bundle in [Bundle(for: CLITests.self), Bundle.main] {
            let url = bundle.bundleURL
            candidates.append(url.deletingLastPathComponent().appendingPathComponent("weir"))
            candidates.append(url.appendingPathComponent("weir"))
        }
        for candidate in candidates where FileManager.default.isExecutableFile(atPath: candidate.path) {
            return candidate
        }
        struct BinaryNotFound: Error, CustomStringConvertible { var description: String }
        throw BinaryNotFound(description: "weir binary not found next to the test bundle (tried "
            + "\(candidates.map(\.path))); build it first (`swift build --build-tests`) or set WEIR_BINARY")
    }

    struct RunResult { var status: Int32; var stdout: String; var stderr: String }

    /// Runs `weir` to its end (bounded): both pipes are read while it runs,
    /// so a child that fills stderr before it closes stdout cannot block.
    static func runWeir(_ arguments: [String]) throws -> RunResult {
        let result = try runProgram(try weirBinary().path, arguments, timeoutSeconds: 120)
        return RunResult(status: result.status, stdout: result.out, stderr: result.err)
    }
}

/// A value computed on another queue, awaited with a timeout.
final class AsyncResult<Value> {
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<Value, Error>?

    fileprivate func complete(_ result: Result<Value, Error>) {
        self.result = result
        done.signal()
    }

    struct TimedOut: Error {}

    func wait(timeout seconds: Double) throws -> Value {
        guard done.wait(timeout: .now() + seconds) == .success, let result = result else { throw TimedOut() }
        return try result.get()
    }
}

extension DispatchQueue {
    func asyncResult<Value>(_ body: @escaping () throws -> Value) -> AsyncResult<Value> {
        let box = AsyncResult<Value>()
        async { box.complete(Result { try body() }) }
        return box
    }
}
