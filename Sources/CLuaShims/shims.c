// The C half of the Lua bridge: allocator, panic handler,
// trampolines into Swift and protected entry points. Every place where Lua
// may longjmp (lua_error, lua_yield, allocation failure, the budget hook of
// watchdog.c) is reached only through C frames; see the contract in CLuaShims.h.
#include <lua5.4/lua.h>
#include <lua5.4/lualib.h>
#include <lua5.4/lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "CLuaShims.h"

const char *weir_lua_version(void) { return LUA_VERSION; }

// MARK: - Allocator with a per-state cap

// Small blocks (up to WEIR_SMALL_MAX bytes, in 16-byte classes) that Lua
// frees are kept on per-state free lists and handed to the next allocation
// of their class: per-request garbage (a weir.ctx table and its node
// vector, short strings, closures) comes and goes in these sizes, and a
// generational sweep frees hundreds at once, more than glibc's per-thread
// cache keeps. Every live block of at most WEIR_SMALL_MAX bytes was
// allocated here at its class's full size, so any block of a class serves
// any request of that class. Kept blocks are free as far as Lua and the
// memory cap are concerned (bytes_used counts live blocks only); at most
// WEIR_SMALL_CACHE_BYTES of them are kept, the rest go back to malloc.

static inline int small_class(size_t n) { return (int)((n - 1) >> WEIR_SMALL_SHIFT); }

static inline size_t class_size(int c) { return (size_t)(c + 1) << WEIR_SMALL_SHIFT; }

/// A kept block of class `c`, or NULL.
static inline void *small_pop(weir_state_info *st, int c) {
    void *p = st->small_free[c];
    if (p != NULL) {
        st->small_free[c] = *(void **)p;
        st->small_cached_bytes -= class_size(c);
    }
    return p;
}

/// Keeps `p` (a block of class `c`) unless the cache is full; 0 if not kept.
static inline int small_push(weir_state_info *st, void *p, int c) {
    if (st->small_cached_bytes + class_size(c) > WEIR_SMALL_CACHE_BYTES) return 0;
    *(void **)p = st->small_free[c];
    st->small_free[c] = p;
    st->small_cached_bytes += class_size(c);
    return 1;
}

static void *small_take(weir_state_info *st, size_t n) {
    int c = small_class(n);
    void *p = small_pop(st, c);
    return p != NULL ? p : malloc(class_size(c));
}

static void small_give(weir_state_info *st, void *p, size_t n) {
    if (!small_push(st, p, small_class(n))) free(p);
}

/// Frees a block Lua gave back (`size` its size as Lua knows it).
static inline void block_free(weir_state_info *st, void *p, size_t size) {
    if (size <= WEIR_SMALL_MAX) small_give(st, p, size); else free(p);
}

/// Allocates a new block, or resizes `ptr` (`old` > 0 bytes); NULL on failure
/// with `ptr` untouched, as lua_Alloc requires.
static void *block_alloc(weir_state_info *st, void *ptr, size_t old, size_t nsize) {
    if (ptr == NULL) return nsize <= WEIR_SMALL_MAX ? small_take(st, nsize) : malloc(nsize);
    if (old <= WEIR_SMALL_MAX) {
        if (nsize <= WEIR_SMALL_MAX && small_class(nsize) == small_class(old)) return ptr;
    } else if (nsize > WEIR_SMALL_MAX) {
        return realloc(ptr, nsize);
    }
    // Across the small/large line or between classes: move.
    void *p = nsize <= WEIR_SMALL_MAX ? small_take(st, nsize) : malloc(nsize);
    if (p == NULL) return NULL;
    memcpy(p, ptr, old < nsize ? old : nsize);
    block_free(st, ptr, old);
    return p;
}

static void small_release_all(weir_state_info *st) {
    for (int c = 0; c < WEIR_SMALL_CLASSES; c++) {
        void *p = st->small_free[c];
        while (p != NULL) {
            void *next = *(void **)p;
            free(p);
            p = next;
        }
        st->small_free[c] = NULL;
    }
    st->small_cached_bytes = 0;
}

// Everything but the two common cases below: large blocks, resizes, a class
// with no kept block, a full cache, the cap.
__attribute__((noinline))
static void *weir_alloc_general(weir_state_info *st, void *ptr, size_t osize, size_t nsize) {
    // When ptr is NULL, osize encodes the object type, not a size.
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        // (Lua also "frees" empty arrays as NULL.)
        if (ptr != NULL) {
            block_free(st, ptr, old);
            st->bytes_used -= old;
        }
        return NULL;
    }
    if (nsize > old && st->bytes_limit != 0 && st->bytes_used - old + nsize > st->bytes_limit) {
        // Refusing makes Lua raise a memory error at this point. That is only
        // safe when no Swift frame sits between here and the protected call.
        if (st->swift_depth == 0) return NULL;
        st->overdraft = 1;
    }
    void *p = block_alloc(st, ptr, old, nsize);
    if (p == NULL) {
        if (st->swift_depth > 0) {
            // Lua would longjmp through Swift; the process is out of memory anyway.
            fprintf(stderr, "weir: out of memory while Swift code held the Lua state; aborting\n");
            abort();
        }
        return NULL;
    }
    st->bytes_used = st->bytes_used - old + nsize;
    if (st->bytes_used > st->bytes_peak) st->bytes_peak = st->bytes_used;
    return p;
}

static void *weir_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    weir_state_info *st = (weir_state_info *)ud;
    // The common cases in a few instructions, without the general path's
    // frame: a new small block from its class's list within the cap, and a
    // small block back onto its list (`n - 1 < WEIR_SMALL_MAX`: 1...MAX, 0
    // wraps around).
    if (ptr == NULL) {
        if (nsize - 1 < WEIR_SMALL_MAX) {
            size_t used = st->bytes_used + nsize;
            void *p;
            if ((st->bytes_limit == 0 || used <= st->bytes_limit) && (p = small_pop(st, small_class(nsize))) != NULL) {
                st->bytes_used = used;
                if (used > st->bytes_peak) st->bytes_peak = used;
                return p;
            }
        } else if (nsize == 0) {
            // Lua "frees" an empty array part as NULL (each hash-only
            // table made and freed: twice); tested only off the small path.
            return NULL;
        }
    } else if (nsize == 0 && osize - 1 < WEIR_SMALL_MAX && small_push(st, ptr, small_class(osize))) {
        st->bytes_used -= osize;
        return NULL;
    }
    return weir_alloc_general(st, ptr, osize, nsize);
}

// The info block is also the allocator's userdata, but reading it from
// each thread's extra space (weir_info) is a load instead of a call of
// lua_getallocf, on every native call.

size_t weir_bytes_used(lua_State *L) { return weir_info(L)->bytes_used; }

// MARK: - Panic and warnings (the budget hook lives in watchdog.c)

static int weir_panic(lua_State *L) {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "weir: unprotected Lua error (bug in the Lua bridge): %s\n", msg ? msg : "(non-string error)");
    fflush(stderr);
    abort();
    return 0;
}

static void weir_warn(void *ud, const char *msg, int tocont) {
    (void)ud;
    // Lua emits warnings for errors in __gc finalizers; keep them visible.
    fputs(msg, stderr);
    if (!tocont) fputs("\n", stderr);
}

lua_State *weir_newstate(size_t bytes_limit, int hook_interval) {
    weir_state_info *st = (weir_state_info *)calloc(1, sizeof *st);
    if (st == NULL) return NULL;
    st->bytes_limit = bytes_limit;
    st->swift_depth = 1; // the creator (Swift) holds the state
    st->hook_interval = hook_interval;
    lua_State *L = lua_newstate(weir_alloc, st);
    if (L == NULL) { free(st); return NULL; }
    *(weir_state_info **)lua_getextraspace(L) = st;   // read by weir_info
    lua_atpanic(L, weir_panic);
    lua_setwarnf(L, weir_warn, NULL);
    // Generational: per-request garbage (weir.ctx tables, strings) dies
    // young and is swept in minor collections, instead of incremental
    // cycles that walk the whole heap, which at a few hundred requests in
    // flight misses the cache (BENCHMARKS.md, luascale section).
    lua_gc(L, LUA_GCGEN, 0, 0);
    // No hook here: Lua runs hook-free until the watchdog (watchdog.c) sees
    // a call that has run too long.
    return L;
}

void weir_close(lua_State *L) {
    weir_state_info *st = weir_info(L);
    lua_close(L);
    small_release_all(st);
    free(st->chain_marks);
    free(st);
}

void weir_set_dispatch(lua_State *L, weir_dispatch_fn fn, void *context) {
    weir_state_info *st = weir_info(L);
    st->dispatch = fn;
    st->context = context;
    // A new (or no) dispatcher: the hot natives belonged to the old one.
    for (int i = 0; i < WEIR_HOT_NATIVES; i++) st->hot[i] = NULL;
}

int weir_set_hot_native(lua_State *L, int id, weir_hot_fn fn) {
    if (id < 0 || id >= WEIR_HOT_NATIVES) return 0;
    weir_info(L)->hot[id] = fn;
    return 1;
}

void weir_set_budget(lua_State *L, int64_t instructions) {
    weir_state_info *st = weir_info(L);
    st->budget_limit = instructions;
    st->budget_remaining = instructions;
    st->budget_exhausted = 0;
    st->budget_armed = 0;
}

// MARK: - Trampoline into Swift

// The fallback's results are the call's results (they start at index 1).
static int fallback_returned(lua_State *L, int status, lua_KContext k) {
    (void)status; (void)k;
    return lua_gettop(L);
}

// What a native's Swift call answered (`rc`) when it is not just results:
// the overdraft's error, its error, its fallback's results or its yield.
// Called once the Swift frame is gone. `nargs`: the arguments as the
// caller passed them.
__attribute__((noinline))
static int native_answered(lua_State *L, weir_state_info *st, int rc, int overdraft, int nargs, int yield_count,
                           int fallback_upvalue) {
    // From here on no Swift frame is above us: raising and yielding are safe.
    if (overdraft && st->swift_depth == 0) {
        lua_pushfstring(L, "not enough memory (Lua state memory cap of %I bytes reached)", (lua_Integer)st->bytes_limit);
        return lua_error(L);
    }
    if (rc == WEIR_CALL_ERROR) return lua_error(L);
    if (rc == WEIR_CALL_FALLBACK) {
        lua_settop(L, nargs);                  // the arguments as the caller passed them
        if (lua_type(L, lua_upvalueindex(fallback_upvalue)) != LUA_TFUNCTION) {
            lua_pushboolean(L, 0);
            return 1;
        }
        lua_pushvalue(L, lua_upvalueindex(fallback_upvalue));
        lua_insert(L, 1);
        // With a continuation: a fallback that waits (a native that yields) resumes here.
        lua_callk(L, nargs, LUA_MULTRET, 0, fallback_returned);
        return lua_gettop(L);
    }
    if (rc == WEIR_CALL_YIELD) {
        if (!lua_isyieldable(L)) {
            lua_pushliteral(L, "attempt to yield across a C-call boundary");
            return lua_error(L);
        }
        return lua_yield(L, yield_count);
    }
    return rc;
}

// The bookkeeping around a native's Swift call (`CALL`, which sets `rc`):
// the memory cap's overdraft and the Swift depth (see the contract in
// CLuaShims.h). Results alone return here; anything else is
// native_answered's, out of line.
#define CALL_SWIFT(st, CALL, yield_count, fallback_upvalue) do { \
        int nargs = lua_gettop(L); \
        int outer_overdraft = (st)->overdraft; \
        (st)->overdraft = 0; \
        (st)->swift_depth++; \
        int rc = CALL; \
        (st)->swift_depth--; \
        int overdraft = (st)->overdraft; \
        (st)->overdraft = outer_overdraft; \
        if (__builtin_expect(rc >= 0 && !overdraft, 1)) return rc; \
        return native_answered(L, (st), rc, overdraft, nargs, (yield_count), (fallback_upvalue)); \
    } while (0)

// The call into Swift for native `function_id`; `fallback_upvalue` is the
// upvalue holding its Lua fallback (none: the call answers false).
static inline int call_native(lua_State *L, int function_id, int fallback_upvalue) {
    weir_state_info *st = weir_info(L);
    if (st->dispatch == NULL) {
        lua_pushliteral(L, "weir: native function called on a closed runtime");
        return lua_error(L);
    }
    int yield_count = 0;
    CALL_SWIFT(st, st->dispatch(L, st->context, function_id, &yield_count), yield_count, fallback_upvalue);
}

// A hot native: its Swift function called directly (no dispatcher, no id
// switch), with the same bookkeeping. Not set (a plain LuaState, a closed
// runtime): the dispatcher's path.
static inline int call_hot(lua_State *L, int function_id, int fallback_upvalue) {
    weir_state_info *st = weir_info(L);
    weir_hot_fn fn = st->hot[function_id];
    if (__builtin_expect(fn == NULL, 0)) return call_native(L, function_id, fallback_upvalue);
    CALL_SWIFT(st, fn(L, st->context), 0, fallback_upvalue);
}

// Any native: its id in upvalue 1, its fallback (if any) in upvalue 2.
static int weir_trampoline(lua_State *L) {
    return call_native(L, (int)lua_tointeger(L, lua_upvalueindex(1)), 2);
}

// The first WEIR_FIXED_NATIVES natives get a C function each, with the id
// compiled in: reading it from an upvalue (lua_tointeger) cost ~42
// instructions per call. Their fallback (if any) is upvalue 1.
#define WEIR_FIXED_NATIVES 256
// Ids as two hex digits, so each entry's name and id are one token.
#define FIXED_ROW(M, h) M(h, 0) M(h, 1) M(h, 2) M(h, 3) M(h, 4) M(h, 5) M(h, 6) M(h, 7) \
                        M(h, 8) M(h, 9) M(h, a) M(h, b) M(h, c) M(h, d) M(h, e) M(h, f)
#define FIXED_TABLE(M) FIXED_ROW(M, 0) FIXED_ROW(M, 1) FIXED_ROW(M, 2) FIXED_ROW(M, 3) \
                       FIXED_ROW(M, 4) FIXED_ROW(M, 5) FIXED_ROW(M, 6) FIXED_ROW(M, 7) \
                       FIXED_ROW(M, 8) FIXED_ROW(M, 9) FIXED_ROW(M, a) FIXED_ROW(M, b) \
                       FIXED_ROW(M, c) FIXED_ROW(M, d) FIXED_ROW(M, e) FIXED_ROW(M, f)
#define FIXED_NATIVE(h, l) static int weir_native_##h##l(lua_State *L) { \
        return 0x##h##l < WEIR_HOT_NATIVES ? call_hot(L, 0x##h##l, 1) : call_native(L, 0x##h##l, 1); }
#define FIXED_NATIVE_NAME(h, l) weir_native_##h##l,
FIXED_TABLE(FIXED_NATIVE)
static const lua_CFunction fixed_natives[WEIR_FIXED_NATIVES] = { FIXED_TABLE(FIXED_NATIVE_NAME) };

void weir_push_native(lua_State *L, int function_id) {
    if (function_id >= 0 && function_id < WEIR_FIXED_NATIVES) {
        lua_pushcfunction(L, fixed_natives[function_id]);
        return;
    }
    lua_pushinteger(L, function_id);
    lua_pushcclosure(L, weir_trampoline, 1);
}

// The id of the native at `index`, or -1 when it is not one.
static int native_id(lua_State *L, int index) {
    lua_CFunction f = lua_tocfunction(L, index);
    if (f == NULL) return -1;
    if (f == weir_trampoline) {
        if (lua_getupvalue(L, index, 1) == NULL) return -1;
        int id = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        return id;
    }
    // Only at SDK load (with_fallback), so a scan is fine.
    for (int i = 0; i < WEIR_FIXED_NATIVES; i++) if (fixed_natives[i] == f) return i;
    return -1;
}

int weir_with_fallback(lua_State *L) {
    int id = native_id(L, 1);
    if (id < 0) {
        lua_pushliteral(L, "with_fallback: argument #1 must be a native function");
        return lua_error(L);
    }
    if (lua_type(L, 2) != LUA_TFUNCTION) {
        lua_pushliteral(L, "with_fallback: argument #2 must be a function");
        return lua_error(L);
    }
    if (id < WEIR_FIXED_NATIVES) {
        lua_pushvalue(L, 2);                   // upvalue: fallback
        lua_pushcclosure(L, fixed_natives[id], 1);
    } else {
        lua_pushinteger(L, id);                // upvalues: function id, fallback
        lua_pushvalue(L, 2);
        lua_pushcclosure(L, weir_trampoline, 2);
    }
    return 1;
}

// MARK: - Protected entry points

// Message handler: appends a traceback so errors point into the script.
static int weir_msgh(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
            msg = lua_tostring(L, -1);
        } else {
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        }
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

int weir_pcall(lua_State *L, int nargs, int nresults) {
    weir_state_info *st = weir_info(L);
    int base = lua_gettop(L) - nargs; // index of the function
    lua_pushcfunction(L, weir_msgh);
    lua_insert(L, base);
    int saved = st->swift_depth;
    st->swift_depth = 0;
    st->overdraft = 0;
    weir_watch_token token = weir_watch_enter(L);
    int status = lua_pcall(L, nargs, nresults, base);
    weir_watch_exit(token, L);
    st->swift_depth = saved;
    lua_remove(L, base);
    return status;
}

int weir_resume(lua_State *co, lua_State *from, int nargs, int *nresults) {
    weir_state_info *st = weir_info(co);
    int saved = st->swift_depth;
    st->swift_depth = 0;
    st->overdraft = 0;
    weir_watch_token token = weir_watch_enter(co);
    int status = lua_resume(co, from, nargs, nresults);
    weir_watch_exit(token, co);
    st->swift_depth = saved;
    return status;
}

int weir_load(lua_State *L, const char *code, size_t size, const char *chunkname) {
    weir_state_info *st = weir_info(L);
    int saved = st->swift_depth;
    st->swift_depth = 0; // lua_load is protected: a huge chunk fails cleanly
    int status = luaL_loadbufferx(L, code, size, chunkname, "t");
    st->swift_depth = saved;
    return status;
}

int weir_traceback(lua_State *L, lua_State *co, const char *msg) {
    // Called with Swift on the stack: the allocator does not refuse, so
    // luaL_traceback cannot raise here.
    luaL_traceback(L, co, msg, 0);
    return 0;
}

void weir_full_gc(lua_State *L) { lua_gc(L, LUA_GCCOLLECT); }

int weir_gc_is_generational(lua_State *L) {
    // Switching to the mode it is in changes nothing; the answer is the previous mode.
    int previous = lua_gc(L, LUA_GCGEN, 0, 0);
    if (previous == LUA_GCINC) lua_gc(L, LUA_GCINC, 0, 0, 0);
    return previous == LUA_GCGEN;
}

int weir_resetthread(lua_State *co) {
    weir_state_info *st = weir_info(co);
    int saved = st->swift_depth;
    st->swift_depth = 0; // __close handlers run Lua code under the usual caps
    weir_watch_token token = weir_watch_enter(co);
    int status = lua_resetthread(co);
    weir_watch_exit(token, co);
    st->swift_depth = saved;
    lua_settop(co, 0);
    return status;
}

int weir_gc_count_kb(lua_State *L) { return lua_gc(L, LUA_GCCOUNT); }

// collectgarbage for plugins. One state serves every plugin of an event
// loop, and the gateway chose its collector (generational, weir_newstate):
// a plugin may collect, step, count and ask whether it runs, but not stop
// the collector (the state would grow to its memory cap and fail every
// request) nor switch its mode or tuning for all the others. The error is
// the base library's kind, at the plugin's line:
//   handler.lua:7: bad argument #1 to 'collectgarbage' (option "stop" is not allowed in plugins: ...)
static int guarded_collectgarbage(lua_State *L) {
    // Lua 5.4's options, checked here so that errors name 'collectgarbage'
    // (the base library's own function is no longer a global to name).
    static const char *const options[] = { "collect", "count", "step", "isrunning", "restart",
                                           "stop", "incremental", "generational", "setpause", "setstepmul", NULL };
    static const int first_refused = 5;
    int option = luaL_checkoption(L, 1, "collect", options);
    if (option >= first_refused) {
        return luaL_argerror(L, 1, lua_pushfstring(L,
            "option \"%s\" is not allowed in plugins: the collector is the gateway's, shared by every "
            "plugin on this event loop", options[option]));
    }
    lua_pushvalue(L, lua_upvalueindex(1));   // the base library's collectgarbage
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static int install_guarded_collectgarbage(lua_State *L) {
    lua_getglobal(L, "collectgarbage");
    if (lua_type(L, -1) != LUA_TFUNCTION) return 0;
    lua_pushcclosure(L, guarded_collectgarbage, 1);
    lua_setglobal(L, "collectgarbage");
    return 0;
}

int weir_guard_collectgarbage(lua_State *L) {
    lua_pushcfunction(L, install_guarded_collectgarbage);
    return lua_pcall(L, 0, 0, 0);
}
