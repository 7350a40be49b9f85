#!/usr/bin/env bash
# How often a proxy's writes wake its sleeping peers (wrk, the origin), and
# what the origin costs per request behind it, in bench/run.sh's setup
# (origin nginx + wrk on one core, the proxy on the other):
#   1. a clean window: the origin worker's task-clock (perf stat) per
#      request: a peer woken more often serves fewer requests per wake-up
#      and costs more per request on the load core;
#   2. `perf record` of the proxy's event-loop thread over TRACE seconds
#      (syscall entries/exits, sched_waking, sched_switch): which writes
#      woke a peer, by the gap since the previous write of the same kind
#      (bench/wakeups.py). Tracing slows the proxy; compare shares, not
#      rates, and compare proxies traced the same way.
# Report: bench/profiles/<timestamp>-wakeups-<proxy>.txt.
#
#   bench/wakeups.sh [--proxy weir|nginx] [--connections N] [--duration S] [--trace S]
# Uses the release binary at $WEIR_BIN (as the other scripts).
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROXY=weir
CONNS=32
DURATION=5
TRACE=1

while [ $# -gt 0 ]; do
    case "$1" in
        --proxy) PROXY=${2:-}; shift 2 ;;
        --connections) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--connections needs a positive integer"; CONNS=$2; shift 2 ;;
        --duration) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--duration needs a positive integer"; DURATION=$2; shift 2 ;;
        --trace) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] && [ "$2" -le 5 ] || die "--trace needs 1..5 seconds"; TRACE=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

case "$PROXY" in
    weir) PORT=$WEIR_PORT ;;
    nginx) PORT=$NGINX_PORT ;;
    *) die "unknown proxy '$PROXY' (known: weir, nginx)" ;;
esac
URL="http://127.0.0.1:$PORT/"

require_tools nginx wrk curl perf python3
begin_bench_run "$ORIGIN_PORT" "$PORT"
mkdir -p "$BENCH_DIR/profiles"
REPORT="$BENCH_DIR/profiles/$STAMP-wakeups-$PROXY.txt"

start_origin
case "$PROXY" in
    weir) start_weir weir "$PORT" || die "weir: not available ($(weir_unavailable_reason weir))" ;;
    nginx) start_nginx_proxy ;;
esac
problem=$(verify_proxies_to_origin "$PROXY" "$PORT" "$URL") || die "$PROXY does not proxy to the origin: $problem"

ORIGIN_WORKER=$(pgrep -P "${PID_OF[origin]}" | head -1)
[ -n "$ORIGIN_WORKER" ] || die "no origin worker process"
# The thread that serves requests: Weir's event loop (one worker), nginx's worker.
case "$PROXY" in
    weir) LOOP_TID=$(for task in /proc/"${PID_OF[weir]}"/task/*; do
              [ "$(cat "$task/comm")" = "NIO-ELT-1-#1" ] && basename "$task"; done | head -1) ;;
    nginx) LOOP_TID=$(pgrep -P "${PID_OF[nginx]}" | head -1) ;;
esac
[ -n "$LOOP_TID" ] || die "could not find $PROXY's event-loop thread"

wrk_for() { # SECONDS
    # shellcheck disable=SC2046
    timeout $(($1 + 30)) $(pin "$LOAD_CPU") wrk -t 1 -c "$CONNS" -d "${1}s" --timeout 5s \
        -s "$WRK_REPORTER" "$URL" 2>&1 | grep '^WRK_RESULT'
}
field() { grep -o "$1=[0-9.]*" <<< "$2" | head -1 | cut -d= -f2; }

log "warm-up 2 s"
wrk_for 2 > /dev/null

log "window 1: origin task-clock over a ${DURATION} s wrk run"
perf stat -x, -e task-clock -p "$ORIGIN_WORKER" -o "$RUN_DIR/origin-stat.csv" > /dev/null 2>&1 &
STAT_PID=$!
sleep 0.3
stat_wrk=$(wrk_for "$DURATION")
kill -INT "$STAT_PID" 2>/dev/null; wait "$STAT_PID" 2>/dev/null
requests=$(field requests "$stat_wrk")
[ -n "$requests" ] && [ "$requests" -gt 0 ] || die "no requests served in window 1"
origin_ms=$(grep ',task-clock' "$RUN_DIR/origin-stat.csv" | cut -d, -f1)

log "window 2: perf record of $PROXY's event-loop thread for ${TRACE} s inside a $((TRACE + 3)) s wrk run"
wrk_for $((TRACE + 3)) > "$RUN_DIR/wrk-trace.out" &
WRK_PID=$!
sleep 1.5
perf record -q -t "$LOOP_TID" -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit \
    -e sched:sched_waking -e sched:sched_switch -o "$RUN_DIR/wakeups.data" -- sleep "$TRACE" \
    > "$RUN_DIR/logs/perf-record.out" 2>&1
wait "$WRK_PID"; WRK_PID=""
perf script -i "$RUN_DIR/wakeups.data" -F tid,time,event,trace > "$RUN_DIR/wakeups.txt" 2>/dev/null

{
    echo "# Peer wake-ups of $PROXY, $STAMP"
    echo "# command: bench/wakeups.sh --proxy $PROXY --connections $CONNS --duration $DURATION --trace $TRACE"
    echo "# machine: $(uname -srm); $(nproc) CPUs; weir binary from commit $(weir_binary_commit), repo HEAD $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null)"
    echo "# pinning: origin nginx + wrk on CPU ${LOAD_CPU:-none}, $PROXY on CPU ${PROXY_CPU:-none}"
    echo "# load: $(uptime | sed 's/.*load average/load average/')"
    echo
    echo "## window 1: $requests requests, $(field rps "$stat_wrk") req/s, p50 $(field p50_us "$stat_wrk") µs, p99 $(field p99_us "$stat_wrk") µs"
    python3 -c "import sys; print(f'origin worker task-clock: {float(sys.argv[1]) * 1000 / int(sys.argv[2]):.2f} µs/request')" \
        "$origin_ms" "$requests"
    echo
    echo "## window 2 (traced: slower, compare shares)"
    python3 "$BENCH_DIR/wakeups.py" "$RUN_DIR/wakeups.txt" | sed '1d'
} > "$REPORT"
cat "$REPORT"
log "report: ${REPORT#$REPO_DIR/}"
