import XCTest
import WeirCore

final class RequestPathTests: XCTestCase {
    func testNormalPathsAreUnchanged() {
        for path in ["/", "/orders", "/orders/1/items", "/a.b/c..d/.e", "/files/", "/a//b"] {
            XCTAssertEqual(RequestPath.normalize(path), path)
        }
    }

    func testDotSegmentsAreRemoved() {
        XCTAssertEqual(RequestPath.normalize("/public/../admin"), "/admin")
        XCTAssertEqual(RequestPath.normalize("/a/./b/../c"), "/a/c")
        XCTAssertEqual(RequestPath.normalize("/../../etc/passwd"), "/etc/passwd")
        XCTAssertEqual(RequestPath.normalize("/a/b/.."), "/a/")
        XCTAssertEqual(RequestPath.normalize("/a/."), "/a/")
        XCTAssertEqual(RequestPath.normalize("/.."), "/")
    }

    func testEscapes() {
        XCTAssertEqual(RequestPath.normalize("/public/%2e%2E/admin"), "/admin", "encoded dots are dots")
        XCTAssertEqual(RequestPath.normalize("/%7Euser/%41bc"), "/~user/Abc")
        XCTAssertEqual(RequestPath.normalize("/a%2fb"), "/a%2Fb", "an encoded slash stays encoded")
        XCTAssertEqual(RequestPath.normalize("/caf%c3%a9"), "/caf%C3%A9")
        XCTAssertNil(RequestPath.normalize("/bad%2"))
        XCTAssertNil(RequestPath.normalize("/bad%zz"))
        XCTAssertNil(RequestPath.normalize("/nul%00"))
        XCTAssertNil(RequestPath.normalize("relative"))
        XCTAssertNil(RequestPath.normalize(""))
    }

    func testMergeSlashes() {
        XCTAssertEqual(RequestPath.normalize("//a///b/", mergeSlashes: true), "/a/b/")
        XCTAssertEqual(RequestPath.normalize("/a//../b", mergeSlashes: true), "/b")
        XCTAssertEqual(RequestPath.normalize("/a//b"), "/a//b")
    }

    func testNormalizedPathRoutesAsUpstreamWouldServeIt() throws {
        var open = RouteConfig(); open.name = "public"; open.upstream = "u"; open.match.paths = [.prefix("/public")]
        var admin = RouteConfig(); admin.name = "admin"; admin.upstream = "u"; admin.match.paths = [.prefix("/admin")]
        let table = try RouteTable(routes: [open, admin])
        let path = RequestPath.normalize("/public/%2e%2e/admin/users")!
        XCTAssertEqual(table.match(method: "GET", host: "h", path: path, headers: [String: String]())?.route.name, "admin")
    }
}
