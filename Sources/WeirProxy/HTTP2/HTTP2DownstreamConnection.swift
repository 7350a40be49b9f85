import CNghttp2
import Logging
import NIOCore
import NIOHPACK
import WeirCore

// Downstream HTTP/2 on http/https listeners, on libnghttp2.
//
//   http listener:  DownstreamHandler sees the client preface
//                   ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") as the first bytes
//                   (h2c with prior knowledge) and hands the connection over
//   https listener: ALPN chose "h2"
//   then:  HTTP2DownstreamConnection (bytes in and out; an nghttp2_session
//          for framing, HPACK, stream states, flow control; the streams,
//          accounting, idle/ping timeouts, drain)
//            └ per stream: HTTP2ServerStream (the exchange, ExchangeDownstream)
//
// The session is driven sans-IO: every read goes to nghttp2_session_mem_recv
// (its callbacks, below, hand header fields, body chunks and stream closes
// to the streams), and what the session has to send is pulled with
// nghttp2_session_mem_send into one buffer, written and flushed once per
// read event or event-loop tick, however many streams wrote. Responses are
// submitted with a data provider that reads the stream's queued body and
// answers NGHTTP2_ERR_DEFERRED while the upstream has not produced more;
// new body bytes resume it. swift-nio-http2 did this before (it measured
// ~52 k instructions per request of its own at 100 streams, nghttp2 does
// the same work in a fraction of that: BENCHMARKS.md "nghttp2").
//
// No Swift error and no Lua longjmp crosses nghttp2's C frames: callbacks
// only call non-throwing Swift code (plugins run behind CLuaShims'
// protected calls) and report failure as nghttp2 error codes.
//
// What enforces which `http2:` setting (HTTP2ListenerConfig.swift):
// - nghttp2: max_continuation_frames (nghttp2_option_set_max_continuations),
//   windows and window overflow (FLOW_CONTROL_ERROR), max_frame_size,
//   SETTINGS/PING floods (its own limits), frame and stream-state errors.
// - Weir (this file and HTTP2ServerStream): max_concurrent_streams (refused
//   one by one, HTTP2StreamLimit.swift), max_header_list_size (the decoded
//   list's bytes: a request head over it is answered 431, trailers over it
//   reset the stream), Rapid Reset (max_resets client
//   RST_STREAMs per reset_window: GOAWAY ENHANCE_YOUR_CALM), max_glitches
//   (malformed requests and frames nghttp2 found invalid), the inbound
//   windows it reopens (initial_window_size per stream, held back while the
//   upstream cannot take more; connection_window_size), idle_timeout,
//   ping_interval/ping_timeout, graceful drain (GOAWAY, then close when the
//   streams are done), connection accounting; RFC 9113 §8.1.1-8.2 malformed
//   requests (header lists, content-length vs body: HTTP2RequestFields.swift,
//   reset by the stream). nghttp2's own HTTP messaging checks are off
//   (nghttp2_option_set_no_http_messaging): Weir's run in the pass that
//   writes the HTTP/1.1 head for the upstream.

/// An HTTP/2 connection: the handler after the socket (or TLS) that owns
/// the nghttp2 session and the connection's streams.
final class HTTP2DownstreamConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

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
    /// Let go of after the handler leaves the pipeline (see handlerRemoved).
    private(set) var context: ChannelHandlerContext!
    /// Kept apart from `context` for the streams, which may still ask for
    /// them once the connection has ended.
    private(set) var eventLoop: EventLoop!
    private(set) var allocator = ByteBufferAllocator()
    private(set) var localAddress: SocketAddress?
    /// The nghttp2_session (nil once the connection ended).
    private(set) var session: OpaquePointer?
    /// The open streams (client-initiated; this side never opens one).
    private var streams: [Int32: HTTP2ServerStream] = [:]
    /// The header block being decoded (a request head or trailers; blocks
    /// never interleave, RFC 9113 §6.10), reused for every block, and its
    /// size as RFC 9113 §6.5.2 counts it (name + value + 32 per field).
    private(set) var receivingFields = HTTP2FieldList(capacity: 16)
    private var receivingBytes = 0
    /// The list a response head is built in before nghttp2 copies it at
    /// submission: one per connection, reused (`withSendingFields`).
    private var sendingFields = HTTP2FieldList(capacity: 16)
    /// An emptied added-upstream-field array for the next stream's exchange
    /// (ExchangeDownstream.recycleUpstreamFields).
    var spareUpstreamFields: [HTTP1AddedField] = []
    /// Shared by the connection's streams (`ExchangeDownstream.upstreamOwnLinesMemo`).
    let upstreamOwnLinesMemo = UpstreamOwnLinesMemo()
    private var closed = false
    /// Streams refused over max_concurrent_streams in the current reset window.
    private var refusals = 0
    /// RST_STREAMs from the client in the current reset window (Rapid Reset).
    private var clientResets = 0
    private var resetWindowStart: NIODeadline = .uptimeNanoseconds(0)
    /// Streams reset as malformed requests, and frames nghttp2 found invalid
    /// (counted against max_glitches).
    private var glitches = 0
    /// Inside nghttp2_session_mem_recv (or channelRead..channelReadComplete):
    /// output is pulled from the session at its end.
    private var reading = false
    /// Inside an nghttp2 call: its callbacks must not call into the session's
    /// send side again (nghttp2 is not re-entrant there).
    private var inSession = false
    /// A flush is scheduled for the end of this event-loop tick.
    private var flushScheduled = false
    /// Bytes the last flush wrote: the next one's buffer starts that big
    /// (a busy connection's flush carries ~100 streams' frames; growing a
    /// 1 KB buffer to that reallocated and copied it at each doubling).
    private var lastFlushBytes = 1024
    /// The server's SETTINGS (the first bytes out) still have to get the
    /// configured max_concurrent_streams (HTTP2StreamLimit.swift).
    private var settingsRewritePending = true
    /// GOAWAY was submitted: close once it is written.
    private var closeAfterFlush = false
    /// The last write is under way; the channel closes when it completes.
    private var closingAfterWrite = false
    /// The last write is out and the write side shut: what the client still
    /// sends is dropped until it closes (`lingerThenClose`).
    private var lingering = false
    /// The client shut its side: close once the open streams are done.
    private var inputClosed = false
    private var lingerTimeout: Scheduled<Void>?
    private var idleTimer = LazyTimer()
    /// Fires at the earliest exchange deadline among the streams.
    private var streamTimer = LazyTimer()
    private var pingTimer = LazyTimer()
    /// A PING we sent is waiting for its ACK.
    private var pingOutstanding = false
    private var lastRead: NIODeadline = .now()
    private static let pingPayload: [UInt8] = Array("WEIRPING".utf8)

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

    deinit {
        if let session { nghttp2_session_del(session) }
    }

    // MARK: - Pipeline

    /// Adds HTTP/2 to `channel`: the caller has already counted the
    /// connection (`listener.admitConnection`); it is released on close.
    static func configure(channel: Channel, loopContext: LoopContext, listener: ListenerRuntime, peerAddress: SocketAddress?,
                          clientIP: String, peerTrusted: Bool, tls: TLSConnectionInfo?,
                          connectionPlugins: ConnectionPlugins?) throws {
        let connection = HTTP2DownstreamConnection(loopContext: loopContext, listener: listener, peerAddress: peerAddress,
                                                   clientIP: clientIP, peerTrusted: peerTrusted, tls: tls,
                                                   connectionPlugins: connectionPlugins)
        try connection.startSession()
        try channel.pipeline.syncOperations.addHandler(connection)
    }

    struct SessionError: Error, CustomStringConvertible {
        let call: String
        let code: Int
        var description: String {
            "\(call): \(String(cString: nghttp2_strerror(Int32(truncatingIfNeeded: code))))"
        }
    }

    /// Creates the server session and queues the server's SETTINGS (the
    /// connection preface: written with the first flush).
    private func startSession() throws {
        var callbacks: OpaquePointer?
        guard nghttp2_session_callbacks_new(&callbacks) == 0, let callbacks else {
            throw SessionError(call: "nghttp2_session_callbacks_new", code: Int(NGHTTP2_ERR_NOMEM.rawValue))
        }
        defer { nghttp2_session_callbacks_del(callbacks) }
        Self.installCallbacks(callbacks)
        var option: OpaquePointer?
        guard nghttp2_option_new(&option) == 0, let option else {
            throw SessionError(call: "nghttp2_option_new", code: Int(NGHTTP2_ERR_NOMEM.rawValue))
        }
        defer { nghttp2_option_del(option) }
        // Windows are reopened as the upstream takes the body (HTTP2ServerStream).
        nghttp2_option_set_no_auto_window_update(option, 1)
        // Weir checks request header lists and body lengths (HTTP2RequestFields).
        nghttp2_option_set_no_http_messaging(option, 1)
        nghttp2_option_set_max_continuations(option, settings.maxContinuationFrames)
        let resetLimit = Self.engineResetRateLimit(settings)
        nghttp2_option_set_stream_reset_rate_limit(option, resetLimit.burst, resetLimit.perSecond)
        // The ceiling nghttp2 enforces as a connection error; Weir refuses
        // streams over the configured limit itself (HTTP2StreamLimit.swift).
        var created: OpaquePointer?
        let rv = nghttp2_session_server_new2(&created, callbacks, Unmanaged.passUnretained(self).toOpaque(), option)
        guard rv == 0, let created else { throw SessionError(call: "nghttp2_session_server_new2", code: Int(rv)) }
        session = created
        var entries = [
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue),
                                   value: UInt32(HTTP2StreamLimit.engineCeiling(settings.maxConcurrentStreams))),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue),
                                   value: UInt32(settings.maxHeaderListSize)),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue),
                                   value: UInt32(settings.initialWindowSize)),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_FRAME_SIZE.rawValue),
                                   value: UInt32(settings.maxFrameSize)),
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_ENABLE_PUSH.rawValue), value: 0),
        ]
        let submitted = nghttp2_submit_settings(created, UInt8(NGHTTP2_FLAG_NONE.rawValue), &entries, entries.count)
        guard submitted == 0 else { throw SessionError(call: "nghttp2_submit_settings", code: Int(submitted)) }
        // The connection's receive window (a stream's own window is what
        // holds a client back): one WINDOW_UPDATE up to it after SETTINGS.
        let window = nghttp2_session_set_local_window_size(created, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0,
                                                           Int32(clamping: settings.connectionWindowSize))
        guard window == 0 else { throw SessionError(call: "nghttp2_session_set_local_window_size", code: Int(window)) }
    }

    /// nghttp2's own Rapid Reset guard (CVE-2023-44487, Debian's 1.52 has
    /// it backported): a token bucket of client RST_STREAMs, GOAWAY
    /// INTERNAL_ERROR when empty. Left at its defaults (1000 at once, 33 a
    /// second) it would cut connections the configured max_resets per
    /// reset_window still allows, so it gets the same budget: max_resets at
    /// once, refilled at max_resets per reset_window. Weir's own count
    /// (`clientResetStream`) sees each RST_STREAM first (nghttp2 calls the
    /// frame callback before it takes a token), so within a window the
    /// client gets Weir's GOAWAY ENHANCE_YOUR_CALM; the bucket also holds a
    /// flood that straddles two of Weir's fixed windows to that rate.
    static func engineResetRateLimit(_ settings: HTTP2ListenerSettings) -> (burst: UInt64, perSecond: UInt64) {
        let window = Double(max(settings.resetWindow.nanoseconds, 1))
        let perSecond = (Double(settings.maxResets) * 1e9 / window).rounded(.up)
        return (UInt64(settings.maxResets), max(1, UInt64(min(perSecond, Double(UInt32.max)))))
    }

    // MARK: - Lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        eventLoop = context.eventLoop
        allocator = context.channel.allocator
        localAddress = context.channel.localAddress
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
        // The handler and its NIO context hold each other: without this no
        // closed HTTP/2 connection (nor its nghttp2 session) was ever freed
        // (DownstreamLifetimeTests). On the next tick: this may run inside
        // a session callback or a flush that still uses `context`.
        context.eventLoop.execute { self.context = nil }
    }

    private func connectionEnded() {
        guard !closed else { return }
        closed = true
        idleTimer.cancel()
        pingTimer.cancel()
        streamTimer.cancel()
        lingerTimeout?.cancel()
        endStreams()
        connectionPlugins?.close()
        loopContext.unregisterHTTP2(self)
        listener.connectionClosed()
        listener.observer?.connectionClosed(listener: listener.name)
        // The session goes with the handler (deinit): a callback in flight
        // (this may run inside one) still finds it.
    }

    /// Streams still open lose their exchange (the client sees the cut).
    private func endStreams() {
        let open = streams.values
        streams.removeAll()
        for stream in open { stream.streamClosed() }
    }

    // MARK: - Bytes in

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let session, !closed, !lingering else { return }
        // A client read event: one clock read serves the streams it feeds.
        loopContext.clock.enterEvent()
        defer { loopContext.clock.leaveEvent() }
        reading = true
        let bytes = unwrapInboundIn(data)
        inSession = true
        let consumed = bytes.withUnsafeReadableBytes { raw -> Int in
            nghttp2_session_mem_recv(session, raw.bindMemory(to: UInt8.self).baseAddress, raw.count)
        }
        inSession = false
        if consumed < 0 {
            // Fatal for the session (bad client magic, a CONTINUATION flood,
            // out of memory): whatever it queued (GOAWAY) goes, then close.
            loopContext.logger.debug("HTTP/2 connection error", metadata: [
                "client": "\(clientIP)", "error": "\(SessionError(call: "nghttp2_session_mem_recv", code: consumed))"])
            closeAfterFlush = true
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

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            // Pull what the session held back while the socket was full.
            flushNow()
            for stream in streams.values { stream.writabilityMayHaveChanged() }
        }
        context.fireChannelWritabilityChanged()
    }

    /// The client closed its socket (or shut its write side): no frame can
    /// come any more, so the connection would otherwise stay open until a
    /// PING or the idle timeout found it. Responses in flight still go out
    /// (a half-close), then GOAWAY and close, as on drain.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            inputClosed = true
            if streams.isEmpty { closeGracefully() }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        loopContext.logger.debug("HTTP/2 connection error", metadata: ["client": "\(clientIP)", "error": "\(error)"])
        context.close(promise: nil)
    }

    // MARK: - Session events (from the callbacks)

    fileprivate func stream(_ id: Int32) -> HTTP2ServerStream? {
        streams[id]
    }

    /// A HEADERS frame begins: a request opens a stream (or is refused over
    /// max_concurrent_streams); on an open stream it is its trailers.
    fileprivate func headerBlockBegins(streamID: Int32, isRequest: Bool) {
        receivingFields.removeAll()
        receivingBytes = 0
        guard isRequest, !closed, streams[streamID] == nil else { return }
        if streams.count >= settings.maxConcurrentStreams { return refuseStream(streamID) }
        let stream = HTTP2ServerStream(connection: self, streamID: streamID)
        streams[streamID] = stream
        idleTimer.set(nil)
    }

    fileprivate func receivedField(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) {
        receivingBytes &+= name.count &+ value.count &+ 32
        // Over max_header_list_size: nothing more is kept (the block's end resets the stream).
        guard receivingBytes <= settings.maxHeaderListSize else { return }
        receivingFields.add(name: name, value: value)
    }

    /// The block just decoded went over max_header_list_size.
    var receivingTooLarge: Bool { receivingBytes > settings.maxHeaderListSize }

    fileprivate func streamClosed(_ streamID: Int32) {
        guard let stream = streams.removeValue(forKey: streamID) else { return }
        stream.streamClosed()
        if streams.isEmpty {
            if draining || inputClosed { return closeGracefully() }
            armIdleTimer()
        }
    }

    fileprivate func pingAcknowledged() {
        pingOutstanding = false
    }

    /// Starts a new reset window when the current one has passed.
    private func rollResetWindow() {
        let now = loopContext.clock.now
        if now - resetWindowStart > .nanoseconds(settings.resetWindow.nanoseconds) {
            resetWindowStart = now
            refusals = 0
            clientResets = 0
        }
    }

    /// The client reset a stream: more than max_resets per reset_window is
    /// Rapid Reset (CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM.
    fileprivate func clientResetStream(_ streamID: Int32) {
        rollResetWindow()
        clientResets += 1
        if clientResets > settings.maxResets {
            enhanceYourCalm("HTTP/2 client keeps resetting streams: closing")
        }
    }

    /// One stream more than max_concurrent_streams: RST_STREAM
    /// REFUSED_STREAM (nothing was processed; the client may retry it).
    /// Too many refusals in a reset window end the connection like a
    /// Rapid Reset does.
    private func refuseStream(_ streamID: Int32) {
        rollResetWindow()
        refusals += 1
        if refusals > settings.maxResets {
            return enhanceYourCalm("HTTP/2 client keeps opening streams over the limit: closing")
        }
        submitReset(streamID, code: NGHTTP2_REFUSED_STREAM)
    }

    /// A stream's request was malformed (HTTP2ServerStream resets it, or
    /// answers 400/414/431/501 when its head breaks the HTTP/1.1 head rules
    /// or limits), or nghttp2 found a frame invalid: counted against
    /// `max_glitches`, once per event; the one past it closes the connection.
    func receivedMalformedRequest(on streamID: Int32, error: Error) {
        loopContext.logger.debug("HTTP/2 malformed request", metadata: ["client": "\(clientIP)", "error": "\(error)"])
        countGlitch()
    }

    fileprivate func countGlitch() {
        glitches += 1
        if glitches > settings.maxGlitches {
            enhanceYourCalm("HTTP/2 client keeps sending malformed requests: closing")
        }
    }

    /// GOAWAY ENHANCE_YOUR_CALM, then close: the client is abusing the connection.
    private func enhanceYourCalm(_ message: Logger.Message) {
        guard let session, !closeAfterFlush else { return }
        loopContext.logger.debug(message, metadata: ["client": "\(clientIP)"])
        nghttp2_session_terminate_session(session, NGHTTP2_ENHANCE_YOUR_CALM.rawValue)
        closeAfterFlush = true
        flushSoon()
    }

    // MARK: - Bytes out

    func submitReset(_ streamID: Int32, code: nghttp2_error_code) {
        guard let session else { return }
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), streamID, code.rawValue)
        flushSoon()
    }

    /// A flush before the event loop goes back to waiting: once per tick
    /// for however many streams wrote (a read's end flushes anyway).
    func flushSoon() {
        guard !reading, !inSession, !flushScheduled, !closed else { return }
        flushScheduled = true
        context.eventLoop.execute { [self] in
            flushScheduled = false
            flushNow()
        }
    }

    /// Pulls everything the session has to send (while the socket takes
    /// it) into one buffer: one write, one flush.
    private func flushNow() {
        guard let session, !closed, !inSession else { return }
        var out: ByteBuffer? = nil
        inSession = true
        while context.channel.isWritable || closeAfterFlush {
            var chunk: UnsafePointer<UInt8>? = nil
            let count = nghttp2_session_mem_send(session, &chunk)
            if count < 0 {
                loopContext.logger.debug("HTTP/2 send error", metadata: [
                    "client": "\(clientIP)", "error": "\(SessionError(call: "nghttp2_session_mem_send", code: count))"])
                closeAfterFlush = true
                break
            }
            guard count > 0, let chunk else { break }
            if out == nil { out = context.channel.allocator.buffer(capacity: max(count, lastFlushBytes)) }
            // At the writer index of the whole storage: `writeBytes` slices
            // with a generic `dropFirst` that is not inlined (as in HTTP2FieldList).
            out!.reserveCapacity(minimumWritableBytes: count)
            let at = out!.writerIndex
            out!.withVeryUnsafeMutableBytes { raw in
                (raw.baseAddress! + at).copyMemory(from: chunk, byteCount: count)
            }
            out!.moveWriterIndex(forwardBy: count)
        }
        inSession = false
        if var out {
            lastFlushBytes = min(max(out.readableBytes, 1024), 256 * 1024)
            if settingsRewritePending {
                settingsRewritePending = false
                AdvertisedStreamLimit.rewriteMaxConcurrentStreams(in: &out, to: UInt32(clamping: settings.maxConcurrentStreams))
            }
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        }
        // The session is done (GOAWAY sent after a connection error or
        // ENHANCE_YOUR_CALM), or a graceful close is due: close after the write.
        if closeAfterFlush || (nghttp2_session_want_read(session) == 0 && nghttp2_session_want_write(session) == 0),
           !closingAfterWrite {
            closeAfterFlush = true
            closingAfterWrite = true
            let context = self.context!
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).whenComplete { _ in
                self.lingerThenClose(context)
            }
        }
    }

    /// The session's last bytes (a GOAWAY) are written: shut the write side
    /// (FIN after them), then read and drop what the client still sends
    /// until it closes (its EOF closes the channel) or `lingerSeconds` pass.
    /// Closing at once with unread input makes the kernel send a reset, and
    /// a client still sending (Rapid Reset, a flood of malformed requests)
    /// then loses the GOAWAY waiting in its receive buffer, never learning
    /// why it was cut off (nginx's lingering close, for the same reason).
    private func lingerThenClose(_ context: ChannelHandlerContext) {
        guard !closed, !lingering else { return }
        lingering = true
        endStreams()   // the session is over: nothing more goes to them
        // The client already ended its side: no input left to wait for.
        if inputClosed { return context.close(promise: nil) }
        context.close(mode: .output).whenFailure { _ in context.close(promise: nil) }
        lingerTimeout = context.eventLoop.scheduleTask(in: .seconds(Self.lingerSeconds)) {
            context.close(promise: nil)
        }
    }

    private static let lingerSeconds: Int64 = 1

    var isWritable: Bool { context?.channel.isWritable ?? false }

    /// Builds a header list in the connection's reused one (nothing
    /// allocated per response); `body` submits it before it returns.
    func withSendingFields<R>(_ body: (inout HTTP2FieldList) -> R) -> R {
        sendingFields.removeAll()
        return body(&sendingFields)
    }

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
        flushNow()
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
        guard pingTimer.fired(now: .now()), let interval = settings.pingInterval, let context, let session,
              !closed else { return }
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
        nghttp2_submit_ping(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), Self.pingPayload)
        flushNow()
        pingTimer.set(now + .nanoseconds(settings.pingTimeout.nanoseconds))
    }

    // MARK: - Closing

    /// GOAWAY (NO_ERROR, the last stream taken), then close.
    private func closeGracefully() {
        guard let session, !closed, !closeAfterFlush else { return }
        nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), nghttp2_session_get_last_proc_stream_id(session),
                              NGHTTP2_NO_ERROR.rawValue, nil, 0)
        closeAfterFlush = true
        if inSession || reading { flushSoonAfterSession() } else { flushNow() }
    }

    /// A flush from inside a session call: on the next event-loop turn.
    private func flushSoonAfterSession() {
        guard !flushScheduled, !closed else { return }
        flushScheduled = true
        context.eventLoop.execute { [self] in
            flushScheduled = false
            flushNow()
        }
    }

    /// Stop taking streams: GOAWAY now; close once the open streams are done.
    func beginDrain() {
        draining = true
        guard let session, !closed else { return }
        if streams.isEmpty { return closeGracefully() }
        // GOAWAY with the highest stream ID: the client opens no more.
        nghttp2_submit_shutdown_notice(session)
        flushNow()
    }

    func forceClose() {
        context?.close(promise: nil)
    }
}

// MARK: - nghttp2 callbacks

// C function pointers: they capture nothing, find the connection through
// the session's user data (unretained: the handler owns the session) and
// return 0 or an nghttp2 error code, never throw.
extension HTTP2DownstreamConnection {
    /// Calls `body` with the connection behind the session's user data,
    /// without a retain/release pair (~170 instructions a callback, 10+ per
    /// request): the connection is alive for the whole nghttp2 call (the
    /// pipeline holds it, and it is the caller of mem_recv/mem_send).
    @inline(__always)
    fileprivate static func withConnection(_ userData: UnsafeMutableRawPointer?,
                                           _ body: (HTTP2DownstreamConnection) -> Void) -> Int32 {
        Unmanaged<HTTP2DownstreamConnection>.fromOpaque(userData!)._withUnsafeGuaranteedRef(body)
        return 0
    }

    fileprivate static func installCallbacks(_ callbacks: OpaquePointer) {
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks) { _, frame, userData in
            guard let frame else { return 0 }
            let headers = frame.pointee.headers
            return HTTP2DownstreamConnection.withConnection(userData) {
                $0.headerBlockBegins(streamID: headers.hd.stream_id, isRequest: headers.cat == NGHTTP2_HCAT_REQUEST)
            }
        }
        nghttp2_session_callbacks_set_on_header_callback(callbacks) { _, _, name, nameLength, value, valueLength, _, userData in
            guard let name, let value else { return 0 }
            return HTTP2DownstreamConnection.withConnection(userData) {
                $0.receivedField(name: UnsafeBufferPointer(start: name, count: nameLength),
                                 value: UnsafeBufferPointer(start: value, count: valueLength))
            }
        }
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks) { _, frame, userData in
            guard let frame else { return 0 }
            let hd = frame.pointee.hd
            let endStream = hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
            return HTTP2DownstreamConnection.withConnection(userData) { connection in
                switch Int(hd.type) {
                case Int(NGHTTP2_HEADERS.rawValue):
                    connection.stream(hd.stream_id)?.headerBlockEnded(endStream: endStream)
                case Int(NGHTTP2_DATA.rawValue):
                    if endStream { connection.stream(hd.stream_id)?.receivedEndOfStream() }
                case Int(NGHTTP2_RST_STREAM.rawValue):
                    connection.clientResetStream(hd.stream_id)
                case Int(NGHTTP2_PING.rawValue):
                    if hd.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) != 0 { connection.pingAcknowledged() }
                default:
                    // SETTINGS, WINDOW_UPDATE, GOAWAY, PRIORITY: nghttp2 has acted on them.
                    break
                }
            }
        }
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks) { session, _, streamID, data, length, userData in
            // The connection's window is always reopened; the stream's as
            // its upstream takes the bytes (HTTP2ServerStream).
            nghttp2_session_consume_connection(session, length)
            guard let data else { return 0 }
            return HTTP2DownstreamConnection.withConnection(userData) {
                $0.stream(streamID)?.receivedData(UnsafeRawBufferPointer(start: data, count: length))
            }
        }
        nghttp2_session_callbacks_set_on_frame_send_callback(callbacks) { _, frame, userData in
            guard let frame else { return 0 }
            let hd = frame.pointee.hd
            guard hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0 else { return 0 }
            return HTTP2DownstreamConnection.withConnection(userData) { $0.stream(hd.stream_id)?.responseEndSent() }
        }
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks) { _, streamID, _, userData in
            HTTP2DownstreamConnection.withConnection(userData) { $0.streamClosed(streamID) }
        }
        nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(callbacks) { _, _, _, userData in
            HTTP2DownstreamConnection.withConnection(userData) { $0.countGlitch() }
        }
    }
}

/// The response body source of a stream: nghttp2 asks for at most `length`
/// bytes when the stream's send window and the connection allow a DATA frame.
let http2ResponseBodyRead: nghttp2_data_source_read_callback = { session, streamID, buffer, length, flags, source, _ in
    guard let buffer, let flags, let pointer = source?.pointee.ptr else { return Int(NGHTTP2_ERR_CALLBACK_FAILURE.rawValue) }
    // The stream is alive while nghttp2 holds its data provider (it is in
    // the connection's `streams` until nghttp2 closes it).
    return Unmanaged<HTTP2ServerStream>.fromOpaque(pointer)._withUnsafeGuaranteedRef {
        $0.readResponseBody(into: buffer, length: length, flags: flags)
    }
}
