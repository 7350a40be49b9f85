import XCTest
final class WeirProxyTestsSmoke: XCTestCase { func testBuilds() { XCTAssertTrue(true) } }
