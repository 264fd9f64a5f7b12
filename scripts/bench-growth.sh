#!/usr/bin/env bash
# How the embedded server's costs grow (docs/BENCHMARKS.md, "Growth"), with `distlock bench`:
#  1. acquire + release latency (1 task, uncontended) and the server's memory (RSS) while it
#     holds 1k, 100k and 1M other leases (`--background-leases`, a fresh server for each size);
#  2. handoff latency on one key with 1, 100 and 10,000 waiters (`--workload contended` with
#     N+1 tasks, so N wait behind the holder at any time).
# Each figure is the median of RUNS runs (default 3) of DURATION (default 3s). About 6 minutes,
# most of it filling the million leases through the HTTP API. JSON of every run:
# target/bench/growth.jsonl. SIZES and WAITERS override the lists.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-3s}
SIZES=${SIZES:-"1000 100000 1000000"}
WAITERS=${WAITERS:-"1 100 10000"}
cargo build --release -q -p distlock-cli --bin distlock
BIN=target/release/distlock
source scripts/ports.sh
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

dir=$(mktemp -d)
server=""
trap '[[ -n $server ]] && kill $server 2>/dev/null; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
start_server() {
  port=$(free_port)
  rm -rf "$dir/data"
  DISTLOCK_LOG=warn $BIN serve --listen "127.0.0.1:$port" --data-dir "$dir/data" --max-leases 2000000 >/dev/null 2>&1 &
  server=$!
  wait_port "$port"
}
stop_server() { kill "$server"; wait "$server" 2>/dev/null || true; server=""; }

mkdir -p target/bench
out=target/bench/growth.jsonl
: >"$out"
tag() { python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); j.update(json.loads(sys.argv[1])); print(json.dumps(j))' "$1"; }

for n in $SIZES; do
  start_server
  rss0=$(rss_mib "$server")
  t0=$(date +%s.%N)
  $BIN --backend "http://127.0.0.1:$port" -q bench --duration 1ms --background-leases "$n" --key-prefix "held/" >/dev/null
  fill_s=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  for run in $(seq "$RUNS"); do
    echo "  $n held leases: run $run/$RUNS" >&2
    j=$($BIN --backend "http://127.0.0.1:$port" --json -q bench --concurrency 1 --duration "$DURATION" --key-prefix "m$run/")
    echo "$j" | tag "{\"held\": $n, \"rss_mib\": $(rss_mib "$server"), \"rss_empty_mib\": $rss0, \"fill_s\": $fill_s}" >>"$out"
  done
  stop_server
done

for w in $WAITERS; do
  start_server
  for run in $(seq "$RUNS"); do
    echo "  $w waiters: run $run/$RUNS" >&2
    # The server's RSS is read while the waiters queue (half-way through the run).
    ( sleep 2; rss_mib "$server" >"$dir/rss" ) &
    reader=$!
    j=$($BIN --backend "http://127.0.0.1:$port?timeout=120s" --json -q bench --workload contended --concurrency $((w + 1)) \
      --duration "$DURATION" --wait 120s --ttl 60s --key-prefix "w$run/")
    wait "$reader"
    echo "$j" | tag "{\"waiters\": $w, \"rss_mib\": $(cat "$dir/rss")}" >>"$out"
  done
  stop_server
done

python3 - "$out" "$RUNS" "$DURATION" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda rs, f: statistics.median([r[f] for r in rs])
print(f"Medians of {sys.argv[2]} runs of {sys.argv[3]} each; JSON of every run in {sys.argv[1]}.\n")
print("| leases held | acquire p50 / p99 ms | release p50 / p99 ms | cycles/s (1 task) | server RSS | fill through the API |")
print("|---|---|---|---|---|---|")
for n in dict.fromkeys(r["held"] for r in rows if "held" in r):
    rs = [r for r in rows if r.get("held") == n]
    print(f"| {n:,} | {med(rs, 'acquire_p50_ms'):.3f} / {med(rs, 'acquire_p99_ms'):.3f} | "
          f"{med(rs, 'release_p50_ms'):.3f} / {med(rs, 'release_p99_ms'):.3f} | {med(rs, 'ops_per_s'):,.0f} | "
          f"{med(rs, 'rss_mib'):,.1f} MiB (empty: {rs[0]['rss_empty_mib']} MiB) | {rs[0]['fill_s']} s |")
print()
print("| waiters on one key | handoffs/s | handoff p50 / p99 / max ms | server RSS | checks |")
print("|---|---|---|---|---|")
for w in dict.fromkeys(r["waiters"] for r in rows if "waiters" in r):
    rs = [r for r in rows if r.get("waiters") == w]
    ok = "ok" if all(r["checks_passed"] for r in rs) else "FAILED"
    errors = sum(r["errors"] for r in rs)
    print(f"| {w:,} | {med(rs, 'ops_per_s'):,.0f} | {med(rs, 'handoff_p50_ms'):.3f} / {med(rs, 'handoff_p99_ms'):.3f} / "
          f"{med(rs, 'handoff_max_ms'):.3f} | {med(rs, 'rss_mib'):,.1f} MiB | {ok}{f', {errors} errors' if errors else ''} |")
PY
