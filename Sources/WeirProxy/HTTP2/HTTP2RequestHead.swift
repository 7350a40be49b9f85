import NIOCore

/// The request head of an HTTP/2 stream, built straight from its decoded
/// header list: the HTTP/1.1 bytes the upstream is sent (by range copy, as
/// for an HTTP/1.1 client's head) and their field index, in one pass.
/// The head used to be written as bytes and then parsed again by
/// `HTTP1RequestParser` (every byte scanned a second time, ~2.1 k
/// instructions per request; BENCHMARKS.md "h2: the HTTP/2 request head
/// without the re-parse").
///
/// The result is what the parser would have made of those bytes, refused
/// for the same reasons with the same `HTTP1ParseError` (the stream answers
/// 400/414/431/501 with it): method a token, target visible ASCII in one of
/// the RFC 9112 §3.2 forms, start line and field section within
/// `HTTP1Limits`, no control character in a value (NUL, CR and LF already
/// made the list malformed, `HTTP2RequestFields`), content-length valid
/// and single, one Host. The list's own rules (pseudo-headers,
/// connection-specific fields, `te: trailers` only, lower-case names) are
/// `HTTP2RequestFields`', checked before.
///
/// What HTTP/2 changes in the head: `:authority` becomes the Host line (a
/// `host` field only stands in for a missing one, RFC 9113 §8.3.1), split
/// `cookie` fields are joined into one line (§8.2.3), and a body without a
/// content-length is announced as chunked (HTTP/2 frames delimit it, the
/// HTTP/1.1 upstream needs chunks).
enum HTTP2RequestHead {
    static func make(_ headers: HTTP2FieldList, _ fields: HTTP2RequestFields, endStream: Bool, limits: HTTP1Limits,
                     allocator: ByteBufferAllocator) throws -> HTTP1RequestHead {
        if fields.hasControlCharacterInValue { throw HTTP1ParseError.invalidFieldValue }
        let size = fields.headSize
        var entries: [HTTP1FieldEntry] = []
        entries.reserveCapacity(headers.count + 2)
        var facts = HTTP1FramingFacts()
        var line = HTTP1RequestParser.RequestLine(method: .other, methodLength: 0, target: 0..<0, version: .http1_1, headLength: 0)
        var head = allocator.buffer(capacity: size)
        _ = try headers.withFields { list in
            // One reservation and plain copies (a ByteBuffer write per piece
            // cost ~5 k instructions per request).
            try head.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { raw in
                var w = HTTP1HeadWriter.RawWriter(raw.baseAddress!)
                let method = list.value(at: fields.methodIndex)
                // CONNECT has no :path (refused by the target form: 400, as for HTTP/1.1's).
                let target = fields.pathIndex >= 0 ? list.value(at: fields.pathIndex)
                    : HTTP2FieldList.equals(method, "OPTIONS") ? Self.asterisk : Self.slash
                try checkStartLine(method: method, target: target, limits: limits, line: &line)
                w.copy(method.baseAddress!, method.count)
                w.copy(" ")
                w.copy(target.baseAddress!, target.count)
                w.copy(" HTTP/1.1\r\n")
                var section = FieldSection(start: w.offset, limits: limits)
                let hasAuthority = fields.authorityIndex >= 0
                if hasAuthority {
                    try section.add(&w, name: Self.host, value: list.value(at: fields.authorityIndex), entries: &entries, facts: &facts)
                }
                var cookies = 0
                var hasContentLength = false
                // Pseudo-headers come first (HTTP2RequestFields checked it).
                var i = 0
                while i < list.count, list.name(at: i).first == UInt8(ascii: ":") { i += 1 }
                while i < list.count {
                    let name = list.name(at: i), value = list.value(at: i)
                    i += 1
                    if HTTP2FieldList.equals(name, "host") {
                        if hasAuthority { continue }
                    } else if HTTP2FieldList.equals(name, "cookie") {
                        cookies += 1
                        continue
                    } else if HTTP2FieldList.equals(name, "content-length") {
                        hasContentLength = true
                    }
                    try section.add(&w, name: name, value: value, entries: &entries, facts: &facts)
                }
                if cookies > 0 {
                    try section.addCookies(&w, list, entries: &entries, facts: &facts)
                }
                if !endStream && !hasContentLength {
                    try section.add(&w, name: Self.transferEncoding, value: Self.chunked, entries: &entries, facts: &facts)
                }
                w.copy("\r\n")
                precondition(w.offset <= size, "HTTP/2 request head size miscounted")
                line.headLength = w.offset
                return w.offset
            }
        }
        return try HTTP1RequestParser.makeHead(head, line, entries: entries, facts: facts)
    }

    // Constants in the binary (computed: no lazy global initialisation).
    private static var slash: UnsafeBufferPointer<UInt8> { bytes("/") }
    private static var asterisk: UnsafeBufferPointer<UInt8> { bytes("*") }
    private static var host: UnsafeBufferPointer<UInt8> { bytes("host") }
    private static var transferEncoding: UnsafeBufferPointer<UInt8> { bytes("transfer-encoding") }
    private static var chunked: UnsafeBufferPointer<UInt8> { bytes("chunked") }

    private static func bytes(_ text: StaticString) -> UnsafeBufferPointer<UInt8> {
        UnsafeBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount)
    }

    /// The request line's checks (`HTTP1RequestParser.parseLines`'): a
    /// token method, a target of visible ASCII in a form the method allows,
    /// the line within `maxStartLineBytes`.
    private static func checkStartLine(method m: UnsafeBufferPointer<UInt8>, target t: UnsafeBufferPointer<UInt8>,
                                       limits: HTTP1Limits, line: inout HTTP1RequestParser.RequestLine) throws {
        if m.count + t.count + 10 > limits.maxStartLineBytes { throw HTTP1ParseError.startLineTooLong }
        guard !m.isEmpty else { throw HTTP1ParseError.invalidRequestLine }
        for b in m where !HTTP1Bytes.isTChar(b) { throw HTTP1ParseError.invalidMethod }
        // `HTTP2RequestFields` refused controls and spaces; obs-text is left.
        for b in t where b >= 0x7F { throw HTTP1ParseError.invalidTarget }
        let method = HTTP1Method.recognise(m.baseAddress!, m.count)
        try HTTP1RequestParser.checkTargetForm(method, t.baseAddress!, t.count)
        line.method = method
        line.methodLength = m.count
        line.target = (m.count + 1)..<(m.count + 1 + t.count)
    }

    /// The field lines written so far: each one indexed as the parser
    /// indexes it (value trimmed of SP/HTAB, name classified, framing facts
    /// noted) and held to the section limits as the parser holds it.
    private struct FieldSection {
        let start: Int
        let limits: HTTP1Limits

        init(start: Int, limits: HTTP1Limits) {
            self.start = start
            self.limits = limits
        }

        mutating func add(_ w: inout HTTP1HeadWriter.RawWriter, name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>,
                          entries: inout [HTTP1FieldEntry], facts: inout HTTP1FramingFacts) throws {
            let lineStart = try begin(&w, name.baseAddress!, name.count, entries: entries)
            let valueStart = w.offset
            w.copy(value.baseAddress!, value.count)
            try end(&w, lineStart: lineStart, nameLength: name.count, valueStart: valueStart, entries: &entries, facts: &facts)
        }

        /// Split cookie fields joined again (RFC 9113 §8.2.3): one line.
        mutating func addCookies(_ w: inout HTTP1HeadWriter.RawWriter, _ list: HTTP2FieldList.Fields,
                                 entries: inout [HTTP1FieldEntry], facts: inout HTTP1FramingFacts) throws {
            let name: StaticString = "cookie"
            let lineStart = try begin(&w, name.utf8Start, name.utf8CodeUnitCount, entries: entries)
            let valueStart = w.offset
            var first = true
            for i in 0..<list.count where HTTP2FieldList.equals(list.name(at: i), "cookie") {
                if !first { w.copy("; ") }
                first = false
                let cookie = list.value(at: i)
                w.copy(cookie.baseAddress!, cookie.count)
            }
            try end(&w, lineStart: lineStart, nameLength: name.utf8CodeUnitCount, valueStart: valueStart,
                    entries: &entries, facts: &facts)
        }

        private func begin(_ w: inout HTTP1HeadWriter.RawWriter, _ name: UnsafePointer<UInt8>, _ nameLength: Int,
                           entries: [HTTP1FieldEntry]) throws -> Int {
            if entries.count >= limits.maxFieldCount { throw HTTP1ParseError.tooManyFields }
            let lineStart = w.offset
            w.copy(name, nameLength)
            w.copy(": ")
            return lineStart
        }

        private func end(_ w: inout HTTP1HeadWriter.RawWriter, lineStart: Int, nameLength: Int, valueStart: Int,
                         entries: inout [HTTP1FieldEntry], facts: inout HTTP1FramingFacts) throws {
            let p = UnsafePointer(w.base.assumingMemoryBound(to: UInt8.self))
            var first = valueStart, last = w.offset
            while first < last && HTTP1Bytes.isWhitespace(p[first]) { first += 1 }
            while last > first && HTTP1Bytes.isWhitespace(p[last - 1]) { last -= 1 }
            w.copy("\r\n")
            if w.offset - start > limits.maxFieldBytes { throw HTTP1ParseError.headerSectionTooLarge }
            let known = HTTP1KnownField.classify(p + lineStart, nameLength)
            switch known {
            case .host, .contentLength, .transferEncoding, .connection, .expect, .te:
                try noteKnownField(known, p + first, last - first, &facts)
            default:
                break
            }
            entries.append(HTTP1FieldEntry(nameStart: Int32(truncatingIfNeeded: lineStart),
                                           nameLength: Int32(truncatingIfNeeded: nameLength),
                                           valueStart: Int32(truncatingIfNeeded: first),
                                           valueLength: Int32(truncatingIfNeeded: last - first),
                                           lineEnd: Int32(truncatingIfNeeded: w.offset), known: known))
        }
    }
}
