import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore

/// Receives the outcome of each active probe. `UpstreamHealth` (WeirCore)
/// conforms; it applies the healthy/unhealthy thresholds.
public protocol HealthProbeSink: AnyObject, Sendable {
    func recordProbe(_ target: Int, healthy: Bool)
    /// Whether the target is up as far as active checks go, after the
    /// thresholds; nil if the sink does not track it. The checker logs
    /// when this flips.
    func isUpByActiveChecks(_ target: Int) -> Bool?
}

extension HealthProbeSink {
    public func isUpByActiveChecks(_ target: Int) -> Bool? { nil }
}

/// Probes every target of every upstream that has `health_check.active`:
/// an HTTP/1.1 GET to `path` every `interval`, failing after `timeout`
/// (`type: tcp`: a TCP connect, healthy when accepted);
/// a status in `healthy_statuses` counts as healthy, anything else
/// (other status, refused connection, timeout, garbage) as unhealthy.
///
/// All probes run on one event loop with non-blocking NIO clients; the next
/// probe of a target is scheduled `interval` after the previous one ended, so
/// a slow target never has two probes in flight.
public final class ActiveHealthChecker: @unchecked Sendable {
    public struct Job: Sendable {
        public var upstream: String
        public var targetIndex: Int
        public var address: HostPort
        public var check: ActiveHealthCheck
        public var sink: HealthProbeSink
        /// TLS upstreams: the current context, looked up per probe (so a
        /// certificate reload applies to the next probe).
        public var tls: (@Sendable () -> UpstreamTLSContext?)? = nil
    }

    private let eventLoop: EventLoop
    private let jobs: [Job]
    private let logger: Logger
    private let lock = NIOLock()
    private var tasks: [RepeatedTask] = []
    private var started = false

    /// - Parameter sinkForUpstream: the health state object of an upstream
    ///   by name; upstreams without one (or without an active check) are skipped.
    /// - Parameter upstreamTLS: where TLS upstreams' contexts are (probes
    ///   to an upstream with `tls:` speak TLS, verified like requests).
    public init(upstreams: [UpstreamConfig], eventLoop: EventLoop, logger: Logger,
                upstreamTLS: UpstreamTLSRegistry? = nil,
                sinkForUpstream: (String) -> HealthProbeSink?) {
        var jobs: [Job] = []
        for upstream in upstreams {
            guard let check = upstream.healthCheck.active, let sink = sinkForUpstream(upstream.name) else { continue }
            let name = upstream.name
            var tls: (@Sendable () -> UpstreamTLSContext?)? = nil
            if upstream.tls != nil, let registry = upstreamTLS {
                tls = { registry.context(forUpstream: name) }
            }
            for (index, target) in upstream.targets.enumerated() {
                jobs.append(Job(upstream: upstream.name, targetIndex: index, address: target.address,
                                check: check, sink: sink, tls: tls))
            }
        }
        self.jobs = jobs
        self.eventLoop = eventLoop
        self.logger = logger
    }

    /// Number of targets being probed.
    public var targetCount: Int { jobs.count }

    /// Starts probing; the first round is spread over one interval.
    public func start() {
        lock.withLock {
            guard !started else { return }
            started = true
            for (position, job) in jobs.enumerated() {
                let interval = job.check.interval.nanoseconds
                let delay = TimeAmount.nanoseconds(interval)
                // Stagger first probes over one interval so many targets are
                // not all probed in the same instant, round after round.
                let stagger = TimeAmount.nanoseconds(interval / Int64(jobs.count) * Int64(position))
                let loop = eventLoop
                let task = loop.scheduleRepeatedAsyncTask(initialDelay: stagger, delay: delay) { [weak self] _ in
                    guard let self = self else { return loop.makeSucceededVoidFuture() }
                    return self.runProbe(job)
                }
                tasks.append(task)
            }
        }
    }

    /// Stops scheduling probes; a probe already in flight finishes on its own.
    public func stop() {
        lock.withLock {
            for task in tasks { task.cancel() }
            tasks.removeAll()
        }
    }

    private func runProbe(_ job: Job) -> EventLoopFuture<Void> {
        if job.check.type == .grpc { return runGRPCProbe(job) }
        if job.check.type == .tcp {
            return HealthProbe.connect(on: eventLoop, address: job.address, timeout: .nanoseconds(job.check.timeout.nanoseconds))
                .map { self.record(job, healthy: true, detail: "connected") }
                .recover { error in
                    self.logger.debug("health probe failed", metadata: [
                        "upstream": "\(job.upstream)", "target": "\(job.address)", "error": "\(error)"])
                    self.record(job, healthy: false, detail: HealthProbe.describe(error))
                }
        }
        return HealthProbe.run(on: eventLoop, address: job.address, path: job.check.path,
                        timeout: .nanoseconds(job.check.timeout.nanoseconds), tls: job.tls)
            .map { status -> Void in
                let healthy = job.check.healthyStatuses.contains(status)
                if !healthy {
                    self.logger.debug("health probe failed", metadata: [
                        "upstream": "\(job.upstream)", "target": "\(job.address)", "status": "\(status)"])
                }
                self.record(job, healthy: healthy, detail: "status \(status)")
            }
            .recover { error in
                self.logger.debug("health probe failed", metadata: [
                    "upstream": "\(job.upstream)", "target": "\(job.address)", "error": "\(error)"])
                self.record(job, healthy: false, detail: HealthProbe.describe(error))
            }
    }

    private func runGRPCProbe(_ job: Job) -> EventLoopFuture<Void> {
        GRPCHealthProbe.run(on: eventLoop, address: job.address, service: job.check.grpcService,
                            timeout: .nanoseconds(job.check.timeout.nanoseconds), tls: job.tls)
            .map { answer in
                self.record(job, healthy: answer.isServing, detail: answer.description)
            }
            .recover { error in
                self.record(job, healthy: false, detail: HealthProbe.describe(error))
            }
    }

    /// Reports the probe and logs when it flips the target up or down.
    private func record(_ job: Job, healthy: Bool, detail: String) {
        let before = job.sink.isUpByActiveChecks(job.targetIndex)
        job.sink.recordProbe(job.targetIndex, healthy: healthy)
        guard let wasUp = before, let isUp = job.sink.isUpByActiveChecks(job.targetIndex), wasUp != isUp else { return }
        let metadata: Logger.Metadata = ["upstream": "\(job.upstream)", "target": "\(job.address)", "last_probe": "\(detail)"]
        if isUp {
            logger.info("target is healthy again", metadata: metadata)
        } else {
            logger.warning("target is unhealthy", metadata: metadata)
        }
    }
}

/// One HTTP/1.1 health probe: connect, `GET path`, read the status line, close.
public enum HealthProbe {
    public struct TimedOut: Error, CustomStringConvertible {
        public init() {}
        public var description: String { "health probe timed out" }
    }

    public struct ConnectionClosedEarly: Error, CustomStringConvertible {
        public init() {}
        public var description: String { "connection closed before a response" }
    }

    /// A short reason for logs: `connection refused`, `timed out`, ...
    public static func describe(_ error: Error) -> String {
        switch error {
        case let connect as NIOConnectionError:
            if let failure = connect.connectionErrors.first {
                if let io = failure.error as? IOError { return "connect failed: \(String(cString: strerror(io.errnoCode)))" }
                return "connect failed: \(failure.error)"
            }
            return "\(connect)"
        case let io as IOError:
            return String(cString: strerror(io.errnoCode))
        case ChannelError.connectTimeout:
            return "connect timed out"
        default:
            return "\(error)"
        }
    }

    /// `type: tcp`: succeeds when a TCP connection is accepted within
    /// `timeout` (then closed at once), fails otherwise.
    public static func connect(on eventLoop: EventLoop, address: HostPort, timeout: TimeAmount) -> EventLoopFuture<Void> {
        ClientBootstrap(group: eventLoop)
            .connectTimeout(timeout)
            .connect(host: address.host, port: address.port)
            .flatMap { channel in channel.close() }
    }

    /// The response status, or a failed future (connect error, timeout,
    /// malformed response).
    /// `tls`: for TLS upstreams, the context to probe with (nil = plain;
    /// a TLS upstream whose context is missing is probed as failed).
    public static func run(on eventLoop: EventLoop, address: HostPort, path: String,
                           timeout: TimeAmount, tls: (@Sendable () -> UpstreamTLSContext?)? = nil) -> EventLoopFuture<Int> {
        let promise = eventLoop.makePromise(of: Int.self)
        let host = address.description
        let tlsContext = tls?()
        if tls != nil && tlsContext == nil {
            promise.fail(UpstreamTLSError(target: host, reason: "no TLS context loaded"))
            return promise.futureResult
        }
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // The TLS handler (if any) first; a failed handshake
                    // reaches ProbeHandler.errorCaught as an unhealthy probe.
                    try tlsContext?.addClientHandler(to: channel, targetHost: address.host)
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(
                        ProbeHandler(path: path, host: host, promise: promise))
                }
            }
        let deadline = eventLoop.scheduleTask(in: timeout) {
            promise.fail(TimedOut())
        }
        bootstrap.connect(host: address.host, port: address.port).whenComplete { result in
            switch result {
            case .success(let channel):
                // Whatever the outcome, the probe's connection is closed.
                promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
            case .failure(let error):
                promise.fail(error)
            }
        }
        promise.futureResult.whenComplete { _ in deadline.cancel() }
        return promise.futureResult
    }
}

private final class ProbeHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    private let path: String
    private let host: String
    private let promise: EventLoopPromise<Int>

    init(path: String, host: String, promise: EventLoopPromise<Int>) {
        self.path = path; self.host = host; self.promise = promise
    }

    func channelActive(context: ChannelHandlerContext) {
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path)
        head.headers.add(name: "Host", value: host)
        head.headers.add(name: "User-Agent", value: "weir-health-check")
        head.headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data) {
            promise.succeed(Int(head.status.code))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(HealthProbe.ConnectionClosedEarly())
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
