#!/usr/bin/env bash
# Where one proxy's CPU per request goes, split user / kernel, in the same
# setup as bench/run.sh (origin nginx + wrk on one core, the proxy on the
# other). Made for machines whose VM exposes no hardware counters (no
# cycles/instructions/IPC): everything here is a software count.
#   1. a clean window (only `perf stat` with software events attached):
#      task-clock, context switches, page faults, and each thread's
#      utime/stime delta from /proc, all per request;
#   2. `perf record -e cpu-clock` over a second window: the share of samples
#      in user vs kernel mode, by shared object, and the top kernel symbols;
#   3. `perf trace -s` over a third window: per syscall, calls and kernel
#      time per request (perf trace slows the proxy; the per-request counts
#      and the relative times are what matter, not its req/s).
# The report goes to bench/profiles/<timestamp>-cpusplit-<proxy>.txt.
#
#   bench/cpusplit.sh [--proxy weir|weir-lua|weir-https|nginx|nginx-https] [--connections N] [--duration S]
# Uses the release binary at $WEIR_BIN (build it first: bench/run.sh or
# bench/profile.sh without --no-build).
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROXY=weir
CONNS=32
DURATION=10

while [ $# -gt 0 ]; do
    case "$1" in
        --proxy) PROXY=${2:-}; shift 2 ;;
        --connections) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--connections needs a positive integer"; CONNS=$2; shift 2 ;;
        --duration) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] && [ "$2" -ge 4 ] || die "--duration needs an integer of at least 4 seconds"; DURATION=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

case "$PROXY" in
    weir) PORT=$WEIR_PORT; URL="http://127.0.0.1:$PORT/" ;;
    weir-lua) PORT=$WEIR_LUA_PORT; URL="http://127.0.0.1:$PORT/" ;;
    nginx) PORT=$NGINX_PORT; URL="http://127.0.0.1:$PORT/" ;;
    weir-https) PORT=$WEIR_HTTPS_PORT; URL="https://127.0.0.1:$PORT/" ;;
    nginx-https) PORT=$NGINX_HTTPS_PORT; URL="https://127.0.0.1:$PORT/" ;;
    *) die "unknown proxy '$PROXY' (known: weir, weir-lua, weir-https, nginx, nginx-https)" ;;
esac
CURL_ARGS=()
case "$PROXY" in *-https) CURL_ARGS=(--cacert "$RUN_DIR/tls/cert.pem") ;; esac

require_tools nginx wrk curl openssl perf python3 ss
begin_bench_run "$ORIGIN_PORT" "$PORT"
mkdir -p "$BENCH_DIR/profiles"
REPORT="$BENCH_DIR/profiles/$STAMP-cpusplit-$PROXY.txt"

start_origin
case "$PROXY" in
    weir|weir-lua|weir-https) start_weir "$PROXY" "$PORT" || die "$PROXY: not available ($(weir_unavailable_reason "$PROXY"))" ;;
    nginx) start_nginx_proxy ;;
    nginx-https)
        # run-protocols.sh's nginx (HTTPS, h2c, grpc_pass and TLS-upstream servers): only the HTTPS one gets load.
        render_template nginx-protocols.conf "$RUN_DIR/nginx-protocols.conf"
        start_bg $PROXY "$PROXY_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-protocols-error.log" \
            -c "$RUN_DIR/nginx-protocols.conf" -g "daemon off;"
        wait_for_port "$PORT" 10 || die "nginx (protocols) did not listen on 127.0.0.1:$PORT" ;;
esac
problem=$(verify_proxies_to_origin "$PROXY" "$PORT" "$URL" "${CURL_ARGS[@]}") || die "$PROXY does not proxy to the origin: $problem"
ROOT_PID=${PID_OF[$PROXY]}

# The proxy's pids: the process we started and its children (nginx's worker).
PID_LIST=("$ROOT_PID" $(pgrep -P "$ROOT_PID"))
PIDS=$(IFS=,; echo "${PID_LIST[*]}")

wrk_for() { # SECONDS
    # shellcheck disable=SC2046
    timeout $(($1 + 30)) $(pin "$LOAD_CPU") wrk -t 1 -c "$CONNS" -d "${1}s" --timeout 5s \
        -s "$WRK_REPORTER" -H "apikey: $API_KEY" "$URL" 2>&1 | grep '^WRK_RESULT'
}
field() { grep -o "$1=[0-9.]*" <<< "$2" | head -1 | cut -d= -f2; }

# Every thread of the proxy: "tid comm utime stime voluntary_ctxt nonvoluntary_ctxt" (ticks).
thread_times() {
    local pid task
    for pid in "${PID_LIST[@]}"; do
        for task in /proc/"$pid"/task/*; do
            python3 - "$task" <<'PY'
import sys
task = sys.argv[1]
data = open(f"{task}/stat").read()
comm = data[data.index("(") + 1:data.rindex(")")].replace(" ", "_")
fields = data[data.rindex(")") + 2:].split()
status = dict(line.split(":", 1) for line in open(f"{task}/status") if ":" in line)
print(task.rsplit("/", 1)[1], comm, fields[11], fields[12],
      status["voluntary_ctxt_switches"].strip(), status["nonvoluntary_ctxt_switches"].strip())
PY
        done
    done
}

log "warm-up 2 s"
wrk_for 2 > /dev/null

# --- 1. clean window: perf stat (software events) + /proc utime/stime ---------
log "window 1: perf stat + /proc times over a ${DURATION} s wrk run"
thread_times > "$RUN_DIR/threads-before.txt"
perf stat -x, -e task-clock,context-switches,cpu-migrations,page-faults,sched:sched_waking -p "$PIDS" \
    -o "$RUN_DIR/perf-stat.csv" > /dev/null 2>&1 &
STAT_PID=$!
# Which tasks the proxy wakes (wrk, the origin, its own threads): tracepoint records, a few thousand a second.
perf record -e sched:sched_waking -p "$PIDS" -o "$RUN_DIR/waking.data" > "$RUN_DIR/logs/perf-waking.out" 2>&1 &
WAKING_PID=$!
sleep 0.3
stat_wrk=$(wrk_for "$DURATION")
sleep 0.3
kill -INT "$STAT_PID" "$WAKING_PID" 2>/dev/null; wait "$STAT_PID" "$WAKING_PID" 2>/dev/null
thread_times > "$RUN_DIR/threads-after.txt"
stat_requests=$(field requests "$stat_wrk")
[ -n "$stat_requests" ] && [ "$stat_requests" -gt 0 ] || die "no requests served in window 1"

# --- 2. perf record -e cpu-clock: user vs kernel samples, kernel symbols -------
log "window 2: perf record -e cpu-clock over a ${DURATION} s wrk run"
perf record -e cpu-clock -F 4999 -g -p "$PIDS" -o "$RUN_DIR/perf.data" > "$RUN_DIR/logs/perf-record.out" 2>&1 &
REC_PID=$!
sleep 0.3
rec_wrk=$(wrk_for "$DURATION")
kill -INT "$REC_PID" 2>/dev/null; wait "$REC_PID" 2>/dev/null

# --- 3. perf trace -s: syscall counts and kernel time ---------------------------
log "window 3: perf trace -s over a ${DURATION} s wrk run"
perf trace -s -p "$PIDS" -o "$RUN_DIR/perf-trace.txt" > /dev/null 2>&1 &
TRACE_PID=$!
sleep 1    # perf trace needs a moment to attach to every thread
trace_wrk=$(wrk_for "$DURATION")
kill -INT "$TRACE_PID" 2>/dev/null; wait "$TRACE_PID" 2>/dev/null
trace_requests=$(field requests "$trace_wrk")

# --- report ----------------------------------------------------------------------
demangle() {
    if command -v swift-demangle >/dev/null 2>&1; then swift-demangle --simplified; else cat; fi
}
{
    echo "# CPU split of $PROXY under load, $STAMP"
    echo "# command: bench/cpusplit.sh --proxy $PROXY --connections $CONNS --duration $DURATION"
    echo "# machine: $(uname -srm); $(nproc) CPUs; weir binary from commit $(weir_binary_commit), repo HEAD $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null)"
    echo "# pinning: origin nginx + wrk on CPU ${LOAD_CPU:-none}, $PROXY on CPU ${PROXY_CPU:-none}"
    echo "# load: $(uptime | sed 's/.*load average/load average/')"
    echo
    echo "## window 1 (perf stat, software events only): $stat_requests requests, $(field rps "$stat_wrk") req/s"
    python3 - "$RUN_DIR/perf-stat.csv" "$RUN_DIR/threads-before.txt" "$RUN_DIR/threads-after.txt" "$stat_requests" "$(getconf CLK_TCK)" <<'PY'
import sys
stat_path, before_path, after_path, requests, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
counts = {}
for line in open(stat_path):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0] and not line.startswith("#"):
        try:
            counts[parts[2]] = float(parts[0])
        except ValueError:
            pass
task_ms = counts.get("task-clock", 0.0)   # perf stat -x prints task-clock in msec
print(f"task-clock             {task_ms * 1000 / requests:8.2f} us/request  (perf stat)")
for event in ("context-switches", "cpu-migrations", "page-faults", "sched:sched_waking"):
    print(f"{event:<22} {counts.get(event, 0) / requests:8.4f} /request")
def load(path):
    rows = {}
    for line in open(path):
        tid, comm, ut, st, vol, invol = line.split()
        rows[tid] = (comm, int(ut), int(st), int(vol), int(invol))
    return rows
before, after = load(before_path), load(after_path)
total_u = total_s = 0
print()
print("per thread (/proc utime/stime deltas; ticks of 1/%d s):" % hz)
print(f"  {'tid':>8} {'comm':<20} {'user us/req':>11} {'sys us/req':>10} {'vol cs/req':>10} {'invol cs/req':>12}")
for tid, (comm, ut, st, vol, invol) in sorted(after.items()):
    b = before.get(tid, (comm, 0, 0, 0, 0))
    du, ds, dv, di = ut - b[1], st - b[2], vol - b[3], invol - b[4]
    total_u += du; total_s += ds
    if du + ds + dv + di == 0:
        continue
    us = 1e6 / hz / requests
    print(f"  {tid:>8} {comm:<20} {du * us:11.2f} {ds * us:10.2f} {dv / requests:10.4f} {di / requests:12.4f}")
us = 1e6 / hz / requests
print(f"total: user {total_u * us:.2f} us/request, kernel {total_s * us:.2f} us/request "
      f"(kernel share {100 * total_s / max(total_u + total_s, 1):.1f}%)")
PY
    echo
    echo "tasks woken by the proxy (sched:sched_waking), per request, by the wakee's name and CPU:"
    perf script -i "$RUN_DIR/waking.data" -F trace 2>/dev/null \
        | sed -n 's/.*comm=\([^ ]*\) .*target_cpu=\([0-9]*\).*/\1 cpu\2/p' | sort | uniq -c | sort -rn | head -8 \
        | awk -v n="$stat_requests" '{ printf "  %8.4f  %s %s\n", $1 / n, $2, $3 }'
    echo
    echo "## window 2 (perf record -e cpu-clock -F 4999 -g): $(field requests "$rec_wrk") requests, $(field rps "$rec_wrk") req/s"
    echo "by shared object:"
    perf report -i "$RUN_DIR/perf.data" --no-children --stdio -g none --sort dso 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | head -12
    echo
    echo "top 30 kernel symbols (share of all samples):"
    perf report -i "$RUN_DIR/perf.data" --no-children --stdio -g none --sort sym \
        --dsos '[kernel.kallsyms]' 2>/dev/null | grep -v '^#' | grep -v '^$' | head -30
    echo
    echo "top 25 user symbols (share of all samples):"
    perf report -i "$RUN_DIR/perf.data" --no-children --stdio -g none --sort dso,sym 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | grep -v 'kernel.kallsyms' | head -25 | demangle | cut -c1-200
    echo
    echo "kernel samples by the syscall they run under, and how many run the loopback receive path (net_rx_action:"
    echo "a write to a loopback socket delivers the packet to the peer socket on the writer's CPU) or wake a task"
    perf script -i "$RUN_DIR/perf.data" -F ip,sym,dso 2>/dev/null | python3 "$BENCH_DIR/cpusplit_stacks.py"
    echo
    echo "## window 3 (perf trace -s): ${trace_requests:-?} requests, $(field rps "$trace_wrk") req/s (tracing slows the proxy)"
    if [ -n "${trace_requests:-}" ] && [ "${trace_requests:-0}" -gt 0 ]; then
        python3 - "$RUN_DIR/perf-trace.txt" "$trace_requests" <<'PY'
import sys, re, collections
path, requests = sys.argv[1], int(sys.argv[2])
calls, msec = collections.Counter(), collections.Counter()
for line in open(path):
    # "   read     12345      0   123.456   0.001   0.010   0.100   1.23%"
    m = re.match(r"\s+(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+", line)
    if m:
        calls[m.group(1)] += int(m.group(2)); msec[m.group(1)] += float(m.group(4))
total_calls = sum(calls.values())
print(f"syscalls per request: {total_calls / requests:.2f}")
print(f"  {'syscall':<16} {'calls/req':>9} {'us/req':>8} {'us/call':>8}  (wall time inside the call, as perf trace saw it)")
for name, n in sorted(calls.items(), key=lambda kv: -msec[kv[0]]):
    print(f"  {name:<16} {n / requests:9.3f} {msec[name] * 1000 / requests:8.3f} {msec[name] * 1000 / n:8.3f}")
PY
    fi
    echo
    echo "## raw perf trace -s"
    cat "$RUN_DIR/perf-trace.txt"
} > "$REPORT"

cat "$REPORT" | sed -n '1,120p'
echo "full report: ${REPORT#$REPO_DIR/}"
