/// Why a message head, chunk line or trailer section was refused.
///
/// Small and `Hashable` so tests can compare exact reasons and the proxy can
/// map each to a status without string matching (swift-nio-http2 style).
public struct HTTP1ParseError: Error, Hashable, CustomStringConvertible, Sendable {
    public enum Kind: UInt8, Sendable {
        // Start lines
        case invalidRequestLine, invalidMethod, invalidTarget, invalidVersion, unsupportedVersion
        case invalidStatusLine
        // Field lines
        case invalidFieldName, whitespaceBeforeColon, obsoleteLineFolding, invalidFieldValue
        case bareCR, bareLF
        // Framing and required fields
        case missingHost, duplicateHost
        case invalidContentLength, duplicateContentLength, conflictingContentLength, contentLengthWithTransferEncoding
        case invalidTransferEncoding, unsupportedTransferCoding, transferEncodingInHTTP10
        // Limits
        case startLineTooLong, headerSectionTooLarge, tooManyFields
        // Chunked bodies
        case invalidChunkSize, chunkSizeTooLarge, chunkExtensionTooLong, invalidChunkExtension, missingChunkCRLF
    }

    public let kind: Kind

    public init(_ kind: Kind) { self.kind = kind }

    /// The status a server answers a request with for this error
    /// (400, or 414/431/501/505 where RFC 9110/9112 name a better one).
    /// For a response from an upstream every error means 502.
    public var requestStatus: Int {
        switch kind {
        case .startLineTooLong: return 414
        case .headerSectionTooLarge, .tooManyFields: return 431
        case .unsupportedTransferCoding: return 501
        case .unsupportedVersion: return 505
        default: return 400
        }
    }

    public var description: String {
        switch kind {
        case .invalidRequestLine: return "invalid request line"
        case .invalidMethod: return "invalid method"
        case .invalidTarget: return "invalid request target"
        case .invalidVersion: return "invalid HTTP version"
        case .unsupportedVersion: return "unsupported HTTP version"
        case .invalidStatusLine: return "invalid status line"
        case .invalidFieldName: return "invalid header field name"
        case .whitespaceBeforeColon: return "whitespace between header name and colon"
        case .obsoleteLineFolding: return "obsolete line folding in header"
        case .invalidFieldValue: return "invalid character in header value"
        case .bareCR: return "CR not followed by LF"
        case .bareLF: return "LF not preceded by CR"
        case .missingHost: return "HTTP/1.1 request without Host"
        case .duplicateHost: return "more than one Host header"
        case .invalidContentLength: return "invalid Content-Length"
        case .duplicateContentLength: return "Content-Length repeated"
        case .conflictingContentLength: return "differing Content-Length values"
        case .contentLengthWithTransferEncoding: return "both Content-Length and Transfer-Encoding"
        case .invalidTransferEncoding: return "Transfer-Encoding does not end with a single chunked"
        case .unsupportedTransferCoding: return "unsupported transfer coding"
        case .transferEncodingInHTTP10: return "Transfer-Encoding in an HTTP/1.0 message"
        case .startLineTooLong: return "start line too long"
        case .headerSectionTooLarge: return "header section too large"
        case .tooManyFields: return "too many header fields"
        case .invalidChunkSize: return "invalid chunk size"
        case .chunkSizeTooLarge: return "chunk size too large"
        case .chunkExtensionTooLong: return "chunk extension too long"
        case .invalidChunkExtension: return "invalid character in chunk extension"
        case .missingChunkCRLF: return "chunk data not followed by CRLF"
        }
    }

    public static let invalidRequestLine = HTTP1ParseError(.invalidRequestLine)
    public static let invalidMethod = HTTP1ParseError(.invalidMethod)
    public static let invalidTarget = HTTP1ParseError(.invalidTarget)
    public static let invalidVersion = HTTP1ParseError(.invalidVersion)
    public static let unsupportedVersion = HTTP1ParseError(.unsupportedVersion)
    public static let invalidStatusLine = HTTP1ParseError(.invalidStatusLine)
    public static let invalidFieldName = HTTP1ParseError(.invalidFieldName)
    public static let whitespaceBeforeColon = HTTP1ParseError(.whitespaceBeforeColon)
    public static let obsoleteLineFolding = HTTP1ParseError(.obsoleteLineFolding)
    public static let invalidFieldValue = HTTP1ParseError(.invalidFieldValue)
    public static let bareCR = HTTP1ParseError(.bareCR)
    public static let bareLF = HTTP1ParseError(.bareLF)
    public static let missingHost = HTTP1ParseError(.missingHost)
    public static let duplicateHost = HTTP1ParseError(.duplicateHost)
    public static let invalidContentLength = HTTP1ParseError(.invalidContentLength)
    public static let duplicateContentLength = HTTP1ParseError(.duplicateContentLength)
    public static let conflictingContentLength = HTTP1ParseError(.conflictingContentLength)
    public static let contentLengthWithTransferEncoding = HTTP1ParseError(.contentLengthWithTransferEncoding)
    public static let invalidTransferEncoding = HTTP1ParseError(.invalidTransferEncoding)
    public static let unsupportedTransferCoding = HTTP1ParseError(.unsupportedTransferCoding)
    public static let transferEncodingInHTTP10 = HTTP1ParseError(.transferEncodingInHTTP10)
    public static let startLineTooLong = HTTP1ParseError(.startLineTooLong)
    public static let headerSectionTooLarge = HTTP1ParseError(.headerSectionTooLarge)
    public static let tooManyFields = HTTP1ParseError(.tooManyFields)
    public static let invalidChunkSize = HTTP1ParseError(.invalidChunkSize)
    public static let chunkSizeTooLarge = HTTP1ParseError(.chunkSizeTooLarge)
    public static let chunkExtensionTooLong = HTTP1ParseError(.chunkExtensionTooLong)
    public static let invalidChunkExtension = HTTP1ParseError(.invalidChunkExtension)
    public static let missingChunkCRLF = HTTP1ParseError(.missingChunkCRLF)
}

/// Size limits for one head (or one trailer section).
public struct HTTP1Limits: Sendable {
    /// Request line / status line bytes, CRLF excluded (request: 414).
    public var maxStartLineBytes: Int
    /// Bytes of the field lines after the start line, CRLFs included (431).
    public var maxFieldBytes: Int
    /// Number of field lines (431).
    public var maxFieldCount: Int
    /// Bytes of extensions on one chunk-size line.
    public var maxChunkExtensionBytes: Int

    public init(maxStartLineBytes: Int = 8192, maxFieldBytes: Int = 32768, maxFieldCount: Int = 100,
                maxChunkExtensionBytes: Int = 1024) {
        self.maxStartLineBytes = maxStartLineBytes
        self.maxFieldBytes = maxFieldBytes
        self.maxFieldCount = maxFieldCount
        self.maxChunkExtensionBytes = maxChunkExtensionBytes
    }
}
