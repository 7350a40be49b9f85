import Foundation
import WeirTestSupport
import XCTest

/// The test helper that starts redis-server: it must never mistake another
/// server on its port for its own (the PING it used to wait for would be
/// answered by whoever holds the port).
final class RedisServerProcessTests: XCTestCase {
    override func setUpWithError() throws {
        try XCTSkipUnless(RedisServerProcess.isAvailable, "redis-server not installed (make deps)")
    }

    func testAPortAnotherServerHoldsIsReportedAsTakenNotAsReady() throws {
        let first = try RedisServerProcess()
        try first.cli("SET", "owner", "first")
        XCTAssertThrowsError(try RedisServerProcess(port: first.port)) { error in
            let failure = error as? RedisServerProcess.StartFailure
            XCTAssertEqual(failure?.portTaken, true, "\(error)")
        }
        XCTAssertEqual(try first.cli("GET", "owner"), "first", "the first server is untouched")
    }

    func testRestartComesBackOnTheSamePort() throws {
        let server = try RedisServerProcess()
        let port = server.port
        try server.restart()
        XCTAssertEqual(server.port, port)
        XCTAssertEqual(try server.cli("PING"), "PONG")
    }
}
