// Round trips per second of INCR through one WeirRedis client on one event
// loop, to set beside `redis-benchmark -t incr -c 1 -P 1` and `-P 16`.
// A measurement, never a test. Run by bench/redis-client/run.sh, or:
//   weir-redis-bench --port 6379 [--requests 100000] [--mode sequential|batch16|window16|window256]
import Dispatch
import Foundation
import NIOCore
import NIOPosix
import WeirRedis

var port = 6379
var requests = 100_000
var modes = ["sequential", "batch16", "window16", "window256"]
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let argument = arguments.next() {
    switch argument {
    case "--port": port = Int(arguments.next() ?? "") ?? port
    case "--requests": requests = Int(arguments.next() ?? "") ?? requests
    case "--mode": modes = [arguments.next() ?? ""]
    default:
        FileHandle.standardError.write(Data("usage: weir-redis-bench [--port N] [--requests N] [--mode M]\n".utf8))
        exit(2)
    }
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let loop = group.next()
let client = RedisClient(eventLoop: loop, configuration: RedisConfiguration(port: port, commandTimeout: .seconds(5)))

/// Keeps `depth` INCRs in flight (a new one as each reply arrives) until
/// `requests` replies are in; returns elapsed seconds. depth 1 = sequential.
func window(depth: Int, key: String, requests: Int = requests) throws -> Double {
    let done = loop.makePromise(of: Void.self)
    let start = DispatchTime.now().uptimeNanoseconds
    try loop.flatSubmit { () -> EventLoopFuture<Void> in
        var sent = 0
        var received = 0
        func sendOne() {
            sent += 1
            client.incr(key).whenComplete { result in
                if case .failure(let error) = result { done.fail(error); return }
                received += 1
                if received == requests { done.succeed(()) } else if sent < requests { sendOne() }
            }
        }
        for _ in 0..<min(depth, requests) { sendOne() }
        return done.futureResult
    }.wait()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}

/// Like redis-benchmark -P N: write N commands, wait for all N replies, repeat.
func batches(of size: Int, key: String) throws -> Double {
    let done = loop.makePromise(of: Void.self)
    let start = DispatchTime.now().uptimeNanoseconds
    try loop.flatSubmit { () -> EventLoopFuture<Void> in
        var remaining = requests
        func batch() {
            let count = min(size, remaining)
            remaining -= count
            let futures = (0..<count).map { _ in client.incr(key) }
            EventLoopFuture.whenAllSucceed(futures, on: loop).whenComplete { result in
                if case .failure(let error) = result { done.fail(error); return }
                if remaining == 0 { done.succeed(()) } else { batch() }
            }
        }
        batch()
        return done.futureResult
    }.wait()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}

func report(_ name: String, _ seconds: Double) {
    let padded = name.padding(toLength: 34, withPad: " ", startingAt: 0)
    print(padded + String(format: " %9.0f req/s  (%d in %.2f s)", Double(requests) / seconds, requests, seconds))
}

_ = try client.send("PING").wait()  // connect outside the timing
_ = try window(depth: 1, key: "bench:warmup", requests: min(requests, 2_000))
for mode in modes {
    switch mode {
    case "sequential": report("weir sequential (-P 1 -c 1)", try window(depth: 1, key: "bench:seq"))
    case "batch16": report("weir batches of 16 (-P 16 -c 1)", try batches(of: 16, key: "bench:p16"))
    case "window16": report("weir window of 16 in flight", try window(depth: 16, key: "bench:w16"))
    case "window256": report("weir window of 256 in flight", try window(depth: 256, key: "bench:w256"))
    default:
        FileHandle.standardError.write(Data("unknown mode \(mode)\n".utf8))
        exit(2)
    }
}
_ = try client.close().wait()
try group.syncShutdownGracefully()
