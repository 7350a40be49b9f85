// Parsers for the small value syntaxes used in config files: durations,
// sizes, host:port pairs, host names and CIDR blocks. Each returns nil or
// throws a plain message; the loader attaches the config path.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension TimeSpan {
    /// Parses `250ms`, `2s`, `1m`, `1h`, `1m30s`, `1.5s`; a bare number is seconds.
    /// Units: `us`, `ms`, `s`, `m`, `h`. Negative spans are refused.
    public init?(parsing text: String) {
        let trimmed = text.trimmingASCIIWhitespace()
        guard !trimmed.isEmpty else { return nil }
        if let seconds = Double(trimmed) {
            let nanoseconds = seconds * 1_000_000_000
            guard nanoseconds >= 0, nanoseconds < Double(Int64.max) else { return nil }   // also refuses nan/inf
            self.init(nanoseconds: Int64(nanoseconds))
            return
        }
        var total: Double = 0
        var scalars = Substring(trimmed).unicodeScalars[...]
        while !scalars.isEmpty {
            let number = scalars.prefix { ("0"..."9").contains($0) || $0 == "." }
            guard !number.isEmpty, let value = Double(String(number)) else { return nil }
            scalars = scalars.dropFirst(number.count)
            let unit = String(scalars.prefix { ("a"..."z").contains($0) })
            scalars = scalars.dropFirst(unit.count)
            let multiplier: Double
            switch unit {
            case "us": multiplier = 1_000
            case "ms": multiplier = 1_000_000
            case "s": multiplier = 1_000_000_000
            case "m": multiplier = 60_000_000_000
            case "h": multiplier = 3_600_000_000_000
            default: return nil
            }
            total += value * multiplier
        }
        guard total.isFinite, total < Double(Int64.max) else { return nil }
        self.init(nanoseconds: Int64(total))
    }
}

/// Byte sizes: `512`, `64k`, `8m`, `1g` (also `kb`/`mb`/`gb`, any case; powers of 1024).
public enum ByteSize {
    public static func parse(_ text: String) -> Int? {
        let lower = text.trimmingASCIIWhitespace().lowercased()
        guard !lower.isEmpty else { return nil }
        let digits = lower.prefix { ("0"..."9").contains($0) }
        guard !digits.isEmpty, let value = Int(digits) else { return nil }
        let multiplier: Int
        switch lower.dropFirst(digits.count) {
        case "", "b": multiplier = 1
        case "k", "kb", "kib": multiplier = 1 << 10
        case "m", "mb", "mib": multiplier = 1 << 20
        case "g", "gb", "gib": multiplier = 1 << 30
        default: return nil
        }
        let (product, overflow) = value.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : product
    }
}

extension HostPort {
    /// Parses `127.0.0.1:8080`, `[::1]:8080` or `example.com:80`.
    /// `allowPortZero` is for listeners (0 asks the kernel for a free port).
    public static func parse(_ text: String, allowPortZero: Bool = false) throws -> HostPort {
        let trimmed = text.trimmingASCIIWhitespace()
        let host: String
        let portText: Substring
        if trimmed.hasPrefix("[") {
            guard let close = trimmed.firstIndex(of: "]") else {
                throw ConfigValueError("invalid address \"\(text)\": missing \"]\" after IPv6 host")
            }
            host = String(trimmed[trimmed.index(after: trimmed.startIndex)..<close])
            let rest = trimmed[trimmed.index(after: close)...]
            guard rest.hasPrefix(":") else {
                throw ConfigValueError("invalid address \"\(text)\": expected host:port")
            }
            portText = rest.dropFirst()
            guard IPAddress.isIPv6(host) else {
                throw ConfigValueError("invalid address \"\(text)\": \"\(host)\" is not an IPv6 address")
            }
        } else {
            guard let colon = trimmed.lastIndex(of: ":") else {
                throw ConfigValueError("invalid address \"\(text)\": expected host:port")
            }
            host = String(trimmed[..<colon])
            portText = trimmed[trimmed.index(after: colon)...]
            if host.contains(":") {
                throw ConfigValueError("invalid address \"\(text)\": IPv6 hosts must be in brackets, e.g. [::1]:8080")
            }
            guard IPAddress.isIPv4(host) || HostName.isValid(host) else {
                throw ConfigValueError("invalid address \"\(text)\": \"\(host)\" is not a valid host")
            }
        }
        guard let port = Int(portText), port >= (allowPortZero ? 0 : 1), port <= 65535 else {
            throw ConfigValueError("invalid address \"\(text)\": port must be \(allowPortZero ? 0 : 1)-65535")
        }
        return HostPort(host: host, port: port)
    }
}

/// A message-only error from a value parser; the loader adds the path.
public struct ConfigValueError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public enum HostName {
    /// A DNS name: dot-separated labels of letters, digits and `-` (1-63 chars,
    /// not starting or ending with `-`), 253 chars at most. `_` is tolerated
    /// because service-discovery names use it.
    public static func isValid(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty, bytes.count <= 253 else { return false }
        for label in bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard !label.isEmpty, label.count <= 63,
                  label.first != UInt8(ascii: "-"), label.last != UInt8(ascii: "-") else { return false }
            for byte in label {
                let ok = (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A)
                    || (byte >= 0x61 && byte <= 0x7A) || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
                if !ok { return false }
            }
        }
        return true
    }

    /// A route host pattern: an exact name or `*.suffix` wildcard.
    public static func isValidPattern(_ pattern: String) -> Bool {
        if pattern.hasPrefix("*.") { return isValid(String(pattern.dropFirst(2))) }
        return isValid(pattern) || IPAddress.isIPv4(pattern)
    }
}

public enum IPAddress {
    public static func isIPv4(_ text: String) -> Bool { parseIPv4(text) != nil }
    public static func isIPv6(_ text: String) -> Bool { parseIPv6(text) != nil }

    static func parseIPv4(_ text: String) -> [UInt8]? {
        var address = in_addr()
        guard inet_pton(AF_INET, text, &address) == 1 else { return nil }
        return withUnsafeBytes(of: &address) { Array($0) }
    }

    static func parseIPv6(_ text: String) -> [UInt8]? {
        var address = in6_addr()
        guard inet_pton(AF_INET6, text, &address) == 1 else { return nil }
        return withUnsafeBytes(of: &address) { Array($0) }
    }
}

/// An IPv4 or IPv6 network such as `10.0.0.0/8` or `::1/128`; a bare
/// address is a single-host block. Used for `forwarded.trusted_proxies`.
public struct CIDRBlock: Hashable, Sendable, CustomStringConvertible {
    public let network: [UInt8]
    public let prefixLength: Int
    public let description: String

    public init(parsing text: String) throws {
        let trimmed = text.trimmingASCIIWhitespace()
        let parts = trimmed.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let first = parts.first else {
            throw ConfigValueError("invalid CIDR \"\(text)\"")
        }
        guard let bytes = IPAddress.parseIPv4(String(first)) ?? IPAddress.parseIPv6(String(first)) else {
            throw ConfigValueError("invalid CIDR \"\(text)\": \"\(first)\" is not an IP address")
        }
        let maxLength = bytes.count * 8
        var length = maxLength
        if parts.count == 2 {
            guard let parsed = Int(parts[1]), parsed >= 0, parsed <= maxLength else {
                throw ConfigValueError("invalid CIDR \"\(text)\": prefix length must be 0-\(maxLength)")
            }
            length = parsed
        }
        self.network = CIDRBlock.mask(bytes, to: length)
        self.prefixLength = length
        self.description = trimmed
    }

    /// True when `address` (textual IPv4 or IPv6) lies inside this block.
    /// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) match IPv4 blocks.
    public func contains(_ address: String) -> Bool {
        guard var bytes = IPAddress.parseIPv4(address) ?? IPAddress.parseIPv6(address) else { return false }
        if bytes.count == 16, network.count == 4, bytes[0..<10].allSatisfy({ $0 == 0 }),
           bytes[10] == 0xFF, bytes[11] == 0xFF {
            bytes = Array(bytes[12...])
        }
        guard bytes.count == network.count else { return false }
        return CIDRBlock.mask(bytes, to: prefixLength) == network
    }

    private static func mask(_ bytes: [UInt8], to length: Int) -> [UInt8] {
        var result = bytes
        for index in 0..<result.count {
            let bitsInThisByte = max(0, min(8, length - index * 8))
            result[index] &= bitsInThisByte == 0 ? 0 : UInt8(truncatingIfNeeded: 0xFF << (8 - bitsInThisByte))
        }
        return result
    }
}

extension String {
    func trimmingASCIIWhitespace() -> String {
        var scalars = Substring(self).unicodeScalars[...]
        while let first = scalars.first, first == " " || first == "\t" || first == "\n" || first == "\r" {
            scalars = scalars.dropFirst()
        }
        while let last = scalars.last, last == " " || last == "\t" || last == "\n" || last == "\r" {
            scalars = scalars.dropLast()
        }
        return String(scalars)
    }
}
