#!/usr/bin/env python3
"""Polling v2 measurements for issue 10. Run through `bench/run.sh NAME`.

Each measurement writes bench-results/v2/<name>.json and <name>.md and
regenerates bench-results/v2/README.md (the targets table) from every JSON
present. Measurements: insert-path, app-overhead, e2e-50 (engine and the
Python relay side by side), python-baseline (the Python relay alone),
latency-5k, drain-5m, scale-out; `all` runs them in that order in one run.
`--quick` shrinks every run to seconds, for checking the scripts.
"""
import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
LOCAL = os.path.join(ROOT, ".local")
PY = sys.executable
PG_SERVER = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
TANSU_PORT = int(os.environ.get("BENCH_TANSU_PORT", "19092"))
BROKERS = f"127.0.0.1:{TANSU_PORT}"
CG_ROOT = "/sys/fs/cgroup/cpu"
CG_PREFIX = "outbox-bench"
TOPIC_PARTITIONS = 8
PARTITIONS = 16
CLIENTS = 8

# The 50-event statement: random aggregates (100,000 ids, so every statement
# touches all 16 shards), ~150 B JSON payloads built server-side.
PAYLOAD = ("jsonb_build_object('seq', g, 'total', round((random() * 1000)::numeric, 2), "
           "'customer', (random() * 1000000)::int, "
           "'note', 'an order event padded to about one hundred and fifty bytes of json, as in the field notes')")
STMT_50 = ("insert into {table} (aggregate_type, aggregate_id, event_type, payload)\n"
           "select 'order', (random() * 99999)::int::text, 'OrderCreated', " + PAYLOAD + "\n"
           "from generate_series(1, 50) g;\n")
# One business row and one event per transaction.
APP_TX = """\\set cid random(1, 100000)
begin;
insert into orders (customer_id, status, total) values (:cid, 'created', 10.5);
insert into outbox (aggregate_type, aggregate_id, event_type, payload)
values ('order', :cid, 'OrderCreated', jsonb_build_object('customer', :cid::int, 'total', 10.5,
        'note', 'an order event padded to about one hundred and fifty bytes of json, as in the field notes'));
commit;
"""
PLAIN_TABLE = """create table plain_outbox (
    id bigserial primary key,
    event_id uuid not null default gen_random_uuid(),
    aggregate_type text not null,
    aggregate_id text not null,
    event_type text not null,
    payload jsonb not null,
    headers jsonb,
    topic text,
    created_at timestamptz not null default now())"""
ORDERS_TABLE = """create table if not exists orders (
    id bigserial primary key, customer_id bigint not null, status text not null,
    total numeric not null, created_at timestamptz not null default now())"""

FULL = dict(insert_rounds=6, insert_secs=5, app_rounds=4, app_secs=8, e2e_rounds=3, e2e_secs=15,
            lat_secs=30, lat_rate=5000, lat_events_per_tx=10, drain_events=5_000_000, drain_timeout=360,
            scale_events=1_000_000, scale_quota_us=25000, scale_nodes="1,2,4")
QUICK = dict(insert_rounds=2, insert_secs=2, app_rounds=1, app_secs=2, e2e_rounds=1, e2e_secs=3,
             lat_secs=5, lat_rate=5000, lat_events_per_tx=10, drain_events=200_000, drain_timeout=120,
             scale_events=100_000, scale_quota_us=25000, scale_nodes="1,2,4")

TARGETS = {
    "insert-path": ("outbox insert rate / plain table's, 50-row statements, no relay", ">=", 0.9, "ratio"),
    "app-overhead": ("commit rate with the engine relaying / without, 1 event/tx", ">=", 0.9, "ratio"),
    "e2e-50": ("end to end, 50 events/statement, 16 partitions, 1 node", ">=", 100_000, "events/s"),
    "e2e-50-vs-python": ("end to end, engine / Python relay (if short of 100K)", ">=", 1.5, "ratio"),
    "latency-5k": ("p99 commit → consumer receipt at 5,000 events/s", "<=", 50, "ms"),
    "drain-5m": ("drain of a backlog by the engine alone", ">=", 250_000, "events/s"),
    "scale-out-2": ("drain throughput, 2 nodes / 1 node, each capped", ">=", 1.8, "ratio"),
    "scale-out-4": ("drain throughput, 4 nodes / 1 node, each capped", ">=", 3.0, "ratio"),
}


def log(*a):
    print(f"[bench {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def now_utc():
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True,
                          text=True, **kw).stdout.strip()


def db_url(db):
    return f"{PG_SERVER}/{db}"


def connect(db):
    c = psycopg2.connect(db_url(db))
    c.autocommit = True
    return c


def q(db_or_conn, sql, args=None):
    conn = connect(db_or_conn) if isinstance(db_or_conn, str) else db_or_conn
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None
    finally:
        if isinstance(db_or_conn, str):
            conn.close()


def recreate_db(db):
    assert db.startswith("bench_v2"), db
    q("postgres", f"drop database if exists {db} with (force)")
    q("postgres", f"create database {db}")


def drop_db(db):
    assert db.startswith("bench_v2"), db
    q("postgres", f"drop database if exists {db} with (force)")


# ------------------------------------------------------------- binaries --

class Bins:
    """Copies of the release binaries taken when the run starts, so another
    engineer's build in the shared target dir cannot swap them mid-run."""

    def __init__(self):
        self.dir = os.path.join(LOCAL, "bench-bin")
        os.makedirs(self.dir, exist_ok=True)
        self.info = {}
        for name in ("outbox", "loadgen"):
            src = os.path.join(os.environ.get("BENCH_BIN_DIR", os.path.join(ROOT, "target", "release")), name)
            dst = os.path.join(self.dir, name)
            shutil.copy2(src, dst)
            with open(dst, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:16]
            self.info[name] = {"built": dt.datetime.fromtimestamp(os.path.getmtime(src), dt.timezone.utc)
                               .strftime("%Y-%m-%d %H:%M:%S UTC"), "sha256_16": digest}
        self.outbox = os.path.join(self.dir, "outbox")
        self.loadgen = os.path.join(self.dir, "loadgen")
        self.info["outbox"]["version"] = sh([self.outbox, "--version"])
        self.info["source"] = os.path.dirname(src)
        commit_file = os.path.join(LOCAL, "bench-src", "COMMIT")
        if "bench-head" in src and os.path.exists(commit_file):
            self.info["built_from_commit"] = open(commit_file).read().strip()

    def migrate(self, db, partitions=PARTITIONS):
        env = dict(os.environ, DATABASE_URL=db_url(db))
        env.pop("OUTBOX_SCHEMA", None)
        sh([self.outbox, "migrate", "--partitions", str(partitions)], env=env)


# ----------------------------------------------------------------- machine --

def machine(bins):
    def read(path):
        try:
            return open(path).read()
        except OSError:
            return ""
    mem = re.search(r"MemTotal:\s+(\d+) kB", read("/proc/meminfo"))
    cpu = re.search(r"model name\s*:\s*(.*)", read("/proc/cpuinfo"))
    settings = {r[0]: f"{r[1]}{r[2] or ''}" for r in q("postgres", """
        select name, setting, unit from pg_settings where name in (
          'shared_buffers','synchronous_commit','fsync','full_page_writes','wal_level',
          'max_wal_size','checkpoint_timeout','autovacuum','max_connections','work_mem',
          'wal_buffers','commit_delay','jit','wal_compression','huge_pages') order by name""")}

    def git(*a):
        try:
            return sh(["git", "-C", ROOT, *a])
        except subprocess.CalledProcessError:
            return ""
    dirty = git("status", "--porcelain", "--", "engine", "loadgen", "Cargo.lock")
    diff = git("diff", "HEAD", "--", "engine", "loadgen", "Cargo.lock")
    return {
        "date": now_utc(),
        "nproc": int(sh("nproc")),
        "memory_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "cpu": cpu.group(1).strip() if cpu else None,
        "kernel": sh("uname -r"),
        "loadavg_at_start": read("/proc/loadavg").split()[:3],
        "postgresql": q("postgres", "select version()")[0][0],
        "postgresql_settings": settings,
        "tansu": sh("tansu --version"),
        "broker": f"private tansu on {BROKERS}, memory storage, restarted before each measurement",
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_engine_loadgen": dirty.splitlines(),
        "git_diff_engine_loadgen_sha256_16": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
        "rustc": sh("rustc --version"),
        "binaries": bins.info,
        "python": sys.version.split()[0],
        "confluent_kafka": __import__("confluent_kafka").version()[0],
        "librdkafka_python": __import__("confluent_kafka").libversion()[0],
    }


# ------------------------------------------------------------- cpu sampler --

CLK = os.sysconf("SC_CLK_TCK")


def classify(pid):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if not cmd:
        return "kernel"
    exe = os.path.basename(cmd.split(" ", 1)[0])
    if exe.startswith("postgres") or cmd.startswith("postgres:"):
        return "postgres"
    for name in ("outbox", "tansu", "pgbench", "loadgen"):
        if exe == name:
            return name
    if "python_relay.py" in cmd:
        return "python-relay"
    if "count_consumer.py" in cmd:
        return "consumer"
    if "bench.py" in cmd:
        return "harness"
    if exe in ("cc1", "rustc", "cargo", "ld", "cc") or "cargo" in exe or "rustc" in cmd[:200]:
        return "builds"
    return "other"


class CpuSampler:
    """CPU seconds per kind of process (postgres, outbox, tansu, pgbench,
    loadgen, the Python relay, the consumer, anything else) between marks,
    from /proc/<pid>/stat sampled twice a second."""

    def __init__(self):
        self.ticks = {}    # (pid, starttime) -> (group, ticks), kept after exit
        self.groups = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _sample(self):
        with self.lock:
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                try:
                    s = open(f"/proc/{d}/stat").read()
                except OSError:
                    continue
                f = s[s.rfind(")") + 2:].split()
                key = (int(d), int(f[19]))
                ticks = int(f[11]) + int(f[12])
                g = self.groups.get(key)
                if g is None or g == "other":   # re-read after an exec (bench/cg-outbox.sh)
                    g = classify(d) or "other"
                    self.groups[key] = g
                self.ticks[key] = (g, ticks)

    def _loop(self):
        while not self.stop.wait(0.5):
            self._sample()

    def mark(self):
        self._sample()
        with self.lock:
            return (time.monotonic(), dict(self.ticks))

    @staticmethod
    def between(a, b):
        (t0, m0), (t1, m1) = a, b
        out = {}
        for key, (g, ticks) in m1.items():
            d = ticks - (m0[key][1] if key in m0 else 0)
            if d > 0:
                out[g] = out.get(g, 0) + d / CLK
        wall = t1 - t0
        ncpu = os.cpu_count() or 1
        return {"wall_secs": round(wall, 2), "cpu_secs": {g: round(v, 2) for g, v in
                sorted(out.items(), key=lambda kv: -kv[1])},
                "share_of_machine": {g: round(v / (wall * ncpu), 3) for g, v in
                                     sorted(out.items(), key=lambda kv: -kv[1])}}


class Activity:
    """Samples pg_stat_activity of one database every 100 ms while a load
    runs: how many backends of each client were active, and on what
    (wait event, statement), as a cheap database-side profile."""

    SQL = """select coalesce(nullif(application_name, ''), backend_type, '?'), state,
                    coalesce(wait_event_type, 'CPU') || ':' || coalesce(wait_event, '-'),
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 60)
               from pg_stat_activity
              where datname = current_database() and pid <> pg_backend_pid()"""

    STAT = """select xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, blks_hit, blks_read
                from pg_stat_database where datname = current_database()"""
    STAT_NAMES = ("xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted", "blks_hit",
                  "blks_read")

    def __init__(self, db):
        self.db = db
        self.t0 = time.monotonic()
        self.stat0 = q(db, self.STAT)[0]
        self.samples = 0
        self.counts = {}
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        conn = connect(self.db)
        while not self.stop_ev.is_set():
            try:
                rows = q(conn, self.SQL)
            except psycopg2.Error:
                break
            self.samples += 1
            for app, state, wait, query in rows:
                if state == "active":
                    app = re.sub(r"/.*", "", app)
                    key = (app, wait, query)
                    self.counts[key] = self.counts.get(key, 0) + 1
            self.stop_ev.wait(0.1)
        conn.close()

    def stop(self):
        self.stop_ev.set()
        self.t.join()
        time.sleep(0.6)  # statistics are flushed by backends at most every 500 ms
        wall = time.monotonic() - self.t0
        stat1 = q(self.db, self.STAT)[0]
        per_sec = {k: round((b - a) / wall) for k, a, b in zip(self.STAT_NAMES, self.stat0, stat1)}
        n = max(self.samples, 1)
        per_app = {}
        for (app, _, _), c in self.counts.items():
            per_app[app] = per_app.get(app, 0) + c / n
        top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:10]
        return {"samples": self.samples, "pg_stat_database_per_sec": per_sec,
                "active_backends_avg": {a: round(v, 2) for a, v in sorted(per_app.items(), key=lambda kv: -kv[1])},
                "top": [{"client": a, "wait": w, "query": qq, "active_avg": round(c / n, 2)}
                        for (a, w, qq), c in top]}


def activity_md(act):
    if not act:
        return ""
    rows = ["| client | wait (CPU = running) | statement | active backends (avg) |", "|---|---|---|---|"]
    for t in act["top"][:8]:
        rows.append(f"| {t['client']} | {t['wait']} | `{t['query'].replace('|', '/')}` | {t['active_avg']:.2f} |")
    avg = ", ".join(f"{a} {v:.2f}" for a, v in act["active_backends_avg"].items())
    st = act.get("pg_stat_database_per_sec", {})
    stat = ("; `pg_stat_database` per second: " + ", ".join(f"{k} {v:,}" for k, v in st.items())) if st else ""
    return (f"Active backends in pg_stat_activity ({act['samples']} samples, every 100 ms), on average: {avg}{stat}."
            "\n\n" + "\n".join(rows))


# ----------------------------------------------------------------- broker --

class Tansu:
    def __init__(self):
        self.proc = None
        self.logpath = os.path.join(LOCAL, "bench-tansu.log")

    def start(self):
        self.stop()
        if port_open(TANSU_PORT):
            raise SystemExit(f"something else listens on {BROKERS}; set BENCH_TANSU_PORT")
        url = f"tcp://{BROKERS}"
        self.proc = subprocess.Popen(["tansu", "broker", "--listener-url", url, "--advertised-listener-url",
                                      url, "--storage-engine", "memory://tansu/"],
                                     stdout=open(self.logpath, "a"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        for _ in range(100):
            if port_open(TANSU_PORT):
                return
            time.sleep(0.1)
        raise SystemExit(f"tansu did not come up on {BROKERS}; see {self.logpath}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        for _ in range(50):
            if not port_open(TANSU_PORT):
                break
            time.sleep(0.1)

    def restart(self):
        self.stop()
        self.start()


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def create_topic(topic, partitions=TOPIC_PARTITIONS):
    from confluent_kafka.admin import AdminClient, NewTopic
    a = AdminClient({"bootstrap.servers": BROKERS})
    for f in a.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result(15)
    for _ in range(50):   # metadata visible
        md = a.list_topics(topic, timeout=5)
        if topic in md.topics and len(md.topics[topic].partitions) == partitions:
            return
        time.sleep(0.1)


# ----------------------------------------------------------------- engine --

class EngineNode:
    def __init__(self, bins, db, node_id, prefix, extra=(), logdir=None):
        env = dict(os.environ, DATABASE_URL=db_url(db), KAFKA_BROKERS=BROKERS, RUST_LOG="warn")
        for k in ("OUTBOX_CONFIG", "OUTBOX_TOPIC_PREFIX", "OUTBOX_NODE_ID", "OUTBOX_HTTP_ADDR", "OUTBOX_SCHEMA"):
            env.pop(k, None)
        logdir = logdir or os.path.join(LOCAL, "bench-logs")
        os.makedirs(logdir, exist_ok=True)
        self.log = os.path.join(logdir, f"{node_id}.log")
        self.proc = subprocess.Popen(
            [bins.outbox, "run", "--node-id", node_id, "--http-addr", "off", "--topic-prefix", prefix,
             "--topic-partitions", str(TOPIC_PARTITIONS), *extra],
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def check(self):
        if self.proc.poll() is not None:
            raise SystemExit(f"engine exited with {self.proc.returncode}; see {self.log}:\n"
                             + "".join(open(self.log).readlines()[-20:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_leased(conn, node, partitions=PARTITIONS, timeout=60):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        node.check()
        n = q(conn, "select count(*) from outbox_leases where owner is not null and expires_at > now()")[0][0]
        if n == partitions:
            return time.monotonic() - t
        time.sleep(0.05)
    raise SystemExit(f"engine did not lease {partitions} partitions in {timeout} s")


def wait_published(conn, target, node=None, timeout=300, poll=0.05):
    """Waits until sum(outbox_leases.published) >= target; returns monotonic time."""
    t = time.monotonic()
    while True:
        p = q(conn, "select coalesce(sum(published), 0)::bigint from outbox_leases")[0][0]
        if p >= target:
            return time.monotonic(), p
        if node:
            node.check()
        if time.monotonic() - t > timeout:
            raise SystemExit(f"published {p} of {target} after {timeout} s")
        time.sleep(poll)


def pending_empty(conn):
    return not q(conn, "select exists(select 1 from outbox_pending)")[0][0]


def wait_pending_empty(conn, timeout=120, node=None):
    t = time.monotonic()
    while not pending_empty(conn):
        if node:
            node.check()
        if time.monotonic() - t > timeout:
            raise SystemExit(f"outbox_pending not empty after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t


# ---------------------------------------------------------------- pgbench --

def pgbench(db, script, secs, clients=CLIENTS, tag="x"):
    path = os.path.join(LOCAL, f"bench-{tag}.sql")
    with open(path, "w") as f:
        f.write(script)
    out = subprocess.run(["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", "2",
                          "-T", str(secs), "-f", path, "-h", "127.0.0.1", "-U", "postgres", db],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    tx = int(re.search(r"number of transactions actually processed: (\d+)", out.stdout).group(1))
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout).group(1))
    lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    return {"transactions": tx, "tps": tps, "latency_avg_ms": float(lat.group(1)) if lat else None,
            "failed": int(failed.group(1)) if failed else 0}


# ---------------------------------------------------------------- results --

class Ctx:
    def __init__(self, args):
        self.args = args
        self.p = dict(QUICK if args.quick else FULL)
        for kv in args.set or []:
            k, v = kv.split("=", 1)
            self.p[k] = type(self.p[k])(v) if k in self.p else v
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.bins = Bins()
        self.machine = machine(self.bins)
        self.cpu = CpuSampler()
        self.tansu = Tansu()
        self.run_id = uuid.uuid4().hex[:8]

    def write(self, name, result, md_body):
        result = dict(name=name, quick=self.args.quick, run_id=self.run_id, finished_at=now_utc(),
                      rerun=f"bench/run.sh {name}", machine=self.machine, params=self.p, **result)
        with open(os.path.join(self.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        md = [f"# {name}{' (quick: a tooling check, not a measurement)' if self.args.quick else ''}", "",
              f"Run `{result['rerun']}` (`bench/run.sh all` runs every measurement in one session). "
              f"Finished {result['finished_at']}, run {self.run_id}.", "", md_body, "",
              machine_md(self.machine)]
        with open(os.path.join(self.out, f"{name}.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        write_readme(self.out)
        log(f"wrote {self.out}/{name}.json and .md")


def verdict(key, value):
    desc, op, target, unit = TARGETS[key]
    tgt = f"{op.replace('>=', '≥').replace('<=', '≤')} {fmt(target, unit)}"
    if value is None:
        return {"description": desc, "target": tgt, "met": False, "gap": "not measured"}
    met = value >= target if op == ">=" else value <= target
    diff = value - target
    if unit == "ms":
        gap = f"{'over' if diff > 0 else 'under'} by {abs(diff):.1f} ms ({100 * diff / target:+.0f} %)"
    elif unit == "events/s":
        gap = f"{'past' if diff >= 0 else 'short'} by {abs(diff):,.0f} events/s ({100 * diff / target:+.1f} %)"
    else:
        gap = f"{'past' if diff >= 0 else 'short'} by {abs(diff):.2f} ({100 * diff / target:+.1f} %)"
    return {"description": desc, "target": tgt, "value": value, "unit": unit, "met": met,
            "gap_pct": round(100 * diff / target, 1), "gap": gap}


def fmt(v, unit):
    if v is None:
        return "–"
    if unit == "events/s":
        return f"{v:,.0f} events/s"
    if unit == "ratio":
        return f"{v:.2f}×" if v >= 1.5 else f"{v:.2f}"
    if unit == "ms":
        return f"{v:.1f} ms"
    return f"{v:.2f}"


def cpu_md(cpu):
    rows = ["| process | CPU s | share of the machine |", "|---|---|---|"]
    for g, v in cpu["cpu_secs"].items():
        rows.append(f"| {g} | {v:.1f} | {100 * cpu['share_of_machine'][g]:.0f} % |")
    return (f"CPU over {cpu['wall_secs']:.0f} s of wall time ({os.cpu_count()} cores, "
            f"from /proc/<pid>/stat):\n\n" + "\n".join(rows))


def machine_md(m):
    s = m["postgresql_settings"]
    return "\n".join([
        "## Machine", "",
        "| | |", "|---|---|",
        f"| date | {m['date']} |",
        f"| cores (`nproc`) | {m['nproc']} ({m['cpu']}) |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| kernel | {m['kernel']} |",
        f"| load average at start | {' '.join(m['loadavg_at_start'])} |",
        f"| PostgreSQL | {m['postgresql'].split(' on ')[0]} |",
        "| settings | " + ", ".join(f"{k}={v}" for k, v in s.items()) + " |",
        f"| broker | {m['tansu']}; {m['broker']} |",
        f"| git commit | {m['git_commit']} |",
        f"| uncommitted changes in engine/, loadgen/ when run | "
        f"{'; '.join(m['git_dirty_engine_loadgen']) or 'none'} |",
        f"| outbox binary | {m['binaries']['outbox']['version']}, built {m['binaries']['outbox']['built']}, "
        f"sha256 {m['binaries']['outbox']['sha256_16']}…, from {m['binaries'].get('source', '?')}"
        + (f" (clean build of commit {m['binaries']['built_from_commit'][:7]})"
           if m['binaries'].get('built_from_commit') else "") + " |",
        f"| rustc | {m['rustc']} |",
        f"| Python relay | Python {m['python']}, confluent-kafka {m['confluent_kafka']} "
        f"(librdkafka {m['librdkafka_python']}), psycopg2 |",
    ])


def write_readme(out):
    rows, machine_txt, quick = [], "", False
    order = ["insert-path", "app-overhead", "e2e-50", "e2e-50-vs-python", "latency-5k", "drain-5m",
             "scale-out-2", "scale-out-4"]
    results = {}
    for name in ("insert-path", "app-overhead", "e2e-50", "python-baseline", "latency-5k", "drain-5m",
                 "scale-out"):
        p = os.path.join(out, f"{name}.json")
        if os.path.exists(p):
            r = json.load(open(p))
            results[name] = r
            quick = quick or r.get("quick")
            for key, v in r.get("verdicts", {}).items():
                v = verdict(key, v.get("value"))
                v["source"] = name
                v["run_id"] = r["run_id"]
                v["finished_at"] = r["finished_at"]
                v["note"] = r.get("verdict_notes", {}).get(key, "")
                rows.append((order.index(key) if key in order else 99, key, v))
            machine_txt = machine_md(r["machine"])
    rows.sort()
    # The same measurements with earlier binaries, run back to back with
    # these (bench/run.sh <name> --out <this dir>/before with BENCH_BIN_DIR).
    before = {}
    bdir = os.path.join(out, "before")
    for name in set(v["source"] for _, _, v in rows):
        p = os.path.join(bdir, f"{name}.json")
        if os.path.exists(p):
            for key, v in json.load(open(p)).get("verdicts", {}).items():
                before[key] = v.get("value")
    lines = ["# Polling v2 benchmarks (issue 10)", "",
             "Generated by `bench/run.sh` from the JSON files in this directory. "
             "Rerun everything in one session with `bench/run.sh all` (about 15 minutes on 2 cores), or one "
             "measurement with `bench/run.sh <name>`; `--quick` checks the scripts in seconds.", ""]
    if quick:
        lines += ["**Some results below come from `--quick` runs: tooling checks, not measurements.**", ""]
    head = "| target | measured |" + (" before ([before/](before/README.md)) |" if before else "")
    lines += [head + " target | status | gap | run | note |",
              "|---|---|" + ("---|" if before else "") + "---|---|---|---|---|"]
    for _, key, v in rows:
        status = "met" if v["met"] else "missed"
        gap = v.get("gap", "")
        was = f" {fmt(before[key], v.get('unit'))} |" if key in before else (" |" if before else "")
        lines.append(f"| {v.get('description', key)} | {fmt(v.get('value'), v.get('unit'))} |{was} {v['target']} | "
                     f"{status} | {gap} | [{v['source']}]({v['source']}.md) ({v['run_id']}) | {v['note']} |")
    pages = [n for n in ("insert-path", "app-overhead", "e2e-50", "python-baseline", "latency-5k", "drain-5m",
                         "scale-out", "fetch-plan", "soak") if os.path.exists(os.path.join(out, f"{n}.md"))]
    extra = ["[ANALYSIS.md](ANALYSIS.md) (what bounds the missed targets)"] \
        if os.path.exists(os.path.join(out, "ANALYSIS.md")) else []
    if os.path.exists(os.path.join(out, "plan-cache.txt")):
        extra.append("[plan-cache.txt](plan-cache.txt) (`bench/plan-cache.sh`: planning vs execution of the fetch)")
    lines += ["", "Gap: how far the measured value is from the target, and that relative to the target.", "",
              "Pages: " + ", ".join([f"[{n}]({n}.md)" for n in pages] + extra) + ".", "",
              "| measurement | rerun |", "|---|---|"] + \
        [f"| {n} | `bench/run.sh {n}` |" for n in pages if n != "soak"] + ["", machine_txt]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ============================================================ measurements ==

def m_insert_path(ctx):
    p = ctx.p
    da, db = "bench_v2_insert_plain", "bench_v2_insert_outbox"
    recreate_db(da)
    q(da, PLAIN_TABLE)
    recreate_db(db)
    ctx.bins.migrate(db)
    sa, sb = STMT_50.format(table="plain_outbox"), STMT_50.format(table="outbox")
    ctx.tansu.stop()
    rounds = []
    mark0 = ctx.cpu.mark()
    for i in range(p["insert_rounds"]):
        order = [("a", da, sa), ("b", db, sb)]
        if i % 2:
            order.reverse()
        r = {"round": i + 1, "order": "".join(o[0] for o in order)}
        for key, d, script in order:
            q(d, "truncate plain_outbox" if key == "a" else "truncate outbox")
            q(d, "checkpoint")
            act = Activity(d)
            res = pgbench(d, script, p["insert_secs"], tag=f"insert-{key}")
            res["activity"] = act.stop()
            res["events_per_sec"] = res["tps"] * 50
            r[key] = res
            log(f"insert-path round {i + 1} {key}: {res['tps']:.0f} statements/s")
        r["ratio_b_over_a"] = r["b"]["tps"] / r["a"]["tps"]
        rounds.append(r)
    cpu = CpuSampler.between(mark0, ctx.cpu.mark())
    payload = q(db, "select avg(length(payload::text))::int, avg(pg_column_size(payload))::int from outbox")[0]
    ratio = statistics.median(r["ratio_b_over_a"] for r in rounds)
    result = {"rounds": rounds, "median_ratio_b_over_a": ratio,
              "median_tps": {"a": statistics.median(r["a"]["tps"] for r in rounds),
                             "b": statistics.median(r["b"]["tps"] for r in rounds)},
              "payload_text_bytes": payload[0], "payload_stored_bytes": payload[1], "cpu": cpu,
              "verdicts": {"insert-path": verdict("insert-path", round(ratio, 3))}}
    rows = ["| round | order | (a) plain: statements/s | events/s | (b) outbox: statements/s | events/s | b/a |",
            "|---|---|---|---|---|---|---|"]
    for r in rounds:
        rows.append(f"| {r['round']} | {r['order']} | {r['a']['tps']:,.0f} | {r['a']['events_per_sec']:,.0f} | "
                    f"{r['b']['tps']:,.0f} | {r['b']['events_per_sec']:,.0f} | {r['ratio_b_over_a']:.3f} |")
    v = result["verdicts"]["insert-path"]
    body = "\n".join([
        f"pgbench, {CLIENTS} clients (`-j 2 -M prepared`), {p['insert_secs']} s per side and round, one "
        "statement inserting 50 events of random aggregates (100,000 ids) with "
        f"~{payload[0]} B JSON payloads, no relay, into (a) a plain unpartitioned table (bigserial key, "
        "uuid, jsonb; `plain_outbox`) and (b) the engine's outbox (`outbox migrate --partitions 16`, its own "
        "database). Both tables are truncated and a checkpoint taken before each side; the order alternates.",
        "", "```sql", sb.strip(), "```", "",
        "\n".join(rows), "",
        f"**Median ratio b/a: {ratio:.3f}** (target ≥ 0.9: {'met' if v['met'] else 'missed'}). "
        f"Median statements/s: a {result['median_tps']['a']:,.0f}, b {result['median_tps']['b']:,.0f}.",
        "", cpu_md(cpu), "", "Last round, (a): " + activity_md(rounds[-1]["a"]["activity"]), "",
        "Last round, (b): " + activity_md(rounds[-1]["b"]["activity"])])
    ctx.write("insert-path", result, body)
    drop_db(da)
    drop_db(db)


def m_app_overhead(ctx):
    p = ctx.p
    d = "bench_v2_app"
    recreate_db(d)
    ctx.bins.migrate(d)
    q(d, ORDERS_TABLE)
    ctx.tansu.restart()
    prefix = f"bench.app.{ctx.run_id}."
    conn = connect(d)
    rounds = []
    for i in range(p["app_rounds"]):
        order = ["none", "engine"] if i % 2 == 0 else ["engine", "none"]
        r = {"round": i + 1, "order": ",".join(order)}
        for side in order:
            if side == "none":
                q(conn, "checkpoint")
                m0 = ctx.cpu.mark()
                act = Activity(d)
                res = pgbench(d, APP_TX, p["app_secs"], tag="app")
                res["cpu"] = CpuSampler.between(m0, ctx.cpu.mark())
                res["activity"] = act.stop()
            else:
                node = EngineNode(ctx.bins, d, f"app-n1-{i}", prefix)
                res = {"lease_secs": round(wait_leased(conn, node), 2)}
                res["backlog_drain_secs"] = round(wait_pending_empty(conn, node=node), 2)
                q(conn, "checkpoint")
                m0 = ctx.cpu.mark()
                act = Activity(d)
                res.update(pgbench(d, APP_TX, p["app_secs"], tag="app"))
                res["cpu"] = CpuSampler.between(m0, ctx.cpu.mark())
                res["activity"] = act.stop()
                res["outbox_empty_after_secs"] = round(wait_pending_empty(conn, node=node), 2)
                res["engine_exit"] = node.stop()
            r[side] = res
            log(f"app-overhead round {i + 1} {side}: {res['tps']:.0f} tps")
        r["ratio"] = r["engine"]["tps"] / r["none"]["tps"]
        rounds.append(r)
    ctx.tansu.stop()
    ratio = statistics.median(r["ratio"] for r in rounds)
    result = {"rounds": rounds, "median_ratio": ratio,
              "median_tps": {"none": statistics.median(r["none"]["tps"] for r in rounds),
                             "engine": statistics.median(r["engine"]["tps"] for r in rounds)},
              "verdicts": {"app-overhead": verdict("app-overhead", round(ratio, 3))}}
    rows = ["| round | order | no engine: tps | engine relaying: tps | ratio | outbox empty after (s) |",
            "|---|---|---|---|---|---|"]
    for r in rounds:
        rows.append(f"| {r['round']} | {r['order']} | {r['none']['tps']:,.0f} | {r['engine']['tps']:,.0f} | "
                    f"{r['ratio']:.3f} | {r['engine']['outbox_empty_after_secs']} |")
    last = rounds[-1]
    v = result["verdicts"]["app-overhead"]
    body = "\n".join([
        f"pgbench, {CLIENTS} clients, {p['app_secs']} s per side and round, one business-row insert plus one "
        "outbox event per transaction (100,000 aggregates); no engine, then one engine node relaying "
        "(16 partitions, defaults, `--http-addr off`) started before its side and left to drain the backlog "
        "of the no-engine side before pgbench starts, alternating.", "", "```sql", APP_TX.strip(), "```", "",
        "\n".join(rows), "",
        f"**Median ratio: {ratio:.3f}** (target ≥ 0.9: {'met' if v['met'] else 'missed'}). "
        f"Median tps: no engine {result['median_tps']['none']:,.0f}, engine {result['median_tps']['engine']:,.0f}.",
        "", "Last round, no engine: " + cpu_md(last["none"]["cpu"]), "", activity_md(last["none"]["activity"]), "",
        "Last round, engine relaying: " + cpu_md(last["engine"]["cpu"]), "", activity_md(last["engine"]["activity"])])
    ctx.write("app-overhead", result, body)
    conn.close()
    drop_db(d)


def e2e_round(ctx, kind, secs):
    """One end-to-end round: load with pgbench for `secs` while the relay
    runs, then until everything is published and consumed."""
    ctx.tansu.restart()
    tag = uuid.uuid4().hex[:6]
    d = f"bench_v2_e2e_{kind}"
    recreate_db(d)
    conn = connect(d)
    if kind == "engine":
        ctx.bins.migrate(d)
        prefix = f"bench.e2e.{tag}."
        topic = prefix + "order"
        script = STMT_50.format(table="outbox")
    else:
        q(conn, PLAIN_TABLE)
        topic = f"bench.py.{tag}"
        script = STMT_50.format(table="plain_outbox")
    create_topic(topic)
    ready, expect = (os.path.join(LOCAL, f"bench-{tag}.{x}") for x in ("ready", "expect"))
    consumer = subprocess.Popen([PY, os.path.join(BENCH, "count_consumer.py"), BROKERS, topic,
                                 str(TOPIC_PARTITIONS), ready, expect], stdout=subprocess.PIPE, text=True)
    res = {"kind": kind}
    if kind == "engine":
        relay = EngineNode(ctx.bins, d, f"e2e-{tag}", prefix)
        res["lease_secs"] = round(wait_leased(conn, relay), 2)
        before = q(conn, "select coalesce(sum(published),0)::bigint from outbox_leases")[0][0]
        seq0 = q(conn, "select last_value from outbox_position_seq")[0][0]
    else:
        relay = subprocess.Popen([PY, os.path.join(BENCH, "python_relay.py"), db_url(d), BROKERS, topic],
                                 stderr=open(os.path.join(LOCAL, "bench-logs", f"python-relay-{tag}.log"), "w"))
        seq0 = q(conn, "select last_value from plain_outbox_id_seq")[0][0]
    while not os.path.exists(ready):
        time.sleep(0.02)
    time.sleep(0.5)
    m0 = ctx.cpu.mark()
    act = Activity(d)
    t0 = time.monotonic()
    pb = pgbench(d, script, secs, tag=f"e2e-{kind}")
    t_load = time.monotonic()
    m_load = ctx.cpu.mark()
    res["activity_load"] = act.stop()
    events = pb["transactions"] * 50
    if kind == "engine":
        seq1 = q(conn, "select last_value from outbox_position_seq")[0][0]
        t_pub, published = wait_published(conn, before + events, node=relay)
        res["published"] = published - before
        res["pending_empty"] = pending_empty(conn)
    else:
        seq1 = q(conn, "select last_value from plain_outbox_id_seq")[0][0]
        while q(conn, "select exists(select 1 from plain_outbox)")[0][0]:
            if relay.poll() is not None:
                raise SystemExit("python relay exited")
            time.sleep(0.05)
        t_pub = time.monotonic()
    with open(expect + ".tmp", "w") as f:
        f.write(str(events))
    os.rename(expect + ".tmp", expect)
    out = json.loads(consumer.communicate(timeout=120)[0])
    m1 = ctx.cpu.mark()
    if kind == "engine":
        res["engine_exit"] = relay.stop()
    else:
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)
    for f in (ready, expect):
        os.path.exists(f) and os.remove(f)
    t_done = out["reached_at"] if out["complete"] else None
    res.update({
        "load_secs": round(t_load - t0, 2), "statements": pb["transactions"], "events": events,
        "sequence_delta": seq1 - seq0, "statements_per_sec_during_load": pb["tps"],
        "commit_rate_eps": events / (t_load - t0),
        "published_after_load_secs": round(t_pub - t_load, 2),
        "consumed": out["count"], "consumed_complete": out["complete"],
        "consumed_after_load_secs": round(t_done - t_load, 2) if t_done else None,
        "eps_published": events / (t_pub - t0),
        "eps": events / (t_done - t0) if t_done else None,
        "cpu_load": CpuSampler.between(m0, m_load), "cpu_total": CpuSampler.between(m0, m1),
    })
    conn.close()
    drop_db(d)
    log(f"e2e {kind}: {events} events, {res['eps'] or 0:,.0f} events/s consumed "
        f"({res['eps_published']:,.0f} published), load {res['commit_rate_eps']:,.0f} events/s")
    return res


def m_e2e(ctx, kinds=("engine", "python")):
    p = ctx.p
    rounds = []
    for i in range(p["e2e_rounds"]):
        ks = list(kinds) if i % 2 == 0 else list(reversed(kinds))
        for k in ks:
            r = e2e_round(ctx, k, p["e2e_secs"])
            r["round"] = i + 1
            rounds.append(r)
    ctx.tansu.stop()

    def med(kind, key):
        xs = [r[key] for r in rounds if r["kind"] == kind and r[key] is not None]
        return statistics.median(xs) if xs else None
    eng, pyt = med("engine", "eps"), med("python", "eps")
    rows = ["| round | relay | events | load (s) | commit rate during load | published after load (s) | "
            "consumed after load (s) | events/s (to consumed) | events/s (to published) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        rows.append(f"| {r['round']} | {r['kind']} | {r['events']:,} | {r['load_secs']} | "
                    f"{r['commit_rate_eps']:,.0f} | {r['published_after_load_secs']} | "
                    f"{r['consumed_after_load_secs']} | {fmt(r['eps'], 'events/s')} | "
                    f"{fmt(r['eps_published'], 'events/s')} |")
    name = "e2e-50" if "engine" in kinds else "python-baseline"
    result = {"rounds": rounds, "median_eps": {"engine": eng, "python": pyt}}
    verdicts, notes = {}, {}
    if eng is not None:
        verdicts["e2e-50"] = verdict("e2e-50", round(eng))
        if pyt:
            verdicts["e2e-50-vs-python"] = verdict("e2e-50-vs-python", round(eng / pyt, 3))
            notes["e2e-50-vs-python"] = f"engine {eng:,.0f} vs Python relay {pyt:,.0f} events/s"
            result["ratio_engine_over_python"] = eng / pyt
    result["verdicts"] = verdicts
    result["verdict_notes"] = notes
    lastcpu, lastact = {}, {}
    for r in rounds:
        lastcpu[r["kind"]] = r["cpu_total"]
        lastact[r["kind"]] = r["activity_load"]
    body = "\n".join([
        f"End to end at 50 events per statement (the insert-path statement: random aggregates, ~150 B payloads), "
        f"pgbench with {CLIENTS} clients loading for {p['e2e_secs']} s while the relay runs, then until every "
        "event is published and consumed. Engine: one node, 16 partitions, defaults (`--http-addr off`); "
        "Python relay: `bench/python_relay.py` on a plain table (one process). One consumer "
        "(`bench/count_consumer.py`, confluent-kafka, every partition assigned from the beginning) counts the "
        "topic in both cases. events/s = events / (load start → the consumer has them all); the published "
        "time is the engine's `sum(outbox_leases.published)` reaching the count, or the Python relay's table "
        "empty (it commits after the flush). Fresh broker and database per round; the order alternates.", "",
        "\n".join(rows), "",
        f"**Median events/s: engine {fmt(eng, 'events/s')}, Python relay {fmt(pyt, 'events/s')}"
        + (f", ratio {eng / pyt:.2f}" if eng and pyt else "") + "** (targets: ≥ 100,000 events/s; short of "
        "that ≥ 1.5× the Python relay).", ""] +
        [f"Last {k} round, load start → consumed: " + cpu_md(c) + "\n\nDuring its load: " + activity_md(lastact[k])
         + "\n" for k, c in lastcpu.items()])
    ctx.write(name, result, body)


def m_latency(ctx):
    p = ctx.p
    d = "bench_v2_latency"
    recreate_db(d)
    ctx.bins.migrate(d)
    ctx.tansu.restart()
    prefix = f"bench.lat.{ctx.run_id}."
    conn = connect(d)
    node = EngineNode(ctx.bins, d, "lat-n1", prefix)
    wait_leased(conn, node)
    outdir = os.path.join(ctx.out, "latency-5k-loadgen")
    m0 = ctx.cpu.mark()
    act = Activity(d)
    writers = 32
    cmd = [ctx.bins.loadgen, "run", "--database-url", db_url(d), "--kafka-brokers", BROKERS,
           "--rate", str(p["lat_rate"]), "--duration", str(p["lat_secs"]), "--writers", str(writers),
           "--events-per-tx", str(p["lat_events_per_tx"]), "--payload-bytes", "100", "--aggregates", "1000",
           "--topic-prefix", prefix, "--topic-partitions", str(TOPIC_PARTITIONS), "--name", "latency-5k",
           "--out", outdir, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    cpu = CpuSampler.between(m0, ctx.cpu.mark())
    activity = act.stop()
    if out.returncode != 0:
        raise SystemExit(f"loadgen run failed:\n{out.stderr[-3000:]}")
    rep = json.loads(out.stdout)
    node.stop()
    ctx.tansu.stop()
    conn.close()
    drop_db(d)
    r = rep["results"]
    lat = r["latency_ms"]
    result = {"loadgen": {k: r.get(k) for k in ("committed", "delivered", "lost", "duplicates",
                                                "order_violations", "throughput_eps", "commit_rate_eps",
                                                "latency_ms", "latency_from_intended_ms", "tx_latency_ms",
                                                "broker_latency", "lag")},
              "loadgen_report": "latency-5k-loadgen/report.json", "cpu": cpu, "activity": activity,
              "verdicts": {"latency-5k": verdict("latency-5k", lat["p99"])}}
    body = "\n".join([
        f"`loadgen run --rate {p['lat_rate']} --writers {writers} --events-per-tx {p['lat_events_per_tx']} "
        f"--payload-bytes 100 --aggregates 1000 --duration {p['lat_secs']}` (open loop, the suite's latency "
        "workload at half its rate) against one engine node (16 partitions, defaults) started before it; "
        "latency is commit returned → loadgen's consumer received the message. Full report: "
        "[latency-5k-loadgen/summary.md](latency-5k-loadgen/summary.md).", "",
        "| | p50 | p99 | p99.9 | max |", "|---|---|---|---|---|",
        f"| commit → consumer receipt (ms) | {lat['p50']:.1f} | **{lat['p99']:.1f}** | {lat['p999']:.1f} | "
        f"{lat['max']:.1f} |",
        f"| intended start → receipt (ms) | {r['latency_from_intended_ms']['p50']:.1f} | "
        f"{r['latency_from_intended_ms']['p99']:.1f} | {r['latency_from_intended_ms']['p999']:.1f} | "
        f"{r['latency_from_intended_ms']['max']:.1f} |",
        f"| transaction (ms) | {r['tx_latency_ms']['p50']:.1f} | {r['tx_latency_ms']['p99']:.1f} | "
        f"{r['tx_latency_ms']['p999']:.1f} | {r['tx_latency_ms']['max']:.1f} |", "",
        f"Commit rate {r['commit_rate_eps']:,.0f} events/s, throughput {r['throughput_eps']:,.0f} events/s; "
        f"lost {r['lost']}, duplicates {r['duplicates']}, order violations {r['order_violations']}.", "",
        cpu_md(cpu), "", activity_md(activity)])
    ctx.write("latency-5k", result, body)


def loadgen_drain(ctx, d, events, nodes, name, outbox_bin=None, env_extra=None, timeout=900):
    cmd = [ctx.bins.loadgen, "drain", "--database-url", db_url(d), "--kafka-brokers", BROKERS,
           "--events", str(events), "--partitions", str(PARTITIONS), "--nodes", str(nodes),
           "--payload-bytes", "100", "--topic-partitions", str(TOPIC_PARTITIONS),
           "--outbox-bin", outbox_bin or ctx.bins.outbox, "--log-dir", os.path.join(LOCAL, "bench-logs"),
           "--name", name, "--out", os.path.join(ctx.out, f"{name}-loadgen"), "--json", "--timeout", str(timeout)]
    env = dict(os.environ, **(env_extra or {}))
    env.pop("OUTBOX_SCHEMA", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    return proc


class DrainWatch:
    """Watches a `loadgen drain` from the database: who holds leases (every
    0.25 s) and the published counter; takes CPU marks when the first lease
    is taken (the nodes are up) and when everything is published, so the
    CPU table covers the drain alone, not the load or the verification."""

    def __init__(self, ctx, d, events):
        self.ctx, self.d, self.events = ctx, d, events
        self.timeline, self.mark_start, self.mark_end = [], None, None
        self.t_start = self.t_end = self.first_lease_at = None
        self.activity = None
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        conn = connect(self.d)
        t0 = time.monotonic()
        act = None
        while not self.stop_ev.is_set():
            try:
                rows = q(conn, "select owner, count(*) from outbox_leases where owner is not null "
                               "and expires_at > now() group by owner order by owner")
                pub = q(conn, "select coalesce(sum(published), 0)::bigint from outbox_leases")[0][0]
            except psycopg2.Error:
                self.stop_ev.wait(0.25)
                continue
            now = time.monotonic()
            self.timeline.append((round(now - t0, 2), {o: n for o, n in rows}, pub))
            if self.mark_start is None and rows:
                self.mark_start, self.t_start = self.ctx.cpu.mark(), now
                self.first_lease_at = round(now - t0, 2)
                act = Activity(self.d)
            if self.mark_start is not None and self.mark_end is None and pub >= self.events:
                self.mark_end, self.t_end = self.ctx.cpu.mark(), now
                self.activity = act.stop()
            self.stop_ev.wait(0.25)
        if act is not None and self.activity is None:
            self.activity = act.stop()
        conn.close()

    def stop(self):
        self.stop_ev.set()
        self.t.join()
        cpu = CpuSampler.between(self.mark_start, self.mark_end) if self.mark_start and self.mark_end else None
        return cpu


def m_drain(ctx):
    p = ctx.p
    d = "bench_v2_drain"
    recreate_db(d)
    ctx.tansu.restart()
    name = "drain-5m"
    ctx.bins.migrate(d)
    watch = DrainWatch(ctx, d, p["drain_events"])
    m0 = ctx.cpu.mark()
    proc = loadgen_drain(ctx, d, p["drain_events"], 1, name, timeout=p["drain_timeout"])
    out, err = proc.communicate()
    cpu = CpuSampler.between(m0, ctx.cpu.mark())
    cpu_drain = watch.stop()
    if proc.returncode != 0:
        raise SystemExit(f"loadgen drain failed:\n{err[-3000:]}")
    rep = json.loads(out)
    r = rep["results"]
    ctx.tansu.stop()
    drop_db(d)
    n = p["drain_events"]
    pub_secs = (watch.t_end - watch.t_start) if watch.t_end and watch.t_start else None
    pub_eps = n / pub_secs if pub_secs else None
    notes = {} if n >= 5_000_000 else {"drain-5m": f"backlog of {n:,} events, not 5M (5M would not fit the "
                                                   "time window on this machine)"}
    if not r.get("drained"):
        notes["drain-5m"] = notes.get("drain-5m", "") + f"; NOT drained within {p['drain_timeout']} s"
    result = {"loadgen": r, "loadgen_report": f"{name}-loadgen/report.json", "cpu_whole_run": cpu,
              "cpu_drain": cpu_drain, "activity_drain": watch.activity,
              "first_lease_at_secs": watch.first_lease_at,
              "first_lease_to_all_published_secs": pub_secs, "eps_first_lease_to_all_published": pub_eps,
              "published_timeline": [(t, pub) for t, _, pub in watch.timeline][::4],
              "verdicts": {"drain-5m": verdict("drain-5m", round(r["drain_eps"]))}, "verdict_notes": notes}
    body = "\n".join([
        f"`loadgen drain --events {n} --partitions 16 --nodes 1 --payload-bytes 100`: the backlog loaded "
        "server-side with no engine running, then one engine node (defaults) started; time from its start "
        "until `outbox_pending` is empty; every event then counted by consuming the topics. Full report: "
        f"[{name}-loadgen/summary.md]({name}-loadgen/summary.md).", "",
        "| events | load (s) | drain (s) | **events/s** | delivered | lost | duplicates | order violations |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['events']:,} | {r['load_secs']:.1f} | {r['drain_secs']:.1f} | **{r['drain_eps']:,.0f}** | "
        f"{r['delivered']:,} | {r['lost']} | {r['duplicates']} | {r['order_violations']} |", "",
        (f"From the first lease taken to `sum(outbox_leases.published)` = {n:,}: {pub_secs:.1f} s, "
         f"{pub_eps:,.0f} events/s (loadgen's figure runs from starting the node to an empty `outbox_pending`)."
         if pub_eps else ""), "",
        "During the drain (first lease taken → everything published): "
        + (cpu_md(cpu_drain) if cpu_drain else "not captured"), "", activity_md(watch.activity), "",
        "Whole run (load, drain, verification): " + cpu_md(cpu)])
    ctx.write(name, result, body)


def cg_setup(n, quota):
    groups = []
    for k in range(1, n + 1):
        g = os.path.join(CG_ROOT, f"{CG_PREFIX}-n{k}")
        os.makedirs(g, exist_ok=True)
        if os.path.isdir("/sys/fs/cgroup/cpuacct"):
            os.makedirs(os.path.join("/sys/fs/cgroup/cpuacct", f"{CG_PREFIX}-n{k}"), exist_ok=True)
        open(os.path.join(g, "cpu.cfs_period_us"), "w").write("100000")
        open(os.path.join(g, "cpu.cfs_quota_us"), "w").write(str(quota))
        groups.append(g)
    return groups


def cg_stat(g):
    out = {}
    for line in open(os.path.join(g, "cpu.stat")):
        k, v = line.split()
        out[k] = int(v)
    try:
        out["usage_secs"] = round(int(open(os.path.join("/sys/fs/cgroup/cpuacct", os.path.basename(g),
                                                            "cpuacct.usage")).read()) / 1e9, 2)
    except OSError:
        pass
    return out


def cg_remove_all():
    for root in (CG_ROOT, "/sys/fs/cgroup/cpuacct"):
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if name.startswith(CG_PREFIX):
                path = os.path.join(root, name)
                if os.path.isdir(path):
                    for _ in range(50):
                        try:
                            os.rmdir(path)
                            break
                        except OSError:
                            time.sleep(0.1)


def m_scale(ctx):
    p = ctx.p
    quota = p["scale_quota_us"]
    events = p["scale_events"]
    counts = [int(x) for x in str(p["scale_nodes"]).split(",")]
    runs = []
    try:
        for n in counts:
            d = "bench_v2_scale"
            recreate_db(d)
            ctx.bins.migrate(d)
            ctx.tansu.restart()
            cg_remove_all()
            groups = cg_setup(n, quota)
            name = f"scale-out-{n}n"
            watch = DrainWatch(ctx, d, events)
            m0 = ctx.cpu.mark()
            proc = loadgen_drain(ctx, d, events, n, name, outbox_bin=os.path.join(BENCH, "cg-outbox.sh"),
                                 env_extra={"BENCH_OUTBOX_REAL": ctx.bins.outbox,
                                            "BENCH_CG_NAME": CG_PREFIX})
            out, err = proc.communicate()
            cpu = CpuSampler.between(m0, ctx.cpu.mark())
            cpu_drain = watch.stop()
            timeline = watch.timeline
            if proc.returncode != 0:
                raise SystemExit(f"loadgen drain ({n} nodes) failed:\n{err[-3000:]}")
            r = json.loads(out)["results"]
            stats = {os.path.basename(g): cg_stat(g) for g in groups}
            cg_remove_all()
            ctx.tansu.stop()
            drop_db(d)
            # When every node first held a lease, and the distribution then.
            balanced = next(((t, o) for t, o, _ in timeline if len(o) == n), (None, None))
            runs.append({"nodes": n, "drain_secs": r["drain_secs"], "drain_eps": r["drain_eps"],
                         "events": r["events"], "delivered": r["delivered"], "lost": r["lost"],
                         "duplicates": r["duplicates"], "order_violations": r["order_violations"],
                         "cgroups": stats,
                         "all_nodes_leasing_after_first_lease_secs":
                             round(balanced[0] - watch.first_lease_at, 2) if balanced[0] is not None else None,
                         "all_nodes_leasing_at_secs": balanced[0], "cpu_drain": cpu_drain,
                         "activity_drain": watch.activity,
                         "leases_then": balanced[1], "lease_timeline": timeline, "cpu_whole_run": cpu,
                         "loadgen_report": f"{name}-loadgen/report.json"})
            log(f"scale-out {n} nodes: {r['drain_eps']:,.0f} events/s")
    finally:
        cg_remove_all()
    base = next(r for r in runs if r["nodes"] == 1)["drain_eps"]
    for r in runs:
        r["ratio_vs_1"] = r["drain_eps"] / base
    verdicts = {}
    for n in (2, 4):
        r = next((r for r in runs if r["nodes"] == n), None)
        if r:
            verdicts[f"scale-out-{n}"] = verdict(f"scale-out-{n}", round(r["ratio_vs_1"], 3))
    result = {"quota": f"{quota}/100000 µs per node ({quota / 1000:.0f} % of a core)", "runs": runs,
              "verdicts": verdicts}
    rows = ["| nodes | drain (s) | events/s | × 1 node | lost | dups | order | all nodes leasing after (s) | "
            "throttled periods per node | CPU s per node (cgroup) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        thr = ", ".join(str(s["nr_throttled"]) for s in r["cgroups"].values())
        use = ", ".join(str(s.get("usage_secs", "?")) for s in r["cgroups"].values())
        rows.append(f"| {r['nodes']} | {r['drain_secs']:.1f} | {r['drain_eps']:,.0f} | {r['ratio_vs_1']:.2f} | "
                    f"{r['lost']} | {r['duplicates']} | {r['order_violations']} | {r['all_nodes_leasing_after_first_lease_secs']} | "
                    f"{thr} | {use} |")
    body = "\n".join([
        f"The same backlog ({events:,} events, 16 partitions, 100 B payloads, `loadgen drain`) drained by 1, "
        f"2 and 4 engine nodes, each node in its own cgroup-v1 `cpu` group capped at {quota / 1000:.0f} % of a "
        f"core (`cpu.cfs_period_us`=100000, `cpu.cfs_quota_us`={quota}; `bench/cg-outbox.sh` puts each node's "
        "pid into its group before exec). Time from starting the nodes to an empty `outbox_pending` (it "
        "includes lease acquisition and rebalancing); events counted by consuming afterwards. The lease "
        "column is how long after the first lease was taken every node held at least one partition "
        "(sampled every 0.25 s).", "", "\n".join(rows), "",
        "Targets: 2 nodes ≥ 1.8×, 4 nodes ≥ 3× one node.", ""] +
        [f"{r['nodes']} node(s), during the drain (first lease → everything published): "
         + (cpu_md(r["cpu_drain"]) if r["cpu_drain"] else "not captured") + "\n\n" + activity_md(r["activity_drain"])
         + "\n" for r in runs])
    ctx.write("scale-out", result, body)


def m_fetch_plan(ctx):
    n = 20_000 if ctx.args.quick else 200_000
    out = subprocess.run([os.path.join(BENCH, "fetch-plan.sh"), str(n)], capture_output=True, text=True,
                         env=dict(os.environ, BENCH_OUTBOX=ctx.bins.outbox), check=True).stdout
    with open(os.path.join(ctx.out, "fetch-plan.txt"), "w") as f:
        f.write(out)
    times = re.findall(r"Execution Time: ([\d.]+) ms", out)
    titles = re.findall(r"^-- ((?:before|since) .*)$", out, re.M)
    rows = ["| plan | execution time (ms) |", "|---|---|"] + [f"| {t} | {x} |" for t, x in zip(titles, times)]
    body = "\n".join([
        "`bench/fetch-plan.sh` (seconds): `EXPLAIN (ANALYZE, BUFFERS)` of the candidate rows of one shard as "
        "the engine's fetch selects them (its `cand` CTE, copied from engine/src/store/source.rs), on an outbox "
        f"of {n:,} events with nothing published. Up to commit c0b3713 the in-progress branch, "
        "`o.txid in (select pg_snapshot_xip(w.lo))`, was planned as a scan of every row of the shard with the "
        "IN as a per-row join filter (`Index Cond: (shard = 3)` only), so every fetch read every page holding a "
        "row of its shard, published or not, until its segment was truncated, even for an empty window. Commit "
        "4997526 binds the list as an array and skips the branch when it is empty.", "", "\n".join(rows), "",
        "Plans: [fetch-plan.txt](fetch-plan.txt)."])
    ctx.write("fetch-plan", {"events": n, "plan_file": "fetch-plan.txt", "verdicts": {}}, body)


MEASUREMENTS = {
    "fetch-plan": m_fetch_plan,
    "insert-path": m_insert_path,
    "app-overhead": m_app_overhead,
    "e2e-50": lambda c: m_e2e(c, ("engine", "python")),
    "python-baseline": lambda c: m_e2e(c, ("python",)),
    "latency-5k": m_latency,
    "drain-5m": m_drain,
    "scale-out": m_scale,
}
ALL = ["fetch-plan", "insert-path", "app-overhead", "e2e-50", "latency-5k", "scale-out", "drain-5m"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=list(MEASUREMENTS) + ["all", "summary"])
    ap.add_argument("--quick", action="store_true", help="seconds-long runs, to check the scripts")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results", "v2"))
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a parameter: " + ", ".join(f"{k}={v}" for k, v in FULL.items()))
    args = ap.parse_args()
    if args.name == "summary":
        write_readme(os.path.abspath(args.out))
        return
    os.makedirs(os.path.join(LOCAL, "bench-logs"), exist_ok=True)
    ctx = Ctx(args)
    names = ALL if args.name == "all" else [args.name]
    started = time.monotonic()
    failed = []
    try:
        for n in names:
            log(f"=== {n} ({'quick' if args.quick else 'full'})")
            t = time.monotonic()
            try:
                MEASUREMENTS[n](ctx)
            except (Exception, SystemExit) as e:   # one failure does not end `all`
                failed.append(n)
                log(f"=== {n} FAILED: {e}")
                ctx.tansu.stop()
                cg_remove_all()
                continue
            log(f"=== {n} done in {time.monotonic() - t:.0f} s")
    finally:
        ctx.tansu.stop()
        cg_remove_all()
    log(f"all done in {time.monotonic() - started:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
