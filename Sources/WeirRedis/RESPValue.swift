import NIOCore

/// One RESP2 value, as a Redis server sends it.
///
/// Bulk strings are kept as `ByteBuffer` (Redis values are bytes, not text);
/// `string` decodes them as UTF-8 for callers that want text. The null bulk
/// string (`$-1`) and the null array (`*-1`) are kept apart so a value
/// encodes back to exactly the bytes it came from.
public enum RESPValue: Equatable, Sendable {
    case simpleString(ByteBuffer)
    /// An error reply (`-ERR ...`). A top-level error reply fails the command's
    /// future with `RedisError.server`; this case only appears nested inside
    /// arrays (e.g. the results of `EXEC`).
    case error(String)
    case integer(Int)
    /// `nil` is the null bulk string (`$-1`), e.g. `GET` of a missing key.
    case bulkString(ByteBuffer?)
    /// `nil` is the null array (`*-1`).
    case array([RESPValue]?)

    /// True for the null bulk string and the null array.
    public var isNull: Bool {
        switch self {
        case .bulkString(nil), .array(nil): return true
        default: return false
        }
    }

    /// The value as text: simple and bulk strings (UTF-8), integers in decimal.
    public var string: String? {
        switch self {
        case .simpleString(let bytes), .bulkString(.some(let bytes)):
            return String(buffer: bytes)
        case .integer(let value):
            return String(value)
        case .error(let message):
            return message
        case .bulkString(nil), .array:
            return nil
        }
    }

    /// The value as an integer: integer replies, and strings holding a decimal
    /// integer (Redis returns counters from `GET` as bulk strings).
    public var int: Int? {
        switch self {
        case .integer(let value):
            return value
        case .simpleString(let bytes), .bulkString(.some(let bytes)):
            return Int(String(buffer: bytes))
        default:
            return nil
        }
    }

    /// The raw bytes of a simple or bulk string.
    public var bytes: ByteBuffer? {
        switch self {
        case .simpleString(let bytes), .bulkString(.some(let bytes)): return bytes
        default: return nil
        }
    }

    /// The elements of a (non-null) array.
    public var array: [RESPValue]? {
        if case .array(.some(let elements)) = self { return elements }
        return nil
    }
}

extension RESPValue: CustomStringConvertible {
    public var description: String {
        switch self {
        case .simpleString(let bytes): return "+\(String(buffer: bytes))"
        case .error(let message): return "-\(message)"
        case .integer(let value): return ":\(value)"
        case .bulkString(nil): return "(nil)"
        case .bulkString(.some(let bytes)): return "\"\(String(buffer: bytes))\""
        case .array(nil): return "(nil array)"
        case .array(.some(let elements)): return "[" + elements.map(\.description).joined(separator: ", ") + "]"
        }
    }
}

/// One argument of a command. Commands are always sent as arrays of bulk
/// strings, so every argument ends up as bytes; integers are written in
/// decimal without going through `String`.
public enum RedisArgument: Sendable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral {
    case string(String)
    case bytes(ByteBuffer)
    case integer(Int)

    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int) { self = .integer(value) }

    /// Bytes this argument takes on the wire (without the `$len` header).
    @inlinable
    var encodedLength: Int {
        switch self {
        case .string(let text): return text.utf8.count
        case .bytes(let bytes): return bytes.readableBytes
        case .integer(let value): return ByteBuffer.decimalLength(value)
        }
    }
}

extension ByteBuffer {
    /// Writes `arguments` as one RESP command: `*N\r\n` then `$len\r\nbytes\r\n`
    /// per argument. The size is computed first and the bytes are copied
    /// into one reserved region: callgrind showed ByteBuffer's per-call
    /// write path (capacity checks, generic slicing) at ~2k instructions
    /// for a two-argument command when written piece by piece.
    @inlinable
    public mutating func writeRESPCommand(_ arguments: [RedisArgument]) {
        var size = 1 + Self.decimalLength(arguments.count) + 2
        for argument in arguments {
            let length = argument.encodedLength
            size += 1 + Self.decimalLength(length) + 2 + length + 2
        }
        self.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { out in
            var index = Self.putHeader(UInt8(ascii: "*"), arguments.count, into: out, at: 0)
            for argument in arguments {
                index = Self.putHeader(UInt8(ascii: "$"), argument.encodedLength, into: out, at: index)
                switch argument {
                case .string(var text):
                    index = text.withUTF8 { utf8 in
                        Self.putBytes(UnsafeRawBufferPointer(utf8), into: out, at: index)
                    }
                case .bytes(let bytes):
                    index = bytes.withUnsafeReadableBytes { Self.putBytes($0, into: out, at: index) }
                case .integer(let value):
                    index = Self.putDecimal(value, into: out, at: index)
                }
                out[index] = UInt8(ascii: "\r")
                out[index + 1] = UInt8(ascii: "\n")
                index += 2
            }
            assert(index == size)
            return size
        }
    }

    /// `<type><decimal>\r\n` at `index`; returns the index after it.
    @inlinable
    static func putHeader(_ type: UInt8, _ value: Int, into out: UnsafeMutableRawBufferPointer, at index: Int) -> Int {
        out[index] = type
        var next = Self.putDecimal(value, into: out, at: index + 1)
        out[next] = UInt8(ascii: "\r")
        out[next + 1] = UInt8(ascii: "\n")
        next += 2
        return next
    }

    @inlinable
    static func putDecimal(_ value: Int, into out: UnsafeMutableRawBufferPointer, at index: Int) -> Int {
        let length = Self.decimalLength(value)
        var magnitude = value.magnitude
        var position = index + length
        repeat {
            position -= 1
            out[position] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: magnitude % 10)
            magnitude /= 10
        } while magnitude > 0
        if value < 0 { out[index] = UInt8(ascii: "-") }
        return index + length
    }

    @inlinable
    static func putBytes(_ bytes: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer, at index: Int) -> Int {
        if let source = bytes.baseAddress, bytes.count > 0 {
            (out.baseAddress! + index).copyMemory(from: source, byteCount: bytes.count)
        }
        return index + bytes.count
    }

    /// Writes any RESP value in its wire form (servers' side of the protocol;
    /// used by tests and by anything that relays replies).
    public mutating func writeRESPValue(_ value: RESPValue) {
        switch value {
        case .simpleString(let bytes):
            self.writeInteger(UInt8(ascii: "+"))
            self.writeImmutableBuffer(bytes)
            self.writeCRLF()
        case .error(let message):
            self.writeInteger(UInt8(ascii: "-"))
            self.writeString(message)
            self.writeCRLF()
        case .integer(let number):
            self.writeInteger(UInt8(ascii: ":"))
            self.writeDecimal(number)
            self.writeCRLF()
        case .bulkString(nil):
            self.writeStaticString("$-1\r\n")
        case .bulkString(.some(let bytes)):
            self.writeInteger(UInt8(ascii: "$"))
            self.writeDecimal(bytes.readableBytes)
            self.writeCRLF()
            self.writeImmutableBuffer(bytes)
            self.writeCRLF()
        case .array(nil):
            self.writeStaticString("*-1\r\n")
        case .array(.some(let elements)):
            self.writeInteger(UInt8(ascii: "*"))
            self.writeDecimal(elements.count)
            self.writeCRLF()
            for element in elements { self.writeRESPValue(element) }
        }
    }

    @inlinable
    mutating func writeCRLF() {
        self.writeInteger(UInt16(0x0D0A))  // "\r\n", big-endian by default
    }

    /// Decimal digits of `value`, written in place (no `String`, no
    /// temporary buffer: callgrind showed the generic slicing of a scratch
    /// buffer costing thousands of instructions per command).
    @inlinable
    mutating func writeDecimal(_ value: Int) {
        if value >= 0 && value < 10 {
            self.writeInteger(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: value))
            return
        }
        let length = Self.decimalLength(value)
        self.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { bytes in
            var magnitude = value.magnitude
            var index = length
            repeat {
                index -= 1
                bytes[index] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: magnitude % 10)
                magnitude /= 10
            } while magnitude > 0
            if value < 0 { bytes[0] = UInt8(ascii: "-") }
            return length
        }
    }

    @inlinable
    static func decimalLength(_ value: Int) -> Int {
        var magnitude = value.magnitude
        var length = value < 0 ? 2 : 1
        while magnitude >= 10 {
            magnitude /= 10
            length += 1
        }
        return length
    }
}
