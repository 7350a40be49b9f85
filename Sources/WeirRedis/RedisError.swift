import NIOCore

/// Every failure the client reports. `kind` is for code (e.g. a rate limiter
/// deciding whether to fail open); `description` is for logs and users.
public struct RedisError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// TCP connect failed (refused, unreachable, DNS).
        case connectFailed
        /// TCP connect did not finish within `connectTimeout`.
        case connectTimeout
        /// No reply within the command timeout. The connection was closed,
        /// because later replies would no longer match their commands.
        case commandTimeout
        /// The connection closed (or was closed) before the reply arrived.
        case connectionClosed
        /// The client is waiting out its reconnect backoff after a failure;
        /// the command was not sent.
        case unavailable
        /// AUTH or SELECT on connect was refused.
        case handshakeFailed
        /// The server answered with an error reply (`-ERR ...`, `-NOSCRIPT ...`).
        case server
        /// The server sent bytes that are not RESP2 or cross a `RESPLimits` bound.
        case protocolError
        /// The reply had a type the convenience method did not expect.
        case unexpectedReply
        /// The client or connection was shut down.
        case shutDown
        /// The command was not sent: it would break the shared connection
        /// (SUBSCRIBE, MONITOR, SELECT, AUTH, ...), or it was empty.
        case refused
    }

    public var kind: Kind
    public var message: String
    /// Where the error was made (in this module), to find the path in logs.
    public var location: String

    public var description: String { "redis: \(self.message)" }

    /// For `.server` errors: the error code Redis puts first (`ERR`,
    /// `WRONGTYPE`, `NOSCRIPT`, `NOAUTH`, ...).
    public var serverErrorCode: Substring? {
        guard self.kind == .server else { return nil }
        return self.message.split(separator: " ", maxSplits: 1).first
    }

    init(_ kind: Kind, _ message: String, file: String = #fileID, line: Int = #line) {
        self.kind = kind
        self.message = message
        self.location = "\(file):\(line)"
    }

    static func connectFailed(_ address: String, _ underlying: Error, file: String = #fileID, line: Int = #line) -> RedisError {
        RedisError(.connectFailed, "connect to \(address) failed: \(underlying)", file: file, line: line)
    }

    static func connectTimeout(_ address: String, _ timeout: TimeAmount, file: String = #fileID, line: Int = #line) -> RedisError {
        RedisError(.connectTimeout, "connect to \(address) timed out after \(timeout.milliseconds) ms", file: file, line: line)
    }

    static func commandTimeout(_ address: String, _ timeout: TimeAmount, file: String = #fileID, line: Int = #line) -> RedisError {
        RedisError(.commandTimeout,
                   "no reply from \(address) within \(timeout.milliseconds) ms (connection closed)", file: file, line: line)
    }

    static func connectionClosed(_ address: String, _ why: String = "connection closed before the reply arrived",
                                 file: String = #fileID, line: Int = #line) -> RedisError {
        RedisError(.connectionClosed, "\(address): \(why)", file: file, line: line)
    }

    static func server(_ message: String, file: String = #fileID, line: Int = #line) -> RedisError {
        RedisError(.server, message, file: file, line: line)
    }

    static func unexpectedReply(_ command: String, _ reply: RESPValue, file: String = #fileID, line: Int = #line) -> RedisError {
        RedisError(.unexpectedReply, "unexpected reply to \(command): \(reply)", file: file, line: line)
    }
}

extension TimeAmount {
    var milliseconds: Int64 { self.nanoseconds / 1_000_000 }
}
