#!/usr/bin/env bash
# Profile one proxy under wrk load, in the same setup as bench/run.sh
# (origin nginx + wrk on one core, the proxy on the other):
#   1. `perf record -g` for a few seconds, then `perf report --no-children`:
#      the top 20 symbols and the split by shared object (kernel, libc,
#      Swift runtime, NIO, Weir), and from the call stacks the inclusive
#      time of the proxy's functions and who calls the hottest runtime and
#      kernel symbols (perf_attribution.py), demangled;
#   2. `strace -c -f` over a separate window: which syscalls, and how many
#      per request (strace slows the proxy a lot, so its req/s is not a
#      throughput figure; the per-request counts are what matter).
# The report goes to bench/profiles/<timestamp>-<proxy>.txt, which is meant
# to be committed: it is what the data path gets optimised against.
#
# The protocol variants of run-protocols.sh profile the same way: weir-tcp
# vs haproxy-tcp (HTTP through an L4 proxy, the tcp-rps case; use
# --connections 64) and weir-https vs nginx-https (keep-alive HTTPS, TLS 1.3), weir-tlsup vs
# nginx-tlsup (plain clients, TLS to the origin over kept-alive connections).
#
#   bench/profile.sh [--no-build] [--proxy weir|weir-noop|weir-lua|weir-tcp|weir-https|weir-tlsup|weir-extauthz|weir-extauthz-close|
#                                          nginx|nginx-https|nginx-tlsup|haproxy|haproxy-tcp|nginx-lua]
#                    [--connections N] [--duration S]
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUILD=1
PROXY=weir
CONNS=32
DURATION=10

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0; shift ;;
        --proxy) PROXY=${2:-}; shift 2 ;;
        --connections) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--connections needs a positive integer"; CONNS=$2; shift 2 ;;
        --duration) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] && [ "$2" -ge 4 ] || die "--duration needs an integer of at least 4 seconds"; DURATION=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

case "$PROXY" in
    weir) PORT=$WEIR_PORT ;;
    weir-noop) PORT=$WEIR_NOOP_PORT ;;
    weir-lua) PORT=$WEIR_LUA_PORT ;;
    nginx) PORT=$NGINX_PORT ;;
    haproxy) PORT=$HAPROXY_PORT ;;
    nginx-lua) PORT=$NGINX_LUA_PORT ;;
    weir-tcp) PORT=$WEIR_TCP_PORT ;;
    weir-https) PORT=$WEIR_HTTPS_PORT ;;
    weir-tlsup) PORT=$WEIR_TLSUP_PORT ;;
    nginx-https) PORT=$NGINX_HTTPS_PORT ;;
    nginx-tlsup) PORT=$NGINX_TLSUP_PORT ;;
    haproxy-tcp) PORT=$HAPROXY_TCP_PORT ;;
    weir-extauthz) PORT=$WEIR_EXTAUTHZ_PORT ;;
    weir-extauthz-close) PORT=$WEIR_EXTAUTHZ_CLOSE_PORT ;;
    *) die "unknown proxy '$PROXY' (known: weir, weir-noop, weir-lua, weir-tcp, weir-https, weir-tlsup, weir-extauthz, weir-extauthz-close, nginx, nginx-https, nginx-tlsup, haproxy, haproxy-tcp, nginx-lua)" ;;
esac
# The HTTPS variants are asked over TLS with the run's own certificate.
URL="http://127.0.0.1:$PORT/"
CURL_ARGS=()
case "$PROXY" in *-https) URL="https://127.0.0.1:$PORT/"; CURL_ARGS=(--cacert "$RUN_DIR/tls/cert.pem") ;; esac

require_tools nginx wrk curl openssl perf strace python3 ss
begin_bench_run "$ORIGIN_PORT" "$PORT"
mkdir -p "$BENCH_DIR/profiles"
REPORT="$BENCH_DIR/profiles/$STAMP-$PROXY.txt"

if [[ "$PROXY" == weir* ]] && [ "$BUILD" -eq 1 ]; then build_weir; fi

start_origin
case "$PROXY" in *-https) make_test_certificate ;; esac
case "$PROXY" in
    weir-noop|weir-lua) probe_weir_plugins || die "$PROXY: not available ($(weir_unavailable_reason "$PROXY"))"
        start_weir "$PROXY" "$PORT" || die "$PROXY: not available ($(weir_unavailable_reason "$PROXY"))" ;;
    weir|weir-tcp|weir-https|weir-tlsup|weir-extauthz|weir-extauthz-close) start_weir "$PROXY" "$PORT" || die "$PROXY: not available ($(weir_unavailable_reason "$PROXY"))" ;;
    nginx) start_nginx_proxy ;;
    haproxy) start_haproxy ;;
    nginx-lua) start_nginx_lua ;;
    nginx-https|nginx-tlsup)
        # run-protocols.sh's nginx (HTTPS, h2c, grpc_pass and TLS-upstream servers): only the measured one gets load.
        render_template nginx-protocols.conf "$RUN_DIR/nginx-protocols.conf"
        start_bg $PROXY "$PROXY_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-protocols-error.log" \
            -c "$RUN_DIR/nginx-protocols.conf" -g "daemon off;"
        wait_for_port "$PORT" 10 || die "nginx (protocols) did not listen on 127.0.0.1:$PORT (see $RUN_DIR/logs/$PROXY.out)" ;;
    haproxy-tcp)
        render_template haproxy-tcp.cfg "$RUN_DIR/haproxy-tcp.cfg"
        start_bg haproxy-tcp "$PROXY_CPU" haproxy -db -f "$RUN_DIR/haproxy-tcp.cfg"
        wait_for_port "$PORT" 10 || die "haproxy (tcp) did not listen on 127.0.0.1:$PORT (see $RUN_DIR/logs/haproxy-tcp.out)" ;;
esac
problem=$(verify_proxies_to_origin "$PROXY" "$PORT" "$URL" "${CURL_ARGS[@]}") || die "$PROXY does not proxy to the origin: $problem"
ROOT_PID=${PID_OF[$PROXY]}

# Every pid of the proxy: the process we started and its descendants
# (an nginx master's worker does the proxying).
proxy_pids() {
    local queue=("$ROOT_PID") all=() pid child
    while [ ${#queue[@]} -gt 0 ]; do
        pid=${queue[0]}; queue=("${queue[@]:1}")
        all+=("$pid")
        for child in $(pgrep -P "$pid"); do queue+=("$child"); done
    done
    local IFS=,; echo "${all[*]}"
}
PIDS=$(proxy_pids)

wrk_for() { # SECONDS
    # shellcheck disable=SC2046
    timeout $(($1 + 30)) $(pin "$LOAD_CPU") wrk -t 1 -c "$CONNS" -d "${1}s" --timeout 5s \
        -s "$WRK_REPORTER" -H "apikey: $API_KEY" "$URL"
}
field() { grep -o "$1=[0-9.]*" <<< "$2" | head -1 | cut -d= -f2; }

log "warm-up 2 s"
wrk_for 2 > /dev/null 2>&1

# --- perf --------------------------------------------------------------------
log "perf record -g on pids $PIDS for $((DURATION - 2)) s under wrk -c $CONNS"
wrk_for "$DURATION" > "$RUN_DIR/wrk-perf.out" 2>&1 &
WRK_PID=$!
sleep 1
perf record -g -p "$PIDS" -o "$RUN_DIR/perf.data" -- sleep $((DURATION - 2)) > "$RUN_DIR/logs/perf-record.out" 2>&1 \
    || die "perf record failed: $(tail -3 "$RUN_DIR/logs/perf-record.out")"
wait "$WRK_PID"
perf_wrk=$(grep '^WRK_RESULT' "$RUN_DIR/wrk-perf.out")

# --- strace --------------------------------------------------------------------
STRACE_SECONDS=5
log "strace -c -f on pid $ROOT_PID and its children for a ${STRACE_SECONDS} s wrk run"
strace_targets=()
IFS=, read -r -a pid_array <<< "$PIDS"
for pid in "${pid_array[@]}"; do strace_targets+=(-p "$pid"); done
strace -c -f -o "$RUN_DIR/strace.out" "${strace_targets[@]}" 2> "$RUN_DIR/logs/strace.err" &
STRACE_PID=$!
sleep 1    # let strace attach to every thread before the load starts
strace_wrk=$(wrk_for "$STRACE_SECONDS" 2>&1 | grep '^WRK_RESULT')
kill -INT "$STRACE_PID" 2>/dev/null
wait "$STRACE_PID" 2>/dev/null
strace_requests=$(field requests "$strace_wrk")
# strace -c columns: % time, seconds, usecs/call, calls, [errors], syscall.
strace_calls=$(awk '$NF == "total" { print $4 }' "$RUN_DIR/strace.out")

# --- report --------------------------------------------------------------------

# Swift symbols are mangled; swift-demangle (from the toolchain) makes them readable.
demangle() {
    if command -v swift-demangle >/dev/null 2>&1; then swift-demangle --simplified; else cat; fi
}
case "$PROXY" in weir*) PROXY_BINARY=weir ;; nginx*) PROXY_BINARY=nginx ;; haproxy*) PROXY_BINARY=haproxy ;; *) PROXY_BINARY=$PROXY ;; esac
{
    echo "# Profile of $PROXY under load, $STAMP"
    echo "# command: bench/profile.sh --proxy $PROXY --connections $CONNS --duration $DURATION"
    echo "# machine: $(uname -srm); $(nproc) CPUs; weir binary from commit $(weir_binary_commit), repo HEAD $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null)"
    echo "# pinning: origin nginx + wrk on CPU ${LOAD_CPU:-none}, $PROXY on CPU ${PROXY_CPU:-none}"
    echo "# load: $(uptime | sed 's/.*load average/load average/'); swift compiler processes: $(( $(pgrep -c -x swift-frontend) + $(pgrep -c -x swift-build) ))"
    echo
    echo "## wrk during perf: $(field rps "$perf_wrk") req/s, p50 $(field p50_us "$perf_wrk") us, p99 $(field p99_us "$perf_wrk") us (perf itself costs a little)"
    echo
    echo "## perf report --no-children: top 20 symbols"
    perf report -i "$RUN_DIR/perf.data" --no-children --stdio -g none --sort dso,symbol 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -20 | demangle | cut -c1-220
    echo
    echo "## perf report --no-children: by shared object"
    perf report -i "$RUN_DIR/perf.data" --no-children --stdio -g none --sort dso 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | head -15
    echo
    echo "## who the time goes to: inclusive time and nearest callers (bench/perf_attribution.py)"
    perf script -i "$RUN_DIR/perf.data" -F tid,ip,sym,dso 2>/dev/null \
        | python3 "$BENCH_DIR/perf_attribution.py" "$PROXY_BINARY" | demangle | cut -c1-220
    echo
    echo "## strace -c -f over a ${STRACE_SECONDS} s wrk run (strace slows the proxy; use the per-request counts)"
    echo "requests during the window: ${strace_requests:-?}; syscalls: ${strace_calls:-?}"
    if [ -n "${strace_requests:-}" ] && [ "${strace_requests:-0}" -gt 0 ] && [ -n "${strace_calls:-}" ]; then
        echo "syscalls per request: $(python3 -c "print(f'{$strace_calls / $strace_requests:.2f}')")"
        echo
        echo "per request, by syscall:"
        awk -v n="$strace_requests" '$1 ~ /^[0-9.]+$/ && $NF != "total" { printf "  %-20s %8.3f\n", $NF, $4 / n }' "$RUN_DIR/strace.out"
    fi
    echo
    cat "$RUN_DIR/strace.out"
} > "$REPORT"

# Keep the raw samples (gitignored) for deeper digging with perf report/script.
mkdir -p "$RESULTS_DIR"
cp "$RUN_DIR/perf.data" "$RESULTS_DIR/$STAMP-$PROXY.perf.data"

echo
cat "$REPORT" | sed -n '1,45p'
echo "..."
echo "full report: ${REPORT#$REPO_DIR/}"
echo "raw samples: ${RESULTS_DIR#$REPO_DIR/}/$STAMP-$PROXY.perf.data (perf report -i ...)"
