import NIOCore
import NIOHTTP1
import NIOPosix
import WeirCore
import XCTest
@testable import WeirLua

/// A real HTTP/1.1 origin on loopback: answers with what it received.
final class EchoOrigin {
    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        var head: HTTPRequestHead?
        var body: [UInt8] = []
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h; body = []
            case .body(var b): body += b.readBytes(length: b.readableBytes) ?? []
            case .end:
                guard let head = head else { return }
                if head.uri == "/hang" { return } // never answers: client timeout
                let text = "\(head.method.rawValue) \(head.uri) x-test=\(head.headers["x-test"].joined(separator: ",")) body=\(String(decoding: body, as: UTF8.self))"
                var responseHead = HTTPResponseHead(version: .http1_1, status: head.uri == "/missing" ? .notFound : .ok)
                responseHead.headers.add(name: "content-length", value: String(text.utf8.count))
                responseHead.headers.add(name: "x-origin", value: "echo")
                context.write(wrapOutboundOut(.head(responseHead)), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            }
        }
    }

    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let channel: Channel
    var port: Int { channel.localAddress!.port! }

    init() throws {
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.pipeline.configureHTTPServerPipeline().flatMap { ch.pipeline.addHandler(Handler()) }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }
    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }
}

final class OutboundHTTPTests: XCTestCase {
    func testURLParsing() {
        XCTAssertEqual(OutboundHTTP.parse("http://a.b:8080/x?y=1").map { "\($0.host)|\($0.port)|\($0.target)" }, "a.b|8080|/x?y=1")
        XCTAssertEqual(OutboundHTTP.parse("http://a.b").map { "\($0.host)|\($0.port)|\($0.target)" }, "a.b|80|/")
        XCTAssertEqual(OutboundHTTP.parse("http://[::1]:9/q").map { "\($0.host)|\($0.port)|\($0.target)" }, "::1|9|/q")
        XCTAssertEqual(OutboundHTTP.parse("https://a.b/j").map { "\($0.secure)|\($0.host)|\($0.port)|\($0.target)" }, "true|a.b|443|/j")
        XCTAssertEqual(OutboundHTTP.parse("http://a.b/j")?.secure, false)
        XCTAssertNil(OutboundHTTP.parse("ftp://a.b/"))
        XCTAssertNil(OutboundHTTP.parse("http://a.b:0/"))
    }

    func testRequestFromEveryPhaseAndTimer() throws {
        let origin = try EchoOrigin()
        defer { origin.stop() }
        let h = Harness()
        h.folder.add("caller", handler: """
        local base = "http://127.0.0.1:\(origin.port)"
        local function call(path)
          local res, err = weir.http.request(base .. path, { method = "POST", headers = { ["x-test"] = { "a", "b" } }, body = "hi", timeout = 2 })
          assert(res, err)
          return res.status .. " " .. res.headers["x-origin"] .. " " .. res.body
        end
        return { PRIORITY = 1, VERSION = "1",
          request = function(self, conf, ctx)
            ctx.request = call("/req")
            local missing = weir.http.request(base .. "/missing")
            ctx.missing = missing.status
            local none, err = weir.http.request(base .. "/hang", { timeout = 0.05 })
            ctx.timeout = err
            local bad, berr = weir.http.request("ftp://x")
            ctx.bad = berr
          end,
          response = function(self, conf, ctx) ctx.response = call("/resp") end,
          log = function(self, conf, ctx)
            ctx.log = call("/log")
            weir.log.info(ctx.request, "|", ctx.missing, "|", ctx.timeout, "|", ctx.bad, "|", ctx.response, "|", ctx.log)
            weir.timer.at(0, function() weir.log.info("timer", call("/timer")) end)
          end }
        """)
        try h.load(["caller"])
        let results = try h.runRequest(try h.chain("caller"), phases: [.request, .response, .log])
        XCTAssertEqual(results, [.continue, .continue, .continue])
        let line = h.logs.records.first?.message ?? ""
        XCTAssertEqual(line, "200 echo POST /req x-test=a,b body=hi | 404 | weir.http.request: timed out after 50 ms | invalid url (expected http[s]://host[:port]/path): ftp://x | 200 echo POST /resp x-test=a,b body=hi | 200 echo POST /log x-test=a,b body=hi")
        for _ in 0..<500 where h.logs.records.count < 2 { Thread.sleep(forTimeInterval: 0.01) }
        XCTAssertEqual(h.logs.records.last?.message, "timer 200 echo POST /timer x-test=a,b body=hi")
    }

    func testConnectionRefusedIsAnErrorValue() throws {
        // Bind and close a port so nothing listens there.
        let origin = try EchoOrigin()
        let port = origin.port
        origin.stop()
        let h = Harness()
        h.folder.add("refused", handler: """
        return { PRIORITY = 1, VERSION = "1", request = function()
          local res, err = weir.http.request("http://127.0.0.1:\(port)/")
          return 502, tostring(res) .. " " .. err
        end }
        """)
        try h.load(["refused"])
        let body = try h.runRequest(try h.chain("refused"))[0].exitValue?.bodyString ?? ""
        XCTAssertTrue(body.hasPrefix("nil weir.http.request: cannot connect to 127.0.0.1:\(port)"), body)
    }
}
