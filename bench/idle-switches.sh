#!/bin/bash
# Context switches of an idle Weir, by thread: what a gateway with nothing
# to do still wakes up for (the Lua watchdog used to tick every 10 ms).
#
# Starts WEIR_BIN with one no-op Lua plugin (bench/plugins/bench-noop) on
# 127.0.0.1:(19911 + BENCH_PORT_OFFSET), sends one request so that Lua has
# run (the upstream is a dead port: the answer is a 502 after the plugin),
# waits 1 s, then counts every thread's voluntary + involuntary context
# switches (/proc/PID/task/*/status) over SECONDS (default 5) of idleness.
#
#   WEIR_BIN=.build/release/weir bench/idle-switches.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${WEIR_BIN:-.build/release/weir}
SECONDS_IDLE=${1:-5}
OFFSET=${BENCH_PORT_OFFSET:-0}
PORT=$((19911 + OFFSET))
DIR=$(mktemp -d /tmp/weir-idle-XXXXXX)
trap 'kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; rm -rf "$DIR"' EXIT
cat > "$DIR/weir.yaml" <<YAML
listeners: [{ name: idle, listen: "127.0.0.1:$PORT" }]
upstreams: [{ name: nowhere, targets: ["127.0.0.1:$((19910 + OFFSET))"] }]
routes: [{ name: all, match: { paths: [/] }, upstream: nowhere, plugins: [{ name: bench-noop }] }]
plugin_paths: [$PWD/bench/plugins]
workers: 1
access_log: "off"
YAML
"$BIN" run --config "$DIR/weir.yaml" --no-watch > "$DIR/weir.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
echo "one request through the plugin: $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/x")"
sleep 1
snapshot() {
    for task in /proc/$PID/task/*; do
        echo "$(basename "$task") $(awk '/^voluntary_ctxt_switches/ {v = $2} /^nonvoluntary_ctxt_switches/ {n = $2} END {print v + n}' "$task/status")"
    done | sort
}
snapshot > "$DIR/before"
sleep "$SECONDS_IDLE"
snapshot > "$DIR/after"
join "$DIR/before" "$DIR/after" | awk -v s="$SECONDS_IDLE" '
    { d = $3 - $2; total += d; if (d > 0) printf "  thread %s: %d\n", $1, d }
    END { printf "%d context switches in %d s idle (%d threads)\n", total, s, NR }'
