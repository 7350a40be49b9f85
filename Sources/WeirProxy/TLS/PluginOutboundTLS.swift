import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import WeirCore
import WeirLua

/// TLS for plugins' `weir.http.request` to https:// URLs, built like an
/// upstream's `tls:` block (`UpstreamTLSContext`): system CAs or `ca_file`,
/// chain and host-name verification unless `ssl_verify = false`. One context
/// per settings, built on first use; one provider per generation, so a
/// reload re-reads a changed CA file.
final class PluginOutboundTLS: OutboundTLSProvider {
    private let contexts = NIOLockedValueBox<[OutboundTLSSettings: UpstreamTLSContext]>([:])

    func secure(_ channel: Channel, host: String, settings: OutboundTLSSettings) -> EventLoopFuture<Void> {
        do {
            let context = try self.context(for: settings)
            try context.addClientHandler(to: channel, targetHost: host)
        } catch {
            return channel.eventLoop.makeFailedFuture(PluginTLSError(description: "\(error)"))
        }
        return UpstreamTLSContext.handshakeDone(on: channel, target: host).flatMapErrorThrowing { error in
            guard let failed = error as? UpstreamTLSError else { throw error }
            throw PluginTLSError(description: "TLS handshake with \(failed.target) failed: \(failed.reason)")
        }
    }

    private func context(for settings: OutboundTLSSettings) throws -> UpstreamTLSContext {
        if let known = contexts.withLockedValue({ $0[settings] }) { return known }
        var config = UpstreamTLSConfig()
        config.verify = settings.verify
        config.ca = settings.caFile
        // Reads the CA file once per settings per generation (first https call).
        let built = try UpstreamTLSContext(config: config, path: "weir.http.request")
        contexts.withLockedValue { $0[settings] = built }
        return built
    }
}

struct PluginTLSError: Error, CustomStringConvertible {
    var description: String
}
