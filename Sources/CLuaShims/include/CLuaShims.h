#ifndef WEIR_CLUA_SHIMS_H
#define WEIR_CLUA_SHIMS_H
// C-side helpers for the Lua bridge. Lua raises errors and yields with
// longjmp; these trampolines make sure that only ever happens in C frames,
// after any Swift function has returned. See DESIGN.md "Lua bridging rules".
//
// The contract with Swift:
//  * Swift enters Lua only through weir_pcall / weir_resume (both protected).
//  * A Swift function exposed to Lua is a `weir_dispatch_fn`. It never raises
//    and never yields: it returns a result count (>= 0), WEIR_CALL_ERROR with
//    the error message already pushed, or WEIR_CALL_YIELD with the values to
//    yield pushed (their count in `*yield_count`). The C trampoline then
//    returns, raises or yields after the Swift frame is gone.
//  * While Swift code runs (depth > 0) the capped allocator never refuses,
//    so a memory error cannot be raised through a Swift frame; an overdraft
//    is remembered and raised by the trampoline once Swift has returned.
#include <stddef.h>
#include <stdint.h>
#include <lua5.4/lua.h>

/// The Lua version string this binary was built against, e.g. "Lua 5.4".
const char *weir_lua_version(void);

/// Return codes of a Swift callback (anything >= 0 is a result count).
#define WEIR_CALL_ERROR (-1)
#define WEIR_CALL_YIELD (-2)
/// The native does not take these arguments (or is called outside its
/// phases): the trampoline calls the closure's Lua fallback with the same
/// arguments and returns what it returns (weir_with_fallback); a native
/// without one returns `false` (one result).
#define WEIR_CALL_FALLBACK (-3)

/// A Swift function callable from Lua. `function_id` is the id given to
/// weir_push_native; `yield_count` receives the number of values to yield.
typedef int (*weir_dispatch_fn)(lua_State *L, void *context, int function_id, int *yield_count);

/// A hot native (ids below WEIR_HOT_NATIVES): called by its own C entry
/// directly, without the dispatcher's id switch. It never raises nor
/// yields: a result count or WEIR_CALL_FALLBACK.
typedef int (*weir_hot_fn)(lua_State *L, void *context);
#define WEIR_HOT_NATIVES 32

// The allocator's small-block free lists (shims.c): classes of 16 bytes up
// to WEIR_SMALL_MAX, at most WEIR_SMALL_CACHE_BYTES kept per state. Sized on
// weir-observe (tracing + http-log: ~70 Lua allocations per request): 8
// classes and 256 KB left a third of them to malloc.
#define WEIR_SMALL_SHIFT 4
#define WEIR_SMALL_CLASSES 16
#define WEIR_SMALL_MAX (WEIR_SMALL_CLASSES << WEIR_SMALL_SHIFT)
#define WEIR_SMALL_CACHE_BYTES (1024 * 1024)

/// Per-state bookkeeping shared by the allocator, the budget hook and the
/// trampolines. Owned by the state (freed by weir_close).
typedef struct weir_state_info {
    size_t bytes_used;
    size_t bytes_peak;
    size_t bytes_limit;        // 0 = unlimited
    int swift_depth;           // > 0 while Swift code is on top of the C stack
    int overdraft;             // set when an allocation passed the cap while Swift ran
    int64_t budget_remaining;  // instructions left for the current phase call
    int64_t budget_limit;      // 0 = unlimited
    int budget_exhausted;      // set by the hook; cleared by weir_set_budget
    /// Set (by the watchdog's signal handler) once the current phase call
    /// has run longer than a watchdog tick: from then on its threads carry
    /// the count hook and the budget is counted. Cleared by weir_set_budget.
    volatile int budget_armed;
    int hook_interval;         // instructions between hook calls once armed (0: no budgets)
    weir_dispatch_fn dispatch;
    void *context;             // the Swift LuaState (unretained)
    weir_hot_fn hot[WEIR_HOT_NATIVES]; // NULL: the id goes through `dispatch`
    // The chain runner (chain.c):
    int chain_entry;           // 1-based list index of the plugin it ran last (first: where it starts)
    int chain_last;            // the list index it stops after
    int chain_check_exit;      // a non-nil first result stops the run (request and response phases)
    uint64_t chain_unread_self; // bit i: entry i's function never reads self (passed nil)
    uint64_t chain_unread_conf; // bit i: ... never reads conf
    int chain_timing;          // record each plugin's start in chain_marks
    int chain_marks_capacity;
    uint64_t *chain_marks;     // [i]: CLOCK_MONOTONIC ns when entry i started (freed by weir_close)
    /// The running list's metrics cells ([i - 1] for entry i), set by Swift
    /// before each resume when every entry has one (else NULL): the runner
    /// then records each completed call itself (weir_call_cell_record).
    struct weir_call_cell *const *chain_cells;
    // The allocator's kept small blocks: a list per class, linked through
    // each block's first word, and their total size.
    void *small_free[WEIR_SMALL_CLASSES];
    size_t small_cached_bytes;
} weir_state_info;

/// Creates a state with the capped allocator and the panic handler
/// installed (no hook: see the watchdog below). `bytes_limit` 0 = unlimited. Returns NULL if even
/// the initial allocation failed. The state starts with swift_depth = 1.
lua_State *weir_newstate(size_t bytes_limit, int hook_interval);
/// Closes the state and frees its info block.
void weir_close(lua_State *L);
/// The info block of a state (or of any of its threads): a load from the
/// thread's extra space (set by weir_newstate; lua_newthread copies the
/// main thread's), inline because every entry into Lua and every native
/// call reads it.
static inline weir_state_info *weir_info(lua_State *L) {
    return *(weir_state_info **)lua_getextraspace(L);
}
/// Sets the Swift dispatcher for native functions (and clears the hot natives).
void weir_set_dispatch(lua_State *L, weir_dispatch_fn fn, void *context);
/// Native `id` (< WEIR_HOT_NATIVES) is `fn`, called with the dispatcher's
/// context, until the next weir_set_dispatch. Returns 0 for a bad id.
int weir_set_hot_native(lua_State *L, int id, weir_hot_fn fn);
/// Starts a fresh instruction budget (0 = unlimited) and clears the exhausted and armed flags.
void weir_set_budget(lua_State *L, int64_t instructions);

/// The runaway-script watchdog (watchdog.c). Lua runs with no hook; a
/// per-process watchdog thread notices an entry into Lua that is still
/// running after one to two ticks (10 ms each; none while no thread is in
/// Lua, see weir_watchdog_parked) and signals its thread, whose
/// handler installs the count hook; the hook then counts the instruction
/// budget and raises "instruction budget exceeded" when it runs out.
/// weir_pcall / weir_resume / weir_resetthread bracket their call with
/// enter/exit; so do the replaced coroutine.resume / coroutine.wrap.
typedef struct weir_watch_token { void *slot; lua_State *previous; } weir_watch_token;
weir_watch_token weir_watch_enter(lua_State *L);
void weir_watch_exit(weir_watch_token token, lua_State *L);
/// Replaces coroutine.resume and coroutine.wrap with versions that tell
/// the watchdog which thread runs (protected; returns a Lua status).
int weir_track_coroutines(lua_State *L);
/// The signal number the watchdog uses (0 until the first entry into Lua).
int weir_watchdog_signal(void);
/// The watchdog's tick (default 10 ms; at least 0.1 ms). Process-wide: tests
/// that run many runaway scripts shorten it, and put it back.
#define WEIR_WATCHDOG_DEFAULT_TICK_NS 10000000
void weir_watchdog_set_tick(uint64_t nanoseconds);
/// After a tick with no thread inside Lua nor entering it, the watchdog
/// parks (no ticks) until the next outermost entry wakes it. For tests:
/// whether it can park here (membarrier(2) works; set at the first entry
/// into Lua), whether it is parked now, how many ticks it ran and how many
/// times it parked since the process started.
int weir_watchdog_can_park(void);
int weir_watchdog_parked(void);
uint64_t weir_watchdog_ticks(void);
uint64_t weir_watchdog_parks(void);

/// Upper bounds (ns, inclusive) of the plugin call latency histogram's
/// buckets: MetricsRegistry.latencyBuckets (0.5 ms .. 10 s) in nanoseconds
/// (a test checks they agree); the last bucket counts the rest.
#define WEIR_LATENCY_BOUNDS 14
static const uint64_t weir_latency_bounds_ns[WEIR_LATENCY_BOUNDS] = {
    500000, 1000000, 2500000, 5000000, 10000000, 25000000, 50000000, 100000000,
    250000000, 500000000, 1000000000, 2500000000, 5000000000, 10000000000,
};

/// One plugin's calls in one phase on one event loop (a /metrics series):
/// the latency histogram, the sum of the durations and the count per
/// outcome (0 completed, 1 exited, 2 failed). Only its event loop writes it
/// (relaxed stores, no locked instruction); a scrape reads it with relaxed
/// loads (a sample may be a call behind). The chain runner records into it
/// directly, so a completed plugin call costs no Swift call.
typedef struct weir_call_cell {
    uint64_t buckets[WEIR_LATENCY_BOUNDS + 1];
    uint64_t count;
    uint64_t sum_ns;
    uint64_t outcomes[3];
} weir_call_cell;

#define WEIR_RELAXED_ADD(field, n) \
    __atomic_store_n(&(field), __atomic_load_n(&(field), __ATOMIC_RELAXED) + (n), __ATOMIC_RELAXED)

/// Records one call of `nanoseconds` ending with `outcome` (on the cell's loop only).
static inline void weir_call_cell_record(weir_call_cell *cell, uint64_t nanoseconds, int outcome) {
    int b = 0;
    while (b < WEIR_LATENCY_BOUNDS && nanoseconds > weir_latency_bounds_ns[b]) b++;
    WEIR_RELAXED_ADD(cell->buckets[b], 1);
    WEIR_RELAXED_ADD(cell->count, 1);
    WEIR_RELAXED_ADD(cell->sum_ns, nanoseconds);
    WEIR_RELAXED_ADD(cell->outcomes[outcome], 1);
}

/// A copy of `cell` read with relaxed loads (any thread).
static inline weir_call_cell weir_call_cell_snapshot(const weir_call_cell *cell) {
    weir_call_cell copy;
    for (int b = 0; b <= WEIR_LATENCY_BOUNDS; b++) copy.buckets[b] = __atomic_load_n(&cell->buckets[b], __ATOMIC_RELAXED);
    copy.count = __atomic_load_n(&cell->count, __ATOMIC_RELAXED);
    copy.sum_ns = __atomic_load_n(&cell->sum_ns, __ATOMIC_RELAXED);
    for (int o = 0; o < 3; o++) copy.outcomes[o] = __atomic_load_n(&cell->outcomes[o], __ATOMIC_RELAXED);
    return copy;
}

/// The chain runner (a lua_CFunction; chain.c), as a closure per chain and
/// phase whose upvalues are its list (weir_chain_make_runner). Called on a
/// coroutine as runner(ctx) after weir_chain_prepare: runs entries
/// chain_entry...chain_last of its list (3 upvalues per entry: function,
/// self, conf), each as fn(self, conf, ctx) (ctx nil when no entry reads it).
/// Returns nothing when all ran, or the 3 results of the plugin that
/// returned a non-nil first one (chain_check_exit).
/// `chain_entry` names the entry it stopped in (exit, error or yield).
/// With `chain_timing` on it marks each entry's start in chain_marks; with
/// `chain_cells` set it also records every call that completed (each ends
/// when the next starts, the last when the runner returns) in its cell.
/// Calls that exit, fail or yield are left to Swift.
int weir_chain_runner(lua_State *L);
/// A C closure has at most 255 upvalues: longer chains run an entry per resume.
#define WEIR_CHAIN_MAX_ENTRIES 85
/// Pops the 3 * `entries` values on top of `L` (function, self, conf per
/// entry) and pushes the runner closure that holds them as its list. 0
/// (nothing popped) for more than WEIR_CHAIN_MAX_ENTRIES entries.
int weir_chain_make_runner(lua_State *L, int entries);
/// Readies a run of the chain runner on coroutine `co`: pushes the runner
/// (registry ref `list_ref`, a weir_chain_make_runner closure; the caller
/// pushes ctx or nil next), sets where it starts and ends and whether a result stops it, and
/// starts a fresh instruction budget (weir_set_budget). One call from Swift
/// instead of one per push. 0 if the stack cannot grow.
int weir_chain_prepare(lua_State *co, int list_ref, int first, int last, int check_exit, int64_t budget);
/// A fresh run in one call from Swift: weir_chain_prepare, the runner's
/// ctx argument (`new_ctx` 0: nil; 1: a new table made for this run alone),
/// the entries' unread self / conf bits and metrics cells stored in the
/// info block, then weir_resume of the runner. Returns weir_resume's status.
int weir_chain_start(lua_State *co, lua_State *from, int list_ref, int first, int last, int check_exit,
                     int64_t budget, int new_ctx, uint64_t unread_self, uint64_t unread_conf,
                     struct weir_call_cell *const *cells, int *nresults);
/// Pushes on `L` the ctx argument of the chain runner running at the
/// bottom of coroutine `co` (`L` is `co` or a coroutine it resumed): the
/// request's weir.ctx when it was made for the runner alone. 0 (nothing
/// pushed) when `co` is not running the runner or its ctx is not a table.
int weir_chain_push_ctx(lua_State *co, lua_State *L);
/// Whether the function at `index` may read its parameter number `param`
/// (0-based register: fn(self, conf, ctx) has ctx at 2), from its bytecode
/// (paramuse.c). 0 only when it provably never does: its code never reads
/// the register and no nested function captures it. 1 for C functions,
/// unknown opcodes or dump formats. Does not raise.
int weir_function_reads_param(lua_State *L, int index, int param);
/// CLOCK_MONOTONIC in nanoseconds (the clock of chain_marks).
uint64_t weir_monotonic_ns(void);
/// Makes room for `count` start times in chain_marks. 0 if out of memory.
int weir_chain_reserve_marks(lua_State *L, int count);
/// Called by the runner as each plugin starts: a fresh instruction budget
/// (unhooked, not armed) and a new watchdog epoch, so a plugin after one
/// that ran long is timed from its own start.
void weir_watch_restart(lua_State *L);

/// Pushes a C function that forwards to the Swift dispatcher with
/// `function_id` (the first 256 ids: a C function each with the id compiled
/// in; later ones: a closure holding the id).
void weir_push_native(lua_State *L, int function_id);

/// Lua: `with_fallback(native, fallback)` -> a copy of the native (a
/// function from weir_push_native, as a closure holding the fallback) that calls `fallback` (a Lua function)
/// when the native answers WEIR_CALL_FALLBACK. Lets an SDK function be the
/// native itself, with the argument and phase checks that raise (at the
/// caller's line) in Lua, run only when needed. In the SDK's `clib`.
int weir_with_fallback(lua_State *L);

/// Protected call: like lua_pcall with a message handler that appends a
/// traceback. On error the message (with traceback) is left on the stack.
int weir_pcall(lua_State *L, int nargs, int nresults);
/// lua_resume with Swift depth bookkeeping.
int weir_resume(lua_State *co, lua_State *from, int nargs, int *nresults);
/// Resets a suspended or dead coroutine (closing pending to-be-closed
/// variables) so it can run a new function; leaves its stack empty.
int weir_resetthread(lua_State *co);
/// Protected chunk load (text only). `chunkname` should start with '@'.
int weir_load(lua_State *L, const char *code, size_t size, const char *chunkname);
/// Appends a traceback of `co` to `msg` and pushes it on L (protected).
/// Returns 0 on success; on failure pushes nothing.
int weir_traceback(lua_State *L, lua_State *co, const char *msg);
/// Runs a full garbage collection cycle (protected; finalizer errors become warnings).
void weir_full_gc(lua_State *L);
/// The collector runs in generational mode (set by weir_newstate).
int weir_gc_is_generational(lua_State *L);
/// Replaces the global collectgarbage with one that refuses "stop",
/// "incremental", "generational", "setpause" and "setstepmul" (the
/// collector is shared by every plugin of the state); protected, returns a
/// Lua status.
int weir_guard_collectgarbage(lua_State *L);
/// lua_gc(L, LUA_GCCOUNT): kilobytes in use as the collector counts them.
int weir_gc_count_kb(lua_State *L);
/// Bytes currently allocated by the state (exact, from the allocator).
size_t weir_bytes_used(lua_State *L);

/// Opens the C-implemented helper library (crypto, time) as a table on the
/// stack top (protected internally).
int weir_push_clib(lua_State *L);

/// SHA-256 of `len` bytes into `out` (32 bytes). Exposed for Swift tests.
void weir_sha256(const uint8_t *data, size_t len, uint8_t out[32]);

/// Helpers for macros Swift cannot import. `static inline` so that Swift
/// code inlines them (natives read their string arguments through
/// weir_tostring on every call) instead of calling a C function per use.
static inline int weir_upvalueindex(int i) { return lua_upvalueindex(i); }
static inline int weir_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline void weir_pop(lua_State *L, int n) { lua_pop(L, n); }
static inline int weir_isnoneornil(lua_State *L, int idx) { return lua_isnoneornil(L, idx); }
static inline void weir_newtable(lua_State *L) { lua_newtable(L); }
/// A string argument's bytes, or NULL when it is not a string (numbers
/// too: lua_tolstring would convert them in place, and allocate).
static inline const char *weir_tostring(lua_State *L, int idx, size_t *len) {
    if (lua_type(L, idx) != LUA_TSTRING) return NULL;
    return lua_tolstring(L, idx, len);
}

#endif
