/// RFC 9110 field syntax checks on bytes, shared by the config validator
/// (header names and methods in the config) and the Lua SDK (names and
/// values plugins set, checked once per Lua string: see WeirLua's
/// HeaderNameCache). The proxy's parser has its own table-driven `tchar`
/// test on the hot path (WeirProxy's HTTP1Bytes).
public enum HTTPFieldSyntax {
    /// tchar: "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
    /// "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA.
    @inline(__always)
    public static func isTokenByte(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
             UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
             UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    /// A non-empty run of tchar (a header name, a method).
    public static func isToken(_ bytes: UnsafeRawBufferPointer) -> Bool {
        !bytes.isEmpty && bytes.allSatisfy(isTokenByte)
    }

    public static func isToken(_ text: String) -> Bool {
        var text = text
        return text.withUTF8 { isToken(UnsafeRawBufferPointer($0)) }
    }

    /// A field value that cannot end or split its line: no NUL, CR or LF
    /// (RFC 9110 §5.5).
    public static func isValidFieldValue(_ bytes: UnsafeRawBufferPointer) -> Bool {
        !bytes.contains { $0 == 0 || $0 == 13 || $0 == 10 }
    }
}

extension String {
    /// The UTF-8 bytes through the view's contiguous storage (a small
    /// string is copied to the stack): `withUTF8` on a `var` copy retains
    /// and checks uniqueness first (~100 instructions per call under
    /// callgrind; header names and values on the plugin path).
    @inlinable @inline(__always)
    public func withContiguousUTF8<R>(_ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
        if let result = utf8.withContiguousStorageIfAvailable(body) { return result }
        var copy = self
        return copy.withUTF8(body)
    }
}
