import NIOCore

/// Writes, flushes and read requests of an HTTP/1.1 handler (downstream or
/// upstream), sent straight to the channel's core when the handler is the
/// only one in its pipeline (plain TCP: no TLS handler in front, no HTTP/2
/// stream codec), and through its context otherwise.
///
/// Why: from the only handler, `context.write`/`flush`/`read` walk to the
/// pipeline's head handler, which makes these same `ChannelCore` calls, and
/// NIO's autoRead re-arm after every read event starts at the pipeline's
/// tail and walks through the handler's `read(context:)` to the head. Going
/// straight to the core skips ~300 (write, flush) and ~700 (read)
/// instructions per call, several calls per proxied request (BENCHMARKS.md
/// "nioio", 2026-11-30). The same technique as the TCP relay's
/// `StreamSideHandler`.
///
/// Only correct while nothing else is in the pipeline: the owner says so
/// when it is added (`soleHandler`), and a handler that hands its channel
/// over to others (WebSocket tunnel, HTTP/2) is removed from the pipeline
/// first or at the same time, which `detach()` follows.
struct SoleHandlerIO {
    /// The channel's core while the owner is the pipeline's only handler.
    private var core: ChannelCore?

    /// Called from `handlerAdded`.
    mutating func attach(_ context: ChannelHandlerContext, soleHandler: Bool) {
        core = soleHandler ? context.channel._channelCore : nil
    }

    /// Called from `handlerRemoved` (also breaks the channel -> handler ->
    /// core cycle).
    mutating func detach() {
        core = nil
    }

    /// Whether calls go straight to the channel's core.
    var isDirect: Bool { core != nil }

    func write(_ buffer: ByteBuffer, context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        if let core {
            core.write0(NIOAny(buffer), promise: promise)
        } else {
            context.write(NIOAny(buffer), promise: promise)
        }
    }

    func flush(context: ChannelHandlerContext) {
        if let core {
            core.flush0()
        } else {
            context.flush()
        }
    }

    /// Asks for the next read (what `context.read()` from the handler does).
    func read(context: ChannelHandlerContext) {
        if let core {
            core.read0()
        } else {
            context.read()
        }
    }

    /// At the end of a read event (`channelReadComplete`): when direct and
    /// the owner wants more, asks for the next read on the core. NIO's
    /// autoRead then finds a read already pending and skips its walk
    /// through the pipeline (`readIfNeeded0`); when the owner does not want
    /// more, NIO's walk reaches its `read(context:)`, which holds the read
    /// back as before. Through a pipeline with other handlers it does
    /// nothing: NIO's autoRead asks as usual.
    func rearmRead(if wanted: Bool) {
        if wanted, let core { core.read0() }
    }
}
