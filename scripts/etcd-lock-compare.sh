#!/usr/bin/env bash
# Compares `distlock run` on etcd:// with `etcdctl lock`, run the same way against one etcd
# member: 8 concurrent shell loops, each taking the lock ITER times (default 10) around a command
# that appends a start and an end mark (nanosecond clock) to a file. Prints locks/s, whether any
# critical sections overlapped, and the handoff gap (end of one critical section to the start of
# the next, including the next command's start) for both tools.
# Needs etcd and etcdctl (Debian: etcd-server, etcd-client) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ITER=${ITER:-10}
BIN=${DISTLOCK_BIN:-target/release/distlock}
[[ -x $BIN ]] || cargo build --release -q -p distlock-server
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

mark='echo "s $(date +%s%N)" >> "$0"; echo "e $(date +%s%N)" >> "$0"'
run() { # label, file slug, then the command prefix that takes the lock
  local name=$1 slug=$2; shift 2
  local marks="$dir/$slug.marks" start end
  local pids=()
  start=$(date +%s%N)
  for _ in $(seq 8); do
    ( for _ in $(seq "$ITER"); do "$@" sh -c "$mark" "$marks" >/dev/null; done ) &
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
