import NIOCore
import NIOHTTP1
import WeirCore

/// The client's request head as the exchange logic sees it, whatever wire
/// protocol carried it (the seam for HTTP/2, see docs/http1-codec.md).
///
/// The header fields are an `HTTP1Fields` index (original bytes plus
/// offsets): the HTTP/1.1 framing hands over the parsed head without
/// turning any header into a String; an HTTP/2 stream builds the same
/// index as it writes its decoded header list as HTTP/1.1 bytes
/// (`HTTP2RequestHead`), so the upstream head is always written by range
/// copy from `wire`.
/// A class: the exchange reads it many times per request, and a reference
/// is one retain where this struct would be half a dozen.
final class RequestHead {
    let method: HTTPMethod
    let version: HTTPVersion
    /// The request target as received (origin or absolute form). Made on
    /// first use: the usual target is routed by its bytes
    /// (`withTargetBytes`), and only plugins, logs and the unusual targets
    /// need it as a String.
    private(set) lazy var uri: String = wire.target
    /// The wire head's fields (not a second stored copy: that would be two
    /// more references to retain and release per request).
    var headers: HTTP1Fields { wire.fields }
    /// The Host field's value (nil when absent, HTTP/1.0 only).
    let host: String?
    let isHTTP10: Bool
    /// The request came on an HTTP/2 stream (its head was made HTTP/1.1
    /// bytes, so `version` says 1.1): Via names 2.
    let receivedOverHTTP2: Bool
    let wire: HTTP1RequestHead

    /// `consuming`: the parsed head moves in (a copy would retain its
    /// buffer and field index and the caller's would be destroyed after).
    init(_ wire: consuming HTTP1RequestHead, receivedOverHTTP2: Bool = false) {
        self.method = wire.method.nioMethod ?? HTTPMethod(rawValue: wire.methodString)
        self.isHTTP10 = wire.version.minor == 0
        self.receivedOverHTTP2 = receivedOverHTTP2
        self.version = isHTTP10 ? .http1_0 : .http1_1
        self.host = wire.host
        self.wire = consume wire
    }

    /// An HTTP/1.1 connection's head, its Host value taken from the
    /// connection's memo (`HostValueMemo`) when the bytes repeat.
    init(_ wire: consuming HTTP1RequestHead, hostMemo: inout HostValueMemo) {
        self.method = wire.method.nioMethod ?? HTTPMethod(rawValue: wire.methodString)
        self.isHTTP10 = wire.version.minor == 0
        self.receivedOverHTTP2 = false
        self.version = isHTTP10 ? .http1_0 : .http1_1
        self.host = hostMemo.host(of: wire)
        self.wire = consume wire
    }

    /// The upstream head (`HTTP1HeadWriter.writeRequest`) from `wire` read
    /// in place: a method, so `self` is held for the call and the `let`
    /// is borrowed; the caller's `head.wire` was copied (its buffer and
    /// field index retained, then released) for the call.
    func writeUpstream(edits: borrowing HTTP1HeadEdits, into out: inout ByteBuffer) {
        HTTP1HeadWriter.writeRequest(wire, edits: edits, into: &out)
    }

    /// The request target's bytes, read in place (valid during `body`).
    func withTargetBytes<Result>(_ body: (UnsafeBufferPointer<UInt8>) -> Result) -> Result {
        let range = wire.targetRange
        return wire.bytes.withUnsafeReadableBytes { raw in
            body(UnsafeBufferPointer(rebasing: raw.bindMemory(to: UInt8.self)[range]))
        }
    }

    /// The client's lines named `name` (`HTTP1Fields.fieldSet(named:)`),
    /// read in place as `writeUpstream` does: plugins' upstream header
    /// setters look them up here, not on a copy of `headers`.
    func fieldSet(named name: String) -> HTTP1FieldSet { wire.fields.fieldSet(named: name) }

    /// The request target up to its `?`, for logs. A byte search:
    /// `firstIndex(of:)` on the String walks Characters (~450 instructions).
    var pathWithoutQuery: String {
        guard let q = uri.utf8.firstIndex(of: UInt8(ascii: "?")) else { return uri }
        return String(uri[..<q])
    }
}

extension HTTP1Method {
    /// NIO's case for the methods the parser recognises (no String made).
    var nioMethod: HTTPMethod? {
        switch self {
        case .get: return .GET
        case .head: return .HEAD
        case .post: return .POST
        case .put: return .PUT
        case .delete: return .DELETE
        case .options: return .OPTIONS
        case .patch: return .PATCH
        case .connect: return .CONNECT
        case .trace: return .TRACE
        case .other: return nil
        }
    }
}

extension HTTP1Fields: Sequence {
    /// (name, value) pairs as Strings: for plugins and logs, not the hot path.
    public func makeIterator() -> AnyIterator<(name: String, value: String)> {
        var i = 0
        return AnyIterator {
            guard i < self.count else { return nil }
            defer { i += 1 }
            return (self.name(at: i), self.value(at: i))
        }
    }

    /// Same as `first(named:)`, spelled like `HTTPHeaders.first(name:)`.
    public func first(name: String) -> String? { first(named: name) }

    /// Every value of `name`, in order.
    func values(named name: String) -> [String] {
        indices(named: name).map { value(at: $0) }
    }
}

/// Route-table header access over a request's parsed head, for the length
/// of one `RouteTable.matchIndex` call. `unowned(unsafe)` is safe there: the
/// caller holds the head across the call and the lookup is not kept. It
/// makes the lookup trivially copyable: one holding the head's
/// `HTTP1Fields` cost two retain/release pairs per request (callgrind).
struct RequestHeadLookup: RouteHeaderLookup {
    unowned(unsafe) let head: RequestHead
    func firstValue(forLowercasedName name: String) -> String? { head.wire.fields.first(named: name) }
}

/// The Host value of a connection's last request and the String made of
/// it. A keep-alive client sends the same Host on every request, so the
/// next request's Host is this String again after a compare of two words
/// instead of a new String (~150 instructions: the bytes copied into a
/// String and checked as UTF-8). A String is a function of its bytes
/// (invalid UTF-8 is repaired the same way each time), so equal bytes give
/// an equal String. Values up to 16 bytes (a name and port usually are);
/// longer ones are made afresh. One per HTTP/1.1 connection, on its loop.
struct HostValueMemo {
    /// The kept value's length (-1: none kept) and its bytes as `words`
    /// packs them: the same length and words mean the same bytes.
    private var count = -1
    private var low: UInt64 = 0, high: UInt64 = 0
    private var string: String? = nil

    /// `wire.host`, from the memo when its bytes are the last request's.
    mutating func host(of wire: borrowing HTTP1RequestHead) -> String? {
        guard let i = wire.hostIndex else { return nil }
        let e = wire.fields.entries[i]
        let n = Int(e.valueLength)
        guard n <= 16 else { return wire.fields.value(at: i) }
        let (low, high) = wire.fields.bytes.withUnsafeReadableBytes { raw in
            Self.words(raw.baseAddress! + Int(e.valueStart), n)
        }
        if n == count && low == self.low && high == self.high, let string { return string }
        let made = wire.fields.value(at: i)
        (count, self.low, self.high, string) = (n, low, high, made)
        return made
    }

    /// `n` (0...16) bytes at `p` as two words: two loads that overlap when
    /// `n` is not twice their width, so every byte is in one word or both
    /// (no byte past `n` is read). For one `n`, equal words mean equal bytes.
    @inline(__always)
    static func words(_ p: UnsafeRawPointer, _ n: Int) -> (UInt64, UInt64) {
        switch n {
        case ..<1: return (0, 0)
        case 1: return (UInt64(p.load(as: UInt8.self)), 0)
        case 2...3:
            return (UInt64(p.loadUnaligned(as: UInt16.self)), UInt64(p.loadUnaligned(fromByteOffset: n - 2, as: UInt16.self)))
        case 4...7:
            return (UInt64(p.loadUnaligned(as: UInt32.self)), UInt64(p.loadUnaligned(fromByteOffset: n - 4, as: UInt32.self)))
        default:
            return (p.loadUnaligned(as: UInt64.self), p.loadUnaligned(fromByteOffset: n - 8, as: UInt64.self))
        }
    }
}
