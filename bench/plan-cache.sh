#!/usr/bin/env bash
# bench/plan-cache.sh — planning vs execution time of the engine's fetch
# statement (copied from engine/src/store/source.rs at 54bf111) run as a
# prepared statement, as sqlx runs it, for an empty window on an outbox of N
# events: 8 executions with the default plan_cache_mode, then 3 with
# force_generic_plan. Seconds. Usage: bench/plan-cache.sh [N]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:-200000}"
D=bench_v2_plancache
PG="psql -X -h 127.0.0.1 -U postgres"
OUTBOX="${BENCH_OUTBOX:-$ROOT/target/release/outbox}"
$PG -qc "drop database if exists $D with (force)" -c "create database $D" >/dev/null 2>&1
DATABASE_URL="postgres://postgres@127.0.0.1:5432/$D" "$OUTBOX" migrate --partitions 16 >/dev/null
$PG -d $D -qc "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
    select 'order', (random() * 99999)::int::text, 'E', jsonb_build_object('seq', g, 'pad', repeat('x', 100))
    from generate_series(1, $N) g" -c "analyze outbox"
EXEC="explain (analyze, summary, costs off, timing off) execute f(3, 1, '00000000-0000-0000-0000-000000000001',
  pg_current_snapshot()::text, null, -9223372036854775808, '00000000-0000-0000-0000-000000000000', 2000, '{}');"
{
cat <<'SQL'
update outbox_leases set owner = 'x', incarnation = '00000000-0000-0000-0000-000000000001', epoch = 1,
       expires_at = now() + interval '1 hour';
prepare f(int, bigint, uuid, text, text, bigint, uuid, bigint, text[]) as
with lease as (
    select greatest(extract(epoch from expires_at - now()), 0)::float8 as left_s
      from outbox_leases where partition = $1 and epoch = $2 and incarnation = $3),
 w as (select $4::text::pg_snapshot as lo, coalesce($5::text::pg_snapshot, pg_current_snapshot()) as hi),
 cand as (
    select o.* from outbox o, w
     where o.shard = $1 and o.txid >= pg_snapshot_xmax(w.lo) and o.txid < pg_snapshot_xmax(w.hi)
    union all
    select o.* from outbox o
     where cardinality($9::text[]) > 0 and o.shard = $1 and o.txid = any($9::text[]::xid8[])),
 next as (
    select o.position, o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload, o.headers, o.topic,
           (extract(epoch from o.created_at) * 1000)::int8 as created_ms
      from cand o, w
     where exists (select 1 from lease) and pg_visible_in_snapshot(o.txid, w.hi)
       and not pg_visible_in_snapshot(o.txid, w.lo) and (o.position, o.id) > ($6, $7)
     order by o.position, o.id limit $8)
select (select left_s from lease), (select hi::text from w), next.* from (select 1) one left join next on true;
SQL
for _ in 1 2 3 4 5 6 7 8; do echo "$EXEC"; done
echo "select 'plans so far: generic ' || generic_plans || ', custom ' || custom_plans from pg_prepared_statements;"
echo "set plan_cache_mode = force_generic_plan;"
for _ in 1 2 3; do echo "$EXEC"; done
} | $PG -d $D -f - | grep -E 'Planning Time|Execution Time|plans so far|plan_cache|^SET' | paste -s -d' ' |
    sed -e 's/ *Planning/\nPlanning/g' -e 's/ *plans so far/\nplans so far/' -e 's/ *SET/\nSET plan_cache_mode = force_generic_plan/'
echo
$PG -qc "drop database $D with (force)" >/dev/null
