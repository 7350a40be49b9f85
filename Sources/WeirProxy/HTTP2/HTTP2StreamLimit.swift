import NIOCore

// max_concurrent_streams: a client over the limit loses that stream only.
//
// nghttp2 treats a HEADERS frame that opens one stream more than its
// SETTINGS_MAX_CONCURRENT_STREAMS allowed as a connection error (GOAWAY
// PROTOCOL_ERROR): every other stream on the connection dies with it.
// RFC 9113 §5.1.2 allows refusing just the stream, which is what nginx and
// Envoy do (RST_STREAM REFUSED_STREAM; the client may retry it). So:
// - the session is configured with a higher ceiling (`engineCeiling`), and
// - `AdvertisedStreamLimit` writes the configured limit into the SETTINGS
//   frame the session sends first, so that is what the client is told;
// - HTTP2DownstreamConnection refuses a stream that would go over the
//   configured limit. A client that keeps going past the ceiling still
//   gets nghttp2's connection error, and one that makes Weir refuse more
//   than `max_resets` streams per `reset_window` gets GOAWAY
//   ENHANCE_YOUR_CALM (each refusal costs an HPACK decode, as a reset does).

enum HTTP2StreamLimit {
    /// The limit the HTTP/2 engine enforces for a configured `limit`.
    static func engineCeiling(_ limit: Int) -> Int {
        min(limit * 2 + 16, Int(Int32.max))
    }
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS rewrite in the server's first frame
/// (its SETTINGS, RFC 9113 §3.4), applied to the connection's first output.
enum AdvertisedStreamLimit {
    /// In a buffer that starts with a SETTINGS frame (not an ACK), sets the
    /// value of every SETTINGS_MAX_CONCURRENT_STREAMS (0x3) entry; anything
    /// else is left as it is. True when an entry was rewritten.
    @discardableResult
    static func rewriteMaxConcurrentStreams(in buffer: inout ByteBuffer, to value: UInt32) -> Bool {
        let start = buffer.readerIndex
        guard buffer.readableBytes >= 9,
              let lengthHigh = buffer.getInteger(at: start, as: UInt8.self),
              let lengthLow = buffer.getInteger(at: start + 1, as: UInt16.self),
              buffer.getInteger(at: start + 3, as: UInt8.self) == 0x4,          // SETTINGS
              let flags = buffer.getInteger(at: start + 4, as: UInt8.self), flags & 0x1 == 0,   // not ACK
              buffer.getInteger(at: start + 5, as: UInt32.self) == 0 else { return false }
        let length = Int(lengthHigh) << 16 | Int(lengthLow)
        guard length % 6 == 0, buffer.readableBytes >= 9 + length else { return false }
        var rewritten = false
        var entry = start + 9
        while entry < start + 9 + length {
            if buffer.getInteger(at: entry, as: UInt16.self) == 0x3 {
                buffer.setInteger(value, at: entry + 2)
                rewritten = true
            }
            entry += 6
        }
        return rewritten
    }
}
