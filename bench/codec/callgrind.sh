#!/usr/bin/env bash
# Instructions per forwarded request head (parse + hop-by-hop + serialise),
# Weir's HTTP1 codec vs NIOHTTP1, under callgrind. Startup is removed by
# running each case at two iteration counts and taking the difference.
#   bench/codec/callgrind.sh [path/to/weir-codec-bench]
set -euo pipefail
BIN=${1:-.build-codec-release/release/weir-codec-bench}
LOW=${LOW:-2000}
HIGH=${HIGH:-12000}
# Valgrind gives up on Swift 6's DWARF ("possibly corrupted debuginfo"), as in bench/callgrind.sh.
STRIPPED=$(mktemp)
trap 'rm -f "$STRIPPED"' EXIT
strip --strip-debug -o "$STRIPPED" "$BIN"
chmod +x "$STRIPPED"
instructions() { # mode iterations case
    local out
    out=$(mktemp)
    valgrind --tool=callgrind --callgrind-out-file="$out" "$STRIPPED" "$1" "$2" "$3" >/dev/null 2>&1
    callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}'
    rm -f "$out"
}
for case in small browser; do
    for mode in ours nio nio-decode; do
        lo=$(instructions "$mode" "$LOW" "$case")
        hi=$(instructions "$mode" "$HIGH" "$case")
        echo "$case $mode: $(( (hi - lo) / (HIGH - LOW) )) instructions/request"
    done
done
