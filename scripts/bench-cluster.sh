#!/usr/bin/env bash
# The Redis Cluster row of docs/BENCHMARKS.md: a 3-master cluster on loopback (no replicas, no
# persistence), `distlock bench` uncontended with 32 tasks over redis-cluster:// beside
# `redis-benchmark --cluster -t set -c 32` on the same cluster, and the same bench against one
# standalone Redis for scale, in ROUNDS interleaved rounds (default 3) of DURATION (default 5s).
# Needs: redis-server, redis-cli, redis-benchmark (redis-server, redis-tools), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
cargo build --release -q -p distlock-cli --bin distlock
BIN=target/release/distlock
source scripts/ports.sh
need_tools redis-server redis-cli redis-benchmark python3
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
nodes=()
# A node's cluster bus listens on its port + 10000, so the port must be 55535 or less.
cluster_port() { python3 -c 'import socket
while True:
    s=socket.socket(); s.bind(("127.0.0.1", 0)); p=s.getsockname()[1]
    if p <= 55535:
        t=socket.socket()
        try: t.bind(("127.0.0.1", p + 10000)); print(p); break
        except OSError: pass'; }
for i in 1 2 3; do
  p=$(cluster_port)
  mkdir -p "$dir/$i"
  redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir/$i" \
    --cluster-enabled yes --cluster-config-file "$dir/$i/nodes.conf" >/dev/null &
  pids+=($!)
  wait_port "$p"
  nodes+=("127.0.0.1:$p")
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 100); do
  redis-cli -p "${nodes[0]#*:}" cluster info | grep -q cluster_state:ok && break
  sleep 0.1
done
single=$(free_port)
redis-server --port "$single" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null &
pids+=($!)
wait_port "$single"
cluster_url="redis-cluster://$(IFS=,; echo "${nodes[*]}")"
rate() { python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.0f cycles/s, acquire p99 %.2f ms" % (d["ops_per_s"], d["acquire_p99_ms"]))'; }
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  printf '  distlock, cluster (3 masters), 32 tasks:  '
  $BIN --backend "$cluster_url" --json -q bench --concurrency 32 --duration "$DURATION" --key-prefix "c$r/" | rate
  printf '  distlock, one redis, 32 tasks:            '
  $BIN --backend "redis://127.0.0.1:$single" --json -q bench --concurrency 32 --duration "$DURATION" --key-prefix "s$r/" | rate
  printf '  redis-benchmark --cluster -t set -c 32:   '
  redis-benchmark --cluster -h 127.0.0.1 -p "${nodes[0]#*:}" -t set -c 32 -n 200000 -q | tr -d '\r' | grep -o 'SET: [0-9.]* requests per second' || echo "?"
done
