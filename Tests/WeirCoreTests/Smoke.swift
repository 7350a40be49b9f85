import XCTest
final class WeirCoreTestsSmoke: XCTestCase { func testBuilds() { XCTAssertTrue(true) } }
