#!/usr/bin/env bash
# Side-by-side proxy benchmark: Weir vs nginx, HAProxy and nginx+Lua, each
# with one worker, in front of the same nginx origin serving 1 KB, measured
# with wrk, runs interleaved across proxies. See bench/README.md.
#
#   bench/run.sh [--no-build] [--duration S] [--runs N] [--warmup S]
#                [--connections 32,256] [--proxies LIST]
#                [--wrk-threads N]
set -uo pipefail
ORIGINAL_ARGS=("$@")

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
usage: bench/run.sh [options]
  --no-build           use the existing release binary in .build-bench (no swift build)
  --duration S         seconds per measured wrk run (default 10)
  --runs N             measured runs per proxy and connection count (default 3)
  --warmup S           seconds of wrk before each measured run, not recorded (default 2)
  --connections LIST   comma-separated wrk connection counts (default 32,256)
  --proxies LIST       comma-separated subset of nginx,haproxy,nginx-lua,weir,weir-noop,weir-lua,
                       nginx-lua-auth,weir-auth-local,weir-auth-redis
                       (default all; weir-noop = one no-op plugin, weir-lua = the 3-plugin Lua chain;
                       weir-auth-* = key-auth + rate-limiting with policy local / redis, the
                       redis one against a redis-server started here; nginx-lua-auth = the same
                       logic as weir-auth-local in nginx+Lua)
  --wrk-threads N      wrk threads (default 1: wrk shares the load core with the origin)
  --upstream-keepalive N  idle upstream connections kept: nginx 'keepalive N', Weir pool.max_idle (default 64)
  --quiet-wait S       before each measured run, wait up to S seconds for other engineers'
                       Swift compiles and tests (swift-frontend, swift-build, *.xctest) to finish (default 0)
EOF
}

BUILD=1
DURATION=10
RUNS=3
WARMUP=2
CONNECTIONS="32,256"
PROXIES="nginx,haproxy,nginx-lua,weir,weir-noop,weir-lua,nginx-lua-auth,weir-auth-local,weir-auth-redis"
WRK_THREADS=1
QUIET_WAIT=0

positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive integer, got '${2:-}'"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0; shift ;;
        --duration) positive_int "$1" "${2:-}"; DURATION=$2; shift 2 ;;
        --runs) positive_int "$1" "${2:-}"; RUNS=$2; shift 2 ;;
        --warmup) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--warmup needs a whole number of seconds"; WARMUP=$2; shift 2 ;;
        --connections) [[ "${2:-}" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--connections needs a list like 32,256"; CONNECTIONS=$2; shift 2 ;;
        --proxies) PROXIES=${2:-}; shift 2 ;;
        --wrk-threads) positive_int "$1" "${2:-}"; WRK_THREADS=$2; shift 2 ;;
        --upstream-keepalive) positive_int "$1" "${2:-}"; UPSTREAM_KEEPALIVE=$2; shift 2 ;;
        --quiet-wait) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--quiet-wait needs a whole number of seconds"; QUIET_WAIT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

IFS=, read -r -a PROXY_LIST <<< "$PROXIES"
IFS=, read -r -a CONN_LIST <<< "$CONNECTIONS"
for proxy in "${PROXY_LIST[@]}"; do
    case "$proxy" in
        nginx|nginx-fwd|haproxy|nginx-lua|weir|weir-noop|weir-lua|nginx-lua-auth|weir-auth-local|weir-auth-redis) ;;
        *) die "unknown proxy '$proxy' (known: nginx, nginx-fwd, haproxy, nginx-lua, weir, weir-noop, weir-lua, nginx-lua-auth, weir-auth-local, weir-auth-redis)" ;;
    esac
done
for conns in "${CONN_LIST[@]}"; do
    [ "$conns" -ge "$WRK_THREADS" ] || die "wrk needs at least as many connections ($conns) as threads ($WRK_THREADS)"
done

port_of() {
    case "$1" in
        nginx) echo "$NGINX_PORT" ;;
        nginx-fwd) echo "$NGINX_FWD_PORT" ;;
        haproxy) echo "$HAPROXY_PORT" ;;
        nginx-lua) echo "$NGINX_LUA_PORT" ;;
        weir) echo "$WEIR_PORT" ;;
        weir-noop) echo "$WEIR_NOOP_PORT" ;;
        weir-lua) echo "$WEIR_LUA_PORT" ;;
        nginx-lua-auth) echo "$NGINX_LUA_AUTH_PORT" ;;
        weir-auth-local) echo "$WEIR_AUTH_LOCAL_PORT" ;;
        weir-auth-redis) echo "$WEIR_AUTH_REDIS_PORT" ;;
    esac
}

wants() { [[ ",$PROXIES," == *",$1,"* ]]; }

require_tools nginx haproxy wrk curl openssl python3 ss
[ -z "$LOAD_CPU" ] || require_tools taskset

begin_bench_run "$ORIGIN_PORT" $(wants weir-auth-redis && echo "$REDIS_PORT") $(for p in "${PROXY_LIST[@]}"; do port_of "$p"; done)
RESULTS_FILE="$RESULTS_DIR/$STAMP.txt"

if [[ ",$PROXIES," == *",weir"* ]] && [ "$BUILD" -eq 1 ]; then build_weir; fi

# --- start and verify every peer -------------------------------------------

start_origin
origin_check=$(curl -sS --max-time 5 -o "$RUN_DIR/origin.body" -w '%{http_code} %{size_download}' \
    "http://127.0.0.1:$ORIGIN_PORT/") || die "origin did not answer: $origin_check"
[ "$origin_check" = "200 1024" ] || die "origin must answer 200 with a 1024-byte body, got: $origin_check"

wants nginx && start_nginx_proxy
wants nginx-fwd && start_nginx_fwd
wants haproxy && start_haproxy
wants nginx-lua && start_nginx_lua
wants nginx-lua-auth && start_nginx_lua_auth
if wants weir-auth-redis && ! start_redis; then
    WEIR_UNAVAILABLE[weir-auth-redis]="redis-server is not installed (apt-get install redis-server)"
fi

if wants weir-noop || wants weir-lua || wants weir-auth-local || wants weir-auth-redis; then probe_weir_plugins; fi

ACTIVE=()
for proxy in "${PROXY_LIST[@]}"; do
    if [[ "$proxy" == weir* ]]; then
        port=$(port_of "$proxy")
        if start_weir "$proxy" "$port"; then
            if ! problem=$(verify_proxies_to_origin "$proxy" "$port"); then
                WEIR_UNAVAILABLE[$proxy]="does not proxy yet: $problem"
            elif [[ "$proxy" == weir-lua || "$proxy" == weir-auth-* ]] && \
                 denied=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/") && \
                 [ "$denied" != 401 ]; then
                WEIR_UNAVAILABLE[$proxy]="the key check does not work: HTTP $denied without an API key, expected 401"
            else
                ACTIVE+=("$proxy")
            fi
        fi
        reason=$(weir_unavailable_reason "$proxy")
        [ -n "$reason" ] && log "$proxy: not available ($reason)"
        continue
    fi
    problem=$(verify_proxies_to_origin "$proxy" "$(port_of "$proxy")") \
        || die "$proxy does not proxy to the origin: $problem (logs in $RUN_DIR/logs/)"
    ACTIVE+=("$proxy")
done

if wants nginx-lua; then
    # The Lua variant must really authenticate, or it is not doing the work
    # it is benchmarked for.
    denied=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_LUA_PORT/")
    [ "$denied" = 401 ] || die "nginx-lua should answer 401 without an API key, got $denied"
fi
if wants nginx-lua-auth; then
    denied=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_LUA_AUTH_PORT/")
    [ "$denied" = 401 ] || die "nginx-lua-auth should answer 401 without an API key, got $denied"
fi
log "verified: ${ACTIVE[*]} each return the origin's 1 KB body"

# --- metadata ----------------------------------------------------------------

swift_builds() { # other engineers' compiler and test processes: they make numbers noisy
    echo $(( $(pgrep -c -x swift-frontend) + $(pgrep -c -x swift-build) + $(pgrep -c -f '[.]xctest') ))
}

{
    echo "# Weir side-by-side benchmark, $STAMP"
    echo "# command: bench/run.sh ${ORIGINAL_ARGS[*]:-}"
    echo "# machine: $(uname -srm); $(nproc) CPUs; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "# versions: $(nginx -v 2>&1); $(haproxy -v | head -1); $(wrk -v 2>&1 | head -1); weir binary built from commit $(weir_binary_commit) (repo HEAD $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null))"
    if [ -n "$LOAD_CPU" ]; then
        echo "# pinning: origin nginx + wrk on CPU $LOAD_CPU; the proxy under test on CPU $PROXY_CPU"
    else
        echo "# pinning: none (fewer than 2 CPUs)"
    fi
    echo "# nginx upstream keepalive: $UPSTREAM_KEEPALIVE idle connections"
    echo "# wrk: -t $WRK_THREADS, connections $CONNECTIONS, ${DURATION}s measured after ${WARMUP}s warm-up, $RUNS runs interleaved"
    echo "# load before: $(uptime | sed 's/.*load average/load average/'); swift compiler/test processes running: $(swift_builds)"
    for proxy in "${PROXY_LIST[@]}"; do
        [[ "$proxy" == weir* ]] || continue
        reason=$(weir_unavailable_reason "$proxy")
        [ -n "$reason" ] && echo "UNAVAILABLE proxy=$proxy reason=$reason"
    done
} > "$RESULTS_FILE"

if [ -n "$LOAD_CPU" ]; then
    log "pinning: origin nginx and wrk on CPU $LOAD_CPU, each proxy under test on CPU $PROXY_CPU"
fi
log "wrk -t $WRK_THREADS; ${#ACTIVE[@]} proxies x ${#CONN_LIST[@]} connection counts x $RUNS runs x (${WARMUP}s + ${DURATION}s)"

# --- measurements, interleaved: run 1 of every proxy, then run 2, ... ------

# Compiles on the shared cores distort a measurement; optionally wait them
# out (bounded), and record how many were running either way.
wait_for_quiet() {
    [ "$QUIET_WAIT" -gt 0 ] || return 0
    local deadline=$((SECONDS + QUIET_WAIT))
    while [ "$(swift_builds)" -gt 0 ] && [ $SECONDS -lt $deadline ]; do sleep 2; done
}

# run_wrk PORT CONNS SECONDS OUTFILE: wrk pinned to the load core. It runs
# in the background and the script waits for it, so a signal interrupts the
# wait at once and cleanup_started stops wrk too (via WRK_PID).
run_wrk() {
    (
        # shellcheck disable=SC2046
        exec timeout $(($3 + 30)) $(pin "$LOAD_CPU") wrk -t "$WRK_THREADS" -c "$2" -d "${3}s" --timeout 5s \
            -s "$WRK_REPORTER" -H "apikey: $API_KEY" "http://127.0.0.1:$1/"
    ) > "$4" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID"
    WRK_PID=""
}

for ((run = 1; run <= RUNS; run++)); do
    for conns in "${CONN_LIST[@]}"; do
        for proxy in "${ACTIVE[@]}"; do
            port=$(port_of "$proxy")
            pid=${PID_OF[$proxy]}
            is_alive "$pid" || die "$proxy (pid $pid) died during the benchmark (see $RUN_DIR/logs/$proxy.out)"
            wait_for_quiet
            if [ "$WARMUP" -gt 0 ]; then run_wrk "$port" "$conns" "$WARMUP" "$RUN_DIR/wrk-warmup.out"; fi
            load1=$(cut -d' ' -f1 /proc/loadavg)
            builds=$(swift_builds)
            cpu_before=$(cpu_ticks "$pid")
            [ "$proxy" = weir-auth-redis ] && redis_before=$(redis_commands)
            run_wrk "$port" "$conns" "$DURATION" "$RUN_DIR/wrk.out"
            output=$(cat "$RUN_DIR/wrk.out")
            cpu_after=$(cpu_ticks "$pid")
            result=$(grep '^WRK_RESULT ' <<< "$output" | head -1)
            if [ -z "$result" ]; then
                echo "$output" > "$RUN_DIR/logs/wrk-failed-$proxy-$conns-$run.out"
                die "wrk produced no result for $proxy at $conns connections (output in $RUN_DIR/logs/wrk-failed-$proxy-$conns-$run.out)"
            fi
            line="RESULT run=$run proxy=$proxy conns=$conns ${result#WRK_RESULT } cpu_ticks=$((cpu_after - cpu_before)) load1=$load1 swift_builds=$builds"
            echo "$line" >> "$RESULTS_FILE"
            if [ "$proxy" = weir-auth-redis ]; then
                # Redis commands during the measured run (INFO commandstats
                # deltas), to set against the requests wrk completed: the
                # redis policy's round trips per request.
                redis_after=$(redis_commands)
                delta=""
                for field in calls evalsha eval; do
                    b=$(grep -o "$field=[0-9]*" <<< "$redis_before" | head -1 | cut -d= -f2)
                    a=$(grep -o "$field=[0-9]*" <<< "$redis_after" | head -1 | cut -d= -f2)
                    delta+=" redis_$field=$((a - b))"
                done
                echo "REDIS run=$run proxy=$proxy conns=$conns $(grep -o 'requests=[0-9]*' <<< "$result" | head -1)$delta" >> "$RESULTS_FILE"
            fi
            rps=$(grep -o 'rps=[0-9.]*' <<< "$result"); p99=$(grep -o 'p99_us=[0-9]*' <<< "$result")
            log "run $run/$RUNS $proxy @ $conns conns: ${rps#rps=} req/s, p99 ${p99#p99_us=} µs (load $load1)"
        done
    done
done

echo "# load after: $(uptime | sed 's/.*load average/load average/'); swift compiler/test processes running: $(swift_builds)" >> "$RESULTS_FILE"

# --- report --------------------------------------------------------------------

summary=$(python3 "$BENCH_DIR/summarize.py" "$RESULTS_FILE") || die "could not summarise $RESULTS_FILE"
{ echo; echo "## Summary"; echo "$summary"; } >> "$RESULTS_FILE"
echo
echo "$summary"
echo
for proxy in "${PROXY_LIST[@]}"; do
    [[ "$proxy" == weir* ]] || continue
    reason=$(weir_unavailable_reason "$proxy")
    [ -n "$reason" ] && echo "$proxy: not available ($reason)"
done
echo "raw results: ${RESULTS_FILE#$REPO_DIR/}"
