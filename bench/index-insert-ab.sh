#!/usr/bin/env bash
# bench/index-insert-ab.sh [rounds] — insert cost of the relay's index alone:
# the 50-row statement of insert-path (8 clients, 8 s a side, a checkpoint
# before each side, sides alternating) against one outbox whose only index is
# (shard, txid) on one side and (shard, txid, position, id) on the other.
# Prints statements/s per side and round. Needs PostgreSQL at 127.0.0.1:5432
# (BENCH_PG_HOST) and an outbox binary (BENCH_OUTBOX, default target/release).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${BENCH_PG_HOST:-127.0.0.1}"
OUTBOX="${BENCH_OUTBOX:-$ROOT/target/release/outbox}"
ROUNDS="${1:-4}"
db=bench_v2_index_ab
sql="$(mktemp)"
trap 'rm -f "$sql"' EXIT
cat >"$sql" <<'SQL'
insert into perf.outbox (aggregate_type, aggregate_id, event_type, payload)
select 'order', (random() * 99999)::int::text, 'OrderCreated', jsonb_build_object('seq', g, 'total', round((random() * 1000)::numeric, 2), 'customer', (random() * 1000000)::int, 'note', 'an order event padded to about one hundred and fifty bytes of json, as in the field notes')
from generate_series(1, 50) g;
SQL
psql -h "$HOST" -U postgres -qc "drop database if exists $db" -c "create database $db" 2>/dev/null
DATABASE_URL="postgres://postgres@$HOST:5432/$db" OUTBOX_SCHEMA=perf "$OUTBOX" migrate --partitions 16 >/dev/null
for round in $(seq 1 "$ROUNDS"); do
    if (( round % 2 )); then order="two four"; else order="four two"; fi
    for idx in $order; do
        psql -h "$HOST" -U postgres -d $db -q -c "truncate perf.outbox" \
            -c "drop index if exists perf.outbox_shard_txid_idx" \
            -c "drop index if exists perf.outbox_shard_txid_position_idx" 2>/dev/null
        if [[ $idx == two ]]; then
            psql -h "$HOST" -U postgres -d $db -qc "create index outbox_shard_txid_idx on perf.outbox (shard, txid)"
        else
            psql -h "$HOST" -U postgres -d $db -qc "create index outbox_shard_txid_position_idx on perf.outbox (shard, txid, position, id)"
        fi
        psql -h "$HOST" -U postgres -d $db -qc checkpoint
        tps=$(pgbench -h "$HOST" -U postgres -n -c 8 -T 8 -f "$sql" $db 2>&1 | awk '/^tps/ {print $3}')
        echo "round $round index $idx statements/s $tps load $(cut -d' ' -f1 /proc/loadavg)"
    done
done
psql -h "$HOST" -U postgres -qc "drop database if exists $db"
