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
// (`chain_marks`, read before anything else runs on the state). When the
// list's metrics cells are given (`chain_cells`), the runner records each
// completed call itself: Swift only records the call it stopped in (exit,
// failure) and calls that yield keep their start across the wait (Swift
// puts it back in `chain_marks` before resuming).
#define _GNU_SOURCE
#include <stdlib.h>
#include <time.h>
#include <lua5.4/lua.h>
#include "CLuaShims.h"

// The runner is a C closure per chain and phase (weir_chain_make_runner)
// whose upvalues are its list: fn, self, conf per entry, entry i at
// upvalues 3i-2..3i. An upvalue is pushed with a plain copy, where a
// table's slot cost a lua_rawgeti (~38 instructions, up to three per
// entry). Its one argument is ctx. Where the run starts and ends and
// whether a result stops it are in the info block (set by
// weir_chain_prepare, and again by Swift before resuming after a wait):
// plain loads instead of a push from Swift and a lua_to* per argument.
enum { CTX = 1 };
#define ENTRY_SLOT(i, k) lua_upvalueindex(3 * (int)(i) - 3 + (k))   // k: 1 fn, 2 self, 3 conf

/// Entry i starts. `previous_completed`: entry i - 1 ran in this phase call
/// and returned without an exit, so it ends now (its cell, when the list
/// has cells: Swift records nothing for it).
static inline void begin_entry(lua_State *L, weir_state_info *st, lua_Integer i, int previous_completed) {
    st->chain_entry = (int)i;
    if (st->chain_timing && i < st->chain_marks_capacity) {
        // One clock read per boundary: the end of one call is the start of the next.
        uint64_t now = weir_monotonic_ns();
        if (previous_completed && st->chain_cells != NULL)
            weir_call_cell_record(st->chain_cells[i - 2], now - st->chain_marks[i - 1], 0);
        st->chain_marks[i] = now;
    }
    // Each plugin's call has its own instruction budget, as when every
    // call was a resume of its own. The first entry of a run (the runner
    // just started: no previous call) has the fresh budget and epoch that
    // weir_chain_prepare and weir_resume's entry gave the run.
    if (previous_completed) weir_watch_restart(L);
}

/// The list ran to `last`: its last call ends now.
static int end_of_list(weir_state_info *st, lua_Integer last) {
    if (st->chain_timing && st->chain_cells != NULL && last < st->chain_marks_capacity)
        weir_call_cell_record(st->chain_cells[last - 1], weir_monotonic_ns() - st->chain_marks[last], 0);
    return 0;
}

static int run_from(lua_State *L, lua_Integer i, int previous_completed);

/// What entry i's call left above CTX (its results, LUA_MULTRET): none
/// or a nil first one goes on; a non-nil first one with CHECK_EXIT set
/// stops the list with 3 results (status, body, headers). Returns -1 to go on.
static inline int exit_results(lua_State *L, int check_exit) {
    int n = lua_gettop(L) - CTX;
    if (n == 0) return -1;  // the common case: the call returned nothing
    if (check_exit && !lua_isnil(L, CTX + 1)) {
        lua_settop(L, CTX + 3);
        return 3;
    }
    lua_settop(L, CTX);
    return -1;
}

/// After plugin `i` returned (after yields): stop at an exit, else go on.
static int after_call(lua_State *L, int status, lua_KContext k) {
    (void)status;
    int stop = exit_results(L, weir_info(L)->chain_check_exit);
    if (stop >= 0) return stop;
    return run_from(L, (lua_Integer)k + 1, 1);
}

static int run_from(lua_State *L, lua_Integer i, int previous_completed) {
    weir_state_info *st = weir_info(L);
    lua_Integer last = st->chain_last;
    int check_exit = st->chain_check_exit;
    for (; i <= last; i++) {
        begin_entry(L, st, i, previous_completed);
        lua_pushvalue(L, ENTRY_SLOT(i, 1));   // the phase function
        // self (the handler table) and conf, or nil for one the function
        // provably never reads (LuaRuntime.compile).
        uint64_t bit = i < 64 ? (uint64_t)1 << i : 0;
        if (st->chain_unread_self & bit) lua_pushnil(L); else lua_pushvalue(L, ENTRY_SLOT(i, 2));
        if (st->chain_unread_conf & bit) lua_pushnil(L); else lua_pushvalue(L, ENTRY_SLOT(i, 3));
        // fn(self, conf, ctx) for every entry: CTX is nil when no entry of
        // the list reads ctx, and an entry that provably does not read it
        // (a fixed-parameter Lua function: LuaRuntime.compile) cannot tell
        // whether it was passed. No per-entry flag to read (a lua_rawgeti
        // and a type test per plugin, ~85 instructions).
        lua_pushvalue(L, CTX);
        // All results: a call that returns none (most) leaves the stack
        // as it was, with nothing to test with lua_type or to pop.
        lua_callk(L, 3, LUA_MULTRET, (lua_KContext)i, after_call);
        int stop = exit_results(L, check_exit);
        if (stop >= 0) return stop;
        previous_completed = 1;
    }
    return end_of_list(st, last);
}

int weir_chain_runner(lua_State *L) {
    return run_from(L, weir_info(L)->chain_entry, 0);
}

int weir_chain_push_ctx(lua_State *co, lua_State *L) {
    lua_Debug ar;
    // The runner is the coroutine's outermost frame.
    int level = 0;
    while (lua_getstack(co, level + 1, &ar)) level++;
    if (!lua_getstack(co, level, &ar) || !lua_getinfo(co, "f", &ar)) return 0;
    int is_runner = lua_tocfunction(co, -1) == weir_chain_runner;
    lua_pop(co, 1);
    if (!is_runner || lua_getlocal(co, &ar, CTX) == NULL) return 0;
    if (lua_type(co, -1) != LUA_TTABLE) {
        lua_pop(co, 1);
        return 0;
    }
    lua_xmove(co, L, 1);
    return 1;
}

int weir_chain_make_runner(lua_State *L, int entries) {
    if (entries < 1 || entries > WEIR_CHAIN_MAX_ENTRIES) return 0;
    lua_pushcclosure(L, weir_chain_runner, 3 * entries);
    return 1;
}

int weir_chain_prepare(lua_State *co, int list_ref, int first, int last, int check_exit, int64_t budget) {
    if (!lua_checkstack(co, 3)) return 0;  // the runner, ctx, and lua_resume's own slot
    lua_rawgeti(co, LUA_REGISTRYINDEX, list_ref);
    weir_state_info *st = weir_info(co);
    st->chain_entry = first;
    st->chain_last = last;
    st->chain_check_exit = check_exit;
    st->budget_limit = budget;
    st->budget_remaining = budget;
    st->budget_exhausted = 0;
    st->budget_armed = 0;
    return 1;
}

int weir_chain_start(lua_State *co, lua_State *from, int list_ref, int first, int last, int check_exit,
                     int64_t budget, int new_ctx, uint64_t unread_self, uint64_t unread_conf,
                     struct weir_call_cell *const *cells, int *nresults) {
    // As Swift did it call by call: a stack that cannot grow leaves the
    // runner to fail in lua_resume.
    (void)weir_chain_prepare(co, list_ref, first, last, check_exit, budget);
    // One hash slot, as PluginRequest.pushCtx makes it (the first key
    // then needs no rehash).
    if (new_ctx) lua_createtable(co, 0, 1); else lua_pushnil(co);
    weir_state_info *st = weir_info(co);
    st->chain_unread_self = unread_self;
    st->chain_unread_conf = unread_conf;
    st->chain_cells = cells;
    return weir_resume(co, from, 1, nresults);
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
