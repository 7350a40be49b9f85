#!/usr/bin/env bash
# Protocol benchmark of issue 4, side by side in one run: Weir against
# nginx for HTTPS and HTTP/2, against HAProxy for plain TCP proxying. Same
# origin, pinning and rules as bench/run.sh (see bench/README.md):
#
#   https-keepalive   wrk, 32 keep-alive connections over TLS 1.3    nginx  vs weir-https
#   http-keepalive    the same without TLS, on a plain listener of the same
#                     nginx and Weir processes: https-keepalive minus this
#                     is what TLS adds per request      nginx  vs weir-https
#   https-handshake   wrk, 32 connections, `Connection: close`: every
#                     request is a new TLS handshake (req/s = handshakes/s)
#                                                                    nginx  vs weir-https
#   h2c               h2load, 4 connections x 100 concurrent streams,
#                     cleartext HTTP/2 with prior knowledge          nginx  vs weir-h2c
#   tcp-rps           wrk, 64 connections, HTTP through an L4 proxy  haproxy vs weir-tcp
#   tcp-bulk-1        wrk, 1 connection downloading a 16 MB body     haproxy vs weir-tcp
#   tcp-bulk-64       wrk, 64 connections downloading 16 MB bodies   haproxy vs weir-tcp
#   h2-upstream       wrk, 32 HTTP/1.1 connections; the proxy forwards over
#                     HTTP/2 (h2c) to the origin's HTTP/2 port       nginx (grpc_pass) vs weir-h2up
#
# Weir variants are checked with `weir validate` and a curl first; until
# Weir supports a protocol the table says "not available (<reason>)".
#
#   bench/run-protocols.sh [--no-build] [--duration S] [--runs N] [--warmup S] [--only CASE[,CASE...]]
#   (--only runs those cases, e.g. --only https-keepalive,http-keepalive; the header still lists all)
set -uo pipefail
ORIGINAL_ARGS=("$@")

# 400 HTTP/2 streams are in flight at once here; an upstream keep-alive
# cache smaller than that would make the test measure upstream connection
# churn (see README "Caveats") instead of the downstream protocol.
UPSTREAM_KEEPALIVE=${UPSTREAM_KEEPALIVE:-512}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUILD=1
DURATION=10
RUNS=3
WARMUP=2
ONLY=""

positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive integer, got '${2:-}'"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0; shift ;;
        --duration) positive_int "$1" "${2:-}"; DURATION=$2; shift 2 ;;
        --runs) positive_int "$1" "${2:-}"; RUNS=$2; shift 2 ;;
        --warmup) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--warmup needs a whole number of seconds"; WARMUP=$2; shift 2 ;;
        --only) [ -n "${2:-}" ] || die "--only needs a case name"; ONLY=$2; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

require_tools nginx haproxy wrk h2load curl openssl python3 ss
[ -z "$LOAD_CPU" ] || require_tools taskset
for port in "$ORIGIN_PORT" "$NGINX_HTTPS_PORT" "$NGINX_H2C_PORT" "$HAPROXY_TCP_PORT" \
            "$WEIR_HTTPS_PORT" "$WEIR_H2C_PORT" "$WEIR_TCP_PORT" \
            "$ORIGIN_H2_PORT" "$NGINX_H2UP_PORT" "$WEIR_H2UP_PORT" "$NGINX_PLAIN_PORT" "$WEIR_PLAIN_PORT"; do
    port_in_use "$port" && die "127.0.0.1:$port is already in use (another benchmark running?)"
done

prepare_run_dir
WRK_PID=""
trap 'cleanup_started' EXIT
trap 'log "interrupted; stopping everything started"; exit 130' INT TERM

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_FILE="$RESULTS_DIR/$STAMP-protocols.txt"
BULK_BYTES=$((16 * 1024 * 1024))

[ "$BUILD" -eq 1 ] && build_weir

# --- certificate and bulk body ------------------------------------------------

make_test_certificate
head -c "$BULK_BYTES" /dev/urandom > "$RUN_DIR/bulk.bin"

# --- peers ---------------------------------------------------------------------

start_origin
bulk_check=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code} %{size_download}' "http://127.0.0.1:$ORIGIN_PORT/bulk") \
    || die "origin /bulk did not answer: $bulk_check"
[ "$bulk_check" = "200 $BULK_BYTES" ] || die "origin /bulk must be 200 with $BULK_BYTES bytes, got $bulk_check"

render_template nginx-protocols.conf "$RUN_DIR/nginx-protocols.conf"
start_bg nginx-protocols "$PROXY_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-protocols-error.log" \
    -c "$RUN_DIR/nginx-protocols.conf" -g "daemon off;"
wait_for_port "$NGINX_HTTPS_PORT" 10 && wait_for_port "$NGINX_H2C_PORT" 10 \
    || die "nginx (protocols) did not listen (see $RUN_DIR/logs/nginx-protocols.out)"
render_template haproxy-tcp.cfg "$RUN_DIR/haproxy-tcp.cfg"
start_bg haproxy-tcp "$PROXY_CPU" haproxy -db -f "$RUN_DIR/haproxy-tcp.cfg"
wait_for_port "$HAPROXY_TCP_PORT" 10 || die "haproxy (tcp) did not listen (see $RUN_DIR/logs/haproxy-tcp.out)"

HTTPS_CURL=(--cacert "$RUN_DIR/tls/cert.pem")
H2C_CURL=(--http2-prior-knowledge)

problem=$(verify_proxies_to_origin nginx-https "$NGINX_HTTPS_PORT" "https://127.0.0.1:$NGINX_HTTPS_PORT/" "${HTTPS_CURL[@]}") \
    || die "nginx does not proxy HTTPS: $problem"
problem=$(verify_proxies_to_origin nginx-plain "$NGINX_PLAIN_PORT") || die "nginx does not proxy plain HTTP: $problem"
problem=$(verify_proxies_to_origin nginx-h2c "$NGINX_H2C_PORT" "http://127.0.0.1:$NGINX_H2C_PORT/" "${H2C_CURL[@]}") \
    || die "nginx does not proxy h2c: $problem"
problem=$(verify_proxies_to_origin haproxy-tcp "$HAPROXY_TCP_PORT") || die "haproxy does not proxy TCP: $problem"
problem=$(verify_proxies_to_origin nginx-h2up "$NGINX_H2UP_PORT") || die "nginx does not proxy to the HTTP/2 origin: $problem"

# --- Weir variants -------------------------------------------------------------

declare -A AVAILABLE=()
try_weir() { # VARIANT PORT URL [CURL ARGS...]
    local variant=$1 port=$2 url=$3 problem; shift 3
    if start_weir "$variant" "$port"; then
        if problem=$(verify_proxies_to_origin "$variant" "$port" "$url" "$@"); then
            AVAILABLE[$variant]=1
        else
            WEIR_UNAVAILABLE[$variant]="does not proxy yet: $problem"
        fi
    fi
    local reason
    reason=$(weir_unavailable_reason "$variant")
    [ -n "$reason" ] && log "$variant: not available ($reason)"
}
try_weir weir-https "$WEIR_HTTPS_PORT" "https://127.0.0.1:$WEIR_HTTPS_PORT/" "${HTTPS_CURL[@]}"
if [ -n "${AVAILABLE[weir-https]:-}" ]; then
    problem=$(verify_proxies_to_origin weir-plain "$WEIR_PLAIN_PORT") || die "weir-https's plain listener does not proxy: $problem"
fi
try_weir weir-h2c "$WEIR_H2C_PORT" "http://127.0.0.1:$WEIR_H2C_PORT/" "${H2C_CURL[@]}"
try_weir weir-tcp "$WEIR_TCP_PORT" "http://127.0.0.1:$WEIR_TCP_PORT/"
try_weir weir-h2up "$WEIR_H2UP_PORT" "http://127.0.0.1:$WEIR_H2UP_PORT/"

# --- cases -------------------------------------------------------------------------
# case|proxy|pid name|tool|connections|url|extra

CASES=()
add_case() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]] || return 0; CASES+=("$1|$2|$3|$4|$5|$6|${7:-}"); }
for proxy in nginx weir-https; do
    if [ "$proxy" = nginx ]; then port=$NGINX_HTTPS_PORT; pidname=nginx-protocols; else port=$WEIR_HTTPS_PORT; pidname=weir-https; fi
    add_case https-keepalive "$proxy" "$pidname" wrk 32 "https://127.0.0.1:$port/"
    if [ "$proxy" = nginx ]; then plain=$NGINX_PLAIN_PORT; else plain=$WEIR_PLAIN_PORT; fi
    add_case http-keepalive "$proxy" "$pidname" wrk 32 "http://127.0.0.1:$plain/"
    add_case https-handshake "$proxy" "$pidname" wrk 32 "https://127.0.0.1:$port/" close
done
for proxy in nginx weir-h2c; do
    if [ "$proxy" = nginx ]; then port=$NGINX_H2C_PORT; pidname=nginx-protocols; else port=$WEIR_H2C_PORT; pidname=weir-h2c; fi
    add_case h2c "$proxy" "$pidname" h2load 4 "http://127.0.0.1:$port/"
done
for proxy in haproxy weir-tcp; do
    if [ "$proxy" = haproxy ]; then port=$HAPROXY_TCP_PORT; pidname=haproxy-tcp; else port=$WEIR_TCP_PORT; pidname=weir-tcp; fi
    add_case tcp-rps "$proxy" "$pidname" wrk 64 "http://127.0.0.1:$port/"
    add_case tcp-bulk-1 "$proxy" "$pidname" wrk 1 "http://127.0.0.1:$port/bulk"
    add_case tcp-bulk-64 "$proxy" "$pidname" wrk 64 "http://127.0.0.1:$port/bulk"
done
for proxy in nginx weir-h2up; do
    if [ "$proxy" = nginx ]; then port=$NGINX_H2UP_PORT; pidname=nginx-protocols; else port=$WEIR_H2UP_PORT; pidname=weir-h2up; fi
    add_case h2-upstream "$proxy" "$pidname" wrk 32 "http://127.0.0.1:$port/"
done

{
    echo "# Weir protocol benchmark (issue 4), $STAMP"
    echo "# command: bench/run-protocols.sh ${ORIGINAL_ARGS[*]:-}"
    echo "# machine: $(uname -srm); $(nproc) CPUs; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "# versions: $(nginx -v 2>&1); $(haproxy -v | head -1); $(h2load --version | head -1); $(openssl version); weir binary built from commit $(weir_binary_commit)"
    echo "# pinning: origin nginx + load generator on CPU ${LOAD_CPU:-none}; the proxy under test on CPU ${PROXY_CPU:-none}"
    echo "# TLS: ECDSA P-256 self-signed certificate, TLS 1.3 negotiated, no session resumption"
    echo "# upstream keep-alive (nginx keepalive / Weir pool.max_idle): $UPSTREAM_KEEPALIVE"
    echo "# ${DURATION}s measured after ${WARMUP}s warm-up, $RUNS runs interleaved"
    echo "# load before: $(uptime | sed 's/.*load average/load average/')"
    for variant in weir-https weir-h2c weir-tcp weir-h2up; do
        reason=$(weir_unavailable_reason "$variant")
        [ -n "$reason" ] && echo "UNAVAILABLE proxy=$variant reason=$reason"
    done
} > "$RESULTS_FILE"

run_load() { # TOOL CONNS URL EXTRA SECONDS OUTFILE
    local tool=$1 conns=$2 url=$3 extra=$4 seconds=$5 out=$6
    (
        if [ "$tool" = h2load ]; then
            # shellcheck disable=SC2046
            exec timeout $((seconds + 30)) $(pin "$LOAD_CPU") h2load -t 1 -c "$conns" -m 100 -D "$seconds" \
                -H "apikey: $API_KEY" "$url"
        fi
        local headers=(-H "apikey: $API_KEY")
        [ "$extra" = close ] && headers+=(-H "Connection: close")
        # shellcheck disable=SC2046
        exec timeout $((seconds + 30)) $(pin "$LOAD_CPU") wrk -t 1 -c "$conns" -d "${seconds}s" --timeout 10s \
            -s "$WRK_REPORTER" "${headers[@]}" "$url"
    ) > "$out" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID"
    WRK_PID=""
}

log "${#CASES[@]} cases (those of unavailable Weir variants are skipped) x $RUNS runs x (${WARMUP}s + ${DURATION}s)"
for ((run = 1; run <= RUNS; run++)); do
    for entry in "${CASES[@]}"; do
        IFS='|' read -r case_name proxy pidname tool conns url extra <<< "$entry"
        [[ "$proxy" == weir* ]] && [ -z "${AVAILABLE[$proxy]:-}" ] && continue
        pid=${PID_OF[$pidname]}
        is_alive "$pid" || die "$pidname (pid $pid) died during the benchmark (see $RUN_DIR/logs/$pidname.out)"
        [ "$WARMUP" -gt 0 ] && run_load "$tool" "$conns" "$url" "$extra" "$WARMUP" "$RUN_DIR/load-warmup.out"
        load1=$(cut -d' ' -f1 /proc/loadavg)
        cpu_before=$(cpu_ticks "$pid")
        run_load "$tool" "$conns" "$url" "$extra" "$DURATION" "$RUN_DIR/load.out"
        cpu_after=$(cpu_ticks "$pid")
        if [ "$tool" = h2load ]; then
            result=$(h2load_result "$RUN_DIR/load.out" "$DURATION")
        else
            result=$(grep '^WRK_RESULT ' "$RUN_DIR/load.out" | head -1)
        fi
        if [ -z "$result" ]; then
            cp "$RUN_DIR/load.out" "$RUN_DIR/logs/load-failed-$case_name-$proxy-$run.out"
            die "$tool produced no result for $case_name via $proxy (output in $RUN_DIR/logs/load-failed-$case_name-$proxy-$run.out)"
        fi
        echo "RESULT run=$run case=$case_name proxy=$proxy conns=$conns ${result#WRK_RESULT } cpu_ticks=$((cpu_after - cpu_before)) load1=$load1" >> "$RESULTS_FILE"
        log "run $run/$RUNS $case_name via $proxy: $(grep -o 'rps=[0-9.]*' <<< "$result") $(grep -o 'bytes=[0-9]*' <<< "$result") (load $load1)"
    done
done
echo "# load after: $(uptime | sed 's/.*load average/load average/')" >> "$RESULTS_FILE"

summary=$(python3 "$BENCH_DIR/summarize_protocols.py" "$RESULTS_FILE") || die "could not summarise $RESULTS_FILE"
{ echo; echo "## Summary"; echo "$summary"; } >> "$RESULTS_FILE"
echo
echo "$summary"
echo
echo "raw results: ${RESULTS_FILE#$REPO_DIR/}"
