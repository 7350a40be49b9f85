import NIOCore

/// One half of a raw byte tunnel between two channels on the same event
/// loop (used after a `101 Switching Protocols`). Bytes read on this channel
/// are written to the partner; when the partner is not writable this side
/// stops reading until it is again. Closing either side closes both; a
/// half-close is passed on as a half-close.
final class TunnelHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: TunnelHandler?
    /// Called once when this side's channel closes (accounting).
    var onClose: (() -> Void)?
    private var context: ChannelHandlerContext?
    private var pendingRead = false

    /// Links two handlers; install both with `addHandler` afterwards.
    static func makePair() -> (TunnelHandler, TunnelHandler) {
        let a = TunnelHandler()
        let b = TunnelHandler()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    private var partnerWritable: Bool { partner?.context?.channel.isWritable ?? true }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // The channel may have had reads suppressed while HTTP handlers were in place.
        context.read()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.partner = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        partner?.partnerWrite(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        partner?.context?.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        onClose?()
        onClose = nil
        partner?.context?.close(promise: nil)
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelEvent, case .inputClosed = event as! ChannelEvent {
            // Pass the half-close on; if that fails (no half-close support) close.
            partner?.context?.close(mode: .output, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            partner?.resumeReadingIfPaused()
        }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if partnerWritable {
            context.read()
        } else {
            pendingRead = true
        }
    }

    private func partnerWrite(_ buffer: ByteBuffer) {
        context?.write(wrapOutboundOut(buffer), promise: nil)
    }

    private func resumeReadingIfPaused() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }
}
