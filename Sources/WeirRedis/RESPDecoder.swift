import NIOCore

/// Bounds on what a server may make us allocate. Redis itself caps bulk
/// strings at 512 MB; a gateway has no use for values that large, and a
/// hostile or broken server must not be able to make us reserve them.
public struct RESPLimits: Sendable, Hashable {
    /// Longest bulk string accepted, in bytes.
    public var maxBulkLength: Int
    /// Most elements in one array.
    public var maxArrayLength: Int
    /// Deepest array nesting (the top-level value is depth 1).
    public var maxDepth: Int
    /// Longest simple string, error or integer line, in bytes.
    public var maxLineLength: Int

    public init(maxBulkLength: Int = 16 << 20, maxArrayLength: Int = 1 << 20, maxDepth: Int = 32,
                maxLineLength: Int = 64 << 10) {
        self.maxBulkLength = maxBulkLength
        self.maxArrayLength = maxArrayLength
        self.maxDepth = maxDepth
        self.maxLineLength = maxLineLength
    }
}

/// The server sent something that is not RESP2, or that crosses a limit.
public struct RESPDecodingError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public var description: String { "invalid RESP from server: \(message)" }
    init(_ message: String) { self.message = message }
}

/// Incremental RESP2 decoder: emits one `RESPValue` per complete top-level
/// reply and waits (consuming nothing) while a reply is still split across
/// reads. An incomplete reply is parsed again from its start when more bytes
/// arrive; replies to pipelined commands are small and each is parsed once
/// it is complete, so that re-scan stays cheap.
public struct RESPDecoder: ByteToMessageDecoder {
    public typealias InboundOut = RESPValue

    public let limits: RESPLimits

    public init(limits: RESPLimits = RESPLimits()) {
        self.limits = limits
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let (value, consumed) = try Self.parse(buffer, limits: self.limits) else {
            return .needMoreData
        }
        buffer.moveReaderIndex(forwardBy: consumed)
        context.fireChannelRead(self.wrapInboundOut(value))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer,
                                    seenEOF: Bool) throws -> DecodingState {
        // A partial reply at EOF is dropped: the connection's pending
        // commands fail with "connection closed" when the channel goes away.
        try self.decode(context: context, buffer: &buffer)
    }

    /// Parses one complete value from the readable bytes of `buffer`.
    /// Returns the value and the number of bytes it used, or nil if more
    /// bytes are needed. Throws on malformed input or a crossed limit.
    public static func parse(_ buffer: ByteBuffer, limits: RESPLimits) throws -> (RESPValue, Int)? {
        try buffer.withUnsafeReadableBytes { bytes in
            var parser = Parser(bytes: bytes, buffer: buffer, limits: limits)
            guard let value = try parser.value(depth: 1) else { return nil }
            return (value, parser.offset)
        }
    }

    /// Cursor over one read's bytes. `buffer` is the same bytes as a
    /// `ByteBuffer`, so bulk strings become slices (no copy).
    private struct Parser {
        let bytes: UnsafeRawBufferPointer
        let buffer: ByteBuffer
        let limits: RESPLimits
        var offset = 0

        init(bytes: UnsafeRawBufferPointer, buffer: ByteBuffer, limits: RESPLimits) {
            self.bytes = bytes
            self.buffer = buffer
            self.limits = limits
        }

        mutating func value(depth: Int) throws -> RESPValue? {
            guard self.offset < self.bytes.count else { return nil }
            let type = self.bytes[self.offset]
            let start = self.offset
            self.offset += 1
            let result: RESPValue?
            switch type {
            case UInt8(ascii: "+"):
                result = try self.line().map { .simpleString(self.slice($0)) }
            case UInt8(ascii: "-"):
                result = try self.line().map { .error(String(decoding: UnsafeRawBufferPointer(rebasing: self.bytes[$0]), as: UTF8.self)) }
            case UInt8(ascii: ":"):
                result = try self.line().map { .integer(try self.integer($0)) }
            case UInt8(ascii: "$"):
                result = try self.bulkString()
            case UInt8(ascii: "*"):
                result = try self.array(depth: depth)
            default:
                throw RESPDecodingError("unknown type byte 0x\(String(type, radix: 16)) at offset \(start)")
            }
            if result == nil { self.offset = start }
            return result
        }

        /// The range of the line starting at `offset` (without CRLF); moves
        /// past the CRLF. Nil when the CRLF has not arrived yet.
        private mutating func line() throws -> Range<Int>? {
            let start = self.offset
            let end = min(self.bytes.count, start + self.limits.maxLineLength + 1)
            var index = start
            while index < end {
                if self.bytes[index] == UInt8(ascii: "\r") {
                    guard index + 1 < self.bytes.count else { return nil }
                    guard self.bytes[index + 1] == UInt8(ascii: "\n") else {
                        throw RESPDecodingError("CR not followed by LF at offset \(index)")
                    }
                    self.offset = index + 2
                    return start..<index
                }
                index += 1
            }
            if end - start > self.limits.maxLineLength {
                throw RESPDecodingError("line longer than \(self.limits.maxLineLength) bytes")
            }
            return nil
        }

        private func integer(_ range: Range<Int>) throws -> Int {
            var index = range.lowerBound
            var negative = false
            if index < range.upperBound && self.bytes[index] == UInt8(ascii: "-") {
                negative = true
                index += 1
            }
            guard index < range.upperBound else { throw RESPDecodingError("empty integer") }
            var value = 0
            while index < range.upperBound {
                let digit = self.bytes[index] &- UInt8(ascii: "0")
                guard digit < 10 else {
                    throw RESPDecodingError("invalid integer '\(String(decoding: UnsafeRawBufferPointer(rebasing: self.bytes[range]), as: UTF8.self))'")
                }
                let (times10, overflow1) = value.multipliedReportingOverflow(by: 10)
                let (next, overflow2) = negative ? times10.subtractingReportingOverflow(Int(digit))
                                                 : times10.addingReportingOverflow(Int(digit))
                guard !overflow1 && !overflow2 else { throw RESPDecodingError("integer out of range") }
                value = next
                index += 1
            }
            return value
        }

        private mutating func bulkString() throws -> RESPValue? {
            guard let header = try self.line() else { return nil }
            let length = try self.integer(header)
            if length == -1 { return .bulkString(nil) }
            guard length >= 0 else { throw RESPDecodingError("negative bulk length \(length)") }
            guard length <= self.limits.maxBulkLength else {
                throw RESPDecodingError("bulk string of \(length) bytes over the limit of \(self.limits.maxBulkLength)")
            }
            guard self.bytes.count - self.offset >= length + 2 else { return nil }
            let payload = self.offset..<(self.offset + length)
            guard self.bytes[payload.upperBound] == UInt8(ascii: "\r"),
                  self.bytes[payload.upperBound + 1] == UInt8(ascii: "\n") else {
                throw RESPDecodingError("bulk string not followed by CRLF")
            }
            self.offset = payload.upperBound + 2
            return .bulkString(self.slice(payload))
        }

        private mutating func array(depth: Int) throws -> RESPValue? {
            guard depth <= self.limits.maxDepth else {
                throw RESPDecodingError("arrays nested deeper than \(self.limits.maxDepth)")
            }
            guard let header = try self.line() else { return nil }
            let count = try self.integer(header)
            if count == -1 { return .array(nil) }
            guard count >= 0 else { throw RESPDecodingError("negative array length \(count)") }
            guard count <= self.limits.maxArrayLength else {
                throw RESPDecodingError("array of \(count) elements over the limit of \(self.limits.maxArrayLength)")
            }
            // Each element takes at least 3 bytes (":0\r\n" is 4); reserve no
            // more than the bytes present could hold, so a huge claimed count
            // costs nothing until its elements actually arrive.
            var elements: [RESPValue] = []
            elements.reserveCapacity(min(count, (self.bytes.count - self.offset) / 3))
            for _ in 0..<count {
                guard let element = try self.value(depth: depth + 1) else { return nil }
                elements.append(element)
            }
            return .array(elements)
        }

        private func slice(_ range: Range<Int>) -> ByteBuffer {
            self.buffer.getSlice(at: self.buffer.readerIndex + range.lowerBound, length: range.count)!
        }
    }
}
