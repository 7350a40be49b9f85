import NIOCore
import NIOHTTP1
import WeirCore

/// What the exchange needs to know about a gRPC request: that it is one
/// (so proxy errors are answered in gRPC form) and its deadline.
struct GRPCRequestInfo {
    /// From `grpc-timeout`; the exchange's whole-request timeout follows it.
    var deadline: TimeSpan?

    /// gRPC requests are `content-type: application/grpc[+proto|;...]`.
    init?(headers: HTTP1Fields) {
        guard let contentType = headers.first(named: "content-type"), Self.isGRPC(contentType: contentType) else {
            return nil
        }
        deadline = headers.first(named: "grpc-timeout").flatMap(Self.parseTimeout)
    }

    static func isGRPC(contentType: String) -> Bool {
        guard contentType.utf8.count >= 16 else { return false }
        let lowered = contentType.lowercased()
        guard lowered.hasPrefix("application/grpc") else { return false }
        let rest = lowered.dropFirst(16)
        return rest.isEmpty || rest.hasPrefix("+") || rest.hasPrefix(";")
    }

    /// `grpc-timeout`: 1–8 ASCII digits and a unit (H M S m u n), per the
    /// gRPC over HTTP/2 spec. Anything else is ignored (no deadline).
    static func parseTimeout(_ text: String) -> TimeSpan? {
        let bytes = Array(text.utf8)
        guard bytes.count >= 2, bytes.count <= 9 else { return nil }
        var value: Int64 = 0
        for b in bytes.dropLast() {
            guard b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9") else { return nil }
            value = value * 10 + Int64(b - UInt8(ascii: "0"))
        }
        let nanosPerUnit: Int64
        switch bytes.last! {
        case UInt8(ascii: "H"): nanosPerUnit = 3_600_000_000_000
        case UInt8(ascii: "M"): nanosPerUnit = 60_000_000_000
        case UInt8(ascii: "S"): nanosPerUnit = 1_000_000_000
        case UInt8(ascii: "m"): nanosPerUnit = 1_000_000
        case UInt8(ascii: "u"): nanosPerUnit = 1_000
        case UInt8(ascii: "n"): nanosPerUnit = 1
        default: return nil
        }
        // 8 digits of hours overflows Int64 nanoseconds: cap at ~100 days.
        let (product, overflow) = value.multipliedReportingOverflow(by: nanosPerUnit)
        return TimeSpan(nanoseconds: overflow ? 8_640_000_000_000_000 : product)
    }
}

/// gRPC status codes the proxy itself answers with.
enum GRPCStatusCode: Int {
    case ok = 0
    case cancelled = 1
    case invalidArgument = 3
    case deadlineExceeded = 4
    case resourceExhausted = 8
    case unimplemented = 12
    case `internal` = 13
    case unavailable = 14
    case unauthenticated = 16
}

/// The proxy's own errors in gRPC form: HTTP 200 with `grpc-status` and
/// `grpc-message` in a trailers-only response, as gRPC clients expect
/// (they read the status from there; a 502 with a JSON body only becomes
/// an opaque UNKNOWN/INTERNAL error for them).
enum GRPCErrorResponse {
    static func status(for kind: ProxyErrorKind) -> GRPCStatusCode {
        switch kind {
        case .connectFailed, .badUpstreamResponse, .noHealthyTarget, .draining, .tooManyConnections: return .unavailable
        case .upstreamTimeout, .headerTimeout: return .deadlineExceeded
        case .noRoute, .notImplemented, .versionNotSupported: return .unimplemented
        case .bodyTooLarge, .headersTooLarge, .uriTooLong: return .resourceExhausted
        case .badRequest, .pluginFailed: return .internal
        }
    }

    static func head(kind: ProxyErrorKind, message: String, requestID: String, close: Bool,
                     date: String?) -> HTTPResponseHead {
        var headers = HTTPHeaders()
        headers.reserveCapacity(7)
        if let date { headers.add(name: "date", value: date) }
        headers.add(name: "content-type", value: "application/grpc")
        headers.add(name: "grpc-status", value: String(status(for: kind).rawValue))
        headers.add(name: "grpc-message", value: percentEncoded(message))
        headers.add(name: "content-length", value: "0")
        headers.add(name: "x-request-id", value: requestID)
        if close { headers.add(name: "connection", value: "close") }
        return HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)
    }

    /// `grpc-message` is percent-encoded UTF-8 (spec: encode bytes outside
    /// 0x20–0x7E and `%`).
    static func percentEncoded(_ message: String) -> String {
        var out = ""
        out.reserveCapacity(message.utf8.count)
        let hex = Array("0123456789ABCDEF")
        for b in message.utf8 {
            if b >= 0x20 && b <= 0x7E && b != UInt8(ascii: "%") {
                out.append(Character(Unicode.Scalar(b)))
            } else {
                out.append("%")
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 0xF)])
            }
        }
        return out
    }
}
