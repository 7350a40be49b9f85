import XCTest
final class WeirLuaTestsSmoke: XCTestCase { func testBuilds() { XCTAssertTrue(true) } }
