import NIOCore

/// Where and how to connect. Two configurations with the same `poolKey`
/// share connections (same server, database and credentials).
public struct RedisConfiguration: Sendable, Hashable {
    public var host: String
    public var port: Int
    /// Selected with SELECT after connecting when not 0.
    public var database: Int
    /// Redis 6 ACL user; nil means AUTH with the password only.
    public var username: String?
    public var password: String?
    public var connectTimeout: TimeAmount
    /// Default time a command may wait for its reply.
    public var commandTimeout: TimeAmount
    /// Connections per event loop. Commands are pipelined, so one connection
    /// already carries many concurrent commands; more help only when one
    /// slow command (EVAL, big values) would hold up the others.
    public var connectionsPerLoop: Int
    /// First wait after a failed connect; doubles per failure up to `maxBackoff`.
    /// While waiting, commands fail at once with `.unavailable`.
    public var initialBackoff: TimeAmount
    public var maxBackoff: TimeAmount
    public var limits: RESPLimits

    public init(host: String = "127.0.0.1", port: Int = 6379, database: Int = 0,
                username: String? = nil, password: String? = nil,
                connectTimeout: TimeAmount = .seconds(1), commandTimeout: TimeAmount = .seconds(1),
                connectionsPerLoop: Int = 1,
                initialBackoff: TimeAmount = .milliseconds(100), maxBackoff: TimeAmount = .seconds(2),
                limits: RESPLimits = RESPLimits()) {
        self.host = host
        self.port = port
        self.database = database
        self.username = username
        self.password = password
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.connectionsPerLoop = max(1, connectionsPerLoop)
        self.initialBackoff = initialBackoff
        self.maxBackoff = maxBackoff
        self.limits = limits
    }

    /// "host:port" for messages.
    public var address: String {
        self.host.contains(":") ? "[\(self.host)]:\(self.port)" : "\(self.host):\(self.port)"
    }

    /// What identifies a pool: connections are interchangeable only when
    /// server, database and credentials all match.
    public struct PoolKey: Hashable, Sendable {
        var host: String
        var port: Int
        var database: Int
        var username: String?
        var password: String?
    }

    public var poolKey: PoolKey {
        PoolKey(host: self.host, port: self.port, database: self.database,
                username: self.username, password: self.password)
    }
}


