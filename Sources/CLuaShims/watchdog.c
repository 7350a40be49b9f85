// The runaway-script watchdog. Lua code normally runs with no hook at all:
// a count hook puts the VM on its slow path for every instruction (~80
// machine instructions each), which cost key-auth + rate-limiting ~30k
// instructions per request. Instead, each thread that enters Lua publishes
// an "epoch" (bumped on every entry and exit) in a slot of its own; one
// watchdog thread per process looks at all slots every tick. A slot that is
// inside Lua with the same epoch at two consecutive ticks has run one call
// for at least a tick: the watchdog sends that thread a signal, and the
// handler, running on the Lua thread itself, installs the count hook with
// lua_sethook (the call Lua's own interpreter makes from its SIGINT handler:
// hook state is written with signal-safe stores and the VM notices it at its
// next instruction). From then on the hook counts the instruction budget and
// raises "instruction budget exceeded" as before (shims.c).
//
// Signalling the Lua thread rather than calling lua_sethook from the
// watchdog thread keeps the VM single-threaded: the handler cannot race
// with the VM growing or shrinking its call stack, and the lua_State it
// hooks cannot be freed under it (a state running on this thread is alive).
//
// An idle gateway must not pay for the ticks (each one woke the thread and
// took the CPU from the event loops, 7-11 us a tick): after a tick in which
// no slot was inside Lua nor entered it, the watchdog parks on a futex. An
// outermost entry wakes it. So that the entry stays free of locks, fences
// and system calls, it only stores its depth and then reads the `parked`
// flag; the watchdog, after raising the flag, issues membarrier(2), which
// runs a full memory barrier on every thread of the process, and then
// looks at the slots once more. Either that look sees the entry's depth (no
// park), or the entry's read comes after the barrier and sees the flag (it
// wakes the watchdog): no entry can run unwatched. Without membarrier
// (old kernels, seccomp) the watchdog never parks.
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <lua5.4/lua.h>
#include <lua5.4/lauxlib.h>
#include "CLuaShims.h"

/// How often the watchdog looks at the slots (weir_watchdog_set_tick). A
/// call is hooked after it has run between one and two ticks.
static uint64_t tick_ns = WEIR_WATCHDOG_DEFAULT_TICK_NS;

// Fields shared with the watchdog thread are accessed with relaxed atomics
// (plain moves on x86-64): only their eventual visibility matters.
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

/// One OS thread's view for the watchdog. `epoch` and `depth` are written
/// only by their thread and read by the watchdog; `fire_epoch` is written by
/// the watchdog; `running` is read by the signal handler on the same thread.
typedef struct weir_watch_slot {
    uint64_t epoch;                // bumped when an outermost entry into Lua starts and ends
    int depth;                     // nested entries in progress (> 0: Lua runs on this thread)
    lua_State *volatile running;   // the thread running now (innermost entry)
    uint64_t fire_epoch;           // the epoch the watchdog signalled for
    uint64_t seen_epoch;           // the watchdog's observation at its last tick
    pthread_t thread;
    struct weir_watch_slot *next;
} weir_watch_slot;

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static weir_watch_slot *registry = NULL;
static pthread_once_t watchdog_once = PTHREAD_ONCE_INIT;
static pthread_key_t slot_key;
static int watchdog_signal = 0;
static int watchdog_running = 0;
static __thread weir_watch_slot *my_slot = NULL;

/// 1 while the watchdog is parked (its futex word); an outermost entry
/// that finds it set wakes the watchdog. Written only on the idle/busy
/// transitions, so reading it costs the entries no cache-line transfers.
static int watchdog_parked = 0;
/// Whether membarrier(2) works here (registered at start): parking needs it.
static int can_park = 0;
/// Ticks the watchdog has run, and times it parked (read by tests).
static uint64_t tick_count = 0;
static uint64_t park_count = 0;

int weir_watchdog_signal(void) { return watchdog_signal; }
int weir_watchdog_can_park(void) { return can_park; }
int weir_watchdog_parked(void) { return LOAD(watchdog_parked); }
uint64_t weir_watchdog_ticks(void) { return LOAD(tick_count); }
uint64_t weir_watchdog_parks(void) { return LOAD(park_count); }

void weir_watchdog_set_tick(uint64_t nanoseconds) {
    STORE(tick_ns, nanoseconds < 100000 ? 100000 : nanoseconds);
}

// MARK: - The budget hook

static void budget_hook(lua_State *L, lua_Debug *ar);

static inline int budget_active(weir_state_info *st) {
    return st->budget_armed && st->budget_limit > 0 && st->hook_interval > 0;
}

static inline void hook(lua_State *L, weir_state_info *st) {
    if (lua_gethook(L) == NULL) lua_sethook(L, budget_hook, LUA_MASKCOUNT, st->hook_interval);
}

static inline void unhook(lua_State *L) {
    if (lua_gethook(L) != NULL) lua_sethook(L, NULL, 0, 0);
}

static void budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    weir_state_info *st = weir_info(L);
    if (!budget_active(st)) {
        // Left over from a call that ended while the hook was being set
        // (the signal landed during its exit); nothing to count.
        unhook(L);
        return;
    }
    st->budget_remaining -= lua_gethookcount(L);
    if (st->budget_remaining <= 0) {
        st->budget_exhausted = 1;
        // From now on raise at every instruction of this thread: a pcall
        // in the script may catch one error, but the very next
        // instruction outside it raises again, so the script cannot go on.
        lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1);
        luaL_error(L, "instruction budget exceeded (%I instructions)", (lua_Integer)st->budget_limit);
    }
}

// MARK: - The signal handler (runs on the Lua thread)

static void on_watchdog_signal(int sig, siginfo_t *info, void *ucontext) {
    (void)sig; (void)ucontext;
    weir_watch_slot *slot = (weir_watch_slot *)info->si_value.sival_ptr;
    if (slot == NULL || slot != my_slot) return;
    // The call the watchdog saw may have ended before the signal arrived.
    if (slot->depth == 0 || slot->epoch != LOAD(slot->fire_epoch)) return;
    lua_State *L = slot->running;
    if (L == NULL) return;
    weir_state_info *st = weir_info(L);
    if (st->budget_limit <= 0 || st->hook_interval <= 0) return;
    st->budget_armed = 1;
    hook(L, st);
}

// MARK: - The watchdog thread

static void wake_watchdog(void) {
    // One waker makes the system call, however many threads enter at once.
    if (__atomic_exchange_n(&watchdog_parked, 0, __ATOMIC_RELAXED) == 1) {
        syscall(SYS_futex, &watchdog_parked, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
}

static int any_slot_inside_lua(void) {
    int inside = 0;
    pthread_mutex_lock(&registry_lock);
    for (weir_watch_slot *slot = registry; slot != NULL && !inside; slot = slot->next) {
        inside = LOAD(slot->depth) > 0;
    }
    pthread_mutex_unlock(&registry_lock);
    return inside;
}

/// Sleeps until an outermost entry into Lua wakes it (see the top of the file).
static void park_watchdog(void) {
    STORE(watchdog_parked, 1);
    if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) != 0 || any_slot_inside_lua()) {
        STORE(watchdog_parked, 0);   // an entry raced with us: keep ticking
        return;
    }
    __atomic_fetch_add(&park_count, 1, __ATOMIC_RELAXED);
    while (LOAD(watchdog_parked) == 1) {
        syscall(SYS_futex, &watchdog_parked, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
    }
}

static void *watchdog_main(void *arg) {
    (void)arg;
    for (;;) {
        uint64_t ns = LOAD(tick_ns);
        struct timespec left = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };
        while (nanosleep(&left, &left) != 0 && errno == EINTR) {}
        // Holding the lock keeps every listed thread alive (a thread takes
        // it to unlist itself before it exits), so pthread_sigqueue never
        // targets a finished thread.
        int busy = 0;
        pthread_mutex_lock(&registry_lock);
        for (weir_watch_slot *slot = registry; slot != NULL; slot = slot->next) {
            uint64_t epoch = LOAD(slot->epoch);
            int depth = LOAD(slot->depth);
            if (depth > 0 && epoch == slot->seen_epoch && LOAD(slot->fire_epoch) != epoch) {
                STORE(slot->fire_epoch, epoch);
                union sigval value = { .sival_ptr = slot };
                pthread_sigqueue(slot->thread, watchdog_signal, value);
            }
            // Inside Lua now, or entered it since the last tick.
            if (depth > 0 || epoch != slot->seen_epoch) busy = 1;
            slot->seen_epoch = epoch;
        }
        pthread_mutex_unlock(&registry_lock);
        __atomic_fetch_add(&tick_count, 1, __ATOMIC_RELAXED);
        if (!busy && can_park) park_watchdog();
    }
    return NULL;
}

static void unlist_slot(void *p) {
    weir_watch_slot *slot = (weir_watch_slot *)p;
    // A signal still queued for this thread stays blocked and dies with it.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, watchdog_signal);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_mutex_lock(&registry_lock);
    for (weir_watch_slot **link = &registry; *link != NULL; link = &(*link)->next) {
        if (*link == slot) { *link = slot->next; break; }
    }
    pthread_mutex_unlock(&registry_lock);
    my_slot = NULL;
    free(slot);
}

static void start_watchdog(void) {
    // A real-time signal: queued per thread, and unused by glibc, the Swift
    // runtime and SwiftNIO. SA_RESTART: a signal that lands just after the
    // call ended must not fail the thread's next system call.
    watchdog_signal = SIGRTMIN + 7;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_watchdog_signal;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(watchdog_signal, &action, NULL) != 0 || pthread_key_create(&slot_key, unlist_slot) != 0) {
        fputs("weir: cannot set up the Lua watchdog; instruction budgets are not enforced\n", stderr);
        return;
    }
    can_park = syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
    // The watchdog thread must never take the signal itself: block it
    // while creating the thread (which inherits the mask).
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, watchdog_signal);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    if (pthread_create(&thread, &attr, watchdog_main, NULL) == 0) {
        watchdog_running = 1;
    } else {
        fputs("weir: cannot start the Lua watchdog thread; instruction budgets are not enforced\n", stderr);
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static weir_watch_slot *register_slot(void) {
    pthread_once(&watchdog_once, start_watchdog);
    if (!watchdog_running) return NULL;
    weir_watch_slot *slot = (weir_watch_slot *)calloc(1, sizeof *slot);
    if (slot == NULL) return NULL;
    slot->thread = pthread_self();
    pthread_mutex_lock(&registry_lock);
    slot->next = registry;
    registry = slot;
    pthread_mutex_unlock(&registry_lock);
    my_slot = slot;
    pthread_setspecific(slot_key, slot);   // unlisted when the thread exits
    return slot;
}

// MARK: - Entry and exit (around every lua_resume / lua_pcall from C or Swift)

weir_watch_token weir_watch_enter(lua_State *L) {
    weir_watch_token token = { NULL, NULL };
    weir_watch_slot *slot = my_slot;
    if (slot == NULL && (slot = register_slot()) == NULL) return token;
    token.slot = slot;
    token.previous = slot->running;
    slot->running = L;
    int depth = slot->depth;
    STORE(slot->depth, depth + 1);
    // Only the outermost entry moves the epoch: a script resuming its own
    // coroutines in a loop still looks like one long call.
    if (depth == 0) {
        STORE(slot->epoch, slot->epoch + 1);
        // The depth store above, then the flag: only the compiler must keep
        // that order; the CPU's is enforced by the watchdog's membarrier.
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        if (__builtin_expect(LOAD(watchdog_parked), 0)) wake_watchdog();
    }
    // A call whose budget is already being counted (resumed after a yield,
    // or a nested coroutine of a hooked call) is counted from its first
    // instruction.
    weir_state_info *st = weir_info(L);
    if (budget_active(st)) hook(L, st);
    return token;
}

void weir_watch_exit(weir_watch_token token, lua_State *L) {
    weir_watch_slot *slot = (weir_watch_slot *)token.slot;
    // Threads go back to the hook-free fast path when they stop running.
    unhook(L);
    if (slot == NULL) return;
    slot->running = token.previous;
    int depth = slot->depth - 1;
    STORE(slot->depth, depth);
    if (depth == 0) {
        STORE(slot->epoch, slot->epoch + 1);
    } else if (token.previous != NULL) {
        weir_state_info *st = weir_info(token.previous);
        if (budget_active(st)) hook(token.previous, st);
    }
}

void weir_watch_restart(lua_State *L) {
    weir_state_info *st = weir_info(L);
    st->budget_remaining = st->budget_limit;
    st->budget_exhausted = 0;
    if (st->budget_armed) {
        st->budget_armed = 0;
        unhook(L);
    }
    // A signal already on its way for the previous plugin finds another
    // epoch and does nothing (on_watchdog_signal).
    weir_watch_slot *slot = my_slot;
    if (slot != NULL) STORE(slot->epoch, slot->epoch + 1);
}

// MARK: - coroutine.resume / coroutine.wrap that tell the watchdog

// Lua-created coroutines run inside a request's call; the watchdog must
// know which thread is running to hook it. These wrap the base library's
// functions (upvalue 1) and bracket them with enter/exit. The original runs
// under lua_pcall so that exit happens even if it raises (wrap propagates
// the coroutine's error); the error is re-raised afterwards.
static int call_tracked(lua_State *L, lua_State *co, int is_wrap) {
    int nargs = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    weir_watch_token token = weir_watch_enter(co);
    int status = lua_pcall(L, nargs, LUA_MULTRET, 0);
    weir_watch_exit(token, co);
    if (status != LUA_OK) {
        // The base library's wrap prefixes its caller's position; called
        // from here it found none, so add the plugin's line as it would.
        if (is_wrap && status != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
            luaL_where(L, 1);
            lua_insert(L, -2);
            lua_concat(L, 2);
        }
        return lua_error(L);
    }
    return lua_gettop(L);
}

static int tracked_resume(lua_State *L) {
    lua_State *co = lua_tothread(L, 1);
    luaL_argexpected(L, co != NULL, 1, "coroutine");
    return call_tracked(L, co, 0);
}

static int tracked_wrapped(lua_State *L) {
    return call_tracked(L, lua_tothread(L, lua_upvalueindex(2)), 1);
}

static int tracked_wrap(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_pushvalue(L, lua_upvalueindex(1));       // original coroutine.wrap
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);           // the wrapped function
    // The base library keeps the coroutine as the wrapper's upvalue 1.
    if (lua_getupvalue(L, -1, 1) == NULL) return 1;   // unknown layout: untracked
    if (lua_type(L, -1) != LUA_TTHREAD) { lua_pop(L, 1); return 1; }
    lua_pushcclosure(L, tracked_wrapped, 2);     // (wrapped, thread)
    return 1;
}

static int install_tracked_coroutines(lua_State *L) {
    if (lua_getglobal(L, "coroutine") != LUA_TTABLE) return 0;
    lua_getfield(L, -1, "resume");
    lua_pushcclosure(L, tracked_resume, 1);
    lua_setfield(L, -2, "resume");
    lua_getfield(L, -1, "wrap");
    lua_pushcclosure(L, tracked_wrap, 1);
    lua_setfield(L, -2, "wrap");
    return 0;
}

int weir_track_coroutines(lua_State *L) {
    lua_pushcfunction(L, install_tracked_coroutines);
    return lua_pcall(L, 0, 0, 0);
}
