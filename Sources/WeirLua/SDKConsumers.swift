import CLua
import CLuaShims
import WeirCore

/// Consumers' credentials indexed for auth plugins: one dictionary lookup per
/// request instead of a scan over every consumer. Built once per generation
/// from `consumers[].credentials`, where each auth plugin's entry is a list of
/// credential maps (`key-auth: [{key: k1}, {key: k2}]`); every string field of
/// every credential is indexed, so a plugin looks up by whichever field
/// identifies the credential (`key`, `username`, ...).
public struct ConsumerCredentials: Sendable {
    public struct Match: Sendable {
        public let consumer: String
        public let credential: [String: ConfigValue]
    }

    /// plugin \0 field \0 value -> match. The first consumer listing a value wins.
    private var index: [String: Match] = [:]
    /// consumer name -> `consumers[].groups` (for acl).
    private var groupsByConsumer: [String: [String]] = [:]

    public init() {}

    public init(consumers: [ConsumerConfig]) {
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
                for case .map(let credential) in list {
                    for (field, fieldValue) in credential {
                        guard case .string(let text) = fieldValue else { continue }
                        let key = Self.key(plugin, field, text)
                        if index[key] == nil { index[key] = Match(consumer: consumer.name, credential: credential) }
                    }
                }
            }
        }
    }

    public func find(plugin: String, field: String, value: String) -> Match? {
        index[Self.key(plugin, field, value)]
    }

    /// The configured groups of `consumer`; empty for a consumer that is not
    /// configured (e.g. an `anonymous` name of an auth plugin).
    public func groups(of consumer: String) -> [String] {
        groupsByConsumer[consumer] ?? []
    }

    private static func key(_ plugin: String, _ field: String, _ value: String) -> String {
        plugin + "\u{0}" + field + "\u{0}" + value
    }
}

extension LuaRuntime {
    /// `weir.client.find_credential(plugin, field, value)` -> consumer, credential table | nil;
    /// `weir.client.get_consumer_groups()` -> the consumer's groups.
    func makeConsumerNatives() -> [(String, NativeFunction)] {
        let credentials = options.credentials
        return [("client_find_credential", { L in
            guard let plugin = LuaState.string(at: 1, on: L), let field = LuaState.string(at: 2, on: L),
                  let value = LuaState.string(at: 3, on: L) else {
                return .error("weir.client.find_credential: expected plugin, field and value strings")
            }
            guard let match = credentials.find(plugin: plugin, field: field, value: value) else {
                lua_pushnil(L); return .values(1)
            }
            LuaState.push(match.consumer, on: L)
            LuaState.push(.map(match.credential), on: L)
            return .values(2)
        }), ("client_consumer_groups", { L in
            guard let consumer = LuaState.string(at: 1, on: L) else {
                return .error("weir.client.get_consumer_groups: expected a consumer name")
            }
            LuaState.push(.array(credentials.groups(of: consumer).map { .string($0) }), on: L)
            return .values(1)
        })]
    }
}
