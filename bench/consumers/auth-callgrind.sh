#!/usr/bin/env bash
# Instructions per request (callgrind) of one route with key-auth, jwt HS256
# or jwt RS256 (one consumer; the same token on every request, so jwt's token
# cache is hit after the first; pass --no-cache to measure every request's
# full decode + signature check). Keys and tokens are made with openssl and
# Python's stdlib in the run dir.
#
#   bench/consumers/auth-callgrind.sh [--no-cache] [--duration S]     (WEIR_BIN=... for another build)
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ORIGIN_PORT=19030
PORT=19050
DURATION=8
CACHE_TTL=10
while [ $# -gt 0 ]; do
    case "$1" in
        --no-cache) CACHE_TTL=0; shift ;;
        --duration) DURATION=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) die "unknown option: $1" ;;
    esac
done
require_tools nginx wrk curl python3 openssl valgrind callgrind_control
for port in "$ORIGIN_PORT" "$PORT"; do port_in_use "$port" && die "127.0.0.1:$port is already in use"; done
[ -x "$WEIR_BIN" ] || die "no weir binary at $WEIR_BIN (build one, or set WEIR_BIN)"
prepare_run_dir
trap 'cleanup_started' EXIT

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$RUN_DIR/rsa.pem" 2>/dev/null
openssl pkey -in "$RUN_DIR/rsa.pem" -pubout -out "$RUN_DIR/rsa.pub"
(cd "$RUN_DIR" && python3 - "$PORT" "$ORIGIN_PORT" "$REPO_DIR/plugins" "$CACHE_TTL" <<'PY'
import base64, hashlib, hmac, json, subprocess, sys
port, origin, plugins, ttl = sys.argv[1:5]
b = lambda x: base64.urlsafe_b64encode(x).decode().rstrip("=")
def token(alg, claims, sign):
    h = b(json.dumps({"alg": alg, "typ": "JWT"}).encode()); c = b(json.dumps(claims).encode())
    return h + "." + c + "." + b(sign((h + "." + c).encode()))
open("rs.tok", "w").write(token("RS256", {"iss": "bench-rs", "exp": 4102444800},
    lambda d: subprocess.run(["openssl", "dgst", "-sha256", "-sign", "rsa.pem"], input=d, capture_output=True).stdout))
open("hs.tok", "w").write(token("HS256", {"iss": "bench-hs", "exp": 4102444800},
    lambda d: hmac.new(b"bench-secret", d, hashlib.sha256).digest()))
pem = "\n".join("              " + l for l in open("rsa.pub").read().strip().split("\n"))
for name in ["key", "hs", "rs"]:
    plugin = "{ name: key-auth }" if name == "key" else "{ name: jwt, config: { cache_ttl: %s } }" % ttl
    open(name + ".yaml", "w").write(f"""listeners:
  - {{ name: bench, listen: 127.0.0.1:{port}, protocol: http }}
upstreams:
  - {{ name: origin, targets: [{{ address: 127.0.0.1:{origin} }}], pool: {{ max_idle: 64 }} }}
routes:
  - {{ name: all, match: {{ paths: [/] }}, upstream: origin, plugins: [{plugin}] }}
plugin_paths: [{plugins}]
workers: 1
access_log: "off"
consumers:
  - name: alice
    credentials:
      key-auth: [{{ key: bench-key }}]
      jwt:
        - {{ key: bench-hs, algorithm: HS256, secret: bench-secret }}
        - key: bench-rs
          algorithm: RS256
          rsa_public_key: |
{pem}
""")
PY
) || die "could not write the configs"

start_origin
strip --strip-debug -o "$RUN_DIR/weir-nodebug" "$WEIR_BIN"
for variant in key hs rs; do
    case $variant in
        key) header="apikey: bench-key" ;;
        hs) header="Authorization: Bearer $(cat "$RUN_DIR/hs.tok")" ;;
        rs) header="Authorization: Bearer $(cat "$RUN_DIR/rs.tok")" ;;
    esac
    (cd "$REPO_DIR" && exec $(pin "$PROXY_CPU") valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$RUN_DIR/cg-$variant.out" "$RUN_DIR/weir-nodebug" run --config "$RUN_DIR/$variant.yaml" \
        --workers 1 --no-watch) > "$RUN_DIR/logs/$variant.out" 2>&1 &
    pid=$!
    STARTED_PIDS+=("$pid"); STARTED_NAMES+=("weir-$variant")
    wait_for_port "$PORT" 120 || die "weir ($variant) did not listen"
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "$header" "http://127.0.0.1:$PORT/")
    [ "$code" = 200 ] || die "$variant: expected 200 through the plugin, got $code"
    # shellcheck disable=SC2046
    $(pin "$LOAD_CPU") wrk -t 1 -c 4 -d 2s -H "$header" "http://127.0.0.1:$PORT/" > /dev/null
    callgrind_control -i on "$pid" > /dev/null
    # shellcheck disable=SC2046
    result=$($(pin "$LOAD_CPU") wrk -t 1 -c 4 -d "${DURATION}s" -s "$WRK_REPORTER" -H "$header" "http://127.0.0.1:$PORT/" | grep WRK_RESULT)
    callgrind_control -d "$pid" > /dev/null; callgrind_control -i off "$pid" > /dev/null; sleep 1
    requests=$(grep -o "requests=[0-9]*" <<< "$result" | cut -d= -f2)
    dump=$(ls -t "$RUN_DIR/cg-$variant.out"* | head -1)
    total=$(grep -m1 '^summary:' "$dump" | awk '{print $2}'); [ -n "$total" ] || total=$(grep -m1 '^totals:' "$dump" | awk '{print $2}')
    echo "$variant (jwt cache_ttl $CACHE_TTL): $requests requests, $(python3 -c "print(f'{$total / $requests:,.0f}')") instructions per request"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
done
