#!/bin/sh
# Installs what the cluster tests and scripts/cluster.sh run (redis-server and haproxy)
# and the headless browser of the dashboard test (chromium), from the system's
# packages, when they are missing. Idempotent: does nothing when all are on the PATH.
set -eu
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 ||
  missing="$missing chromium"
[ -z "$missing" ] && exit 0

echo "installing$missing" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root, or install these packages first:$missing" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get here: install these packages with the system's package manager:$missing" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
# shellcheck disable=SC2086
apt-get install -y -qq $missing >&2
