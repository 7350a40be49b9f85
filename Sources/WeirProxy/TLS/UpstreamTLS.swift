import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import NIOTLS
import WeirCore

/// TLS to one upstream's targets, built from its `tls:` block: trust roots
/// (`ca` or the system's), verification (chain + host name unless
/// `verify: false`), client certificate for mTLS. Immutable; a reload that
/// changes the files or the block puts a new one in `UpstreamTLSRegistry`.
///
/// Each new pooled connection does one full handshake; it is then reused
/// for many requests (keep-alive pool). swift-nio-ssl has no API to keep
/// and offer client sessions, so there is no upstream session resumption.
public final class UpstreamTLSContext: @unchecked Sendable {
    let context: NIOSSLContext
    let config: UpstreamTLSConfig

    /// `applicationProtocols`: what ALPN offers (`h2` for `protocol: http2`
    /// upstreams, which then check the server chose it).
    init(config: UpstreamTLSConfig, path: String, applicationProtocols: [String] = ["http/1.1"]) throws {
        var problems: [ConfigIssue] = []
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        configuration.applicationProtocols = applicationProtocols
        // Closing a pooled connection: send close_notify, then wait only
        // briefly for the upstream's (the 5 s default held sockets open).
        configuration.shutdownTimeout = .milliseconds(200)
        configuration.certificateVerification = config.verify ? .fullVerification : .none
        if let ca = config.ca, let roots = TLSFiles.certificates(ca, path: path + ".ca", problems: &problems) {
            configuration.trustRoots = .certificates(roots)
        }
        if let cert = config.cert, let key = config.key,
           let pair = TLSFiles.keyPair(cert: cert, key: key, path: path, problems: &problems) {
            configuration.certificateChain = pair.chain.map { .certificate($0) }
            configuration.privateKey = .privateKey(pair.key)
        }
        if problems.isEmpty {
            do {
                self.context = try NIOSSLContext(configuration: configuration)
                self.config = config
                return
            } catch {
                problems.append(ConfigIssue(path: path, message: "cannot build a TLS context: \(TLSFiles.describe(error))"))
            }
        }
        throw TLSFileProblems(issues: problems)
    }

    /// SNI and the name checked against the certificate: `sni`, else the
    /// target's host; an IP target without `sni` sends no SNI and its
    /// certificate must name that IP.
    func serverHostname(targetHost: String) -> String? {
        if let sni = config.sni { return sni }
        return targetHost.isIPAddressLiteral ? nil : targetHost
    }

    /// Adds the client TLS handler first in an upstream channel's pipeline.
    func addClientHandler(to channel: Channel, targetHost: String) throws {
        let handler = try NIOSSLClientHandler(context: context, serverHostname: serverHostname(targetHost: targetHost))
        try channel.pipeline.syncOperations.addHandler(handler, position: .first)
    }

    /// Completes when the handshake on `channel` succeeded; fails with
    /// `UpstreamTLSError` (the reason, e.g. a certificate that does not
    /// verify) when it did not. Call after `addClientHandler`.
    static func handshakeDone(on channel: Channel, target: String) -> EventLoopFuture<Void> {
        let promise = channel.eventLoop.makePromise(of: Void.self)
        let waiter = HandshakeWaiter(promise: promise, target: target)
        do {
            let ssl = try channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)
            try channel.pipeline.syncOperations.addHandler(waiter, position: .after(ssl))
        } catch {
            promise.fail(error)
        }
        return promise.futureResult
    }
}

/// Why a TLS connection to a target failed, for the 502 and the log.
public struct UpstreamTLSError: Error, CustomStringConvertible {
    public let target: String
    public let reason: String
    public var description: String { "TLS handshake with upstream \(target) failed: \(reason)" }
}

private final class HandshakeWaiter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private var promise: EventLoopPromise<Void>?
    private let target: String

    init(promise: EventLoopPromise<Void>, target: String) {
        self.promise = promise
        self.target = target
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls, let promise {
            self.promise = nil
            // From here on, NIOSSL's records go to the socket through
            // TLSRecordWriter (adding fails only on a closed pipeline).
            try? context.pipeline.syncOperations.addHandler(TLSRecordWriter(), position: .first)
            promise.succeed(())
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let promise {
            self.promise = nil
            promise.fail(UpstreamTLSError(target: target, reason: Self.reason(error)))
            context.close(promise: nil)
            return
        }
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let promise {
            self.promise = nil
            promise.fail(UpstreamTLSError(target: target, reason: "connection closed during the handshake"))
        }
        context.fireChannelInactive()
    }

    static func reason(_ error: Error) -> String {
        if let extra = error as? NIOSSLExtraError, extra == .failedToValidateHostname {
            return "certificate does not match the expected host name (\(extra))"
        }
        switch error {
        case let ssl as NIOSSLError:
            if case .handshakeFailed(let inner) = ssl {
                let text = "\(inner)"
                if text.contains("CERTIFICATE_VERIFY_FAILED") { return "certificate verify failed (\(text))" }
                return "handshake failed (\(text))"
            }
            return "\(ssl)"
        default:
            return "\(error)"
        }
    }
}

/// The current TLS context of every TLS upstream, by upstream name.
/// Shared by all event loops (read once per new upstream connection) and
/// the health checker; a reload replaces its contents.
public final class UpstreamTLSRegistry: @unchecked Sendable {
    private let contexts = NIOLockedValueBox<[String: UpstreamTLSContext]>([:])

    public init() {}

    public func context(forUpstream name: String) -> UpstreamTLSContext? {
        contexts.withLockedValue { $0[name] }
    }

    func replaceAll(_ new: [String: UpstreamTLSContext]) {
        contexts.withLockedValue { $0 = new }
    }

    /// Builds every TLS upstream's context; throws every file problem.
    static func build(_ config: WeirConfig) throws -> [String: UpstreamTLSContext] {
        var result: [String: UpstreamTLSContext] = [:]
        var problems: [ConfigIssue] = []
        for (index, upstream) in config.upstreams.enumerated() {
            guard let tls = upstream.tls else { continue }
            do {
                result[upstream.name] = try UpstreamTLSContext(
                    config: tls, path: "upstreams[\(index)].tls",
                    applicationProtocols: upstream.upstreamProtocol == .http2 ? ["h2"] : ["http/1.1"])
            } catch let error as TLSFileProblems {
                problems += error.issues
            } catch {
                problems.append(ConfigIssue(path: "upstreams[\(index)].tls", message: "\(error)"))
            }
        }
        if !problems.isEmpty { throw TLSFileProblems(issues: problems) }
        return result
    }
}

extension String {
    var isIPAddressLiteral: Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, self, &v4) == 1 || inet_pton(AF_INET6, self, &v6) == 1
    }
}
