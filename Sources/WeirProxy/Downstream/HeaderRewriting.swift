import NIOCore
import NIOHTTP1

/// Hop-by-hop header handling (RFC 9110 §7.6.1) and the forwarding headers.
/// Framing headers (Content-Length / Transfer-Encoding) are decided here too,
/// because the encoders run with automatic framing off: the proxy, not NIO,
/// says how each forwarded message is delimited.
enum HeaderRewriting {
    /// Names that never travel past one hop, beyond those listed in Connection.
    /// `te` is handled separately (`te: trailers` is kept on requests).
    private static let alwaysHopByHop: [String] = [
        "connection", "keep-alive", "proxy-connection", "trailer", "transfer-encoding", "upgrade",
    ]

    /// What the client's head says about its body and connection.
    struct RequestFraming {
        var chunked = false
        var contentLength: Int? = nil
        var wantsUpgrade = false
        var expectsContinue = false
        var teTrailers = false
        var hasBody: Bool { chunked || (contentLength ?? 0) > 0 }
    }

    /// Removes hop-by-hop headers in place and reports what they said.
    /// Returns the Upgrade value if the request asked for one.
    static func stripHopByHop(_ headers: inout HTTPHeaders, keepUpgrade: Bool) -> (upgrade: String?, teTrailers: Bool) {
        var listed: [String] = []
        var upgradeToken = false
        var teTrailers = false
        var hasConnection = false
        var hasHopByHop = false
        for (name, value) in headers {
            // Fast check on the first byte before doing any case folding.
            guard let first = name.utf8.first else { continue }
            switch first | 0x20 {
            case UInt8(ascii: "c"):
                if name.lowercased() == "connection" {
                    hasConnection = true
                    for token in value.split(separator: ",") {
                        let t = token.trimmingASCIISpaces().lowercased()
                        if t == "upgrade" { upgradeToken = true } else if !t.isEmpty && t != "close" && t != "keep-alive" { listed.append(t) }
                    }
                }
            case UInt8(ascii: "t"):
                let lower = name.lowercased()
                if lower == "te" {
                    hasHopByHop = true
                    for token in value.split(separator: ",") where token.trimmingASCIISpaces().lowercased().hasPrefix("trailers") {
                        teTrailers = true
                    }
                } else if lower == "transfer-encoding" || lower == "trailer" { hasHopByHop = true }
            case UInt8(ascii: "k"), UInt8(ascii: "p"), UInt8(ascii: "u"):
                hasHopByHop = true
            default:
                continue
            }
        }
        var upgradeValue: String? = nil
        if keepUpgrade && upgradeToken {
            upgradeValue = headers.first(name: "upgrade")
        }
        if hasConnection || hasHopByHop {
            for name in alwaysHopByHop { headers.remove(name: name) }
            headers.remove(name: "te")
            for name in listed { headers.remove(name: name) }
        }
        return (upgradeValue, teTrailers)
    }

    /// Builds the head sent upstream from the client's head.
    static func upstreamRequestHead(
        from head: HTTPRequestHead, forwardURI: String, framing: RequestFraming,
        upgrade: String?, hostHeader: String, clientHost: String?, clientIP: String, peerTrusted: Bool,
        scheme: String
    ) -> HTTPRequestHead {
        var headers = head.headers
        _ = stripHopByHop(&headers, keepUpgrade: false)
        if framing.chunked {
            headers.add(name: "transfer-encoding", value: "chunked")
        }
        if framing.teTrailers {
            headers.add(name: "te", value: "trailers")
        }
        if let upgrade {
            headers.add(name: "connection", value: "upgrade")
            headers.add(name: "upgrade", value: upgrade)
        }
        // Host: the target (or the client's when preserve_host).
        headers.replaceOrAdd(name: "host", value: hostHeader)

        // X-Forwarded-For: only a trusted peer's list is extended.
        if peerTrusted, let existing = joinedValue(headers, "x-forwarded-for") {
            headers.replaceOrAdd(name: "x-forwarded-for", value: existing + ", " + clientIP)
        } else {
            headers.replaceOrAdd(name: "x-forwarded-for", value: clientIP)
        }
        if !(peerTrusted && headers.contains(name: "x-forwarded-proto")) {
            headers.replaceOrAdd(name: "x-forwarded-proto", value: scheme)
        }
        if !(peerTrusted && headers.contains(name: "x-forwarded-host")) {
            if let clientHost {
                headers.replaceOrAdd(name: "x-forwarded-host", value: clientHost)
            } else {
                headers.remove(name: "x-forwarded-host")
            }
        }
        appendVia(&headers, version: head.version)
        // Upstream always speaks HTTP/1.1 with us (pooled keep-alive).
        return HTTPRequestHead(version: .http1_1, method: head.method, uri: forwardURI, headers: headers)
    }

    /// Rewrites an upstream response head for the client. `bodyAllowed` is
    /// false for HEAD requests and 1xx/204/304. Returns the head and whether the
    /// client connection must close after it (no way to frame the body).
    static func downstreamResponseHead(
        _ response: HTTPResponseHead, requestVersion: HTTPVersion, bodyAllowed: Bool,
        keepAlive: Bool, isUpgrade: Bool
    ) -> (head: HTTPResponseHead, mustClose: Bool) {
        var headers = response.headers
        let upstreamChunked = headers.first(name: "transfer-encoding").map { $0.lowercased().hasSuffix("chunked") } ?? false
        let (_, _) = stripHopByHop(&headers, keepUpgrade: false)
        var mustClose = !keepAlive
        let clientIs11 = requestVersion.major == 1 && requestVersion.minor >= 1
        if isUpgrade {
            headers.add(name: "connection", value: "upgrade")
            if let upgrade = response.headers.first(name: "upgrade") { headers.add(name: "upgrade", value: upgrade) }
        } else if bodyAllowed {
            if headers.contains(name: "content-length") {
                // length-delimited; nothing to add
            } else if clientIs11 {
                headers.add(name: "transfer-encoding", value: "chunked")
            } else {
                // HTTP/1.0 client and no length: the body ends at close.
                mustClose = true
            }
            _ = upstreamChunked
        }
        if !isUpgrade {
            if mustClose {
                headers.add(name: "connection", value: "close")
            } else if !clientIs11 {
                headers.add(name: "connection", value: "keep-alive")
            }
        }
        appendVia(&headers, version: response.version)
        let version: HTTPVersion = clientIs11 ? .http1_1 : .http1_0
        return (HTTPResponseHead(version: version, status: response.status, headers: headers), mustClose)
    }

    private static func appendVia(_ headers: inout HTTPHeaders, version: HTTPVersion) {
        let entry = version.major == 1 && version.minor == 0 ? "1.0 weir" : "1.1 weir"
        if let existing = joinedValue(headers, "via") {
            headers.replaceOrAdd(name: "via", value: existing + ", " + entry)
        } else {
            headers.add(name: "via", value: entry)
        }
    }

    private static func joinedValue(_ headers: HTTPHeaders, _ name: String) -> String? {
        let values = headers[name]
        if values.isEmpty { return nil }
        if values.count == 1 { return values[0] }
        return values.joined(separator: ", ")
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
