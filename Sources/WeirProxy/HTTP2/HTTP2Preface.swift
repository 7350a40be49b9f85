import NIOCore

/// The HTTP/2 client connection preface (RFC 9113 §3.4), for detecting h2c
/// with prior knowledge on a cleartext listener.
enum HTTP2Preface {
    static let bytes: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    enum Match { case http2, other, incomplete }

    /// Whether `buffer` starts with the preface (`incomplete`: what arrived
    /// so far is a prefix of it).
    static func match(_ buffer: ByteBuffer) -> Match {
        let n = min(buffer.readableBytes, bytes.count)
        let same = buffer.withUnsafeReadableBytes { raw in
            (0..<n).allSatisfy { raw[$0] == bytes[$0] }
        }
        if !same { return .other }
        return n == bytes.count ? .http2 : .incomplete
    }
}
