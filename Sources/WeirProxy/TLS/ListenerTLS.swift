import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import NIOTLS
import WeirCore

// Downstream TLS on a `protocol: https` listener. Pipeline of a new
// connection, before the HTTP handlers exist:
//
//   socket ─▶ TLSHelloInspector ─▶ (NIOSSLServerHandler ─▶ TLSHandshakeRecorder, added once the ClientHello is in)
//
// 1. TLSHelloInspector buffers the ClientHello, reads its SNI, picks that
//    certificate's NIOSSLContext from the listener's current
//    ServerTLSContexts, adds the NIOSSLServerHandler behind itself and
//    replays the bytes. On the way out it reads the ServerHello's cipher
//    suite, then leaves the pipeline.
// 2. TLSHandshakeRecorder waits for the handshake to complete, builds the
//    connection's TLSConnectionInfo (version, cipher, SNI, ALPN, verified
//    client certificate), hands the channel to the HTTP pipeline (the
//    `installHTTP` closure from ProxyServer) and leaves. Before that it
//    puts a TLSRecordWriter in front of NIOSSL, which from then on sends
//    the encrypted records (and forwards read requests) to the socket
//    itself. The HTTP pipeline is then:
//
//      socket ─▶ TLSRecordWriter ─▶ NIOSSLServerHandler ─▶ DownstreamHandler
//
//    (DownstreamHandler calls NIOSSLServerHandler's write/flush itself and
//    asks the channel core for reads: SoleHandlerIO "Behind TLS".)
//
// So the HTTP handlers, the connection phase included, only ever see
// connections whose handshake succeeded, with their TLS info known.
//
// Any handler behind a NIOSSLHandler (here and on TLS upstreams) must let
// go of a read buffer once it has consumed it: NIOSSL decrypts every read
// into one 32 KB buffer and reuses it only while nobody else holds it, so
// keeping the drained buffer costs a 32 KB copy per read (see
// DownstreamHandler.channelRead and UpstreamHandler.channelRead).

/// A listener's TLS state: the contexts new handshakes use, swapped by a
/// reload (certificate files changed or the `tls:` block did). Connections
/// already accepted keep the context they started with.
public final class ListenerTLS: @unchecked Sendable {
    let name: String
    private let contexts: NIOLockedValueBox<ServerTLSContexts>
    private let settings: NIOLockedValueBox<ListenerTLSConfig>

    init(name: String, config: ListenerTLSConfig, contexts: ServerTLSContexts) {
        self.name = name
        self.contexts = NIOLockedValueBox(contexts)
        self.settings = NIOLockedValueBox(config)
    }

    var current: ServerTLSContexts { contexts.withLockedValue { $0 } }
    var config: ListenerTLSConfig { settings.withLockedValue { $0 } }

    func replace(config: ListenerTLSConfig, contexts newContexts: ServerTLSContexts) {
        settings.withLockedValue { $0 = config }
        contexts.withLockedValue { $0 = newContexts }
    }

    /// Adds the TLS front of the pipeline (see the chart above). Runs in the
    /// child channel initializer, on the channel's loop.
    func addHandlers(to channel: Channel, logger: Logger, onClosedBeforeHTTP: @escaping () -> Void,
                     installHTTP: @escaping (Channel, TLSConnectionInfo) throws -> Void) throws {
        let config = self.config
        let state = TLSHandshakeState(onClosedBeforeHTTP: onClosedBeforeHTTP)
        let inspector = TLSHelloInspector(contexts: current, state: state, logger: logger, listener: name,
                                          handshakeTimeout: .nanoseconds(config.handshakeTimeout.nanoseconds),
                                          installHTTP: installHTTP)
        try channel.pipeline.syncOperations.addHandler(inspector)
    }
}

/// What the TLS front handlers of one connection share.
final class TLSHandshakeState {
    var serverName: String?
    var cipher: UInt16?
    var timeout: Scheduled<Void>?
    private var onClosedBeforeHTTP: (() -> Void)?

    init(onClosedBeforeHTTP: @escaping () -> Void) {
        self.onClosedBeforeHTTP = onClosedBeforeHTTP
    }

    /// The HTTP pipeline owns the connection now (it counts its close).
    func handedOver() {
        onClosedBeforeHTTP = nil
        timeout?.cancel()
        timeout = nil
    }

    /// The connection ended before the HTTP pipeline took it: release its
    /// listener slot once.
    func closedBeforeHTTP() {
        timeout?.cancel()
        timeout = nil
        let release = onClosedBeforeHTTP
        onClosedBeforeHTTP = nil
        release?()
    }
}

/// First handler of a TLS connection: SNI → certificate, cipher sniffing.
final class TLSHelloInspector: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let contexts: ServerTLSContexts
    private let state: TLSHandshakeState
    private let logger: Logger
    private let listener: String
    private let handshakeTimeout: TimeAmount
    private let installHTTP: (Channel, TLSConnectionInfo) throws -> Void
    private var inbound: ByteBuffer?
    private var outbound: ByteBuffer?
    private var helloSeen = false

    init(contexts: ServerTLSContexts, state: TLSHandshakeState, logger: Logger, listener: String,
         handshakeTimeout: TimeAmount, installHTTP: @escaping (Channel, TLSConnectionInfo) throws -> Void) {
        self.contexts = contexts
        self.state = state
        self.logger = logger
        self.listener = listener
        self.handshakeTimeout = handshakeTimeout
        self.installHTTP = installHTTP
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // A client that connects and never finishes its handshake must not
        // hold a connection slot forever.
        let channel = context.channel
        let logger = self.logger
        state.timeout = context.eventLoop.scheduleTask(in: handshakeTimeout) {
            logger.debug("TLS handshake timed out", metadata: ["listener": "\(self.listener)"])
            channel.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !helloSeen else {
            context.fireChannelRead(data)
            return
        }
        var bytes = unwrapInboundIn(data)
        if inbound == nil {
            inbound = bytes
        } else {
            inbound!.writeBuffer(&bytes)
        }
        let result = TLSHelloParser.clientHello(inbound!)
        let serverName: String?
        switch result {
        case .needMore: return
        case .parsed(let hello): serverName = hello.serverName
        case .notHello: serverName = nil        // BoringSSL answers with the alert
        }
        helloSeen = true
        state.serverName = serverName
        let ssl = NIOSSLServerHandler(context: contexts.context(forServerName: serverName))
        let recorder = TLSHandshakeRecorder(state: state, logger: logger, listener: listener, installHTTP: installHTTP)
        do {
            try context.pipeline.syncOperations.addHandler(ssl, position: .after(self))
            try context.pipeline.syncOperations.addHandler(recorder, position: .after(ssl))
        } catch {
            context.close(promise: nil)
            return
        }
        let buffered = inbound!
        inbound = nil
        context.fireChannelRead(wrapInboundOut(buffered))
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard state.cipher == nil, helloSeen else {
            context.write(data, promise: promise)
            return
        }
        var bytes = unwrapOutboundIn(data)
        if outbound == nil { outbound = bytes } else { outbound!.writeBuffer(&bytes) }
        switch TLSHelloParser.serverHelloCipher(outbound!) {
        case .parsed(let cipher):
            state.cipher = cipher
            outbound = nil
        case .notHello:
            outbound = nil
            state.cipher = 0        // not a ServerHello (an alert): stop looking
        case .needMore:
            break
        }
        context.write(data, promise: promise)
    }

    func flush(context: ChannelHandlerContext) {
        context.flush()
        // Removed here, not in write: a writeAndFlush calls flush on this
        // handler's context right after write, and a removed context would
        // drop that flush.
        if state.cipher != nil {
            // Nothing left to look at: the rest of the connection skips this handler.
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        state.closedBeforeHTTP()
        context.fireChannelInactive()
    }
}

/// Sits behind NIOSSLServerHandler until the handshake completes; then
/// builds the TLS info and hands the channel to the HTTP pipeline.
final class TLSHandshakeRecorder: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = IOData
    /// The HTTP side asked to close (a connection-phase plugin rejected the
    /// connection). The channel stays active while NIOSSL sends its
    /// close_notify, so this, not `isActive`, says to drop further bytes.
    private var closeRequested = false

    private let state: TLSHandshakeState
    private let logger: Logger
    private let listener: String
    private let installHTTP: (Channel, TLSConnectionInfo) throws -> Void
    private var done = false

    init(state: TLSHandshakeState, logger: Logger, listener: String,
         installHTTP: @escaping (Channel, TLSConnectionInfo) throws -> Void) {
        self.state = state
        self.logger = logger
        self.listener = listener
        self.installHTTP = installHTTP
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let tlsEvent = event as? TLSUserEvent, case .handshakeCompleted(let negotiated) = tlsEvent, !done else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        done = true
        let ssl = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
        let version: String
        switch ssl?.tlsVersion {
        case .tlsv13: version = "TLSv1.3"
        case .tlsv12: version = "TLSv1.2"
        case .tlsv11: version = "TLSv1.1"
        case .tlsv1: version = "TLSv1"
        case nil: version = "unknown"
        }
        let peer = ssl?.peerCertificate.flatMap { PeerIdentity.describe($0) }
        let info = TLSConnectionInfo(version: version, cipher: state.cipher.flatMap { $0 == 0 ? nil : TLSHelloParser.cipherName($0) },
                                     serverName: state.serverName, alpn: negotiated, peer: peer)
        state.handedOver()
        do {
            // From here on, NIOSSL's records go to the socket through TLSRecordWriter.
            try context.pipeline.syncOperations.addHandler(TLSRecordWriter(), position: .first)
            try installHTTP(context.channel, info)
        } catch {
            logger.error("could not set up the HTTP pipeline after the TLS handshake", metadata: ["error": "\(error)"])
            state.closedBeforeHTTP()
            context.close(promise: nil)
            return
        }
        // A connection-phase plugin may have rejected (closed) the
        // connection already; then stay, so channelRead below drops the
        // request bytes BoringSSL decrypts next instead of serving them.
        if !closeRequested {
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Application bytes can arrive in the same read as the handshake's
        // end; they pass on to the HTTP handlers installed above, unless the
        // connection is being closed.
        guard !closeRequested else { return }
        context.fireChannelRead(data)
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        closeRequested = true
        context.close(mode: mode, promise: promise)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !done else {
            context.fireErrorCaught(error)
            return
        }
        let peer = context.channel.remoteAddress?.ipAddress ?? "?"
        logger.debug("TLS handshake failed", metadata: ["listener": "\(listener)", "client": "\(peer)",
                                                         "sni": "\(state.serverName ?? "")", "error": "\(error)"])
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done { state.closedBeforeHTTP() }
        context.fireChannelInactive()
    }
}
