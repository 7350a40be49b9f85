import Foundation
import NIOCore
import NIOPosix

/// A real `redis-server` on a free loopback port, for one test (shared by
/// every test target that needs Redis: WeirRedisTests, WeirLuaTests,
/// WeirProxyTests). Nothing is
/// persisted (`--save '' --appendonly no`). `kill()` stops it abruptly
/// (SIGKILL, as a crash would); `restart()` brings it back on the same port.
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
        self.port = try Self.freePort()
        self.password = password
        self.extraArguments = extraArguments
        self.logURL = FileManager.default.temporaryDirectory.appendingPathComponent("weir-redis-\(self.port).log")
        try self.start()
    }

    deinit {
        self.kill()
        try? FileManager.default.removeItem(at: self.logURL)
    }

    public func start() throws {
        precondition(self.process == nil, "already running")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
        var arguments = ["--port", String(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                         "--daemonize", "no", "--logfile", self.logURL.path]
        if let password = self.password { arguments += ["--requirepass", password] }
        process.arguments = arguments + self.extraArguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        // Ready when it answers PING (checked with redis-cli, not our client).
        for _ in 0..<200 {
            if (try? self.cli("PING")) == "PONG" { return }
            guard process.isRunning else { break }
            usleep(25_000)
        }
        let log = (try? String(contentsOf: self.logURL, encoding: .utf8)) ?? ""
        self.kill()
        throw NSError(domain: "RedisServerProcess", code: 1,
                      userInfo: [NSLocalizedDescriptionKey: "redis-server on port \(self.port) did not answer PING; log:\n\(log)"])
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

    /// A loopback port nothing listens on right now (bind to 0, read, close).
    public static func freePort() throws -> Int {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let channel = try ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).wait()
        let port = channel.localAddress!.port!
        try channel.close().wait()
        return port
    }
}

