import NIOConcurrencyHelpers
import NIOPosix

/// One shard per thread (in practice: per NIO event loop), created lazily on
/// first use and kept for the life of the owner.
///
/// Why: metrics and the access log are fed on every request from every event
/// loop. A single shared lock would make all loops contend on each request;
/// with a shard per thread, each shard's lock is only ever contended by the
/// (rare) scrape or flush that reads it, so the per-request cost is an
/// uncontended mutex and a thread-local lookup.
final class PerThreadShards<Shard: AnyObject>: @unchecked Sendable {
    private let threadLocal = ThreadSpecificVariable<Shard>()
    private let makeShard: () -> Shard
    // Guards `all`; taken once per thread (first use) and by readers.
    private let registryLock = NIOLock()
    private var all: [Shard] = []

    init(makeShard: @escaping () -> Shard) {
        self.makeShard = makeShard
    }

    /// The calling thread's shard.
    @inline(__always)
    var current: Shard {
        if let shard = threadLocal.currentValue { return shard }
        let shard = makeShard()
        threadLocal.currentValue = shard
        registryLock.withLock { all.append(shard) }
        return shard
    }

    /// Every shard created so far, for scrapes and flushes. Shards are never
    /// removed: threads here are long-lived event loops.
    var allShards: [Shard] {
        registryLock.withLock { all }
    }
}
