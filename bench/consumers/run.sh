#!/usr/bin/env bash
# Consumers at scale (issue 5): what 100,000 consumers cost Weir, side by
# side with 10 consumers, on one key-auth route.
#
#   1. weir-consumer-bench (in-process): YAML parse and credential-index
#      build time, RSS growth, ns per lookup (hit and miss).
#   2. weir validate: wall time and peak RSS of loading the config.
#   3. weir run: time from start to listening, RSS once serving, the time of
#      a reload (POST /reload) and RSS after it.
#   4. wrk through key-auth (the wrk key belongs to the middle consumer):
#      req/s, and with --callgrind instructions per request.
#
#   bench/consumers/run.sh [--consumers N] [--duration S] [--callgrind] [--no-build]
#
# WEIR_BIN / CONSUMER_BENCH_BIN point at other release builds; by default
# both are built into the bench scratch folder (.build-bench). Prints
# numbers; fails only when something does not work (a 401 where a 200
# belongs, a proxy that does not start).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

CONSUMERS=100000
DURATION=10
CALLGRIND=0
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --consumers) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--consumers needs a positive integer"; CONSUMERS=$2; shift 2 ;;
        --duration) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--duration needs a positive integer"; DURATION=$2; shift 2 ;;
        --callgrind) CALLGRIND=1; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

# Own ports (origin included), so this can run next to bench/run.sh.
ORIGIN_PORT=19030
PORT=19020
ADMIN_PORT=19021
CONSUMER_BENCH_BIN=${CONSUMER_BENCH_BIN:-$WEIR_SCRATCH/release/weir-consumer-bench}
require_tools nginx wrk curl python3 ss
[ "$CALLGRIND" -eq 1 ] && require_tools valgrind callgrind_control
for port in "$ORIGIN_PORT" "$PORT" "$ADMIN_PORT"; do
    port_in_use "$port" && die "127.0.0.1:$port is already in use (is another benchmark running?)"
done
prepare_run_dir
trap 'cleanup_started' EXIT
trap 'log "interrupted; stopping everything started"; exit 130' INT TERM

if [ "$BUILD" -eq 1 ]; then
    build_weir
    log "building weir-consumer-bench (release, scratch ${WEIR_SCRATCH#$REPO_DIR/})"
    (cd "$REPO_DIR" && swift build -c release --scratch-path "$WEIR_SCRATCH" --product weir-consumer-bench -j 2 "${WEIR_RELEASE_FLAGS[@]}") \
        > "$RUN_DIR/logs/consumer-bench-build.log" 2>&1 || die "build failed (see $RUN_DIR/logs/consumer-bench-build.log)"
fi
[ -x "$WEIR_BIN" ] || die "no weir binary at $WEIR_BIN"

echo "== in-process: YAML parse, credential index, lookups ($CONSUMER_BENCH_BIN)"
"$CONSUMER_BENCH_BIN" "$CONSUMERS" 2000000 || die "weir-consumer-bench failed"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }
ms_since() { python3 -c "import time,sys; print(f'{(time.monotonic() - float(sys.argv[1])) * 1000:.0f}')" "$1"; }
now() { python3 -c 'import time; print(time.monotonic())'; }

start_origin
for n in 10 "$CONSUMERS"; do
    config="$RUN_DIR/consumers-$n.yaml"
    python3 "$BENCH_DIR/consumers/gen_config.py" "$n" "$config" --port "$PORT" --origin-port "$ORIGIN_PORT" \
        --admin-port "$ADMIN_PORT" --plugins "$REPO_DIR/plugins" --bench-key "$API_KEY"
    echo "== $n consumers (config $(du -h "$config" | cut -f1))"

    validate=$( { /usr/bin/time -f "%e %M" "$WEIR_BIN" validate --config "$config" > /dev/null; } 2>&1 | tail -1)
    echo "weir validate: ${validate% *} s, peak RSS $(( ${validate#* } / 1024 )) MiB"

    started=$(now)
    if [ "$CALLGRIND" -eq 1 ]; then
        strip --strip-debug -o "$RUN_DIR/weir-nodebug" "$WEIR_BIN"
        (cd "$REPO_DIR" && exec $(pin "$PROXY_CPU") valgrind --tool=callgrind --instr-atstart=no \
            --callgrind-out-file="$RUN_DIR/callgrind-$n.out" "$RUN_DIR/weir-nodebug" run --config "$config" --workers 1 --no-watch) \
            > "$RUN_DIR/logs/weir-$n.out" 2>&1 &
    else
        (cd "$REPO_DIR" && exec $(pin "$PROXY_CPU") "$WEIR_BIN" run --config "$config" --workers 1 --no-watch) \
            > "$RUN_DIR/logs/weir-$n.out" 2>&1 &
    fi
    pid=$!
    STARTED_PIDS+=("$pid"); STARTED_NAMES+=("weir-$n"); PID_OF["weir-$n"]=$pid
    wait_for_port "$PORT" 600 || die "weir did not listen with $n consumers (see $RUN_DIR/logs/weir-$n.out)"
    echo "weir run: listening after $(ms_since "$started") ms, RSS $(( $(rss_kib "$pid") / 1024 )) MiB"

    ok=$(curl -sS -o /dev/null -w '%{http_code}' -H "apikey: $API_KEY" "http://127.0.0.1:$PORT/")
    denied=$(curl -sS -o /dev/null -w '%{http_code}' -H "apikey: wrong" "http://127.0.0.1:$PORT/")
    [ "$ok" = 200 ] && [ "$denied" = 401 ] || die "key-auth check failed: $ok for the bench key, $denied for a wrong key"

    reloaded=$(now)
    status=$(curl -sS -o "$RUN_DIR/reload-$n.out" -w '%{http_code}' --max-time 600 -X POST "http://127.0.0.1:$ADMIN_PORT/reload")
    [ "$status" = 200 ] || die "reload answered $status: $(cat "$RUN_DIR/reload-$n.out")"
    echo "POST /reload: $(ms_since "$reloaded") ms, RSS after $(( $(rss_kib "$pid") / 1024 )) MiB"

    wrk_run() {
        # shellcheck disable=SC2046
        timeout $(($1 + 60)) $(pin "$LOAD_CPU") wrk -t 1 -c 8 -d "${1}s" --timeout 10s -s "$WRK_REPORTER" \
            -H "apikey: $API_KEY" "http://127.0.0.1:$PORT/" | grep '^WRK_RESULT'
    }
    field() { grep -o "$1=[0-9.]*" <<< "$2" | head -1 | cut -d= -f2; }
    wrk_run 2 > /dev/null
    if [ "$CALLGRIND" -eq 1 ]; then
        callgrind_control -i on "$pid" > /dev/null
        result=$(wrk_run "$DURATION")
        callgrind_control -d "$pid" > /dev/null; callgrind_control -i off "$pid" > /dev/null
        sleep 1
        dump=$(ls -t "$RUN_DIR/callgrind-$n.out"* | head -1)
        total=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
        [ -n "$total" ] || total=$(grep -m1 '^totals:' "$dump" | awk '{print $2}')
        echo "callgrind: $(field requests "$result") requests, $(python3 -c "print(f'{$total / $(field requests "$result"):,.0f}')") instructions per request"
    else
        result=$(wrk_run "$DURATION")
        echo "wrk -c 8 ${DURATION}s: $(field rps "$result") req/s"
    fi
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
done
