// JSON body field operations of plugins/request-transformer and
// plugins/response-transformer through a running proxy; the upstream is a
// ScriptedHTTPServer (it keeps request bodies and answers JSON).

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ShippedPluginJSONBodyTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!
    var upstream: ScriptedHTTPServer!

    static let document = #"{"user":{"name":"ann","password":"p"},"old":1,"keep":"k","list":[],"n":1.5,"secret":"s"}"#

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstream = try ScriptedHTTPServer(group: group) { request in
            switch request.uri {
            case "/json": return ScriptedReply(headers: [("content-type", "application/json; charset=utf-8")], body: Self.document)
            case "/streamed": return ScriptedReply(headers: [("content-type", "application/json")], body: Self.document, chunked: true)
            case "/problem": return ScriptedReply(headers: [("content-type", "application/problem+json")], body: #"{"secret":1,"title":"t"}"#)
            case "/text": return ScriptedReply(headers: [("content-type", "text/plain")], body: #"{"secret":"s"}"#)
            case "/broken": return ScriptedReply(headers: [("content-type", "application/json")], body: #"{"secret": "#)
            case "/array": return ScriptedReply(headers: [("content-type", "application/json")], body: #"[{"secret":1}]"#)
            default: return ScriptedReply(body: "ok")
            }
        }
    }

    override func tearDownWithError() throws {
        upstream.stop()
        try group.syncShutdownGracefully()
    }

    private func start(_ plugins: String) throws -> ShippedPluginProxy {
        let yaml = """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: 127.0.0.1:\(upstream.port) }] }
        routes:
          - name: all
            match: { paths: [/] }
            upstream: backend
            plugins:
        \(plugins)
        access_log: off
        """
        return try ShippedPluginProxy(config: try ConfigLoader.parse(yaml: yaml))
    }

    private func object(_ text: String) throws -> [String: Any] {
        try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], text)
    }

    private static let requestOps = """
          - name: request-transformer
            config:
              remove: { json: [user.password, nothing.here] }
              rename: { json: { old: renamed } }
              replace: { json: { keep: new, absent: 1 } }
              add: { json: { meta.source: gw, keep: not-added, flag: true }, headers: { x-added: "1" } }
    """

    func testRequestBodyFieldsAndContentLength() throws {
        let proxy = try start(Self.requestOps)
        defer { proxy.stop() }
        let response = try proxy.connect().request("POST", "/in", headers: [("content-type", "application/json")],
                                                   body: Self.document)
        XCTAssertEqual(response.status, 200)
        let seen = try XCTUnwrap(upstream.requests.last)
        XCTAssertEqual(seen.header("x-added"), "1", "header ops still apply")
        XCTAssertEqual(seen.header("content-length"), String(seen.body.count), "Content-Length fixed up")
        let doc = try object(seen.bodyText)
        XCTAssertEqual(doc["user"] as? [String: String], ["name": "ann"])
        XCTAssertNil(doc["old"])
        XCTAssertEqual(doc["renamed"] as? Int, 1)
        XCTAssertEqual(doc["keep"] as? String, "new", "replaced; add does not override")
        XCTAssertNil(doc["absent"], "replace only touches present fields")
        XCTAssertEqual(doc["meta"] as? [String: String], ["source": "gw"], "add creates missing parents")
        XCTAssertEqual(doc["flag"] as? Bool, true)
        XCTAssertEqual((doc["list"] as? [Any])?.count, 0, "an empty array stays an array")
        XCTAssertEqual(doc["n"] as? Double, 1.5)
    }

    func testChunkedRequestBodyIsReframedWithLength() throws {
        let proxy = try start(Self.requestOps)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let body = Array(Self.document.utf8)
        let half = body.count / 2
        var text = "POST /chunked HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        text += String(half, radix: 16) + "\r\n" + String(decoding: body[..<half], as: UTF8.self) + "\r\n"
        text += String(body.count - half, radix: 16) + "\r\n" + String(decoding: body[half...], as: UTF8.self) + "\r\n0\r\n\r\n"
        try client.send(text)
        XCTAssertEqual(try client.readResponse().status, 200)
        let seen = try XCTUnwrap(upstream.requests.last)
        XCTAssertNil(seen.header("transfer-encoding"))
        XCTAssertEqual(seen.header("content-length"), String(seen.body.count))
        XCTAssertEqual(try object(seen.bodyText)["renamed"] as? Int, 1)
    }

    /// Not JSON, not an object, not parseable, or over json_max_size: the
    /// body goes upstream byte for byte.
    func testRequestBodiesThatPassUnchanged() throws {
        let proxy = try start(Self.requestOps + "\n          json_max_size: 200")
        defer { proxy.stop() }
        let client = try proxy.connect()
        let big = #"{"old":1,"pad":""# + String(repeating: "x", count: 300) + #""}"#
        let cases: [(String, String)] = [
            ("text/plain", Self.document),
            ("application/json", #"[{"old":1}]"#),
            ("application/json", #"{"old": "#),
            ("application/json", big),
        ]
        for (type, body) in cases {
            XCTAssertEqual(try client.request("POST", "/same", headers: [("content-type", type)], body: body).status, 200)
            XCTAssertEqual(upstream.requests.last?.bodyText, body, "\(type) \(body.prefix(20))")
        }
    }

    private static let responseOps = """
          - name: response-transformer
            config:
              remove: { json: [secret, user.password] }
              add: { json: { served_by: weir }, headers: { x-t: "1" } }
              json_max_size: 400
    """

    func testResponseBodyFields() throws {
        let proxy = try start(Self.responseOps)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let response = try client.request("GET", "/json")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.header("x-t"), "1")
        XCTAssertNil(response.header("content-length"), "re-framed: the length changed")
        let doc = try object(response.bodyText)
        XCTAssertNil(doc["secret"])
        XCTAssertEqual(doc["user"] as? [String: String], ["name": "ann"])
        XCTAssertEqual(doc["served_by"] as? String, "weir")
        XCTAssertEqual((doc["list"] as? [Any])?.count, 0)

        let streamed = try object(try client.request("GET", "/streamed").bodyText)
        XCTAssertNil(streamed["secret"], "a chunked body is held until its end")
        XCTAssertEqual(streamed["served_by"] as? String, "weir")

        let problem = try object(try client.request("GET", "/problem").bodyText)
        XCTAssertNil(problem["secret"], "+json media types are JSON")
        XCTAssertEqual(problem["title"] as? String, "t")
    }

    func testResponseBodiesThatPassUnchanged() throws {
        let proxy = try start(Self.responseOps.replacingOccurrences(of: "json_max_size: 400", with: "json_max_size: 50"))
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/json").bodyText, Self.document, "over json_max_size by Content-Length")
        XCTAssertEqual(try client.request("GET", "/streamed").bodyText, Self.document,
                       "over json_max_size while streaming: what was held is sent, then the rest")
        XCTAssertEqual(try client.request("GET", "/text").bodyText, #"{"secret":"s"}"#, "not JSON")
        XCTAssertEqual(try client.request("GET", "/broken").bodyText, #"{"secret": "#, "not parseable")
        XCTAssertEqual(try client.request("GET", "/array").bodyText, #"[{"secret":1}]"#, "not an object")
    }

    /// Without JSON ops the response-transformer wants no body_filter: the
    /// response keeps the upstream's framing (Content-Length).
    func testHeaderOnlyConfigKeepsFraming() throws {
        let proxy = try start("""
              - { name: response-transformer, config: { add: { headers: { x-t: "1" } } } }
        """)
        defer { proxy.stop() }
        let response = try proxy.connect().request("GET", "/json")
        XCTAssertEqual(response.header("x-t"), "1")
        XCTAssertEqual(response.header("content-length"), String(Self.document.utf8.count))
        XCTAssertEqual(response.bodyText, Self.document)
    }

    func testSchemaRefusesBadValuesWithTheirPath() throws {
        let cases: [(String, String)] = [
            ("{ name: request-transformer, config: { add: { json: { a: [1] } } } }", "routes[0].plugins[0].config.add.json.a"),
            ("{ name: request-transformer, config: { json_max_size: 0 } }", "routes[0].plugins[0].config.json_max_size"),
            ("{ name: request-transformer, config: { append: { json: { a: b } } } }", "routes[0].plugins[0].config.append.json: unknown field"),
            ("{ name: response-transformer, config: { remove: { json: a } } }", "routes[0].plugins[0].config.remove.json"),
            ("{ name: response-transformer, config: { replace: { json: { a: { b: c } } } } }", "routes[0].plugins[0].config.replace.json.a"),
        ]
        for (plugin, expected) in cases {
            XCTAssertThrowsError(try start("      - \(plugin)"), plugin) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(plugin): \(error)")
            }
        }
    }
}
