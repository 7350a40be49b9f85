// Pure C helpers exposed to Lua (weir.crypto, weir.time). These are plain
// lua_CFunctions: no Swift frame is ever between them and the protected
// call that entered Lua, so they may raise with luaL_check*/luaL_error.
#include <lua5.4/lua.h>
#include <lua5.4/lauxlib.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <errno.h>
#include "CLuaShims.h"

// MARK: - SHA-256 (FIPS 180-4)

static uint32_t sha256_k[64];
static uint32_t sha256_h0[8];
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

// The constants are the first 32 bits of the fractional parts of the cube
// roots (K) and square roots (H0) of the first primes; computing them avoids
// a hand-typed table. Verified by the test vectors in the Swift tests.
static void sha256_init_constants(void) {
    int primes[64];
    int count = 0;
    for (int n = 2; count < 64; n++) {
        int prime = 1;
        for (int d = 2; d * d <= n; d++) if (n % d == 0) { prime = 0; break; }
        if (prime) primes[count++] = n;
    }
    for (int i = 0; i < 64; i++) {
        long double r = cbrtl((long double)primes[i]);
        sha256_k[i] = (uint32_t)((r - floorl(r)) * 4294967296.0L);
    }
    for (int i = 0; i < 8; i++) {
        long double r = sqrtl((long double)primes[i]);
        sha256_h0[i] = (uint32_t)((r - floorl(r)) * 4294967296.0L);
    }
}

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

typedef struct {
    uint32_t h[8];
    uint8_t block[64];
    size_t block_len;
    uint64_t total_len;
} sha256_ctx;

static void sha256_compress(sha256_ctx *c, const uint8_t *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) | ((uint32_t)p[4 * i + 2] << 8) | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3], e = c->h[4], f = c->h[5], g = c->h[6], h = c->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t S1 = ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25);
        uint32_t ch = (e & f) ^ (~e & g);
        uint32_t t1 = h + S1 + ch + sha256_k[i] + w[i];
        uint32_t S0 = ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22);
        uint32_t maj = (a & b) ^ (a & cc) ^ (b & cc);
        uint32_t t2 = S0 + maj;
        h = g; g = f; f = e; e = d + t1; d = cc; cc = b; b = a; a = t1 + t2;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
    c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

static void sha256_begin(sha256_ctx *c) {
    pthread_once(&sha256_once, sha256_init_constants);
    memcpy(c->h, sha256_h0, sizeof c->h);
    c->block_len = 0;
    c->total_len = 0;
}

static void sha256_update(sha256_ctx *c, const uint8_t *data, size_t len) {
    c->total_len += len;
    while (len > 0) {
        size_t take = 64 - c->block_len;
        if (take > len) take = len;
        memcpy(c->block + c->block_len, data, take);
        c->block_len += take; data += take; len -= take;
        if (c->block_len == 64) { sha256_compress(c, c->block); c->block_len = 0; }
    }
}

static void sha256_end(sha256_ctx *c, uint8_t out[32]) {
    uint64_t bits = c->total_len * 8;
    uint8_t pad = 0x80;
    sha256_update(c, &pad, 1);
    uint8_t zero = 0;
    while (c->block_len != 56) sha256_update(c, &zero, 1);
    uint8_t lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(c, lenbuf, 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24); out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8); out[4 * i + 3] = (uint8_t)c->h[i];
    }
}

void weir_sha256(const uint8_t *data, size_t len, uint8_t out[32]) {
    sha256_ctx c;
    sha256_begin(&c);
    sha256_update(&c, data, len);
    sha256_end(&c, out);
}

// HMAC (RFC 2104) over SHA-256.
static void hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *msg, size_t msg_len, uint8_t out[32]) {
    uint8_t k[64] = {0};
    if (key_len > 64) weir_sha256(key, key_len, k); else memcpy(k, key, key_len);
    uint8_t ipad[64], opad[64];
    for (int i = 0; i < 64; i++) { ipad[i] = k[i] ^ 0x36; opad[i] = k[i] ^ 0x5c; }
    uint8_t inner[32];
    sha256_ctx c;
    sha256_begin(&c); sha256_update(&c, ipad, 64); sha256_update(&c, msg, msg_len); sha256_end(&c, inner);
    sha256_begin(&c); sha256_update(&c, opad, 64); sha256_update(&c, inner, 32); sha256_end(&c, out);
}

// MARK: - Lua functions

static int l_sha256(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    uint8_t out[32];
    weir_sha256((const uint8_t *)s, len, out);
    lua_pushlstring(L, (const char *)out, 32);
    return 1;
}

static int l_hmac_sha256(lua_State *L) {
    size_t klen, mlen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *msg = luaL_checklstring(L, 2, &mlen);
    uint8_t out[32];
    hmac_sha256((const uint8_t *)key, klen, (const uint8_t *)msg, mlen, out);
    lua_pushlstring(L, (const char *)out, 32);
    return 1;
}

static const char b64_std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char b64_url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

// base64_encode(s [, urlsafe]): urlsafe uses -_ and omits padding (RFC 4648 §5).
static int l_base64_encode(lua_State *L) {
    size_t len;
    const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &len);
    int url = lua_toboolean(L, 2);
    const char *alpha = url ? b64_url : b64_std;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
        char q[4] = { alpha[v >> 18], alpha[(v >> 12) & 63], alpha[(v >> 6) & 63], alpha[v & 63] };
        luaL_addlstring(&b, q, 4);
    }
    size_t rest = len - i;
    if (rest > 0) {
        uint32_t v = (uint32_t)s[i] << 16;
        if (rest == 2) v |= (uint32_t)s[i + 1] << 8;
        luaL_addchar(&b, alpha[v >> 18]);
        luaL_addchar(&b, alpha[(v >> 12) & 63]);
        if (rest == 2) luaL_addchar(&b, alpha[(v >> 6) & 63]);
        if (!url) { if (rest == 1) luaL_addchar(&b, '='); luaL_addchar(&b, '='); }
    }
    luaL_pushresult(&b);
    return 1;
}

static int b64_value(int ch) {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+' || ch == '-') return 62;
    if (ch == '/' || ch == '_') return 63;
    return -1;
}

// base64_decode(s): accepts the standard and URL-safe alphabets, padding
// optional. Returns nil, "invalid base64" on malformed input.
static int l_base64_decode(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    while (len > 0 && s[len - 1] == '=') len--;
    if (len % 4 == 1) { lua_pushnil(L); lua_pushliteral(L, "invalid base64"); return 2; }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64_value((unsigned char)s[i]);
        if (v < 0) { lua_pushnil(L); lua_pushliteral(L, "invalid base64"); return 2; }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) { bits -= 8; luaL_addchar(&b, (char)((acc >> bits) & 0xff)); }
    }
    luaL_pushresult(&b);
    return 1;
}

static int l_random_bytes(lua_State *L) {
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 0 && n <= 65536, 1, "must be between 0 and 65536");
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, (size_t)n);
    size_t got = 0;
    while (got < (size_t)n) {
        ssize_t r = getrandom(p + got, (size_t)n - got, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return luaL_error(L, "random_bytes: getrandom failed (errno %d)", errno);
        }
        got += (size_t)r;
    }
    luaL_pushresultsize(&b, (size_t)n);
    return 1;
}

// Compares two strings in time that depends only on their lengths.
static int l_constant_time_equals(lua_State *L) {
    size_t la, lb;
    const uint8_t *a = (const uint8_t *)luaL_checklstring(L, 1, &la);
    const uint8_t *b = (const uint8_t *)luaL_checklstring(L, 2, &lb);
    if (la != lb) { lua_pushboolean(L, 0); return 1; }
    uint8_t diff = 0;
    for (size_t i = 0; i < la; i++) diff |= a[i] ^ b[i];
    lua_pushboolean(L, diff == 0);
    return 1;
}

static int l_hex(lua_State *L) {
    size_t len;
    const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &len);
    static const char digits[] = "0123456789abcdef";
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < len; i++) { luaL_addchar(&b, digits[s[i] >> 4]); luaL_addchar(&b, digits[s[i] & 15]); }
    luaL_pushresult(&b);
    return 1;
}

static int l_time_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

static int l_time_monotonic(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

static const luaL_Reg clib_funcs[] = {
    {"sha256", l_sha256},
    {"hmac_sha256", l_hmac_sha256},
    {"base64_encode", l_base64_encode},
    {"base64_decode", l_base64_decode},
    {"random_bytes", l_random_bytes},
    {"constant_time_equals", l_constant_time_equals},
    {"hex", l_hex},
    {"time_now", l_time_now},
    {"time_monotonic", l_time_monotonic},
    {"with_fallback", weir_with_fallback},
    {NULL, NULL}
};

int weir_push_clib(lua_State *L) {
    luaL_newlib(L, clib_funcs);
    return 1;
}
