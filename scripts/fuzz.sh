#!/bin/sh
# Fuzzes the wire protocol for a bounded time: each target in fuzz/ (the frame decoder
# and the reply parser) runs for SECONDS (default 30) under libFuzzer, with the seeds in
# fuzz/seeds/ and the corpus it grows in fuzz/corpus/ (not kept in git). Fails on the
# first crash, leaving the input that caused it in fuzz/artifacts/TARGET/; replay it
# with `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...`.
#
# Installs cargo-fuzz from crates.io if it is missing. cargo-fuzz passes nightly-only
# flags to rustc; on a stable toolchain RUSTC_BOOTSTRAP=1 lets it. Builds with
# AddressSanitizer, or without a sanitizer where the toolchain has no ASan runtime;
# FUZZ_SANITIZER=none skips ASan (about five times the executions per second).
#
# Usage: scripts/fuzz.sh [SECONDS]
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

seconds=${1:-30}
case $seconds in
'' | *[!0-9]*)
  echo "usage: scripts/fuzz.sh [SECONDS]" >&2
  exit 2
  ;;
esac
targets="frame_decoder reply_parser"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --version '^0.13' --locked
fi
cargo fuzz --version

RUSTC_BOOTSTRAP=1
export RUSTC_BOOTSTRAP

echo "== building the fuzz targets"
sanitizer=${FUZZ_SANITIZER:-address}
if ! cargo fuzz build --sanitizer "$sanitizer"; then
  [ "$sanitizer" != none ] || exit 1
  echo "-- the build with sanitizer $sanitizer failed; building without one" >&2
  sanitizer=none
  cargo fuzz build --sanitizer "$sanitizer"
fi

# libFuzzer's own output (thousands of lines, dictionaries included) goes to a log;
# the summary, or on a crash the log's end, is printed.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
stat() {
  sed -n "s/^stat::$1: *//p" "$2" | tail -n 1
}
for target in $targets; do
  echo "== fuzzing $target for ${seconds}s (sanitizer: $sanitizer)"
  mkdir -p "fuzz/corpus/$target"
  log="$logs/$target.log"
  if ! cargo fuzz run --sanitizer "$sanitizer" "$target" \
    "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
    > "$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "== $target failed: the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  echo "   $(stat number_of_executed_units "$log") inputs run, $(stat new_units_added "$log") new to the corpus, peak RSS $(stat peak_rss_mb "$log") MB"
done
echo "== no crash in $targets"
