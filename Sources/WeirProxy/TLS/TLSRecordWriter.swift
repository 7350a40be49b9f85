import NIOCore

/// The first handler of a TLS connection's pipeline once its handshake is
/// done (in front of NIOSSLHandler): sends the encrypted records NIOSSL
/// writes, and forwards read requests, straight to the channel's core
/// through `SoleHandlerIO`.
///
/// Why: NIOSSL writes every flight of records with `writeAndFlush`
/// (no promise unless the application gave one), which NIO's write path
/// (`write0` + `flush0`: pending-writes queue, flush bookkeeping) turns into
/// ~2.5 k instructions for what is one small buffer per response. Being
/// first, this handler sees every write that reaches the socket, which is
/// the condition `SoleHandlerIO` needs to send a held buffer itself. See
/// BENCHMARKS.md "https" (2026-11-30).
///
/// Added after the handshake, so NIO may still hold handshake bytes: the
/// first direct send waits until NIO reports none buffered.
final class TLSRecordWriter: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let io = SoleHandlerIO()

    func handlerAdded(context: ChannelHandlerContext) {
        io.attach(context, soleHandler: true, nioMayHoldWrites: true)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        io.detach()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        io.write(unwrapOutboundIn(data), context: context, promise: promise)
    }

    func flush(context: ChannelHandlerContext) {
        io.flush(context: context)
    }

    func read(context: ChannelHandlerContext) {
        io.read(context: context)
    }

    /// Writes since the last flush are dropped by a close, as NIO drops
    /// unflushed writes; NIOSSL flushes everything it writes anyway.
    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode == .all { io.dropHeld() }
        context.close(mode: mode, promise: promise)
    }
}
