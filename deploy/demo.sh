#!/usr/bin/env bash
# The main job, from a fresh machine: services up (deploy/services.sh), the
# engine built, a fresh outbox with 16 partitions, a local cluster of
# NODES engine nodes, a short load through it with end-to-end verification,
# then a summary (loadgen's report and `outbox status`).
#
#   deploy/demo.sh                  # 2 nodes, 15 s at 5,000 events/s
#   NODES=3 RATE=20000 DURATION=30 deploy/demo.sh
#   SOURCE=cdc deploy/demo.sh       # the same through the CDC source: the demo
#                                   # database on the wal_level=logical cluster
#                                   # (CDC_DATABASE_URL), `migrate --cdc`, the
#                                   # nodes run with OUTBOX_SOURCE=cdc
#
# The report lands in bench-results/demo-latest/ (not committed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NODES=${NODES:-2}
RATE=${RATE:-5000}
DURATION=${DURATION:-15}
EVENTS_PER_TX=${EVENTS_PER_TX:-10}
PARTITIONS=${PARTITIONS:-16}
DEMO_DB=${DEMO_DB:-outbox_demo}
SOURCE=${SOURCE:-poll}
[[ $SOURCE == poll || $SOURCE == cdc ]] || { echo "demo.sh: SOURCE must be poll or cdc, not $SOURCE" >&2; exit 2; }

eval "$(deploy/services.sh up)"
if [[ $SOURCE == cdc ]]; then
  [[ -n ${CDC_DATABASE_URL:-} ]] || { echo "demo.sh: no CDC_DATABASE_URL (services.sh started without the logical cluster?)" >&2; exit 1; }
  # Everything on the logical cluster; a slot of the demo's own (slots are
  # per cluster, and one holds its database: it goes before the drop below).
  export DATABASE_URL=$CDC_DATABASE_URL OUTBOX_SOURCE=cdc
  export OUTBOX_CDC__SLOT=${OUTBOX_CDC__SLOT:-${DEMO_DB}_slot}
fi

echo "== building (release)" >&2
cargo build --release -p outbox-engine -p loadgen >&2

# A database of the demo's own on the same server, created afresh.
base=${DATABASE_URL%%\?*}
query=""
[[ $DATABASE_URL == *\?* ]] && query="?${DATABASE_URL#*\?}"
admin_url=$DATABASE_URL
export DATABASE_URL="${base%/*}/${DEMO_DB}${query}"
if [[ $SOURCE == cdc ]]; then
  psql "$admin_url" -qAt >/dev/null -c "select pg_terminate_backend(active_pid) from pg_replication_slots
      where database = '${DEMO_DB}' and active_pid is not null" -c "select pg_sleep(0.5)" \
    -c "select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = '${DEMO_DB}'"
fi
psql "$admin_url" -qc "drop database if exists ${DEMO_DB} with (force)" -c "create database ${DEMO_DB}" >&2

migrate_flags=()
[[ $SOURCE == cdc ]] && migrate_flags=(--cdc)
target/release/outbox migrate --partitions "$PARTITIONS" "${migrate_flags[@]}"

prefix="demo$(date +%s)."
# shellcheck disable=SC2317  # called by the trap
cleanup() { deploy/cluster.sh stop || true; }
trap cleanup EXIT
deploy/cluster.sh start --nodes "$NODES" --release -- --topic-prefix "$prefix"
sleep 3
target/release/outbox status

echo "== load: ${RATE} events/s for ${DURATION} s, ${EVENTS_PER_TX} events per transaction, ${NODES} nodes, source ${SOURCE}" >&2
status=0
target/release/loadgen run --rate "$RATE" --duration "$DURATION" --writers 4 \
  --events-per-tx "$EVENTS_PER_TX" --topic-prefix "$prefix" \
  --out bench-results/demo-latest || status=$?

# loadgen printed its summary (also in bench-results/demo-latest/summary.md).
echo "== after the load" >&2
target/release/outbox status
exit "$status"
