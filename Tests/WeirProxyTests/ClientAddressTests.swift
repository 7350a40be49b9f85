import NIOCore
import XCTest
@testable import WeirProxy

/// The client address text the proxy forwards (X-Forwarded-For) is what
/// NIO's inet_ntop-based `ipAddress` gives, for every IPv4 octet width.
final class ClientAddressTests: XCTestCase {
    func testIPv4TextMatchesNIO() throws {
        for ip in ["0.0.0.0", "127.0.0.1", "1.2.3.4", "10.20.30.40", "99.100.101.255", "192.168.0.9", "255.255.255.255"] {
            let address = try SocketAddress(ipAddress: ip, port: 80)
            XCTAssertEqual(address.clientIPText, ip)
            XCTAssertEqual(address.clientIPText, address.ipAddress)
        }
    }

    func testOtherFamiliesFallBackToNIO() throws {
        let v6 = try SocketAddress(ipAddress: "::1", port: 80)
        XCTAssertEqual(v6.clientIPText, v6.ipAddress)
        XCTAssertEqual(v6.clientIPText, "::1")
    }
}
