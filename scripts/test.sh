#!/bin/sh
# The whole test suite: Python runtime tests, Rust unit and integration tests against
# real Python workers (the pool's behavioural tests in both spawn modes), formatting
# and lints. Sets up its own Python environment first.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

SNAKEPOOL_PYTHON=$(sh scripts/python-env.sh)
export SNAKEPOOL_PYTHON
# Redis and HAProxy for the cluster tests.
sh scripts/services.sh
export PATH="$PATH:/usr/sbin"

echo "== Python worker runtime and DSPy bridge (pytest)"
"$SNAKEPOOL_PYTHON" -m pytest python/tests -q

echo "== Rust format and lints"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== Rust tests (real Python workers; workers forked from the zygote)"
SNAKEPOOL_SPAWN=zygote cargo test --quiet

echo "== The Python client against a real server (pytest)"
SNAKEPOOL_BIN="$root/target/debug/snakepool" "$SNAKEPOOL_PYTHON" -m pytest clients/python/tests -q

echo "== The pool's behavioural tests again with fresh workers"
SNAKEPOOL_SPAWN=fresh cargo test --quiet \
  --test pool_basics --test pool_failures --test pool_limits --test sessions --test dspy_bridge

# The fuzz targets, bounded in time (SNAKEPOOL_FUZZ_SECONDS per target; 0 skips).
fuzz_seconds=${SNAKEPOOL_FUZZ_SECONDS:-20}
if [ "$fuzz_seconds" -gt 0 ]; then
  echo "== Fuzzing the wire protocol (${fuzz_seconds}s a target)"
  sh scripts/fuzz.sh "$fuzz_seconds"
fi
