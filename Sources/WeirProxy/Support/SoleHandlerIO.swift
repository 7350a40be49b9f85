#if canImport(Glibc)
import Glibc
#else
import Darwin
#endif
import NIOCore
import NIOSSL

/// Writes, flushes and read requests of an HTTP/1.1 handler (downstream or
/// upstream), sent straight to the channel's core or socket when the
/// handler is the only one in its pipeline (plain TCP: no TLS handler in
/// front, no HTTP/2 stream codec), and through its context otherwise.
///
/// Why: from the only handler, `context.write`/`flush`/`read` walk to the
/// pipeline's head handler, which makes these same `ChannelCore` calls, and
/// NIO's autoRead re-arm after every read event starts at the pipeline's
/// tail and walks through the handler's `read(context:)` to the head
/// (~300 instructions per write or flush, ~700 per read). And NIO's own
/// write path (`write0` + `flush0`: pending-writes queue, generic
/// unwrapping, flush bookkeeping) costs ~2.4 k instructions for what is
/// usually one small buffer per event. See BENCHMARKS.md "nioio"
/// (2026-11-30).
///
/// **Direct writes.** One buffer written without a promise is held here
/// (not given to NIO) until the flush, which sends it with one `send(2)` on
/// the socket when NIO holds none of this channel's writes. What the socket
/// does not take (a slow peer), and everything in any other case (a second
/// buffer before the flush, a write with a promise, NIO still holding
/// earlier writes, a socket error), goes through NIO's `write0`/`flush0`
/// as before, in order: NIO then handles partial writes, writability,
/// errors and closing exactly as it always did. Once NIO has held writes,
/// direct sends resume only after it reports none buffered. A held buffer
/// is at most `maxHeldBytes`, so NIO's writability (which does not see it)
/// is off by at most that much until the flush.
///
/// Only correct while no other handler can write to the socket (nothing
/// else in the pipeline, or the owner is first: TLSRecordWriter in front
/// of NIOSSL): the owner says so
/// when it is added (`soleHandler`), and a handler that hands its channel
/// over to others (WebSocket tunnel, HTTP/2) is removed from the pipeline
/// first or at the same time, which `detach()` follows (a held buffer then
/// goes to NIO, unflushed, as it would have been).
///
/// **Behind TLS** (`attachBehindTLS`: an https listener's or a TLS
/// upstream's HTTP/1.1 handler, whose pipeline is TLSRecordWriter ─▶
/// NIOSSLHandler ─▶ owner): writes and flushes are NIOSSLHandler's
/// `write`/`flush` called with its own context, and read requests the
/// core's `read0`: what `context.write`/`flush`/`read` reach through the
/// pipeline (the handlers in between, TLSHandshakeRecorder and
/// HandshakeWaiter while they stay, and NIOSSLHandler for reads, pass
/// these on unchanged; TLSRecordWriter forwards reads to `read0`), without
/// the context hops. See BENCHMARKS.md "tlsio" (2026-11-30).
final class SoleHandlerIO {
    /// The channel's core while the owner is the pipeline's only handler.
    private var core: ChannelCore?
    /// Behind TLS: the TLS handler and its context (writes, flushes) and
    /// the channel's core (reads).
    private var tlsHandler: NIOSSLHandler?
    private var tlsContext: ChannelHandlerContext?
    private var readCore: ChannelCore?
    /// The socket's descriptor access (checks the socket is still open).
    private var socket: (any NIOTransportAccessibleChannelCore<NIOBSDSocket.Handle>)?
    /// The one buffer written since the last flush, not given to NIO yet.
    private var held: ByteBuffer?
    /// NIO was given writes that may not all be on the wire yet: until it
    /// reports none buffered, writes must queue behind them.
    private(set) var nioMayHoldWrites = false
    /// Larger buffers go to NIO at once (its writability must see them).
    static let maxHeldBytes = 16 * 1024

    /// Called from `handlerAdded`. `soleHandler`: every write that reaches
    /// the socket passes through the owner (it is the only handler, or the
    /// first: TLSRecordWriter). `nioMayHoldWrites`: the channel was written
    /// to before (a TLS handshake), so direct sends wait until NIO reports
    /// none of those buffered.
    func attach(_ context: ChannelHandlerContext, soleHandler: Bool, nioMayHoldWrites: Bool = false) {
        guard soleHandler else { return }
        let core = context.channel._channelCore
        self.core = core
        self.socket = core as? any NIOTransportAccessibleChannelCore<NIOBSDSocket.Handle>
        self.nioMayHoldWrites = nioMayHoldWrites
    }

    /// Called from `handlerAdded` of a handler whose pipeline holds a
    /// NIOSSLHandler in front of it and nothing behind it (see "Behind
    /// TLS" above). Without one (not expected) calls go through `context`.
    func attachBehindTLS(_ context: ChannelHandlerContext) {
        guard let tls = try? context.pipeline.syncOperations.context(handlerType: NIOSSLHandler.self),
              let handler = tls.handler as? NIOSSLHandler else { return }
        tlsHandler = handler
        tlsContext = tls
        readCore = context.channel._channelCore
    }

    /// Called from `handlerRemoved` (also breaks the channel -> handler ->
    /// core cycle). A held buffer goes to NIO unflushed, where it would
    /// have been without this type.
    func detach() {
        if let held, let core {
            self.held = nil
            core.write0(NIOAny(held), promise: nil)
        }
        core = nil
        socket = nil
        tlsHandler = nil
        tlsContext = nil
        readCore = nil
    }

    /// A close drops unflushed writes (NIO fails its own): a held buffer
    /// must not be sent by a later flush either.
    func dropHeld() {
        held = nil
    }

    /// Whether read requests go straight to the channel's core (the only
    /// handler, or behind TLS).
    var isDirect: Bool { core != nil || readCore != nil }

    /// `context` (here and in `flush`, `read`) is an autoclosure: the owner
    /// keeps its context in a `var`, and passing it loaded retained and
    /// released it around every call, while the direct path never uses it.
    func write(_ buffer: ByteBuffer, context: @autoclosure () -> ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        // The usual write, held for the flush. Tested against nil, not
        // bound: a bound reference is retained and released per call.
        if core != nil && tlsHandler == nil && promise == nil && held == nil && socket != nil && buffer.readableBytes <= Self.maxHeldBytes
            && nioHoldsNoWrites(context()) {
            held = buffer
            return
        }
        if let tlsHandler, let tlsContext {
            return tlsHandler.write(context: tlsContext, data: NIOAny(buffer), promise: promise)
        }
        guard let core else { return context().write(NIOAny(buffer), promise: promise) }
        // Through NIO, behind whatever is held.
        nioMayHoldWrites = true
        if let held {
            self.held = nil
            core.write0(NIOAny(held), promise: nil)
        }
        core.write0(NIOAny(buffer), promise: promise)
    }

    func flush(context: @autoclosure () -> ChannelHandlerContext) {
        // The usual flush: the held buffer, sent (references tested, not
        // bound, as in `write`). Held only while NIO holds nothing: the
        // bytes go first.
        if core != nil && tlsHandler == nil, let buffer = held.take() {
            let sent = sendOnSocket(buffer)
            if sent == buffer.readableBytes { return }
            nioMayHoldWrites = true
            core!.write0(NIOAny(buffer.getSlice(at: buffer.readerIndex + sent, length: buffer.readableBytes - sent)!),
                         promise: nil)
            core!.flush0()
            return
        }
        if let tlsHandler, let tlsContext { return tlsHandler.flush(context: tlsContext) }
        guard let core else { return context().flush() }
        // Nothing held: NIO's writes (if any) are flushed by NIO.
        if nioMayHoldWrites { core.flush0() }
    }

    /// One `send(2)` of the buffer: the bytes the socket took, 0 when it
    /// took none or failed (NIO's own write then meets the same condition
    /// and handles it: waits for writability, or closes on the error).
    private func sendOnSocket(_ buffer: ByteBuffer) -> Int {
        guard buffer.readableBytes > 0, let socket else { return 0 }
        let result = try? socket.withUnsafeTransport { fd in
            buffer.withUnsafeReadableBytes { bytes in
                #if canImport(Glibc)
                Glibc.send(fd, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL))
                #else
                Darwin.send(fd, bytes.baseAddress, bytes.count, 0)   // NIO sets SO_NOSIGPIPE there
                #endif
            }
        }
        guard let result, result > 0 else { return 0 }
        return result
    }

    /// Whether NIO holds none of this channel's writes (asked only after it
    /// was given some: the option lookup costs ~1 k instructions).
    private func nioHoldsNoWrites(_ context: @autoclosure () -> ChannelHandlerContext) -> Bool {
        guard nioMayHoldWrites else { return true }
        // Not a weak reference to the channel kept here: that would give the
        // channel a side table and every retain of it the slow path.
        guard let buffered = try? context().channel.syncOptions?.getOption(.bufferedWritableBytes), buffered == 0 else {
            return false
        }
        nioMayHoldWrites = false
        return true
    }

    /// Asks for the next read (what `context.read()` from the handler does).
    func read(context: ChannelHandlerContext) {
        if let core = core ?? readCore {
            core.read0()
        } else {
            context.read()
        }
    }

    /// At the end of a read event (`channelReadComplete`): when the owner
    /// wants more, asks for the next read now, on the core when direct (the
    /// only handler, or behind TLS) and through the context otherwise
    /// (behind an HTTP/2 stream codec the handlers in front see it as
    /// before). NIO's autoRead then finds a read already pending and skips
    /// its walk from the pipeline's tail through every handler's
    /// `read(context:)` (`readIfNeeded0`). When the owner does not want
    /// more, NIO's walk reaches its `read(context:)`, which holds the read
    /// back as before.
    func rearmRead(if wanted: Bool, context: ChannelHandlerContext) {
        if wanted { read(context: context) }
    }
}
