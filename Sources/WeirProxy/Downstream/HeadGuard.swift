import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Sits in front of the HTTP request decoder and looks at raw bytes only
/// while a request head is expected:
/// - a request line longer than the limit is refused with 414 before the
///   decoder buffers it (the decoder's own limits cover the header block and
///   answer 431);
/// - the first byte of a new head starts the header timeout (408).
/// Once the head is in, bytes pass straight through untouched.
final class HeadGuard: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let maxRequestLineBytes: Int
    /// Set by the DownstreamHandler (same pipeline). Weak: after a switch to a
    /// tunnel the owner is gone while this handler may still see bytes.
    weak var owner: DownstreamHandler? = nil

    /// True while the next bytes are (part of) a request head.
    private var awaitingHead = true
    private var requestLineBytes = 0
    private var sawLineEnd = false
    private var rejected = false

    init(maxRequestLineBytes: Int) {
        self.maxRequestLineBytes = maxRequestLineBytes
    }

    /// Called by the owner when it starts waiting for the next request head.
    func expectHead() {
        awaitingHead = true
        requestLineBytes = 0
        sawLineEnd = false
    }

    /// Called by the owner when a request head has been decoded.
    func headReceived() {
        awaitingHead = false
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if rejected { return }
        if awaitingHead {
            let buffer = unwrapInboundIn(data)
            owner?.headBytesArrived()
            if !sawLineEnd {
                let lineLength = buffer.withUnsafeReadableBytes { bytes -> Int? in
                    guard let base = bytes.baseAddress, let lf = memchr(base, Int32(UInt8(ascii: "\n")), bytes.count) else { return nil }
                    return base.distance(to: UnsafeRawPointer(lf))
                }
                if let lineLength {
                    requestLineBytes += lineLength
                    sawLineEnd = true
                } else {
                    requestLineBytes += buffer.readableBytes
                }
                // Leading empty lines before a request line are allowed (RFC 9112 §2.2)
                // and are counted here; the limit is generous enough for that.
                if requestLineBytes > maxRequestLineBytes {
                    rejected = true
                    owner?.rejectBeforeDecoding(.uriTooLong, message: "request line longer than \(maxRequestLineBytes) bytes")
                    return
                }
            }
        }
        context.fireChannelRead(data)
    }
}
