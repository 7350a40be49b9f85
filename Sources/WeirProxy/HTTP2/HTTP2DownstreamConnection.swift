import NIOCore
import NIOHTTP2
import WeirCore

// Downstream HTTP/2 on http/https listeners.
//
//   http listener:  DownstreamHandler sees the client preface
//                   ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") as the first bytes
//                   (h2c with prior knowledge) and hands the connection over
//   https listener: ALPN chose "h2"
//   then:  NIOHTTP2Handler (framing, HPACK, flow control, the limits below)
//          ─ HTTP2DownstreamConnection (accounting, idle/ping timeouts, drain)
//          └ per stream: HTTP2StreamHandler (the exchange, ExchangeDownstream)
//
// What enforces which `http2:` setting (HTTP2ListenerConfig.swift):
// - swift-nio-http2: max_concurrent_streams (RST_STREAM REFUSED_STREAM),
//   max_header_list_size (SETTINGS + a cap on a header block's bytes,
//   CONTINUATIONs included), max_continuation_frames, windows and window
//   overflow (FLOW_CONTROL_ERROR), max_frame_size, Rapid Reset (max_resets
//   RST_STREAMs per reset_window: GOAWAY ENHANCE_YOUR_CALM), max_glitches,
//   PING/SETTINGS floods, empty DATA floods, and RFC 9113 §8.2 header
//   validation.
// - Weir (this file): idle_timeout, ping_interval/ping_timeout, graceful
//   drain (GOAWAY then close when the streams are done), connection
//   accounting.

/// The state an HTTP/2 connection's streams share, and the connection-level
/// handler that sits after `NIOHTTP2Handler`.
final class HTTP2DownstreamConnection: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    let loopContext: LoopContext
    let listener: ListenerRuntime
    let settings: HTTP2ListenerSettings
    let parserLimits: HTTP1Limits
    let peerAddress: SocketAddress?
    let clientIP: String
    let peerTrusted: Bool
    let tls: TLSConnectionInfo?
    var connectionPlugins: ConnectionPlugins?
    private(set) var draining = false
    private var context: ChannelHandlerContext?
    private var openStreams = 0
    private var closed = false
    private var idleTimer = LazyTimer()
    private var pingTimer = LazyTimer()
    /// A PING we sent is waiting for its ACK.
    private var pingOutstanding = false
    private var lastRead: NIODeadline = .now()
    private static let pingPayload: UInt64 = 0x5745_4952_5049_4E47   // "WEIRPING"

    init(loopContext: LoopContext, listener: ListenerRuntime, peerAddress: SocketAddress?, clientIP: String,
         peerTrusted: Bool, tls: TLSConnectionInfo?, connectionPlugins: ConnectionPlugins?) {
        self.loopContext = loopContext
        self.listener = listener
        self.settings = listener.config.http2
        self.parserLimits = HTTP1Limits(listener.config.limits)
        self.peerAddress = peerAddress
        self.clientIP = clientIP
        self.peerTrusted = peerTrusted
        self.tls = tls
        self.connectionPlugins = connectionPlugins
    }

    // MARK: - Pipeline

    /// Adds HTTP/2 to `channel`: the caller has already counted the
    /// connection (`listener.admitConnection`); it is released on close.
    static func configure(channel: Channel, loopContext: LoopContext, listener: ListenerRuntime, peerAddress: SocketAddress?,
                          clientIP: String, peerTrusted: Bool, tls: TLSConnectionInfo?,
                          connectionPlugins: ConnectionPlugins?) throws {
        let settings = listener.config.http2
        let state = HTTP2DownstreamConnection(loopContext: loopContext, listener: listener, peerAddress: peerAddress,
                                              clientIP: clientIP, peerTrusted: peerTrusted, tls: tls,
                                              connectionPlugins: connectionPlugins)
        var connectionConfiguration = NIOHTTP2Handler.ConnectionConfiguration()
        connectionConfiguration.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: settings.maxConcurrentStreams),
            HTTP2Setting(parameter: .maxHeaderListSize, value: settings.maxHeaderListSize),
            HTTP2Setting(parameter: .initialWindowSize, value: settings.initialWindowSize),
            HTTP2Setting(parameter: .maxFrameSize, value: settings.maxFrameSize),
            HTTP2Setting(parameter: .enablePush, value: 0),
        ]
        connectionConfiguration.maximumSequentialContinuationFrames = settings.maxContinuationFrames
        connectionConfiguration.maximumConnectionGlitches = settings.maxGlitches
        connectionConfiguration.targetWindowSize = settings.connectionWindowSize
        var streamConfiguration = NIOHTTP2Handler.StreamConfiguration()
        streamConfiguration.targetWindowSize = settings.initialWindowSize
        streamConfiguration.streamResetFrameRateLimit.maximumCount = settings.maxResets
        streamConfiguration.streamResetFrameRateLimit.windowLength = .nanoseconds(settings.resetWindow.nanoseconds)
        let sync = channel.pipeline.syncOperations
        _ = try sync.configureHTTP2Pipeline(
            mode: .server, connectionConfiguration: connectionConfiguration,
            streamConfiguration: streamConfiguration
        ) { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.pipeline.syncOperations.addHandler(HTTP2StreamHandler(connection: state))
            }
        }
        try sync.addHandler(state)
    }

    // MARK: - Lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        idleTimer.setUp(loop: context.eventLoop) { [weak self] in self?.idleTimerFired() }
        pingTimer.setUp(loop: context.eventLoop) { [weak self] in self?.pingTimerFired() }
        loopContext.registerHTTP2(self)
        armIdleTimer()
        armPingTimer()
    }

    func channelInactive(context: ChannelHandlerContext) {
        connectionEnded()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        connectionEnded()
    }

    private func connectionEnded() {
        guard !closed else { return }
        closed = true
        idleTimer.cancel()
        pingTimer.cancel()
        connectionPlugins?.close()
        loopContext.unregisterHTTP2(self)
        listener.connectionClosed()
        listener.observer?.connectionClosed(listener: listener.name)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        lastRead = .now()
        let frame = unwrapInboundIn(data)
        if case .ping(_, ack: true) = frame.payload { pingOutstanding = false }
        context.fireChannelRead(data)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is NIOHTTP2StreamCreatedEvent {
            openStreams += 1
            idleTimer.set(nil)
        } else if event is StreamClosedEvent {
            openStreams = max(0, openStreams - 1)
            if openStreams == 0 {
                if draining { return closeGracefully() }
                armIdleTimer()
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A stream error has reset that stream only (RFC 9113 §5.4.2): the
        // connection and its other streams go on.
        if Self.isStreamError(error) { return }
        // Connection errors: nio-http2 has sent GOAWAY with the error code.
        loopContext.logger.debug("HTTP/2 connection error", metadata: ["client": "\(clientIP)", "error": "\(error)"])
        context.close(promise: nil)
    }

    /// nio-http2 reports stream and connection errors alike through
    /// `errorCaught` (it has already sent RST_STREAM or GOAWAY). These are
    /// the ones it raises as stream errors (RFC 9113 §8.1.1 malformed
    /// messages, frames in a wrong stream state); anything else closes the
    /// connection, which is the safe side if the list misses one.
    static func isStreamError(_ error: Error) -> Bool {
        switch error {
        case is NIOHTTP2Errors.StreamError,
             is NIOHTTP2Errors.InvalidHTTP2HeaderFieldName,
             is NIOHTTP2Errors.InvalidHTTP2HeaderFieldValue,
             is NIOHTTP2Errors.ForbiddenHeaderField,
             is NIOHTTP2Errors.InvalidPseudoHeaders,
             is NIOHTTP2Errors.DuplicatePseudoHeader,
             is NIOHTTP2Errors.PseudoHeaderAfterRegularHeader,
             is NIOHTTP2Errors.UnknownPseudoHeader,
             is NIOHTTP2Errors.UnsupportedPseudoHeader,
             is NIOHTTP2Errors.InvalidPseudoHeaderValue,
             is NIOHTTP2Errors.EmptyPathHeader,
             is NIOHTTP2Errors.MissingPseudoHeader,
             is NIOHTTP2Errors.ContentLengthViolated,
             is NIOHTTP2Errors.ContentLengthHeadersMismatch,
             is NIOHTTP2Errors.ContentLengthHeaderNegative,
             is NIOHTTP2Errors.ContentLengthHeaderMalformedValue,
             is NIOHTTP2Errors.TrailersWithoutEndStream,
             is NIOHTTP2Errors.StreamClosed,
             is NIOHTTP2Errors.BadStreamStateTransition:
            return true
        default:
            return false
        }
    }

    // MARK: - Timers

    private func armIdleTimer() {
        idleTimer.set(.now() + .nanoseconds(settings.idleTimeout.nanoseconds))
    }

    private func idleTimerFired() {
        guard idleTimer.fired(now: .now()), openStreams == 0, !closed else { return }
        closeGracefully()
    }

    private func armPingTimer() {
        guard let interval = settings.pingInterval else { return }
        pingTimer.set(.now() + .nanoseconds(interval.nanoseconds))
    }

    /// Nothing read for `ping_interval`: send a PING; no ACK within
    /// `ping_timeout`: the peer is gone (or stuck), close.
    private func pingTimerFired() {
        guard pingTimer.fired(now: .now()), let interval = settings.pingInterval, let context, !closed else { return }
        let now = NIODeadline.now()
        if pingOutstanding {
            loopContext.logger.debug("HTTP/2 PING not acknowledged in time: closing", metadata: ["client": "\(clientIP)"])
            context.close(promise: nil)
            return
        }
        let quietSince = lastRead + .nanoseconds(interval.nanoseconds)
        if now < quietSince {
            pingTimer.set(quietSince)
            return
        }
        pingOutstanding = true
        let ping = HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: Self.pingPayload), ack: false))
        context.writeAndFlush(wrapOutboundOut(ping), promise: nil)
        pingTimer.set(now + .nanoseconds(settings.pingTimeout.nanoseconds))
    }

    // MARK: - Closing

    /// GOAWAY (NO_ERROR, no stream refused), then close.
    private func closeGracefully() {
        guard let context, !closed else { return }
        let goAway = HTTP2Frame(streamID: .rootStream,
                                payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))
        context.writeAndFlush(wrapOutboundOut(goAway)).whenComplete { _ in context.close(promise: nil) }
    }

    /// Stop taking streams: GOAWAY now; close once the open streams are done.
    func beginDrain() {
        draining = true
        guard let context, !closed else { return }
        if openStreams == 0 { return closeGracefully() }
        let goAway = HTTP2Frame(streamID: .rootStream,
                                payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))
        context.writeAndFlush(wrapOutboundOut(goAway), promise: nil)
    }

    func forceClose() {
        context?.close(promise: nil)
    }
}
