#!/usr/bin/env bash
# distlock on etcd:// beside etcd's own lock service, against one etcd member started here.
#
#   scripts/etcd-lock-compare.sh [library|cli|all]     (default: all)
#
# library: ROUNDS (default 5) interleaved rounds, each running back to back, in alternating order,
#   the etcd backend (`distlock bench`) and etcd's v3lock service driven through the etcd-client
#   crate's `lock` / `unlock` calls, one session lease per task (examples/etcd_put.rs `lock`
#   modes), for: uncontended at 1 and 32 tasks (each task its own lock), contended with 8 tasks on
#   one lock (handoff: from a release being answered to the next holder's grant); plus etcd's raw
#   `put` rate at 1 and 32 tasks. Each run lasts DURATION (default 3s). Prints one line per run,
#   then a table: medians and the spread of every row, and per round the ratio of distlock to
#   v3lock. JSON of every run in target/bench/etcd-compare.jsonl.
# cli: `distlock run` beside `etcdctl lock`, run the same way: 8 concurrent shell loops, each
#   taking the lock ITER times (default 10) around a command that appends a start and an end mark
#   (nanosecond clock) to a file. Prints locks/s, whether any critical sections overlapped, and the
#   handoff gap (end of one critical section to the start of the next, including the next
#   command's start) for both tools.
# Needs etcd and etcdctl (Debian: etcd-server, etcd-client) and python3; builds the release
# binaries if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
ITER=${ITER:-10}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-3s}
BIN=${DISTLOCK_BIN:-target/release/distlock}
ETCD_PUT=target/release/examples/etcd_put
[[ -x $BIN && -x $ETCD_PUT ]] || cargo build --release -q -p distlock-cli --bin distlock --example etcd_put
source scripts/ports.sh
port=$(free_port) peer=$(free_port)
dir=$(mktemp -d)
etcd --name cmp --data-dir "$dir/etcd" --log-level error \
  --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
  --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "cmp=http://127.0.0.1:$peer" >/dev/null 2>&1 &
etcd_pid=$!
trap 'kill $etcd_pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

library() {
  local out=target/bench/etcd-compare.jsonl endpoint="http://127.0.0.1:$port"
  mkdir -p target/bench
  : >"$out"
  # tag: row label, round, then the command printing one JSON object
  one() {
    local row=$1 round=$2
    shift 2
    "$@" | python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); j["row"]=sys.argv[1]; j["round"]=int(sys.argv[2]); print(json.dumps(j))' "$row" "$round" | tee -a "$out"
  }
  distlock_row() { # row round workload tasks
    one "$1" "$2" "$BIN" --backend "etcd://127.0.0.1:$port" bench --workload "$3" --concurrency "$4" \
      --duration "$DURATION" --json
  }
  v3lock_row() { # row round mode tasks
    one "$1" "$2" "$ETCD_PUT" "$endpoint" "$4" "$DURATION" "$3"
  }
  # Warm-up (not kept): a fresh etcd member and fresh connections are slower for a second.
  "$BIN" --backend "etcd://127.0.0.1:$port" bench --concurrency 8 --duration 1s --json >/dev/null
  "$ETCD_PUT" "$endpoint" 8 1s lock >/dev/null
  for round in $(seq "$ROUNDS"); do
    for tasks in 1 32; do
      if ((round % 2)); then
        distlock_row "distlock uncontended $tasks" "$round" uncontended "$tasks"
        v3lock_row "v3lock uncontended $tasks" "$round" lock "$tasks"
      else
        v3lock_row "v3lock uncontended $tasks" "$round" lock "$tasks"
        distlock_row "distlock uncontended $tasks" "$round" uncontended "$tasks"
      fi
      v3lock_row "put $tasks" "$round" put "$tasks"
    done
    if ((round % 2)); then
      distlock_row "distlock contended 8" "$round" contended 8
      v3lock_row "v3lock contended 8" "$round" lock-contended 8
    else
      v3lock_row "v3lock contended 8" "$round" lock-contended 8
      distlock_row "distlock contended 8" "$round" contended 8
    fi
  done >/dev/null
  python3 - "$out" "$DURATION" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
rows = {}
for r in runs:
    rows.setdefault(r["row"], []).append(r)
def rate(r):
    return r.get("ops_per_s") or r.get("puts_per_s") or 0.0
def med(v):
    return statistics.median(v) if v else float("nan")
print(f"{len(set(r['round'] for r in runs))} interleaved rounds of {sys.argv[2]} per run; medians, with the spread (min-max) over the rounds.\n")
print("| row | cycles/s (puts/s) | spread | acquire p50 / p99 ms | release p50 / p99 ms | handoff p50 / p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
order = ["distlock uncontended 1", "v3lock uncontended 1", "put 1", "distlock uncontended 32",
         "v3lock uncontended 32", "put 32", "distlock contended 8", "v3lock contended 8"]
for name in order:
    rs = rows.get(name, [])
    if not rs:
        continue
    rates = [rate(r) for r in rs]
    def pair(a, b):
        va = [r.get(a) for r in rs if r.get(a) is not None]
        vb = [r.get(b) for r in rs if r.get(b) is not None]
        return f"{med(va):.3f} / {med(vb):.3f}" if va else ""
    if name.startswith("put"):
        acq = pair("put_p50_ms", "put_p99_ms")
    else:
        acq = pair("acquire_p50_ms", "acquire_p99_ms")
    errors = sum(r["errors"] if isinstance(r["errors"], int) else sum(r["errors"].values()) for r in rs)
    print(f"| {name} | {med(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | {acq} | "
          f"{pair('release_p50_ms', 'release_p99_ms')} | {pair('handoff_p50_ms', 'handoff_p99_ms')} | {errors} |")
print("\nPer round, distlock / v3lock (same round, back to back):\n")
print("| round | uncontended 1 | uncontended 32 | contended 8 handoff p99 ms (distlock / v3lock) |")
print("|---|---|---|---|")
by = {(r["row"], r["round"]): r for r in runs}
for rnd in sorted(set(r["round"] for r in runs)):
    cells = []
    for t in (1, 32):
        d, v = by.get((f"distlock uncontended {t}", rnd)), by.get((f"v3lock uncontended {t}", rnd))
        cells.append(f"{rate(d) / rate(v):.2f}x" if d and v and rate(v) else "")
    d, v = by.get(("distlock contended 8", rnd)), by.get(("v3lock contended 8", rnd))
    h = f"{d['handoff_p99_ms']:.2f} / {v['handoff_p99_ms']:.2f}" if d and v else ""
    print(f"| {rnd} | {cells[0]} | {cells[1]} | {h} |")
PY
}

cli() {
  mark='echo "s $(date +%s%N)" >> "$0"; echo "e $(date +%s%N)" >> "$0"'
  run() { # label, file slug, then the command prefix that takes the lock
    local name=$1 slug=$2
    shift 2
    local marks="$dir/$slug.marks" start end
    local pids=()
    start=$(date +%s%N)
    for _ in $(seq 8); do
      (for _ in $(seq "$ITER"); do "$@" sh -c "$mark" "$marks" >/dev/null; done) &
      pids+=($!)
    done
    wait "${pids[@]}"
    end=$(date +%s%N)
    python3 - "$name" "$marks" "$start" "$end" <<'PY'
import statistics, sys
name, path, start, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
marks = [l.split() for l in open(path)]
ok = all(marks[i][0] == "s" and marks[i + 1][0] == "e" for i in range(0, len(marks), 2))
starts = [int(m[1]) for m in marks if m[0] == "s"]
ends = [int(m[1]) for m in marks if m[0] == "e"]
gaps = sorted((starts[i + 1] - ends[i]) / 1e6 for i in range(len(starts) - 1))
print(f"| {name} | {len(starts)} | {len(starts) / ((end - start) / 1e9):.1f} | "
      f"{statistics.median(gaps):.2f} / {gaps[int(len(gaps) * 0.9)]:.2f} | {'none' if ok else 'OVERLAP'} |")
PY
  }
  echo "| tool | locks | locks/s | handoff gap p50 / p90 ms | overlaps |"
  echo "|---|---|---|---|---|"
  run "distlock run (etcd://)" distlock "$BIN" --backend "etcd://127.0.0.1:$port" run --wait 60s bench-key --
  run "etcdctl lock" etcdctl env ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$port" lock bench-key --
}

case $MODE in
  library) library ;;
  cli) cli ;;
  all) library && echo && cli ;;
  *) echo "usage: $0 [library|cli|all]" >&2 && exit 64 ;;
esac
