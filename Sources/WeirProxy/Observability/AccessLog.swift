import Atomics
import Dispatch
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WeirCore

/// Writes one JSON line per finished request to stdout or a file.
///
/// The event loop only formats the line and appends it to its own in-memory
/// batch (a per-thread shard, so loops never contend). A background serial
/// queue writes batches to the file descriptor: every `flushInterval`, or as
/// soon as a batch reaches `batchBytes`. Memory is bounded: a shard holds at
/// most `maxShardBytes` and at most `maxPendingBytes` wait to be written;
/// beyond that, lines are dropped and counted (`droppedLines`), never
/// blocking the data path on a slow disk or a stalled stdout pipe.
public final class AccessLogWriter: @unchecked Sendable {
    public struct Limits: Sendable {
        public var batchBytes = 64 * 1024
        public var maxShardBytes = 1024 * 1024
        public var maxPendingBytes = 8 * 1024 * 1024
        public var flushInterval: TimeAmount = .milliseconds(100)
        public init() {}
    }

    public enum OpenError: Error, CustomStringConvertible {
        case cannotOpen(path: String, errno: Int32)
        public var description: String {
            switch self {
            case let .cannotOpen(path, code):
                return "access_log: cannot open \(path): \(String(cString: strerror(code)))"
            }
        }
    }

    private let fd: Int32
    private let ownsFD: Bool
    private let limits: Limits
    private let queue = DispatchQueue(label: "weir.access-log")
    private let shards = PerThreadShards<LogShard> { LogShard() }
    private let pendingBytes = ManagedAtomic<Int>(0)
    private let dropped = ManagedAtomic<Int>(0)
    private let written = ManagedAtomic<Int>(0)
    private var timer: DispatchSourceTimer?
    private var closed = false

    /// A writer for `target`, or nil when the access log is off.
    public static func make(target: AccessLogTarget, limits: Limits = Limits()) throws -> AccessLogWriter? {
        switch target {
        case .off: return nil
        case .stdout: return AccessLogWriter(fd: STDOUT_FILENO, ownsFD: false, limits: limits)
        case let .file(path): return try AccessLogWriter(path: path, limits: limits)
        }
    }

    /// Appends to `path`, creating it (mode 0644) if needed.
    public convenience init(path: String, limits: Limits = Limits()) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if fd < 0 { throw OpenError.cannotOpen(path: path, errno: errno) }
        self.init(fd: fd, ownsFD: true, limits: limits)
    }

    /// Writes to an already open descriptor (e.g. a pipe) that the caller keeps owning.
    public convenience init(fileDescriptor: Int32, limits: Limits = Limits()) {
        self.init(fd: fileDescriptor, ownsFD: false, limits: limits)
    }

    init(fd: Int32, ownsFD: Bool, limits: Limits) {
        self.fd = fd
        self.ownsFD = ownsFD
        self.limits = limits
        let timer = DispatchSource.makeTimerSource(queue: queue)
        let interval = DispatchTimeInterval.nanoseconds(Int(limits.flushInterval.nanoseconds))
        timer.schedule(deadline: .now() + interval, repeating: interval)
        timer.setEventHandler { [weak self] in self?.flushAllShardsOnQueue() }
        timer.resume()
        self.timer = timer
    }

    deinit {
        timer?.cancel()
        if ownsFD { _ = close(fd) }
    }

    /// Lines dropped because the writer could not keep up.
    public var droppedLines: Int { dropped.load(ordering: .relaxed) }
    /// Lines handed to write(2).
    public var writtenLines: Int { written.load(ordering: .relaxed) }

    /// Called on the event loop: formats the line and queues it.
    public func append(_ record: AccessRecord) {
        let line = AccessLogFormatter.jsonLine(record)
        let shard = shards.current
        var shardFull = false
        let fullBatch: LogBatch? = shard.lock.withLock {
            if shard.batch.bytes.count + line.utf8.count > limits.maxShardBytes {
                shardFull = true
                return nil
            }
            shard.batch.bytes.append(contentsOf: line.utf8)
            shard.batch.lines += 1
            guard shard.batch.bytes.count >= limits.batchBytes else { return nil }
            return shard.takeBatch()
        }
        if shardFull { dropped.wrappingIncrement(ordering: .relaxed) }
        if let batch = fullBatch { enqueue(batch) }
    }

    /// Writes everything queued so far and returns when it is on the fd.
    /// For shutdown and tests; do not call on an event loop.
    public func flush() {
        queue.sync { flushAllShardsOnQueue() }
    }

    /// Flushes and stops the timer. Further appends are written only by `flush()`.
    public func shutdown() {
        queue.sync {
            flushAllShardsOnQueue()
            timer?.cancel()
            timer = nil
        }
    }

    private func enqueue(_ batch: LogBatch) {
        let size = batch.bytes.count
        if pendingBytes.loadThenWrappingIncrement(by: size, ordering: .relaxed) + size > limits.maxPendingBytes {
            pendingBytes.wrappingDecrement(by: size, ordering: .relaxed)
            dropped.wrappingIncrement(by: batch.lines, ordering: .relaxed)
            return
        }
        queue.async {
            self.write(batch)
            self.pendingBytes.wrappingDecrement(by: size, ordering: .relaxed)
        }
    }

    private func flushAllShardsOnQueue() {
        for shard in shards.allShards {
            let batch = shard.lock.withLock { shard.takeBatch() }
            if !batch.bytes.isEmpty { write(batch) }
        }
    }

    /// Runs on `queue` only.
    private func write(_ batch: LogBatch) {
        batch.bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n > 0 { offset += n; continue }
                if n < 0 && errno == EINTR { continue }
                // Disk full, closed pipe...: the rest of the batch is lost; count it.
                dropped.wrappingIncrement(by: batch.lines, ordering: .relaxed)
                return
            }
            written.wrappingIncrement(by: batch.lines, ordering: .relaxed)
        }
    }
}

struct LogBatch {
    var bytes: [UInt8] = []
    var lines = 0
}

final class LogShard {
    let lock = NIOLock()
    var batch = LogBatch()

    func takeBatch() -> LogBatch {
        let taken = batch
        batch = LogBatch()
        batch.bytes.reserveCapacity(taken.bytes.count)
        return taken
    }
}

/// The access log's JSON line format. Field names are a contract with log
/// pipelines: add fields freely, never rename.
public enum AccessLogFormatter {
    public static func jsonLine(_ r: AccessRecord) -> String {
        var s = "{\"time\":\""
        s.reserveCapacity(384)
        s += iso8601(r.startTime)
        s += "\",\"request_id\":"; appendJSONString(&s, r.requestID)
        s += ",\"listener\":"; appendJSONString(&s, r.listener)
        s += ",\"client\":"; appendJSONString(&s, r.clientAddress)
        s += ",\"method\":"; appendJSONString(&s, r.method)
        s += ",\"path\":"; appendJSONString(&s, r.path)
        s += ",\"route\":"; appendJSONString(&s, r.route)
        s += ",\"upstream\":"; appendJSONString(&s, r.upstream)
        s += ",\"upstream_target\":"; appendJSONString(&s, r.upstreamTarget)
        s += ",\"status\":\(r.status),\"bytes_in\":\(r.bytesIn),\"bytes_out\":\(r.bytesOut)"
        s += ",\"duration_ms\":" + milliseconds(r.totalDuration)
        s += ",\"upstream_duration_ms\":" + (r.upstreamDuration.map(milliseconds) ?? "null")
        s += ",\"attempts\":\(r.attempts)}\n"
        return s
    }

    /// Seconds as milliseconds with three decimals (microsecond precision).
    static func milliseconds(_ seconds: Double) -> String {
        let micros = Int((max(seconds, 0) * 1_000_000).rounded())
        let fraction = micros % 1000
        let pad = fraction < 10 ? "00" : (fraction < 100 ? "0" : "")
        return "\(micros / 1000).\(pad)\(fraction)"
    }

    /// `2026-11-29T19:05:01.123Z`
    static func iso8601(_ secondsSince1970: Double) -> String {
        var whole = time_t(secondsSince1970.rounded(.down))
        let millis = Int((secondsSince1970 - Double(whole)) * 1000)
        var tm = tm()
        gmtime_r(&whole, &tm)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        let ms = millis < 10 ? "00\(millis)" : (millis < 100 ? "0\(millis)" : "\(millis)")
        return "\(tm.tm_year + 1900)-\(two(tm.tm_mon + 1))-\(two(tm.tm_mday))T"
            + "\(two(tm.tm_hour)):\(two(tm.tm_min)):\(two(tm.tm_sec)).\(ms)Z"
    }

    static func appendJSONString(_ s: inout String, _ value: String?) {
        guard let value = value else { s += "null"; return }
        s += "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": s += "\\\""
            case "\\": s += "\\\\"
            case "\n": s += "\\n"
            case "\r": s += "\\r"
            case "\t": s += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                s += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: s.unicodeScalars.append(scalar)
            }
        }
        s += "\""
    }
}
