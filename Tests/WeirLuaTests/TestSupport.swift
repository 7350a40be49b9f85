import Foundation
import NIOCore
import NIOPosix
import WeirCore
import XCTest
@testable import WeirLua

/// An in-memory request, as the proxy will present one: the plugin runtime
/// under test is real; this stands in for the HTTP layer that is not wired yet.
final class TestRequest: PluginRequestContext {
    let eventLoop: EventLoop
    var requestID = "req-1"
    var method = "GET"
    var path = "/orders"
    var rawQuery: String? = "a=1&b=two&b=three&flag"
    var scheme = "http"
    var host: String? = "api.example.com"
    var headers: [(name: String, value: String)] = [("host", "api.example.com"), ("x-api-key", "secret"), ("accept", "a"), ("accept", "b")]
    var body: [UInt8]? = Array("hello body".utf8)
    var clientIP = "10.0.0.7"
    var clientPort = 51234
    var consumer: String?
    var credential: String?
    var upstreamHeaders: [(String, String)] = []
    var clearedUpstreamHeaders: [String] = []
    var upstreamPath: String?
    var upstreamQuery: String??
    var upstreamMethod: String?
    var upstreamBody: [UInt8]?
    var upstreamTarget: (String, Int)?
    var upstreamName: String?
    var knownUpstreams: Set<String> = ["orders", "billing"]
    var timeouts: (Double?, Double?, Double?)?
    var retries: Int?
    var responseStatus: Int? = 200
    var response: [(name: String, value: String)] = [("content-type", "text/plain")]

    init(eventLoop: EventLoop) { self.eventLoop = eventLoop }

    func requestHeader(_ name: String) -> String? { headers.first { $0.name == name }?.value }
    func requestHeaders() -> [(name: String, value: String)] { headers }
    func readRequestBody(maxBytes: Int) -> EventLoopFuture<[UInt8]?> {
        // Arrives a little later, as a body from the network would.
        let body = self.body.map { Array($0.prefix(maxBytes)) }
        return eventLoop.scheduleTask(in: .milliseconds(5)) { body }.futureResult
    }
    func authenticate(consumer: String, credential: String?) { self.consumer = consumer; self.credential = credential }
    func setUpstreamHeader(_ n: String, _ v: String) { upstreamHeaders.removeAll { $0.0 == n }; upstreamHeaders.append((n, v)) }
    func addUpstreamHeader(_ n: String, _ v: String) { upstreamHeaders.append((n, v)) }
    func clearUpstreamHeader(_ n: String) { upstreamHeaders.removeAll { $0.0 == n }; clearedUpstreamHeaders.append(n) }
    func setUpstreamPath(_ p: String) { upstreamPath = p }
    func setUpstreamQuery(_ q: String?) { upstreamQuery = .some(q) }
    func setUpstreamMethod(_ m: String) { upstreamMethod = m }
    func setUpstreamBody(_ b: [UInt8]) { upstreamBody = b }
    func setUpstreamTarget(host: String, port: Int) -> Bool { upstreamTarget = (host, port); return true }
    func setUpstream(named name: String) -> Bool {
        guard knownUpstreams.contains(name) else { return false }
        upstreamName = name; return true
    }
    func setUpstreamTimeouts(connect: Double?, send: Double?, read: Double?) { timeouts = (connect, send, read) }
    func setUpstreamRetries(_ r: Int) { retries = r }
    func setResponseStatus(_ s: Int) { responseStatus = s }
    func responseHeader(_ n: String) -> String? { response.first { $0.name == n }?.value }
    func responseHeaders() -> [(name: String, value: String)] { response }
    func setResponseHeader(_ n: String, _ v: String) { response.removeAll { $0.name == n }; response.append((n, v)) }
    func addResponseHeader(_ n: String, _ v: String) { response.append((n, v)) }
    func clearResponseHeader(_ n: String) { response.removeAll { $0.name == n } }
}

final class TestConnection: PluginConnectionContext {
    var connectionID = "conn-1"
    var clientIP = "10.0.0.9"
    var clientPort = 40000
    var serverName: String? = "api.example.com"
}

/// Writes plugins into a fresh temporary folder.
final class PluginFolder {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "weir-lua-tests-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }

    @discardableResult
    func add(_ name: String, handler: String, schema: String? = "return { fields = {} }") -> String {
        let dir = path + "/" + name
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try! handler.write(toFile: dir + "/handler.lua", atomically: true, encoding: .utf8)
        if let schema = schema { try! schema.write(toFile: dir + "/schema.lua", atomically: true, encoding: .utf8) }
        return dir
    }
}

/// Collects weir.log records (thread-safe).
final class LogCollector: @unchecked Sendable {
    private let lock = NSLock()
    private var _records: [PluginLogRecord] = []
    var records: [PluginLogRecord] { lock.lock(); defer { lock.unlock() }; return _records }
    func append(_ r: PluginLogRecord) { lock.lock(); _records.append(r); lock.unlock() }
}

/// One event loop, one runtime, and helpers to run phases synchronously
/// from the test thread (each call hops onto the loop).
final class Harness {
    static let sdk = try! LuaSDK.locate()
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var loop: EventLoop { group.next() }
    let folder = PluginFolder()
    let logs = LogCollector()
    var runtime: LuaRuntime!
    var library: PluginLibrary!
    var options = LuaRuntimeOptions()

    init() {
        let logs = self.logs
        options.log = { logs.append($0) }
        options.shared = SharedDictionaries(capacities: ["counters": 100, "tiny": 2])
    }
    // The last reference may be dropped on the loop itself (closures capture
    // the harness), where a synchronous shutdown is not allowed.
    //
    // The runtime's timers are stopped on the loop first. Otherwise the
    // runtime's deinit cancels them from this thread while the loop is
    // closing: the cancel takes the task out of the queue the closing loop
    // would fail, and its promise's failure needs a hop onto the loop that a
    // closing loop refuses, so NIO crashes on a leaked promise ("Cannot
    // schedule tasks on an EventLoop that has already shut down", then
    // "leaking promise created at SelectableEventLoop.swift:354"; seen once
    // in SDKExportTests.testMetricsCountAndBatchQueue, whose weir.batch
    // queue keeps an every-timer).
    deinit {
        if let runtime {
            let loop = self.loop
            if loop.inEventLoop { runtime.stopTimers() } else { try? loop.submit { runtime.stopTimers() }.wait() }
        }
        group.shutdownGracefully { _ in }
    }

    /// Loads the named plugins from the folder into a runtime on the loop.
    func load(_ names: [String]) throws {
        library = try PluginLibrary(names: names, searchPaths: [folder.path], sdk: Harness.sdk)
        let options = self.options
        let library = self.library!
        runtime = try loop.submit { try LuaRuntime(library: library, eventLoop: self.loop, options: options) }.wait()
    }

    func chain(_ refs: [PluginRef]) throws -> PluginChain {
        let configured = try library.configure(refs, path: "plugins").get()
        return try loop.submit { try self.runtime.makeChain(configured) }.wait()
    }

    func chain(_ names: String...) throws -> PluginChain {
        try chain(names.map { PluginRef(name: $0) })
    }

    func newRequest() -> TestRequest { TestRequest(eventLoop: loop) }

    func begin(_ request: TestRequest) -> PluginRequest {
        try! loop.submit { self.runtime.beginRequest(request) }.wait()
    }

    func run(_ scope: PluginRequest, _ phase: PluginPhase, _ chain: PluginChain) throws -> PhaseResult {
        try loop.flatSubmit { scope.run(phase, chain: chain) }.wait()
    }

    /// Runs one whole request through the given phases and finishes it.
    func runRequest(_ chain: PluginChain, phases: [PluginPhase] = [.request], request: TestRequest? = nil) throws -> [PhaseResult] {
        let req = request ?? newRequest()
        let scope = begin(req)
        var results: [PhaseResult] = []
        for phase in phases { results.append(try run(scope, phase, chain)) }
        try loop.submit { scope.finish() }.wait()
        return results
    }

    func onLoop<T>(_ body: @escaping () throws -> T) throws -> T { try loop.submit(body).wait() }

    /// On the loop: runs `warmup` requests through the request phase of
    /// `chain`, then `count` more, and returns how many bytes the Lua heap
    /// grew by over those (each measured after a full collection). Request
    /// i carries `x-n: i`; `check` sees each one's result.
    func heapGrowth(warmup: Int, count: Int, chain: PluginChain,
                    check: @escaping (Int, PhaseResult) -> Void = { _, _ in }) throws -> Int {
        try onLoop {
            func run(_ range: Range<Int>) {
                for i in range {
                    let req = self.newRequest()
                    req.headers.append(("x-n", "\(i)"))
                    let scope = self.runtime.beginRequest(req)
                    guard case .done(let result) = scope.start(.request, chain: chain) else {
                        return XCTFail("request \(i) did not end in its request phase")
                    }
                    check(i, result)
                    scope.finish()
                }
            }
            run(0..<warmup)
            self.runtime.state.collectGarbage()
            let baseline = self.runtime.state.bytesUsed
            run(warmup..<(warmup + count))
            self.runtime.state.collectGarbage()
            return self.runtime.state.bytesUsed - baseline
        }
    }
}

extension PhaseResult {
    var failure: PluginFailure? { if case .failed(let f) = self { return f }; return nil }
    var exitValue: PluginExit? { if case .exit(let e) = self { return e }; return nil }
}
