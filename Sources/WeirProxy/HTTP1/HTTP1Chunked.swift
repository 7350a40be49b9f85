import NIOCore

/// What the chunked decoder produced from the bytes it was given.
public enum HTTP1ChunkedEvent: Sendable {
    /// Give it more bytes.
    case needMoreData
    /// Body bytes (a slice of the input, no copy).
    case data(ByteBuffer)
    /// The last chunk and the trailer section (nil when there were no trailer fields).
    case end(trailers: HTTP1Fields?)
}

/// Streaming, strict decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
///
/// Call `next(_:)` with the connection's buffer until it says `.needMoreData`.
/// Chunk extensions are skipped (bounded by `limits.maxChunkExtensionBytes`,
/// CTLs refused); trailer fields are parsed with the head's rules and limits.
public struct HTTP1ChunkedDecoder: Sendable {
    enum State: Sendable {
        case size(value: Int, digits: Int)
        case sizeExtension(bytes: Int)
        case sizeLF(size: Int)
        case data(remaining: Int)
        case dataCR
        case dataLF
        case trailers
        case done
    }

    public var limits: HTTP1Limits
    private var state: State = .size(value: 0, digits: 0)
    private var trailerScanner = HTTP1HeadScanner(hasStartLine: false)

    public init(limits: HTTP1Limits = HTTP1Limits()) { self.limits = limits }

    public var isDone: Bool { if case .done = state { return true }; return false }

    /// 16 hex digits would overflow a signed 64-bit size.
    static let maxSizeDigits = 15

    public mutating func next(_ buffer: inout ByteBuffer) throws -> HTTP1ChunkedEvent {
        while true {
            switch state {
            case .data(let remaining):
                let available = buffer.readableBytes
                if available == 0 { return .needMoreData }
                let n = min(remaining, available)
                let slice = buffer.readSlice(length: n)!
                state = n == remaining ? .dataCR : .data(remaining: remaining - n)
                return .data(slice)
            case .trailers:
                let limits = self.limits
                guard let length = try buffer.withUnsafeReadableBytes({ try trailerScanner.scan($0, limits: limits) }) else {
                    return .needMoreData
                }
                let slice = buffer.readSlice(length: length)!
                state = .done
                if length == 2 { return .end(trailers: nil) }
                var entries: [HTTP1FieldEntry] = []
                var facts = HTTP1FramingFacts()
                // The scanner found the section's end: the parse ends there too.
                _ = try slice.withUnsafeReadableBytes { raw in
                    try parseFieldLines(raw.bindMemory(to: UInt8.self).baseAddress!, from: 0, available: raw.count,
                                        limits: limits, entries: &entries, facts: &facts)
                }
                return .end(trailers: HTTP1Fields(bytes: slice, entries: entries))
            case .done:
                return .needMoreData
            default:
                guard let b = buffer.readInteger(as: UInt8.self) else { return .needMoreData }
                try step(b)
            }
        }
    }

    /// Advances the chunk-line / CRLF states by one byte.
    private mutating func step(_ b: UInt8) throws {
        switch state {
        case .size(let value, let digits):
            if let d = HTTP1ChunkedDecoder.hexValue(b) {
                guard digits < HTTP1ChunkedDecoder.maxSizeDigits else { throw HTTP1ParseError.chunkSizeTooLarge }
                state = .size(value: value << 4 | Int(d), digits: digits + 1)
            } else if digits == 0 {
                throw HTTP1ParseError.invalidChunkSize
            } else if b == HTTP1Bytes.cr {
                state = .sizeLF(size: value)
            } else if b == 0x3B || HTTP1Bytes.isWhitespace(b) {
                // chunk-ext (with BWS before ';'): skipped, we never act on it.
                chunkSizeBeforeExtension = value
                state = .sizeExtension(bytes: 1)
            } else if b == HTTP1Bytes.lf {
                throw HTTP1ParseError.bareLF
            } else {
                throw HTTP1ParseError.invalidChunkSize
            }
        case .sizeExtension(let bytes):
            if b == HTTP1Bytes.cr {
                state = .sizeLF(size: chunkSizeBeforeExtension)
            } else if b == HTTP1Bytes.lf {
                throw HTTP1ParseError.bareLF
            } else if !HTTP1Bytes.isFieldValueByte(b) {
                throw HTTP1ParseError.invalidChunkExtension
            } else {
                guard bytes < limits.maxChunkExtensionBytes else { throw HTTP1ParseError.chunkExtensionTooLong }
                state = .sizeExtension(bytes: bytes + 1)
            }
        case .sizeLF(let size):
            guard b == HTTP1Bytes.lf else { throw HTTP1ParseError.bareCR }
            state = size == 0 ? .trailers : .data(remaining: size)
        case .dataCR:
            guard b == HTTP1Bytes.cr else { throw HTTP1ParseError.missingChunkCRLF }
            state = .dataLF
        case .dataLF:
            guard b == HTTP1Bytes.lf else { throw HTTP1ParseError.missingChunkCRLF }
            state = .size(value: 0, digits: 0)
        case .data, .trailers, .done:
            preconditionFailure("byte states only")
        }
    }

    private var chunkSizeBeforeExtension = 0

    @inline(__always)
    static func hexValue(_ b: UInt8) -> UInt8? {
        switch b {
        case 0x30...0x39: return b - 0x30
        case 0x41...0x46: return b - 0x41 + 10
        case 0x61...0x66: return b - 0x61 + 10
        default: return nil
        }
    }
}

/// Writes `Transfer-Encoding: chunked` framing.
public enum HTTP1ChunkedEncoder {
    /// Writes "<hex size>\r\n" for a chunk of `length` (> 0) bytes; the
    /// caller then writes the data (or passes it on as its own buffer) and
    /// `writeChunkEnd`. Splitting lets the data go out without a copy.
    public static func writeChunkHeader(length: Int, into out: inout ByteBuffer) {
        precondition(length > 0, "a zero-length chunk would end the body")
        var digits: (UInt64, UInt64) = (0, 0) // 16 bytes of scratch, no allocation
        let hex: StaticString = "0123456789abcdef"
        withUnsafeMutableBytes(of: &digits) { scratch in
            var v = length
            var i = 16
            repeat {
                i -= 1
                scratch[i] = hex.utf8Start[v & 0xF]
                v >>= 4
            } while v > 0
            out.writeBytes(UnsafeRawBufferPointer(rebasing: scratch[i..<16]))
        }
        out.writeInteger(UInt16(0x0D0A))
    }

    public static func writeChunkEnd(into out: inout ByteBuffer) {
        out.writeInteger(UInt16(0x0D0A))
    }

    /// Header, data and CRLF in one buffer (copies `data`). Empty data writes nothing.
    public static func writeChunk(_ data: ByteBuffer, into out: inout ByteBuffer) {
        guard data.readableBytes > 0 else { return }
        writeChunkHeader(length: data.readableBytes, into: &out)
        var data = data
        out.writeBuffer(&data)
        writeChunkEnd(into: &out)
    }

    /// The last chunk, optional trailer fields (copied as their original
    /// lines), and the final CRLF.
    public static func writeLastChunk(trailers: HTTP1Fields? = nil, into out: inout ByteBuffer) {
        out.writeStaticString("0\r\n")
        if let trailers {
            for e in trailers.entries {
                var line = trailers.bytes.getSlice(at: trailers.bytes.readerIndex + Int(e.nameStart),
                                                   length: Int(e.lineEnd - e.nameStart))!
                out.writeBuffer(&line)
            }
        }
        out.writeStaticString("\r\n")
    }
}
