import ArgumentParser
import Foundation
import NIOCore
import NIOPosix
import WeirAdmin
import WeirCore

struct DemoUpstreamCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo-upstream",
        abstract: "Run a small HTTP/1.1 origin for trying out and testing the gateway.",
        discussion: """
            GET /healthz -> 200 ok; /echo -> the request as JSON; /status/<code> -> that status;
            /delay/<ms> -> the fixed body after a delay; anything else -> a fixed body of --body-size bytes.
            """
    )

    @Option(help: "Address to listen on (host:port).")
    var listen: String = "127.0.0.1:9001"

    @Option(help: "Size in bytes of the fixed response body.")
    var bodySize: Int = 1024

    @Option(help: "Event loop threads.")
    var workers: Int = 1

    func validate() throws {
        guard bodySize >= 0 else { throw ValidationError("--body-size must be 0 or more") }
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
        guard parseHostPort(listen) != nil else {
            throw ValidationError("--listen must be host:port, e.g. 127.0.0.1:9001 (got \"\(listen)\")")
        }
    }

    func run() throws {
        SignalWatcher.blockBeforeStartingThreads(SignalWatcher.terminationSignals)
        let address = parseHostPort(listen)!
        let group = MultiThreadedEventLoopGroup(numberOfThreads: workers)
        let server = DemoUpstream(listen: address, bodySize: bodySize, group: group)
        do {
            try server.start().wait()
        } catch {
            FileHandle.standardError.write(Data("demo-upstream: cannot listen on \(listen): \(error)\n".utf8))
            throw ExitCode(1)
        }
        print("demo-upstream listening on \(server.boundAddress.map(hostPortText) ?? listen)")
        fflush(stdout) // stdout is a pipe under `make run`: show the line now
        let stop = SignalWatcher.onTermination { _ in _ = server.stop() }
        try server.closeFuture?.wait()
        stop.cancel()
        try? group.syncShutdownGracefully()
    }
}

/// `127.0.0.1:9001`, `[::1]:9001` or `localhost:9001`.
func parseHostPort(_ text: String) -> HostPort? {
    guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
          (0...65535).contains(port) else { return nil }
    var host = String(text[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    guard !host.isEmpty else { return nil }
    return HostPort(host: host, port: port)
}
