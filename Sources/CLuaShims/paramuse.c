// Whether a Lua function reads one of its parameters, from its bytecode.
//
// A plugin's phase function is called as fn(self, conf, ctx). Most declare
// `ctx` out of habit and never touch it; handing them the request's
// weir.ctx table still costs a table (and the collector's work for it,
// ~650 instructions per request: BENCHMARKS.md, "noop"). The generation
// build asks this once per phase function; a function that provably never
// reads `ctx` is called as fn(self, conf) and the table is made only when
// some plugin does read it (or `weir.ctx`).
//
// The function is dumped (lua_dump, stripped) and its top-level code
// scanned for an instruction that reads the parameter's register, and its
// nested functions' upvalue lists for a capture of it. Only "provably not
// read" answers 0: an unknown opcode, a dump format this file does not
// know, or any instruction whose operands may cover the register answers 1.
// The layout followed is Lua 5.4's (lopcodes.h, ldump.c); other versions
// answer 1.
#include <stdlib.h>
#include <string.h>
#include <lua5.4/lua.h>
#include "CLuaShims.h"

#if LUA_VERSION_NUM == 504

// MARK: - The dump, as bytes

typedef struct { unsigned char *bytes; size_t size, capacity; int failed; } dump_buffer;

static int collect(lua_State *L, const void *p, size_t size, void *ud) {
    (void)L;
    dump_buffer *b = (dump_buffer *)ud;
    if (b->size + size > b->capacity) {
        size_t capacity = b->capacity ? b->capacity : 1024;
        while (capacity < b->size + size) capacity *= 2;
        unsigned char *grown = (unsigned char *)realloc(b->bytes, capacity);
        if (grown == NULL) { b->failed = 1; return 1; }
        b->bytes = grown;
        b->capacity = capacity;
    }
    memcpy(b->bytes + b->size, p, size);
    b->size += size;
    return 0;
}

typedef struct { const unsigned char *p, *end; int bad; } reader;

static int read_byte(reader *r) {
    if (r->p >= r->end) { r->bad = 1; return 0; }
    return *r->p++;
}

// ldump.c's dumpSize: 7-bit groups, most significant first, the last one
// marked with 0x80.
static size_t read_size(reader *r) {
    size_t x = 0;
    for (int i = 0; i < 10; i++) {
        int b = read_byte(r);
        if (r->bad) return 0;
        x = (x << 7) | (size_t)(b & 0x7f);
        if (b & 0x80) return x;
    }
    r->bad = 1;
    return 0;
}

static void skip(reader *r, size_t n) {
    if ((size_t)(r->end - r->p) < n) { r->bad = 1; return; }
    r->p += n;
}

static void skip_string(reader *r) {
    size_t n = read_size(r);             // length + 1; 0 for none
    if (n > 0) skip(r, n - 1);
}

// MARK: - Which registers an instruction reads

// Lua 5.4's opcodes (lopcodes.h), by number.
enum {
    OP_MOVE, OP_LOADI, OP_LOADF, OP_LOADK, OP_LOADKX, OP_LOADFALSE, OP_LFALSESKIP, OP_LOADTRUE, OP_LOADNIL,
    OP_GETUPVAL, OP_SETUPVAL, OP_GETTABUP, OP_GETTABLE, OP_GETI, OP_GETFIELD, OP_SETTABUP, OP_SETTABLE,
    OP_SETI, OP_SETFIELD, OP_NEWTABLE, OP_SELF, OP_ADDI, OP_ADDK, OP_SUBK, OP_MULK, OP_MODK, OP_POWK,
    OP_DIVK, OP_IDIVK, OP_BANDK, OP_BORK, OP_BXORK, OP_SHRI, OP_SHLI, OP_ADD, OP_SUB, OP_MUL, OP_MOD,
    OP_POW, OP_DIV, OP_IDIV, OP_BAND, OP_BOR, OP_BXOR, OP_SHL, OP_SHR, OP_MMBIN, OP_MMBINI, OP_MMBINK,
    OP_UNM, OP_BNOT, OP_NOT, OP_LEN, OP_CONCAT, OP_CLOSE, OP_TBC, OP_JMP, OP_EQ, OP_LT, OP_LE, OP_EQK,
    OP_EQI, OP_LTI, OP_LEI, OP_GTI, OP_GEI, OP_TEST, OP_TESTSET, OP_CALL, OP_TAILCALL, OP_RETURN,
    OP_RETURN0, OP_RETURN1, OP_FORLOOP, OP_FORPREP, OP_TFORPREP, OP_TFORCALL, OP_TFORLOOP, OP_SETLIST,
    OP_CLOSURE, OP_VARARG, OP_VARARGPREP, OP_EXTRAARG, OP_COUNT
};

// Registers first..first+count-1 (count < 0: up to the stack top) hold `reg`.
static int covers(int first, int count, int reg) {
    return first <= reg && (count < 0 || reg < first + count);
}

// iABC: op 7 bits, A 8, k 1, B 8, C 8.
static int reads_register(uint32_t i, int reg) {
    int op = (int)(i & 0x7f);
    int a = (int)((i >> 7) & 0xff);
    int k = (int)((i >> 15) & 1);
    int b = (int)((i >> 16) & 0xff);
    int c = (int)((i >> 24) & 0xff);
    int rk_c = !k && c == reg;           // RK(C): a register only without k
    switch (op) {
    case OP_LOADI: case OP_LOADF: case OP_LOADK: case OP_LOADKX: case OP_LOADFALSE: case OP_LFALSESKIP:
    case OP_LOADTRUE: case OP_LOADNIL: case OP_GETUPVAL: case OP_GETTABUP: case OP_NEWTABLE: case OP_JMP:
    case OP_RETURN0: case OP_CLOSURE: case OP_VARARG: case OP_VARARGPREP: case OP_EXTRAARG:
        return 0;                        // write A at most (a closure's captures: its upvalue list)
    case OP_MOVE: case OP_GETI: case OP_GETFIELD: case OP_ADDI: case OP_ADDK: case OP_SUBK: case OP_MULK:
    case OP_MODK: case OP_POWK: case OP_DIVK: case OP_IDIVK: case OP_BANDK: case OP_BORK: case OP_BXORK:
    case OP_SHRI: case OP_SHLI: case OP_UNM: case OP_BNOT: case OP_NOT: case OP_LEN: case OP_TESTSET:
        return b == reg;
    case OP_GETTABLE: case OP_ADD: case OP_SUB: case OP_MUL: case OP_MOD: case OP_POW: case OP_DIV:
    case OP_IDIV: case OP_BAND: case OP_BOR: case OP_BXOR: case OP_SHL: case OP_SHR:
        return b == reg || c == reg;
    case OP_SETUPVAL: case OP_MMBINI: case OP_MMBINK: case OP_TBC: case OP_EQK: case OP_EQI: case OP_LTI:
    case OP_LEI: case OP_GTI: case OP_GEI: case OP_TEST: case OP_RETURN1:
        return a == reg;
    case OP_SETTABUP:
        return rk_c;
    case OP_SETTABLE:
        return a == reg || b == reg || rk_c;
    case OP_SETI: case OP_SETFIELD:
        return a == reg || rk_c;
    case OP_SELF:
        return b == reg || rk_c;
    case OP_MMBIN: case OP_EQ: case OP_LT: case OP_LE:
        return a == reg || b == reg;
    case OP_CONCAT:
        return covers(a, b, reg);
    case OP_CLOSE:
        return a <= reg;                 // closes upvalues from A on
    case OP_CALL: case OP_TAILCALL:      // the function and its B - 1 arguments
        return covers(a, b == 0 ? -1 : b, reg);
    case OP_RETURN:                      // B - 1 values
        return covers(a, b == 0 ? -1 : b - 1, reg);
    case OP_FORLOOP: case OP_FORPREP:
        return covers(a, 4, reg);
    case OP_TFORPREP: case OP_TFORCALL: case OP_TFORLOOP:
        return covers(a, 5, reg);
    case OP_SETLIST:                     // the table and B values
        return covers(a, b == 0 ? -1 : b + 1, reg);
    default:
        return 1;                        // not an opcode of this version: assume it reads
    }
}

// MARK: - Walking the dump

// Skips one function of the dump. At depth 0 (the function asked about),
// sets *reads when its code reads `reg`; at depth 1 (its nested functions),
// when one captures `reg` as an upvalue.
static void walk_function(reader *r, int depth, int reg, int *reads) {
    skip_string(r);                      // source
    read_size(r); read_size(r);          // linedefined, lastlinedefined
    skip(r, 3);                          // numparams, is_vararg, maxstacksize
    size_t ncode = read_size(r);
    if (r->bad || (size_t)(r->end - r->p) / 4 < ncode) { r->bad = 1; return; }
    if (depth == 0) {
        for (size_t n = 0; n < ncode && !*reads; n++) {
            uint32_t i;
            memcpy(&i, r->p + 4 * n, 4);
            if (reads_register(i, reg)) *reads = 1;
        }
    }
    skip(r, 4 * ncode);
    size_t nk = read_size(r);
    for (size_t n = 0; n < nk && !r->bad; n++) {
        switch (read_byte(r)) {          // the constant's type tag (lobject.h variants)
        case 0x00: case 0x01: case 0x11: break;               // nil, false, true
        case 0x03: case 0x13: skip(r, 8); break;              // integer, float
        case 0x04: case 0x14: skip_string(r); break;          // short, long string
        default: r->bad = 1;
        }
    }
    size_t nup = read_size(r);
    for (size_t n = 0; n < nup && !r->bad; n++) {
        int instack = read_byte(r), idx = read_byte(r);
        read_byte(r);                    // kind
        if (depth == 1 && instack && idx == reg) *reads = 1;
    }
    size_t nprotos = read_size(r);
    for (size_t n = 0; n < nprotos && !r->bad; n++) walk_function(r, depth + 1, reg, reads);
    size_t nline = read_size(r);         // debug info (empty when stripped)
    skip(r, nline);
    size_t nabs = read_size(r);
    for (size_t n = 0; n < nabs && !r->bad; n++) { read_size(r); read_size(r); }
    size_t nloc = read_size(r);
    for (size_t n = 0; n < nloc && !r->bad; n++) { skip_string(r); read_size(r); read_size(r); }
    size_t nupnames = read_size(r);
    for (size_t n = 0; n < nupnames && !r->bad; n++) skip_string(r);
}

int weir_function_reads_param(lua_State *L, int index, int param) {
    if (lua_type(L, index) != LUA_TFUNCTION || lua_iscfunction(L, index)) return 1;
    lua_pushvalue(L, index);             // lua_dump dumps the function on top
    dump_buffer b = { NULL, 0, 0, 0 };
    int status = lua_dump(L, collect, &b, 1);
    lua_pop(L, 1);
    int reads = 1;
    if (status == 0 && !b.failed) {
        reader r = { b.bytes, b.bytes + b.size, 0 };
        // Header: signature, version, format, LUAC_DATA, three sizes,
        // LUAC_INT, LUAC_NUM; then the main function's upvalue count.
        static const unsigned char signature[] = { 0x1b, 'L', 'u', 'a', 0x54, 0 };
        if (b.size > 32 && memcmp(b.bytes, signature, sizeof signature) == 0
                && b.bytes[12] == 4 && b.bytes[13] == 8 && b.bytes[14] == 8) {
            skip(&r, 4 + 1 + 1 + 6 + 3 + 8 + 8 + 1);
            int found = 0;
            walk_function(&r, 0, param, &found);
            if (!r.bad && r.p == r.end) reads = found;
        }
    }
    free(b.bytes);
    return reads;
}

#else

int weir_function_reads_param(lua_State *L, int index, int param) {
    (void)L; (void)index; (void)param;
    return 1;
}

#endif
