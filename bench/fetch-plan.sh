#!/usr/bin/env bash
# bench/fetch-plan.sh — EXPLAIN ANALYZE of the candidate rows of one shard as
# the engine's fetch selects them (the `cand` CTE of engine/src/store/source.rs),
# on a fresh outbox of N events with nothing published, to show what each fetch
# reads. The in-progress branch is shown in both forms: a subquery over
# pg_snapshot_xip (up to commit c0b3713) and the bound array that replaced it
# (commit 4997526). Usage: bench/fetch-plan.sh [N] > out.txt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:-200000}"
D=bench_v2_fetchplan
PG="psql -X -h 127.0.0.1 -U postgres"
OUTBOX="${BENCH_OUTBOX:-$ROOT/target/release/outbox}"
$PG -qc "drop database if exists $D with (force)" -c "create database $D" >/dev/null 2>&1
DATABASE_URL="postgres://postgres@127.0.0.1:5432/$D" "$OUTBOX" migrate --partitions 16 >/dev/null
$PG -d $D -qc "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
    select 'order', (random() * 99999)::int::text, 'E', jsonb_build_object('seq', g, 'pad', repeat('x', 100))
    from generate_series(1, $N) g" -c "analyze outbox"
# A transaction id that wrote nothing here, as an in-progress writer elsewhere would be.
XIP="{$($PG -d $D -Atc "select pg_snapshot_xmax(pg_current_snapshot())::text")}"
echo "-- $N events in the outbox, 16 shards; shard 3 holds $($PG -d $D -Atc 'select count(*) from outbox where shard = 3') of them."
echo "-- Branch 1: txids between the two snapshots' xmax; branch 2: the txids lo saw in progress."
plan() {  # $1 title, $2 lo, $3 branch 2
    echo; echo "-- $1"
    $PG -d $D -c "explain (analyze, buffers, costs off)
    with w as (select $2::pg_snapshot as lo, pg_current_snapshot() as hi),
    cand as (
        select o.* from outbox o, w
         where o.shard = 3 and o.txid >= pg_snapshot_xmax(w.lo) and o.txid < pg_snapshot_xmax(w.hi)
        union all
        $3
    )
    select count(*) from cand" | grep -v 'outbox_r[1-7] \|outbox_r[1-7]_shard\|shared hit=2$\|Filter: ((shard = 3) AND\|Filter: (shard = 3)$'
}
OLD="select o.* from outbox o, w where o.shard = 3 and o.txid in (select pg_snapshot_xip(w.lo))"
new() { echo "select o.* from outbox o where cardinality('$1'::text[]) > 0 and o.shard = 3 and o.txid = any('$1'::text[]::xid8[])"; }
plan "before 4997526, first window (lo = '1:1:')" "'1:1:'" "$OLD"
plan "before 4997526, empty window (lo = hi = now): branch 2 still reads the whole shard" "pg_current_snapshot()" "$OLD"
plan "since 4997526, empty window, no transaction in progress: branch 2 skipped" "pg_current_snapshot()" "$(new '{}')"
plan "since 4997526, empty window, one unrelated transaction in progress ($XIP): an index lookup" "pg_current_snapshot()" "$(new "$XIP")"
$PG -qc "drop database $D with (force)" >/dev/null
