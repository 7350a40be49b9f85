import XCTest
@testable import WeirCore

final class RouteTableTests: XCTestCase {
    private func route(_ name: String, hosts: [String] = [], paths: [String] = [], methods: [String] = [],
                       headers: [String: [String]] = [:], strip: Bool = false, rewrite: String? = nil) -> RouteConfig {
        var route = RouteConfig()
        route.name = name
        route.upstream = "u"
        route.match.hosts = hosts
        route.match.paths = paths.map { try! PathPattern(parsing: $0) }
        route.match.methods = methods
        route.match.headers = headers.sorted { $0.key < $1.key }.map { HeaderMatch(name: $0.key, values: $0.value) }
        route.stripPath = strip
        route.rewritePath = rewrite
        return route
    }

    private func name(_ table: RouteTable, _ path: String, method: String = "GET", host: String = "example.com",
                      headers: [String: String] = [:]) -> String? {
        table.match(method: method, host: host, path: path, headers: headers)?.route.name
    }

    func testPrefixMatchesOnSegmentBoundaries() throws {
        let table = try RouteTable(routes: [route("orders", paths: ["/orders"]), route("api", paths: ["/api/"])])
        XCTAssertEqual(name(table, "/orders"), "orders")
        XCTAssertEqual(name(table, "/orders/"), "orders")
        XCTAssertEqual(name(table, "/orders/1"), "orders")
        XCTAssertNil(name(table, "/ordersx"))
        XCTAssertNil(name(table, "/order"))
        XCTAssertEqual(name(table, "/api/x"), "api")
        XCTAssertEqual(name(table, "/api/"), "api")
        XCTAssertNil(name(table, "/api"), "a prefix ending in / needs the slash")
        XCTAssertNil(name(table, "/apix"))
    }

    func testPathSpecificity() throws {
        let table = try RouteTable(routes: [
            route("root", paths: ["/"]),
            route("short", paths: ["/a"]),
            route("long", paths: ["/a/b"]),
            route("regex", paths: ["~ ^/a/b/\\d+$"]),
            route("exact", paths: ["= /a/b/42"]),
        ])
        XCTAssertEqual(name(table, "/"), "root")
        XCTAssertEqual(name(table, "/zzz"), "root")
        XCTAssertEqual(name(table, "/a/x"), "short")
        XCTAssertEqual(name(table, "/a/b/c"), "long", "longest prefix wins")
        XCTAssertEqual(name(table, "/a/b/7"), "regex", "regex beats prefix")
        XCTAssertEqual(name(table, "/a/b/42"), "exact", "exact beats regex")
    }

    func testHostSpecificityAndFallback() throws {
        let table = try RouteTable(routes: [
            route("any", paths: ["/"]),
            route("wild", hosts: ["*.example.com"], paths: ["/"]),
            route("deepwild", hosts: ["*.eu.example.com"], paths: ["/"]),
            route("exact", hosts: ["api.example.com"], paths: ["/v1"]),
        ])
        XCTAssertEqual(name(table, "/v1/x", host: "api.example.com"), "exact")
        XCTAssertEqual(name(table, "/v1", host: "API.Example.COM:8443"), "exact", "case-insensitive, port ignored")
        XCTAssertEqual(name(table, "/other", host: "api.example.com"), "wild", "falls back to the wildcard level")
        XCTAssertEqual(name(table, "/", host: "shop.example.com"), "wild")
        XCTAssertEqual(name(table, "/", host: "a.b.example.com"), "wild", "wildcards match any depth")
        XCTAssertEqual(name(table, "/", host: "x.eu.example.com"), "deepwild", "longer suffix wins")
        XCTAssertEqual(name(table, "/", host: "example.com"), "any", "*.example.com does not match the apex")
        XCTAssertEqual(name(table, "/", host: "other.org"), "any")
        XCTAssertEqual(name(table, "/", host: ""), "any")
        XCTAssertEqual(name(table, "/v1", host: "api.example.com."), "exact", "trailing dot ignored")
    }

    func testHostDominatesPath() throws {
        let table = try RouteTable(routes: [
            route("any-exact", paths: ["= /orders"]),
            route("host-root", hosts: ["api.example.com"], paths: ["/"]),
        ])
        XCTAssertEqual(name(table, "/orders", host: "api.example.com"), "host-root")
        XCTAssertEqual(name(table, "/orders", host: "www.example.com"), "any-exact")
    }

    func testMethodsAndHeaders() throws {
        let table = try RouteTable(routes: [
            route("plain", paths: ["/x"]),
            route("post", paths: ["/x"], methods: ["POST"]),
            route("post-v2", paths: ["/x"], methods: ["POST"], headers: ["X-Version": ["2", "3"]]),
            route("beta", paths: ["/x"], headers: ["X-Beta": []]),
            route("only-put", paths: ["/y"], methods: ["PUT"]),
        ])
        XCTAssertEqual(name(table, "/x", method: "GET"), "plain")
        XCTAssertEqual(name(table, "/x", method: "POST"), "post", "more conditions win")
        XCTAssertEqual(name(table, "/x", method: "POST", headers: ["x-version": "3"]), "post-v2")
        XCTAssertEqual(name(table, "/x", method: "POST", headers: ["x-version": "1"]), "post")
        XCTAssertEqual(name(table, "/x", method: "GET", headers: ["x-beta": "anything"]), "beta", "presence-only header")
        XCTAssertNil(name(table, "/y", method: "GET"))
        XCTAssertEqual(name(table, "/y", method: "PUT"), "only-put")
    }

    func testDeclaredOrderBreaksTies() throws {
        let table = try RouteTable(routes: [
            route("first", hosts: ["a.com", "b.com"], paths: ["/p"]),
            route("second", hosts: ["b.com"], paths: ["/p"]),
            route("regex1", paths: ["~ ^/r/"]),
            route("regex2", paths: ["~ ^/r/x"]),
        ])
        XCTAssertEqual(name(table, "/p", host: "b.com"), "first")
        XCTAssertEqual(name(table, "/r/xyz", host: "x.com"), "regex1", "first declared regex wins")
    }

    func testRegexIndexingStillFindsEveryRegex() throws {
        let table = try RouteTable(routes: [
            route("anchored", paths: ["~ ^/users/(\\d+)/posts$"]),
            route("unanchored", paths: ["~ \\.php$"]),
            route("alternation", paths: ["~ ^/(a|b)/z$"]),
            route("optional-char", paths: ["~ ^/items?/\\d+$"]),
            route("case-insensitive", paths: ["~ (?i)^/CaSe$"]),
        ])
        XCTAssertEqual(name(table, "/users/12/posts"), "anchored")
        XCTAssertNil(name(table, "/users/12/posts/x"))
        XCTAssertEqual(name(table, "/deep/dir/index.php"), "unanchored")
        XCTAssertEqual(name(table, "/b/z"), "alternation")
        XCTAssertEqual(name(table, "/item/5"), "optional-char")
        XCTAssertEqual(name(table, "/items/5"), "optional-char")
        XCTAssertEqual(name(table, "/case"), "case-insensitive")
        XCTAssertEqual(RegexIndexing.literalDirectory(of: "^/users/(\\d+)/posts$").map { String(decoding: $0, as: UTF8.self) }, "/users/")
        XCTAssertEqual(RegexIndexing.literalDirectory(of: "^/items?/\\d+$").map { String(decoding: $0, as: UTF8.self) }, "/")
        XCTAssertNil(RegexIndexing.literalDirectory(of: "\\.php$"))
    }

    /// Routes that strip or rewrite the forwarded path, and one that keeps it.
    private func stripAndRewriteRoutes() -> [RouteConfig] {
        [
            route("strip", paths: ["/svc"], strip: true),
            route("strip-slash", paths: ["/api/"], strip: true),
            route("strip-exact", paths: ["= /health"], strip: true),
            route("fixed", paths: ["/old"], rewrite: "/new"),
            route("regex", paths: ["~ ^/u/(\\w+)/p/(\\d+)$"], rewrite: "/posts/$2?user=$1"),
            route("regex-strip", paths: ["~ ^/v\\d+"], strip: true),
            route("keep", paths: ["/keep"]),
        ]
    }

    func testStripPathAndRewrite() throws {
        let table = try RouteTable(routes: stripAndRewriteRoutes())
        func forward(_ path: String) -> String? { table.match(method: "GET", host: "h", path: path, headers: [String: String]())?.forwardPath }
        XCTAssertEqual(forward("/svc"), "/")
        XCTAssertEqual(forward("/svc/a/b"), "/a/b")
        XCTAssertEqual(forward("/api/x"), "/x")
        XCTAssertEqual(forward("/api/"), "/")
        XCTAssertEqual(forward("/health"), "/")
        XCTAssertEqual(forward("/old/anything"), "/new")
        XCTAssertEqual(forward("/u/bob/p/7"), "/posts/7?user=bob")
        XCTAssertEqual(forward("/v2/items"), "/items")
        XCTAssertEqual(forward("/keep/me"), "/keep/me")
    }

    func testRouteIndexAndNoRoutes() throws {
        let table = try RouteTable(routes: [route("a", paths: ["/a"]), route("b", paths: ["/b"])])
        XCTAssertEqual(table.match(method: "GET", host: "h", path: "/b", headers: [String: String]())?.routeIndex, 1)
        let empty = try RouteTable(routes: [])
        XCTAssertNil(empty.match(method: "GET", host: "h", path: "/", headers: [String: String]()))
    }

    /// One table is read by every event loop at once.
    func testConcurrentLookupsAgree() throws {
        let table = try RouteTable(routes: [
            route("a", hosts: ["a.com"], paths: ["/a"]), route("re", paths: ["~ ^/r/(\\d+)$"], rewrite: "/n/$1"),
            route("any", paths: ["/"]),
        ])
        let errors = ManagedCounter()
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            for index in 0..<5000 {
                let none = [String: String]()
                if table.match(method: "GET", host: "A.com", path: "/a/\(index)", headers: none)?.route.name != "a" { errors.add() }
                if table.match(method: "GET", host: "x", path: "/r/\(worker)", headers: none)?.forwardPath != "/n/\(worker)" { errors.add() }
                if table.match(method: "GET", host: "x", path: "/zzz", headers: none)?.route.name != "any" { errors.add() }
            }
        }
        XCTAssertEqual(errors.value, 0)
    }

    func testInvalidRegexThrows() {
        XCTAssertThrowsError(try RouteTable(routes: [route("bad", paths: ["~ ^/(x"])])) { error in
            XCTAssertTrue("\(error)".contains("routes[0].match.paths[0]"), "\(error)")
        }
    }

    func testNonASCIIAndLongPaths() throws {
        let table = try RouteTable(routes: [route("uni", paths: ["/café"]), route("root", paths: ["/"])])
        XCTAssertEqual(name(table, "/café/menu"), "uni")
        let long = "/" + Array(repeating: "seg", count: 500).joined(separator: "/")
        XCTAssertEqual(name(table, long), "root")
        // A non-contiguous (bridged) string goes through the slow path and still matches.
        let bridged = ("/café/x" as NSString) as String
        XCTAssertEqual(name(table, bridged), "uni")
    }

    /// The compiled table agrees with a straightforward reference matcher
    /// on a few thousand random routes and requests.
    func testAgreesWithReferenceMatcher() throws {
        try assertAgreesWithReferenceMatcher(hostRoutes: true)
    }

    /// A table where no route names a host skips the host entirely; the
    /// answers stay the reference's for any host, odd ones included.
    func testHostlessTableAgreesWithReferenceMatcher() throws {
        try assertAgreesWithReferenceMatcher(hostRoutes: false)
    }

    private func assertAgreesWithReferenceMatcher(hostRoutes: Bool) throws {
        var rng = SplitMix64(seed: 42)
        func pick<T>(_ items: [T]) -> T { items[Int(rng.next(below: UInt64(items.count)))] }
        let hosts = ["a.com", "b.com", "*.a.com", "*.com"]
        let segments = ["x", "y", "z", "orders", "1"]
        var routes: [RouteConfig] = []
        for index in 0..<400 {
            let depth = Int(rng.next(below: 3)) + 1
            let path = "/" + (0..<depth).map { _ in pick(segments) }.joined(separator: "/")
            let kind = rng.next(below: 10)
            let pattern = kind < 2 ? "= " + path : kind < 3 ? "~ ^\(path)/\\d+$" : (kind < 4 ? path + "/" : path)
            let hostList = !hostRoutes || rng.next(below: 2) == 0 ? [] : [pick(hosts)]
            let methods = rng.next(below: 4) == 0 ? [pick(["GET", "POST"])] : []
            routes.append(route("r\(index)", hosts: hostList, paths: [pattern], methods: methods))
        }
        let table = try RouteTable(routes: routes)
        for _ in 0..<3000 {
            let depth = Int(rng.next(below: 4)) + 1
            let path = "/" + (0..<depth).map { _ in pick(segments) }.joined(separator: "/") + (rng.next(below: 3) == 0 ? "/" : "")
            // (The reference compares hosts as given: odd spellings only where no route names one.)
            let host = pick(["a.com", "q.a.com", "b.com", "c.org", "z.com"] + (hostRoutes ? [] : ["", "[::1]:8080", "A.COM.:80"]))
            let method = pick(["GET", "POST"])
            let expected = ReferenceMatcher.match(routes, method: method, host: host, path: path)
            XCTAssertEqual(table.match(method: method, host: host, path: path, headers: [String: String]())?.routeIndex, expected,
                           "\(method) \(host) \(path)")
            XCTAssertEqual(byBytes(table, method: method, host: host, path: path)?.routeIndex, expected, "bytes: \(method) \(host) \(path)")
        }
    }

    /// `matchIndex(pathBytes:)` (the data path's usual target, routed as
    /// bytes) picks the route the String lookup picks and forwards the
    /// same path: `.asReceived` exactly when the String lookup returns the
    /// path it was given unchanged by strip/rewrite.
    func testBytesLookupAgreesWithStringLookup() throws {
        let table = try RouteTable(routes: stripAndRewriteRoutes() + [
            route("regex-keep", hosts: ["r.example"], paths: ["~ ^/r/\\d+$"]),
            route("host", hosts: ["*.example.com"], paths: ["/"]),
            route("post", paths: ["/keep/post"], methods: ["POST"]),
        ])
        let paths = ["/svc", "/svc/a/b", "/svcx", "/api/x", "/api/", "/health", "/old/anything", "/u/bob/p/7",
                     "/v2/items", "/v2", "/keep/me", "/keep/post", "/r/12", "/r/x", "/", "/nothing", "/café"]
        for host in ["h", "a.example.com", "r.example", "R.Example:8080"] {
            for method in ["GET", "POST"] {
                for path in paths {
                    let string = table.matchIndex(method: method, host: host, path: path, headers: [String: String]())
                    let bytes = byBytes(table, method: method, host: host, path: path)
                    XCTAssertEqual(bytes?.routeIndex, string?.routeIndex, "\(method) \(host) \(path)")
                    switch bytes?.forwardPath {
                    case .asReceived?: XCTAssertEqual(string?.forwardPath, path, "\(method) \(host) \(path)")
                    case .rewritten(let forward)?: XCTAssertEqual(string?.forwardPath, forward, "\(method) \(host) \(path)")
                    case nil: XCTAssertNil(string)
                    }
                }
            }
        }
        XCTAssertEqual(byBytes(table, method: "GET", host: "h", path: "/svc/a")?.forwardPath, .rewritten("/a"))
        XCTAssertEqual(byBytes(table, method: "GET", host: "h", path: "/keep/me")?.forwardPath, .asReceived)
        XCTAssertEqual(byBytes(table, method: "GET", host: "r.example", path: "/r/12")?.forwardPath, .asReceived)
        XCTAssertEqual(byBytes(table, method: "GET", host: "h", path: "/u/bob/p/7")?.forwardPath, .rewritten("/posts/7?user=bob"))
    }

    private func byBytes(_ table: RouteTable, method: String, host: String, path: String) -> (routeIndex: Int, forwardPath: ForwardPath)? {
        let bytes = Array(path.utf8)
        return bytes.withUnsafeBufferPointer { table.matchIndex(method: method, host: host, pathBytes: $0, headers: [String: String]()) }
    }
}

/// The specificity rules written out as a linear scan, for cross-checking.
private enum ReferenceMatcher {
    static func match(_ routes: [RouteConfig], method: String, host: String, path: String) -> Int? {
        typealias Rank = (host: Int, path: Int, length: Int, conditions: Int, order: Int)
        var best: Rank?
        for (index, route) in routes.enumerated() {
            if !route.match.methods.isEmpty && !route.match.methods.contains(method) { continue }
            var hostRank = -1
            if route.match.hosts.isEmpty { hostRank = 0 }
            for pattern in route.match.hosts {
                if pattern == host { hostRank = max(hostRank, 1000) }
                else if pattern.hasPrefix("*."), host.hasSuffix(String(pattern.dropFirst())) { hostRank = max(hostRank, pattern.count) }
            }
            if hostRank < 0 { continue }
            var pathRank: (Int, Int)?
            for pattern in route.match.paths {
                switch pattern {
                case .exact(let p) where p == path: pathRank = (3, 0)
                case .regex(let r) where path.range(of: r, options: .regularExpression) != nil:
                    if pathRank == nil || pathRank! < (2, 0) { pathRank = (2, 0) }
                case .prefix(let p):
                    let ok = p.hasSuffix("/") ? path.hasPrefix(p) : (path == p || path.hasPrefix(p + "/"))
                    if ok, pathRank == nil || pathRank! < (1, p.count) { pathRank = (1, p.count) }
                default: break
                }
            }
            guard let (pathKind, length) = pathRank else { continue }
            let rank: Rank = (hostRank, pathKind, pathKind == 1 ? length : 0, route.match.methods.isEmpty ? 0 : 1, -index)
            if best == nil || rank > best! { best = rank }
        }
        return best.map { -$0.order }
    }
}

private final class ManagedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.lock(); count += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}
