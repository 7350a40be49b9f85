import NIOCore

extension SocketAddress {
    /// The address as text for X-Forwarded-For and logs: IPv4 formatted
    /// here (NIO's `ipAddress` goes through inet_ntop and a C-string copy,
    /// ~3k instructions per accepted connection under callgrind), anything
    /// else through `ipAddress`.
    var clientIPText: String? {
        guard case .v4(let v4) = self else { return ipAddress }
        // s_addr is in network byte order: the first octet is the lowest byte in memory.
        let raw = UInt32(bigEndian: v4.address.sin_addr.s_addr)
        return String(unsafeUninitializedCapacity: 15) { out in
            var n = 0
            for shift in stride(from: 24, through: 0, by: -8) {
                let octet = Int((raw >> UInt32(shift)) & 0xff)
                if octet >= 100 { out[n] = UInt8(ascii: "0") + UInt8(octet / 100); n += 1 }
                if octet >= 10 { out[n] = UInt8(ascii: "0") + UInt8(octet / 10 % 10); n += 1 }
                out[n] = UInt8(ascii: "0") + UInt8(octet % 10); n += 1
                if shift > 0 { out[n] = UInt8(ascii: "."); n += 1 }
            }
            return n
        }
    }
}
