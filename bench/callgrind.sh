#!/usr/bin/env bash
# Instructions per request of one proxy, counted by valgrind's callgrind.
#
# On this shared, noisy machine req/s and even CPU time move with other
# people's builds; the number of instructions a proxy executes per request
# does not. That makes it the figure to compare before and after a data-path
# change (DESIGN.md "Threading and the hot path"). Only user-space
# instructions are counted (the kernel's share is in profile.sh's perf
# report).
#
# The proxy runs under callgrind with instrumentation off; after a warm-up
# it is switched on (callgrind_control -i on), wrk sends load for a fixed
# time, and the counts are dumped (callgrind_control -d). Instructions
# divided by the requests wrk completed = instructions per request. The
# report (top functions by inclusive and by self instructions, demangled)
# goes to bench/profiles/<timestamp>-<proxy>-callgrind.txt.
#
# The protocol variants of run-protocols.sh count the same way: weir-tcp vs
# haproxy-tcp (HTTP through an L4 proxy: the tcp-rps case, small messages;
# use --connections 64 as that case does) and weir-https vs nginx-https
# (keep-alive HTTPS, TLS 1.3, a throwaway certificate; --connections 32).
# weir-tlsup vs nginx-tlsup take plain HTTP/1.1 clients to the origin's
# TLS port (TLS to the upstream over kept-alive connections; use --steady
# so their handshakes stay out of the window).
# weir-h2c (and nginx-h2c, run-protocols.sh's nginx `http2` server) is
# driven by h2load instead of wrk (4 connections x 100 concurrent streams,
# cleartext HTTP/2 with prior knowledge, as run-protocols.sh's h2c case;
# --connections does not apply).
#
# Weir's reports also give the swift_retain + swift_release calls per
# request and their top callers (bench/rc_calls.py); --call-sites records
# instruction addresses too (--dump-instr=yes) and lists the source lines
# (with their inlining chains, from WEIR_BIN's debug info) that call them.
#
# --cache-sim also runs callgrind's cache simulation (first-level and
# last-level, sized like this machine's) and reports data and instruction
# cache misses per request next to the instruction count: for comparing
# memory behaviour (buffers, per-connection state) where the instruction
# count alone does not explain a CPU-time difference. Slower under
# valgrind; the instruction count is the same.
#
# --steady counts requests on already-open connections only: one wrk run
# keeps its connections through warm-up and the counted window, and the
# requests in the window are read from the origin's stub_status (one
# origin request per proxied request: not for the h2c or the extauthz
# variants, whose proxies call the origin twice). Without it the counted
# wrk run opens its connections inside the window, so at 256 connections
# the accept and connection set-up cost (~60 k instructions per connection
# for Weir) is spread over the few thousand requests valgrind lets through.
#
#   bench/callgrind.sh [--no-build] [--steady] [--cache-sim] [--call-sites] [--proxy weir|weir-noop|weir-lua|weir-observe|weir-h2up|weir-h2c|weir-auth-local|
#                                            weir-auth-redis|weir-tcp|weir-https|weir-tlsup|weir-extauthz|weir-extauthz-close|
#                                            nginx|nginx-fwd|nginx-lua|nginx-lua-auth|nginx-https|nginx-h2c|nginx-tlsup|haproxy|haproxy-tcp]
#                      [--duration S] [--connections N] [--target /path?query]
#
# --target: the request target wrk asks for (default `/`); the origin
# answers any path the same way. A realistic one shows costs that grow
# with the target's length (a 60-byte target cost Weir 11 k instructions
# per request more than `/` before 2026-11-30 04:15; see BENCHMARKS.md).
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUILD=1
STEADY=0
CACHE_SIM=0
CALL_SITES=0
PROXY=weir
DURATION=10
CONNS=8
TARGET=/

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0; shift ;;
        --steady) STEADY=1; shift ;;
        --cache-sim) CACHE_SIM=1; shift ;;
        --call-sites) CALL_SITES=1; shift ;;
        --proxy) PROXY=${2:-}; shift 2 ;;
        --duration) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--duration needs a positive integer"; DURATION=$2; shift 2 ;;
        --connections) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--connections needs a positive integer"; CONNS=$2; shift 2 ;;
        --target) [[ "${2:-}" == /* ]] || die "--target needs an origin-form target (starting with /)"; TARGET=$2; shift 2 ;;
        -h|--help) sed -n '2,59p' "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

case "$PROXY" in
    weir) PORT=$WEIR_PORT ;;
    weir-noop) PORT=$WEIR_NOOP_PORT ;;
    weir-lua) PORT=$WEIR_LUA_PORT ;;
    weir-observe) PORT=$WEIR_OBSERVE_PORT ;;
    weir-h2up) PORT=$WEIR_H2UP_PORT ;;   # HTTP/2 upstream (origin's h2c port)
    weir-h2c) PORT=$WEIR_H2C_PORT ;;     # HTTP/2 downstream (h2load)
    weir-auth-local) PORT=$WEIR_AUTH_LOCAL_PORT ;;
    weir-auth-redis) PORT=$WEIR_AUTH_REDIS_PORT ;;
    weir-tcp) PORT=$WEIR_TCP_PORT ;;
    weir-https) PORT=$WEIR_HTTPS_PORT ;;
    weir-tlsup) PORT=$WEIR_TLSUP_PORT ;;   # plain clients, TLS to the origin
    nginx-https) PORT=$NGINX_HTTPS_PORT ;;
    nginx-h2c) PORT=$NGINX_H2C_PORT ;;
    nginx-tlsup) PORT=$NGINX_TLSUP_PORT ;;
    haproxy-tcp) PORT=$HAPROXY_TCP_PORT ;;
    weir-extauthz) PORT=$WEIR_EXTAUTHZ_PORT ;;   # ext-authz: one weir.http call per request
    weir-extauthz-close) PORT=$WEIR_EXTAUTHZ_CLOSE_PORT ;;   # the same, a new connection per call
    nginx-lua-auth) PORT=$NGINX_LUA_AUTH_PORT ;;
    nginx) PORT=$NGINX_PORT ;;
    nginx-fwd) PORT=$NGINX_FWD_PORT ;;   # nginx sending Weir's forwarding lines
    nginx-lua) PORT=$NGINX_LUA_PORT ;;
    haproxy) PORT=$HAPROXY_PORT ;;
    *) die "unknown proxy '$PROXY' (known: weir, weir-noop, weir-lua, weir-observe, weir-h2up, weir-h2c, weir-auth-local, weir-auth-redis, weir-tcp, weir-https, weir-tlsup, weir-extauthz, weir-extauthz-close, nginx, nginx-fwd, nginx-lua, nginx-lua-auth, nginx-https, nginx-h2c, nginx-tlsup, haproxy, haproxy-tcp)" ;;
esac
# The HTTPS variants are asked over TLS with the run's own certificate.
URL="http://127.0.0.1:$PORT$TARGET"
CURL_ARGS=()
case "$PROXY" in
    *-https) URL="https://127.0.0.1:$PORT$TARGET"; CURL_ARGS=(--cacert "$RUN_DIR/tls/cert.pem") ;;
    *-h2c) CURL_ARGS=(--http2-prior-knowledge) ;;
esac

require_tools nginx wrk h2load curl openssl valgrind callgrind_control callgrind_annotate python3 ss
begin_bench_run "$ORIGIN_PORT" "$PORT"
mkdir -p "$BENCH_DIR/profiles"
REPORT="$BENCH_DIR/profiles/$STAMP-$PROXY-callgrind.txt"
OUT="$RUN_DIR/callgrind.out"
# Instrumentation starts off (fast start-up and warm-up) and is switched on
# for the measured load only.
# --demangle=no keeps Swift module names in the symbols, so Weir's own
# functions can be picked out; the report demangles afterwards.
VALGRIND=(valgrind --tool=callgrind --instr-atstart=no --demangle=no --callgrind-out-file="$OUT")
[ "$CACHE_SIM" -eq 1 ] && VALGRIND+=(--cache-sim=yes)
# Call sites by instruction address, for bench/rc_calls.py --sites.
[ "$CALL_SITES" -eq 1 ] && VALGRIND+=(--dump-instr=yes)

[[ "$PROXY" == weir* ]] && [ "$BUILD" -eq 1 ] && build_weir

start_origin
case "$PROXY" in *-https|nginx-h2c) make_test_certificate ;; esac
if [ "$PROXY" = weir-auth-redis ]; then
    port_in_use "$REDIS_PORT" && die "127.0.0.1:$REDIS_PORT is already in use"
    start_redis || die "redis-server is not installed (apt-get install redis-server)"
fi
case "$PROXY" in
    weir*)
        reason=$(weir_unavailable_reason "$PROXY")
        [ -z "$reason" ] || die "$PROXY: not available ($reason)"
        [ -x "$WEIR_BIN" ] || die "weir: no binary at $WEIR_BIN (run without --no-build)"
        render_template "${WEIR_TEMPLATE[$PROXY]}" "$RUN_DIR/weir.yaml"
        # Valgrind 3.19 cannot read the DWARF 5 debug info Swift emits and
        # gives up; a copy without debug info keeps the symbol table, which
        # is all the per-function counts need.
        strip --strip-debug -o "$RUN_DIR/weir-nodebug" "$WEIR_BIN" || die "strip --strip-debug failed on $WEIR_BIN"
        (cd "$REPO_DIR" && exec $(pin "$PROXY_CPU") "${VALGRIND[@]}" "$RUN_DIR/weir-nodebug" run --config "$RUN_DIR/weir.yaml" --workers 1) \
            > "$RUN_DIR/logs/$PROXY.out" 2>&1 &
        PROXY_PID=$!
        ;;
    nginx|nginx-fwd)
        conf=nginx-proxy.conf; [ "$PROXY" = nginx-fwd ] && conf=nginx-proxy-fwd.conf
        render_template "$conf" "$RUN_DIR/$conf"
        # One process (no master) so the counted process is the one proxying.
        $(pin "$PROXY_CPU") "${VALGRIND[@]}" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/$PROXY-error.log" \
            -c "$RUN_DIR/$conf" -g "daemon off; master_process off;" > "$RUN_DIR/logs/$PROXY.out" 2>&1 &
        PROXY_PID=$!
        ;;
    nginx-lua|nginx-lua-auth)
        [ -n "$LUA_MODULE" ] || die "nginx Lua module not found (apt-get install libnginx-mod-http-lua)"
        render_template "$PROXY.conf" "$RUN_DIR/$PROXY.conf"
        # LuaJIT writes machine code at run time: tell valgrind to watch for it.
        $(pin "$PROXY_CPU") "${VALGRIND[@]}" --smc-check=all-non-file nginx -p "$RUN_DIR" \
            -e "$RUN_DIR/logs/$PROXY-error.log" -c "$RUN_DIR/$PROXY.conf" \
            -g "daemon off; master_process off;" > "$RUN_DIR/logs/$PROXY.out" 2>&1 &
        PROXY_PID=$!
        ;;
    nginx-https|nginx-h2c|nginx-tlsup)
        # run-protocols.sh's nginx (HTTPS, h2c, grpc_pass and TLS-upstream servers): only the measured one gets load.
        render_template nginx-protocols.conf "$RUN_DIR/nginx-protocols.conf"
        $(pin "$PROXY_CPU") "${VALGRIND[@]}" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-protocols-error.log" \
            -c "$RUN_DIR/nginx-protocols.conf" -g "daemon off; master_process off;" > "$RUN_DIR/logs/nginx-https.out" 2>&1 &
        PROXY_PID=$!
        ;;
    haproxy|haproxy-tcp)
        template=haproxy.cfg; [ "$PROXY" = haproxy-tcp ] && template=haproxy-tcp.cfg
        render_template "$template" "$RUN_DIR/$template"
        $(pin "$PROXY_CPU") "${VALGRIND[@]}" haproxy -db -f "$RUN_DIR/$template" > "$RUN_DIR/logs/$PROXY.out" 2>&1 &
        PROXY_PID=$!
        ;;
esac
STARTED_PIDS+=("$PROXY_PID"); STARTED_NAMES+=("$PROXY"); PID_OF[$PROXY]=$PROXY_PID
log "started $PROXY under callgrind (pid $PROXY_PID)"
wait_for_port "$PORT" 90 || die "$PROXY did not listen on 127.0.0.1:$PORT under valgrind within 90 s (see $RUN_DIR/logs/$PROXY.out)"
problem=$(verify_proxies_to_origin "$PROXY" "$PORT" "$URL" "${CURL_ARGS[@]}") || die "$PROXY does not proxy to the origin: $problem"

wrk_for() { # SECONDS
    if [[ "$PROXY" == *-h2c ]]; then
        # A fixed number of requests (~250/s under valgrind), not a
        # duration: h2load stopped by time resets the ~400 streams in
        # flight, whose aborted exchanges (and the upstream connections
        # they close) would be counted without their requests.
        # shellcheck disable=SC2046
        timeout $(($1 * 4 + 60)) $(pin "$LOAD_CPU") h2load -t 1 -c 4 -m 100 -n $(($1 * 250)) \
            -H "apikey: $API_KEY" "$URL" > "$RUN_DIR/h2load.out" 2>&1
        h2load_result "$RUN_DIR/h2load.out" "$1"
        return
    fi
    # shellcheck disable=SC2046
    timeout $(($1 + 60)) $(pin "$LOAD_CPU") wrk -t 1 -c "$CONNS" -d "${1}s" --timeout 10s \
        -s "$WRK_REPORTER" -H "apikey: $API_KEY" "$URL"
}
field() { grep -o "$1=[0-9.]*" <<< "$2" | head -1 | cut -d= -f2; }

# Requests the origin has answered (its stub_status; --steady).
origin_requests() {
    curl -sS --max-time 5 "http://127.0.0.1:$ORIGIN_PORT/origin-status" | awk 'NR == 3 { print $3 }'
}

if [ "$STEADY" -eq 1 ]; then
    case "$PROXY" in
        *-h2c|weir-extauthz|weir-extauthz-close) die "--steady counts origin requests: not for $PROXY" ;;
    esac
    # One wrk run: 3 s warm-up, the counted window, and a tail so that the
    # connections stay busy until the dump.
    log "wrk -c $CONNS for 3 s warm-up + ${DURATION} s counted + 5 s (connections opened before counting)"
    wrk_for $((DURATION + 8)) > "$RUN_DIR/wrk-steady.out" 2>&1 &
    wrk_pid=$!
    sleep 3
    callgrind_control -i on "$PROXY_PID" > "$RUN_DIR/logs/callgrind-control.out" 2>&1 \
        || die "callgrind_control -i on failed: $(tail -2 "$RUN_DIR/logs/callgrind-control.out")"
    # The window [instrumentation on, dump] holds [first read, last read]
    # plus a curl's time at each end: the count errs a few requests high.
    first=$(origin_requests)
    [ "$PROXY" = weir-auth-redis ] && redis_before=$(redis_commands)
    sleep "$DURATION"
    [ "$PROXY" = weir-auth-redis ] && redis_after=$(redis_commands)
    last=$(origin_requests)
    callgrind_control -d "$PROXY_PID" >> "$RUN_DIR/logs/callgrind-control.out" 2>&1
    callgrind_control -i off "$PROXY_PID" >> "$RUN_DIR/logs/callgrind-control.out" 2>&1
    wait "$wrk_pid"
    [[ "$first" =~ ^[0-9]+$ && "$last" =~ ^[0-9]+$ ]] || die "could not read the origin's stub_status ($first, $last)"
    requests=$((last - first - 1))   # the second status request counts itself
    result="WRK_RESULT requests=$requests rps=$(python3 -c "print(f'{$requests / $DURATION:.1f}')")"
    [ "$requests" -gt 0 ] || die "no requests reached the origin in the counted window"
    sleep 1
else
log "warm-up 3 s (not counted)"
wrk_for 3 > /dev/null 2>&1
callgrind_control -i on "$PROXY_PID" > "$RUN_DIR/logs/callgrind-control.out" 2>&1 \
    || die "callgrind_control -i on failed: $(tail -2 "$RUN_DIR/logs/callgrind-control.out")"
log "counting instructions for ${DURATION} s of wrk -c $CONNS"
[ "$PROXY" = weir-auth-redis ] && redis_before=$(redis_commands)
result=$(wrk_for "$DURATION" 2>&1 | grep '^WRK_RESULT')
[ "$PROXY" = weir-auth-redis ] && redis_after=$(redis_commands)
callgrind_control -d "$PROXY_PID" >> "$RUN_DIR/logs/callgrind-control.out" 2>&1
callgrind_control -i off "$PROXY_PID" >> "$RUN_DIR/logs/callgrind-control.out" 2>&1
sleep 1
requests=$(field requests "$result")
[ -n "$requests" ] && [ "$requests" -gt 0 ] || die "wrk completed no requests under callgrind: $result"
fi

# The dump is callgrind.out.<n> (or callgrind.out when only one is written).
dump=$(ls -t "$OUT"* 2>/dev/null | head -1)
[ -n "$dump" ] || die "no callgrind dump found next to $OUT"
total_ir=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
[ -n "$total_ir" ] || total_ir=$(grep -m1 '^totals:' "$dump" | awk '{print $2}')
[ -n "$total_ir" ] || die "no instruction total in $dump"

# The per-function table of callgrind_annotate: the rows after its
# "Ir  file:function" header, without the dashed rule and blank lines.
function_rows() {
    awk '/file:function/ { table = 1; next } table && /^-+$/ { next } table && NF { print }'
}

demangle() {
    local filter=(cat)
    command -v c++filt >/dev/null 2>&1 && filter=(c++filt)   # the Swift runtime's C++ symbols
    if command -v swift-demangle >/dev/null 2>&1; then "${filter[@]}" | swift-demangle --simplified; else "${filter[@]}"; fi
}

{
    echo "# callgrind: instructions per request of $PROXY, $STAMP"
    echo "# command: bench/callgrind.sh --proxy $PROXY --duration $DURATION --connections $CONNS$([ "$STEADY" -eq 1 ] && echo " --steady")$([ "$CACHE_SIM" -eq 1 ] && echo " --cache-sim")$([ "$TARGET" != / ] && echo " --target '$TARGET'")"
    echo "# machine: $(uname -srm); weir binary from commit $(weir_binary_commit), repo HEAD $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null)"
    if [ "$STEADY" -eq 1 ]; then
        echo "# counted: user-space instructions only (valgrind), ${DURATION} s of one wrk run on connections opened 3 s before; requests from the origin's stub_status"
    else
        echo "# counted: user-space instructions only (valgrind), while wrk ran ${DURATION} s after a 3 s warm-up"
    fi
    echo
    echo "requests: $requests (at $(field rps "$result") req/s under valgrind)"
    echo "instructions: $total_ir"
    echo "instructions per request: $(python3 -c "print(f'{$total_ir / $requests:,.0f}')")"
    if [[ "$PROXY" == *-https || "$PROXY" == *-tlsup ]]; then
        # wrk opens its connections inside the counted window: their TLS
        # handshakes (a few million instructions each) are taken out so the
        # figure is the keep-alive request's.
        handshake_ir=$(callgrind_annotate --show=Ir --inclusive=yes "$dump" 2>/dev/null | function_rows \
            | awk '$0 ~ /:(CNIOBoringSSL_)?SSL_do_handshake / { gsub(",", "", $1); print $1; exit }')
        handshake_ir=${handshake_ir:-0}
        echo "of which TLS handshakes (SSL_do_handshake, inclusive): $handshake_ir"
        echo "instructions per request without the handshakes: $(python3 -c "print(f'{($total_ir - $handshake_ir) / $requests:,.0f}')")"
    fi
    if [ "$CACHE_SIM" -eq 1 ]; then
        # The dump's events line names the summary's columns (Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw).
        python3 - "$dump" "$requests" <<'PY'
import sys
events, summary = None, None
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("events:"): events = line.split()[1:]
    elif line.startswith("summary:"): summary = [int(x) for x in line.split()[1:]]
if events and summary:
    per = {e: v / int(sys.argv[2]) for e, v in zip(events, summary)}
    g = lambda e: per.get(e, 0.0)
    print(f"cache misses per request (callgrind's simulated caches): L1 data {g('D1mr') + g('D1mw'):,.0f} "
          f"(read {g('D1mr'):,.0f}, write {g('D1mw'):,.0f}), L1 instruction {g('I1mr'):,.0f}, "
          f"last-level data {g('DLmr') + g('DLmw'):,.2f}, last-level instruction {g('ILmr'):,.2f}")
PY
    fi
    if [[ "$PROXY" == weir* ]]; then
        python3 "$BENCH_DIR/rc_calls.py" "$dump" "$requests" | head -1
    fi
    if [ "$PROXY" = weir-auth-redis ]; then
        calls=$(( $(field calls "$redis_after") - $(field calls "$redis_before") ))
        evalsha=$(( $(field evalsha "$redis_after") - $(field evalsha "$redis_before") ))
        echo "redis round trips during the count: EVALSHA $evalsha = $(python3 -c "print(f'{$evalsha / $requests:.3f}')") per request (INFO commandstats: $calls commands in all, including the INCR/GET/EXPIRE run inside the script and one INFO)"
    fi
    echo
    echo "## top 40 functions by inclusive instructions"
    callgrind_annotate --show=Ir --inclusive=yes "$dump" 2>/dev/null | function_rows | head -40 | demangle | cut -c1-220
    echo
    if [[ "$PROXY" == weir* ]]; then
        echo "## Weir's own functions by inclusive instructions (top 30; symbols of the Weir modules)"
        callgrind_annotate --show=Ir --inclusive=yes --threshold=100 "$dump" 2>/dev/null | function_rows \
            | grep -E '[0-9]Weir(Proxy|Core|Lua|Admin)|4weir' | head -30 | demangle | cut -c1-220
        echo
    fi
    echo "## top 40 functions by self instructions"
    callgrind_annotate --show=Ir "$dump" 2>/dev/null | function_rows | head -40 | demangle | cut -c1-220
    if [[ "$PROXY" == weir* ]]; then
        echo
        echo "## reference counting per request, top callers (bench/rc_calls.py)"
        python3 "$BENCH_DIR/rc_calls.py" "$dump" "$requests" --callers 12
        if [ "$CALL_SITES" -eq 1 ]; then
            echo
            python3 "$BENCH_DIR/rc_calls.py" "$dump" "$requests" --binary "$WEIR_BIN" --sites 80 | sed '1,/^$/d'
        fi
    fi
} > "$REPORT"

mkdir -p "$RESULTS_DIR"
cp "$dump" "$RESULTS_DIR/$STAMP-$PROXY.callgrind.out"
sed -n '1,12p' "$REPORT"
echo "full report: ${REPORT#$REPO_DIR/}"
echo "raw counts: ${RESULTS_DIR#$REPO_DIR/}/$STAMP-$PROXY.callgrind.out (callgrind_annotate ...)"
