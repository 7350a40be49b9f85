#!/usr/bin/env bash
# Instructions per request of key-auth + rate-limiting's Lua side (plugin
# code + the SDK's Lua wrappers, natives stubbed), counted by callgrind in a
# plain Lua state: no proxy, no sockets, symbols for the Lua VM. What the
# proxy's own profile shows as one opaque block inside liblua5.4.so.
# `chain` runs issue 3's bench chain (chain.lua) as the proxy's runner does,
# ctx table included: the floor of that chain in stock Lua 5.4.
#
#   bench/lua-harness/run.sh [ka|rl|both|chain] [iterations]     (default: both 20000)
#
# Prints (instructions of N iterations - instructions of none) / N and leaves
# the callgrind file in bench/.run/lua-harness/ (callgrind_annotate it).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WHICH=${1:-both}
N=${2:-20000}
OUT="$REPO/bench/.run/lua-harness"
mkdir -p "$OUT"
gcc -O2 -g -I/usr/include/lua5.4 -I"$REPO/Sources/CLuaShims/include" -o "$OUT/harness" \
    "$HERE/harness.c" "$REPO/Sources/CLuaShims/clib.c" /usr/lib/x86_64-linux-gnu/liblua5.4.a -lm -ldl
DRIVER="$HERE/driver.lua"
[ "$WHICH" = chain ] && DRIVER="$HERE/chain.lua"
count() {   # count WHICH N -> total instructions
    WHICH=$1 valgrind --tool=callgrind --callgrind-out-file="$OUT/$1.callgrind.out" \
        "$OUT/harness" "$REPO" "$2" "$DRIVER" 2>&1 | sed -n 's/.*Collected : //p'
}
base=$(count none "$N")
total=$(count "$WHICH" "$N")
echo "$WHICH: $(( (total - base) / N )) instructions per request (Lua side; $N iterations; callgrind file $OUT/$WHICH.callgrind.out)"
