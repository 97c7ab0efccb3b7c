#!/usr/bin/env bash
# Runs a local engine cluster of N `outbox run` nodes in the background,
# each with its log in .local/cluster/<node>.log.
#
#   deploy/cluster.sh start --nodes 3 [--release] [-- extra `outbox run` flags]
#   deploy/cluster.sh stop       # SIGTERM every node, wait for them to drain
#   deploy/cluster.sh status     # which nodes run, then `outbox status`
#
# Node i serves /metrics, /healthz, /readyz on 127.0.0.1:$((9190 + i)) (set
# HTTP_BASE_PORT to move them). Uses DATABASE_URL and KAFKA_BROKERS from the environment (see
# deploy/services.sh); the schema must be migrated first.
#
# This is a person's (and demo.sh's) way to keep nodes running between
# commands. Programs start nodes through the test harness's launcher
# (tests/src/node.rs: the integration tests, loadgen drain and suite), whose
# nodes end with the program that started them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.local/cluster"
mkdir -p "$DIR"

die() { echo "cluster.sh: $*" >&2; exit 1; }
HTTP_BASE_PORT=${HTTP_BASE_PORT:-9190}

binary() {
  local profile=$1
  local bin="$ROOT/target/$profile/outbox"
  if [[ ! -x $bin ]]; then
    local flag=()
    [[ $profile == release ]] && flag=(--release)
    echo "cluster.sh: building outbox ($profile)" >&2
    (cd "$ROOT" && cargo build "${flag[@]}" -p outbox-engine --bin outbox) >&2
  fi
  echo "$bin"
}

start() {
  local nodes=1 profile=debug extra=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
      --release) profile=release; shift ;;
      --) shift; extra=("$@"); break ;;
      *) die "unknown option $1 (see the header of this script)" ;;
    esac
  done
  [[ $nodes =~ ^[0-9]+$ && $nodes -ge 1 ]] || die "--nodes must be a positive number"
  [[ -n ${DATABASE_URL:-} ]] || die "DATABASE_URL is not set (eval \"\$(deploy/services.sh up)\")"
  [[ -n ${KAFKA_BROKERS:-} ]] || die "KAFKA_BROKERS is not set (eval \"\$(deploy/services.sh up)\")"
  local bin
  bin=$(binary "$profile")
  for i in $(seq 1 "$nodes"); do
    local id="node-$i" pidfile="$DIR/node-$i.pid"
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "cluster.sh: $id already running (pid $(cat "$pidfile"))" >&2
      continue
    fi
    # Each node's operations endpoint on its own port: 9191, 9192... unless
    # OUTBOX_HTTP_ADDR or --http-addr says otherwise.
    OUTBOX_HTTP_ADDR=${OUTBOX_HTTP_ADDR:-127.0.0.1:$((HTTP_BASE_PORT + i))} \
      nohup "$bin" run --node-id "$id" "${extra[@]}" >"$DIR/$id.log" 2>&1 &
    echo $! >"$pidfile"
    echo "cluster.sh: started $id (pid $!, log $DIR/$id.log)" >&2
  done
  sleep 1
  for i in $(seq 1 "$nodes"); do
    if ! kill -0 "$(cat "$DIR/node-$i.pid")" 2>/dev/null; then
      tail -5 "$DIR/node-$i.log" >&2
      die "node-$i exited at start; see $DIR/node-$i.log"
    fi
  done
}

stop() {
  local pids=()
  for pidfile in "$DIR"/*.pid; do
    [[ -f $pidfile ]] || continue
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      pids+=("$pid")
    fi
    rm -f "$pidfile"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 600); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && { echo "cluster.sh: pid $pid did not stop; killing" >&2; kill -KILL "$pid"; }
  done
  echo "cluster.sh: stopped ${#pids[@]} node(s)" >&2
}

status() {
  for pidfile in "$DIR"/*.pid; do
    [[ -f $pidfile ]] || continue
    local name
    name=$(basename "$pidfile" .pid)
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "$name running"; else echo "$name dead"; fi
  done
  "$(binary debug)" status
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: cluster.sh start --nodes N [--release] [-- flags] | stop | status" ;;
esac
