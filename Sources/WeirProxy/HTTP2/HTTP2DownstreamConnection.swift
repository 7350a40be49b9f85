import Logging
import NIOCore
import NIOHTTP2
import WeirCore

// Downstream HTTP/2 on http/https listeners.
//
//   http listener:  DownstreamHandler sees the client preface
//                   ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") as the first bytes
//                   (h2c with prior knowledge) and hands the connection over
//   https listener: ALPN chose "h2"
//   then:  NIOHTTP2Handler (framing, HPACK, stream states, the limits below)
//          ─ HTTP2DownstreamConnection (the streams, inbound windows, flushes,
//            accounting, idle/ping timeouts, drain)
//            └ per stream: HTTP2ServerStream (the exchange, ExchangeDownstream)
//
// There is no child Channel per stream (no stream multiplexer): a stream is
// a plain object in `streams`, its frames written through this handler.
// That saves a channel, a pipeline and their promises per stream, and lets
// the connection flush once per event-loop tick instead of once per stream.
// The price is that this file does what the multiplexer did: it hands out
// inbound flow-control credit (WINDOW_UPDATE, held back per stream while
// its upstream cannot take more) and tracks per-stream outbound writability.
//
// What enforces which `http2:` setting (HTTP2ListenerConfig.swift):
// - Weir with swift-nio-http2: max_concurrent_streams (HTTP2StreamLimit.swift)
// - swift-nio-http2:
//   max_header_list_size (SETTINGS + a cap on a header block's bytes,
//   CONTINUATIONs included), max_continuation_frames, windows and window
//   overflow (FLOW_CONTROL_ERROR), max_frame_size, Rapid Reset (max_resets
//   RST_STREAMs per reset_window: GOAWAY ENHANCE_YOUR_CALM), max_glitches,
//   PING/SETTINGS floods, empty DATA floods.
// - Weir (this file): initial_window_size / connection_window_size as the
//   window it keeps open, idle_timeout, ping_interval/ping_timeout, graceful
//   drain (GOAWAY then close when the streams are done), connection
//   accounting; RFC 9113 §8.1.1-8.2 malformed requests (header lists,
//   content-length vs body: HTTP2RequestFields.swift, reset by the stream),
//   counted against max_glitches too.

/// An HTTP/2 connection: the handler after `NIOHTTP2Handler` that owns the
/// connection's streams.
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
    private(set) var context: ChannelHandlerContext!
    /// The open streams (client-initiated; this side never opens one).
    private var streams: [HTTP2StreamID: HTTP2ServerStream] = [:]
    /// Streams holding back a frame to coalesce it with the next one
    /// (HTTP2ServerStream.heldFrame); written before any flush. The two
    /// arrays swap at a flush, so neither is reallocated.
    private var streamsHoldingFrames: [HTTP2ServerStream] = []
    private var streamsReleasingFrames: [HTTP2ServerStream] = []
    /// An emptied added-upstream-field array for the next stream's exchange
    /// (ExchangeDownstream.recycleUpstreamFields).
    var spareUpstreamFields: [HTTP1AddedField] = []
    private var closed = false
    /// Streams refused over max_concurrent_streams in the current reset window.
    private var refusals = 0
    /// Streams reset as malformed requests (counted against max_glitches).
    private var malformedRequests = 0
    private var refusalWindowStart: NIODeadline = .uptimeNanoseconds(0)
    /// Inside channelRead..channelReadComplete: writes are flushed at its end.
    private var reading = false
    /// Something was written and not flushed yet.
    private var needsFlush = false
    /// A flush is scheduled for the end of this event-loop tick.
    private var flushScheduled = false
    /// The connection's receive window as nio-http2 last reported it.
    private var connectionInboundWindow: Int = 65_535
    private var idleTimer = LazyTimer()
    /// Fires at the earliest exchange deadline among the streams.
    private var streamTimer = LazyTimer()
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
            // Told to the client as max_concurrent_streams (HTTP2StreamLimit.swift).
            HTTP2Setting(parameter: .maxConcurrentStreams, value: HTTP2StreamLimit.nioCeiling(settings.maxConcurrentStreams)),
            HTTP2Setting(parameter: .maxHeaderListSize, value: settings.maxHeaderListSize),
            HTTP2Setting(parameter: .initialWindowSize, value: settings.initialWindowSize),
            HTTP2Setting(parameter: .maxFrameSize, value: settings.maxFrameSize),
            HTTP2Setting(parameter: .enablePush, value: 0),
        ]
        connectionConfiguration.maximumSequentialContinuationFrames = settings.maxContinuationFrames
        // Weir checks request header lists and body lengths itself, in the
        // pass that writes the HTTP/1.1 head (HTTP2RequestFields.swift);
        // nio-http2's checks walked every list again, our responses too.
        connectionConfiguration.headerBlockValidation = .disabled
        connectionConfiguration.contentLengthValidation = .disabled
        connectionConfiguration.maximumConnectionGlitches = settings.maxGlitches
        var streamConfiguration = NIOHTTP2Handler.StreamConfiguration()
        streamConfiguration.streamResetFrameRateLimit.maximumCount = settings.maxResets
        streamConfiguration.streamResetFrameRateLimit.windowLength = .nanoseconds(settings.resetWindow.nanoseconds)
        // No stream multiplexer: frames of every stream come to `state`.
        let sync = channel.pipeline.syncOperations
        try sync.addHandler(AdvertisedStreamLimit(advertised: settings.maxConcurrentStreams))
        try sync.addHandler(NIOHTTP2Handler(mode: .server, connectionConfiguration: connectionConfiguration,
                                            streamConfiguration: streamConfiguration))
        try sync.addHandler(state)
    }

    // MARK: - Lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        idleTimer.setUp(loop: context.eventLoop) { [weak self] in self?.idleTimerFired() }
        pingTimer.setUp(loop: context.eventLoop) { [weak self] in self?.pingTimerFired() }
        streamTimer.setUp(loop: context.eventLoop) { [weak self] in self?.streamTimerFired() }
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
        streamTimer.cancel()
        // Streams still open lose their exchange (the client sees the cut).
        let open = streams.values
        streams.removeAll()
        streamsHoldingFrames.removeAll()
        for stream in open { stream.streamClosed() }
        connectionPlugins?.close()
        loopContext.unregisterHTTP2(self)
        listener.connectionClosed()
        listener.observer?.connectionClosed(listener: listener.name)
    }

    // MARK: - Frames in

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // A client read event: one clock read serves the streams it feeds.
        loopContext.clock.enterEvent()
        defer { loopContext.clock.leaveEvent() }
        reading = true
        let frame = unwrapInboundIn(data)
        let streamID = frame.streamID
        switch frame.payload {
        case .headers(let headers):
            if let stream = streams[streamID] {
                stream.receivedHeaders(headers)
            } else if !closed {
                // nio-http2 has checked this HEADERS may open a stream.
                if streams.count >= settings.maxConcurrentStreams { return refuseStream(streamID) }
                let stream = HTTP2ServerStream(connection: self, streamID: streamID)
                streams[streamID] = stream
                idleTimer.set(nil)
                stream.receivedHeaders(headers)
            }
        case .data(let payload):
            streams[streamID]?.receivedData(payload)
        case .ping(_, ack: true):
            pingOutstanding = false
        default:
            // SETTINGS, PING, WINDOW_UPDATE, RST_STREAM, GOAWAY, PRIORITY:
            // nio-http2 has acted on them (a reset stream arrives as
            // StreamClosedEvent).
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        reading = false
        lastRead = .now()
        for stream in streams.values where stream.exchange?.upstreamNeedsFlush == true {
            stream.flushUpstream()
        }
        flushNow()
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Every stream brings three events (created, window, closed), for
        // this handler only (the last one): the type is compared first, so
        // only a match pays for a cast (~330 instructions each, failed ones
        // included), and they go no further.
        let eventType = type(of: event)
        if eventType == NIOHTTP2WindowUpdatedEvent.self, let event = event as? NIOHTTP2WindowUpdatedEvent {
            windowUpdated(event)
        } else if eventType == StreamClosedEvent.self, let event = event as? StreamClosedEvent {
            streamClosed(event.streamID)
        } else if eventType != NIOHTTP2StreamCreatedEvent.self {
            context.fireUserInboundEventTriggered(event)
        }
    }

    private func streamClosed(_ streamID: HTTP2StreamID) {
        guard let stream = streams.removeValue(forKey: streamID) else { return }
        stream.streamClosed()
        if streams.isEmpty {
            if draining { return closeGracefully() }
            armIdleTimer()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            for stream in streams.values { stream.writabilityMayHaveChanged() }
        }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A stream error has reset that stream only (RFC 9113 §5.4.2; the
        // StreamClosedEvent that follows ends its exchange): the connection
        // and its other streams go on.
        if Self.isStreamError(error) {
            loopContext.logger.debug("HTTP/2 stream error", metadata: ["client": "\(clientIP)", "error": "\(error)"])
            return
        }
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

    /// One stream more than max_concurrent_streams: RST_STREAM
    /// REFUSED_STREAM (nothing was processed; the client may retry it).
    /// Too many refusals in a reset window end the connection like a
    /// Rapid Reset does.
    private func refuseStream(_ streamID: HTTP2StreamID) {
        let now = NIODeadline.now()
        if now - refusalWindowStart > .nanoseconds(settings.resetWindow.nanoseconds) {
            refusalWindowStart = now
            refusals = 0
        }
        refusals += 1
        if refusals > settings.maxResets {
            return enhanceYourCalm(lastStreamID: streamID, "HTTP/2 client keeps opening streams over the limit: closing")
        }
        write(HTTP2Frame(streamID: streamID, payload: .rstStream(.refusedStream)))
    }

    /// A stream's request was malformed (HTTP2ServerStream resets it). When
    /// nio-http2 checked header lists it counted these as glitches; Weir
    /// checks them now (HTTP2RequestFields) and counts them against the
    /// same `max_glitches` (nio-http2 still counts its own stream errors).
    func receivedMalformedRequest(on streamID: HTTP2StreamID, error: Error) {
        loopContext.logger.debug("HTTP/2 malformed request", metadata: ["client": "\(clientIP)", "error": "\(error)"])
        malformedRequests += 1
        if malformedRequests > settings.maxGlitches {
            enhanceYourCalm(lastStreamID: streamID, "HTTP/2 client keeps sending malformed requests: closing")
        }
    }

    /// GOAWAY ENHANCE_YOUR_CALM, then close: the client is abusing the connection.
    private func enhanceYourCalm(lastStreamID: HTTP2StreamID, _ message: Logger.Message) {
        loopContext.logger.debug(message, metadata: ["client": "\(clientIP)"])
        let goAway = HTTP2Frame(streamID: .rootStream,
                                payload: .goAway(lastStreamID: lastStreamID, errorCode: .enhanceYourCalm, opaqueData: nil))
        context.writeAndFlush(wrapOutboundOut(goAway)).whenComplete { [context] _ in context?.close(promise: nil) }
    }

    // MARK: - Inbound flow control

    /// nio-http2 reports a window after every flow-controlled frame. The
    /// connection's window is always reopened (a stream's own window is
    /// what holds a client back); a stream's is reopened by the stream,
    /// which holds it back while its upstream is not writable.
    private func windowUpdated(_ event: NIOHTTP2WindowUpdatedEvent) {
        guard let window = event.inboundWindowSize else { return }
        if event.streamID == .rootStream {
            connectionInboundWindow = window
            if let increment = Self.windowIncrement(window: window, target: settings.connectionWindowSize) {
                connectionInboundWindow += increment
                write(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment)))
            }
        } else {
            streams[event.streamID]?.inboundWindowChanged(window)
        }
    }

    /// The WINDOW_UPDATE increment that brings `window` back to `target`,
    /// once it has fallen to half of it or less (fewer, larger updates);
    /// nil while it is still above.
    static func windowIncrement(window: Int, target: Int) -> Int? {
        guard window <= target / 2 else { return nil }
        return min(target - window, Int(Int32.max))
    }

    // MARK: - Frames out

    /// Writes `frame`; the flush comes at the end of the current read or
    /// event-loop tick (`flushSoon`), once for all the streams written to.
    func write(_ frame: HTTP2Frame, promise: EventLoopPromise<Void>? = nil) {
        guard !closed else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        context.write(wrapOutboundOut(frame), promise: promise)
        needsFlush = true
    }

    func holdingFrame(_ stream: HTTP2ServerStream) {
        streamsHoldingFrames.append(stream)
    }

    /// A flush before the event loop goes back to waiting: once per tick
    /// for however many streams wrote (a read's end flushes anyway).
    func flushSoon() {
        guard !reading, !flushScheduled, !closed else { return }
        flushScheduled = true
        context.eventLoop.execute { [self] in
            flushScheduled = false
            flushNow()
        }
    }

    private func flushNow() {
        // A write may make another stream hold a frame: loop until none does.
        while !streamsHoldingFrames.isEmpty {
            swap(&streamsHoldingFrames, &streamsReleasingFrames)
            for stream in streamsReleasingFrames { stream.releaseHeldFrame() }
            streamsReleasingFrames.removeAll(keepingCapacity: true)
        }
        guard needsFlush, !closed else { return }
        needsFlush = false
        context.flush()
    }

    var isWritable: Bool { context.channel.isWritable }

    // MARK: - Timers

    /// A stream's exchange deadline was set: the connection's timer fires
    /// no later than it (a later one changes nothing: the timer rescans
    /// when it fires).
    func streamDeadlineSet(_ deadline: NIODeadline) {
        if let current = streamTimer.deadline, current <= deadline { return }
        streamTimer.set(deadline)
    }

    /// Runs the exchange timeout check of every stream whose deadline has
    /// passed, then waits for the next earliest one.
    private func streamTimerFired() {
        streamTimer.taskFired()
        streamTimer.set(nil)
        let now = NIODeadline.now()
        var next: NIODeadline? = nil
        for stream in streams.values {
            if let deadline = stream.exchangeTimer.deadline, deadline <= now { stream.exchangeTimerFired() }
            // The check re-arms a deadline that moved later.
            if let deadline = stream.exchangeTimer.deadline { next = min(next ?? deadline, deadline) }
        }
        if let next { streamDeadlineSet(next) }
    }

    private func armIdleTimer() {
        idleTimer.set(.now() + .nanoseconds(settings.idleTimeout.nanoseconds))
    }

    private func idleTimerFired() {
        guard idleTimer.fired(now: .now()), streams.isEmpty, !closed else { return }
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
        if streams.isEmpty { return closeGracefully() }
        let goAway = HTTP2Frame(streamID: .rootStream,
                                payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))
        context.writeAndFlush(wrapOutboundOut(goAway), promise: nil)
    }

    func forceClose() {
        context?.close(promise: nil)
    }
}
