import Foundation
import NIOCore
import NIOPosix
@testable import WeirRedis
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Servers that never answer: a listener whose accept queue is full (the
/// TCP connect itself stalls) and one that accepts but never replies (the
/// AUTH handshake stalls). Both must end in a clear error, never a hang.
final class RedisConnectTimeoutTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!

    override func setUp() {
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDownWithError() throws {
        try self.group.syncShutdownGracefully()
    }

    func testConnectTimeoutWhenTheListenerNeverCompletesTheHandshake() throws {
        let listener = try FullBacklogListener(group: self.group)
        defer { listener.close() }
        guard listener.isStalled else {
            throw XCTSkip("this kernel still completed connects to a full backlog; cannot stall a connect here")
        }
        let client = RedisClient(eventLoop: self.group.next(),
                                 configuration: RedisConfiguration(port: listener.port, connectTimeout: .milliseconds(200)))
        defer { _ = try? client.close().wait() }
        guard let result = waitWithoutHanging(client.send("PING")) else { return }
        guard case .failure(let error as RedisError) = result else {
            return XCTFail("expected a RedisError, got \(result)")
        }
        XCTAssertEqual(error.kind, .connectTimeout)
        XCTAssertTrue(error.description.contains("timed out after 200 ms"), error.description)
    }

    func testHandshakeThatGetsNoReplyTimesOut() throws {
        // Accepts and reads, never writes.
        let silent = try ServerBootstrap(group: self.group)
            .childChannelInitializer { $0.eventLoop.makeSucceededVoidFuture() }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? silent.close().wait() }
        let client = RedisClient(eventLoop: self.group.next(),
                                 configuration: RedisConfiguration(port: silent.localAddress!.port!, password: "pw",
                                                                   commandTimeout: .milliseconds(150)))
        defer { _ = try? client.close().wait() }
        guard let result = waitWithoutHanging(client.send("PING")) else { return }
        guard case .failure(let error as RedisError) = result else {
            return XCTFail("expected a RedisError, got \(result)")
        }
        XCTAssertEqual(error.kind, .commandTimeout, error.description)
    }
}

/// A loopback listener (backlog 0) that never accepts, with its accept queue
/// filled so that further connects get no SYN-ACK and stall.
private final class FullBacklogListener {
    let port: Int
    private let fd: Int32
    private var fillers: [Channel] = []
    /// True when a probe connect timed out, i.e. the queue is really full.
    private(set) var isStalled = false

    init(group: EventLoopGroup) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 0) == 0 else {
            Glibc.close(fd)
            throw NSError(domain: "FullBacklogListener", code: Int(errno))
        }
        var actual = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: actual.sin_port))
        // Connect until one attempt times out: from then on the queue is full.
        for _ in 0..<8 {
            let attempt = ClientBootstrap(group: group).connectTimeout(.milliseconds(300))
                .connect(host: "127.0.0.1", port: self.port)
            do {
                self.fillers.append(try attempt.wait())
            } catch ChannelError.connectTimeout {
                self.isStalled = true
                break
            }
        }
    }

    func close() {
        for filler in self.fillers { try? filler.close().wait() }
        Glibc.close(self.fd)
    }
}
