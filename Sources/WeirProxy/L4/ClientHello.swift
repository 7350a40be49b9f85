import NIOCore
import WeirCore

/// What TLS passthrough needs from a ClientHello: the server name (SNI,
/// RFC 6066 section 3) and the ALPN protocols offered (RFC 7301), read
/// without terminating TLS.
struct ClientHelloInfo: Equatable {
    /// Lower-cased, without a trailing dot; nil when the client sent none.
    var serverName: String?
    /// In the client's order; empty when it offered none.
    var alpn: [String]
}

/// A sans-IO ClientHello reader. Feed it everything received so far (it
/// never consumes: the bytes are replayed to the upstream unchanged):
/// the hello may be split over several TLS records and each record over
/// several reads.
///
///     record:    type(1)=22 | version(2) | length(2) | fragment
///     handshake: type(1)=1  | length(3)  | body (spread over the records' fragments)
///     body:      version(2) random(32) session_id<1> cipher_suites<2>
///                compression_methods<1> [extensions<2>]
enum ClientHelloParser {
    enum Outcome: Equatable {
        /// Not all of it has arrived yet.
        case needMore
        case complete(ClientHelloInfo)
        /// Not a TLS ClientHello, or a malformed one: close the connection.
        case invalid(String)
    }

    static let recordHeaderSize = 5
    /// RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
    static let maxRecordFragment = 1 << 14

    /// `maxBytes`: the most the caller will buffer; a hello that says it is
    /// longer is refused now rather than after buffering that much.
    static func parse(_ buffer: ByteBuffer, maxBytes: Int) -> Outcome {
        let bytes = buffer.readableBytesView
        var handshake: [UInt8] = []
        var offset = bytes.startIndex
        var expectedLength: Int? = nil
        while true {
            if let expected = expectedLength, handshake.count >= expected {
                return parseBody(handshake[4..<expected])
            }
            guard bytes.endIndex - offset >= recordHeaderSize else { return .needMore }
            let type = bytes[offset]
            guard type == 22 else {
                return .invalid(offset == bytes.startIndex
                    ? "not a TLS handshake (first byte 0x\(String(type, radix: 16)))"
                    : "ClientHello interrupted by a TLS record of type \(type)")
            }
            guard bytes[offset + 1] == 3 else { return .invalid("unsupported TLS record version \(bytes[offset + 1]).\(bytes[offset + 2])") }
            let length = Int(bytes[offset + 3]) << 8 | Int(bytes[offset + 4])
            guard length > 0, length <= maxRecordFragment else { return .invalid("TLS record length \(length) out of range") }
            let fragmentStart = offset + recordHeaderSize
            let available = min(length, bytes.endIndex - fragmentStart)
            handshake.append(contentsOf: bytes[fragmentStart..<(fragmentStart + available)])
            if expectedLength == nil, handshake.count >= 4 {
                guard handshake[0] == 1 else { return .invalid("first handshake message is type \(handshake[0]), not ClientHello") }
                let bodyLength = Int(handshake[1]) << 16 | Int(handshake[2]) << 8 | Int(handshake[3])
                // Records add 5 bytes per 16 KiB fragment; refuse what cannot fit.
                let total = 4 + bodyLength
                if total + recordHeaderSize * (total / maxRecordFragment + 1) > maxBytes {
                    return .invalid("ClientHello of \(total) bytes exceeds the \(maxBytes)-byte limit")
                }
                expectedLength = total
            }
            if available < length {
                // This record is not complete yet; what it has may already
                // hold the whole hello (a record may carry more after it).
                if let expected = expectedLength, handshake.count >= expected { continue }
                return .needMore
            }
            offset = fragmentStart + length
        }
    }

    private static func parseBody(_ body: ArraySlice<UInt8>) -> Outcome {
        var reader = Reader(body)
        guard reader.skip(2 + 32) else { return .invalid("ClientHello too short") }
        guard let sessionIDLength = reader.uint8(), sessionIDLength <= 32, reader.skip(Int(sessionIDLength)) else {
            return .invalid("malformed ClientHello session id")
        }
        guard let suitesLength = reader.uint16(), suitesLength >= 2, suitesLength % 2 == 0, reader.skip(Int(suitesLength)) else {
            return .invalid("malformed ClientHello cipher suites")
        }
        guard let compressionLength = reader.uint8(), compressionLength >= 1, reader.skip(Int(compressionLength)) else {
            return .invalid("malformed ClientHello compression methods")
        }
        var info = ClientHelloInfo(serverName: nil, alpn: [])
        // Extensions are optional in TLS 1.2 (absent means none).
        if reader.remaining == 0 { return .complete(info) }
        guard let extensionsLength = reader.uint16(), var extensions = reader.sub(Int(extensionsLength)), reader.remaining == 0 else {
            return .invalid("malformed ClientHello extensions block")
        }
        var seen = Set<UInt16>()
        while extensions.remaining > 0 {
            guard let type = extensions.uint16(), let length = extensions.uint16(), var data = extensions.sub(Int(length)) else {
                return .invalid("malformed ClientHello extension")
            }
            // RFC 8446 4.2: at most one extension of each type.
            guard seen.insert(type).inserted else { return .invalid("duplicate ClientHello extension \(type)") }
            switch type {
            case 0:
                switch parseServerName(&data) {
                case .success(let name): info.serverName = name
                case .failure(let problem): return .invalid(problem.message)
                }
            case 16:
                switch parseALPN(&data) {
                case .success(let protocols): info.alpn = protocols
                case .failure(let problem): return .invalid(problem.message)
                }
            default:
                break
            }
        }
        return .complete(info)
    }

    struct Problem: Error { let message: String }

    /// server_name_list<2>: name_type(1) | host_name<2>. Only host_name (0)
    /// is defined; other types are skipped.
    private static func parseServerName(_ data: inout Reader) -> Result<String?, Problem> {
        guard let listLength = data.uint16(), var list = data.sub(Int(listLength)), data.remaining == 0, listLength > 0 else {
            return .failure(Problem(message: "malformed server_name extension"))
        }
        var hostName: String? = nil
        while list.remaining > 0 {
            guard let nameType = list.uint8(), let length = list.uint16(), let name = list.bytes(Int(length)) else {
                return .failure(Problem(message: "malformed server_name entry"))
            }
            guard nameType == 0 else { continue }
            guard hostName == nil else { return .failure(Problem(message: "more than one host_name in server_name")) }
            var text = String(decoding: name, as: UTF8.self).lowercased()
            if text.hasSuffix(".") { text.removeLast() }
            guard name.allSatisfy({ $0 > 0x20 && $0 < 0x7F }), HostName.isValid(text) else {
                return .failure(Problem(message: "invalid server name in SNI"))
            }
            hostName = text
        }
        return .success(hostName)
    }

    /// protocol_name_list<2>: protocol_name<1> ...
    private static func parseALPN(_ data: inout Reader) -> Result<[String], Problem> {
        guard let listLength = data.uint16(), var list = data.sub(Int(listLength)), data.remaining == 0, listLength > 0 else {
            return .failure(Problem(message: "malformed ALPN extension"))
        }
        var protocols: [String] = []
        while list.remaining > 0 {
            guard let length = list.uint8(), length > 0, let name = list.bytes(Int(length)) else {
                return .failure(Problem(message: "malformed ALPN protocol name"))
            }
            protocols.append(String(decoding: name, as: UTF8.self))
        }
        return .success(protocols)
    }

    /// Bounds-checked big-endian reads over a slice; nil past the end.
    struct Reader {
        private var bytes: ArraySlice<UInt8>
        init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }
        var remaining: Int { bytes.count }

        mutating func skip(_ n: Int) -> Bool {
            guard n <= bytes.count else { return false }
            bytes = bytes.dropFirst(n)
            return true
        }
        mutating func uint8() -> UInt8? {
            guard let b = bytes.first else { return nil }
            bytes = bytes.dropFirst()
            return b
        }
        mutating func uint16() -> UInt16? {
            guard bytes.count >= 2 else { return nil }
            let i = bytes.startIndex
            defer { bytes = bytes.dropFirst(2) }
            return UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1])
        }
        mutating func bytes(_ n: Int) -> ArraySlice<UInt8>? {
            guard n <= bytes.count else { return nil }
            defer { bytes = bytes.dropFirst(n) }
            return bytes.prefix(n)
        }
        mutating func sub(_ n: Int) -> Reader? { bytes(n).map(Reader.init) }
    }
}
