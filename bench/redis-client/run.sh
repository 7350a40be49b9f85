#!/usr/bin/env bash
# INCR round trips: WeirRedis (one client, one loop) beside redis-benchmark
# (-c 1, -P 1 and -P 16), against one throwaway redis-server, same run.
# Besides req/s (noisy on a shared machine) it prints the client process's
# CPU time per request (user+sys), which shared load disturbs far less.
# Usage: bench/redis-client/run.sh [requests]   (from the repository root)
set -euo pipefail
requests=${1:-100000}
scratch=${SCRATCH:-.build-redis-rel}
swift build -c release --scratch-path "$scratch" --product weir-redis-bench -j 2 >/dev/null
bin="$scratch/release/weir-redis-bench"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --logfile /dev/null &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
echo "redis-server $(redis-server --version | grep -o 'v=[0-9.]*'), $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg), $requests INCRs per line"
cpu_per_request() {  # file with "user sys" seconds -> µs per request
  awk -v n="$requests" '{ printf "%6.1f µs CPU/req", ($1 + $2) * 1e6 / n }' "$1"
}
times=$(mktemp)
for p in 1 16; do
  out=$(/usr/bin/time -o "$times" -f '%U %S' redis-benchmark -p "$port" -t incr -c 1 -P "$p" -n "$requests" -q)
  rps=$(echo "$out" | grep -o '[0-9.]* requests per second' | cut -d' ' -f1)
  printf '%-34s %9.0f req/s  %s\n' "redis-benchmark -c 1 -P $p" "$rps" "$(cpu_per_request "$times")"
done
for mode in sequential batch16 window16 window256; do
  out=$(/usr/bin/time -o "$times" -f '%U %S' "$bin" --port "$port" --requests "$requests" --mode "$mode")
  echo "$out  $(cpu_per_request "$times")"
done
rm -f "$times"
