// The phase chain runner: one lua_resume runs every plugin of a phase's
// chain in order, instead of one Swift -> Lua entry per plugin (each entry
// cost ~1.2k instructions: resume, watchdog bracket, stack set-up, Swift
// bookkeeping). It is a C function, so a plugin's error or yield unwinds
// through C frames only (DESIGN.md "Lua bridging rules"); a plugin that
// yields (weir.sleep, weir.http) resumes in `after_call`, lua_callk's
// continuation.
//
// Swift reads where the run stopped from the state's info block
// (`chain_entry`: which plugin returned an exit, raised or yielded) and,
// when a phase observer wants durations, when each plugin started
// (`chain_marks`, read before anything else runs on the state).
#define _GNU_SOURCE
#include <stdlib.h>
#include <time.h>
#include <lua5.4/lua.h>
#include "CLuaShims.h"

// The runner's stack: its arguments, in this order.
enum { LIST = 1, LAST = 2, CTX = 3, CHECK_EXIT = 4, FIRST = 5 };

static void begin_entry(lua_State *L, weir_state_info *st, lua_Integer i) {
    st->chain_entry = (int)i;
    if (st->chain_timing && i < st->chain_marks_capacity) st->chain_marks[i] = weir_monotonic_ns();
    // Each plugin's call has its own instruction budget, as when every
    // call was a resume of its own.
    weir_watch_restart(L);
}

static int run_from(lua_State *L, lua_Integer i);

/// After plugin `i` returned (directly, or after yields): stop at an exit
/// (a non-nil first result in the request and response phases), else go on.
static int after_call(lua_State *L, int status, lua_KContext k) {
    (void)status;
    lua_Integer i = (lua_Integer)k;
    if (lua_toboolean(L, CHECK_EXIT) && !lua_isnil(L, -3)) return 3;
    lua_settop(L, FIRST);
    return run_from(L, i + 1);
}

static int run_from(lua_State *L, lua_Integer i) {
    weir_state_info *st = weir_info(L);
    lua_Integer last = lua_tointeger(L, LAST);
    int nresults = lua_toboolean(L, CHECK_EXIT) ? 3 : 0;
    for (; i <= last; i++) {
        begin_entry(L, st, i);
        lua_rawgeti(L, LIST, 3 * i - 2);      // the phase function
        lua_rawgeti(L, LIST, 3 * i - 1);      // self (the handler table)
        lua_rawgeti(L, LIST, 3 * i);          // conf
        // fn(self, conf, ctx) for every entry: CTX is nil when no entry of
        // the list reads ctx, and an entry that provably does not read it
        // (a fixed-parameter Lua function: LuaRuntime.compile) cannot tell
        // whether it was passed. No per-entry flag to read (a lua_rawgeti
        // and a type test per plugin, ~85 instructions).
        lua_pushvalue(L, CTX);
        lua_callk(L, 3, nresults, (lua_KContext)i, after_call);
        if (nresults && !lua_isnil(L, -3)) return 3;
        lua_settop(L, FIRST);
    }
    return 0;
}

int weir_chain_runner(lua_State *L) {
    return run_from(L, lua_tointeger(L, FIRST));
}

int weir_chain_reserve_marks(lua_State *L, int count) {
    weir_state_info *st = weir_info(L);
    if (count <= st->chain_marks_capacity) return 1;
    uint64_t *marks = (uint64_t *)realloc(st->chain_marks, (size_t)count * sizeof *marks);
    if (marks == NULL) return 0;
    st->chain_marks = marks;
    st->chain_marks_capacity = count;
    return 1;
}

uint64_t weir_monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}
