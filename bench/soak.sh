#!/usr/bin/env bash
# bench/soak.sh — the outbox's size under a long steady load, with a
# transaction held open (idle, holding a transaction id) for a minute of it.
#
#   bench/soak.sh [SECONDS] [EVENTS_PER_SEC]     (default 600 s at 20,000/s)
#
# One engine node relays a fresh database `outbox_soak` (16 partitions,
# default ring) while loadgen writes 10 events per transaction; every 10 s
# it samples the outbox's size on disk, the unpublished count and the ring
# segments in use. From 1/3 of the run, a second session opens a
# transaction, writes one row elsewhere (so it holds a transaction id and
# the xmin horizon) and stays idle in it for 60 s. Writes
# bench-results/v2/soak.json and soak.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECS="${1:-600}"
RATE="${2:-20000}"
eval "$(deploy/services.sh up)"
ADMIN="${DATABASE_URL%/*}/postgres"
DB="${DATABASE_URL%/*}/outbox_soak"
OUT=bench-results/v2
mkdir -p "$OUT" .local
cargo build --release -q -p outbox-engine -p loadgen
psql -q "$ADMIN" -c "drop database if exists outbox_soak with (force)" -c "create database outbox_soak"
target/release/outbox --database-url "$DB" migrate --partitions 16 >/dev/null
psql -q "$DB" -c "create table soak_idle (id int)"
PREFIX="soak$(date +%s)."
RUST_LOG=warn target/release/outbox --database-url "$DB" \
    run --kafka-brokers "$KAFKA_BROKERS" --node-id soak --topic-prefix "$PREFIX" --http-addr off \
    2>.local/soak-engine.log &
ENGINE=$!
trap 'kill $ENGINE 2>/dev/null || true' EXIT
sleep 3
target/release/loadgen run --database-url "$DB" --kafka-brokers "$KAFKA_BROKERS" \
    --topic-prefix "$PREFIX" --rate "$RATE" --duration "$SECS" --events-per-tx 10 \
    --writers 8 --payload-bytes 150 --out .local/soak-loadgen >.local/soak-loadgen.log 2>&1 &
LOAD=$!
IDLE_AT=$((SECS / 3))
samples=()
start=$(date +%s)
idle_started=""
while kill -0 $LOAD 2>/dev/null; do
    now=$(( $(date +%s) - start ))
    if [[ -z "$idle_started" && $now -ge $IDLE_AT ]]; then
        idle_started=$now
        # Idle in transaction for 60 s, holding a transaction id.
        ( printf 'begin;\ninsert into soak_idle values (1);\n\\! sleep 60\ncommit;\n' | psql -q "$DB" ) &
    fi
    row=$(psql -tA -F' ' "$DB" -c "
        select coalesce(sum(pg_total_relation_size(i.inhrelid)), 0),
               (select count(*) from outbox_pending),
               (select count(*) from pg_inherits i2 join pg_class c on c.oid = i2.inhrelid
                 where i2.inhparent = 'outbox'::regclass and c.relpages > 0),
               (select coalesce(sum(published), 0) from outbox_leases),
               (select count(*) from pg_stat_activity where state = 'idle in transaction')
          from pg_inherits i where i.inhparent = 'outbox'::regclass")
    samples+=("[$now, ${row// /, }]")
    echo "t=${now}s bytes pending segments published idle_tx: $row" >&2
    sleep 10
done
wait $LOAD || true
kill $ENGINE 2>/dev/null || true
wait $ENGINE 2>/dev/null || true
trap - EXIT
json=$(IFS=,; echo "${samples[*]}")
cat >"$OUT/soak.json" <<JSON
{"seconds": $SECS, "events_per_sec": $RATE, "events_per_tx": 10, "partitions": 16,
 "idle_transaction": {"from_s": $IDLE_AT, "for_s": 60},
 "columns": ["t_s", "outbox_bytes", "pending", "segments_with_pages", "published_total", "idle_in_transaction_sessions"],
 "samples": [$json],
 "machine": "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(psql -tA "$DB" -c 'show server_version'), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)"}
JSON
python3 - "$OUT/soak.json" >"$OUT/soak.md" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["samples"]
mb = [r[1] / 2**20 for r in rows]
print(f"# Soak: outbox size under steady load\n\n{d['machine']}\n")
print(f"{d['events_per_sec']} events/s for {d['seconds']} s ({d['events_per_tx']} per transaction, {d['partitions']} partitions), "
      f"an idle transaction holding an xid from {d['idle_transaction']['from_s']} s for 60 s.\n")
print(f"Outbox on disk: max {max(mb):.1f} MiB, last {mb[-1]:.1f} MiB; published {rows[-1][4]:,} events.\n")
print("| t (s) | outbox MiB | pending | segments with pages | idle tx |\n|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]/2**20:.1f} | {r[2]} | {r[3]} | {r[5]} |")
PY
cat "$OUT/soak.md"
