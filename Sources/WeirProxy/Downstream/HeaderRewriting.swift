import NIOCore
import NIOHTTP1

/// Hop-by-hop header handling (RFC 9110 §7.6.1) and the forwarding headers.
/// Framing headers (Content-Length / Transfer-Encoding) are decided here too,
/// because the encoders run with automatic framing off: the proxy, not NIO,
/// says how each forwarded message is delimited.
///
/// Hot path: each forwarded head is rebuilt in one pass over the incoming
/// headers, comparing names by length and ASCII bytes (no lower-cased
/// copies); only names listed in `Connection` need a second pass.
enum HeaderRewriting {
    /// What the client's head says about its body.
    struct RequestFraming {
        var chunked = false
        var contentLength: Int? = nil
        var expectsContinue = false
        var teTrailers = false
        var hasBody: Bool { chunked || (contentLength ?? 0) > 0 }
    }

    /// Header names the rewriting cares about, by identity.
    enum Known {
        case connection, keepAlive, proxyConnection, te, trailer, transferEncoding, upgrade
        case host, xForwardedFor, xForwardedProto, xForwardedHost, via, xRequestID
        case contentLength, expect
        case other

        /// Position in `namesByBit` (only kinds that are ever removed).
        var bit: UInt32 {
            switch self {
            case .connection: return 0
            case .keepAlive: return 1
            case .proxyConnection: return 2
            case .te: return 3
            case .trailer: return 4
            case .transferEncoding: return 5
            case .upgrade: return 6
            case .host: return 7
            case .xForwardedFor: return 8
            case .xForwardedProto: return 9
            case .xForwardedHost: return 10
            case .via: return 11
            case .xRequestID: return 12
            case .contentLength: return 13
            case .expect: return 14
            case .other: return 15
            }
        }

        static let namesByBit: [String] = [
            "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
            "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id",
        ]

        var isHopByHop: Bool {
            switch self {
            case .connection, .keepAlive, .proxyConnection, .te, .trailer, .transferEncoding, .upgrade: return true
            default: return false
            }
        }

        /// Classifies a header name by length first, then bytes.
        @inline(__always)
        static func classify(_ name: String) -> Known {
            switch name.utf8.count {
            case 2: return name.equalsLowercaseASCII("te") ? .te : .other
            case 3: return name.equalsLowercaseASCII("via") ? .via : .other
            case 4: return name.equalsLowercaseASCII("host") ? .host : .other
            case 6: return name.equalsLowercaseASCII("expect") ? .expect : .other
            case 7:
                if name.equalsLowercaseASCII("upgrade") { return .upgrade }
                return name.equalsLowercaseASCII("trailer") ? .trailer : .other
            case 10:
                if name.equalsLowercaseASCII("connection") { return .connection }
                return name.equalsLowercaseASCII("keep-alive") ? .keepAlive : .other
            case 12: return name.equalsLowercaseASCII("x-request-id") ? .xRequestID : .other
            case 14: return name.equalsLowercaseASCII("content-length") ? .contentLength : .other
            case 15: return name.equalsLowercaseASCII("x-forwarded-for") ? .xForwardedFor : .other
            case 16:
                if name.equalsLowercaseASCII("proxy-connection") { return .proxyConnection }
                return name.equalsLowercaseASCII("x-forwarded-host") ? .xForwardedHost : .other
            case 17:
                if name.equalsLowercaseASCII("transfer-encoding") { return .transferEncoding }
                return name.equalsLowercaseASCII("x-forwarded-proto") ? .xForwardedProto : .other
            default: return .other
            }
        }
    }

    /// Header names listed in Connection values, beyond close/keep-alive/upgrade
    /// (those are handled by the rewriting anyway). Usually empty.
    static func connectionListedNames(_ value: String, into names: inout [String]) {
        // Nearly every Connection header is exactly one of these.
        if value.equalsLowercaseASCII("keep-alive") || value.equalsLowercaseASCII("close")
            || value.equalsLowercaseASCII("upgrade") {
            return
        }
        for token in value.split(separator: ",") {
            let t = token.trimmingASCIISpaces()
            if t.isEmpty { continue }
            let lower = t.lowercased()
            if lower == "close" || lower == "keep-alive" || lower == "upgrade" { continue }
            names.append(lower)
        }
    }

    /// Kinds seen in a header block that must be removed, as a bit set, so
    /// the block can be copied whole and only those names scanned out.
    struct RemovalSet {
        private var bits: UInt32 = 0
        @inline(__always) mutating func insert(_ kind: Known) { bits |= 1 << kind.bit }
        var isEmpty: Bool { bits == 0 }
        func apply(to headers: inout HTTPHeaders) {
            guard bits != 0 else { return }
            for (bit, name) in Known.namesByBit.enumerated() where bits & (1 << UInt32(bit)) != 0 {
                headers.remove(name: name)
            }
        }
    }

    /// Builds the head sent upstream from the client's head.
    static func upstreamRequestHead(
        from head: HTTPRequestHead, forwardURI: String, framing: RequestFraming,
        upgrade: String?, hostHeader: String, clientHost: String?, clientIP: String, peerTrusted: Bool,
        scheme: String, requestID: String
    ) -> HTTPRequestHead {
        var listed: [String] = []
        var removals = RemovalSet()
        var forwardedFor: String? = nil
        var forwardedProto: String? = nil
        var forwardedHost: String? = nil
        var via: String? = nil
        for (name, value) in head.headers {
            let kind = Known.classify(name)
            switch kind {
            case .other, .contentLength, .expect:
                continue
            case .connection:
                connectionListedNames(value, into: &listed)
            case .xForwardedFor:
                if peerTrusted { forwardedFor = forwardedFor.map { $0 + ", " + value } ?? value }
            case .xForwardedProto:
                if peerTrusted && forwardedProto == nil { forwardedProto = value }
            case .xForwardedHost:
                if peerTrusted && forwardedHost == nil { forwardedHost = value }
            case .via:
                via = via.map { $0 + ", " + value } ?? value
            case .host, .xRequestID, .keepAlive, .proxyConnection, .te, .trailer, .transferEncoding, .upgrade:
                break
            }
            removals.insert(kind)
        }
        // Copy the block whole (one array copy) and take out only what was there.
        var headers = head.headers
        headers.reserveCapacity(headers.count + 8)
        removals.apply(to: &headers)
        for name in listed { headers.remove(name: name) }

        headers.add(name: "host", value: hostHeader)
        if framing.chunked { headers.add(name: "transfer-encoding", value: "chunked") }
        if framing.teTrailers { headers.add(name: "te", value: "trailers") }
        if let upgrade {
            headers.add(name: "connection", value: "upgrade")
            headers.add(name: "upgrade", value: upgrade)
        }
        // X-Forwarded-*: a trusted peer's values are kept (its list extended);
        // anyone else's are replaced.
        headers.add(name: "x-forwarded-for", value: forwardedFor.map { $0 + ", " + clientIP } ?? clientIP)
        headers.add(name: "x-forwarded-proto", value: forwardedProto ?? scheme)
        if let host = forwardedHost ?? clientHost {
            headers.add(name: "x-forwarded-host", value: host)
        }
        let viaEntry = head.version.major == 1 && head.version.minor == 0 ? "1.0 weir" : "1.1 weir"
        headers.add(name: "via", value: via.map { $0 + ", " + viaEntry } ?? viaEntry)
        headers.add(name: "x-request-id", value: requestID)
        // Upstream always speaks HTTP/1.1 with us (pooled keep-alive).
        return HTTPRequestHead(version: .http1_1, method: head.method, uri: forwardURI, headers: headers)
    }

    /// Rewrites an upstream response head for the client. `bodyAllowed` is
    /// false for HEAD requests and 204/304. Returns the head and whether the
    /// client connection must close after it (no way to frame the body).
    static func downstreamResponseHead(
        _ response: HTTPResponseHead, requestVersion: HTTPVersion, bodyAllowed: Bool,
        keepAlive: Bool, isUpgrade: Bool
    ) -> (head: HTTPResponseHead, mustClose: Bool) {
        var listed: [String] = []
        var removals = RemovalSet()
        var hasContentLength = false
        var via: String? = nil
        var upgradeValue: String? = nil
        for (name, value) in response.headers {
            let kind = Known.classify(name)
            switch kind {
            case .contentLength:
                hasContentLength = true
                continue
            case .connection:
                connectionListedNames(value, into: &listed)
            case .via:
                via = via.map { $0 + ", " + value } ?? value
            case .upgrade:
                upgradeValue = value
            case .keepAlive, .proxyConnection, .te, .trailer, .transferEncoding:
                break
            case .other, .host, .xForwardedFor, .xForwardedProto, .xForwardedHost, .xRequestID, .expect:
                continue
            }
            removals.insert(kind)
        }
        var headers = response.headers
        headers.reserveCapacity(headers.count + 3)
        removals.apply(to: &headers)
        for name in listed { headers.remove(name: name) }

        var mustClose = !keepAlive
        let clientIs11 = requestVersion.major == 1 && requestVersion.minor >= 1
        if isUpgrade {
            headers.add(name: "connection", value: "upgrade")
            if let upgradeValue { headers.add(name: "upgrade", value: upgradeValue) }
        } else if bodyAllowed && !hasContentLength {
            if clientIs11 {
                headers.add(name: "transfer-encoding", value: "chunked")
            } else {
                // HTTP/1.0 client and no length: the body ends at close.
                mustClose = true
            }
        }
        if !isUpgrade {
            if mustClose {
                headers.add(name: "connection", value: "close")
            } else if !clientIs11 {
                headers.add(name: "connection", value: "keep-alive")
            }
        }
        let viaEntry = response.version.major == 1 && response.version.minor == 0 ? "1.0 weir" : "1.1 weir"
        headers.add(name: "via", value: via.map { $0 + ", " + viaEntry } ?? viaEntry)
        let version: HTTPVersion = clientIs11 ? .http1_1 : .http1_0
        return (HTTPResponseHead(version: version, status: response.status, headers: headers), mustClose)
    }
}

extension String {
    /// Case-insensitive ASCII comparison against an already lower-case
    /// token made of letters, digits and `-` (header names), without copying.
    @inline(__always)
    func equalsLowercaseASCII(_ lower: StaticString) -> Bool {
        let count = lower.utf8CodeUnitCount
        guard utf8.count == count else { return false }
        let other = lower.utf8Start
        if let result = utf8.withContiguousStorageIfAvailable({ bytes -> Bool in
            for i in 0..<count {
                let byte = bytes[i]
                if byte != other[i] && byte | 0x20 != other[i] { return false }
            }
            return true
        }) {
            return result
        }
        var i = 0
        for byte in utf8 {
            if byte != other[i] && byte | 0x20 != other[i] { return false }
            i += 1
        }
        return true
    }
}

extension Substring {
    func trimmingASCIISpaces() -> Substring {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return s
    }
}
