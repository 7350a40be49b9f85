import NIOCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum HTTP1Method: UInt8, Sendable {
    case get, head, post, put, delete, options, patch, connect, trace
    /// Any other token; its bytes are `HTTP1RequestHead.methodString`.
    case other

    @inline(__always)
    static func recognise(_ p: UnsafePointer<UInt8>, _ n: Int) -> HTTP1Method {
        // Methods are case-sensitive (RFC 9110 §9.1): compare exact bytes.
        @inline(__always) func eq(_ s: StaticString) -> Bool {
            n == s.utf8CodeUnitCount && memcmp(p, s.utf8Start, n) == 0
        }
        switch n {
        case 3: return eq("GET") ? .get : eq("PUT") ? .put : .other
        case 4: return eq("POST") ? .post : eq("HEAD") ? .head : .other
        case 5: return eq("PATCH") ? .patch : eq("TRACE") ? .trace : .other
        case 6: return eq("DELETE") ? .delete : .other
        case 7: return eq("OPTIONS") ? .options : eq("CONNECT") ? .connect : .other
        default: return .other
        }
    }
}

public struct HTTP1Version: Hashable, Sendable {
    public var major: UInt8
    public var minor: UInt8
    public static let http1_0 = HTTP1Version(major: 1, minor: 0)
    public static let http1_1 = HTTP1Version(major: 1, minor: 1)
}

/// How a message's body is delimited (RFC 9112 §6.3).
public enum HTTP1BodyFraming: Equatable, Sendable {
    case none
    case contentLength(Int)
    case chunked
    /// Responses only: the body runs until the upstream closes.
    case untilClose
}

/// A parsed request head: its original bytes plus an index into them.
public struct HTTP1RequestHead: Sendable {
    /// The whole head, request line through the empty line's CRLF.
    public var bytes: ByteBuffer { fields.bytes }
    public let fields: HTTP1Fields
    public let method: HTTP1Method
    public let methodLength: Int
    /// Offsets of the request target in `bytes`.
    public let targetRange: Range<Int>
    public let version: HTTP1Version
    public let framing: HTTP1BodyFraming
    /// The client allows the connection to stay open after this exchange.
    public let keepAlive: Bool
    public let expectsContinue: Bool
    /// `Connection: upgrade` and an `Upgrade` field are both present.
    public let wantsUpgrade: Bool
    /// Index of the Host field (always set for HTTP/1.1).
    public let hostIndex: Int?
    let facts: HTTP1HeadFacts

    public var methodString: String { bytes.getString(at: bytes.readerIndex, length: methodLength)! }
    public var target: String {
        bytes.getString(at: bytes.readerIndex + targetRange.lowerBound, length: targetRange.count)!
    }
    public var host: String? { hostIndex.map { fields.value(at: $0) } }
}

/// A parsed response head.
public struct HTTP1ResponseHead: Sendable {
    public var bytes: ByteBuffer { fields.bytes }
    public let fields: HTTP1Fields
    public let version: HTTP1Version
    public let status: Int
    /// Offsets of the reason phrase in `bytes` (may be empty).
    public let reasonRange: Range<Int>
    public let framing: HTTP1BodyFraming
    public let keepAlive: Bool
    let facts: HTTP1HeadFacts

    public var reason: String {
        bytes.getString(at: bytes.readerIndex + reasonRange.lowerBound, length: reasonRange.count)!
    }
    /// 1xx other than 101: another head follows for the same request.
    public var isInterim: Bool { status >= 100 && status < 200 && status != 101 }
}

/// What a parsed head keeps of `HTTP1FramingFacts` (the rest is folded
/// into its framing and flags): a head is copied a few times per request,
/// and the whole facts struct would make every copy ~70 bytes longer.
public struct HTTP1HeadFacts: Sendable {
    /// Every TE element is `trailers` (or there is no TE field).
    public let teTrailersOnly: Bool
    /// There is a TE field and every element is `trailers`: the client
    /// accepts trailers. Found while parsing (the exchange asked the field
    /// index per request: a copy of the entry array, ~65 instructions).
    public let teTrailers: Bool

    init(_ facts: HTTP1FramingFacts) {
        teTrailersOnly = facts.teTrailersOnly
        teTrailers = facts.teTrailersOnly && facts.teLines > 0
    }
}

/// Incremental, strict RFC 9112 request head parser.
///
/// Sans-IO: give it the connection's accumulated bytes; it returns nil until
/// a whole head is there, then consumes exactly the head's bytes (the body
/// or the next pipelined request stay in the buffer) and returns it. After an
/// error the connection must be answered and closed: the parser does not
/// resynchronise.
public struct HTTP1RequestParser: Sendable {
    public var limits: HTTP1Limits
    private var scanner = HTTP1HeadScanner(hasStartLine: true)
    private var skippedEmptyLines = 0
    /// The last head's field-entry array, for the next head's (see `HTTP1EntryStorage`).
    private var entryStorage = HTTP1EntryStorage()

    public init(limits: HTTP1Limits = HTTP1Limits()) { self.limits = limits }

    public mutating func parse(_ buffer: inout ByteBuffer) throws -> HTTP1RequestHead? {
        // RFC 9112 §2.2: ignore empty lines before a request line (clients
        // send a stray CRLF after a body); bounded like a request line.
        if skippedEmptyLines >= 0 {
            while let b = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self), b == HTTP1Bytes.cr || b == HTTP1Bytes.lf {
                guard b == HTTP1Bytes.cr else { throw HTTP1ParseError.bareLF }
                guard let next = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt8.self) else { return nil }
                guard next == HTTP1Bytes.lf else { throw HTTP1ParseError.bareCR }
                buffer.moveReaderIndex(forwardBy: 2)
                skippedEmptyLines += 2
                if skippedEmptyLines > limits.maxStartLineBytes { throw HTTP1ParseError.startLineTooLong }
            }
            if buffer.readableBytes == 0 { return nil }
            skippedEmptyLines = -1
        }
        let limits = self.limits
        // `inout`: a by-value argument stays referenced by the caller during
        // the call, and the first append would copy the storage.
        var entries = entryStorage.take(capacity: HTTP1EntryStorage.initialCapacity)
        var facts = HTTP1FramingFacts()
        if scanner.isFresh {
            // The head's first read usually holds all of it: parse it in one
            // pass (each line's end found while validating it).
            if let line = try buffer.withUnsafeReadableBytes({ try Self.parseLines($0, limits: limits, entries: &entries, facts: &facts) }) {
                return try finish(&buffer, line, entries: entries, facts: facts)
            }
            entries.removeAll(keepingCapacity: true)
            facts = HTTP1FramingFacts()
        }
        // Not all there: the scanner waits for the end across reads (limits
        // enforced as bytes arrive), then the complete head is parsed.
        guard let length = try buffer.withUnsafeReadableBytes({ try scanner.scan($0, limits: limits) }) else {
            entryStorage.keep(entries)
            return nil
        }
        let line = try buffer.withUnsafeReadableBytes { raw in
            try Self.parseLines(UnsafeRawBufferPointer(rebasing: raw[..<length]), limits: limits, entries: &entries, facts: &facts)
        }
        guard let line, line.headLength == length else { throw HTTP1ParseError.invalidRequestLine } // the scanner and the parse agree on the end
        return try finish(&buffer, line, entries: entries, facts: facts)
    }

    /// Consumes the parsed head's bytes and builds the head.
    private mutating func finish(_ buffer: inout ByteBuffer, _ line: RequestLine, entries: [HTTP1FieldEntry],
                                 facts: HTTP1FramingFacts) throws -> HTTP1RequestHead {
        let slice = buffer.readSlice(length: line.headLength)!
        scanner.reset()
        skippedEmptyLines = 0
        let head = try HTTP1RequestParser.makeHead(slice, line, entries: entries, facts: facts)
        entryStorage.keep(head.fields.entries)
        return head
    }

    /// The request line of a parsed head, and the head's length.
    struct RequestLine {
        var method: HTTP1Method
        var methodLength: Int
        var target: Range<Int>
        var version: HTTP1Version
        var headLength: Int
    }

    /// Parses the head at the start of `raw` (request line, then the field
    /// lines into `entries` and `facts`); nil when `raw` ends before the
    /// head does. Throws for malformed bytes in any complete line.
    static func parseLines(_ raw: UnsafeRawBufferPointer, limits: HTTP1Limits, entries: inout [HTTP1FieldEntry],
                           facts: inout HTTP1FramingFacts) throws -> RequestLine? {
        guard raw.count > 0 else { return nil }
        let p = raw.bindMemory(to: UInt8.self).baseAddress!
        // method SP request-target SP HTTP-version CRLF, single spaces.
        guard let lineEnd = try HTTP1Bytes.startLineEnd(p, raw.count, limits: limits) else { return nil }
        // The line's only LF is at `lineEnd - 1`: every loop stops at its CR at the latest.
        var i = 0
        while HTTP1Bytes.isTChar(p[i]) { i += 1 }
        let methodLength = i
        guard methodLength > 0, p[i] == HTTP1Bytes.sp else {
            if p[i] == HTTP1Bytes.cr && p[i + 1] != HTTP1Bytes.lf { throw HTTP1ParseError.bareCR }
            throw methodLength == 0 || HTTP1Bytes.isWhitespace(p[i]) || p[i] == HTTP1Bytes.cr
                ? HTTP1ParseError.invalidRequestLine : HTTP1ParseError.invalidMethod
        }
        i += 1
        let targetStart = i
        // Visible ASCII only: no CTLs, spaces or obs-text in a target.
        while p[i] > 0x20 && p[i] < 0x7F { i += 1 }
        let targetEnd = i
        guard targetEnd > targetStart, p[i] == HTTP1Bytes.sp else {
            if p[i] == HTTP1Bytes.cr && p[i + 1] != HTTP1Bytes.lf { throw HTTP1ParseError.bareCR }
            throw targetEnd == targetStart || p[i] == HTTP1Bytes.cr
                ? HTTP1ParseError.invalidRequestLine : HTTP1ParseError.invalidTarget
        }
        i += 1
        let version = try parseVersion(p + i, lineEnd - i)
        i += 8
        guard p[i] == HTTP1Bytes.cr, p[i + 1] == HTTP1Bytes.lf else {
            if p[i] == HTTP1Bytes.cr { throw HTTP1ParseError.bareCR }
            throw HTTP1ParseError.invalidVersion
        }
        let method = HTTP1Method.recognise(p, methodLength)
        try checkTargetForm(method, p + targetStart, targetEnd - targetStart)
        guard let headLength = try parseFieldLines(p, from: lineEnd, available: raw.count, limits: limits,
                                                   entries: &entries, facts: &facts) else { return nil }
        return RequestLine(method: method, methodLength: methodLength, target: targetStart..<targetEnd,
                           version: version, headLength: headLength)
    }

    /// The head from its bytes and what `parseLines` found; the checks
    /// that need the whole field section (Host, framing).
    static func makeHead(_ slice: ByteBuffer, _ line: RequestLine, entries: [HTTP1FieldEntry],
                         facts: HTTP1FramingFacts) throws -> HTTP1RequestHead {
        let version = line.version
        if facts.hostCount > 1 { throw HTTP1ParseError.duplicateHost }
        if facts.hostCount == 0 && version.minor >= 1 { throw HTTP1ParseError.missingHost }

        let framing: HTTP1BodyFraming
        if facts.transferEncodingCount > 0 {
            if version.minor == 0 { throw HTTP1ParseError.transferEncodingInHTTP10 }
            if facts.contentLengthCount > 0 { throw HTTP1ParseError.contentLengthWithTransferEncoding }
            if !facts.lastCodingIsChunked || facts.chunkedSeenBeforeLast { throw HTTP1ParseError.invalidTransferEncoding }
            // Only plain chunked is relayed: a proxy that de-chunks cannot
            // keep codings applied under it (gzip, chunked) → 501.
            if facts.codings != 1 { throw HTTP1ParseError.unsupportedTransferCoding }
            framing = .chunked
        } else if let length = facts.contentLength {
            framing = .contentLength(length)
        } else {
            framing = .none
        }
        let keepAlive = version.minor >= 1 ? !facts.connectionClose : (facts.connectionKeepAlive && !facts.connectionClose)
        var hostIndex: Int? = nil
        var hasUpgradeField = false
        for (k, e) in entries.enumerated() {
            if e.known == .host { hostIndex = k }
            else if e.known == .upgrade { hasUpgradeField = true }
        }
        return HTTP1RequestHead(
            fields: HTTP1Fields(bytes: slice, entries: entries, connectionNamesOtherFields: facts.connectionNamesOthers),
            method: line.method, methodLength: line.methodLength, targetRange: line.target, version: version,
            framing: framing, keepAlive: keepAlive, expectsContinue: facts.expectContinue,
            wantsUpgrade: facts.connectionUpgrade && hasUpgradeField, hostIndex: hostIndex,
            facts: HTTP1HeadFacts(facts))
    }

    /// RFC 9112 §3.2: CONNECT takes authority-form, `*` only with OPTIONS,
    /// everything else origin-form (`/...`) or absolute-form (`scheme://...`).
    static func checkTargetForm(_ method: HTTP1Method, _ p: UnsafePointer<UInt8>, _ n: Int) throws {
        if method == .connect {
            if p[0] == 0x2F || memchr(p, 0x2F, n) != nil { throw HTTP1ParseError.invalidTarget }
            return
        }
        if p[0] == 0x2F { return }
        if n == 1 && p[0] == 0x2A { if method == .options { return }; throw HTTP1ParseError.invalidTarget }
        // absolute-form: scheme ":" "//" ...; scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
        var i = 0
        guard (p[0] | 0x20) >= 0x61 && (p[0] | 0x20) <= 0x7A else { throw HTTP1ParseError.invalidTarget }
        while i < n, p[i] != HTTP1Bytes.colon {
            let b = p[i] | 0x20
            guard (b >= 0x61 && b <= 0x7A) || (p[i] >= 0x30 && p[i] <= 0x39) || p[i] == 0x2B || p[i] == 0x2D || p[i] == 0x2E
            else { throw HTTP1ParseError.invalidTarget }
            i += 1
        }
        guard i + 2 < n, p[i + 1] == 0x2F, p[i + 2] == 0x2F else { throw HTTP1ParseError.invalidTarget }
    }
}

/// "HTTP/" DIGIT "." DIGIT. 1.x with x > 1 is served as 1.1 (RFC 9110 §2.5);
/// any other major version is refused (505).
@inline(__always)
func parseVersion(_ p: UnsafePointer<UInt8>, _ available: Int) throws -> HTTP1Version {
    guard available >= 8, p[0] == 0x48, p[1] == 0x54, p[2] == 0x54, p[3] == 0x50, p[4] == 0x2F, p[6] == 0x2E else {
        throw HTTP1ParseError.invalidVersion
    }
    let major = p[5] &- 0x30, minor = p[7] &- 0x30
    guard major <= 9, minor <= 9 else { throw HTTP1ParseError.invalidVersion }
    guard major == 1 else { throw HTTP1ParseError.unsupportedVersion }
    return HTTP1Version(major: 1, minor: minor >= 1 ? 1 : 0)
}

/// Incremental, strict response head parser for upstream responses; the same
/// machinery as `HTTP1RequestParser`. Every error means 502 to the client.
public struct HTTP1ResponseParser: Sendable {
    public var limits: HTTP1Limits
    private var scanner = HTTP1HeadScanner(hasStartLine: true)
    /// The last head's field-entry array, for the next head's (see `HTTP1EntryStorage`).
    private var entryStorage = HTTP1EntryStorage()

    public init(limits: HTTP1Limits = HTTP1Limits()) { self.limits = limits }

    /// `requestMethod` decides the body rules (HEAD and CONNECT 2xx have none).
    public mutating func parse(_ buffer: inout ByteBuffer, requestMethod: HTTP1Method) throws -> HTTP1ResponseHead? {
        let limits = self.limits
        var entries = entryStorage.take(capacity: HTTP1EntryStorage.initialCapacity)
        var facts = HTTP1FramingFacts()
        if scanner.isFresh {
            // Usually the whole head (and a small body) came in one read:
            // one pass, as for requests.
            if let line = try buffer.withUnsafeReadableBytes({ try Self.parseLines($0, limits: limits, entries: &entries, facts: &facts) }) {
                return try finish(&buffer, line, entries: entries, facts: facts, requestMethod: requestMethod)
            }
            entries.removeAll(keepingCapacity: true)
            facts = HTTP1FramingFacts()
        }
        guard let length = try buffer.withUnsafeReadableBytes({ try scanner.scan($0, limits: limits) }) else {
            entryStorage.keep(entries)
            return nil
        }
        let line = try buffer.withUnsafeReadableBytes { raw in
            try Self.parseLines(UnsafeRawBufferPointer(rebasing: raw[..<length]), limits: limits, entries: &entries, facts: &facts)
        }
        guard let line, line.headLength == length else { throw HTTP1ParseError.invalidStatusLine } // the scanner and the parse agree on the end
        return try finish(&buffer, line, entries: entries, facts: facts, requestMethod: requestMethod)
    }

    private mutating func finish(_ buffer: inout ByteBuffer, _ line: StatusLine, entries: [HTTP1FieldEntry],
                                 facts: HTTP1FramingFacts, requestMethod: HTTP1Method) throws -> HTTP1ResponseHead {
        let slice = buffer.readSlice(length: line.headLength)!
        scanner.reset()
        let head = try HTTP1ResponseParser.makeHead(slice, line, entries: entries, facts: facts, requestMethod: requestMethod)
        entryStorage.keep(head.fields.entries)
        return head
    }

    /// The status line of a parsed head, and the head's length.
    struct StatusLine {
        var version: HTTP1Version
        var status: Int
        var reason: Range<Int>
        var headLength: Int
    }

    /// Parses the head at the start of `raw`; nil when `raw` ends before it does.
    static func parseLines(_ raw: UnsafeRawBufferPointer, limits: HTTP1Limits, entries: inout [HTTP1FieldEntry],
                           facts: inout HTTP1FramingFacts) throws -> StatusLine? {
        guard raw.count > 0 else { return nil }
        let p = raw.bindMemory(to: UInt8.self).baseAddress!
        guard let lineEnd = try HTTP1Bytes.startLineEnd(p, raw.count, limits: limits) else { return nil }
        // HTTP-version SP 3DIGIT SP [ reason-phrase ] CRLF; a missing SP
        // after the code is tolerated (RFC 9112 §4 recipients).
        guard lineEnd >= 14 else { throw HTTP1ParseError.invalidStatusLine }
        let version: HTTP1Version
        do { version = try parseVersion(p, lineEnd) } catch { throw HTTP1ParseError.invalidStatusLine }
        guard p[8] == HTTP1Bytes.sp else { throw HTTP1ParseError.invalidStatusLine }
        var status = 0
        for k in 9..<12 {
            let d = p[k] &- 0x30
            guard d <= 9 else { throw HTTP1ParseError.invalidStatusLine }
            status = status * 10 + Int(d)
        }
        guard status >= 100 else { throw HTTP1ParseError.invalidStatusLine }
        var i = 12
        var reasonStart = 12
        if p[i] == HTTP1Bytes.sp {
            i += 1
            reasonStart = i
            while HTTP1Bytes.isFieldValueByte(p[i]) { i += 1 }
        }
        guard p[i] == HTTP1Bytes.cr else { throw HTTP1ParseError.invalidStatusLine }
        guard p[i + 1] == HTTP1Bytes.lf else { throw HTTP1ParseError.bareCR }
        guard let headLength = try parseFieldLines(p, from: lineEnd, available: raw.count, limits: limits,
                                                   entries: &entries, facts: &facts) else { return nil }
        return StatusLine(version: version, status: status, reason: reasonStart..<i, headLength: headLength)
    }

    static func makeHead(_ slice: ByteBuffer, _ line: StatusLine, entries: [HTTP1FieldEntry], facts: HTTP1FramingFacts,
                         requestMethod: HTTP1Method) throws -> HTTP1ResponseHead {
        let version = line.version, status = line.status
        let framing: HTTP1BodyFraming
        if status < 200 || status == 204 || status == 304 || requestMethod == .head
            || (requestMethod == .connect && status < 300) {
            framing = .none
        } else if facts.transferEncodingCount > 0 {
            // A response carrying both is a smuggling attempt or a broken upstream.
            if facts.contentLengthCount > 0 { throw HTTP1ParseError.contentLengthWithTransferEncoding }
            if version.minor == 0 { throw HTTP1ParseError.transferEncodingInHTTP10 }
            if !facts.lastCodingIsChunked {
                framing = .untilClose // RFC 9112 §6.3 rule 4
            } else if facts.chunkedSeenBeforeLast {
                throw HTTP1ParseError.invalidTransferEncoding
            } else if facts.codings != 1 {
                throw HTTP1ParseError.unsupportedTransferCoding
            } else {
                framing = .chunked
            }
        } else if let length = facts.contentLength {
            framing = .contentLength(length)
        } else {
            framing = .untilClose
        }
        let keepAlive = framing != .untilClose
            && (version.minor >= 1 ? !facts.connectionClose : (facts.connectionKeepAlive && !facts.connectionClose))
        return HTTP1ResponseHead(fields: HTTP1Fields(bytes: slice, entries: entries, connectionNamesOtherFields: facts.connectionNamesOthers), version: version,
                                 status: status, reasonRange: line.reason, framing: framing,
                                 keepAlive: keepAlive, facts: HTTP1HeadFacts(facts))
    }
}

/// A parser's field-entry storage carried from one head to the next on the
/// same connection: the parser keeps a second reference to the array it
/// gave the last head, and by the next head that head (with its exchange)
/// is usually gone, so the array is unshared and `removeAll(keepingCapacity:)`
/// empties it in place: no array allocation per keep-alive request. If the
/// old head is still alive (a plugin kept it), Swift's copy-on-write makes
/// a new array instead, as before. Arrays above `keptCapacity` entries are
/// not kept, so an idle connection holds at most ~1.5 KB for this.
struct HTTP1EntryStorage: Sendable {
    private var kept: [HTTP1FieldEntry] = []
    static let keptCapacity = 64
    /// Room reserved for a connection's first head (typical heads have
    /// fewer lines; more grow the array).
    static let initialCapacity = 16

    /// Empty storage with room for at least `capacity` entries.
    mutating func take(capacity: Int) -> [HTTP1FieldEntry] {
        var entries: [HTTP1FieldEntry] = []
        swap(&entries, &kept)
        entries.removeAll(keepingCapacity: true)
        entries.reserveCapacity(capacity)
        return entries
    }

    /// Remembers the array a head now holds (no copy: one more reference).
    mutating func keep(_ entries: [HTTP1FieldEntry]) {
        if entries.capacity <= Self.keptCapacity { kept = entries }
    }
}
