import CLua
import CLuaShims
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Named dictionaries shared by every event loop (`weir.shared.<name>`).
/// Owned outside the Lua states, so the data survives reloads. Each
/// dictionary has an item cap; inserting beyond it evicts the least
/// recently used entry. Expired entries are dropped lazily.
public final class SharedDictionaries: @unchecked Sendable {
    public enum Value: Equatable, Sendable {
        case string(String), integer(Int64), number(Double), bool(Bool)
    }

    private let dictionaries: [String: Dictionary]
    /// The same dictionaries by a small integer id (sorted by name), so the
    /// Lua SDK names a dictionary without a String bridge and hash per call.
    private let byID: [Dictionary]
    private let ids: [String: Int]
    /// Injectable clock (seconds) so TTL behaviour is testable without
    /// sleeping; nil: CLOCK_MONOTONIC, read directly (a call through the
    /// stored closure cost dict:incr a retain and release of its context).
    private let clock: (@Sendable () -> Double)?

    /// - Parameter capacities: dictionary name -> maximum number of items.
    /// - Parameter clock: seconds; nil (the default) is CLOCK_MONOTONIC.
    public init(capacities: [String: Int], clock: (@Sendable () -> Double)? = nil) {
        var dicts: [String: Dictionary] = [:]
        for (name, capacity) in capacities { dicts[name] = Dictionary(capacity: max(1, capacity)) }
        self.dictionaries = dicts
        let names = dicts.keys.sorted()
        self.byID = names.map { dicts[$0]! }
        self.ids = Swift.Dictionary(uniqueKeysWithValues: names.enumerated().map { ($1, $0) })
        self.clock = clock
    }

    /// The id of a dictionary (for `dictionary(id:)`), nil if not declared.
    func id(of name: String) -> Int? { ids[name] }

    /// A dictionary by id; nil for an unknown id.
    @inline(__always)
    func dictionary(id: Int) -> Dictionary? { id >= 0 && id < byID.count ? byID[id] : nil }

    /// The dictionary of `id` (nil for an unknown id) lent to `body` with
    /// this set's current time: not retained for the call (`byID` holds
    /// every dictionary as long as this set lives), unlike
    /// `dictionary(id:)`'s result (dict:incr per request). The time is read
    /// here, where this set is borrowed: read by the caller through its
    /// reference, the set was retained and released per call.
    /// (Lent as an Unmanaged: the caller borrows it where it uses it with
    /// `_withUnsafeGuaranteedRef`; a strong reference handed to `body` was
    /// retained and released.)
    @inline(__always)
    func withDictionary<R>(id: Int, _ body: (Unmanaged<Dictionary>?, _ now: Double) -> R) -> R {
        let now = now()
        guard id >= 0 && id < byID.count else { return body(nil, now) }
        return byID.withUnsafeBufferPointer { dictionaries in
            // The element's reference read as an Unmanaged (the same bits):
            // `dictionaries[id]` is a strong copy, retained and released.
            body(UnsafeRawPointer(dictionaries.baseAddress! + id).load(as: Unmanaged<Dictionary>.self), now)
        }
    }

    /// The current time of this set's clock (seconds).
    @inline(__always)
    func now() -> Double {
        if let clock { return clock() }
        return Self.monotonicSeconds()
    }

    @inline(__always)
    static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    public static let monotonicNow: @Sendable () -> Double = { monotonicSeconds() }

    public func exists(_ name: String) -> Bool { dictionaries[name] != nil }
    public var names: [String] { dictionaries.keys.sorted() }

    public func get(_ name: String, _ key: String) -> Value? {
        guard let d = dictionaries[name] else { return nil }
        return SharedKey.withBytes(key) { d.get($0, now: now()) }
    }

    /// Stores a value; `ttl` seconds (0 = no expiry).
    public func set(_ name: String, _ key: String, _ value: Value, ttl: Double) {
        guard let d = dictionaries[name] else { return }
        _ = SharedKey.withBytes(key) { d.set($0, value, ttl: ttl, now: now(), onlyIfAbsent: false) }
    }

    /// Stores only if the key is absent (or expired); false if it exists.
    public func add(_ name: String, _ key: String, _ value: Value, ttl: Double) -> Bool {
        guard let d = dictionaries[name] else { return false }
        return SharedKey.withBytes(key) { d.set($0, value, ttl: ttl, now: now(), onlyIfAbsent: true) }
    }

    public enum IncrError: Error, Equatable { case notFound, notANumber }

    /// Atomically adds `delta`; an absent key starts at `initial` (with
    /// `initialTTL`) or fails with .notFound when `initial` is nil.
    public func incr(_ name: String, _ key: String, by delta: Value, initial: Value?, initialTTL: Double) -> Result<Value, IncrError> {
        guard let d = dictionaries[name] else { return .failure(.notFound) }
        return SharedKey.withBytes(key) { d.incr($0, delta, initial: initial, initialTTL: initialTTL, now: now()) }
    }

    public func delete(_ name: String, _ key: String) {
        guard let d = dictionaries[name] else { return }
        SharedKey.withBytes(key) { d.delete($0) }
    }

    public func count(_ name: String) -> Int { dictionaries[name]?.count ?? 0 }

    // One dictionary: a hash map of nodes threaded on an LRU list, under a
    // lock. Keys are bytes: the SDK looks a key up straight from the Lua
    // string's buffer (SharedKey), so a hit builds no Swift String or Array;
    // only an insert copies the key.
    final class Dictionary: @unchecked Sendable {
        final class Node {
            let key: [UInt8]
            let hash: Int
            var value: Value
            var expiry: Double // 0 = none
            var prev: Node?
            var next: Node?
            /// The next node in the same bucket (a bucket's chain).
            var nextInBucket: Node?
            init(key: [UInt8], hash: Int, value: Value, expiry: Double) {
                self.key = key; self.hash = hash; self.value = value; self.expiry = expiry
            }
            /// The value when it is an integer (a counter).
            var count: Int64? {
                if case .integer(let count) = value { return count }
                return nil
            }
        }
        private let lock = NIOLock()
        /// Chains of nodes by `hash & (buckets.count - 1)`. The hash is
        /// already SipHash's (SharedKey.hash): indexing an array by its low
        /// bits costs a few instructions, where a `[Int: Node]` hashed the
        /// hash again per lookup. Doubles when the items outnumber the buckets.
        private var buckets = [Node?](repeating: nil, count: 16)
        private var itemCount = 0
        private var head: Node? // most recently used
        private var tail: Node? // least recently used
        let capacity: Int

        init(capacity: Int) { self.capacity = capacity }

        var count: Int { lock.withLock { itemCount } }

        private func unlink(_ n: Node) {
            if let p = n.prev { p.next = n.next } else { head = n.next }
            if let x = n.next { x.prev = n.prev } else { tail = n.prev }
            n.prev = nil; n.next = nil
        }
        private func pushFront(_ n: Node) {
            n.next = head; n.prev = nil
            head?.prev = n; head = n
            if tail == nil { tail = n }
        }
        @inline(__always)
        private func bucket(_ hash: Int) -> Int { hash & (buckets.count - 1) }

        private func find(_ key: UnsafeRawBufferPointer, hash: Int) -> Node? {
            var n = buckets[bucket(hash)]
            while let node = n {
                if node.hash == hash && SharedKey.equal(node.key, key) { return node }
                n = node.nextInBucket
            }
            return nil
        }
        private func remove(_ n: Node) {
            unlink(n)
            itemCount -= 1
            let b = bucket(n.hash)
            guard let first = buckets[b] else { return }
            if first === n {
                buckets[b] = n.nextInBucket
            } else {
                var p = first
                while let x = p.nextInBucket, x !== n { p = x }
                p.nextInBucket = n.nextInBucket
            }
            n.nextInBucket = nil
        }
        /// Twice the buckets, every node rechained by its hash.
        private func grow() {
            let old = buckets
            buckets = [Node?](repeating: nil, count: old.count * 2)
            for first in old {
                var n = first
                while let node = n {
                    n = node.nextInBucket
                    let b = bucket(node.hash)
                    node.nextInBucket = buckets[b]
                    buckets[b] = node
                }
            }
        }

        /// The live node for key (dropping it if expired), moved to the front.
        private func live(_ key: UnsafeRawBufferPointer, hash: Int, now: Double) -> Node? {
            guard let n = unexpired(key, hash: hash, now: now) else { return nil }
            // A hot key is usually at the front already: skip the relinking
            // (and its reference counting).
            if head !== n { unlink(n); pushFront(n) }
            return n
        }

        private func insert(_ key: UnsafeRawBufferPointer, hash: Int, _ value: Value, ttl: Double, now: Double) {
            if itemCount >= capacity, let lru = tail { remove(lru) }
            let n = Node(key: Array(key.bindMemory(to: UInt8.self)), hash: hash, value: value, expiry: ttl > 0 ? now + ttl : 0)
            if itemCount >= buckets.count { grow() }
            let b = bucket(hash)
            n.nextInBucket = buckets[b]
            buckets[b] = n
            itemCount += 1
            pushFront(n)
        }

        func get(_ key: UnsafeRawBufferPointer, now: Double) -> Value? {
            get(key, hash: SharedKey.hash(key), now: now)
        }

        /// `get` with the key's `SharedKey.hash` already known (SharedKeyHashes).
        func get(_ key: UnsafeRawBufferPointer, hash: Int, now: Double) -> Value? {
            lock.withLock { live(key, hash: hash, now: now)?.value }
        }

        func set(_ key: UnsafeRawBufferPointer, _ value: Value, ttl: Double, now: Double, onlyIfAbsent: Bool) -> Bool {
            let hash = SharedKey.hash(key)
            return lock.withLock {
                if let n = live(key, hash: hash, now: now) {
                    if onlyIfAbsent { return false }
                    n.value = value
                    n.expiry = ttl > 0 ? now + ttl : 0
                    return true
                }
                insert(key, hash: hash, value, ttl: ttl, now: now)
                return true
            }
        }

        func incr(_ key: UnsafeRawBufferPointer, _ delta: Value, initial: Value?, initialTTL: Double, now: Double) -> Result<Value, IncrError> {
            incr(key, hash: SharedKey.hash(key), delta, initial: initial, initialTTL: initialTTL, now: now)
        }

        /// `incr` with the key's `SharedKey.hash` already known (SharedKeyHashes).
        func incr(_ key: UnsafeRawBufferPointer, hash: Int, _ delta: Value, initial: Value?, initialTTL: Double,
                  now: Double) -> Result<Value, IncrError> {
            lock.withLock {
                if let n = live(key, hash: hash, now: now) {
                    guard let sum = Dictionary.add(n.value, delta) else { return .failure(.notANumber) }
                    n.value = sum
                    return .success(sum)
                }
                guard let initial = initial, let sum = Dictionary.add(initial, delta) else { return .failure(.notFound) }
                insert(key, hash: hash, sum, ttl: initialTTL, now: now)
                return .success(sum)
            }
        }

        /// `incr` of `key`, then the value of `other` (nil when absent), under
        /// one lock (dict:incr_get: a sliding window's current and previous
        /// counters). As LRU uses, `other` is touched before `key` (`touch`).
        func incrGet(_ key: UnsafeRawBufferPointer, hash: Int, _ delta: Value, initial: Value?, initialTTL: Double,
                     other: UnsafeRawBufferPointer, otherHash: Int, now: Double) -> (Result<Value, IncrError>, Value?) {
            lock.withLock {
                var otherNode = unexpired(other, hash: otherHash, now: now)
                let node = unexpired(key, hash: hash, now: now)
                touch(node, after: otherNode)
                let result: Result<Value, IncrError>
                if let n = node {
                    guard let sum = Dictionary.add(n.value, delta) else { return (.failure(.notANumber), nil) }
                    n.value = sum
                    result = .success(sum)
                } else {
                    guard let initial = initial, let sum = Dictionary.add(initial, delta) else { return (.failure(.notFound), nil) }
                    insert(key, hash: hash, sum, ttl: initialTTL, now: now)
                    // Looked up again (a new key, once per window): a full
                    // dictionary evicted its least recently used, perhaps
                    // `other`, and `other` may be the key just inserted.
                    otherNode = find(other, hash: otherHash)
                    result = .success(sum)
                }
                // Read after the increment: `other` may be `key` itself.
                return (result, otherNode?.value)
            }
        }

        /// Both nodes of an incr_get made the most recently used, `node`
        /// first (either may be nil). In the steady state, the same two keys
        /// request after request, they are the two most recent already in
        /// that order and nothing is relinked (touching them one by one
        /// relinked both every time).
        @inline(__always)
        private func touch(_ node: Node?, after other: Node?) {
            if node != nil && other != nil && head === node && node!.next === other { return }
            if let o = other, head !== o { unlink(o); pushFront(o) }
            if let n = node, head !== n { unlink(n); pushFront(n) }
        }

        /// What `incrementCounter` did.
        enum CounterIncrement {
            /// The new count, and `other`'s (nil: absent, or no other key).
            case counted(Int64, other: Int64?)
            /// The key is absent and there is no initial value.
            case notFound
            /// A stored value is not an integer, or the sum does not fit:
            /// nothing changed; `incr`/`incrGet` do it.
            case notCounter
        }

        /// `incr` (no `other`) or `incrGet` with an integer delta and
        /// initial value, as long as the values it meets are integers: a
        /// counter, dict:incr's usual use (rate-limiting's windows). Same
        /// effects and LRU order as those; checks everything before changing
        /// anything, so `.notCounter` leaves the dictionary as it was.
        func incrementCounter(_ key: UnsafeRawBufferPointer, hash: Int, by delta: Int64, initial: Int64?, initialTTL: Double,
                              other: UnsafeRawBufferPointer?, otherHash: Int, now: Double) -> CounterIncrement {
            lock.withLock {
                // The nodes unretained (`peek`): under the lock nothing frees
                // them until `insert` (which may evict), and they are not
                // used after it.
                var otherNode: Unmanaged<Node>?
                if let other { otherNode = peekUnexpired(other, hash: otherHash, now: now) }
                let node = peekUnexpired(key, hash: hash, now: now)
                var otherCount: Int64?
                if let o = otherNode {
                    guard let count = o._withUnsafeGuaranteedRef({ $0.count }) else { return .notCounter }
                    otherCount = count
                }
                if let n = node {
                    guard let count = n._withUnsafeGuaranteedRef({ $0.count }) else { return .notCounter }
                    let (sum, overflow) = count.addingReportingOverflow(delta)
                    if overflow { return .notCounter }
                    if !isHead(n, followedBy: otherNode) { touch(n.takeUnretainedValue(), after: otherNode?.takeUnretainedValue()) }
                    n._withUnsafeGuaranteedRef { $0.value = .integer(sum) }
                    // `other` may be `key` itself: read after the increment.
                    return .counted(sum, other: otherNode?.toOpaque() == n.toOpaque() ? sum : otherCount)
                }
                if let o = otherNode { touch(nil, after: o.takeUnretainedValue()) }
                guard let initial else { return .notFound }
                let (sum, overflow) = initial.addingReportingOverflow(delta)
                if overflow { return .notCounter }
                insert(key, hash: hash, .integer(sum), ttl: initialTTL, now: now)
                guard let other else { return .counted(sum, other: nil) }
                // Looked up again (a new key, once per window): a full
                // dictionary evicted its least recently used, perhaps
                // `other`, and `other` may be the key just inserted.
                guard let o = find(other, hash: otherHash), let count = o.count else { return .counted(sum, other: nil) }
                return .counted(sum, other: count)
            }
        }

        /// `find` without retaining the node (nor any node on the way).
        @inline(__always)
        private func peek(_ key: UnsafeRawBufferPointer, hash: Int) -> Unmanaged<Node>? {
            var current = buckets.withUnsafeBufferPointer { $0[bucket(hash)].map { Unmanaged.passUnretained($0) } }
            while let n = current {
                let (matched, next) = n._withUnsafeGuaranteedRef { node in
                    (node.hash == hash && SharedKey.equal(node.key, key), node.nextInBucket.map { Unmanaged.passUnretained($0) })
                }
                if matched { return n }
                current = next
            }
            return nil
        }

        /// `unexpired` through `peek`.
        @inline(__always)
        private func peekUnexpired(_ key: UnsafeRawBufferPointer, hash: Int, now: Double) -> Unmanaged<Node>? {
            guard let n = peek(key, hash: hash) else { return nil }
            if n._withUnsafeGuaranteedRef({ $0.expiry != 0 && $0.expiry <= now }) { remove(n.takeUnretainedValue()); return nil }
            return n
        }

        /// Whether `node` is the most recently used, `other` (if any) right
        /// after it: `touch` would change nothing.
        @inline(__always)
        private func isHead(_ node: Unmanaged<Node>, followedBy other: Unmanaged<Node>?) -> Bool {
            guard let head, Unmanaged.passUnretained(head).toOpaque() == node.toOpaque() else { return false }
            guard let other else { return true }
            return node._withUnsafeGuaranteedRef { $0.next.map { Unmanaged.passUnretained($0).toOpaque() } } == other.toOpaque()
        }

        /// The node for key unless it expired (then dropped); not moved.
        private func unexpired(_ key: UnsafeRawBufferPointer, hash: Int, now: Double) -> Node? {
            guard let n = find(key, hash: hash) else { return nil }
            if n.expiry != 0 && n.expiry <= now { remove(n); return nil }
            return n
        }

        func delete(_ key: UnsafeRawBufferPointer) {
            let hash = SharedKey.hash(key)
            lock.withLock { if let n = find(key, hash: hash) { remove(n) } }
        }

        static func add(_ a: Value, _ b: Value) -> Value? {
            switch (a, b) {
            case (.integer(let x), .integer(let y)):
                let (r, overflow) = x.addingReportingOverflow(y)
                return overflow ? .number(Double(x) + Double(y)) : .integer(r)
            case (.integer(let x), .number(let y)): return .number(Double(x) + y)
            case (.number(let x), .integer(let y)): return .number(x + Double(y))
            case (.number(let x), .number(let y)): return .number(x + y)
            default: return nil
            }
        }
    }
}

/// Byte-string keys (shared dictionaries, credential lookups): hashed and
/// compared straight from a buffer such as a Lua string's, so a lookup from
/// the SDK builds no Swift String. Hasher is seeded per process, so keys a
/// client chooses (an IP, a header value) cannot be picked to collide.
enum SharedKey {
    @inline(__always)
    static func hash(_ bytes: UnsafeRawBufferPointer) -> Int {
        var hasher = Hasher()
        hasher.combine(bytes: bytes)
        return hasher.finalize()
    }

    @inline(__always)
    static func equal(_ stored: [UInt8], _ bytes: UnsafeRawBufferPointer) -> Bool {
        stored.count == bytes.count && stored.withUnsafeBytes { s in
            bytes.count == 0 || memcmp(s.baseAddress!, bytes.baseAddress!, bytes.count) == 0
        }
    }

    /// Runs `body` over a String's UTF-8 bytes (the Swift API's way in).
    @inline(__always)
    static func withBytes<R>(_ key: String, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        var key = key
        return key.withUTF8 { body(UnsafeRawBufferPointer($0)) }
    }
}

/// The `SharedKey.hash` of dictionary keys, kept per Lua string. A plugin
/// keeps its counter keys as strings (rate-limiting builds a client's keys
/// once per window) and passes the same string objects request after
/// request; hashing one (SipHash over ~50 bytes) cost ~380 instructions a
/// call, this lookup a few. Direct-mapped by the string's address; each
/// cached string is pinned (a registry table holds it while it has its
/// slot), so no other string can turn up at that address and a hit needs no
/// byte comparison. A miss hashes the bytes as before.
///
/// One per Lua state, used only on its event loop (like the state).
final class SharedKeyHashes {
    private static let slotCount = 128                 // a power of two
    private var addresses = [UnsafeRawPointer?](repeating: nil, count: slotCount)
    private var hashes = [Int](repeating: 0, count: slotCount)
    private let pinsRef: Int32

    /// - Parameter L: a thread of the state the cache serves (the pin table lives in its registry).
    init(on L: LuaThread) {
        lua_createtable(L, Int32(Self.slotCount), 0)
        pinsRef = luaL_ref(L, weir_registryindex())
    }

    /// The hash of `key`, the bytes of the string at `index`.
    func hash(of key: UnsafeRawBufferPointer, at index: Int32, on L: LuaThread) -> Int {
        guard let address = key.baseAddress else { return SharedKey.hash(key) }
        let mixed = UInt(bitPattern: Int(bitPattern: address)) &* 0x9E37_79B9_7F4A_7C15
        let slot = Int(truncatingIfNeeded: mixed >> 57) & (Self.slotCount - 1)
        if addresses[slot] == address { return hashes[slot] }
        let hash = SharedKey.hash(key)
        let absolute = lua_absindex(L, index)
        lua_rawgeti(L, weir_registryindex(), lua_Integer(pinsRef))   // pins
        lua_pushvalue(L, absolute)                                    // pins, key
        lua_rawseti(L, -2, lua_Integer(slot + 1))                     // pins (the slot's old key unpinned)
        weir_pop(L, 1)
        addresses[slot] = address
        hashes[slot] = hash
        return hash
    }
}
