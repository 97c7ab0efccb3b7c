"""CDC next to polling (issue 11), on one server: the wal_level=logical
cluster of deploy/services.sh (CDC_DATABASE_URL). Run through
`bench/run.sh NAME` with NAME one of latency-cdc, app-overhead-cdc,
e2e-50-cdc, db-cpu-cdc, cdc (all four), cdc-summary.

Every measurement runs the polling and the CDC source in the same session,
alternating their order, with the same engine binary and settings; only
`OUTBOX_SOURCE` differs (and the CDC slot name, one per database). Writes
bench-results/cdc/<name>.json and .md, raw loadgen reports under raw/,
and regenerates README.md (metric, poll, cdc, ratio, target, met?).
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

ROOT = os.environ.get("BENCH_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CDC_URL = os.environ.get("CDC_DATABASE_URL", "postgres://postgres@127.0.0.1:55433/outbox")
os.environ["BENCH_PG"] = CDC_URL.split("?")[0].rsplit("/", 1)[0]
# A broker port of its own: bench.py's default (19092) is what another
# worktree's bench.py uses at the same time.
os.environ.setdefault("BENCH_TANSU_PORT", "19192")
# bench.pgbench passes -h and -U only: the port comes from libpq's PGPORT.
os.environ["PGPORT"] = os.environ["BENCH_PG"].rsplit(":", 1)[1]
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench as B  # noqa: E402  (reads BENCH_PG at import)

OUT_DEFAULT = os.path.join(ROOT, "bench-results", "cdc")
SOURCES = ("poll", "cdc")
OTHER_RUNS = re.compile(r"wt-perf.*(loadgen|outbox)")
# Process groups of the measurement itself; CPU of any other is reported
# per run as the foreign share of the machine.
OURS = {"postgres", "outbox", "tansu", "pgbench", "loadgen", "harness", "consumer"}

FULL = dict(lat_secs=30, lat_rates="5000,20000", lat_rounds=2, lat_events_per_tx=10, lat_writers=32,
            app_rounds=4, app_secs=8, e2e_rounds=3, e2e_secs=15, cpu_rounds=2, cpu_secs=20,
            cpu_statements_per_sec=100, prof_rates="5000,20000", prof_sources="cdc", prof_secs=30,
            quiet_timeout=7200, retries=2)
QUICK = dict(lat_secs=5, lat_rates="5000,20000", lat_rounds=1, lat_events_per_tx=10, lat_writers=32,
             app_rounds=1, app_secs=3, e2e_rounds=1, e2e_secs=3, cpu_rounds=1, cpu_secs=4,
             cpu_statements_per_sec=100, prof_rates="5000,20000", prof_sources="cdc", prof_secs=5,
             quiet_timeout=7200, retries=0)

# metric key -> (description, unit, op, target for cdc or None, lower is better)
METRICS = {
    "latency-5k": ("p99 commit → consumer receipt at 5,000 events/s", "ms", "<=", 20, True),
    "latency-20k": ("p99 commit → consumer receipt at 20,000 events/s", "ms", None, None, True),
    "app-overhead": ("app commit rate with the relay running / without, 1 event/tx", "ratio", ">=", 0.95, False),
    "e2e-50": ("end to end, 50 events/statement (events/s)", "events/s", None, None, False),
    "db-cpu": ("PostgreSQL CPU per event, all of the cluster's processes (µs)", "µs", None, None, True),
    "db-cpu-relay": ("PostgreSQL CPU per event added by the relay (µs, vs no relay)", "µs", None, None, True),
}


def log(*a):
    B.log(*a)


# ------------------------------------------------------- process groups --

def postmaster_pid():
    datadir = B.q("postgres", "show data_directory")[0][0]
    return int(open(os.path.join(datadir, "postmaster.pid")).readline())


if B.q("postgres", "show wal_level")[0][0] != "logical":
    raise SystemExit(f"{B.PG_SERVER} does not run wal_level=logical; start it with "
                     "eval \"$(deploy/services.sh up)\" or point CDC_DATABASE_URL at one that does")
PM = postmaster_pid()
_classify = B.classify


def classify(pid):
    """bench.py's groups, with PostgreSQL split by cluster (this one's
    postmaster and its children are `postgres`, any other server
    `postgres-other`) and the other worktree's processes apart."""
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if OTHER_RUNS.search(cmd):
        return "wt-perf"
    g = _classify(pid)
    if g in ("outbox", "loadgen") and os.path.join(ROOT, ".local", "bench-bin") not in cmd:
        return "foreign-" + g       # tests or demos of other engineers
    if g == "tansu" and f":{B.TANSU_PORT}" not in cmd:
        return "foreign-tansu"
    if g == "postgres":
        try:
            s = open(f"/proc/{pid}/stat").read()
            ppid = int(s[s.rfind(")") + 2:].split()[1])
        except OSError:
            return g
        return "postgres" if PM in (int(pid), ppid) else "postgres-other"
    return g


B.classify = classify


class Roles:
    """Who each backend of this cluster is (pg_stat_activity, every 0.25 s),
    so the cluster's CPU splits into walsender, engine, application and
    the rest."""

    SQL = "select pid, backend_type, coalesce(application_name, ''), coalesce(datname, '') from pg_stat_activity"

    def __init__(self):
        self.roles = {PM: "postmaster"}
        self.stop_ev = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    @staticmethod
    def role(backend_type, app, db):
        if db and not db.startswith("bench_v2_cdc") and db != "postgres":
            return "other-databases"  # someone else's work on this cluster
        if backend_type == "walsender":
            return "walsender"
        if backend_type != "client backend":
            return "background"     # checkpointer, walwriter, bgwriter, launchers
        if app.startswith("outbox"):
            return "engine"
        if app in ("pgbench", "loadgen"):
            return "application"
        return "harness"            # this script's samplers

    def _loop(self):
        conn = B.connect("postgres")
        while not self.stop_ev.wait(0.25):
            try:
                for pid, bt, app, db in B.q(conn, self.SQL):
                    self.roles[pid] = self.role(bt, app, db)
            except Exception:
                try:
                    conn = B.connect("postgres")
                except Exception:
                    pass

    def between(self, a, b):
        (_, m0), (_, m1) = a, b
        out = {}
        for key, (g, ticks) in m1.items():
            if g != "postgres":
                continue
            d = ticks - (m0[key][1] if key in m0 else 0)
            if d > 0:
                r = self.roles.get(key[0], "background")
                out[r] = out.get(r, 0) + d / B.CLK
        return {r: round(v, 3) for r, v in sorted(out.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------- context --

def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def other_runs():
    out = subprocess.run(["pgrep", "-af", OTHER_RUNS.pattern], capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if "pgrep" not in l]


class Ctx(B.Ctx):
    def __init__(self, args):
        super().__init__(args)
        self.p = dict(QUICK if args.quick else FULL)
        for kv in args.set or []:
            k, v = kv.split("=", 1)
            self.p[k] = type(self.p[k])(v) if k in self.p else v
        self.engine_env = dict(kv.split("=", 1) for kv in args.engine_env or [])
        for k in self.engine_env:
            if not k.startswith("OUTBOX_"):
                raise SystemExit(f"--engine-env {k}: only OUTBOX_* variables")
        self.machine["cdc_server"] = B.PG_SERVER
        self.machine["cdc_server_note"] = ("the wal_level=logical cluster of deploy/services.sh; "
                                           "both sources run against it")
        self.roles = Roles()
        self.raw = os.path.join(self.out, "raw")
        os.makedirs(self.raw, exist_ok=True)

    def write(self, name, result, md_body):
        result = dict(name=name, quick=self.args.quick, run_id=self.run_id, finished_at=B.now_utc(),
                      rerun=f"bench/run.sh {name}", machine=self.machine, params=self.p,
                      engine_env=self.engine_env, **result)
        with open(os.path.join(self.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        env = ", ".join(f"`{k}={v}`" for k, v in self.engine_env.items()) or "none (engine defaults)"
        md = [f"# {name}{' (quick: a tooling check, not a measurement)' if self.args.quick else ''}", "",
              f"Run `{result['rerun']}`. Finished {result['finished_at']}, run {self.run_id}. Server: "
              f"{B.PG_SERVER} (wal_level=logical) for both sources. Engine environment besides the "
              f"source: {env}.", "", md_body, "", B.machine_md(self.machine)]
        with open(os.path.join(self.out, f"{name}.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        write_readme(self.out)
        log(f"wrote {self.out}/{name}.json and .md")


def quiet(ctx):
    """Waits while another worktree's benchmark processes run; returns the
    seconds waited."""
    t0 = time.monotonic()
    warned = False
    while True:
        others = other_runs()
        if not others:
            return round(time.monotonic() - t0, 1)
        if not warned:
            log(f"waiting: another worktree's processes run ({len(others)}): {others[0][:100]}")
            warned = True
        if time.monotonic() - t0 > ctx.p["quiet_timeout"]:
            raise SystemExit("gave up waiting for the other worktree's runs to end")
        time.sleep(5)


def measured(ctx, label, fn):
    """Runs fn (which returns a dict with a `cpu` entry) in a quiet window;
    repeats it if the other worktree's processes took CPU meanwhile."""
    dropped = []
    for attempt in range(ctx.p["retries"] + 1):
        waited = quiet(ctx)
        la0 = loadavg()
        res = fn()
        res["loadavg_before"], res["loadavg_after"] = la0, loadavg()
        res["waited_for_quiet_secs"] = waited
        disturbed = res["cpu"]["cpu_secs"].get("wt-perf", 0)
        res["other_worktree_cpu_secs"] = disturbed
        share = res["cpu"]["share_of_machine"]
        res["foreign_share"] = round(sum(v for g, v in share.items() if g not in OURS), 3)
        res["foreign_share_by_group"] = {g: v for g, v in share.items() if g not in OURS and v >= 0.005}
        if not disturbed:
            res["repeated_because_disturbed"] = dropped
            return res
        dropped.append({"loadavg_before": la0, "other_worktree_cpu_secs": disturbed,
                        "foreign_share": res["foreign_share"]})
        if attempt == ctx.p["retries"]:
            break
        log(f"{label}: the other worktree's processes ran during it ({disturbed} CPU s); again")
    log(f"{label}: the other worktree's processes ran during it ({disturbed} CPU s); kept, marked disturbed")
    res["disturbed"] = True
    res["repeated_because_disturbed"] = dropped[:-1]
    return res


# ----------------------------------------------------------------- engine --

def slot_name(db):
    return "bench_" + db.replace("bench_v2_", "")


def start_engine(ctx, db, source, node_id, prefix):
    env = {"OUTBOX_SOURCE": source, **ctx.engine_env}
    if source == "cdc":
        env["OUTBOX_CDC__SLOT"] = slot_name(db)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return B.EngineNode(ctx.bins, db, node_id, prefix)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_ready(conn, node, source, db, timeout=60):
    """All partitions leased; under CDC also streaming, and the slot read."""
    took = B.wait_leased(conn, node, timeout=timeout)
    if source != "cdc":
        return round(took, 2)
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        node.check()
        n = B.q(conn, "select count(*) from outbox_leases where mode = 'cdc' and cdc_streaming")[0][0]
        act = B.q(conn, "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = %s",
                  (slot_name(db),))[0][0]
        if n == B.PARTITIONS and act:
            return round(took + time.monotonic() - t, 2)
        time.sleep(0.05)
    raise SystemExit(f"CDC did not stream all {B.PARTITIONS} partitions in {timeout} s; see {node.log}")


def drop_db(db):
    """Drops the slots of the database (a slot holds its database), then it."""
    for _ in range(100):
        rows = B.q("postgres", "select slot_name, active_pid from pg_replication_slots where database = %s", (db,))
        if not rows:
            break
        for name, pid in rows:
            try:
                if pid:
                    B.q("postgres", "select pg_terminate_backend(%s)", (pid,))
                else:
                    B.q("postgres", "select pg_drop_replication_slot(%s)", (name,))
            except Exception:
                pass
        time.sleep(0.1)
    B.drop_db(db)


def fresh_db(ctx, db):
    drop_db(db)
    B.recreate_db(db)
    ctx.bins.migrate(db)


def cpu_rows(res_by_src):
    """CPU tables side by side: process groups and the cluster's roles."""
    groups = sorted({g for r in res_by_src.values() for g in r["cpu"]["cpu_secs"]},
                    key=lambda g: -max(r["cpu"]["cpu_secs"].get(g, 0) for r in res_by_src.values()))
    cols = list(res_by_src)
    rows = ["| process | " + " | ".join(f"{c}: CPU s (share)" for c in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for g in groups:
        rows.append(f"| {g} | " + " | ".join(
            f"{r['cpu']['cpu_secs'].get(g, 0):.1f} ({100 * r['cpu']['share_of_machine'].get(g, 0):.0f} %)"
            for r in res_by_src.values()) + " |")
    roles = sorted({k for r in res_by_src.values() for k in r.get("pg_roles", {})})
    if roles:
        rows += ["", "| PostgreSQL of this cluster, by backend | " + " | ".join(f"{c}: CPU s" for c in cols) + " |",
                 "|---|" + "---|" * len(cols)]
        for k in roles:
            rows.append(f"| {k} | " + " | ".join(f"{r.get('pg_roles', {}).get(k, 0):.2f}" for r in res_by_src.values())
                        + " |")
    walls = ", ".join(f"{c} {r['cpu']['wall_secs']:.0f} s" for c, r in res_by_src.items())
    return f"CPU from /proc/<pid>/stat ({os.cpu_count()} cores; wall time {walls}):\n\n" + "\n".join(rows)


def foreign(r):
    """The share of the machine other people's processes took during a run."""
    top = sorted(r.get("foreign_share_by_group", {}).items(), key=lambda kv: -kv[1])[:2]
    return f"{100 * r.get('foreign_share', 0):.0f} %" + (
        " (" + ", ".join(f"{g} {100 * v:.0f} %" for g, v in top) + ")" if top else "")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- latency --

def latency_run(ctx, source, rate, rnd):
    p = ctx.p
    d = f"bench_v2_cdc_lat_{source}"
    fresh_db(ctx, d)
    ctx.tansu.restart()
    tag = f"{source}-{rate // 1000}k-r{rnd}"
    prefix = f"bench.cdclat.{ctx.run_id}.{source}{rate}r{rnd}."
    conn = B.connect(d)
    node = start_engine(ctx, d, source, f"lat-{tag}", prefix)
    ready = wait_ready(conn, node, source, d)
    B.q(conn, "checkpoint")
    outdir = os.path.join(ctx.raw, f"latency-{tag}-loadgen")
    m0 = ctx.cpu.mark()
    act = B.Activity(d)
    cmd = [ctx.bins.loadgen, "run", "--database-url", B.db_url(d), "--kafka-brokers", B.BROKERS,
           "--rate", str(rate), "--duration", str(p["lat_secs"]), "--writers", str(p["lat_writers"]),
           "--events-per-tx", str(p["lat_events_per_tx"]), "--payload-bytes", "100", "--aggregates", "1000",
           "--topic-prefix", prefix, "--topic-partitions", str(B.TOPIC_PARTITIONS), "--name", f"latency-{tag}",
           "--out", outdir, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    m1 = ctx.cpu.mark()
    activity = act.stop()
    slot = B.q(conn, "select pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
                     "from pg_replication_slots where slot_name = %s", (slot_name(d),))
    node.stop()
    conn.close()
    ctx.tansu.stop()
    drop_db(d)
    if out.returncode not in (0, 3):
        raise SystemExit(f"loadgen run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout)["results"]
    events = r["committed"]
    pg = ctx.roles.between(m0, m1)
    res = {"source": source, "rate": rate, "round": rnd, "ready_secs": ready, "cmd": " ".join(cmd[1:]),
           "loadgen": {k: r.get(k) for k in ("committed", "delivered", "lost", "duplicates", "order_violations",
                                             "throughput_eps", "commit_rate_eps", "latency_ms",
                                             "latency_from_intended_ms", "tx_latency_ms", "lag")},
           "loadgen_exit": out.returncode, "loadgen_report": os.path.relpath(outdir, ctx.out) + "/report.json",
           "cpu": B.CpuSampler.between(m0, m1), "pg_roles": pg, "activity": activity,
           "pg_cpu_us_per_event": round(1e6 * sum(pg.values()) / events, 2) if events else None,
           "slot_unconfirmed_bytes_at_end": slot[0][0] if slot else None}
    lat = r["latency_ms"]
    log(f"latency {tag}: p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms, lost {r['lost']}, "
        f"dups {r['duplicates']}, order {r['order_violations']}")
    return res


def m_latency(ctx):
    p = ctx.p
    rates = [int(x) for x in str(p["lat_rates"]).split(",")]
    runs = []
    for rnd in range(1, p["lat_rounds"] + 1):
        for i, rate in enumerate(rates):
            order = SOURCES if (rnd + i) % 2 else SOURCES[::-1]
            for s in order:
                runs.append(measured(ctx, f"latency {s} {rate}",
                                     lambda s=s, rate=rate: latency_run(ctx, s, rate, rnd)))
    kept = [r for r in runs if not r.get("discarded")]
    summary = {}
    for rate in rates:
        for s in SOURCES:
            rs = [r for r in kept if r["rate"] == rate and r["source"] == s]
            summary[f"{s}-{rate}"] = {
                "p50": med(r["loadgen"]["latency_ms"]["p50"] for r in rs),
                "p99": med(r["loadgen"]["latency_ms"]["p99"] for r in rs),
                "p999": med(r["loadgen"]["latency_ms"]["p999"] for r in rs),
                "tx_p99": med(r["loadgen"]["tx_latency_ms"]["p99"] for r in rs),
                "throughput_eps": med(r["loadgen"]["throughput_eps"] for r in rs),
                "lost": sum(r["loadgen"]["lost"] for r in rs),
                "duplicates": sum(r["loadgen"]["duplicates"] for r in rs),
                "order_violations": sum(r["loadgen"]["order_violations"] for r in rs),
                "pg_cpu_us_per_event": med(r["pg_cpu_us_per_event"] for r in rs), "runs": len(rs)}
    metrics = {}
    for rate in rates:
        key = "latency-5k" if rate == 5000 else "latency-20k" if rate == 20000 else f"latency-{rate}"
        metrics[key] = {"poll": summary[f"poll-{rate}"]["p99"], "cdc": summary[f"cdc-{rate}"]["p99"]}
    rows = ["| round | rate | source | p50 | **p99** | p99.9 | max | tx p99 | throughput | lost | dups | order | "
            "PG µs/event | load avg before | after | foreign CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        L, lg = r["loadgen"]["latency_ms"], r["loadgen"]
        rows.append(f"| {r['round']}{' (disturbed)' if r.get('disturbed') else ''} | {r['rate']:,} | {r['source']} | "
                    f"{L['p50']:.1f} | **{L['p99']:.1f}** | {L['p999']:.1f} | {L['max']:.1f} | "
                    f"{lg['tx_latency_ms']['p99']:.1f} | {lg['throughput_eps']:,.0f} | {lg['lost']} | "
                    f"{lg['duplicates']} | {lg['order_violations']} | {r['pg_cpu_us_per_event']} | "
                    f"{' '.join(r['loadavg_before'])} | {' '.join(r['loadavg_after'])} | {foreign(r)} |")
    last = {}
    for r in kept:
        last[f"{r['source']} {r['rate']:,}/s"] = r
    body = "\n".join([
        f"`loadgen run --rate R --writers {p['lat_writers']} --events-per-tx {p['lat_events_per_tx']} "
        f"--payload-bytes 100 --aggregates 1000 --duration {p['lat_secs']}` (open loop) against one engine node "
        "(16 partitions, `--http-addr off`) started on a fresh database and broker before it, polling or CDC "
        "(`OUTBOX_SOURCE`); under CDC the load starts once every partition streams and the slot is read. "
        "Latency: commit returned → loadgen's consumer received the message (ms). The order of the sources "
        "alternates. Raw loadgen reports: " + ", ".join(
            f"[{r['source']} {r['rate']} r{r['round']}]({r['loadgen_report'].replace('/report.json', '/summary.md')})"
            for r in kept) + ".", "", "\n".join(rows), "",
        "Last run of each kind: " + cpu_rows(last), ""] +
        [f"**{k}**, during the load: " + B.activity_md(r["activity"]) + "\n" for k, r in last.items()])
    ctx.write("latency-cdc", {"runs": runs, "summary": summary, "metrics": metrics}, body)


# ----------------------------------------------------------- app overhead --

def m_app(ctx):
    p = ctx.p
    dbs = {s: f"bench_v2_cdc_app_{s}" for s in SOURCES}
    conns = {}
    prefix = f"bench.cdcapp.{ctx.run_id}."
    ctx.tansu.restart()
    for s, d in dbs.items():
        fresh_db(ctx, d)
        B.q(d, B.ORDERS_TABLE)
        conns[s] = B.connect(d)
        node = start_engine(ctx, d, s, f"app-{s}-setup", prefix + s + ".")
        wait_ready(conns[s], node, s, d)   # creates the slot, sets the modes
        node.stop()

    def side(s, with_engine, i):
        d, conn = dbs[s], conns[s]
        res = {"source": s, "engine": with_engine, "round": i}
        node = None
        if with_engine:
            node = start_engine(ctx, d, s, f"app-{s}-{i}", prefix + s + ".")
            res["ready_secs"] = wait_ready(conn, node, s, d)
            res["backlog_drain_secs"] = round(B.wait_pending_empty(conn, node=node), 2)
        B.q(conn, "checkpoint")
        m0 = ctx.cpu.mark()
        act = B.Activity(d)
        res.update(B.pgbench(d, B.APP_TX, p["app_secs"], tag=f"app-cdc-{s}"))
        m1 = ctx.cpu.mark()
        res["cpu"], res["pg_roles"], res["activity"] = B.CpuSampler.between(m0, m1), ctx.roles.between(m0, m1), act.stop()
        if node:
            res["outbox_empty_after_secs"] = round(B.wait_pending_empty(conn, node=node), 2)
            res["engine_exit"] = node.stop()
        log(f"app-overhead {s} {'engine' if with_engine else 'none'} round {i}: {res['tps']:.0f} tps")
        return res

    rounds = []
    for i in range(1, p["app_rounds"] + 1):
        r = {"round": i}
        for s in (SOURCES if i % 2 else SOURCES[::-1]):
            sides = (False, True) if i % 2 else (True, False)
            for e in sides:
                r[f"{s}-{'engine' if e else 'none'}"] = measured(ctx, f"app {s} {e}", lambda s=s, e=e: side(s, e, i))
            r[f"ratio-{s}"] = r[f"{s}-engine"]["tps"] / r[f"{s}-none"]["tps"]
        rounds.append(r)
    ctx.tansu.stop()
    for c in conns.values():
        c.close()
    for d in dbs.values():
        drop_db(d)
    ratios = {s: med(r[f"ratio-{s}"] for r in rounds) for s in SOURCES}
    tps = {f"{s}-{k}": med(r[f"{s}-{k}"]["tps"] for r in rounds) for s in SOURCES for k in ("none", "engine")}
    rows = ["| round | source | no relay: tps | relay running: tps | ratio | load avg (relay side) | "
            "foreign CPU (no relay / relay) |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        for s in SOURCES:
            rows.append(f"| {r['round']} | {s} | {r[f'{s}-none']['tps']:,.0f} | {r[f'{s}-engine']['tps']:,.0f} | "
                        f"{r[f'ratio-{s}']:.3f} | {' '.join(r[f'{s}-engine']['loadavg_before'])} | "
                        f"{foreign(r[f'{s}-none'])} / {foreign(r[f'{s}-engine'])} |")
    last = rounds[-1]
    body = "\n".join([
        f"pgbench, {B.CLIENTS} clients (`-j 2 -M prepared`), {p['app_secs']} s per side, one business-row insert "
        "plus one outbox event per transaction (100,000 aggregates). Each source has its own database; in each "
        "round and for each source, pgbench runs once with no engine and once with one engine node relaying "
        "(started before its side, left to publish the backlog of the no-relay side first); the order of "
        "sources and sides alternates. The CDC database's slot exists on both sides (made before the rounds), "
        "so the no-relay side pays the same WAL as the relay side; only the reading differs.", "",
        "```sql", B.APP_TX.strip(), "```", "", "\n".join(rows), "",
        f"**Median ratio: poll {ratios['poll']:.3f}, cdc {ratios['cdc']:.3f}** (target for CDC ≥ 0.95). Median tps: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in tps.items()) + ".", "",
        "Last round: " + cpu_rows({k: last[k] for k in ("poll-none", "poll-engine", "cdc-none", "cdc-engine")}), "",
        "Last round, poll relaying: " + B.activity_md(last["poll-engine"]["activity"]), "",
        "Last round, CDC relaying: " + B.activity_md(last["cdc-engine"]["activity"])])
    ctx.write("app-overhead-cdc", {"rounds": rounds, "median_ratio": ratios, "median_tps": tps,
                                   "metrics": {"app-overhead": ratios}}, body)


# -------------------------------------------------------------------- e2e --

def e2e_round(ctx, source, secs, rnd):
    ctx.tansu.restart()
    tag = uuid.uuid4().hex[:6]
    d = f"bench_v2_cdc_e2e_{source}"
    fresh_db(ctx, d)
    conn = B.connect(d)
    prefix = f"bench.cdce2e.{tag}."
    topic = prefix + "order"
    B.create_topic(topic)
    ready, expect = (os.path.join(B.LOCAL, f"bench-{tag}.{x}") for x in ("ready", "expect"))
    consumer = subprocess.Popen([B.PY, os.path.join(B.BENCH, "count_consumer.py"), B.BROKERS, topic,
                                 str(B.TOPIC_PARTITIONS), ready, expect], stdout=subprocess.PIPE, text=True)
    node = start_engine(ctx, d, source, f"e2e-{source}-{tag}", prefix)
    res = {"source": source, "round": rnd, "ready_secs": wait_ready(conn, node, source, d)}
    while not os.path.exists(ready):
        time.sleep(0.02)
    time.sleep(0.5)
    m0 = ctx.cpu.mark()
    act = B.Activity(d)
    t0 = time.monotonic()
    pb = B.pgbench(d, B.STMT_50.format(table="outbox"), secs, tag=f"e2e-cdc-{source}")
    t_load = time.monotonic()
    m_load = ctx.cpu.mark()
    res["activity_load"] = act.stop()
    events = pb["transactions"] * 50
    t_pub, published = B.wait_published(conn, events, node=node)
    with open(expect + ".tmp", "w") as f:
        f.write(str(events))
    os.rename(expect + ".tmp", expect)
    out = json.loads(consumer.communicate(timeout=120)[0])
    m1 = ctx.cpu.mark()
    res["engine_exit"] = node.stop()
    for f in (ready, expect):
        os.path.exists(f) and os.remove(f)
    t_done = out["reached_at"] if out["complete"] else None
    pg = ctx.roles.between(m0, m1)
    res.update({
        "load_secs": round(t_load - t0, 2), "statements": pb["transactions"], "events": events,
        "published": published, "commit_rate_eps": events / (t_load - t0),
        "published_after_load_secs": round(t_pub - t_load, 2), "consumed": out["count"],
        "consumed_complete": out["complete"],
        "consumed_after_load_secs": round(t_done - t_load, 2) if t_done else None,
        "eps_published": events / (t_pub - t0), "eps": events / (t_done - t0) if t_done else None,
        "cpu_load": B.CpuSampler.between(m0, m_load), "cpu": B.CpuSampler.between(m0, m1), "pg_roles": pg,
        "pg_cpu_us_per_event": round(1e6 * sum(pg.values()) / events, 2)})
    conn.close()
    drop_db(d)
    log(f"e2e {source}: {events} events, {res['eps'] or 0:,.0f} events/s consumed, "
        f"load {res['commit_rate_eps']:,.0f} events/s")
    return res


def m_e2e(ctx):
    p = ctx.p
    rounds = []
    for i in range(1, p["e2e_rounds"] + 1):
        for s in (SOURCES if i % 2 else SOURCES[::-1]):
            rounds.append(measured(ctx, f"e2e {s}", lambda s=s: e2e_round(ctx, s, p["e2e_secs"], i)))
    ctx.tansu.stop()
    kept = [r for r in rounds if not r.get("discarded")]
    eps = {s: med(r["eps"] for r in kept if r["source"] == s) for s in SOURCES}
    rows = ["| round | source | events | load (s) | commit rate during load | published after load (s) | "
            "consumed after load (s) | **events/s** (to consumed) | consumed | PG µs/event | load avg before | "
            "foreign CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        rows.append(f"| {r['round']}{' (disturbed)' if r.get('disturbed') else ''} | {r['source']} | "
                    f"{r['events']:,} | {r['load_secs']} | {r['commit_rate_eps']:,.0f} | "
                    f"{r['published_after_load_secs']} | {r['consumed_after_load_secs']} | "
                    f"**{B.fmt(r['eps'], 'events/s')}** | {r['consumed']:,} | {r['pg_cpu_us_per_event']} | "
                    f"{' '.join(r['loadavg_before'])} | {foreign(r)} |")
    last = {}
    for r in kept:
        last[r["source"]] = r
    body = "\n".join([
        f"End to end at 50 events per statement (bench.py's insert-path statement: random aggregates, ~150 B "
        f"payloads), pgbench with {B.CLIENTS} clients loading for {p['e2e_secs']} s while one engine node relays "
        "(16 partitions), then until every event is published (`sum(outbox_leases.published)`) and consumed "
        "(`bench/count_consumer.py`). events/s = events / (load start → the consumer has them all). Fresh "
        "database and broker per round; the order alternates.", "", "```sql",
        B.STMT_50.format(table="outbox").strip(), "```", "", "\n".join(rows), "",
        f"**Median events/s: poll {B.fmt(eps['poll'], 'events/s')}, cdc {B.fmt(eps['cdc'], 'events/s')}**.", "",
        "Last round of each, load start → consumed: " + cpu_rows(last), ""] +
        [f"**{k}**, during its load: " + B.activity_md(r["activity_load"]) + "\n" for k, r in last.items()])
    ctx.write("e2e-50-cdc", {"rounds": rounds, "median_eps": eps, "metrics": {"e2e-50": eps}}, body)


# ------------------------------------------------------------------ db cpu --

def pgbench_rate(db, script, secs, rate, tag):
    path = os.path.join(B.LOCAL, f"bench-{tag}.sql")
    with open(path, "w") as f:
        f.write(script)
    out = subprocess.run(["pgbench", "-n", "-M", "prepared", "-c", str(B.CLIENTS), "-j", "2", "-R", str(rate),
                          "-T", str(secs), "-f", path, "-h", "127.0.0.1", "-p", B.PG_SERVER.rsplit(":", 1)[1],
                          "-U", "postgres", db], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    tx = int(re.search(r"number of transactions actually processed: (\d+)", out.stdout).group(1))
    return tx


def cpu_run(ctx, side, rnd):
    p = ctx.p
    d = f"bench_v2_cdc_cpu_{side}"
    fresh_db(ctx, d)
    ctx.tansu.restart()
    conn = B.connect(d)
    node = None
    if side != "none":
        node = start_engine(ctx, d, side, f"cpu-{side}-{rnd}", f"bench.cdccpu.{ctx.run_id}.{side}{rnd}.")
        wait_ready(conn, node, side, d)
    B.q(conn, "checkpoint")
    time.sleep(1)
    m0 = ctx.cpu.mark()
    t0 = time.monotonic()
    tx = pgbench_rate(d, B.STMT_50.format(table="outbox"), p["cpu_secs"], p["cpu_statements_per_sec"],
                      f"cpu-cdc-{side}")
    events = tx * 50
    t_load = time.monotonic()
    if node:
        B.wait_published(conn, events, node=node)
    m1 = ctx.cpu.mark()
    t1 = time.monotonic()
    if node:
        node.stop()
    conn.close()
    ctx.tansu.stop()
    drop_db(d)
    pg = ctx.roles.between(m0, m1)
    total = sum(pg.values())
    res = {"side": side, "round": rnd, "events": events, "load_secs": round(t_load - t0, 2),
           "load_to_published_secs": round(t1 - t0, 2), "cpu": B.CpuSampler.between(m0, m1), "pg_roles": pg,
           "pg_cpu_secs": round(total, 3), "us_per_event": round(1e6 * total / events, 3),
           "us_per_event_by_role": {k: round(1e6 * v / events, 3) for k, v in pg.items()}}
    log(f"db-cpu {side} round {rnd}: {events} events, {res['us_per_event']:.2f} µs/event "
        f"({', '.join(f'{k} {v:.2f}' for k, v in res['us_per_event_by_role'].items())})")
    return res


def m_db_cpu(ctx):
    p = ctx.p
    runs = []
    sides = ("none",) + SOURCES
    for rnd in range(1, p["cpu_rounds"] + 1):
        for s in (sides if rnd % 2 else sides[::-1]):
            runs.append(measured(ctx, f"db-cpu {s}", lambda s=s: cpu_run(ctx, s, rnd)))
    kept = [r for r in runs if not r.get("discarded")]
    per = {s: med(r["us_per_event"] for r in kept if r["side"] == s) for s in sides}
    roles = sorted({k for r in kept for k in r["pg_roles"]})
    by_role = {s: {k: med(r["us_per_event_by_role"].get(k, 0) for r in kept if r["side"] == s) for k in roles}
               for s in sides}
    relay = {s: per[s] - per["none"] for s in SOURCES}
    rows = ["| round | relay | events | load (s) | load → published (s) | **PG µs/event** | "
            + " | ".join(f"{k} µs/event" for k in roles) + " | load avg before | foreign CPU |",
            "|---|---|---|---|---|---|" + "---|" * len(roles) + "---|---|"]
    for r in runs:
        rows.append(f"| {r['round']}{' (disturbed)' if r.get('disturbed') else ''} | {r['side']} | {r['events']:,} | "
                    f"{r['load_secs']} | {r['load_to_published_secs']} | **{r['us_per_event']:.2f}** | "
                    + " | ".join(f"{r['us_per_event_by_role'].get(k, 0):.2f}" for k in roles)
                    + f" | {' '.join(r['loadavg_before'])} | {foreign(r)} |")
    med_rows = ["| relay | PG µs/event | added by the relay | " + " | ".join(roles) + " |",
                "|---|---|---|" + "---|" * len(roles)]
    for s in sides:
        med_rows.append(f"| {s} | {per[s]:.2f} | {'–' if s == 'none' else f'{relay[s]:+.2f}'} | "
                        + " | ".join(f"{by_role[s][k]:.2f}" for k in roles) + " |")
    last = {}
    for r in kept:
        last[r["side"]] = r
    body = "\n".join([
        f"The same rate-limited load for each: pgbench, {B.CLIENTS} clients, `-R {p['cpu_statements_per_sec']}` "
        f"statements/s of 50 events ({50 * p['cpu_statements_per_sec']:,} events/s) for {p['cpu_secs']} s, "
        "(a) with no relay, (b) one polling node, (c) one CDC node; fresh database and broker each. CPU is "
        "utime + stime from /proc/<pid>/stat of every process of this PostgreSQL cluster (the postmaster and its "
        "children: backends, walsender, checkpointer, walwriter...) from load start until everything is "
        "published (load end without a relay), split by pg_stat_activity's backend type and application_name "
        "(engine = `outbox/*`, application = pgbench, harness = this script's samplers), divided by the events "
        "written. The order alternates.", "", "Medians:", "", "\n".join(med_rows), "", "Runs:", "",
        "\n".join(rows), "", "Last round: " + cpu_rows(last)])
    ctx.write("db-cpu-cdc", {"runs": runs, "median_us_per_event": per, "median_us_per_event_by_role": by_role,
                             "relay_us_per_event": relay,
                             "metrics": {"db-cpu": {s: per[s] for s in SOURCES}, "db-cpu-relay": relay}}, body)


# ----------------------------------------------------------------- profile --

METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
HISTOGRAMS = ("outbox_fetch_duration_seconds", "outbox_send_duration_seconds", "outbox_ack_duration_seconds",
              "outbox_batch_size")
GAUGES = ("outbox_cdc_received_lag_seconds", "outbox_cdc_confirmed_lag_seconds", "outbox_cdc_queued_events",
          "outbox_kafka_queue_messages")


def scrape(port):
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    out = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        le = re.search(r'le="([^"]+)"', labels)
        key = (name, le.group(1) if le else None)
        out[key] = out.get(key, 0.0) + v     # summed over other labels
    return out


def hist_delta(a, b, name):
    """Count, mean and bucket quantiles of a histogram between two scrapes."""
    count = b.get((name + "_count", None), 0) - a.get((name + "_count", None), 0)
    total = b.get((name + "_sum", None), 0) - a.get((name + "_sum", None), 0)
    buckets = sorted(((float(k[1]) if k[1] != "+Inf" else float("inf")), b[k] - a.get(k, 0))
                     for k in b if k[0] == name + "_bucket")
    def quant(qq):
        for le, c in buckets:
            if count and c >= qq * count:
                return le
        return None
    return {"count": int(count), "mean": total / count if count else None,
            "p50_le": quant(0.5), "p99_le": quant(0.99)}


def thread_cpu(pid):
    out = {}
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            s = open(f"/proc/{pid}/task/{t}/stat").read()
            comm = s[s.index("(") + 1:s.rindex(")")]
            f = s[s.rfind(")") + 2:].split()
            name = re.sub(r"[-_#]?\d+$", "", comm) or comm
            out[name] = out.get(name, 0) + (int(f[11]) + int(f[12])) / B.CLK
    except OSError:
        pass
    return out


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def profile_run(ctx, source, rate):
    p = ctx.p
    d = f"bench_v2_cdc_prof_{source}"
    fresh_db(ctx, d)
    ctx.tansu.restart()
    port = 19290
    prefix = f"bench.cdcprof.{ctx.run_id}.{source}{rate}."
    env = dict(os.environ, DATABASE_URL=B.db_url(d), KAFKA_BROKERS=B.BROKERS, RUST_LOG="warn",
               OUTBOX_SOURCE=source, **ctx.engine_env)
    for k in ("OUTBOX_CONFIG", "OUTBOX_TOPIC_PREFIX", "OUTBOX_NODE_ID", "OUTBOX_HTTP_ADDR", "OUTBOX_SCHEMA"):
        env.pop(k, None)
    if source == "cdc":
        env["OUTBOX_CDC__SLOT"] = slot_name(d)
    node = B.EngineNode.__new__(B.EngineNode)
    node.log = os.path.join(B.LOCAL, "bench-logs", f"prof-{source}-{rate}.log")
    node.proc = subprocess.Popen([ctx.bins.outbox, "run", "--node-id", f"prof-{source}", "--http-addr",
                                  f"127.0.0.1:{port}", "--topic-prefix", prefix, "--topic-partitions",
                                  str(B.TOPIC_PARTITIONS)], env=env, stdout=open(node.log, "w"),
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    conn = B.connect(d)
    wait_ready(conn, node, source, d)
    B.q(conn, "checkpoint")
    samples, stop_ev = [], threading.Event()

    def sampler():
        c = B.connect(d)
        t0 = time.monotonic()
        while not stop_ev.wait(0.2):
            row = {"t": round(time.monotonic() - t0, 2)}
            try:
                m = scrape(port)
                for g in GAUGES:
                    row[g] = m.get((g, None))
            except Exception as e:
                row["error"] = str(e)
            try:
                r = B.q(c, "select pg_wal_lsn_diff(pg_current_wal_lsn(), sent_lsn)::bigint, "
                           "pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint, "
                           "extract(epoch from write_lag)::float8, extract(epoch from flush_lag)::float8 "
                           "from pg_stat_replication where application_name like 'outbox-cdc/%%'")
                if r:
                    row["unsent_bytes"], row["unconfirmed_bytes"], row["write_lag"], row["flush_lag"] = r[0]
            except Exception:
                pass
            samples.append(row)
        c.close()

    th = threading.Thread(target=sampler, daemon=True)
    m_a = scrape(port)
    thr_a = thread_cpu(node.proc.pid)
    m0 = ctx.cpu.mark()
    act = B.Activity(d)
    th.start()
    outdir = os.path.join(ctx.raw, f"profile-{source}-{rate // 1000}k-loadgen")
    cmd = [ctx.bins.loadgen, "run", "--database-url", B.db_url(d), "--kafka-brokers", B.BROKERS,
           "--rate", str(rate), "--duration", str(p["prof_secs"]), "--writers", str(p["lat_writers"]),
           "--events-per-tx", str(p["lat_events_per_tx"]), "--payload-bytes", "100", "--aggregates", "1000",
           "--topic-prefix", prefix, "--topic-partitions", str(B.TOPIC_PARTITIONS), "--name",
           f"profile-{source}-{rate}", "--out", outdir, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    stop_ev.set()
    th.join()
    m1 = ctx.cpu.mark()
    m_b = scrape(port)
    thr_b = thread_cpu(node.proc.pid)
    activity = act.stop()
    node.stop()
    conn.close()
    ctx.tansu.stop()
    drop_db(d)
    if out.returncode not in (0, 3):
        raise SystemExit(f"loadgen run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout)["results"]
    threads = {k: round(thr_b.get(k, 0) - thr_a.get(k, 0), 2) for k in thr_b}
    threads = dict(sorted(((k, v) for k, v in threads.items() if v > 0), key=lambda kv: -kv[1]))
    series = {}
    for g in GAUGES + ("unsent_bytes", "unconfirmed_bytes", "write_lag", "flush_lag"):
        xs = [s.get(g) for s in samples if s.get(g) is not None]
        series[g] = {"samples": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": max(xs) if xs else None}
    res = {"source": source, "rate": rate, "latency_ms": r["latency_ms"], "tx_latency_ms": r["tx_latency_ms"],
           "lost": r["lost"], "duplicates": r["duplicates"], "order_violations": r["order_violations"],
           "throughput_eps": r["throughput_eps"], "committed": r["committed"],
           "histograms": {h: hist_delta(m_a, m_b, h) for h in HISTOGRAMS}, "gauges": series,
           "engine_threads_cpu_secs": threads, "cpu": B.CpuSampler.between(m0, m1),
           "pg_roles": ctx.roles.between(m0, m1), "activity": activity, "timeline": samples[::5],
           "loadgen_report": os.path.relpath(outdir, ctx.out) + "/report.json"}
    log(f"profile {source} {rate}: p99 {r['latency_ms']['p99']:.1f} ms; send mean "
        f"{(res['histograms']['outbox_send_duration_seconds']['mean'] or 0) * 1000:.1f} ms, ack mean "
        f"{(res['histograms']['outbox_ack_duration_seconds']['mean'] or 0) * 1000:.1f} ms; received lag p99 "
        f"{series['outbox_cdc_received_lag_seconds']['p99']}")
    return res


def m_profile(ctx):
    p = ctx.p
    runs = []
    for rate in [int(x) for x in str(p["prof_rates"]).split(",")]:
        for s in str(p["prof_sources"]).split(","):
            runs.append(measured(ctx, f"profile {s} {rate}", lambda s=s, rate=rate: profile_run(ctx, s, rate)))
    def ms(x):
        return "–" if x is None else f"{1000 * x:.1f}"
    rows = ["| source | rate | p50 / p99 commit → receipt (ms) | tx p99 (ms) | batch size mean | fetch mean | "
            "send mean (p99 ≤) | ack mean (p99 ≤) | commit → engine receipt, sampled p50 / p99 / max (ms) | "
            "walsender unsent bytes p99 | walsender CPU s | engine CPU s | foreign CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        h, g = r["histograms"], r["gauges"]
        rl = g["outbox_cdc_received_lag_seconds"]
        rows.append(
            f"| {r['source']} | {r['rate']:,} | {r['latency_ms']['p50']:.1f} / **{r['latency_ms']['p99']:.1f}** | "
            f"{r['tx_latency_ms']['p99']:.1f} | {h['outbox_batch_size']['mean'] or 0:.0f} | "
            f"{ms(h['outbox_fetch_duration_seconds']['mean'])} | {ms(h['outbox_send_duration_seconds']['mean'])} "
            f"({ms(h['outbox_send_duration_seconds']['p99_le'])}) | {ms(h['outbox_ack_duration_seconds']['mean'])} "
            f"({ms(h['outbox_ack_duration_seconds']['p99_le'])}) | {ms(rl['p50'])} / {ms(rl['p99'])} / "
            f"{ms(rl['max'])} | {g['unsent_bytes']['p99']} | {r['pg_roles'].get('walsender', 0):.2f} | "
            f"{r['cpu']['cpu_secs'].get('outbox', 0):.1f} | {foreign(r)} |")
    body = "\n".join([
        "The latency workload of latency-cdc (`loadgen run`, 32 writers, 10 events/tx, 100 B) against one node "
        "with its metrics endpoint on, scraped every 0.2 s, and `pg_stat_replication` sampled as often. "
        "Histograms are deltas over the run (the p99 column is the upper bound of the bucket holding the 99th "
        "percentile; buckets 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250 ms...). fetch = taking a batch (CDC: from "
        "the hub's queue), send = batch handed to librdkafka → last broker acknowledgement, ack = the "
        "`outbox_leases` update that records the batch. `outbox_cdc_received_lag_seconds` is set when a "
        "transaction's Commit arrives: now − its commit timestamp, so the samples are commit → engine "
        "receipt of the latest transaction.", "", "\n".join(rows), ""] +
        [f"**{r['source']} {r['rate']:,}/s**, engine threads (CPU s): "
         + ", ".join(f"{k} {v}" for k, v in list(r["engine_threads_cpu_secs"].items())[:8])
         + "; PostgreSQL by backend (CPU s): " + ", ".join(f"{k} {v}" for k, v in r["pg_roles"].items())
         + ".\n\n" + cpu_rows({f"{r['source']} {r['rate']}": r}) + "\n\n" + B.activity_md(r["activity"]) + "\n"
         for r in runs])
    ctx.write("profile-cdc", {"runs": runs}, body)


# ------------------------------------------------------------------ README --

def fmtv(v, unit):
    if v is None:
        return "–"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "ratio":
        return f"{v:.3f}"
    if unit == "events/s":
        return f"{v:,.0f}"
    return f"{v:.2f}"


def write_readme(out):
    results = {}
    for name in ("latency-cdc", "app-overhead-cdc", "e2e-50-cdc", "db-cpu-cdc"):
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            results[name] = json.load(open(path))
    lines = ["# CDC next to polling (issue 11)", "",
             "Generated by `bench/run.sh cdc-summary` from the JSON files here; rerun all with `bench/run.sh cdc`, "
             "one with `bench/run.sh <name>`. Both sources run against the same wal_level=logical PostgreSQL "
             "(the 55433 cluster of deploy/services.sh), the same engine binary and settings, in the same "
             "session, alternating; medians of the rounds. Ratio = cdc / poll. Each page lists per run the load "
             "average and the foreign CPU: the share of the machine taken meanwhile by processes that are not "
             "part of the measurement (other engineers' builds, tests and servers on this shared machine).", ""]
    if any(r.get("quick") for r in results.values()):
        lines += ["**Some results below come from `--quick` runs: tooling checks, not measurements.**", ""]
    lines += ["| metric | poll | cdc | ratio | target (cdc) | met? | run |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for key, v in r.get("metrics", {}).items():
            desc, unit, op, target, _ = METRICS[key]
            pv, cv = v.get("poll"), v.get("cdc")
            ratio = f"{cv / pv:.2f}" if pv and cv and pv > 0 else "–"
            if target is None:
                tgt, met = "–", "–"
            else:
                tgt = f"{'≤' if op == '<=' else '≥'} {fmtv(target, unit)}"
                met = "–" if cv is None else ("yes" if (cv <= target if op == "<=" else cv >= target) else "**no**")
            lines.append(f"| {desc} | {fmtv(pv, unit)} | {fmtv(cv, unit)} | {ratio} | {tgt} | {met} | "
                         f"[{name}]({name}.md) ({r['run_id']}, {r['finished_at'][:16]}) |")
    extra = [f for f in ("PROFILE.md", "profile-cdc.md", "demo-cdc.md") if os.path.exists(os.path.join(out, f))]
    subdirs = sorted(d for d in os.listdir(out) if os.path.exists(os.path.join(out, d, "README.md")))
    extra += [f"{d}/README.md" for d in subdirs]
    if extra:
        lines += ["", "See also: " + ", ".join(f"[{f}]({f})" for f in extra) + "."]
    envs = {json.dumps(r.get("engine_env", {}), sort_keys=True) for r in results.values()}
    lines += ["", "Engine environment besides `OUTBOX_SOURCE` (and a slot name per database): "
              + "; ".join(e if e != "{}" else "none (defaults: linger.ms 5, cdc.status_interval_ms 200, "
                          "cdc.heartbeat_ms 1000, relay.batch_size 2000)" for e in sorted(envs)) + ".", ""]
    lines += ["## Provenance", "", "| run | finished | load average at start | git commit | binaries |", "|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["machine"]
        b = m["binaries"]
        lines.append(f"| [{name}]({name}.md) | {r['finished_at']} | {' '.join(m['loadavg_at_start'])} | "
                     f"{m['git_commit'][:10]} | outbox sha256 {b['outbox']['sha256_16']}"
                     + (f" (clean build of {b['built_from_commit'][:10]})" if b.get("built_from_commit") else "")
                     + " |")
    if results:
        lines += ["", B.machine_md(list(results.values())[-1]["machine"]), "",
                  "(bench.py prints `shared_buffers` as setting and unit run together: 16384 × 8kB = 128 MB; "
                  "`wal_buffers` 512 × 8kB = 4 MB.)"]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


MEASUREMENTS = {"latency-cdc": m_latency, "app-overhead-cdc": m_app, "e2e-50-cdc": m_e2e, "db-cpu-cdc": m_db_cpu,
                "profile-cdc": m_profile}
ALL = ["latency-cdc", "app-overhead-cdc", "e2e-50-cdc", "db-cpu-cdc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=list(MEASUREMENTS) + ["cdc", "cdc-summary"])
    ap.add_argument("--quick", action="store_true", help="seconds-long runs, to check the scripts")
    ap.add_argument("--out", default=OUT_DEFAULT)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a parameter: " + ", ".join(f"{k}={v}" for k, v in FULL.items()))
    ap.add_argument("--engine-env", action="append", metavar="OUTBOX_KEY=VALUE",
                    help="environment for every engine node of both sources")
    args = ap.parse_args()
    if args.name == "cdc-summary":
        write_readme(os.path.abspath(args.out))
        return
    os.makedirs(os.path.join(B.LOCAL, "bench-logs"), exist_ok=True)
    ctx = Ctx(args)
    names = ALL if args.name == "cdc" else [args.name]
    failed = []
    t_all = time.monotonic()
    try:
        for n in names:
            log(f"=== {n} ({'quick' if args.quick else 'full'})")
            t = time.monotonic()
            try:
                MEASUREMENTS[n](ctx)
            except (Exception, SystemExit) as e:
                failed.append(n)
                log(f"=== {n} FAILED: {e!r}")
                ctx.tansu.stop()
                continue
            log(f"=== {n} done in {time.monotonic() - t:.0f} s")
    finally:
        ctx.tansu.stop()
    log(f"all done in {time.monotonic() - t_all:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
