#!/usr/bin/env bash
# Semaphores, shared locks and a plain lock side by side on one key (issue 21), in interleaved
# rounds (docs/BENCHMARKS.md):
#
#   scripts/bench-primitives.sh [DISTLOCK_BIN]
#
# Starts one `distlock serve` (embedded durable store, temp dir), one redis-server (no
# persistence) and one etcd member on free loopback ports. Each round runs every row back to back,
# against the server, Redis, etcd and memory://: 8 tasks on one key
# holding it 1 ms each, as a lock, a semaphore of 3, shared by readers only, and shared with one
# writer among 7 readers. Every run checks its own rules (never more holders than allowed, no
# reader beside a writer, rising tokens). Prints per row the median cycles/s, acquire p99 and the
# spread over rounds. ROUNDS (default 3), DURATION (default 3s); JSON of every run in
# target/bench/primitives.jsonl.
# STORES (default "server redis etcd memory") picks some. Needs: python3, redis-server, etcd and
# a release build (cargo build --release -p distlock-cli).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/distlock}
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release -p distlock-cli" >&2; exit 64; }
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3s}
source scripts/ports.sh
STORES=${STORES:-server redis etcd memory}
need_tools python3
[[ " $STORES " != *" redis "* ]] || need_tools redis-server
[[ " $STORES " != *" etcd "* ]] || need_tools etcd etcdctl
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
port=$(free_port)
DISTLOCK_LOG=warn "$BIN" serve --listen "127.0.0.1:$port" --data-dir "$dir/data" >/dev/null 2>&1 &
pids+=($!)
declare -A urls=([server]="http://127.0.0.1:$port" [memory]="memory://")
if [[ " $STORES " == *" redis "* ]]; then start_redis rport; urls[redis]="redis://127.0.0.1:$rport"; fi
if [[ " $STORES " == *" etcd "* ]]; then start_etcd eport; urls[etcd]="etcd://127.0.0.1:$eport"; fi
wait_port "$port"
out=target/bench/primitives.jsonl
mkdir -p target/bench
: >"$out"
for round in $(seq "$ROUNDS"); do
  for sname in $STORES; do
    url=${urls[$sname]:?"unknown store $sname (server, redis, etcd, memory)"}
    for spec in "lock|" "semaphore of 3|--limit 3" "shared, readers only|--shared" "shared, 1 writer + 7 readers|--shared --writers 1"; do
      IFS='|' read -r name flags <<<"$spec"
      # shellcheck disable=SC2086 # flags are words
      "$BIN" --backend "$url" --json -q bench --workload contended --concurrency 8 --hold 1ms \
        --duration "$DURATION" --key-prefix "r$round/$name/" $flags |
        python3 -c 'import json,sys; j=json.load(sys.stdin); j.update(row=sys.argv[1], round=int(sys.argv[2])); print(json.dumps(j))' \
          "$sname: $name" "$round" >>"$out"
    done
  done
  echo "round $round done" >&2
done
python3 - "$out" "$ROUNDS" "$DURATION" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
rows = []
for r in runs:
    if r["row"] not in rows:
        rows.append(r["row"])
print(f"{sys.argv[2]} interleaved rounds of {sys.argv[3]} per run; 8 tasks on one key, 1 ms held.\n")
print("| row | cycles/s (median) | spread over rounds | acquire p99 ms (median) | checks |")
print("|---|---|---|---|---|")
for row in rows:
    mine = [r for r in runs if r["row"] == row]
    ops = [r["ops_per_s"] for r in mine]
    p99 = statistics.median(r["acquire_p99_ms"] for r in mine)
    ok = all(r["checks_passed"] for r in mine)
    print(f"| {row} | {statistics.median(ops):,.0f} | {min(ops):,.0f}-{max(ops):,.0f} | {p99:.2f} | {'ok' if ok else 'FAILED'} |")
PY
