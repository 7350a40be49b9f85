/// A request's HTTP/2 header list, checked against RFC 9113 §8.2-8.3 in the
/// one pass that also collects what `HTTP2RequestHead` needs (where the
/// pseudo-headers are, the HTTP/1.1 head's size).
///
/// Downstream, nghttp2's own HTTP messaging checks are off
/// (`HTTP2DownstreamConnection.startSession`); these run on the list's
/// bytes as nghttp2 decoded them (no String per field), on the request
/// side, where a client's bytes could otherwise be smuggled into the
/// HTTP/1.1 head written for the upstream. A failure is a stream error
/// PROTOCOL_ERROR.
struct HTTP2RequestFields {
    /// Positions in the list of `:method`, `:path` (-1: none, CONNECT) and
    /// `:authority` (-1: none): the head is written from their bytes.
    var methodIndex = 0
    var pathIndex = -1
    var authorityIndex = -1
    /// An upper bound of the HTTP/1.1 head's size: every field as a line
    /// (6 for ": ", CRLF and the request line's spaces), plus 64 for the
    /// fixed parts (" HTTP/1.1", "host: ", "cookie: ", transfer-encoding,
    /// the defaulted path and the last CRLF).
    var headSize = 64
    /// A regular field's value holds a control character other than NUL,
    /// CR and LF (or DEL): not malformed for RFC 9113, but the HTTP/1.1
    /// head rules refuse it (400, `HTTP2RequestHead`), as for HTTP/1.1.
    var hasControlCharacterInValue = false

    /// What makes a header list malformed (RFC 9113 §8.1.1), for the log.
    enum Malformed: Error, Equatable {
        case invalidName(String)
        case invalidValue(name: String)
        /// The value starts or ends with SP or HTAB (RFC 9113 §8.2.1).
        case whitespaceAroundValue(name: String)
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

    /// Checks a request's header list and notes where its pseudo-headers are.
    init(_ fields: HTTP2FieldList) throws {
        var seen: Pseudo = []
        var regularSeen = false
        var isConnect = false, pathIsEmpty = false, headSize = 64, controls = false
        var index = 0, methodIndex = 0, pathIndex = -1, authorityIndex = -1
        try fields.forEach { name, value in
            defer { index += 1 }
            headSize &+= name.count &+ value.count &+ 6
            if name.first == UInt8(ascii: ":") {
                if regularSeen { throw Malformed.pseudoAfterRegular(Self.text(name)) }
                let kind: Pseudo
                if HTTP2FieldList.equals(name, ":method") {
                    kind = .method; methodIndex = index
                    isConnect = HTTP2FieldList.equals(value, "CONNECT")
                } else if HTTP2FieldList.equals(name, ":path") {
                    kind = .path; pathIndex = index; pathIsEmpty = value.isEmpty
                } else if HTTP2FieldList.equals(name, ":authority") {
                    kind = .authority; authorityIndex = index
                } else if HTTP2FieldList.equals(name, ":scheme") {
                    kind = .scheme   // the listener's scheme is what counts (X-Forwarded-Proto)
                } else {
                    throw Malformed.unknownPseudo(Self.text(name))   // :protocol too: extended CONNECT is not offered
                }
                if seen.contains(kind) { throw Malformed.duplicatePseudo(Self.text(name)) }
                seen.insert(kind)
                guard Self.isValidPseudoValue(value) else { throw Malformed.invalidValue(name: Self.text(name)) }
            } else {
                regularSeen = true
                if try Self.checkRegular(name: name, value: value) { controls = true }
                if HTTP2FieldList.equals(name, "te") && !HTTP2FieldList.equals(value, "trailers") { throw Malformed.teOtherThanTrailers }
            }
        }
        self.methodIndex = methodIndex
        self.pathIndex = pathIndex
        self.authorityIndex = authorityIndex
        self.headSize = headSize
        self.hasControlCharacterInValue = controls
        // CONNECT (RFC 9113 §8.5): :method and :authority only; anything
        // else: :method, :scheme and :path, :authority optional.
        let valid = isConnect
            ? seen == [.method, .authority]
            : seen.isSuperset(of: [.method, .scheme, .path])
        guard valid else { throw Malformed.missingOrExtraPseudo }
        if pathIsEmpty { throw Malformed.emptyPath }
    }

    @inline(__always)
    static func text(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
        String(decoding: bytes, as: UTF8.self)
    }

    /// Checks a trailer section: regular fields only, each as in a request head.
    static func checkTrailers(_ fields: HTTP2FieldList) throws {
        try fields.forEach { name, value in
            if name.first == UInt8(ascii: ":") { throw Malformed.pseudoInTrailers(text(name)) }
            _ = try checkRegular(name: name, value: value)
        }
    }

    /// A regular field: a lower-case token name that is not connection-specific
    /// (RFC 9113 §8.2.2), a value without NUL, CR or LF and that neither
    /// starts nor ends with SP or HTAB (§8.2.1: such a request is malformed,
    /// so it is refused rather than trimmed and forwarded). Returns whether
    /// the value holds another control character (or DEL).
    private static func checkRegular(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) throws -> Bool {
        guard isLowercaseToken(name) else { throw Malformed.invalidName(text(name)) }
        if isConnectionSpecific(name) { throw Malformed.connectionSpecific(text(name)) }
        if let first = value.first, let last = value.last,
           HTTP1Bytes.isWhitespace(first) || HTTP1Bytes.isWhitespace(last) {
            throw Malformed.whitespaceAroundValue(name: text(name))
        }
        return try checkValue(value, name: name)
    }

    /// Throws for NUL, CR or LF; returns whether another control character
    /// (or DEL) is there. Eight bytes at a time while they are plain
    /// (visible ASCII or SP, the usual value), byte by byte from a flagged
    /// one (HTAB and obs-text are flagged too, and allowed).
    @inline(__always)
    private static func checkValue(_ value: UnsafeBufferPointer<UInt8>, name: UnsafeBufferPointer<UInt8>) throws -> Bool {
        guard let p = value.baseAddress else { return false }
        let n = value.count
        var controls = false
        var i = 0
        while i < n {
            if i + 8 <= n {
                let flags = HTTP1Bytes.nonPlainBytes(UInt64(littleEndian: UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self)))
                if flags == 0 { i &+= 8; continue }
                i &+= flags.trailingZeroBitCount >> 3
            }
            let b = p[i]
            if b < 0x20 || b == 0x7F {
                if b == 0 || b == 13 || b == 10 { throw Malformed.invalidValue(name: text(name)) }
                if b != 0x09 { controls = true }
            }
            i &+= 1
        }
        return controls
    }

    private static func isConnectionSpecific(_ name: UnsafeBufferPointer<UInt8>) -> Bool {
        // Compared only when the length matches one of them (most names do not).
        switch name.count {
        case 7: return HTTP2FieldList.equals(name, "upgrade")
        case 10: return HTTP2FieldList.equals(name, "connection") || HTTP2FieldList.equals(name, "keep-alive")
        case 16: return HTTP2FieldList.equals(name, "proxy-connection")
        case 17: return HTTP2FieldList.equals(name, "transfer-encoding")
        default: return false
        }
    }

    /// RFC 9110 tchar (the HTTP/1.1 parser's table) without A-Z (RFC 9113
    /// §8.2: names are lower case), at least one.
    static func isLowercaseToken(_ name: UnsafeBufferPointer<UInt8>) -> Bool {
        guard !name.isEmpty else { return false }
        for b in name where !(HTTP1Bytes.isTChar(b) && b &- UInt8(ascii: "A") >= 26) { return false }
        return true
    }

    static func isLowercaseToken(_ name: String) -> Bool {
        var name = name
        return name.withUTF8 { isLowercaseToken($0) }
    }

    /// The same check as a plugin-set value's.
    static func isValidValue(_ value: String) -> Bool {
        HeadSerialization.isValidFieldValue(value)
    }

    /// No control character, space or DEL: a pseudo-header becomes part of
    /// the HTTP/1.1 request line (`:path` its target), where a space would
    /// split it differently. Bytes from 0x80 stay (unencoded UTF-8 paths).
    static func isValidPseudoValue(_ value: UnsafeBufferPointer<UInt8>) -> Bool {
        for byte in value where byte <= 0x20 || byte == 0x7F { return false }
        return true
    }
}
