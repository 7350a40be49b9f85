import Foundation
import NIOCore
import NIOPosix
@testable import WeirRedis
import WeirTestSupport
import XCTest

/// The client against a real redis-server on loopback: reply types,
/// pipelining, AUTH, SELECT, scripts, timeouts, outages and recovery.
final class RedisClientTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var loop: EventLoop { self.group.next() }

    override func setUpWithError() throws {
        try XCTSkipUnless(RedisServerProcess.isAvailable, "redis-server not installed (make deps)")
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDownWithError() throws {
        try self.group?.syncShutdownGracefully()
    }

    private func client(_ server: RedisServerProcess, configure: (inout RedisConfiguration) -> Void = { _ in }) -> RedisClient {
        var configuration = RedisConfiguration(host: "127.0.0.1", port: server.port, password: server.password,
                                               commandTimeout: .seconds(5))
        configure(&configuration)
        return RedisClient(eventLoop: self.loop, configuration: configuration)
    }

    private func redisError(_ future: EventLoopFuture<some Any>, file: StaticString = #filePath, line: UInt = #line) -> RedisError? {
        guard let result = waitWithoutHanging(future, file: file, line: line) else { return nil }
        switch result {
        case .success(let value):
            XCTFail("expected an error, got \(value)", file: file, line: line)
            return nil
        case .failure(let error):
            guard let redisError = error as? RedisError else {
                XCTFail("expected RedisError, got \(type(of: error)): \(error)", file: file, line: line)
                return nil
            }
            return redisError
        }
    }

    func testEveryReplyTypeFromARealServer() throws {
        let server = try RedisServerProcess()
        let client = self.client(server)
        defer { _ = try? client.close().wait() }

        XCTAssertEqual(try client.send("PING").wait(), .simpleString(ByteBuffer(string: "PONG")))
        try client.set("greeting", to: "hello").wait()
        XCTAssertEqual(try client.get("greeting").wait(), ByteBuffer(string: "hello"))
        XCTAssertNil(try client.get("missing").wait(), "null bulk string")
        XCTAssertEqual(try client.incr("n").wait(), 1)
        XCTAssertEqual(try client.incrby("n", 41).wait(), 42)
        XCTAssertEqual(try client.send("GET", "n").wait().int, 42)

        // Binary-safe: every byte value, CR and LF included.
        let binary = ByteBuffer(bytes: Array(0...255))
        try client.set("binary", to: .bytes(binary)).wait()
        XCTAssertEqual(try client.get("binary").wait(), binary)

        // Arrays: empty, of bulk strings, nested (from a script), null (BLPOP timeout).
        XCTAssertEqual(try client.send("LRANGE", "nolist", "0", "-1").wait(), .array([]))
        _ = try client.send("RPUSH", "list", "a", "b").wait()
        XCTAssertEqual(try client.send("LRANGE", "list", "0", "-1").wait(),
                       .array([.bulkString(ByteBuffer(string: "a")), .bulkString(ByteBuffer(string: "b"))]))
        XCTAssertEqual(try client.eval("return {1, 'two', {3, {'four'}}}").wait(),
                       .array([.integer(1), .bulkString(ByteBuffer(string: "two")),
                               .array([.integer(3), .array([.bulkString(ByteBuffer(string: "four"))])])]))
        XCTAssertEqual(try client.send("BLPOP", "emptylist", "0.01").wait(), .array(nil))

        // Error replies fail that command only; the connection carries on.
        let error = self.redisError(client.send("NOSUCHCOMMAND"))
        XCTAssertEqual(error?.kind, .server)
        XCTAssertEqual(error?.serverErrorCode, "ERR")
        let wrongType = self.redisError(client.incr("list"))
        XCTAssertEqual(wrongType?.serverErrorCode, "WRONGTYPE")
        XCTAssertEqual(try client.send("PING").wait().string, "PONG")

        // Expiry helpers and DEL.
        XCTAssertTrue(try client.expire("greeting", seconds: 100).wait())
        XCTAssertEqual(Int(try server.cli("TTL", "greeting")) ?? 0, 100, accuracy: 5)
        XCTAssertTrue(try client.pexpire("n", milliseconds: 100_000).wait())
        XCTAssertFalse(try client.expire("missing", seconds: 1).wait())
        try client.set("short", to: "x", ex: 50).wait()
        XCTAssertEqual(Int(try server.cli("TTL", "short")) ?? 0, 50, accuracy: 5)
        XCTAssertEqual(try client.del(["greeting", "n", "missing"]).wait(), 2)
        XCTAssertEqual(try client.eventLoop.submit { client.openConnections }.wait(), 1,
                       "error replies did not cost the connection")
    }

    func testTenThousandPipelinedIncrsAreExactAndInOrder() throws {
        let server = try RedisServerProcess()
        let client = self.client(server)
        defer { _ = try? client.close().wait() }
        let count = 10_000
        // Issue all commands in one loop tick: nothing waits for a reply
        // before the next command is written.
        let all: EventLoopFuture<[Int]> = client.eventLoop.flatSubmit {
            let futures = (0..<count).map { _ in client.incr("pipelined") }
            return EventLoopFuture.whenAllSucceed(futures, on: client.eventLoop)
        }
        let replies = try all.wait()
        XCTAssertEqual(replies, Array(1...count), "each reply matched to its own command (FIFO)")
        XCTAssertEqual(try server.cli("GET", "pipelined"), String(count))
        let open = try client.eventLoop.submit { client.openConnections }.wait()
        XCTAssertEqual(open, 1, "one pipelined connection carried them all")
    }

    func testErrorRepliesInsideAPipelineFailOnlyTheirOwnCommand() throws {
        let server = try RedisServerProcess()
        let client = self.client(server)
        defer { _ = try? client.close().wait() }
        _ = try client.send("SET", "text", "abc").wait()
        let futures: [EventLoopFuture<Int>] = try client.eventLoop.submit {
            [client.incr("ok"), client.incr("text"), client.incr("ok"),
             client.sendExpectingInteger(command: ["PING"]), client.incr("ok")]
        }.wait()
        XCTAssertEqual(try futures[0].wait(), 1)
        XCTAssertEqual(self.redisError(futures[1])?.serverErrorCode, "ERR", "not an integer")
        XCTAssertEqual(try futures[2].wait(), 2)
        let wrongShape = self.redisError(futures[3])
        XCTAssertEqual(wrongShape?.kind, .unexpectedReply)
        XCTAssertTrue(wrongShape?.description.contains("expected an integer reply, got +PONG") ?? false,
                      "\(String(describing: wrongShape))")
        XCTAssertEqual(try futures[4].wait(), 3, "replies after the errors still match their commands")
    }

    func testCommandsThatWouldBreakTheSharedConnectionAreRefused() throws {
        let server = try RedisServerProcess()
        let client = self.client(server)
        defer { _ = try? client.close().wait() }
        for command: [RedisArgument] in [["SUBSCRIBE", "news"], ["psubscribe", "n*"], ["MONITOR"], ["select", "2"],
                                         ["AUTH", "x"], ["CLIENT", "REPLY", "OFF"], []] {
            let error = self.redisError(client.send(command: command))
            XCTAssertEqual(error?.kind, .refused, "\(command.count) args: \(String(describing: error))")
        }
        XCTAssertTrue(self.redisError(client.send("SELECT", "1"))?.description
            .contains("SELECT is not allowed on a shared pipelined connection") ?? false)
        XCTAssertEqual(self.redisError(client.sendExpectingInteger(command: ["SELECT", "1"]))?.kind, .refused)
        // Harmless lookalikes still go through.
        XCTAssertEqual(try client.send("CLIENT", "GETNAME").wait(), .bulkString(nil))
        XCTAssertEqual(try client.send("PING").wait().string, "PONG")
    }

    func testCommandsSentWhileConnectingKeepTheirOrder() throws {
        let server = try RedisServerProcess(password: "pw")  // AUTH in the handshake too
        let client = self.client(server) { $0.database = 2 }
        defer { _ = try? client.close().wait() }
        // The first command starts the connect; the others queue on it.
        let all: EventLoopFuture<[Int]> = client.eventLoop.flatSubmit {
            EventLoopFuture.whenAllSucceed((0..<100).map { _ in client.incr("queued") }, on: client.eventLoop)
        }
        XCTAssertEqual(try all.wait(), Array(1...100))
        XCTAssertEqual(try server.cli("GET", "queued", database: 2), "100")
    }

    func testCountersStayExactAcrossTwoEventLoops() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { try? group.syncShutdownGracefully() }
        let server = try RedisServerProcess()
        let configuration = RedisConfiguration(port: server.port, commandTimeout: .seconds(5))
        let perLoop = 5_000
        let runs = Array(group.makeIterator()).map { loop in
            loop.flatSubmit { () -> EventLoopFuture<[Int]> in
                let client = RedisClients.forLoop(loop, configuration)
                return EventLoopFuture.whenAllSucceed((0..<perLoop).map { _ in client.incr("both") }, on: loop)
            }
        }
        var seen: [Int] = []
        for run in runs { seen += try run.wait() }
        XCTAssertEqual(seen.sorted(), Array(1...(2 * perLoop)), "every value handed out exactly once")
        XCTAssertEqual(try server.cli("GET", "both"), String(2 * perLoop))
        try RedisClients.shutdown(group: group).wait()
    }

    func testPasswordAuth() throws {
        let server = try RedisServerProcess(password: "s3cret")
        let good = self.client(server)
        defer { _ = try? good.close().wait() }
        try good.set("k", to: "v").wait()
        XCTAssertEqual(try server.cli("GET", "k"), "v")

        let wrong = self.client(server) { $0.password = "nope" }
        let error = self.redisError(wrong.get("k"))
        XCTAssertEqual(error?.kind, .handshakeFailed)
        XCTAssertTrue(error?.description.contains("WRONGPASS") ?? false, "\(String(describing: error))")
        _ = try? wrong.close().wait()

        let none = self.client(server) { $0.password = nil }
        let noAuth = self.redisError(none.get("k"))
        XCTAssertEqual(noAuth?.serverErrorCode, "NOAUTH")
        _ = try? none.close().wait()
    }

    func testUsernameAndPasswordAuth() throws {
        let server = try RedisServerProcess()
        XCTAssertEqual(try server.cli("ACL", "SETUSER", "alice", "on", ">wonderland", "~*", "+@all"), "OK")
        let alice = self.client(server) {
            $0.username = "alice"
            $0.password = "wonderland"
        }
        defer { _ = try? alice.close().wait() }
        XCTAssertEqual(try alice.send("ACL", "WHOAMI").wait().string, "alice")

        let wrong = self.client(server) {
            $0.username = "alice"
            $0.password = "rabbit"
        }
        XCTAssertEqual(self.redisError(wrong.send("PING"))?.kind, .handshakeFailed)
        _ = try? wrong.close().wait()
    }

    func testSelectDatabaseOnConnect() throws {
        let server = try RedisServerProcess()
        let db3 = self.client(server) { $0.database = 3 }
        defer { _ = try? db3.close().wait() }
        try db3.set("where", to: "three").wait()
        XCTAssertEqual(try server.cli("GET", "where", database: 3), "three")
        XCTAssertEqual(try server.cli("EXISTS", "where", database: 0), "0")

        let bad = self.client(server) { $0.database = 99 }
        let error = self.redisError(bad.send("PING"))
        XCTAssertEqual(error?.kind, .handshakeFailed)
        XCTAssertTrue(error?.description.contains("out of range") ?? false, "\(String(describing: error))")
        _ = try? bad.close().wait()
    }

    func testEvalScriptFallsBackToEvalOnNoScript() throws {
        let server = try RedisServerProcess()
        let client = self.client(server)
        defer { _ = try? client.close().wait() }
        let script = RedisScript("""
            local n = redis.call('INCRBY', KEYS[1], ARGV[1])
            redis.call('PEXPIRE', KEYS[1], ARGV[2])
            return n
            """)
        XCTAssertEqual(try server.cli("SCRIPT", "LOAD", script.source), script.sha1, "our SHA-1 is the name Redis uses")
        XCTAssertEqual(try server.cli("SCRIPT", "FLUSH"), "OK")
        XCTAssertEqual(try server.cli("SCRIPT", "EXISTS", script.sha1), "0")

        // Not cached: EVALSHA gets NOSCRIPT, the client resends with EVAL.
        XCTAssertEqual(try client.evalScript(script, keys: ["window"], args: [5, 60_000]).wait(), .integer(5))
        XCTAssertEqual(try server.cli("SCRIPT", "EXISTS", script.sha1), "1", "EVAL cached it")
        XCTAssertEqual(try client.evalScript(script, keys: ["window"], args: [2, 60_000]).wait(), .integer(7))

        XCTAssertEqual(try server.cli("SCRIPT", "FLUSH"), "OK")
        XCTAssertEqual(try client.evalScript(script, keys: ["window"], args: [1, 60_000]).wait(), .integer(8))

        // Errors other than NOSCRIPT are not retried.
        let broken = RedisScript("return redis.call('INCR')")
        XCTAssertEqual(self.redisError(client.evalScript(broken))?.kind, .server)
        XCTAssertEqual(self.redisError(client.evalsha(String(repeating: "0", count: 40)))?.serverErrorCode, "NOSCRIPT")
    }

    func testCommandTimeoutFailsClearlyClosesConnectionAndClientRecovers() throws {
        let server = try RedisServerProcess(extraArguments: ["--enable-debug-command", "yes"])
        let client = self.client(server)
        defer { _ = try? client.close().wait() }
        XCTAssertEqual(try client.send("PING").wait().string, "PONG")

        // A command stuck behind a slow one: both fail with the timeout.
        let slow = client.send(command: ["DEBUG", "SLEEP", "0.6"], timeout: .milliseconds(100))
        let behind = client.incr("after-sleep")
        let slowError = self.redisError(slow)
        XCTAssertEqual(slowError?.kind, .commandTimeout)
        XCTAssertTrue(slowError?.description.contains("no reply from 127.0.0.1:\(server.port) within 100 ms") ?? false,
                      "\(String(describing: slowError))")
        XCTAssertEqual(self.redisError(behind)?.kind, .commandTimeout)

        // The connection was closed; the next command reconnects.
        XCTAssertEqual(try client.send("PING").wait().string, "PONG")
    }

    func testConnectionRefusedIsAClearErrorThenFailsFastDuringBackoff() throws {
        let port = try refusingPort()
        let client = RedisClient(eventLoop: self.loop, configuration: RedisConfiguration(port: port, maxBackoff: .seconds(30)))
        defer { _ = try? client.close().wait() }
        let first = self.redisError(client.send("PING"))
        XCTAssertEqual(first?.kind, .connectFailed)
        XCTAssertTrue(first?.description.contains("connect to 127.0.0.1:\(port) failed") ?? false, "\(String(describing: first))")
        XCTAssertTrue(first?.description.lowercased().contains("refused") ?? false, "\(String(describing: first))")

        let second = self.redisError(client.send("PING"))
        XCTAssertEqual(second?.kind, .unavailable, "no new connect attempt during the backoff")
        XCTAssertTrue(second?.description.contains("refused") ?? false, "names the last error: \(String(describing: second))")
    }

    func testASlotInBackoffDoesNotFailCommandsAnOpenConnectionCanCarry() throws {
        // maxclients 1 + a password: the second connection's AUTH is refused
        // ("max number of clients reached"), so that slot goes into backoff
        // while the first connection is healthy.
        let server = try RedisServerProcess(password: "pw", extraArguments: ["--maxclients", "1"])
        let client = self.client(server) {
            $0.connectionsPerLoop = 2
            $0.maxBackoff = .seconds(30)
            $0.initialBackoff = .seconds(30)
        }
        defer { _ = try? client.close().wait() }
        XCTAssertEqual(try client.send("PING").wait().string, "PONG", "slot 0 connects")
        let refused = self.redisError(client.send("PING"))
        XCTAssertEqual(refused?.kind, .handshakeFailed, "slot 1: \(String(describing: refused))")
        XCTAssertTrue(refused?.description.contains("max number of clients") ?? false, "\(String(describing: refused))")
        for _ in 0..<10 {
            XCTAssertEqual(try client.send("PING").wait().string, "PONG", "slot 1 is in backoff; slot 0 carries it")
        }
    }

    func testServerKilledMidRunFailsEveryCommandThenClientRecoversAfterRestart() throws {
        let server = try RedisServerProcess()
        let client = self.client(server) {
            $0.initialBackoff = .milliseconds(50)
            $0.maxBackoff = .milliseconds(200)
        }
        defer { _ = try? client.close().wait() }
        XCTAssertEqual(try client.incr("survivor").wait(), 1)

        // Keep a pipeline of blocking commands in flight, then kill the server.
        let inFlight = (0..<50).map { _ in client.send(command: ["BLPOP", "never", "0"]) }
        XCTAssertEqual(try client.eventLoop.submit { client.openConnections }.wait(), 1)
        server.kill()
        for future in inFlight {
            let error = self.redisError(future)
            XCTAssertEqual(error?.kind, .connectionClosed, "\(String(describing: error))")
        }

        // While it is down, commands fail (connect refused or backoff) — never hang.
        for _ in 0..<20 {
            let error = self.redisError(client.incr("survivor"))
            XCTAssertTrue([.connectFailed, .unavailable].contains(error?.kind), "\(String(describing: error))")
        }

        try server.start()
        // Recovers by itself once the backoff (at most 200 ms) has passed.
        var recovered: Int?
        for _ in 0..<100 where recovered == nil {
            recovered = try? client.incr("survivor").wait()
            if recovered == nil { usleep(50_000) }
        }
        XCTAssertEqual(recovered, 1, "fresh server (nothing persisted), same client")
    }

    func testProtocolViolationFromServerClosesTheConnectionWithAClearError() throws {
        // A real socket that answers every command with bytes that are not RESP.
        let serverGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? serverGroup.syncShutdownGracefully() }
        let liar = try ServerBootstrap(group: serverGroup)
            .childChannelInitializer { channel in channel.pipeline.addHandler(AnswerWith("$99999999999\r\n")) }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? liar.close().wait() }
        let client = RedisClient(eventLoop: self.loop, configuration: RedisConfiguration(port: liar.localAddress!.port!))
        defer { _ = try? client.close().wait() }
        let error = self.redisError(client.send("GET", "x"))
        XCTAssertEqual(error?.kind, .protocolError)
        XCTAssertTrue(error?.description.contains("over the limit") ?? false, "\(String(describing: error))")
    }

    func testRegistryGivesOneClientPerLoopAndServer() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { try? group.syncShutdownGracefully() }
        let server = try RedisServerProcess()
        let loops = Array(group.makeIterator())
        let configuration = RedisConfiguration(port: server.port)
        var db1 = configuration
        db1.database = 1

        let onFirst = try loops[0].submit {
            (RedisClients.forLoop(loops[0], configuration), RedisClients.forLoop(loops[0], configuration),
             RedisClients.forLoop(loops[0], db1))
        }.wait()
        XCTAssertTrue(onFirst.0 === onFirst.1, "same loop and server: same client")
        XCTAssertFalse(onFirst.0 === onFirst.2, "another database: another pool")
        let onSecond = try loops[1].submit { RedisClients.forLoop(loops[1], configuration) }.wait()
        XCTAssertFalse(onFirst.0 === onSecond, "each loop has its own client")

        // Each loop's client works on its own loop; both see the same server.
        let a = try loops[0].flatSubmit { RedisClients.forLoop(loops[0], configuration).incr("shared") }.wait()
        let b = try loops[1].flatSubmit { RedisClients.forLoop(loops[1], configuration).incr("shared") }.wait()
        XCTAssertEqual([a, b].sorted(), [1, 2])

        try RedisClients.shutdown(group: group).wait()
        XCTAssertEqual(self.redisError(onSecond.send("PING"))?.kind, .shutDown)
        let fresh = try loops[1].submit { RedisClients.forLoop(loops[1], configuration) }.wait()
        XCTAssertFalse(fresh === onSecond, "shutdown forgot the old clients")
        XCTAssertEqual(try fresh.send("PING").wait().string, "PONG")
        try RedisClients.shutdown(group: group).wait()
    }

    func testCloseFailsLaterCommandsAndClosesConnections() throws {
        let server = try RedisServerProcess()
        let client = self.client(server) { $0.connectionsPerLoop = 3 }
        // Three commands, round-robin over three lazily opened connections.
        _ = try EventLoopFuture.whenAllSucceed((0..<3).map { _ in client.send("PING") }, on: client.eventLoop).wait()
        XCTAssertEqual(try client.eventLoop.submit { client.openConnections }.wait(), 3)
        XCTAssertEqual(Int(try server.cli("INFO", "clients").components(separatedBy: .newlines)
            .first { $0.hasPrefix("connected_clients:") }?.split(separator: ":").last?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? ""), 4, "three of ours plus redis-cli")
        try client.close().wait()
        XCTAssertEqual(try client.eventLoop.submit { client.openConnections }.wait(), 0)
        XCTAssertEqual(self.redisError(client.send("PING"))?.kind, .shutDown)
    }
}

/// Writes a fixed answer for every read (a broken "server").
private final class AnswerWith: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let answer: String
    init(_ answer: String) { self.answer = answer }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: self.answer)), promise: nil)
    }
}
