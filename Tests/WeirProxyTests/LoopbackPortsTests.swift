import Foundation
import NIOCore
import NIOPosix
import WeirCore
import WeirTestSupport
import XCTest

/// The test helpers for loopback ports (WeirTestSupport/LoopbackPorts.swift)
/// against real sockets: a refusing port refuses, and a start that finds its
/// picked port taken is retried on another.
final class LoopbackPortsTests: XCTestCase {
    func testRefusingPortRefusesConnections() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let port = try refusingPort()
        XCTAssertNotEqual(try refusingPort(), port, "each call holds a port of its own")
        XCTAssertThrowsError(try ClientBootstrap(group: group).connect(host: "127.0.0.1", port: port).wait()) { error in
            XCTAssertTrue("\(error)".contains("Connection refused"), "\(error)")
        }
    }

    /// The first pick is taken (by a listener this test binds on it) before
    /// the proxy binds: the proxy's start error is recognised and the next
    /// pick serves.
    func testAStartOnATakenPortIsRetriedOnAnother() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        var picks: [Int] = []
        var squatter: Channel?
        defer { _ = try? squatter?.close().wait() }
        let harness = try withUnusedPort { port -> StreamHarness in
            picks.append(port)
            if picks.count == 1 {
                squatter = try ServerBootstrap(group: group).bind(host: "127.0.0.1", port: port).wait()
            }
            return try StreamHarness(config: StreamHarness.tcpConfig(targets: [HostPort(host: "127.0.0.1", port: 1)]) {
                $0.listeners[0].listen.port = port
            })
        }
        defer { harness.stop() }
        XCTAssertEqual(picks.count, 2)
        XCTAssertEqual(harness.port("tcp"), picks[1])
    }

    func testOtherStartErrorsAreNotRetried() throws {
        struct Refused: Error {}
        var attempts = 0
        XCTAssertThrowsError(try withUnusedPort { _ -> Int in
            attempts += 1
            throw Refused()
        })
        XCTAssertEqual(attempts, 1)
    }
}
