import CLua
import CLuaShims
import NIOCore
import WeirRedis

// The native half of `weir.redis` (lua/weir/init.lua builds the handle,
// script and pipeline objects and checks argument types there, so
// programmer errors raise in a Lua frame). Every call goes to the per-loop
// pooled `RedisClient` of the runtime's event loop: no TCP connection per
// request, and commands of concurrent requests share one pipelined write.
//
// Natives here follow the bridging rules: they never raise for Redis or
// network failures — the coroutine resumes with `nil, err` — and they
// suspend only through `LuaRuntime.suspend`, like weir.sleep.

/// The connection options every weir.redis native receives as its first six
/// arguments: host, port, database, username, password, timeout (seconds).
private func redisConfiguration(on L: LuaThread) -> (RedisConfiguration, TimeAmount)? {
    guard let host = LuaState.string(at: 1, on: L), lua_isinteger(L, 2) != 0, lua_isinteger(L, 3) != 0,
          lua_type(L, 6) == LUA_TNUMBER else { return nil }
    let seconds = lua_tonumberx(L, 6, nil)
    guard seconds > 0, seconds.isFinite else { return nil }
    let timeout = TimeAmount.nanoseconds(Int64(seconds * 1e9))
    // The registry keys clients by address, database and credentials; the
    // first caller's timeouts are the client's defaults, so the per-call
    // timeout is passed with every command as well.
    let configuration = RedisConfiguration(host: host, port: Int(lua_tointegerx(L, 2, nil)),
                                           database: Int(lua_tointegerx(L, 3, nil)),
                                           username: LuaState.string(at: 4, on: L),
                                           password: LuaState.string(at: 5, on: L),
                                           connectTimeout: timeout, commandTimeout: timeout)
    return (configuration, timeout)
}

/// One command argument: strings are sent as their bytes (binary-safe),
/// integers in decimal, floats with an integral value as integers (so
/// `expire(k, 60.0)` works), other floats in shortest round-trip form.
private func redisArgument(at index: Int32, on L: LuaThread) -> RedisArgument? {
    switch lua_type(L, index) {
    case LUA_TSTRING:
        var length = 0
        guard let p = weir_tostring(L, index, &length) else { return nil }
        var buffer = ByteBufferAllocator().buffer(capacity: length)
        buffer.writeBytes(UnsafeRawBufferPointer(start: p, count: length))
        return .bytes(buffer)
    case LUA_TNUMBER:
        if lua_isinteger(L, index) != 0 { return .integer(Int(lua_tointegerx(L, index, nil))) }
        let d = lua_tonumberx(L, index, nil)
        if d == d.rounded(), abs(d) < 9.0e15 { return .integer(Int(d)) }
        return .string("\(d)")
    default:
        return nil
    }
}

/// The array of command arguments in the table at `index`.
private func redisCommand(at index: Int32, on L: LuaThread) -> [RedisArgument]? {
    guard lua_type(L, index) == LUA_TTABLE else { return nil }
    let count = Int(lua_rawlen(L, index))
    guard count > 0 else { return nil }
    var command: [RedisArgument] = []
    command.reserveCapacity(count)
    for i in 1...count {
        lua_rawgeti(L, index, lua_Integer(i))
        let argument = redisArgument(at: -1, on: L)
        weir_pop(L, 1)
        guard let argument = argument else { return nil }
        command.append(argument)
    }
    return command
}

/// Transactions cannot work on the loop's shared, pipelined connection:
/// between one request's MULTI and EXEC the server would queue every other
/// request's commands into the transaction. Refused here, before sending
/// (WeirRedis refuses the commands that break reply matching itself).
private let transactionCommands: Set<String> = ["MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH"]

private func sdkRefusal(_ command: [RedisArgument]) -> String? {
    guard case .bytes(let bytes)? = command.first, bytes.readableBytes <= 7 else { return nil }
    let name = String(buffer: bytes).uppercased()
    guard transactionCommands.contains(name) else { return nil }
    return "refused (\(name): transactions are not available on the shared connection; use a script (eval) instead)"
}

/// What a plugin sees as `err` for a failed command. Server error replies
/// pass through as Redis wrote them ("ERR ...", "WRONGTYPE ..."); both
/// timeouts are just "timeout" so plugins can test for it.
func redisErrorMessage(_ error: Error) -> String {
    guard let error = error as? RedisError else { return "\(error)" }
    switch error.kind {
    case .server, .handshakeFailed: return error.message
    case .commandTimeout, .connectTimeout: return "timeout"
    case .connectFailed:
        if error.message.lowercased().contains("refused") { return "connection refused (\(error.message))" }
        return "connect failed (\(error.message))"
    case .unavailable: return "unavailable (\(error.message))"
    case .connectionClosed: return "closed (\(error.message))"
    case .refused: return "refused (\(error.message))"
    case .protocolError, .unexpectedReply, .shutDown: return error.message
    }
}

/// Pushes a reply as Lua values: strings as strings (bytes kept), integers
/// as integers, arrays as tables. A null bulk/array is `nil` at the top
/// level and `weir.null` (the NULL light userdata) inside arrays, so arrays
/// keep their length. An error reply inside an array (EXEC) is `{false, "ERR ..."}`.
func pushRedisReply(_ value: RESPValue, topLevel: Bool, on L: LuaThread) {
    _ = lua_checkstack(L, 4)
    switch value {
    case .simpleString(let bytes), .bulkString(let bytes?):
        bytes.withUnsafeReadableBytes { p in
            _ = lua_pushlstring(L, p.baseAddress?.assumingMemoryBound(to: CChar.self), p.count)
        }
    case .integer(let i):
        lua_pushinteger(L, lua_Integer(i))
    case .bulkString(nil), .array(nil):
        if topLevel { lua_pushnil(L) } else { lua_pushlightuserdata(L, nil) }
    case .error(let message):
        pushRedisFailure(message, on: L)
    case .array(let items?):
        lua_createtable(L, Int32(items.count), 0)
        for (i, item) in items.enumerated() {
            pushRedisReply(item, topLevel: false, on: L)
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
    }
}

/// `{false, message}`: one failed command inside an array or pipeline result.
private func pushRedisFailure(_ message: String, on L: LuaThread) {
    lua_createtable(L, 2, 0)
    lua_pushboolean(L, 0)
    lua_rawseti(L, -2, 1)
    LuaState.push(message, on: L)
    lua_rawseti(L, -2, 2)
}

extension LuaRuntime {
    func makeRedisNatives() -> NativeList {
        var n = NativeList()

        // weir.null: the NULL light userdata, equal to every other NULL light userdata.
        n.append(("redis_null", { L in lua_pushlightuserdata(L, nil); return .values(1) }))

        // SHA-1 of a script source, for EVALSHA (red:script).
        n.append(("redis_sha1", { L in
            guard let source = LuaState.string(at: 1, on: L) else { return .error("weir.redis: script source must be a string") }
            LuaState.push(RedisScript(source).sha1, on: L)
            return .values(1)
        }))

        // redis_command(host, port, db, user, password, timeout, {args...}) -> reply | nil, err
        n.append(("redis_command", scopeNative("weir.redis") { [unowned(unsafe) self] L, scope in
            guard let (configuration, timeout) = redisConfiguration(on: L) else {
                return .error("weir.redis: invalid connection options")
            }
            guard let command = redisCommand(at: 7, on: L) else {
                return .error("weir.redis: a command is a non-empty array of strings and numbers")
            }
            if let refusal = sdkRefusal(command) {
                lua_pushnil(L); LuaState.push(refusal, on: L); return .values(2)
            }
            let client = RedisClients.forLoop(self.eventLoop!, configuration)
            return self.suspend("weir.redis", L, scope, client.send(command: command, timeout: timeout)
                .map { reply in [AsyncValue.pushed { pushRedisReply(reply, topLevel: true, on: $0) }] }
                .recover { [AsyncValue.value(.null), AsyncValue.value(.string(redisErrorMessage($0)))] })
        }))

        // redis_pipeline(host, port, db, user, password, timeout, {{args...}, ...})
        //   -> { reply | {false, "ERR ..."}, ... } | nil, err
        // All commands are handed to the client in the same tick, so they go
        // out in one write and their replies come back in one round trip.
        n.append(("redis_pipeline", scopeNative("weir.redis") { [unowned(unsafe) self] L, scope in
            guard let (configuration, timeout) = redisConfiguration(on: L) else {
                return .error("weir.redis: invalid connection options")
            }
            guard lua_type(L, 7) == LUA_TTABLE else { return .error("weir.redis: pipeline commands must be a table") }
            var commands: [[RedisArgument]] = []
            let count = Int(lua_rawlen(L, 7))
            if count > 0 {
                for i in 1...count {
                    lua_rawgeti(L, 7, lua_Integer(i))
                    let command = redisCommand(at: -1, on: L)
                    weir_pop(L, 1)
                    guard let command = command else {
                        return .error("weir.redis: pipeline command #\(i) is not a non-empty array of strings and numbers")
                    }
                    if let refusal = sdkRefusal(command) {
                        lua_pushnil(L); LuaState.push(refusal, on: L); return .values(2)
                    }
                    commands.append(command)
                }
            }
            let loop = self.eventLoop!
            let client = RedisClients.forLoop(loop, configuration)
            let futures = commands.map { client.send(command: $0, timeout: timeout) }
            let all: EventLoopFuture<[AsyncValue]> = EventLoopFuture.whenAllComplete(futures, on: loop).map { results in
                // A server error fails only its command; anything else (timeout,
                // connection lost) fails the pipeline as a whole.
                for case .failure(let error) in results {
                    if let redisError = error as? RedisError, redisError.kind == .server { continue }
                    return [.value(.null), .value(.string(redisErrorMessage(error)))]
                }
                return [.pushed { L in
                    lua_createtable(L, Int32(results.count), 0)
                    for (i, result) in results.enumerated() {
                        switch result {
                        case .success(let reply): pushRedisReply(reply, topLevel: false, on: L)
                        case .failure(let error): pushRedisFailure(redisErrorMessage(error), on: L)
                        }
                        lua_rawseti(L, -2, lua_Integer(i + 1))
                    }
                }]
            }
            return self.suspend("weir.redis", L, scope, all)
        }))
        return n
    }
}
