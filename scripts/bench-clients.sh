#!/usr/bin/env bash
# Interleaved rounds of the 64-separate-clients comparison in docs/BENCHMARKS.md: one
# `distlock serve` (embedded, durable) and one redis-server on free loopback ports; each round
# runs `distlock bench -c 64 --clients 64` against the server with the default client, with
# ?batch=off, and against the Redis backend, back to back, so every row compares like moments
# of a noisy machine. ROUNDS (default 8), DURATION (default 6s) to vary.
# Needs: redis-server, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-8}
DURATION=${DURATION:-6s}
cargo build --release -q -p distlock-cli --bin distlock
BIN=target/release/distlock
source scripts/ports.sh
need_tools redis-server python3
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
rp=$(free_port)
redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null &
pids+=($!)
sp=$(free_port)
DISTLOCK_LOG=warn $BIN serve --listen "127.0.0.1:$sp" --data-dir "$dir/data" >/dev/null 2>&1 &
pids+=($!)
wait_port "$rp"; wait_port "$sp"
echo "| round | server (default client) | server, batch=off | Redis backend | ratio (default / off) |"
echo "|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  runs=()
  for url in "http://127.0.0.1:$sp" "http://127.0.0.1:$sp?batch=off" "redis://127.0.0.1:$rp"; do
    runs+=("$($BIN --backend "$url" --json -q bench --concurrency 64 --clients 64 --duration "$DURATION" --key-prefix "r$r/")")
  done
  python3 - "$r" "${runs[@]}" <<'PY'
import json, sys
on, off, redis = (json.loads(a) for a in sys.argv[2:])
cell = lambda j: "%s, p99 %.1f" % (format(round(j["ops_per_s"]), ","), max(j["acquire_p99_ms"], j["release_p99_ms"]))
ok = all(j["checks_passed"] for j in (on, off, redis))
print("| %s | %s | %s | %s | %.0f %% / %.0f %% |%s" % (sys.argv[1], cell(on), cell(off), cell(redis),
      100 * on["ops_per_s"] / redis["ops_per_s"], 100 * off["ops_per_s"] / redis["ops_per_s"], "" if ok else " CHECK FAILED"))
PY
done
