#!/bin/sh
# Where the host's CPU goes on plain calls: `perf stat` (system calls and context
# switches per call) and `perf record -g` (the hottest symbols of the host's runtime
# threads) over `snakepool bench` with PROFILE_CALLERS callers (32) on PROFILE_WORKERS
# workers (2), PROFILE_CALLS calls (400000) of PROFILE_COMMAND (ping).
#
# Needs `perf` (Debian's linux-perf; installed when missing) and a release build (made
# here). Prints the counts and the top PROFILE_TOP (40) symbols; leaves perf.data in
# target/profile/.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

callers=${PROFILE_CALLERS:-32}
workers=${PROFILE_WORKERS:-2}
calls=${PROFILE_CALLS:-400000}
command=${PROFILE_COMMAND:-ping}
top=${PROFILE_TOP:-40}

if ! command -v perf >/dev/null 2>&1; then
  apt-get install -y linux-perf >/dev/null
fi
SNAKEPOOL_PYTHON=$(sh scripts/python-env.sh)
export SNAKEPOOL_PYTHON
cargo build --release --quiet
out=target/profile
mkdir -p "$out"
bench="target/release/snakepool bench --workers $workers --concurrency $callers --requests $calls --command $command --json"

echo "== system calls and context switches (host and workers), $calls calls"
# shellcheck disable=SC2086
perf stat -e 'syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,context-switches' \
  -o "$out/stat.txt" -- $bench >"$out/bench.json"
cat "$out/stat.txt"
python3 - "$out/bench.json" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
cpu = report["resources"]
print(
    "%.0f calls/s, host %.2f µs/call, workers %.2f µs/call"
    % (report["throughput_rps"], cpu["host_cpu_us_per_call"], cpu["worker_cpu_us_per_call"])
)
PY

echo "== hottest symbols of the host's runtime threads"
# shellcheck disable=SC2086
perf record -F 4999 -g -o "$out/perf.data" -- $bench >/dev/null 2>&1
perf report -i "$out/perf.data" --no-children --comm tokio-rt-worker --percentage relative \
  --sort sym -g none 2>/dev/null | grep '%' | head -n "$top"
