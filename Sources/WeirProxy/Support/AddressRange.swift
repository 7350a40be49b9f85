import NIOCore

/// A CIDR block (`10.0.0.0/8`, `::1/128`, or a bare address) used to decide
/// whether a peer's X-Forwarded-For is trusted.
struct AddressRange: Sendable, Hashable {
    let bytes: [UInt8]   // 4 or 16 bytes
    let prefixLength: Int

    struct ParseError: Error, CustomStringConvertible {
        let text: String
        var description: String { "invalid address or CIDR \"\(text)\"" }
    }

    init(parsing text: String) throws {
        let parts = text.split(separator: "/", maxSplits: 1)
        guard let addressPart = parts.first else { throw ParseError(text: text) }
        let address: SocketAddress
        do {
            address = try SocketAddress(ipAddress: String(addressPart), port: 0)
        } catch {
            throw ParseError(text: text)
        }
        guard let bytes = Self.addressBytes(address) else { throw ParseError(text: text) }
        let maxPrefix = bytes.count * 8
        var prefix = maxPrefix
        if parts.count == 2 {
            guard let p = Int(parts[1]), p >= 0, p <= maxPrefix else { throw ParseError(text: text) }
            prefix = p
        }
        self.bytes = bytes
        self.prefixLength = prefix
    }

    func contains(_ address: SocketAddress) -> Bool {
        guard var other = Self.addressBytes(address) else { return false }
        // An IPv4-mapped IPv6 peer (::ffff:a.b.c.d) matches IPv4 ranges.
        if other.count == 16 && bytes.count == 4 && other[0..<10].allSatisfy({ $0 == 0 })
            && other[10] == 0xff && other[11] == 0xff {
            other = Array(other[12..<16])
        }
        guard other.count == bytes.count else { return false }
        var remaining = prefixLength
        var i = 0
        while remaining > 0 {
            let bits = min(8, remaining)
            let mask: UInt8 = bits == 8 ? 0xff : ~(0xff >> UInt8(bits))
            if bytes[i] & mask != other[i] & mask { return false }
            remaining -= bits
            i += 1
        }
        return true
    }

    static func addressBytes(_ address: SocketAddress) -> [UInt8]? {
        switch address {
        case .v4(let a):
            let raw = a.address.sin_addr.s_addr  // network byte order
            return withUnsafeBytes(of: raw) { Array($0) }
        case .v6(let a):
            return withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
        default:
            return nil
        }
    }
}
