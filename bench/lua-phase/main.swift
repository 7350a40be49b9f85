// Lua phase-cost micro-measure: run by hand in release mode, never a test.
//
//   swift run -c release --scratch-path .build-lua weir-lua-bench
//
// Prints ns per operation for: a whole request scope (begin + request phase
// of one no-op plugin + finish), the phase alone, and one
// weir.request.get_header call (measured in a loop inside Lua, minus the
// loop's own cost).
import Foundation
import NIOCore
import NIOPosix
import WeirCore
import WeirLua

final class BenchRequest: PluginRequestContext {
    let loop: EventLoop
    init(loop: EventLoop) { self.loop = loop }
    var requestID = "bench"
    var method = "GET"
    var path = "/"
    var rawQuery: String? = nil
    var scheme = "http"
    var host: String? = "example.com"
    let headers: [(name: String, value: String)] = [("host", "example.com"), ("x-api-key", "secret-key"), ("accept", "*/*")]
    func requestHeader(_ name: String) -> String? {
        for h in headers where h.name == name { return h.value }
        return nil
    }
    func requestHeaders() -> [(name: String, value: String)] { headers }
    func readRequestBody(maxBytes: Int) -> EventLoopFuture<[UInt8]?> { loop.makeSucceededFuture(nil) }
    var clientIP = "127.0.0.1"
    var clientPort = 1
    var consumer: String? = nil
    func authenticate(consumer: String, credential: String?) {}
    func setUpstreamHeader(_ n: String, _ v: String) {}
    func addUpstreamHeader(_ n: String, _ v: String) {}
    func clearUpstreamHeader(_ n: String) {}
    func setUpstreamPath(_ p: String) {}
    func setUpstreamQuery(_ q: String?) {}
    func setUpstreamMethod(_ m: String) {}
    func setUpstreamBody(_ b: [UInt8]) {}
    func setUpstreamTarget(host: String, port: Int) -> Bool { true }
    func setUpstream(named name: String) -> Bool { false }
    func setUpstreamTimeouts(connect: Double?, send: Double?, read: Double?) {}
    func setUpstreamRetries(_ r: Int) {}
    var responseStatus: Int? = 200
    func setResponseStatus(_ s: Int) {}
    func responseHeader(_ n: String) -> String? { nil }
    func responseHeaders() -> [(name: String, value: String)] { [] }
    func setResponseHeader(_ n: String, _ v: String) {}
    func addResponseHeader(_ n: String, _ v: String) {}
    func clearResponseHeader(_ n: String) {}
}

func write(_ path: String, _ text: String) {
    try! FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    try! text.write(toFile: path, atomically: true, encoding: .utf8)
}

let dir = NSTemporaryDirectory() + "weir-lua-bench-\(getpid())"
defer { try? FileManager.default.removeItem(atPath: dir) }
write(dir + "/noop/handler.lua", "return { PRIORITY = 1, VERSION = '1', request = function(self, conf, ctx) end }")
write(dir + "/noop/schema.lua", "return { fields = {} }")
let loops = 1000
write(dir + "/headers/handler.lua", """
local weir = require "weir"
local get_header = weir.request.get_header
return { PRIORITY = 1, VERSION = '1', request = function(self, conf, ctx)
  for i = 1, \(loops) do local v = get_header("x-api-key") end
end }
""")
write(dir + "/headers/schema.lua", "return { fields = {} }")
write(dir + "/emptyloop/handler.lua", """
return { PRIORITY = 1, VERSION = '1', request = function(self, conf, ctx)
  for i = 1, \(loops) do local v = i end
end }
""")
write(dir + "/emptyloop/schema.lua", "return { fields = {} }")

let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let loop = group.next()
let library = try PluginLibrary(names: ["noop", "headers", "emptyloop"], searchPaths: [dir], sdk: try LuaSDK.locate())

func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

let report = try loop.submit { () -> String in
    let runtime = try LuaRuntime(library: library, eventLoop: loop)
    func chain(_ name: String) throws -> PluginChain {
        try runtime.makeChain(try library.configure([PluginRef(name: name)], path: "plugins").get())
    }
    let noop = try chain("noop"), headers = try chain("headers"), emptyLoop = try chain("emptyloop")
    let request = BenchRequest(loop: loop)
    var lines: [String] = []

    func measure(_ label: String, iterations: Int, perIteration: Int = 1, _ body: () -> Void) -> Double {
        for _ in 0..<(iterations / 10) { body() } // warm up
        var best = Double.infinity
        for _ in 0..<5 {
            let t0 = now()
            for _ in 0..<iterations { body() }
            best = min(best, Double(now() - t0) / Double(iterations * perIteration))
        }
        lines.append(label.padding(toLength: 58, withPad: " ", startingAt: 0) + String(format: " %8.1f ns", best))
        return best
    }

    _ = measure("request scope: begin + request phase (1 no-op) + finish", iterations: 200_000) {
        let scope = runtime.beginRequest(request)
        _ = scope.start(.request, chain: noop)
        scope.finish()
    }
    let scope = runtime.beginRequest(request)
    _ = measure("request phase alone (1 no-op plugin)", iterations: 200_000) {
        _ = scope.start(.request, chain: noop)
    }
    let withCalls = measure("phase with \(loops) get_header calls, per call", iterations: 2_000, perIteration: loops) {
        _ = scope.start(.request, chain: headers)
    }
    let loopOnly = measure("phase with an empty \(loops)-step loop, per step", iterations: 2_000, perIteration: loops) {
        _ = scope.start(.request, chain: emptyLoop)
    }
    scope.finish()
    lines.append("=> one weir.request.get_header call".padding(toLength: 58, withPad: " ", startingAt: 0) + String(format: " %8.1f ns", withCalls - loopOnly))
    return lines.joined(separator: "\n")
}.wait()
print(report)
try group.syncShutdownGracefully()
