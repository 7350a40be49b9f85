import Foundation

/// A real `redis-server` on a loopback port of its own, for one test
/// (shared by every test target that needs Redis: WeirRedisTests,
/// WeirLuaTests, WeirProxyTests). Nothing is persisted (`--save ''
/// --appendonly no`). `kill()` stops it abruptly (SIGKILL, as a crash
/// would); `restart()` brings it back on the same port.
///
/// redis-server cannot listen on port 0 and report the port, so the port is
/// picked beforehand (`withUnusedPort`): when redis' own log says the bind
/// failed because the port was taken in between, another port is tried.
/// "Ready" is redis' own "Ready to accept connections" line, not a PING
/// that another redis-server on the same port could answer.
public final class RedisServerProcess {
    public let port: Int
    public let password: String?
    private let extraArguments: [String]
    private var process: Process?
    private let logURL: URL

    public static var isAvailable: Bool {
        FileManager.default.isExecutableFile(atPath: "/usr/bin/redis-server")
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/redis-cli")
    }

    public init(password: String? = nil, extraArguments: [String] = []) throws {
        self.password = password
        self.extraArguments = extraArguments
        let logURL = Self.newLogURL()
        self.logURL = logURL
        (self.port, self.process) = try withUnusedPort(isPortTaken: { ($0 as? StartFailure)?.portTaken == true }) { port in
            (port, try Self.launch(port: port, password: password, extraArguments: extraArguments, logURL: logURL))
        }
    }

    /// On a given port, once: throws `StartFailure` (`portTaken`) if
    /// another socket holds it.
    public init(port: Int, password: String? = nil) throws {
        self.password = password
        self.extraArguments = []
        self.logURL = Self.newLogURL()
        self.port = port
        self.process = try Self.launch(port: port, password: password, extraArguments: [], logURL: self.logURL)
    }

    private static func newLogURL() -> URL {
        FileManager.default.temporaryDirectory.appendingPathComponent("weir-redis-\(UUID().uuidString).log")
    }

    deinit {
        self.kill()
        try? FileManager.default.removeItem(at: self.logURL)
    }

    /// Starts it again on its port. Right after a `kill()` a connect's
    /// ephemeral source port may briefly hold that port, so a taken port is
    /// retried for a few seconds before the start fails.
    public func start() throws {
        precondition(self.process == nil, "already running")
        self.process = try retryWhilePortTaken(isPortTaken: { ($0 as? StartFailure)?.portTaken == true }) {
            try Self.launch(port: self.port, password: self.password, extraArguments: self.extraArguments, logURL: self.logURL)
        }
    }

    public struct StartFailure: Error, CustomStringConvertible {
        public var port: Int
        /// redis logged that another socket holds the port.
        public var portTaken: Bool
        public var log: String
        public var description: String { "redis-server on port \(port) did not start; its log:\n\(log)" }
    }

    /// Runs redis-server on `port` and waits for its "ready" log line.
    private static func launch(port: Int, password: String?, extraArguments: [String], logURL: URL) throws -> Process {
        try? FileManager.default.removeItem(at: logURL)   // only this run's lines
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
        var arguments = ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                         "--daemonize", "no", "--logfile", logURL.path]
        if let password { arguments += ["--requirepass", password] }
        process.arguments = arguments + extraArguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        func log() -> String { (try? String(contentsOf: logURL, encoding: .utf8)) ?? "" }
        for _ in 0..<400 {
            if log().contains("Ready to accept connections") { return process }
            guard process.isRunning else { break }
            usleep(25_000)
        }
        if process.isRunning { Foundation.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        let text = log()
        throw StartFailure(port: port, portTaken: text.contains("Address already in use"), log: text)
    }

    /// SIGKILL and wait for the process to be gone (its port closes with it).
    public func kill() {
        guard let process = self.process else { return }
        self.process = nil
        if process.isRunning {
            Foundation.kill(process.processIdentifier, SIGKILL)
        }
        process.waitUntilExit()
    }

    public func restart() throws {
        self.kill()
        try self.start()
    }

    /// Runs one command with redis-cli (an independent client) and returns
    /// its trimmed raw output.
    @discardableResult
    public func cli(_ arguments: String..., database: Int = 0) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-cli")
        var all = ["-h", "127.0.0.1", "-p", String(self.port), "-n", String(database), "--no-auth-warning"]
        if let password = self.password { all += ["-a", password] }
        process.arguments = all + arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
