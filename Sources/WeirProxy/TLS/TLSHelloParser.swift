import NIOCore

// Reads the two plaintext handshake messages Weir needs to look at without
// terminating anything itself: the client's ClientHello (SNI picks the
// certificate before BoringSSL sees a byte; the offered ALPN list) and the
// server's ServerHello (the negotiated cipher suite, which swift-nio-ssl
// does not expose). Sans-IO: feed bytes, get a result.

/// What a ClientHello says that matters for choosing a certificate.
struct ClientHelloSummary: Equatable {
    /// The `host_name` of the server_name extension, lower-cased.
    var serverName: String?
    var alpn: [String]
}

enum TLSHelloParseResult<Summary: Equatable>: Equatable {
    /// The message is not complete yet; feed more bytes.
    case needMore
    case parsed(Summary)
    /// Not a TLS handshake of the expected kind (plain HTTP on a TLS port,
    /// garbage, or too large): let BoringSSL produce the proper alert.
    case notHello
}

enum TLSHelloParser {
    /// Largest handshake message accepted for peeking (ClientHellos with
    /// post-quantum key shares are ~2 KB; 64 KB is far past any real one).
    static let maxHandshakeBytes = 64 * 1024

    /// Parses the first handshake message in `bytes` (TLS records from the
    /// start of the connection), joined across records if fragmented.
    static func clientHello(_ bytes: ByteBuffer) -> TLSHelloParseResult<ClientHelloSummary> {
        switch handshakeMessage(bytes, expectedType: 1) {
        case .needMore: return .needMore
        case .notHello: return .notHello
        case .parsed(let body):
            return parseClientHelloBody(body).map { .parsed($0) } ?? .notHello
        }
    }

    /// The cipher suite a ServerHello selected.
    static func serverHelloCipher(_ bytes: ByteBuffer) -> TLSHelloParseResult<UInt16> {
        switch handshakeMessage(bytes, expectedType: 2) {
        case .needMore: return .needMore
        case .notHello: return .notHello
        case .parsed(var body):
            // legacy_version(2) random(32) session_id<0..32> cipher_suite(2)
            guard body.skip(34),
                  let sessionLength = body.readInteger(as: UInt8.self),
                  body.skip(Int(sessionLength)),
                  let cipher = body.readInteger(as: UInt16.self) else { return .notHello }
            return .parsed(cipher)
        }
    }

    /// The body of the first handshake message of `expectedType`, its
    /// bytes gathered from consecutive handshake records.
    private static func handshakeMessage(_ input: ByteBuffer, expectedType: UInt8) -> TLSHelloParseResult<ByteBuffer> {
        var records = input
        var message = ByteBuffer()
        while true {
            guard records.readableBytes >= 5 else { return .needMore }
            guard let type = records.readInteger(as: UInt8.self), type == 22,       // handshake record
                  let major = records.readInteger(as: UInt8.self), major == 3,
                  records.skip(1),
                  let length = records.readInteger(as: UInt16.self), length > 0, length <= 16_384 + 2048
            else { return .notHello }
            guard var fragment = records.readSlice(length: Int(length)) else { return .needMore }
            message.writeBuffer(&fragment)
            guard message.readableBytes >= 4 else { continue }
            let messageType = message.getInteger(at: message.readerIndex, as: UInt8.self)!
            guard messageType == expectedType else { return .notHello }
            let b = message.getBytes(at: message.readerIndex + 1, length: 3)!
            let bodyLength = Int(b[0]) << 16 | Int(b[1]) << 8 | Int(b[2])
            guard bodyLength <= maxHandshakeBytes else { return .notHello }
            if message.readableBytes >= 4 + bodyLength {
                return .parsed(message.getSlice(at: message.readerIndex + 4, length: bodyLength)!)
            }
        }
    }

    private static func parseClientHelloBody(_ input: ByteBuffer) -> ClientHelloSummary? {
        var body = input
        // legacy_version(2) random(32)
        guard body.skip(34),
              let sessionLength = body.readInteger(as: UInt8.self), body.skip(Int(sessionLength)),
              let suitesLength = body.readInteger(as: UInt16.self), body.skip(Int(suitesLength)),
              let compressionLength = body.readInteger(as: UInt8.self), body.skip(Int(compressionLength))
        else { return nil }
        var summary = ClientHelloSummary(serverName: nil, alpn: [])
        // No extensions at all is legal (old clients): no SNI, no ALPN.
        guard let extensionsLength = body.readInteger(as: UInt16.self) else { return summary }
        guard var extensions = body.readSlice(length: Int(extensionsLength)) else { return nil }
        while extensions.readableBytes >= 4 {
            guard let type = extensions.readInteger(as: UInt16.self), let length = extensions.readInteger(as: UInt16.self),
                  var data = extensions.readSlice(length: Int(length)) else { return nil }
            switch type {
            case 0:     // server_name: list<2> of (type(1), name<2>)
                guard let listLength = data.readInteger(as: UInt16.self), var list = data.readSlice(length: Int(listLength)) else { return nil }
                while list.readableBytes >= 3 {
                    guard let nameType = list.readInteger(as: UInt8.self), let nameLength = list.readInteger(as: UInt16.self),
                          let name = list.readString(length: Int(nameLength)) else { return nil }
                    if nameType == 0, summary.serverName == nil { summary.serverName = name.lowercased() }
                }
            case 16:    // application_layer_protocol_negotiation: list<2> of name<1>
                guard let listLength = data.readInteger(as: UInt16.self), var list = data.readSlice(length: Int(listLength)) else { return nil }
                while list.readableBytes >= 1 {
                    guard let nameLength = list.readInteger(as: UInt8.self), let name = list.readString(length: Int(nameLength)) else { return nil }
                    summary.alpn.append(name)
                }
            default:
                break
            }
        }
        return summary
    }

    /// OpenSSL's names (what nginx's `$ssl_cipher` prints): IANA names for
    /// TLS 1.3, OpenSSL names for TLS 1.2, so they match `ciphers:` entries.
    static func cipherName(_ code: UInt16) -> String {
        switch code {
        case 0x1301: return "TLS_AES_128_GCM_SHA256"
        case 0x1302: return "TLS_AES_256_GCM_SHA384"
        case 0x1303: return "TLS_CHACHA20_POLY1305_SHA256"
        case 0xC02B: return "ECDHE-ECDSA-AES128-GCM-SHA256"
        case 0xC02F: return "ECDHE-RSA-AES128-GCM-SHA256"
        case 0xC02C: return "ECDHE-ECDSA-AES256-GCM-SHA384"
        case 0xC030: return "ECDHE-RSA-AES256-GCM-SHA384"
        case 0xCCA9: return "ECDHE-ECDSA-CHACHA20-POLY1305"
        case 0xCCA8: return "ECDHE-RSA-CHACHA20-POLY1305"
        case 0xC009: return "ECDHE-ECDSA-AES128-SHA"
        case 0xC013: return "ECDHE-RSA-AES128-SHA"
        case 0xC00A: return "ECDHE-ECDSA-AES256-SHA"
        case 0xC014: return "ECDHE-RSA-AES256-SHA"
        case 0x009C: return "AES128-GCM-SHA256"
        case 0x009D: return "AES256-GCM-SHA384"
        case 0x002F: return "AES128-SHA"
        case 0x0035: return "AES256-SHA"
        default:
            let hex = String(code, radix: 16, uppercase: true)
            return "0x" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex
        }
    }
}

extension ByteBuffer {
    /// Moves past `count` bytes; false (and no move) if fewer are readable.
    fileprivate mutating func skip(_ count: Int) -> Bool {
        guard count >= 0, readableBytes >= count else { return false }
        moveReaderIndex(forwardBy: count)
        return true
    }
}
