# Shared helpers for bench/run.sh and bench/profile.sh (sourced, not run).
#
# Everything here stays on loopback, writes only under bench/.run/ and
# bench/results/ (both gitignored) or bench/profiles/, and remembers every
# process it starts so cleanup_started can stop exactly those, and nothing
# else, on any exit path.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
RUN_DIR="$BENCH_DIR/.run"
RESULTS_DIR="$BENCH_DIR/results"
TEMPLATES_DIR="$BENCH_DIR/templates"
WRK_REPORTER="$BENCH_DIR/wrk-report.lua"

# WEIR_SCRATCH / WEIR_SOURCE_SNAPSHOT override where the release build
# happens (e.g. from a git worktree, reuse the main checkout's warm folders:
# WEIR_SCRATCH=/work/main/.build-bench WEIR_SOURCE_SNAPSHOT=/work/main/.build-bench-src).
WEIR_SCRATCH=${WEIR_SCRATCH:-"$REPO_DIR/.build-bench"}
# WEIR_BIN=/path/to/weir bench/<script> --no-build measures another build
# (e.g. an engineer's own release build) instead of the bench's.
WEIR_BIN_DEFAULT="$WEIR_SCRATCH/release/weir"
WEIR_BIN=${WEIR_BIN:-$WEIR_BIN_DEFAULT}

# BENCH_PORT_OFFSET=N shifts every port below by N, so a callgrind count
# can run while someone else's benchmark holds the default ports
# (instruction counts do not mind a busy machine; wrk numbers do).
BENCH_PORT_OFFSET=${BENCH_PORT_OFFSET:-0}
ORIGIN_PORT=$((19000 + BENCH_PORT_OFFSET))
NGINX_PORT=$((19001 + BENCH_PORT_OFFSET))
HAPROXY_PORT=$((19002 + BENCH_PORT_OFFSET))
NGINX_LUA_PORT=$((19003 + BENCH_PORT_OFFSET))
# nginx proxy_pass sending the upstream the same forwarding lines Weir adds by
# default (X-Forwarded-For/-Proto/-Host, Via, X-Request-ID): the like-for-like
# peer for the request the origin receives (templates/nginx-proxy-fwd.conf).
NGINX_FWD_PORT=$((19007 + BENCH_PORT_OFFSET))
WEIR_PORT=$((19010 + BENCH_PORT_OFFSET))
WEIR_NOOP_PORT=$((19011 + BENCH_PORT_OFFSET))
WEIR_LUA_PORT=$((19012 + BENCH_PORT_OFFSET))
WEIR_PROBE_PORT=$((19013 + BENCH_PORT_OFFSET))
WEIR_OBSERVE_PORT=$((19014 + BENCH_PORT_OFFSET))
# Issue 5's pair of shipped plugins (key-auth + rate-limiting): nginx+Lua
# doing the same, Weir with policy local and policy redis, and the Redis
# server the redis policy talks to (started by run.sh / callgrind.sh).
NGINX_LUA_AUTH_PORT=$((19005 + BENCH_PORT_OFFSET))
WEIR_AUTH_LOCAL_PORT=$((19016 + BENCH_PORT_OFFSET))
WEIR_AUTH_REDIS_PORT=$((19017 + BENCH_PORT_OFFSET))
REDIS_PORT=$((19020 + BENCH_PORT_OFFSET))
# ext-authz on the route (one weir.http call per request to the origin).
WEIR_EXTAUTHZ_PORT=$((19018 + BENCH_PORT_OFFSET))
WEIR_EXTAUTHZ_CLOSE_PORT=$((19019 + BENCH_PORT_OFFSET))

# Protocol benchmark (run-protocols.sh, issue 4): peers and Weir.
NGINX_HTTPS_PORT=$((19201 + BENCH_PORT_OFFSET))
NGINX_H2C_PORT=$((19202 + BENCH_PORT_OFFSET))
HAPROXY_TCP_PORT=$((19203 + BENCH_PORT_OFFSET))
WEIR_HTTPS_PORT=$((19211 + BENCH_PORT_OFFSET))
WEIR_H2C_PORT=$((19212 + BENCH_PORT_OFFSET))
WEIR_TCP_PORT=$((19213 + BENCH_PORT_OFFSET))
# HTTP/2 upstreams (run-protocols.sh case h2-upstream): the origin also
# speaks h2c on ORIGIN_H2_PORT; HTTP/1.1 clients reach it through nginx
# (grpc_pass) or Weir (protocol: http2).
ORIGIN_H2_PORT=$((19004 + BENCH_PORT_OFFSET))
NGINX_H2UP_PORT=$((19204 + BENCH_PORT_OFFSET))
WEIR_H2UP_PORT=$((19214 + BENCH_PORT_OFFSET))
# Plain HTTP/1.1 listeners of the same nginx and Weir processes that serve
# HTTPS (run-protocols.sh case http-keepalive): HTTPS minus this, in one
# run and one process, is what TLS adds per request.
NGINX_PLAIN_PORT=$((19205 + BENCH_PORT_OFFSET))
# TLS to the upstream (callgrind.sh / profile.sh variant weir-tlsup): the
# origin also answers over TLS on ORIGIN_TLS_PORT, Weir forwards plain
# HTTP/1.1 clients there over kept-alive TLS connections.
ORIGIN_TLS_PORT=$((19006 + BENCH_PORT_OFFSET))
WEIR_TLSUP_PORT=$((19021 + BENCH_PORT_OFFSET))
NGINX_TLSUP_PORT=$((19206 + BENCH_PORT_OFFSET))   # its peer: nginx proxy_pass https://, keepalive
WEIR_PLAIN_PORT=$((19215 + BENCH_PORT_OFFSET))

# The key wrk sends in every request (harmless to the proxies that ignore
# it; the Lua variants authenticate it).
API_KEY="bench-key"

# nginx's `keepalive N`: idle upstream connections cached per worker. With
# more requests in flight than N, nginx opens extra upstream connections
# and closes them after one use (visible as TIME_WAIT sockets).
UPSTREAM_KEEPALIVE=${UPSTREAM_KEEPALIVE:-64}

# Core pinning on this 2-core machine: the load side (origin nginx + wrk)
# shares LOAD_CPU, the proxy under test gets PROXY_CPU to itself. With
# fewer than 2 cores nothing is pinned (and the output says so).
LOAD_CPU=0
PROXY_CPU=1
if [ "$(nproc)" -lt 2 ]; then
    LOAD_CPU=""
    PROXY_CPU=""
fi

NDK_MODULE=""
LUA_MODULE=""
for dir in /usr/lib/nginx/modules /usr/share/nginx/modules; do
    [ -z "$NDK_MODULE" ] && [ -f "$dir/ndk_http_module.so" ] && NDK_MODULE="$dir/ndk_http_module.so"
    [ -z "$LUA_MODULE" ] && [ -f "$dir/ngx_http_lua_module.so" ] && LUA_MODULE="$dir/ngx_http_lua_module.so"
done

log() { echo "[bench $(date -u +%H:%M:%S)] $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

require_tools() {
    local tool missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (Debian: apt-get install nginx libnginx-mod-http-lua haproxy wrk curl python3)"
}

# The origin's body: exactly 1024 bytes, characters that need no escaping
# inside an nginx string.
body_1k() {
    local chunk="0123456789abcdef" body="" i
    for i in $(seq 64); do body+="$chunk"; done
    printf '%s' "$body"
}

# render_template TEMPLATE DEST: replace every @NAME@ with its value.
render_template() {
    local template="$TEMPLATES_DIR/$1" dest="$2"
    [ -f "$template" ] || die "template not found: $template"
    sed -e "s|@RUN_DIR@|$RUN_DIR|g" \
        -e "s|@ORIGIN_PORT@|$ORIGIN_PORT|g" \
        -e "s|@NGINX_PORT@|$NGINX_PORT|g" \
        -e "s|@HAPROXY_PORT@|$HAPROXY_PORT|g" \
        -e "s|@NGINX_LUA_PORT@|$NGINX_LUA_PORT|g" \
        -e "s|@NGINX_FWD_PORT@|$NGINX_FWD_PORT|g" \
        -e "s|@WEIR_PORT@|$WEIR_PORT|g" \
        -e "s|@WEIR_NOOP_PORT@|$WEIR_NOOP_PORT|g" \
        -e "s|@WEIR_LUA_PORT@|$WEIR_LUA_PORT|g" \
        -e "s|@WEIR_PROBE_PORT@|$WEIR_PROBE_PORT|g" \
        -e "s|@WEIR_OBSERVE_PORT@|$WEIR_OBSERVE_PORT|g" \
        -e "s|@NGINX_LUA_AUTH_PORT@|$NGINX_LUA_AUTH_PORT|g" \
        -e "s|@WEIR_AUTH_LOCAL_PORT@|$WEIR_AUTH_LOCAL_PORT|g" \
        -e "s|@WEIR_AUTH_REDIS_PORT@|$WEIR_AUTH_REDIS_PORT|g" \
        -e "s|@REDIS_PORT@|$REDIS_PORT|g" \
        -e "s|@WEIR_EXTAUTHZ_PORT@|$WEIR_EXTAUTHZ_PORT|g" \
        -e "s|@WEIR_EXTAUTHZ_CLOSE_PORT@|$WEIR_EXTAUTHZ_CLOSE_PORT|g" \
        -e "s|@NGINX_HTTPS_PORT@|$NGINX_HTTPS_PORT|g" \
        -e "s|@NGINX_H2C_PORT@|$NGINX_H2C_PORT|g" \
        -e "s|@HAPROXY_TCP_PORT@|$HAPROXY_TCP_PORT|g" \
        -e "s|@WEIR_HTTPS_PORT@|$WEIR_HTTPS_PORT|g" \
        -e "s|@WEIR_H2C_PORT@|$WEIR_H2C_PORT|g" \
        -e "s|@WEIR_TCP_PORT@|$WEIR_TCP_PORT|g" \
        -e "s|@ORIGIN_H2_PORT@|$ORIGIN_H2_PORT|g" \
        -e "s|@NGINX_H2UP_PORT@|$NGINX_H2UP_PORT|g" \
        -e "s|@WEIR_H2UP_PORT@|$WEIR_H2UP_PORT|g" \
        -e "s|@NGINX_PLAIN_PORT@|$NGINX_PLAIN_PORT|g" \
        -e "s|@WEIR_PLAIN_PORT@|$WEIR_PLAIN_PORT|g" \
        -e "s|@ORIGIN_TLS_PORT@|$ORIGIN_TLS_PORT|g" \
        -e "s|@WEIR_TLSUP_PORT@|$WEIR_TLSUP_PORT|g" \
        -e "s|@NGINX_TLSUP_PORT@|$NGINX_TLSUP_PORT|g" \
        -e "s|@BENCH_DIR@|$BENCH_DIR|g" \
        -e "s|@REPO_DIR@|$REPO_DIR|g" \
        -e "s|@API_KEY@|$API_KEY|g" \
        -e "s|@UPSTREAM_KEEPALIVE@|$UPSTREAM_KEEPALIVE|g" \
        -e "s|@NDK_MODULE@|$NDK_MODULE|g" \
        -e "s|@LUA_MODULE@|$LUA_MODULE|g" \
        -e "s|@BODY_1K@|$(body_1k)|g" \
        "$template" > "$dest"
    if grep -q '@[A-Z0-9_]*@' "$dest"; then
        die "unreplaced placeholder in $dest: $(grep -o '@[A-Z0-9_]*@' "$dest" | head -1)"
    fi
}

# The start every benchmark script shares: refuses ports already taken
# (another benchmark running), prepares the run folder, stops whatever the
# script starts on exit or interrupt, and sets the run's STAMP.
#   begin_bench_run PORT...
begin_bench_run() {
    local port
    for port in "$@"; do
        port_in_use "$port" && die "127.0.0.1:$port is already in use (another benchmark running? see 'ss -ltnp sport = :$port')"
    done
    prepare_run_dir
    trap 'cleanup_started' EXIT
    trap 'log "interrupted; stopping everything started"; exit 130' INT TERM
    STAMP=$(date -u +%Y%m%dT%H%M%SZ)
}

prepare_run_dir() {
    # Only our own run dir is wiped; it is gitignored and holds nothing else.
    rm -rf "$RUN_DIR"
    mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RESULTS_DIR"
}

# pin CPU: the taskset prefix for a command, or nothing without pinning.
pin() {
    if [ -n "$1" ]; then echo "taskset -c $1"; fi
}

port_in_use() {
    [ -n "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]
}

# wait_for_port PORT SECONDS: until something accepts on 127.0.0.1:PORT.
wait_for_port() {
    local port=$1 deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# --- process bookkeeping -------------------------------------------------

STARTED_PIDS=()
STARTED_NAMES=()
declare -A PID_OF=()

# start_bg NAME CPU CMD...: start CMD in the background pinned to CPU,
# output to $RUN_DIR/logs/NAME.out, and remember its pid.
start_bg() {
    local name=$1 cpu=$2; shift 2
    # shellcheck disable=SC2046
    $(pin "$cpu") "$@" > "$RUN_DIR/logs/$name.out" 2>&1 &
    local pid=$!
    STARTED_PIDS+=("$pid")
    STARTED_NAMES+=("$name")
    PID_OF[$name]=$pid
    log "started $name (pid $pid${cpu:+, pinned to CPU $cpu}): $*"
}

is_alive() { kill -0 "$1" 2>/dev/null; }

# Stop every process start_bg started, newest first: SIGTERM, then SIGKILL
# after 5 s. Only these pids are signalled; nginx masters take their
# workers down with them.
WRK_PID=""

cleanup_started() {
    local i pid name deadline
    # A load generator still running (timeout passes the signal on to wrk).
    if [ -n "${WRK_PID:-}" ] && is_alive "$WRK_PID"; then kill -TERM "$WRK_PID" 2>/dev/null; wait "$WRK_PID" 2>/dev/null; fi
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STARTED_PIDS[$i]}
        name=${STARTED_NAMES[$i]}
        is_alive "$pid" || continue
        kill -TERM "$pid" 2>/dev/null
        deadline=$((SECONDS + 5))
        while is_alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        if is_alive "$pid"; then
            log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    STARTED_PIDS=()
    STARTED_NAMES=()
}

# make_test_certificate: a throwaway ECDSA P-256 certificate for 127.0.0.1
# in $RUN_DIR/tls/{cert,key}.pem, made once per run (the run dir is wiped
# at the start): the HTTPS cases of run-protocols.sh, callgrind.sh and
# profile.sh, and the origin's TLS port; everyone serves the same one.
make_test_certificate() {
    [ -s "$RUN_DIR/tls/cert.pem" ] && [ -s "$RUN_DIR/tls/key.pem" ] && return 0
    mkdir -p "$RUN_DIR/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1" \
        -keyout "$RUN_DIR/tls/key.pem" -out "$RUN_DIR/tls/cert.pem" > "$RUN_DIR/logs/openssl.out" 2>&1 \
        || die "openssl could not make the test certificate: $(tail -2 "$RUN_DIR/logs/openssl.out")"
}

# --- the peers -------------------------------------------------------------

start_origin() {
    make_test_certificate   # for the origin's TLS port
    render_template origin-nginx.conf "$RUN_DIR/origin-nginx.conf"
    # -p keeps nginx's prefix in the run dir, -e its startup error log, so no
    # system path is written.
    start_bg origin "$LOAD_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/origin-error.log" \
        -c "$RUN_DIR/origin-nginx.conf" -g "daemon off;"
    wait_for_port "$ORIGIN_PORT" 10 || die "origin nginx did not listen on 127.0.0.1:$ORIGIN_PORT (see $RUN_DIR/logs/origin.out and origin-error.log)"
}

start_nginx_proxy() {
    render_template nginx-proxy.conf "$RUN_DIR/nginx-proxy.conf"
    start_bg nginx "$PROXY_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-error.log" \
        -c "$RUN_DIR/nginx-proxy.conf" -g "daemon off;"
    wait_for_port "$NGINX_PORT" 10 || die "nginx proxy did not listen on 127.0.0.1:$NGINX_PORT (see $RUN_DIR/logs/nginx.out)"
}

start_nginx_fwd() {
    render_template nginx-proxy-fwd.conf "$RUN_DIR/nginx-proxy-fwd.conf"
    start_bg nginx-fwd "$PROXY_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-fwd-error.log" \
        -c "$RUN_DIR/nginx-proxy-fwd.conf" -g "daemon off;"
    wait_for_port "$NGINX_FWD_PORT" 10 || die "nginx-fwd did not listen on 127.0.0.1:$NGINX_FWD_PORT (see $RUN_DIR/logs/nginx-fwd.out)"
}

start_haproxy() {
    render_template haproxy.cfg "$RUN_DIR/haproxy.cfg"
    haproxy -c -q -f "$RUN_DIR/haproxy.cfg" > "$RUN_DIR/logs/haproxy-check.out" 2>&1 \
        || die "haproxy rejected its config: $(head -5 "$RUN_DIR/logs/haproxy-check.out")"
    # -db: stay in the foreground so the pid we hold is HAProxy itself.
    start_bg haproxy "$PROXY_CPU" haproxy -db -f "$RUN_DIR/haproxy.cfg"
    wait_for_port "$HAPROXY_PORT" 10 || die "haproxy did not listen on 127.0.0.1:$HAPROXY_PORT (see $RUN_DIR/logs/haproxy.out)"
}

start_nginx_lua() {
    [ -n "$LUA_MODULE" ] && [ -n "$NDK_MODULE" ] \
        || die "nginx Lua module not found under /usr/lib/nginx/modules or /usr/share/nginx/modules (apt-get install libnginx-mod-http-lua)"
    render_template nginx-lua.conf "$RUN_DIR/nginx-lua.conf"
    start_bg nginx-lua "$PROXY_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-lua-error.log" \
        -c "$RUN_DIR/nginx-lua.conf" -g "daemon off;"
    wait_for_port "$NGINX_LUA_PORT" 10 || die "nginx+lua did not listen on 127.0.0.1:$NGINX_LUA_PORT (see $RUN_DIR/logs/nginx-lua.out and nginx-lua-error.log)"
}

start_nginx_lua_auth() {
    [ -n "$LUA_MODULE" ] && [ -n "$NDK_MODULE" ] \
        || die "nginx Lua module not found under /usr/lib/nginx/modules or /usr/share/nginx/modules (apt-get install libnginx-mod-http-lua)"
    render_template nginx-lua-auth.conf "$RUN_DIR/nginx-lua-auth.conf"
    start_bg nginx-lua-auth "$PROXY_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/logs/nginx-lua-auth-error.log" \
        -c "$RUN_DIR/nginx-lua-auth.conf" -g "daemon off;"
    wait_for_port "$NGINX_LUA_AUTH_PORT" 10 || die "nginx+lua (auth) did not listen on 127.0.0.1:$NGINX_LUA_AUTH_PORT (see $RUN_DIR/logs/nginx-lua-auth.out)"
}

# The Redis server of the rate-limiting redis policy: loopback only, no
# persistence, on the load core (it is part of the backend, like the
# origin). Returns 1 when redis-server is not installed.
start_redis() {
    command -v redis-server >/dev/null 2>&1 || return 1
    start_bg redis "$LOAD_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$RUN_DIR" --logfile "$RUN_DIR/logs/redis-server.log"
    wait_for_port "$REDIS_PORT" 10 || die "redis-server did not listen on 127.0.0.1:$REDIS_PORT (see $RUN_DIR/logs/redis-server.log)"
}

# redis_commands: "calls=<all commands> evalsha=<n> eval=<n>" from INFO
# commandstats of the bench's Redis (the redis policy's round trips).
redis_commands() {
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info commandstats | tr -d '\r' | awk -F'[:=,]' '
        /^cmdstat_/ { total += $3; if ($1 == "cmdstat_evalsha") evalsha = $3; if ($1 == "cmdstat_eval") ev = $3 }
        END { printf "calls=%d evalsha=%d eval=%d\n", total, evalsha, ev }'
}

# Weir problems are never fatal for the run: they record the reason in
# WEIR_UNAVAILABLE[variant] ("build" for all variants) and the table says
# "not available (<reason>)".
declare -A WEIR_UNAVAILABLE=()

# Weir variants: name -> config template. Each listens on its own port.
declare -A WEIR_TEMPLATE=([weir]=weir.yaml [weir-noop]=weir-noop.yaml [weir-lua]=weir-lua.yaml
                          [weir-observe]=weir-observe.yaml
                          [weir-auth-local]=weir-auth-local.yaml [weir-auth-redis]=weir-auth-redis.yaml
                          [weir-extauthz]=weir-extauthz.yaml [weir-extauthz-close]=weir-extauthz-close.yaml
                          [weir-probe]=weir-probe.yaml [weir-https]=weir-https.yaml
                          [weir-h2c]=weir-h2c.yaml [weir-tcp]=weir-tcp.yaml [weir-h2up]=weir-h2up.yaml
                          [weir-tlsup]=weir-tlsup.yaml)

weir_unavailable_reason() { # VARIANT -> the reason, or nothing when available
    local reason=${WEIR_UNAVAILABLE[build]:-}
    # Plugin variants also need a build that runs plugins (probe_weir_plugins).
    [ -z "$reason" ] && [ "$1" != weir ] && reason=${WEIR_UNAVAILABLE[plugins]:-}
    echo "${reason:-${WEIR_UNAVAILABLE[$1]:-}}"
}

# Start Weir briefly with one key-checking plugin: a request without the key
# must get the plugin's 401 and one with it the origin's body. Records
# WEIR_UNAVAILABLE[plugins] when this build does not run plugins.
probe_weir_plugins() {
    [ -z "${WEIR_UNAVAILABLE[build]:-}" ] || return 1
    local status problem=""
    if ! start_weir weir-probe "$WEIR_PROBE_PORT"; then
        problem="${WEIR_UNAVAILABLE[weir-probe]}"
    elif ! status=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$WEIR_PROBE_PORT/" 2>&1) \
            || [ "$status" != 401 ]; then
        problem="plugins do not run yet: a request without the key got HTTP $status from a route whose plugin answers 401"
    elif ! problem=$(verify_proxies_to_origin weir-probe "$WEIR_PROBE_PORT"); then
        problem="with a plugin on the route: $problem"
    else
        problem=""
    fi
    local pid=${PID_OF[weir-probe]:-}
    if [ -n "$pid" ] && is_alive "$pid"; then kill -TERM "$pid"; wait "$pid" 2>/dev/null; fi
    if [ -n "$problem" ]; then
        WEIR_UNAVAILABLE[plugins]="$problem"
        return 1
    fi
    log "weir runs plugins: the probe plugin answered 401 without a key and proxied with one"
}

# Weir is built from a snapshot of the committed HEAD (see sync_snapshot.py:
# the shared working tree changes under a build), niced so that other
# engineers' builds keep priority.
WEIR_SOURCE_SNAPSHOT=${WEIR_SOURCE_SNAPSHOT:-"$REPO_DIR/.build-bench-src"}

# The release flags of the Makefile's build (RELEASE_FLAGS): full link-time
# optimisation, no dynamic exclusivity checks in any module, SwiftNIO included.
WEIR_RELEASE_FLAGS=(--experimental-lto-mode=full -Xswiftc -enforce-exclusivity=unchecked)

build_weir() {
    local commit
    if [ "$WEIR_BIN" != "$WEIR_BIN_DEFAULT" ]; then
        log "WEIR_BIN is set: measuring $WEIR_BIN as it is (no build)"
        return
    fi
    commit=$(git -C "$REPO_DIR" rev-parse --short HEAD)
    log "building Weir at commit $commit (release, snapshot ${WEIR_SOURCE_SNAPSHOT#$REPO_DIR/}, scratch ${WEIR_SCRATCH#$REPO_DIR/}); log: $RUN_DIR/logs/weir-build.log"
    git -C "$REPO_DIR" archive HEAD | python3 "$BENCH_DIR/sync_snapshot.py" "$WEIR_SOURCE_SNAPSHOT" >&2 \
        || die "could not snapshot HEAD into $WEIR_SOURCE_SNAPSHOT"
    if [ -f "$REPO_DIR/Package.resolved" ] && [ ! -f "$WEIR_SOURCE_SNAPSHOT/Package.resolved" ]; then
        cp "$REPO_DIR/Package.resolved" "$WEIR_SOURCE_SNAPSHOT/"
    fi
    if ! timeout 2400 nice -n 10 swift build -c release --package-path "$WEIR_SOURCE_SNAPSHOT" \
            --scratch-path "$WEIR_SCRATCH" --product weir -j 2 "${WEIR_RELEASE_FLAGS[@]}" > "$RUN_DIR/logs/weir-build.log" 2>&1; then
        local first_error
        first_error=$(grep -m1 -E 'error:' "$RUN_DIR/logs/weir-build.log" | cut -c1-160)
        WEIR_UNAVAILABLE[build]="release build failed at $commit: ${first_error:-see bench/.run/logs/weir-build.log}"
        log "weir: ${WEIR_UNAVAILABLE[build]}"
        return
    fi
    # Which commit the binary is, for --no-build runs and the results header.
    echo "$commit" > "$WEIR_SCRATCH/bench-weir-commit"
}

weir_binary_commit() {
    if [ "$WEIR_BIN" != "$WEIR_BIN_DEFAULT" ]; then
        echo "unknown (WEIR_BIN=$WEIR_BIN)"
    else
        cat "$WEIR_SCRATCH/bench-weir-commit" 2>/dev/null || echo "unknown"
    fi
}

# start_weir VARIANT PORT: validate the variant's config, start Weir on it
# and wait for its listener. Returns 1 with the reason recorded otherwise.
start_weir() {
    local variant=$1 port=$2
    [ -z "$(weir_unavailable_reason "$variant")" ] || return 1
    if [ ! -x "$WEIR_BIN" ]; then
        WEIR_UNAVAILABLE[build]="no binary at ${WEIR_BIN#$REPO_DIR/} (run without --no-build)"
        return 1
    fi
    local config="$RUN_DIR/$variant.yaml"
    render_template "${WEIR_TEMPLATE[$variant]}" "$config"
    # `weir validate` names the bad key, which says more than a failed start.
    if ! (cd "$REPO_DIR" && timeout 30 "$WEIR_BIN" validate --config "$config") > "$RUN_DIR/logs/$variant-validate.out" 2>&1; then
        local problem
        problem=$(grep -v '^[[:space:]]*$' "$RUN_DIR/logs/$variant-validate.out" | head -2 | tr '\n' ' ' | cut -c1-200)
        WEIR_UNAVAILABLE[$variant]="config refused by weir validate: ${problem:-no output}"
        return 1
    fi
    # From the repo root, so relative plugin and SDK paths resolve.
    (cd "$REPO_DIR" && exec $(pin "$PROXY_CPU") "$WEIR_BIN" run --config "$config" --workers 1) \
        > "$RUN_DIR/logs/$variant.out" 2>&1 &
    local pid=$!
    STARTED_PIDS+=("$pid"); STARTED_NAMES+=("$variant"); PID_OF[$variant]=$pid
    log "started $variant (pid $pid${PROXY_CPU:+, pinned to CPU $PROXY_CPU}): weir run --config $config --workers 1"
    local deadline=$((SECONDS + 15))
    while [ $SECONDS -lt $deadline ]; do
        if ! is_alive "$pid"; then
            local last_line
            last_line=$(grep -v '^[[:space:]]*$' "$RUN_DIR/logs/$variant.out" | tail -1 | cut -c1-160)
            WEIR_UNAVAILABLE[$variant]="exited at startup: ${last_line:-no output}"
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    WEIR_UNAVAILABLE[$variant]="did not listen on 127.0.0.1:$port within 15 s"
    return 1
}

# verify_proxies_to_origin NAME PORT [URL [CURL ARGS...]]: one GET through
# the proxy must return 200 with exactly the origin's 1 KB body. Prints the
# problem and returns 1 otherwise.
verify_proxies_to_origin() {
    local name=$1 port=$2 url=${3:-http://127.0.0.1:$2/} out="$RUN_DIR/verify-$1.body" status
    shift 2; [ $# -gt 0 ] && shift
    status=$(curl -sS --max-time 5 "$@" -H "apikey: $API_KEY" -o "$out" \
        -w '%{http_code} %{size_download}' "$url" 2>&1) \
        || { echo "curl failed: $status"; return 1; }
    if [ "$status" != "200 1024" ]; then
        echo "expected HTTP 200 with 1024 bytes, got HTTP ${status% *} with ${status#* } bytes"
        return 1
    fi
    if [ "$(cat "$out")" != "$(body_1k)" ]; then
        echo "body differs from the origin's"
        return 1
    fi
    return 0
}

# Sum of user+system CPU ticks of PID and all its descendants (nginx
# master + worker, every Weir thread).
cpu_ticks() {
    python3 "$BENCH_DIR/cpu_ticks.py" "$1"
}

# h2load's summary -> the fields wrk-report.lua prints (run-protocols.sh,
# callgrind.sh weir-h2c).
h2load_result() { # OUTFILE SECONDS
    python3 - "$1" "$2" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
seconds = float(sys.argv[2])
m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
t = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
b = re.search(r"traffic: .*?\((\d+)\) total", text)
lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
if not m or not t:
    sys.exit(0)
def us(v):
    n = float(re.match(r"[\d.]+", v).group())
    return n * (1000 if v.endswith("ms") else 1e6 if v.endswith("s") and not v.endswith("us") else 1)
done, failed, errored, timeout = int(m.group(3)), int(m.group(5)), int(m.group(6)), int(m.group(7))
print(f"WRK_RESULT requests={done} seconds={float(t.group(1)):.3f} rps={float(t.group(2)):.1f} "
      f"bytes={b.group(1) if b else 0} mean_us={us(lat.group(3)) if lat else 0:.1f} "
      f"err_status={failed} err_read={errored} err_timeout={timeout}")
PY
}
