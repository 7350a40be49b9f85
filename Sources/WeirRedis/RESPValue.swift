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
}

extension ByteBuffer {
    /// Writes `arguments` as one RESP command: `*N\r\n` then `$len\r\nbytes\r\n`
    /// per argument, straight into this buffer (no intermediate strings).
    @inlinable
    public mutating func writeRESPCommand(_ arguments: [RedisArgument]) {
        self.writeInteger(UInt8(ascii: "*"))
        self.writeDecimal(arguments.count)
        self.writeCRLF()
        for argument in arguments {
            switch argument {
            case .string(let text):
                self.writeInteger(UInt8(ascii: "$"))
                self.writeDecimal(text.utf8.count)
                self.writeCRLF()
                self.writeString(text)
            case .bytes(let bytes):
                self.writeInteger(UInt8(ascii: "$"))
                self.writeDecimal(bytes.readableBytes)
                self.writeCRLF()
                self.writeImmutableBuffer(bytes)
            case .integer(let value):
                // Length first: count the digits without formatting twice.
                self.writeInteger(UInt8(ascii: "$"))
                self.writeDecimal(Self.decimalLength(value))
                self.writeCRLF()
                self.writeDecimal(value)
            }
            self.writeCRLF()
        }
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
