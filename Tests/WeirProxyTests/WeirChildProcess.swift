import Foundation
import NIOConcurrencyHelpers
import XCTest

/// A `weir run` child process whose log (stderr) is collected while it runs.
///
/// Why: picking a "free" port in the test (bind 0, close) and handing it to
/// the child races with every other socket on the machine — any outgoing
/// connection may take that ephemeral port before the child binds it, and
/// the child then exits with "address in use". With its stderr discarded,
/// that showed up only as a 10 s "admin /ready" timeout on a busy machine.
/// So configs listen on port 0, and the test reads the ports the child
/// actually bound from its "listening" log lines; waits end on the log
/// line (or the child's exit), and every failure quotes the log.
final class WeirChildProcess {
    let process: Process
    /// stderr so far, and whether it reached its end (the child exited).
    private let log = NIOLockedValueBox((text: "", ended: false))

    /// Starts `weir` with `arguments` and waits until it logs `readyLine`
    /// ("weir started": its admin /ready answers 200 from then on). Throws,
    /// quoting the log, when the child exits first or `timeout` seconds pass.
    /// `standardOutput`: where the access log (stdout by default) goes.
    init(_ arguments: [String], standardOutput: Any = FileHandle.nullDevice, readyLine: String = "weir started",
         timeout: TimeInterval = 60) throws {
        process = Process()
        process.executableURL = try CLITests.weirBinary()
        process.arguments = arguments
        let stderrPipe = Pipe()
        process.standardError = stderrPipe
        process.standardOutput = standardOutput
        try process.run()
        // Drained for the child's whole life: a full pipe would block its logging.
        let handle = stderrPipe.fileHandleForReading
        let log = self.log
        Thread.detachNewThread {
            while true {
                let chunk = handle.availableData   // empty at EOF: the child exited
                if chunk.isEmpty { break }
                log.withLockedValue { $0.text += String(decoding: chunk, as: UTF8.self) }
            }
            log.withLockedValue { $0.ended = true }
        }
        try waitForLog(readyLine, timeout: timeout)
    }

    /// Everything the child logged so far.
    var logText: String { log.withLockedValue { $0.text } }
    private var logEnded: Bool { log.withLockedValue { $0.ended } }

    /// Waits until the log contains `needle`; throws (with the log) if the
    /// child exits without logging it or `timeout` seconds pass.
    func waitForLog(_ needle: String, timeout: TimeInterval = 60) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while !logText.contains(needle) {
            // The end of the log (not just the exit) so the message quotes all of it.
            if logEnded {
                process.waitUntilExit()
                throw Failure(description: "weir exited (status \(process.terminationStatus)) without logging "
                    + "\"\(needle)\"; its log:\n\(logText)")
            }
            guard Date() < deadline else {
                throw Failure(description: "weir did not log \"\(needle)\" within \(timeout) s; its log:\n\(logText)")
            }
            usleep(10_000)
        }
    }

    /// The port of listener `name` (its "listening" log line).
    func port(listener name: String) throws -> Int {
        try port(inLineEndingWith: "listener=\(name) [WeirProxy] listening")
    }

    /// The port of the admin listener.
    func adminPort() throws -> Int { try port(inLineEndingWith: "[weir] admin listening") }

    private func port(inLineEndingWith suffix: String) throws -> Int {
        // e.g. `... info weir: address=127.0.0.1:43911 listener=web [WeirProxy] listening`
        for line in logText.split(separator: "\n") where line.hasSuffix(suffix) {
            if let address = line.split(separator: " ").first(where: { $0.hasPrefix("address=") }),
               let port = address.split(separator: ":").last.flatMap({ Int($0) }) {
                return port
            }
        }
        throw Failure(description: "no \"\(suffix)\" line with an address in weir's log:\n\(logText)")
    }

    /// Waits for the child's exit (after a signal), bounded by `timeout`
    /// seconds, then for the end of its log; throws with the log otherwise.
    func waitForExit(timeout: TimeInterval = 60) throws {
        let exited = DispatchQueue.global().asyncResult { self.process.waitUntilExit() }
        do {
            _ = try exited.wait(timeout: timeout)
        } catch {
            // Never a silent hang: fail with what the child said, and how to
            // see where it is stuck (it is killed by `stop()` afterwards).
            throw Failure(description: "weir (pid \(process.processIdentifier)) did not exit within \(timeout) s "
                + "after the signal; to see where every thread waits, rerun and attach "
                + "`gdb -p <pid> -batch -ex 'thread apply all bt'`; its log:\n\(logText)")
        }
        // Then the rest of its log (the reader sees the end of the pipe).
        let deadline = Date().addingTimeInterval(timeout)
        while !logEnded && Date() < deadline { usleep(10_000) }
    }

    /// Ends the child if a test left it running (call from `defer`): SIGTERM,
    /// then SIGKILL if it has not exited after `timeout` seconds, so a stuck
    /// child cannot hang the suite.
    func stop(timeout: TimeInterval = 30) {
        guard process.isRunning else { return }
        process.terminate()
        let exited = DispatchQueue.global().asyncResult { self.process.waitUntilExit() }
        if (try? exited.wait(timeout: timeout)) == nil {
            kill(process.processIdentifier, SIGKILL)
            _ = try? exited.wait(timeout: timeout)
        }
    }

    struct Failure: Error, CustomStringConvertible { var description: String }
}
