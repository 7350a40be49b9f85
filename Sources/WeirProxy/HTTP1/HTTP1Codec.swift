import WeirCore

// Weir's own HTTP/1.1 codec (sans-IO; no channel handlers here).
//
// Why: NIOHTTP1 turns every header name and value into a String and
// re-encodes every header on the way out; that was most of the proxy's
// ~95k instructions per request (bench/callgrind.sh). Here a head stays the
// bytes it arrived as, plus an index of (name, value, line end) offsets, and
// forwarding copies the kept lines as byte ranges; only edits are written.
// bench/codec measures it: ~7k instructions to parse and forward an
// 8-header GET vs ~73k for NIOHTTP1 decode + encode on channels.
//
// Pieces:
//   HTTP1RequestParser / HTTP1ResponseParser  incremental, strict RFC 9112 heads
//   HTTP1RequestHead / HTTP1ResponseHead      bytes + index + body framing
//   HTTP1Fields                               the index; lazy String accessors
//   HTTP1ChunkedDecoder / HTTP1ChunkedEncoder chunked bodies, trailers
//   HTTP1HeadWriter + HTTP1HeadEdits          forwarding by range copy
//   HTTP1ParseError                           precise reasons → 400/414/431/501/505
//
// Contract for the data path (how DownstreamHandler/UpstreamConnection use it):
// - Keep one cumulation ByteBuffer per connection; append each read, then
//   call `parse(&buffer)` until it returns nil. It consumes exactly the head;
//   the body (and pipelined requests) stay in the buffer.
// - Body by `head.framing`: `.contentLength(n)` → next n bytes are body;
//   `.chunked` → feed the buffer to an `HTTP1ChunkedDecoder` until `.end`;
//   `.untilClose` (responses) → everything until EOF; `.none` → no body.
// - A thrown HTTP1ParseError ends the connection: answer
//   `error.requestStatus` to a client (502 for an upstream) and close.
// - The head's bytes are a slice of the read buffer: holding a head keeps
//   that buffer alive, so do not keep heads beyond their exchange.

extension HTTP1Limits {
    /// The listener's request limits (same meaning as HeadGuard's 414 check
    /// and the 431 checks in DownstreamHandler).
    public init(_ limits: RequestLimits) {
        self.init(maxStartLineBytes: limits.maxRequestLineBytes,
                  maxFieldBytes: limits.maxHeaderBytes,
                  maxFieldCount: limits.maxHeaderCount)
    }
}
