#!/usr/bin/env bash
# Two builds of `distlock` side by side in interleaved rounds, for "no slowdown beyond noise"
# after a change (docs/BENCHMARKS.md):
#
#   scripts/bench-ab.sh BEFORE_BIN AFTER_BIN
#
# Starts one redis-server and, for each build, its own `distlock serve` (embedded durable store,
# temp dir), all on free loopback ports. Each round runs every row with both builds back to back,
# the order alternating by round (each build's client against its own server): memory:// with 1
# and 32 tasks, the server with 1 and 32 tasks and contended (8 tasks, one key), redis:// with 1
# and 32 tasks. Prints per row the median cycles/s of each build, the median ratio after/before
# and its spread over the rounds. ROUNDS (default 5), DURATION (default 3s) to vary; ROWS, a
# regular expression, keeps only the rows whose names match (e.g. ROWS='^server 1$' for more
# rounds of one doubtful row); JSON of every run in target/bench/ab.jsonl.
# Needs: redis-server, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 && -x $1 && -x $2 ]] || { echo "usage: $0 BEFORE_BIN AFTER_BIN (two distlock binaries)" >&2; exit 64; }
A=$1 B=$2
ROUNDS=${ROUNDS:-5}
ROWS=${ROWS:-.}
DURATION=${DURATION:-3s}
source scripts/ports.sh
need_tools redis-server python3
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
rp=$(free_port)
redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null &
pids+=($!)
pa=$(free_port)
DISTLOCK_LOG=warn "$A" serve --listen "127.0.0.1:$pa" --data-dir "$dir/a" >/dev/null 2>&1 &
pids+=($!)
pb=$(free_port)
DISTLOCK_LOG=warn "$B" serve --listen "127.0.0.1:$pb" --data-dir "$dir/b" >/dev/null 2>&1 &
pids+=($!)
wait_port "$rp"; wait_port "$pa"; wait_port "$pb"
out=target/bench/ab.jsonl
mkdir -p target/bench
: >"$out"

# build (a|b), row name, backend URL, workload, tasks
one() {
  local which=$1 row=$2 url=$3 workload=$4 tasks=$5 bin
  bin=$([[ $which == a ]] && echo "$A" || echo "$B")
  "$bin" --backend "$url" --json -q bench --workload "$workload" --concurrency "$tasks" \
    --duration "$DURATION" --key-prefix "$which$round/" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); j.update(build=sys.argv[1], row=sys.argv[2], round=int(sys.argv[3])); print(json.dumps(j))' \
      "$which" "$row" "$round" >>"$out"
}
for round in $(seq "$ROUNDS"); do
  first=a second=b
  ((round % 2)) || { first=b; second=a; }
  for spec in "memory 1|memory://|uncontended|1" "memory 32|memory://|uncontended|32" \
    "server 1|SERVER|uncontended|1" "server 32|SERVER|uncontended|32" "server contended 8|SERVER|contended|8" \
    "redis 1|redis://127.0.0.1:$rp|uncontended|1" "redis 32|redis://127.0.0.1:$rp|uncontended|32"; do
    IFS='|' read -r row url workload tasks <<<"$spec"
    [[ $row =~ $ROWS ]] || continue
    for which in $first $second; do
      u=$url
      [[ $url == SERVER ]] && u="http://127.0.0.1:$([[ $which == a ]] && echo "$pa" || echo "$pb")"
      one "$which" "$row" "$u" "$workload" "$tasks"
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
by = {(r["row"], r["build"], r["round"]): r for r in runs}
print(f"{sys.argv[2]} interleaved rounds of {sys.argv[3]} per run; medians, ratio after / before per round.\n")
print("| row | before cycles/s | after cycles/s | after / before (median) | spread over rounds | checks |")
print("|---|---|---|---|---|---|")
for row in rows:
    rounds = sorted({r["round"] for r in runs if r["row"] == row})
    a = [by[(row, "a", n)]["ops_per_s"] for n in rounds if (row, "a", n) in by]
    b = [by[(row, "b", n)]["ops_per_s"] for n in rounds if (row, "b", n) in by]
    ratios = [by[(row, "b", n)]["ops_per_s"] / by[(row, "a", n)]["ops_per_s"]
              for n in rounds if (row, "a", n) in by and (row, "b", n) in by and by[(row, "a", n)]["ops_per_s"]]
    ok = all(r["checks_passed"] for r in runs if r["row"] == row)
    print(f"| {row} | {statistics.median(a):,.0f} | {statistics.median(b):,.0f} | {statistics.median(ratios):.2f} | "
          f"{min(ratios):.2f}-{max(ratios):.2f} | {'ok' if ok else 'FAILED'} |")
PY
