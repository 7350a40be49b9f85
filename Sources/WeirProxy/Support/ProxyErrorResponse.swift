import NIOCore
import NIOHTTP1

/// The errors the proxy itself answers with. Every one is sent in the same
/// JSON shape: `{"error":"<code>","message":"...","request_id":"..."}`.
enum ProxyErrorKind {
    case badRequest          // 400 malformed request
    case headerTimeout       // 408 request head not received in time
    case bodyTooLarge        // 413
    case uriTooLong          // 414
    case headersTooLarge     // 431
    case noRoute             // 404
    case connectFailed       // 502
    case badUpstreamResponse // 502
    case noHealthyTarget     // 503
    case upstreamTimeout     // 504
    case draining            // 503 while shutting down
    case tooManyConnections  // 503 listener max_connections reached
    case pluginFailed        // 500 a Lua plugin raised or ran out of budget/memory
    case notImplemented      // 501 CONNECT, or a transfer coding other than chunked
    case versionNotSupported // 505 HTTP major version other than 1

    var status: HTTPResponseStatus {
        switch self {
        case .badRequest: return .badRequest
        case .headerTimeout: return .requestTimeout
        case .bodyTooLarge: return .payloadTooLarge
        case .uriTooLong: return .uriTooLong
        case .headersTooLarge: return .requestHeaderFieldsTooLarge
        case .noRoute: return .notFound
        case .connectFailed, .badUpstreamResponse: return .badGateway
        case .noHealthyTarget, .draining, .tooManyConnections: return .serviceUnavailable
        case .upstreamTimeout: return .gatewayTimeout
        case .pluginFailed: return .internalServerError
        case .notImplemented: return .notImplemented
        case .versionNotSupported: return .httpVersionNotSupported
        }
    }

    var code: String {
        switch self {
        case .badRequest: return "bad_request"
        case .headerTimeout: return "request_timeout"
        case .bodyTooLarge: return "body_too_large"
        case .uriTooLong: return "uri_too_long"
        case .headersTooLarge: return "headers_too_large"
        case .noRoute: return "no_route"
        case .connectFailed: return "upstream_connect_failed"
        case .badUpstreamResponse: return "bad_upstream_response"
        case .noHealthyTarget: return "no_healthy_target"
        case .upstreamTimeout: return "upstream_timeout"
        case .draining: return "draining"
        case .tooManyConnections: return "too_many_connections"
        case .pluginFailed: return "plugin_failed"
        case .notImplemented: return "not_implemented"
        case .versionNotSupported: return "http_version_not_supported"
        }
    }
}

enum ProxyErrorResponse {
    /// The JSON body for an error. `message` may contain client-supplied text
    /// (the path), so it is escaped.
    static func body(kind: ProxyErrorKind, message: String, requestID: String,
                     allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64 + message.utf8.count + requestID.utf8.count)
        buffer.writeStaticString("{\"error\":\"")
        buffer.writeString(kind.code)
        buffer.writeStaticString("\",\"message\":")
        writeJSONString(message, into: &buffer)
        buffer.writeStaticString(",\"request_id\":")
        writeJSONString(requestID, into: &buffer)
        buffer.writeStaticString("}\n")
        return buffer
    }

    static func head(kind: ProxyErrorKind, requestID: String, bodyLength: Int,
                     close: Bool, version: HTTPVersion = .http1_1, date: String? = nil) -> HTTPResponseHead {
        var headers = HTTPHeaders()
        headers.reserveCapacity(6)
        if let date { headers.add(name: "date", value: date) }
        headers.add(name: "content-type", value: "application/json")
        headers.add(name: "content-length", value: String(bodyLength))
        headers.add(name: "x-request-id", value: requestID)
        if close {
            headers.add(name: "connection", value: "close")
        } else if version.major == 1 && version.minor == 0 {
            headers.add(name: "connection", value: "keep-alive")
        }
        return HTTPResponseHead(version: version.major == 1 && version.minor == 0 ? .http1_0 : .http1_1,
                                status: kind.status, headers: headers)
    }

    /// Writes `value` as a JSON string literal (quotes included).
    static func writeJSONString(_ value: String, into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt8(ascii: "\""))
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): buffer.writeStaticString("\\\"")
            case UInt8(ascii: "\\"): buffer.writeStaticString("\\\\")
            case UInt8(ascii: "\n"): buffer.writeStaticString("\\n")
            case UInt8(ascii: "\r"): buffer.writeStaticString("\\r")
            case UInt8(ascii: "\t"): buffer.writeStaticString("\\t")
            case 0..<0x20:
                buffer.writeStaticString("\\u00")
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                buffer.writeInteger(hex[Int(byte >> 4)])
                buffer.writeInteger(hex[Int(byte & 0xf)])
            default:
                buffer.writeInteger(byte)
            }
        }
        buffer.writeInteger(UInt8(ascii: "\""))
    }
}

extension HTTP1ParseError {
    /// The proxy's answer to a request the parser refused, on HTTP/1.1 and
    /// HTTP/2 alike: 414, 431, 501 and 505 where RFC 9110/9112 name a
    /// better status than 400.
    var proxyErrorKind: ProxyErrorKind {
        switch requestStatus {
        case 414: return .uriTooLong
        case 431: return .headersTooLarge
        case 501: return .notImplemented
        case 505: return .versionNotSupported
        default: return .badRequest
        }
    }
}
