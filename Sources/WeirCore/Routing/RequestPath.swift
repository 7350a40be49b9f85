// Path normalization before routing. Without it, `/public/../admin` or
// `/public/%2e%2e/admin` would match a `/public` route (no auth plugin)
// while the upstream, which does normalize, serves `/admin`. Envoy
// (`normalize_path`, `merge_slashes`) and Kong do the same.

public enum RequestPath {
    /// RFC 3986 normalization of an origin-form path (no query):
    ///   - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`)
    ///     are decoded, other escapes get upper-case hex (`%2f` -> `%2F`;
    ///     an encoded `/` stays encoded, so it never splits a segment);
    ///   - dot segments are removed (`/a/./b/../c` -> `/a/c`; `..` above the
    ///     root stays at the root);
    ///   - with `mergeSlashes`, runs of `/` become one.
    /// Returns nil for input that must be refused with 400: not starting
    /// with `/`, a malformed escape, or an encoded NUL.
    /// Already-normal paths (the common case) are returned without copying.
    public static func normalize(_ path: String, mergeSlashes: Bool = false) -> String? {
        normalizeReportingChange(path, mergeSlashes: mergeSlashes)?.path
    }

    /// True when `normalize` would return these bytes unchanged: they
    /// start with `/` and have no escape or dot segment (or, with
    /// `mergeSlashes`, no `//`). Lets a caller that has the bytes route
    /// them without making a String first.
    public static func isNormal(_ bytes: UnsafeBufferPointer<UInt8>, mergeSlashes: Bool = false) -> Bool {
        bytes.first == UInt8(ascii: "/") && !needsWork(bytes, mergeSlashes: mergeSlashes)
    }

    /// `normalize`, and whether that changed the path (false: `path` is
    /// `original` itself, so a caller need not compare the two Strings).
    public static func normalizeReportingChange(_ path: String, mergeSlashes: Bool = false) -> (path: String, changed: Bool)? {
        var path = path
        if let result = path.utf8.withContiguousStorageIfAvailable({ normalize(bytes: $0, original: path, mergeSlashes: mergeSlashes) }) {
            return result
        }
        path.makeContiguousUTF8()
        return path.utf8.withContiguousStorageIfAvailable { normalize(bytes: $0, original: path, mergeSlashes: mergeSlashes) } ?? nil
    }

    private static func normalize(bytes: UnsafeBufferPointer<UInt8>, original: String, mergeSlashes: Bool) -> (path: String, changed: Bool)? {
        guard bytes.first == UInt8(ascii: "/") else { return nil }
        if !needsWork(bytes, mergeSlashes: mergeSlashes) { return (original, false) }

        // 1. Escapes.
        var decoded: [UInt8] = []
        decoded.reserveCapacity(bytes.count)
        var index = 0
        while index < bytes.count {
            let byte = bytes[index]
            guard byte == UInt8(ascii: "%") else { decoded.append(byte); index += 1; continue }
            guard index + 2 < bytes.count, let high = hexValue(bytes[index + 1]), let low = hexValue(bytes[index + 2]) else {
                return nil
            }
            let value = high << 4 | low
            if value == 0 { return nil }
            if isUnreserved(value) {
                decoded.append(value)
            } else {
                decoded.append(UInt8(ascii: "%"))
                decoded.append(hexDigit(high))
                decoded.append(hexDigit(low))
            }
            index += 3
        }

        // 2. Segments: drop ".", pop on "..", optionally drop empty ones.
        let endsWithSlash = decoded.last == UInt8(ascii: "/")
        var segments: [ArraySlice<UInt8>] = []
        let parts = decoded.dropFirst().split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false)
        for (position, segment) in parts.enumerated() {
            let isLast = position == parts.count - 1
            if segment.elementsEqual([UInt8(ascii: ".")]) {
                if isLast { segments.append([]) }   // "/a/." -> "/a/"
                continue
            }
            if segment.elementsEqual([UInt8(ascii: "."), UInt8(ascii: ".")]) {
                if !segments.isEmpty { segments.removeLast() }
                if isLast { segments.append([]) }   // "/a/b/.." -> "/a/"
                continue
            }
            if segment.isEmpty && mergeSlashes && !(isLast && endsWithSlash) { continue }
            segments.append(segment)
        }
        var output: [UInt8] = []
        output.reserveCapacity(decoded.count)
        for segment in segments {
            output.append(UInt8(ascii: "/"))
            output.append(contentsOf: segment)
        }
        if output.isEmpty { output.append(UInt8(ascii: "/")) }
        let normalized = String(decoding: output, as: UTF8.self)
        return (normalized, normalized != original)
    }

    /// True if the path has an escape, a dot segment, or (when merging) `//`.
    private static func needsWork(_ bytes: UnsafeBufferPointer<UInt8>, mergeSlashes: Bool) -> Bool {
        var previous: UInt8 = 0
        var segmentStart = true
        var dots = 0
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "%"):
                return true
            case UInt8(ascii: "/"):
                if segmentStart && dots > 0 { return true }              // "/./" or "/../"
                if mergeSlashes && previous == UInt8(ascii: "/") { return true }
                segmentStart = true
                dots = 0
            case UInt8(ascii: "."):
                if segmentStart { dots += 1; if dots > 2 { segmentStart = false } }
            default:
                segmentStart = false
                dots = 0
            }
            previous = byte
        }
        return segmentStart && dots > 0                                    // trailing "/." or "/.."
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    private static func hexDigit(_ value: UInt8) -> UInt8 {
        value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "A") + value - 10
    }

    private static func isUnreserved(_ byte: UInt8) -> Bool {
        (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39)
            || byte == UInt8(ascii: "-") || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "~")
    }
}
