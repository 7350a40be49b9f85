import NIOCore
import NIOHTTP1
#if canImport(Glibc)
import Glibc
#endif

/// Writes heads that exist as NIO value types (`HTTPResponseHead`): the
/// proxy's own responses (errors, plugin exits, which the response phase
/// may have edited). Forwarded heads, with or without plugins' edits, go
/// through `HTTP1HeadWriter` instead.
///
/// Plugin-set names and values can reach the wire here, so a field that
/// could break the framing (a name that is not a token, CR/LF/NUL in a
/// value) is dropped rather than written; `isToken` / `isValidFieldValue`
/// are also the checks of `PluginHeadEdits.swift`.
enum HeadSerialization {
    /// Always `HTTP/1.1` (a server answers with its own version, RFC 9110 §2.5).
    static func writeResponse(_ head: HTTPResponseHead, into out: inout ByteBuffer) {
        out.writeStaticString("HTTP/1.1 ")
        let code = Int(head.status.code)
        out.writeString(String(code))
        out.writeInteger(UInt8(ascii: " "))
        let reason = head.status.reasonPhrase
        if isValidFieldValue(reason) { out.writeString(reason) }
        out.writeStaticString("\r\n")
        writeFields(head.headers, into: &out)
        out.writeStaticString("\r\n")
    }

    static func writeFields(_ headers: HTTPHeaders, into out: inout ByteBuffer) {
        for (name, value) in headers where isToken(name) && isValidFieldValue(value) {
            HTTP1HeadWriter.writeField(name: name, value: value, into: &out)
        }
    }

    /// Trailer fields to forward: framing and routing fields never belong
    /// in a trailer section (RFC 9110 §6.5.1), so they are dropped.
    static func writeTrailers(_ trailers: HTTP1Fields, into out: inout ByteBuffer) {
        for (i, e) in trailers.entries.enumerated() where e.known.forwardedInTrailers {
            HTTP1HeadWriter.writeField(name: trailers.name(at: i), value: trailers.value(at: i), into: &out)
        }
    }

    static func writeTrailers(_ trailers: HTTPHeaders, into out: inout ByteBuffer) {
        for (name, value) in trailers where isToken(name) && isValidFieldValue(value) {
            switch name.lowercased() {
            case "content-length", "transfer-encoding", "host", "connection", "te", "trailer", "keep-alive", "upgrade":
                continue
            default:
                HTTP1HeadWriter.writeField(name: name, value: value, into: &out)
            }
        }
    }

    /// RFC 9110 §5.5: field values never contain NUL, CR or LF. (Both
    /// checks run per plugin-set header: they scan contiguous bytes, as
    /// iterating `utf8` costs ~30 instructions a byte.)
    static func isValidFieldValue(_ value: String) -> Bool {
        // Through the view's contiguous storage (a small string is copied to
        // the stack): `withUTF8` on a `var` copy retains and checks
        // uniqueness first, ~100 instructions per call under callgrind.
        if let valid = value.utf8.withContiguousStorageIfAvailable({ bytes -> Bool in
            guard let p = bytes.baseAddress else { return true }
            for i in 0..<bytes.count where p[i] == 0 || p[i] == 13 || p[i] == 10 { return false }
            return true
        }) { return valid }
        return !value.utf8.contains { $0 == 0 || $0 == 13 || $0 == 10 }
    }

    static func isToken(_ name: String) -> Bool {
        if let valid = name.utf8.withContiguousStorageIfAvailable({ bytes -> Bool in
            guard let p = bytes.baseAddress, bytes.count > 0 else { return false }
            for i in 0..<bytes.count where !HTTP1Bytes.isTChar(p[i]) { return false }
            return true
        }) { return valid }
        return !name.isEmpty && name.utf8.allSatisfy(HTTP1Bytes.isTChar)
    }
}

/// The `Date` header value (RFC 9110 §5.6.7 IMF-fixdate), formatted once per
/// second per event loop: one instance per `LoopContext`, used on its loop only.
final class HTTPDateCache {
    private var second = -1
    private(set) var value = ""

    /// The current second's date string.
    func current() -> String {
        let now = time(nil)
        if now != second {
            second = now
            value = Self.format(now)
        }
        return value
    }

    static func format(_ t: Int) -> String {
        var seconds = time_t(t)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(days[Int(parts.tm_wday)]), \(two(parts.tm_mday)) \(months[Int(parts.tm_mon)]) \(parts.tm_year + 1900) "
            + "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)) GMT"
    }
}
