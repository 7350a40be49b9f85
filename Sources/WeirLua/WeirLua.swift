import CLuaShims

/// The Lua runtime's version string ("Lua 5.4").
public var luaVersion: String { String(cString: weir_lua_version()) }
