#!/bin/sh
# The whole test suite: Python runtime tests, Rust unit and integration tests against
# real Python workers, formatting and lints. Sets up its own Python environment first.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

SNAKEPOOL_PYTHON=$(sh scripts/python-env.sh)
export SNAKEPOOL_PYTHON

echo "== Python worker runtime (pytest)"
"$SNAKEPOOL_PYTHON" -m pytest python/tests -q

echo "== Rust format and lints"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== Rust tests (real Python workers)"
cargo test --quiet
