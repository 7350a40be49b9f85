import Logging
import NIOCore
import NIOPosix

/// An asynchronous Redis (RESP2) client for one event loop.
///
/// Weir writes its own small client because no maintained Swift Redis client
/// is available in this build environment's package list. It backs
/// `weir.redis` in the Lua SDK and the `rate-limiting` plugin's
/// `policy: redis`, so it is built for the data path: one client per event
/// loop, state touched only on that loop (no locks), futures completed on
/// the caller's loop, pipelined connections.
///
/// Connections are opened lazily, up to `connectionsPerLoop`. When a connect
/// fails, the client waits out a backoff (doubling from `initialBackoff` to
/// `maxBackoff`); during it, commands fail at once with `.unavailable`
/// instead of queueing, so a Redis outage never makes requests hang. The
/// first command after the backoff tries to connect again.
///
/// Get the client for the current loop with `RedisClients.forLoop(_:_:)`.
public final class RedisClient: @unchecked Sendable {
    public let eventLoop: EventLoop
    public let configuration: RedisConfiguration

    private enum Slot {
        case empty
        case connecting(EventLoopFuture<RedisConnection>)
        case connected(RedisConnection)
    }

    private var slots: [Slot]
    private var nextSlot = 0
    private var consecutiveConnectFailures = 0
    private var retryNotBefore: NIODeadline = .uptimeNanoseconds(0)
    private var lastConnectError: RedisError?
    private var isShutDown = false

    /// Logs connect failures, recovery and timeouts: rare events, never
    /// one line per command.
    public let logger: Logger

    /// Label `weir.redis`; the process's logging backend decides where it goes.
    public static let defaultLogger = Logger(label: "weir.redis")

    public init(eventLoop: EventLoop, configuration: RedisConfiguration, logger: Logger = RedisClient.defaultLogger) {
        self.eventLoop = eventLoop
        self.configuration = configuration
        self.logger = logger
        self.slots = Array(repeating: .empty, count: configuration.connectionsPerLoop)
    }

    // MARK: Commands

    /// Sends one command and returns its reply. Error replies fail the future
    /// with `RedisError` of kind `.server`.
    /// - Parameter timeout: overrides `configuration.commandTimeout`.
    public func send(command arguments: [RedisArgument], timeout: TimeAmount? = nil) -> EventLoopFuture<RESPValue> {
        guard self.eventLoop.inEventLoop else {
            return self.eventLoop.flatSubmit { self.send(command: arguments, timeout: timeout) }
        }
        if let refusal = Self.refusal(arguments) {
            return self.eventLoop.makeFailedFuture(refusal)
        }
        return self.sendKnownSafe(arguments, timeout: timeout)
    }

    /// `send(command:)` for commands known to be safe (the convenience
    /// methods): skips the refusal check on the hot path.
    private func sendKnownSafe(_ arguments: [RedisArgument], timeout: TimeAmount?) -> EventLoopFuture<RESPValue> {
        guard self.eventLoop.inEventLoop else {
            return self.eventLoop.flatSubmit { self.sendKnownSafe(arguments, timeout: timeout) }
        }
        switch self.connection() {
        case .ready(let connection):
            return connection.send(arguments, timeout: timeout)
        case .pending(let future):
            return future.flatMap { $0.send(arguments, timeout: timeout) }
        case .failed(let error):
            return self.eventLoop.makeFailedFuture(error)
        }
    }

    /// Commands that would break a shared, pipelined connection: replies
    /// that stop matching commands one-to-one (pub/sub, MONITOR, CLIENT
    /// REPLY), or connection state that other users of the pool would
    /// inherit (SELECT, AUTH, HELLO, RESET, QUIT). Database and credentials
    /// belong in `RedisConfiguration`.
    static let refusedCommands: Set<String> = [
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR", "SELECT", "AUTH", "HELLO", "RESET", "QUIT", "CLIENT",
    ]

    private static func refusal(_ arguments: [RedisArgument]) -> RedisError? {
        guard let first = arguments.first else {
            return RedisError(.refused, "empty command")
        }
        // Fast path: no refused command name is shorter than 4 or longer
        // than 10 bytes, and most commands are short words like GET/EVALSHA.
        let name: String
        switch first {
        case .string(let text): name = text
        case .bytes(let bytes): name = String(buffer: bytes)
        case .integer: return nil
        }
        let length = name.utf8.count
        guard length >= 4 && length <= 10, let initial = name.utf8.first else { return nil }
        switch initial | 0x20 {  // ASCII lowercase
        case UInt8(ascii: "s"), UInt8(ascii: "p"), UInt8(ascii: "m"), UInt8(ascii: "a"), UInt8(ascii: "h"),
             UInt8(ascii: "r"), UInt8(ascii: "q"), UInt8(ascii: "c"):
            break
        default:
            return nil  // EVALSHA, INCR, GET, EXPIRE...: no allocation
        }
        let upper = name.uppercased()
        guard Self.refusedCommands.contains(upper) else { return nil }
        if upper == "CLIENT" {
            // CLIENT REPLY OFF/SKIP silences replies; other CLIENT subcommands are harmless.
            guard arguments.count > 1, case .string(let sub) = arguments[1], sub.uppercased() == "REPLY" else { return nil }
            return RedisError(.refused, "CLIENT REPLY is not allowed on a shared pipelined connection")
        }
        return RedisError(.refused, "\(upper) is not allowed on a shared pipelined connection"
                          + " (database and credentials are set in the client configuration)")
    }

    /// Same as `send(command:)` with strings (e.g. from Lua).
    public func send(_ arguments: String..., timeout: TimeAmount? = nil) -> EventLoopFuture<RESPValue> {
        self.send(command: arguments.map(RedisArgument.string), timeout: timeout)
    }

    /// GET: the value, or nil when the key does not exist.
    public func get(_ key: String, timeout: TimeAmount? = nil) -> EventLoopFuture<ByteBuffer?> {
        self.sendKnownSafe(["GET", .string(key)], timeout: timeout).flatMapThrowing { reply in
            switch reply {
            case .bulkString(let value): return value
            default: throw RedisError.unexpectedReply("GET", reply)
            }
        }
    }

    /// SET, with an expiry in seconds when `ex` is given.
    public func set(_ key: String, to value: RedisArgument, ex seconds: Int? = nil,
                    timeout: TimeAmount? = nil) -> EventLoopFuture<Void> {
        var command: [RedisArgument] = ["SET", .string(key), value]
        if let seconds { command += ["EX", .integer(seconds)] }
        return self.sendKnownSafe(command, timeout: timeout).map { _ in }
    }

    /// INCR: the value after incrementing.
    public func incr(_ key: String, timeout: TimeAmount? = nil) -> EventLoopFuture<Int> {
        self.sendIntegerKnownSafe(["INCR", .string(key)], timeout: timeout)
    }

    /// INCRBY: the value after adding `amount`.
    public func incrby(_ key: String, _ amount: Int, timeout: TimeAmount? = nil) -> EventLoopFuture<Int> {
        self.sendIntegerKnownSafe(["INCRBY", .string(key), .integer(amount)], timeout: timeout)
    }

    /// EXPIRE: true if the key exists and now has the expiry.
    public func expire(_ key: String, seconds: Int, timeout: TimeAmount? = nil) -> EventLoopFuture<Bool> {
        self.sendIntegerKnownSafe(["EXPIRE", .string(key), .integer(seconds)], timeout: timeout).map { $0 == 1 }
    }

    /// PEXPIRE: true if the key exists and now has the expiry.
    public func pexpire(_ key: String, milliseconds: Int, timeout: TimeAmount? = nil) -> EventLoopFuture<Bool> {
        self.sendIntegerKnownSafe(["PEXPIRE", .string(key), .integer(milliseconds)], timeout: timeout).map { $0 == 1 }
    }

    /// DEL: how many of the keys existed.
    public func del(_ keys: [String], timeout: TimeAmount? = nil) -> EventLoopFuture<Int> {
        self.sendIntegerKnownSafe(["DEL"] + keys.map(RedisArgument.string), timeout: timeout)
    }

    /// EVAL source numkeys keys... args...
    public func eval(_ source: String, keys: [String] = [], args: [RedisArgument] = [],
                     timeout: TimeAmount? = nil) -> EventLoopFuture<RESPValue> {
        self.sendKnownSafe(Self.scriptCommand("EVAL", .string(source), keys: keys, args: args), timeout: timeout)
    }

    /// EVALSHA sha numkeys keys... args... (fails with NOSCRIPT if the server
    /// does not have the script; `evalScript` handles that).
    public func evalsha(_ sha1: String, keys: [String] = [], args: [RedisArgument] = [],
                        timeout: TimeAmount? = nil) -> EventLoopFuture<RESPValue> {
        self.sendKnownSafe(Self.scriptCommand("EVALSHA", .string(sha1), keys: keys, args: args), timeout: timeout)
    }

    /// Runs `script` in one round trip when the server has it cached
    /// (EVALSHA); on NOSCRIPT (server restarted, SCRIPT FLUSH, first use)
    /// sends it with EVAL, which also caches it for the next call.
    public func evalScript(_ script: RedisScript, keys: [String] = [], args: [RedisArgument] = [],
                           timeout: TimeAmount? = nil) -> EventLoopFuture<RESPValue> {
        self.evalsha(script.sha1, keys: keys, args: args, timeout: timeout).flatMapError { error in
            guard let redisError = error as? RedisError, redisError.serverErrorCode == "NOSCRIPT" else {
                return self.eventLoop.makeFailedFuture(error)
            }
            return self.eval(script.source, keys: keys, args: args, timeout: timeout)
        }
    }

    private static func scriptCommand(_ name: RedisArgument, _ script: RedisArgument, keys: [String],
                                      args: [RedisArgument]) -> [RedisArgument] {
        var command: [RedisArgument] = [name, script, .integer(keys.count)]
        command.reserveCapacity(3 + keys.count + args.count)
        for key in keys { command.append(.string(key)) }
        command.append(contentsOf: args)
        return command
    }

    /// A command with an integer reply, completed without an extra future.
    public func sendExpectingInteger(command arguments: [RedisArgument], timeout: TimeAmount? = nil) -> EventLoopFuture<Int> {
        if let refusal = Self.refusal(arguments) {
            return self.eventLoop.makeFailedFuture(refusal)
        }
        return self.sendIntegerKnownSafe(arguments, timeout: timeout)
    }

    private func sendIntegerKnownSafe(_ arguments: [RedisArgument], timeout: TimeAmount?) -> EventLoopFuture<Int> {
        guard self.eventLoop.inEventLoop else {
            return self.eventLoop.flatSubmit { self.sendIntegerKnownSafe(arguments, timeout: timeout) }
        }
        switch self.connection() {
        case .ready(let connection):
            return connection.sendExpectingInteger(arguments, timeout: timeout)
        case .pending(let future):
            return future.flatMap { $0.sendExpectingInteger(arguments, timeout: timeout) }
        case .failed(let error):
            return self.eventLoop.makeFailedFuture(error)
        }
    }

    // MARK: Connections

    private enum Acquired {
        case ready(RedisConnection)
        case pending(EventLoopFuture<RedisConnection>)
        case failed(RedisError)
    }

    /// Picks the next slot round-robin; connects it if it is empty (unless
    /// in backoff). On the loop only.
    private func connection() -> Acquired {
        guard !self.isShutDown else {
            return .failed(RedisError(.shutDown, "client for \(self.configuration.address) is shut down"))
        }
        let index = self.nextSlot
        self.nextSlot = index + 1 == self.slots.count ? 0 : index + 1
        switch self.slots[index] {
        case .connected(let connection) where connection.isActive:
            return .ready(connection)
        case .connecting(let future):
            return .pending(future)
        case .connected, .empty:
            break
        }
        if NIODeadline.now() < self.retryNotBefore, let lastError = self.lastConnectError {
            // This slot may not reconnect yet; another open connection (if
            // any) still serves the command rather than failing it.
            for slot in self.slots {
                if case .connected(let connection) = slot, connection.isActive { return .ready(connection) }
            }
            return .failed(RedisError(.unavailable,
                                      "\(self.configuration.address) unavailable, retrying soon (last error: \(lastError.message))"))
        }
        let future = RedisConnection.connect(configuration: self.configuration, on: self.eventLoop, logger: self.logger)
        self.slots[index] = .connecting(future)
        future.whenComplete { result in self.connectFinished(slot: index, result) }
        return .pending(future)
    }

    private func connectFinished(slot index: Int, _ result: Result<RedisConnection, Error>) {
        switch result {
        case .success(let connection):
            guard !self.isShutDown else {
                _ = connection.close()
                return
            }
            if self.consecutiveConnectFailures > 0 {
                self.logger.info("redis: connected to \(self.configuration.address) again after \(self.consecutiveConnectFailures) failed attempts")
            }
            self.consecutiveConnectFailures = 0
            self.lastConnectError = nil
            self.slots[index] = .connected(connection)
            connection.closeFuture.whenComplete { _ in
                if case .connected(let current) = self.slots[index], current === connection {
                    self.slots[index] = .empty
                }
            }
        case .failure(let error):
            self.slots[index] = .empty
            self.consecutiveConnectFailures += 1
            self.lastConnectError = error as? RedisError ?? RedisError.connectFailed(self.configuration.address, error)
            // initial * 2^(failures-1), capped.
            let exponent = min(self.consecutiveConnectFailures - 1, 20)
            let backoff = min(self.configuration.initialBackoff.nanoseconds << Int64(exponent),
                              self.configuration.maxBackoff.nanoseconds)
            self.retryNotBefore = .now() + .nanoseconds(backoff)
            self.logger.warning("\(self.lastConnectError!); commands fail at once for the next \(backoff / 1_000_000) ms")
        }
    }

    /// Open connections (on the loop only); for tests and metrics.
    public var openConnections: Int {
        self.slots.reduce(0) { count, slot in
            if case .connected(let connection) = slot, connection.isActive { return count + 1 }
            return count
        }
    }

    /// Closes every connection; later commands fail with `.shutDown`.
    public func close() -> EventLoopFuture<Void> {
        guard self.eventLoop.inEventLoop else {
            return self.eventLoop.flatSubmit { self.close() }
        }
        self.isShutDown = true
        var closing: [EventLoopFuture<Void>] = []
        for slot in self.slots {
            switch slot {
            case .connected(let connection):
                closing.append(connection.close())
            case .connecting(let future):
                closing.append(future.flatMap { $0.close() }.recover { _ in })
            case .empty:
                break
            }
        }
        self.slots = Array(repeating: .empty, count: self.slots.count)
        return EventLoopFuture.andAllComplete(closing, on: self.eventLoop)
    }
}

/// The process-wide registry: one `RedisClient` per (event loop, server,
/// database, credentials). Each loop's clients live in a thread-local
/// dictionary (an NIO event loop is one thread), so lookups take no lock.
public enum RedisClients {
    private final class Registry {
        var clients: [Key: RedisClient] = [:]
    }

    private struct Key: Hashable {
        var loop: ObjectIdentifier
        var pool: RedisConfiguration.PoolKey
    }

    private static let registry = ThreadSpecificVariable<Registry>()

    /// The client for `eventLoop` and the server `configuration` names,
    /// made on first use. Must be called on `eventLoop`. The first caller's
    /// timeouts and pool size win; pass `timeout:` per command to differ.
    public static func forLoop(_ eventLoop: EventLoop, _ configuration: RedisConfiguration) -> RedisClient {
        eventLoop.preconditionInEventLoop()
        let registry: Registry
        if let existing = Self.registry.currentValue {
            registry = existing
        } else {
            registry = Registry()
            Self.registry.currentValue = registry
        }
        let key = Key(loop: ObjectIdentifier(eventLoop), pool: configuration.poolKey)
        if let client = registry.clients[key] { return client }
        let client = RedisClient(eventLoop: eventLoop, configuration: configuration)
        registry.clients[key] = client
        return client
    }

    /// Closes and forgets every client of `eventLoop`.
    public static func shutdown(on eventLoop: EventLoop) -> EventLoopFuture<Void> {
        eventLoop.flatSubmit {
            guard let registry = Self.registry.currentValue else { return eventLoop.makeSucceededVoidFuture() }
            let loop = ObjectIdentifier(eventLoop)
            let clients = registry.clients.filter { $0.key.loop == loop }
            for key in clients.keys { registry.clients[key] = nil }
            return EventLoopFuture.andAllComplete(clients.values.map { $0.close() }, on: eventLoop)
        }
    }

    /// Closes and forgets every client on every loop of `group`.
    public static func shutdown(group: EventLoopGroup) -> EventLoopFuture<Void> {
        let loops = Array(group.makeIterator())
        let first = group.next()
        return EventLoopFuture.andAllComplete(loops.map { Self.shutdown(on: $0) }, on: first)
    }
}
