#!/usr/bin/env python3
# bench/insert-cost.py <outbox binary> — run with the bench venv (.local/bench-venv/bin/python).
# Backend CPU and WAL per 50-row statement: plain table vs outbox variants,
# one connection, CPU from /proc/<backend pid>/stat (less load-sensitive than wall time).
import subprocess, psycopg2, os, sys
DB = "probe_schema"
def admin(sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc", sql], check=True)
admin(f"drop database if exists {DB}"); admin(f"create database {DB}")
subprocess.run([sys.argv[1], "migrate", "--partitions", "16"], check=True, stdout=subprocess.DEVNULL,
               env=dict(os.environ, DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{DB}"))
c = psycopg2.connect(host="127.0.0.1", user="postgres", dbname=DB); c.autocommit = True
cur = c.cursor()
cur.execute("""create table plain_outbox (id bigserial primary key, event_id uuid not null default gen_random_uuid(),
 aggregate_type text not null, aggregate_id text not null, event_type text not null, payload jsonb not null,
 headers jsonb, topic text, created_at timestamptz not null default now())""")
SEL = ("select 'order', (random() * 99999)::int::text, 'OrderCreated', jsonb_build_object('seq', g, 'total', "
       "round((random() * 1000)::numeric, 2), 'customer', (random() * 1000000)::int, 'note', 'an order event padded "
       "to about one hundred and fifty bytes of json, as in the field notes') from generate_series(1, 50) g")
cur.execute("select pg_backend_pid()"); pid = cur.fetchone()[0]
tck = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck
N = 2000
def run(name, table):
    cur.execute(f"truncate {table}"); cur.execute("checkpoint")
    stmt = f"insert into {table} (aggregate_type, aggregate_id, event_type, payload) {SEL}"
    for _ in range(100): cur.execute(stmt)
    cur.execute("select pg_current_wal_insert_lsn()"); l0 = cur.fetchone()[0]; c0 = cpu()
    for _ in range(N): cur.execute(stmt)
    c1 = cpu(); cur.execute(f"select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '{l0}')::bigint"); w = cur.fetchone()[0]
    print(f"{name:34s} backend CPU {1e6*(c1-c0)/N:7.0f} µs/statement  WAL {w//N:6d} B/statement", flush=True)
run("plain (bigserial pk)", "plain_outbox")
run("outbox, index (shard,txid,pos,id)", "outbox")
cur.execute("drop index outbox_shard_txid_position_idx"); cur.execute("create index outbox_shard_txid_idx on outbox (shard, txid)")
run("outbox, index (shard,txid)", "outbox")
cur.execute("drop index outbox_shard_txid_idx")
run("outbox, no index", "outbox")
cur.execute("alter table outbox drop constraint outbox_headers_object_of_strings, drop constraint outbox_payload_size, "
            "drop constraint outbox_aggregate_id_not_empty, drop constraint outbox_aggregate_type_not_empty")
run("outbox, no index, no checks", "outbox")
c.close(); admin(f"drop database if exists {DB}")
