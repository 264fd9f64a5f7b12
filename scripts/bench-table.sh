#!/usr/bin/env bash
# Regenerates the main table of docs/BENCHMARKS.md with `distlock bench`: the embedded server
# (through the library's default client, which coalesces concurrent calls into batches, and with
# ?batch=off, one request per call), one Redis, Redlock over 3 Redis masters and one etcd member,
# at concurrency 1, 32 and 64 (uncontended; 64 tasks both sharing one client and as 64 separate
# clients, each its own connections) and 8 (contended), each row the median of RUNS runs (default 3) of DURATION
# (default 3s), beside the raw store figure measured in the same run: `redis-benchmark -t set`
# at the same concurrency, and etcd puts at the same concurrency (examples/etcd_put.rs).
# Starts every server itself on free loopback ports and stops them at the end. About 7 minutes
# with the defaults once the release build exists; the JSON of every run is kept in
# target/bench/table.jsonl.
# Needs: redis-server, redis-benchmark (redis-server, redis-tools), etcd (etcd-server), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-3s}
cargo build --release -q -p distlock-cli --bin distlock --example etcd_put
BIN=target/release/distlock
ETCD_PUT=target/release/examples/etcd_put
source scripts/ports.sh
need_tools redis-server redis-benchmark etcd etcdctl python3

dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
start_redis r1; start_redis m1; start_redis m2; start_redis m3
start_etcd ep
sp=$(free_port)
DISTLOCK_LOG=warn $BIN serve --listen "127.0.0.1:$sp" --data-dir "$dir/data" >/dev/null 2>&1 &
pids+=($!)
wait_port "$sp"

mkdir -p target/bench
out=target/bench/table.jsonl
: >"$out"
backends=(
  "distlock serve (embedded, durable)|http://127.0.0.1:$sp"
  "distlock serve, batch=off|http://127.0.0.1:$sp?batch=off"
  "redis|redis://127.0.0.1:$r1"
  "redlock (3 masters)|redlock://127.0.0.1:$m1,127.0.0.1:$m2,127.0.0.1:$m3"
  "etcd (1 member)|etcd://127.0.0.1:$ep"
)
for entry in "${backends[@]}"; do
  name=${entry%%|*} url=${entry#*|}
  # workload, tasks, clients (64 tasks of one program sharing a client, or as 64 processes)
  for shape in "uncontended 1 1" "uncontended 32 1" "uncontended 64 1" "uncontended 64 64" "contended 8 1"; do
    set -- $shape
    for run in $(seq "$RUNS"); do
      echo "  $name: $1 x$2 over $3 clients, run $run/$RUNS" >&2
      $BIN --backend "$url" --json -q bench --workload "$1" --concurrency "$2" --clients "$3" --duration "$DURATION" --key-prefix "bench-$run/" |
        python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); j["name"]=sys.argv[1]; print(json.dumps(j))' "$name" >>"$out"
    done
  done
done
for c in 1 32 64; do
  for run in $(seq "$RUNS"); do
    n=$(( c == 1 ? 30000 : 200000 ))
    redis-benchmark -h 127.0.0.1 -p "$r1" -t set -c "$c" -n "$n" -r 100000 --csv |
      python3 -c 'import json,sys; rows=[l.split(",") for l in sys.stdin if l.startswith("\"SET\"")]; print(json.dumps({"raw":"redis-benchmark SET","concurrency":int(sys.argv[1]),"ops_per_s":float(rows[0][1].strip("\""))}))' "$c" >>"$out"
    $ETCD_PUT "http://127.0.0.1:$ep" "$c" "$DURATION" |
      python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); j["raw"]="etcd put"; j["ops_per_s"]=j["puts_per_s"]; print(json.dumps(j))' >>"$out"
  done
done

python3 - "$out" "$RUNS" "$DURATION" <<'PY'
import json, statistics, sys, os
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda xs: statistics.median(xs) if xs else float("nan")
def raw(kind, c):
    return med([r["ops_per_s"] for r in rows if r.get("raw") == kind and r["concurrency"] == c])
print(f"Medians of {sys.argv[2]} runs of {sys.argv[3]} each; {os.cpu_count()} cores; JSON of every run in {sys.argv[1]}.\n")
print("| backend | workload | tasks / clients | cycles/s | acquire p50 / p99 ms | release p50 / p99 ms | handoff p50 / p99 ms | raw store / ratio, same concurrency | checks |")
print("|---|---|---|---|---|---|---|---|---|")
seen = []
for r in rows:
    if "name" in r and (r["name"], r["workload"], r["concurrency"], r["clients"]) not in seen:
        seen.append((r["name"], r["workload"], r["concurrency"], r["clients"]))
for name, workload, c, k in seen:
    rs = [r for r in rows if r.get("name") == name and r["workload"] == workload and r["concurrency"] == c and r["clients"] == k]
    m = lambda f: med([r[f] for r in rs if r[f] is not None])
    if workload == "uncontended" and name == "redis" and k == 1:
        base = f"SET {raw('redis-benchmark SET', c):,.0f}/s (half: {raw('redis-benchmark SET', c) / 2:,.0f})"
    elif workload == "uncontended" and name.startswith("etcd"):
        base = f"put {raw('etcd put', c):,.0f}/s"
    elif workload == "uncontended" and name.startswith("distlock serve"):
        redis = med([x["ops_per_s"] for x in rows if x.get("name") == "redis" and x["workload"] == workload and x["concurrency"] == c and x["clients"] == k])
        base = f"{med([x['ops_per_s'] for x in rs]) / redis:.0%} of the Redis backend" if redis == redis else ""
    else:
        base = ""
    handoff = f"{m('handoff_p50_ms'):.3f} / {m('handoff_p99_ms'):.3f}" if workload == "contended" else ""
    checks = "ok" if all(r["checks_passed"] for r in rs) else "FAILED"
    errors = sum(r["errors"] for r in rs)
    print(f"| {name} | {workload} | {c} / {k} | {m('ops_per_s'):,.0f} | {m('acquire_p50_ms'):.3f} / {m('acquire_p99_ms'):.3f} | "
          f"{m('release_p50_ms'):.3f} / {m('release_p99_ms'):.3f} | {handoff} | {base} | {checks}{f', {errors} errors' if errors else ''} |")
PY
