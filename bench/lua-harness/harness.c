/* The Lua side of a plugin's cost, without the proxy: loads lua/weir (the
 * SDK) with stub natives (C functions that return fixed answers) and runs a
 * driver script's loop. Under callgrind, (instructions of N iterations -
 * instructions of 0) / N is what the plugins' Lua code and the SDK's Lua
 * wrappers cost per request, with symbols for the Lua VM (linked statically
 * against liblua5.4.a; the shared library the proxy uses is stripped).
 * bench/lua-harness/run.sh builds and runs it; see its header. */
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int weir_push_clib(lua_State *L);   /* Sources/CLuaShims/clib.c: weir.time, weir.crypto's C half */

/* Stub natives: the answers of a key-auth + rate-limiting request that
 * passes (key "bench-key" in the apikey header, consumer "bench-consumer"). */
static int n_none(lua_State *L) { (void)L; return 0; }
static int n_any(lua_State *L) { lua_pushcfunction(L, n_none); return 1; }   /* N's __index */
static int n_get_header(lua_State *L) {
    size_t n;
    const char *s = lua_tolstring(L, 1, &n);
    if (s && n == 6 && memcmp(s, "apikey", 6) == 0) { lua_pushliteral(L, "bench-key"); return 1; }
    return 0;
}
static int n_empty(lua_State *L) { lua_pushliteral(L, ""); return 1; }
static int n_method(lua_State *L) { lua_pushliteral(L, "GET"); return 1; }
static int n_route(lua_State *L) { lua_pushliteral(L, "all"); return 1; }
static int n_consumer(lua_State *L) { lua_pushliteral(L, "bench-consumer"); return 1; }
static int n_route_and_consumer(lua_State *L) { lua_pushliteral(L, "all"); lua_pushliteral(L, "bench-consumer"); return 2; }
static int n_ip(lua_State *L) { lua_pushliteral(L, "127.0.0.1"); return 1; }
static int n_one(lua_State *L) { lua_pushinteger(L, 1); return 1; }
static lua_Integer counter;
static int n_incr(lua_State *L) { counter += lua_tointeger(L, 3); lua_pushinteger(L, counter); return 1; }
static int n_previous(lua_State *L) { lua_pushinteger(L, 5); return 1; }
/* dict:incr_get(key, delta, init, ttl, other_key): the count and the previous window's. */
static int n_dict_incr_get(lua_State *L) { counter += lua_tointeger(L, 3); lua_pushinteger(L, counter); lua_pushinteger(L, 5); return 2; }
/* identify_header_credential(plugin, field, name, hide): the consumer (a
 * table kept in the registry, as the native's lookup pushes one), no value,
 * and "no query string". */
static int consumer_ref = LUA_NOREF;
static int n_identify_header_credential(lua_State *L) {
    if (consumer_ref == LUA_NOREF) { lua_createtable(L, 0, 1); consumer_ref = luaL_ref(L, LUA_REGISTRYINDEX); }
    lua_rawgeti(L, LUA_REGISTRYINDEX, consumer_ref); lua_pushnil(L); lua_pushboolean(L, 0); return 3;
}
/* dict:incr_sliding(key, prev_key, window, elapsed, limit, ttl): admitted, a remaining count. */
static int n_dict_incr_sliding(lua_State *L) { counter += 1; lua_pushinteger(L, 999999000 - counter); return 1; }
/* dict:incr(key, delta, init): the new count. */
static int n_dict_incr(lua_State *L) { counter += lua_tointeger(L, 3); lua_pushinteger(L, counter); return 1; }
/* (with a prepared set after ttl, the set is made by the native too: nothing more here) */
/* weir.response.prepare_headers' native: the set's id. */
static int n_prepare_headers(lua_State *L) { lua_pushinteger(L, 0); return 1; }

/* clib.with_fallback (Sources/CLuaShims/shims.c) wraps a native with its Lua
 * fallback; the stubs never need one, so the SDK function is the stub itself. */
int weir_with_fallback(lua_State *L) { lua_pushvalue(L, 1); return 1; }

/* chain_run(n, list): n requests of a phase chain as the proxy's runner
 * (Sources/CLuaShims/chain.c) runs one, without its timing, budget and
 * coroutine: a ctx table made as weir_chain_start makes it, then each
 * entry's fn(self, conf, ctx) from C. `list` is fn, self, conf per entry;
 * an empty list runs the bare loop (no ctx table), the baseline.
 * An entry that returns anything (an exit) is an error here. */
static int chain_run(lua_State *L) {
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    int slots = (int)lua_rawlen(L, 2);
    luaL_checkstack(L, slots + 8, "chain_run");
    for (int k = 1; k <= slots; k++) lua_rawgeti(L, 2, k);
    const int first = 3, ctx = first + slots;
    for (lua_Integer r = 0; r < n; r++) {
        if (slots == 0) continue;  /* the baseline: the loop alone */
        lua_createtable(L, 0, 1);
        for (int e = 0; e < slots; e += 3) {
            lua_pushvalue(L, first + e);
            lua_pushvalue(L, first + e + 1);
            lua_pushvalue(L, first + e + 2);
            lua_pushvalue(L, ctx);
            lua_call(L, 3, LUA_MULTRET);
            if (lua_gettop(L) != ctx) return luaL_error(L, "chain entry %d returned an exit", e / 3 + 1);
        }
        lua_settop(L, ctx - 1);
    }
    return 0;
}

static void set_native(lua_State *L, const char *name, lua_CFunction f) {
    lua_pushcfunction(L, f);
    lua_setfield(L, -2, name);
}

static void load_file(lua_State *L, const char *path) {
    if (luaL_loadfile(L, path) != LUA_OK) { fprintf(stderr, "%s\n", lua_tostring(L, -1)); exit(1); }
}

static void call(lua_State *L, int nargs, int nresults) {
    if (lua_pcall(L, nargs, nresults, 0) != LUA_OK) { fprintf(stderr, "error: %s\n", lua_tostring(L, -1)); exit(1); }
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: harness REPO_DIR ITERATIONS DRIVER.lua\n"); return 2; }
    const char *root = argv[1];
    lua_Integer iterations = atoll(argv[2]);
    char path[4096];
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);

    /* init.lua gets (N, S, json, clib), as LuaRuntime.installSDK passes them. */
    snprintf(path, sizeof path, "%s/lua/weir/json.lua", root); load_file(L, path); call(L, 0, 1);   /* json */
    snprintf(path, sizeof path, "%s/lua/weir/init.lua", root); load_file(L, path);                  /* json, init */
    lua_newtable(L);                                                                                  /* N */
    set_native(L, "req_get_header", n_get_header);
    set_native(L, "req_get_raw_query", n_empty);
    set_native(L, "req_get_method", n_method);
    set_native(L, "req_get_route", n_route);
    set_native(L, "req_get_route_and_consumer", n_route_and_consumer);
    set_native(L, "client_find_credential", n_consumer);
    set_native(L, "client_identify_credential", n_consumer);
    set_native(L, "client_identify_header_credential", n_identify_header_credential);
    set_native(L, "client_get_consumer", n_consumer);
    set_native(L, "client_identify", n_none);
    set_native(L, "client_get_ip", n_ip);
    set_native(L, "shared_id", n_one);
    set_native(L, "shared_incr", n_incr);
    set_native(L, "shared_get", n_previous);
    set_native(L, "shared_dict_incr", n_dict_incr);
    set_native(L, "shared_dict_incr_get", n_dict_incr_get);
    set_native(L, "shared_dict_incr_sliding", n_dict_incr_sliding);
    set_native(L, "resp_prepare_headers", n_prepare_headers);
    /* Every other native (setters, authenticate, ...) does nothing. */
    lua_newtable(L);
    lua_pushcfunction(L, n_any);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    lua_createtable(L, 2, 0);                                                                         /* S: the request phase */
    lua_pushinteger(L, 2); lua_rawseti(L, -2, 1);
    lua_pushinteger(L, 0); lua_rawseti(L, -2, 2);
    lua_rotate(L, -4, -1);                                                                            /* init, N, S, json */
    weir_push_clib(L);
    call(L, 4, 2);                                                                                    /* weir, internal */
    lua_pop(L, 1);
    lua_pushvalue(L, -1); lua_setglobal(L, "weir");
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED"); lua_rotate(L, -2, 1); lua_setfield(L, -2, "weir"); lua_pop(L, 1);

    lua_register(L, "chain_run", chain_run);
    load_file(L, argv[3]);                                                                            /* the driver returns run(n) */
    lua_pushstring(L, root);
    call(L, 1, 1);
    lua_pushinteger(L, iterations);
    call(L, 1, 0);
    lua_close(L);
    return 0;
}
