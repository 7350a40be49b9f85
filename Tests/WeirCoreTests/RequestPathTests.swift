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

    /// `isNormal` (the data path's check before routing a target by its
    /// bytes) and `normalizeReportingChange` agree with `normalize`.
    func testIsNormalAndReportedChangeAgreeWithNormalize() {
        let paths = ["/", "/orders", "/orders/1/items", "/a.b/c..d/.e", "/files/", "/a//b", "/public/../admin", "/a/./b",
                     "/a/b/..", "/a/.", "/..", "/.", "/%7Euser", "/a%2fb", "/%41", "/bad%2", "/nul%00", "relative", "",
                     "/...", "/a/...", "//a///b/", "/a/b/c/"]
        for path in paths {
            for merge in [false, true] {
                let normalized = RequestPath.normalize(path, mergeSlashes: merge)
                let reported = RequestPath.normalizeReportingChange(path, mergeSlashes: merge)
                XCTAssertEqual(reported?.path, normalized, path)
                XCTAssertEqual(reported?.changed, normalized.map { $0 != path }, path)
                let normal = Array(path.utf8).withUnsafeBufferPointer { RequestPath.isNormal($0, mergeSlashes: merge) }
                // Normal bytes normalize to themselves; escapes always take the String path.
                if normal { XCTAssertEqual(normalized, path, "\(path) merge: \(merge)") }
                if !path.contains("%") { XCTAssertEqual(normal, normalized == path, "\(path) merge: \(merge)") }
            }
        }
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
