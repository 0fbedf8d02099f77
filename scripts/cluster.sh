#!/bin/sh
# A local snakepool cluster on 127.0.0.1: Redis (append-only, fsync always), three
# `snakepool serve` nodes sharing it as their journal, and HAProxy in front
# (deploy/haproxy.cfg), each on a free port.
#
#   scripts/cluster.sh              start it, print its address, stop it on Ctrl-C
#   scripts/cluster.sh up DIR       start it in the background; DIR/cluster.env says
#                                   where everything is (URLs, ports, pids)
#   scripts/cluster.sh node DIR N   start node N again (after it was stopped)
#   scripts/cluster.sh redis DIR    start Redis again (after it was stopped)
#   scripts/cluster.sh down DIR     stop everything
#
# Environment: SNAKEPOOL_BIN (the binary; default: built with cargo), SNAKEPOOL_PYTHON
# (the workers' Python; default: the project's .venv), SNAKEPOOL_NODES (3),
# SNAKEPOOL_LEASE_TTL (10s), SNAKEPOOL_NODE_ARGS (more `serve` flags, e.g. modules). Installs redis-server and haproxy when missing (scripts/services.sh).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
PATH="$PATH:/usr/sbin"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until URL answers 200, or fails naming WHAT.
wait_ready() {
  python3 - "$1" "$2" <<'PY'
import sys, time, urllib.request
url, what = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            if answer.status == 200:
                break
    except Exception:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{what} is not ready at {url} after 60 s")
    time.sleep(0.05)
PY
}

# Sets VAR='VALUE' in DIR/cluster.env (a file `.` can read).
record() {
  env_file="$1/cluster.env"
  grep -v "^$2=" "$env_file" > "$env_file.new" 2>/dev/null || true
  quoted=$(printf '%s' "$3" | sed "s/'/'\\\\''/g")
  echo "$2='$quoted'" >> "$env_file.new"
  mv "$env_file.new" "$env_file"
}

start_redis() {
  dir=$1
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  mkdir -p "$dir/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$dir/redis" \
    --appendonly yes --appendfsync always --save "" --loglevel warning \
    >> "$dir/redis.log" 2>&1 &
  record "$dir" REDIS_PID $!
  record "$dir" REDIS_URL "redis://127.0.0.1:$REDIS_PORT/0"
  python3 - "$REDIS_PORT" <<'PY'
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(7) == b"+PONG\r\n":
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("redis-server did not start")
    time.sleep(0.05)
PY
}

start_node() {
  dir=$1 n=$2
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  eval "port=\$NODE${n}_PORT"
  # shellcheck disable=SC2086
  "$SNAKEPOOL_BIN" serve --listen "127.0.0.1:$port" --workers 2 \
    --journal "$REDIS_URL" --node "node$n" --lease-ttl "$LEASE_TTL" \
    --python "$PYTHON" $NODE_ARGS >> "$dir/node$n.log" 2>&1 &
  record "$dir" "NODE${n}_PID" $!
  wait_ready "http://127.0.0.1:$port/health" "node$n"
}

up() {
  dir=$1
  mkdir -p "$dir"
  : > "$dir/cluster.env"
  sh "$root/scripts/services.sh"
  if [ -z "${SNAKEPOOL_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
    SNAKEPOOL_BIN="$root/target/release/snakepool"
  fi
  record "$dir" SNAKEPOOL_BIN "$SNAKEPOOL_BIN"
  record "$dir" PYTHON "${SNAKEPOOL_PYTHON:-$(sh "$root/scripts/python-env.sh")}"
  record "$dir" LEASE_TTL "${SNAKEPOOL_LEASE_TTL:-10s}"
  record "$dir" NODE_ARGS "${SNAKEPOOL_NODE_ARGS:-}"
  nodes=${SNAKEPOOL_NODES:-3}
  record "$dir" NODES "$nodes"

  record "$dir" REDIS_PORT "$(free_port)"
  start_redis "$dir"

  n=1
  while [ "$n" -le "$nodes" ]; do
    record "$dir" "NODE${n}_PORT" "$(free_port)"
    n=$((n + 1))
  done
  n=1
  while [ "$n" -le "$nodes" ]; do
    start_node "$dir" "$n"
    n=$((n + 1))
  done

  # The balancer: deploy/haproxy.cfg with these ports and nodes.
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  balancer_port=$(free_port)
  servers="" tracked=""
  n=1
  while [ "$n" -le "$nodes" ]; do
    eval "port=\$NODE${n}_PORT"
    servers="$servers    server node$n 127.0.0.1:$port\n"
    tracked="$tracked    server node$n 127.0.0.1:$port track sessions/node$n\n"
    n=$((n + 1))
  done
  awk -v bind="127.0.0.1:$balancer_port" -v servers="$servers" -v tracked="$tracked" '
    /^    bind / { print "    bind " bind; next }
    /^    server / { if (!done[section]++) printf "%s", (section == "plain" ? tracked : servers); next }
    /^backend / { section = $2 }
    { print }
  ' "$root/deploy/haproxy.cfg" > "$dir/haproxy.cfg"
  haproxy -f "$dir/haproxy.cfg" -db > "$dir/haproxy.log" 2>&1 &
  record "$dir" HAPROXY_PID $!
  record "$dir" BALANCER_URL "http://127.0.0.1:$balancer_port"
  wait_ready "http://127.0.0.1:$balancer_port/health" "haproxy"
}

down() {
  dir=$1
  [ -f "$dir/cluster.env" ] || return 0
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  for var in $(grep -o '^[A-Z0-9_]*_PID' "$dir/cluster.env"); do
    eval "pid=\$$var"
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}

case "${1:-}" in
  up) up "$2" ;;
  node) start_node "$2" "$3" ;;
  redis) start_redis "$2" ;;
  down) down "$2" ;;
  "")
    dir=$(mktemp -d)
    trap 'down "$dir"; rm -rf "$dir"' EXIT
    trap 'exit 0' INT TERM
    up "$dir"
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    echo "cluster ready: $NODES nodes behind $BALANCER_URL (Redis at $REDIS_URL)"
    echo "try: curl -s $BALANCER_URL/v1/call -H 'X-Session-Id: alice' -H 'content-type: application/json' -d '{\"command\": \"ping\"}'"
    echo "logs in $dir; Ctrl-C stops it"
    while :; do sleep 3600; done
    ;;
  *) echo "usage: $0 [up DIR | node DIR N | redis DIR | down DIR]" >&2; exit 2 ;;
esac
