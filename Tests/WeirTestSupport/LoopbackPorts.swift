import Foundation

#if canImport(Glibc)
import Glibc
#endif

// Loopback ports for tests, without races.
//
// "Bind to 0, read the port, close, hand the number to something else" is a
// race: between the close and the other bind, any socket on the machine (a
// connect's ephemeral source port, another engineer's test run) may take
// the port. Tests on a busy machine then fail with "address in use", or
// worse, talk to someone else's server. So:
// - a server the test starts in-process or as a child should listen on
//   port 0 and report the port it got (weir logs it, python helpers print it);
// - a port that must refuse connections is `refusingPort()` (held bound);
// - a port that must be named before its server binds it (a redis-server,
//   an admin address read back from the config) goes through
//   `withUnusedPort`, which picks again when the start finds it taken;
// - a server restarted on its old port goes through `retryWhilePortTaken`.

/// A loopback port that refuses every connection for the rest of the test
/// process: a socket stays bound to it without listening, so a connect gets
/// a reset. Unlike a port bound and closed again, nothing else on the
/// machine (another test, another process, a connect's own ephemeral source
/// port) can take it over while a test expects it to be dead.
public func refusingPort() throws -> Int {
    let held = try boundLoopbackSocket()
    refusingPortSockets.keep(held.socket)
    return held.port
}

/// The sockets behind `refusingPort()`, kept open until the process exits.
private let refusingPortSockets = HeldSockets()

private final class HeldSockets: @unchecked Sendable {
    private let lock = NSLock()
    private var sockets: [Int32] = []
    func keep(_ socket: Int32) { lock.withLock { sockets.append(socket) } }
}

/// Calls `start` with a loopback port that was free a moment ago; when the
/// start fails because something took that port in between
/// (`isPortTaken(error)`), tries again with another port, up to `attempts`
/// times, then rethrows the last error.
public func withUnusedPort<T>(attempts: Int = 8, isPortTaken: (Error) -> Bool = isAddressInUse,
                              _ start: (Int) throws -> T) throws -> T {
    var attempt = 1
    while true {
        let picked = try boundLoopbackSocket()
        close(picked.socket)
        do {
            return try start(picked.port)
        } catch where attempt < attempts && isPortTaken(error) {
            attempt += 1
        }
    }
}

/// Calls `start`, which binds a port already chosen (a server restarted on
/// its old port); while it fails because another socket holds that port
/// (a connect's ephemeral source port takes it only briefly), tries again
/// for up to `seconds`, then rethrows.
public func retryWhilePortTaken<T>(for seconds: TimeInterval = 10, isPortTaken: (Error) -> Bool = isAddressInUse,
                                   _ start: () throws -> T) throws -> T {
    let deadline = Date().addingTimeInterval(seconds)
    while true {
        do {
            return try start()
        } catch where isPortTaken(error) && Date() < deadline {
            usleep(50_000)
        }
    }
}

/// Whether `error` says "address already in use" (NIO's `IOError`, the
/// proxy's `StartError`, a child's log quoted in an error all spell it so).
public func isAddressInUse(_ error: Error) -> Bool {
    let text = "\(error)"
    return text.contains("Address already in use") || text.contains("EADDRINUSE")
}

/// A TCP socket bound (not listening) to 127.0.0.1 on a port the kernel chose.
private func boundLoopbackSocket() throws -> (socket: Int32, port: Int) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw LoopbackPortError(call: "socket", code: errno) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Bool in
            bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
        }
    }
    guard bound else {
        let code = errno
        close(fd)
        throw LoopbackPortError(call: "bind", code: code)
    }
    return (fd, Int(UInt16(bigEndian: address.sin_port)))
}

public struct LoopbackPortError: Error, CustomStringConvertible {
    public var call: String
    public var code: Int32
    public var description: String { "\(call) on 127.0.0.1 failed: \(String(cString: strerror(code)))" }
}
