#!/bin/sh
# Regenerates BENCHMARKS.md and docs/bench/*.png.
#
# Sets up the project's Python environment (scripts/python-env.sh), exports its
# interpreter as SNAKEPOOL_PYTHON, builds the `compare` bench, then runs it: one process
# that measures every comparison and writes the report and the plots. Takes about four
# minutes on a 2-core machine; rounds and sizes can be changed with the BENCH_*
# variables listed in BENCHMARKS.md.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

SNAKEPOOL_PYTHON=$(sh scripts/python-env.sh)
export SNAKEPOOL_PYTHON
echo "Python: $SNAKEPOOL_PYTHON"

# Build first, so compiling does not share the machine with the measurements.
cargo bench --bench compare --no-run

started=$(date +%s)
cargo bench --bench compare
echo "benchmarks: $(($(date +%s) - started)) s; see BENCHMARKS.md"
