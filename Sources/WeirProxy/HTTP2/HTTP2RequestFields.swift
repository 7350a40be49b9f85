import NIOHPACK

/// A request's HTTP/2 header list, checked against RFC 9113 §8.2-8.3 in the
/// one pass that also collects what `HTTP2ServerStream.beginRequest` needs
/// (the pseudo-header values, the HTTP/1.1 head's size).
///
/// Downstream, nio-http2's own header block validation is off
/// (`HTTP2DownstreamConnection.configure`): it walked every list again with
/// String compares, on the way in and on the way out (our own response
/// fields, which Weir builds lower-case and without connection-specific
/// fields), ~24 k instructions per request. These are the same checks, on
/// the request side, where a client's bytes could otherwise be smuggled
/// into the HTTP/1.1 head written for the upstream. A failure is a stream
/// error PROTOCOL_ERROR, as it was from nio-http2.
struct HTTP2RequestFields {
    var method = ""
    var path = ""
    var authority: String? = nil
    /// An upper bound of the HTTP/1.1 head's size: every field as a line
    /// (6 for ": ", CRLF and the request line's spaces), plus 64 for the
    /// fixed parts (" HTTP/1.1", "host: ", "cookie: ", transfer-encoding,
    /// the defaulted path and the last CRLF).
    var headSize = 64

    /// What makes a header list malformed (RFC 9113 §8.1.1), for the log.
    enum Malformed: Error, Equatable {
        case invalidName(String)
        case invalidValue(name: String)
        case connectionSpecific(String)
        case teOtherThanTrailers
        case pseudoAfterRegular(String)
        case unknownPseudo(String)
        case duplicatePseudo(String)
        case pseudoInTrailers(String)
        case emptyPath
        case missingOrExtraPseudo
        case bodyLongerThanContentLength
        case bodyShorterThanContentLength
        case trailersWithoutEndStream
        case headerListTooLarge
    }

    private struct Pseudo: OptionSet {
        let rawValue: UInt8
        static let method = Pseudo(rawValue: 1 << 0)
        static let scheme = Pseudo(rawValue: 1 << 1)
        static let authority = Pseudo(rawValue: 1 << 2)
        static let path = Pseudo(rawValue: 1 << 3)
    }

    /// Checks a request's header list and collects its pseudo-headers.
    init(_ headers: HPACKHeaders) throws {
        var seen: Pseudo = []
        var regularSeen = false
        for (name, value, _) in headers {
            headSize &+= name.utf8.count &+ value.utf8.count &+ 6
            if name.utf8.first == UInt8(ascii: ":") {
                if regularSeen { throw Malformed.pseudoAfterRegular(name) }
                let kind: Pseudo
                switch name {
                case ":method": kind = .method; method = value
                case ":path": kind = .path; path = value
                case ":authority": kind = .authority; authority = value
                case ":scheme": kind = .scheme   // the listener's scheme is what counts (X-Forwarded-Proto)
                default: throw Malformed.unknownPseudo(name)   // :protocol too: extended CONNECT is not offered
                }
                if seen.contains(kind) { throw Malformed.duplicatePseudo(name) }
                seen.insert(kind)
                guard Self.isValidPseudoValue(value) else { throw Malformed.invalidValue(name: name) }
            } else {
                regularSeen = true
                try Self.checkRegular(name: name, value: value)
                if name == "te" && value != "trailers" { throw Malformed.teOtherThanTrailers }
            }
        }
        // CONNECT (RFC 9113 §8.5): :method and :authority only; anything
        // else: :method, :scheme and :path, :authority optional.
        let valid = method == "CONNECT"
            ? seen == [.method, .authority]
            : seen.isSuperset(of: [.method, .scheme, .path])
        guard valid else { throw Malformed.missingOrExtraPseudo }
        if seen.contains(.path) && path.isEmpty { throw Malformed.emptyPath }
    }

    /// Checks a trailer section: regular fields only, each as in a request head.
    static func checkTrailers(_ headers: HPACKHeaders) throws {
        for (name, value, _) in headers {
            if name.utf8.first == UInt8(ascii: ":") { throw Malformed.pseudoInTrailers(name) }
            try checkRegular(name: name, value: value)
        }
    }

    /// A regular field: a lower-case token name that is not connection-specific
    /// (RFC 9113 §8.2.2), a value without NUL, CR or LF (§8.2.1).
    private static func checkRegular(name: String, value: String) throws {
        guard isLowercaseToken(name) else { throw Malformed.invalidName(name) }
        if isConnectionSpecific(name) { throw Malformed.connectionSpecific(name) }
        guard isValidValue(value) else { throw Malformed.invalidValue(name: name) }
    }

    private static func isConnectionSpecific(_ name: String) -> Bool {
        // Compared only when the length matches one of them (most names do not).
        switch name.utf8.count {
        case 7: return name == "upgrade"
        case 10: return name == "connection" || name == "keep-alive"
        case 16: return name == "proxy-connection"
        case 17: return name == "transfer-encoding"
        default: return false
        }
    }

    /// RFC 9110 tchar (the HTTP/1.1 parser's table) without A-Z (RFC 9113
    /// §8.2: names are lower case), at least one.
    static func isLowercaseToken(_ name: String) -> Bool {
        @inline(__always) func ok(_ b: UInt8) -> Bool { HTTP1Bytes.isTChar(b) && b &- UInt8(ascii: "A") >= 26 }
        if let valid = name.utf8.withContiguousStorageIfAvailable({ bytes -> Bool in
            guard let p = bytes.baseAddress, bytes.count > 0 else { return false }
            for i in 0..<bytes.count where !ok(p[i]) { return false }
            return true
        }) { return valid }
        return !name.isEmpty && name.utf8.allSatisfy(ok)
    }

    /// No NUL, CR or LF (RFC 9113 §8.2.1): the same check as a plugin-set value.
    static func isValidValue(_ value: String) -> Bool {
        HeadSerialization.isValidFieldValue(value)
    }

    /// No control character, space or DEL: a pseudo-header becomes part of
    /// the HTTP/1.1 request line (`:path` its target), where a space would
    /// split it differently. Bytes from 0x80 stay (unencoded UTF-8 paths).
    static func isValidPseudoValue(_ value: String) -> Bool {
        var value = value
        return value.withUTF8 { bytes in
            for byte in bytes where byte <= 0x20 || byte == 0x7F { return false }
            return true
        }
    }
}
