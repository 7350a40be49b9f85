import CLua
import CLuaShims
import Crypto
import NIOConcurrencyHelpers
import WeirCore

/// Consumers' credentials indexed for auth plugins: one dictionary lookup per
/// request instead of a scan over every consumer. Built once per generation
/// from `consumers[].credentials`, where each auth plugin's entry is a list of
/// credential maps (`key-auth: [{key: k1}, {key: k2}]`); every string field of
/// every credential is indexed, so a plugin looks up by whichever field
/// identifies the credential (`key`, `username`, ...).
public struct ConsumerCredentials: Sendable {
    public struct Match: Sendable {
        /// Numbers the credentials of one build (the SDK's per-runtime table cache).
        let id: Int
        public let consumer: String
        public let credential: [String: ConfigValue]
    }

    /// hash of (plugin, field, value) -> the entries with that hash; the
    /// first consumer listing a value wins. Keyed by bytes so the SDK looks a
    /// credential up straight from the Lua strings (no Swift String per call).
    private var index: [Int: [Entry]] = [:]
    private struct Entry: Sendable {
        let plugin: [UInt8], field: [UInt8], value: [UInt8]
        let match: Match
    }
    /// consumer name -> `consumers[].groups` (for acl).
    private var groupsByConsumer: [String: [String]] = [:]

    public init() {}

    public init(consumers: [ConsumerConfig]) {
        var hashes = PasswordHashing.Session()
        var credentialCount = 0
        for consumer in consumers {
            if groupsByConsumer[consumer.name] == nil { groupsByConsumer[consumer.name] = consumer.groups }
            for (plugin, value) in consumer.credentials {
                // A single credential map is accepted as a list of one.
                let list: [ConfigValue]
                switch value {
                case .array(let items): list = items
                case .map: list = [value]
                default: continue
                }
                for case .map(var credential) in list {
                    if case .string(let password)? = credential["password"] {
                        // Never kept plain: the credential carries its PBKDF2 hash from here on.
                        let iterations: Int
                        if case .int(let n)? = credential["iterations"] { iterations = n } else { iterations = PasswordHash.defaultIterations }
                        guard let hash = hashes.hash(password, iterations: iterations, for: consumer.name, plugin: plugin) else { continue }
                        credential["password"] = .string(hash)
                        credential["iterations"] = nil
                    }
                    let match = Match(id: credentialCount, consumer: consumer.name, credential: credential)
                    credentialCount += 1
                    for (field, fieldValue) in credential where !Self.secretFields.contains(field) {
                        guard case .string(let text) = fieldValue else { continue }
                        let entry = Entry(plugin: Array(plugin.utf8), field: Array(field.utf8), value: Array(text.utf8), match: match)
                        let (hash, known) = entry.plugin.withUnsafeBytes { p in entry.field.withUnsafeBytes { f in
                            entry.value.withUnsafeBytes { v in (Self.hash(p, f, v), find(p, f, v) != nil) } } }
                        if !known { index[hash, default: []].append(entry) }
                    }
                }
            }
        }
        hashes.commit()
    }

    /// Fields that hold secrets: never a lookup key (a request must not be
    /// able to find a consumer by guessing its password or signing secret),
    /// and not worth an index entry each at 100,000 consumers.
    static let secretFields: Set<String> = ["password", "secret", "rsa_public_key", "public_key"]

    /// Whether `name` is a configured consumer.
    public func isConsumer(_ name: String) -> Bool { groupsByConsumer[name] != nil }

    public func find(plugin: String, field: String, value: String) -> Match? {
        SharedKey.withBytes(plugin) { p in SharedKey.withBytes(field) { f in SharedKey.withBytes(value) { v in find(p, f, v) } } }
    }

    /// The match for (plugin, field, value) given as bytes (e.g. Lua strings' buffers).
    func find(_ plugin: UnsafeRawBufferPointer, _ field: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> Match? {
        guard let entries = index[Self.hash(plugin, field, value)] else { return nil }
        for e in entries where SharedKey.equal(e.value, value) && SharedKey.equal(e.field, field) && SharedKey.equal(e.plugin, plugin) {
            return e.match
        }
        return nil
    }

    /// The configured groups of `consumer`; empty for a consumer that is not
    /// configured (e.g. an `anonymous` name of an auth plugin).
    public func groups(of consumer: String) -> [String] {
        groupsByConsumer[consumer] ?? []
    }

    private static func hash(_ plugin: UnsafeRawBufferPointer, _ field: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> Int {
        // Lengths first, so ("ab", "c") and ("a", "bc") hash apart.
        var hasher = Hasher()
        hasher.combine(plugin.count); hasher.combine(field.count)
        hasher.combine(bytes: plugin); hasher.combine(bytes: field); hasher.combine(bytes: value)
        return hasher.finalize()
    }
}

extension LuaRuntime {
    /// `weir.client.find_credential(plugin, field, value)` -> consumer, credential table | nil;
    /// `weir.client.get_consumer_groups()` -> the consumer's groups.
    func makeConsumerNatives() -> NativeList {
        let credentials = options.credentials
        var n = NativeList()
        // client_find_credential is a hot native (`HotNative.clientFindCredential`, `CredentialLookups`).
        n.append(("client_consumer_groups", { L in
            guard let consumer = LuaState.string(at: 1, on: L) else {
                return .error("weir.client.get_consumer_groups: expected a consumer name")
            }
            LuaState.push(.array(credentials.groups(of: consumer).map { .string($0) }), on: L)
            return .values(1)
        }))
        n.append(("client_is_consumer", { L in
            guard let consumer = LuaState.string(at: 1, on: L) else {
                return .error("weir.client.is_consumer: expected a consumer name")
            }
            lua_pushboolean(L, credentials.isConsumer(consumer) ? 1 : 0)
            return .values(1)
        }))
        return n
    }
}

/// `weir.client.find_credential(plugin, field, value)` -> consumer, credential
/// table | nil: a hot native (`HotNative.clientFindCredential`).
///
/// Recent matches are kept by the Lua strings asked with. A client sends
/// the same key request after request, and Lua interns short strings: the
/// key read from its header is the same string object each time while it
/// lives. Kept by the three strings' addresses (64 direct-mapped slots by
/// the value's); each cached string is pinned (a registry table holds it
/// while it has its slot), so a hit is three address comparisons instead of
/// hashing plugin, field and value and looking the hash up. Only matches are
/// kept (an unknown key is looked up each time, and cannot fill the cache).
/// A hit reads only the match's id: the consumer's name and the credential
/// table are Lua values made on the first lookup of that credential and
/// handed out again after (like `conf`, plugins treat the table as
/// read-only), so a lookup builds no table or string per request.
///
/// One per Lua state, used only on its event loop (like the state).
final class CredentialLookups {
    private static let slotCount = 64                  // a power of two
    private struct Entry {
        var plugin: UnsafeRawPointer?, field: UnsafeRawPointer?, value: UnsafeRawPointer?
        /// The match's id (-1: empty), and the match itself.
        var id = -1
        var match: ConsumerCredentials.Match?
        /// For identify_credential, made when the slot is filled: the
        /// consumer's and the plugin's names as Strings (read on their own,
        /// not out of a copy of the match), and whether the consumer's name
        /// fits a header value (no Lua string read or checked per request).
        var consumerName = ""
        var pluginName = ""
        var consumerFits = false
    }
    private let credentials: ConsumerCredentials
    private var entries = [Entry](repeating: Entry(), count: slotCount)
    /// Registry reference of the table that pins the cached strings (3 * slot + 1...3 -> plugin, field, value).
    private let pinsRef: Int32
    /// Registry reference of the Lua values per match: id + 1 -> its
    /// credential table, -(id + 1) -> its consumer's name.
    private let valuesRef: Int32

    /// - Parameter L: a thread of the state it serves (its tables live in its registry).
    init(_ credentials: ConsumerCredentials, on L: LuaThread) {
        self.credentials = credentials
        lua_createtable(L, Int32(3 * Self.slotCount), 0)
        pinsRef = luaL_ref(L, weir_registryindex())
        lua_createtable(L, 0, 0)
        valuesRef = luaL_ref(L, weir_registryindex())
    }

    /// The lookup of the strings at stack indices 1, 2, 3: pushes the
    /// consumer and the credential table (2 results) or nil (1); any
    /// argument that is not a string: WEIR_CALL_FALLBACK.
    @inline(__always)
    func find(_ L: LuaThread) -> Int32 {
        find(L) { _, _, _ in }
    }

    /// `find`, and on a match `matched(consumer, plugin, consumerFits)`
    /// (identify_credential's identify) after the results are pushed. The
    /// value is the string at `valueIndex` (identify_header_credential's is
    /// the header value it pushed, -1).
    /// `stringsChecked`: the caller has seen strings at 1, 2 and
    /// `valueIndex` (one lua_type call less each).
    @inline(__always)
    func find(_ L: LuaThread, valueAt valueIndex: Int32 = 3, stringsChecked: Bool = false,
              matched: (String, String, Bool) -> Void) -> Int32 {
        guard let plugin = Self.bytes(at: 1, stringsChecked, L), let field = Self.bytes(at: 2, stringsChecked, L),
              let value = Self.bytes(at: valueIndex, stringsChecked, L) else { return WEIR_CALL_FALLBACK }
        guard let slot = slot(plugin, field, value, valueAt: valueIndex, on: L) else { lua_pushnil(L); return 1 }
        let id = lua_Integer(entries.withUnsafeBufferPointer { $0[slot].id })
        lua_rawgeti(L, weir_registryindex(), lua_Integer(valuesRef))      // values
        if lua_rawgeti(L, -1, -(id + 1)) == LUA_TNIL {                    // values, consumer?
            weir_pop(L, 1)
            LuaState.push(entries[slot].match!.consumer, on: L)
            lua_pushvalue(L, -1)
            lua_rawseti(L, -3, -(id + 1))
        }
        if lua_rawgeti(L, -2, id + 1) == LUA_TNIL {                       // values, consumer, table?
            weir_pop(L, 1)
            LuaState.push(.map(entries[slot].match!.credential), on: L)
            lua_pushvalue(L, -1)
            lua_rawseti(L, -4, id + 1)
        }
        // values, consumer, table: the values table stays below the two
        // results (a C function's results are the top ones; moving it out
        // was a lua_rotate and a lua_settop, ~75 instructions).
        entries.withUnsafeBufferPointer { entries in
            matched(entries[slot].consumerName, entries[slot].pluginName, entries[slot].consumerFits)
        }
        return 2
    }

    /// The bytes of the string at `index` (`known`: it is one), or nil.
    @inline(__always)
    private static func bytes(at index: Int32, _ known: Bool, _ L: LuaThread) -> UnsafeRawBufferPointer? {
        guard known else { return LuaState.bytes(at: index, on: L) }
        var length = 0
        guard let p = lua_tolstring(L, index, &length) else { return nil }
        return UnsafeRawBufferPointer(start: p, count: length)
    }

    /// The slot holding the match for `plugin`, `field`, `value` (the
    /// strings at 1, 2, `valueIndex`): a cached one, or `credentials`'
    /// answer cached now; nil when there is no match.
    @inline(__always)
    private func slot(_ plugin: UnsafeRawBufferPointer, _ field: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer,
                      valueAt valueIndex: Int32, on L: LuaThread) -> Int? {
        let address = value.baseAddress
        let mixed = UInt(bitPattern: Int(bitPattern: address)) &* 0x9E37_79B9_7F4A_7C15
        let slot = Int(truncatingIfNeeded: mixed >> 58) & (Self.slotCount - 1)
        let hit = entries.withUnsafeBufferPointer { entries in
            entries[slot].id >= 0 && entries[slot].value == address && entries[slot].plugin == plugin.baseAddress
                && entries[slot].field == field.baseAddress
        }
        return hit ? slot : cache(plugin, field, value, valueAt: valueIndex, in: slot, on: L)
    }

    @inline(never)
    private func cache(_ plugin: UnsafeRawBufferPointer, _ field: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer,
                       valueAt valueIndex: Int32, in slot: Int, on L: LuaThread) -> Int? {
        guard let found = credentials.find(plugin, field, value) else { return nil }
        let valueIndex = lua_absindex(L, valueIndex)
        lua_rawgeti(L, weir_registryindex(), lua_Integer(pinsRef))       // pins
        for (i, index) in [(1, Int32(1)), (2, 2), (3, valueIndex)] {     // the slot's old strings unpinned
            lua_pushvalue(L, index)
            lua_rawseti(L, -2, lua_Integer(3 * slot + i))
        }
        weir_pop(L, 1)
        var consumer = found.consumer
        let consumerFits = consumer.withUTF8 { HTTPFieldSyntax.isValidFieldValue(UnsafeRawBufferPointer($0)) }
        entries[slot] = Entry(plugin: plugin.baseAddress, field: field.baseAddress, value: value.baseAddress, id: found.id, match: found,
                              consumerName: consumer, pluginName: String(decoding: plugin, as: UTF8.self), consumerFits: consumerFits)
        return slot
    }
}

/// Hashing of plain passwords at config load (PBKDF2-HMAC-SHA256, a fresh
/// random salt per credential). A reload rebuilds every generation's
/// credentials, and at thousands of consumers re-deriving every hash would
/// make each reload take seconds, so the hashes of the last build are kept
/// in memory, keyed by an HMAC of (consumer, plugin, iterations, password)
/// under a random per-process key: an unchanged password keeps its hash,
/// a changed one gets a new hash, and the plain password is not stored.
enum PasswordHashing {
    private static let lock = NIOLock()
    private static let processKey = SymmetricKey(size: .bits256)
    nonisolated(unsafe) private static var previous: [[UInt8]: String] = [:]

    struct Session {
        private var used: [[UInt8]: String] = [:]
        private let previous: [[UInt8]: String] = PasswordHashing.lock.withLock { PasswordHashing.previous }

        /// The stored form of `password`: itself when already hashed (checked
        /// by the config reader), else a new or remembered PBKDF2 hash. Nil
        /// for a malformed hash (a config built in code): the credential is dropped.
        mutating func hash(_ password: String, iterations: Int, for consumer: String, plugin: String) -> String? {
            if PasswordHash.looksHashed(password) {
                guard case .success(let parsed) = PasswordHash.parse(password) else { return nil }
                return parsed.encoded
            }
            let fingerprint = Array(HMAC<SHA256>.authenticationCode(
                for: Array("\(consumer)\u{0}\(plugin)\u{0}\(iterations)\u{0}\(password)".utf8), using: PasswordHashing.processKey))
            if let known = used[fingerprint] ?? previous[fingerprint] { used[fingerprint] = known; return known }
            // SystemRandomNumberGenerator reads the kernel CSPRNG (getrandom).
            var rng = SystemRandomNumberGenerator()
            let salt = (0..<PasswordHash.saltBytes).map { _ in UInt8.random(in: 0...255, using: &rng) }
            guard let key = try? WeirCrypto.pbkdf2(password: Array(password.utf8), salt: salt, iterations: iterations,
                                                   length: PasswordHash.keyBytes) else { return nil }
            let encoded = PasswordHash(iterations: iterations, salt: salt, derivedKey: key).encoded
            used[fingerprint] = encoded
            return encoded
        }

        /// Remembers this build's hashes (and forgets those no longer in config).
        func commit() { PasswordHashing.lock.withLock { PasswordHashing.previous = used } }
    }
}
