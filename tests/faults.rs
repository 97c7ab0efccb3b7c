//! Transient faults against real `outbox run` processes: the broker goes
//! away and comes back empty, the network to the database or to the broker
//! is cut for a while, PostgreSQL restarts, and nodes are killed -9 at
//! random moments under load. In every case the engine must recover by
//! itself and lose nothing; duplicates stay within the in-flight bound.
//!
//! Every test has its own database, topics, and (where it breaks things)
//! its own broker, proxy or PostgreSQL cluster: the shared broker and the
//! system PostgreSQL are never stopped.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use outbox_engine::{Enqueuer, NewEvent};
use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use support::proxy::{ProxiedBroker, Proxy};
use support::*;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Outbox partitions of every test database.
const PARTITIONS: u32 = 4;
/// Relay batch size and in-flight batches per partition, passed as flags
/// so that the duplicate bound is known.
const BATCH: usize = 200;
const INFLIGHT: usize = 2;
/// At most this many events can be re-sent per node failure: every
/// partition's whole in-flight window.
const WINDOW: usize = PARTITIONS as usize * INFLIGHT * BATCH;

// ---------------------------------------------------------------------------
// Engine processes

/// How an `outbox run` child is started.
struct NodeSpec<'a> {
    database_url: &'a str,
    brokers: &'a str,
    node_id: &'a str,
    prefix: &'a str,
    lease_ttl_ms: u64,
    heartbeat_ms: u64,
    /// Where the engine's stderr goes.
    log: &'a Path,
    /// Port of /metrics and /readyz (0: any).
    http_port: u16,
}

/// The `outbox` binary with the given database and broker.
fn outbox_at(database_url: &str, brokers: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"));
    cmd.env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", brokers)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env("OUTBOX_HTTP_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// `line` without ANSI colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn spawn_node(spec: &NodeSpec) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log)
        .expect("engine log file");
    outbox_at(spec.database_url, spec.brokers)
        .args(["run", "--node-id", spec.node_id])
        .args(["--topic-prefix", spec.prefix])
        .args(["--topic-partitions", &TOPIC_PARTITIONS.to_string()])
        .args(["--lease-ttl-ms", &spec.lease_ttl_ms.to_string()])
        .args(["--heartbeat-interval-ms", &spec.heartbeat_ms.to_string()])
        .args(["--batch-size", &BATCH.to_string()])
        .args(["--max-inflight-batches", &INFLIGHT.to_string()])
        .env("OUTBOX_HTTP_ADDR", format!("127.0.0.1:{}", spec.http_port))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn outbox run")
}

/// A log file for one test's engine processes.
fn log_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "outbox-faults-{test}-{}.log",
        &Uuid::new_v4().simple().to_string()[..8]
    ))
}

/// Lines and WARN/ERROR counts of an engine log, and its distinct messages
/// (timestamps and fields stripped), for the report.
fn log_summary(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut warn, mut error, mut panics) = (0, 0, 0);
    let mut kinds: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = strip_ansi(line);
        if line.contains(" WARN ") {
            warn += 1;
        }
        if line.contains(" ERROR ") || line.starts_with("error") {
            error += 1;
        }
        if line.contains("panicked") {
            panics += 1;
        }
        // `... WARN target: message key=value ...` -> `WARN target: message`
        let rest = if line.starts_with("error") {
            &line[..]
        } else {
            let Some(i) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
                continue;
            };
            &line[i + 1..]
        };
        let cut = rest
            .find(" partition=")
            .or_else(|| rest.find(" error="))
            .or_else(|| rest.find(" retry_in="))
            .unwrap_or(rest.len());
        let kind: String = rest[..cut].chars().take(110).collect();
        if !kinds.contains(&kind) && kinds.len() < 8 {
            kinds.push(kind);
        }
    }
    format!(
        "log {}: {} lines, {warn} WARN, {error} ERROR, {panics} panics; kinds: {kinds:#?}",
        path.display(),
        text.lines().count()
    )
}

/// Fails if an engine process panicked (a worker task included).
fn assert_no_panic(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        !text.contains("panicked"),
        "an engine process panicked; {}",
        log_summary(path)
    );
}

/// The `retry_in` delays an engine log announced, in order.
fn logged_retries(path: &Path) -> Vec<Duration> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let v = strip_ansi(l)
                .split_once("retry_in=")?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic() || c == 'µ')?);
            let n: f64 = num.parse().ok()?;
            let secs = match unit {
                "s" => n,
                "ms" => n / 1e3,
                "µs" | "us" => n / 1e6,
                "ns" => n / 1e9,
                _ => return None,
            };
            Some(Duration::from_secs_f64(secs))
        })
        .collect()
}

/// SIGTERMs a node and waits for its exit code.
async fn stop_node(mut node: Child) -> Option<i32> {
    if node.try_wait().ok().flatten().is_none() {
        send_signal(&node, "TERM");
    }
    match tokio::time::timeout(Duration::from_secs(40), node.wait()).await {
        Ok(Ok(status)) => status.code(),
        _ => {
            let _ = node.start_kill();
            None
        }
    }
}

// ---------------------------------------------------------------------------
// The process's resources, from /proc

fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized command: state is field 3, so utime
    // (field 14) and stime (field 15) are at 11 and 12.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds used by `pid` so far.
fn cpu_secs(pid: u32, tck: u64) -> f64 {
    cpu_ticks(pid).unwrap_or(0) as f64 / tck as f64
}

// ---------------------------------------------------------------------------
// `outbox status --json`

struct StatusView {
    pending: i64,
    owners: HashMap<String, usize>,
    nodes: Vec<(String, i64)>,
}

async fn status(database_url: &str) -> Option<StatusView> {
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        outbox_at(database_url, "unused:1")
            .args(["status", "--json"])
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let parts = v["partitions"].as_array()?;
    let mut owners = HashMap::new();
    for p in parts {
        if let Some(o) = p["owner"].as_str() {
            *owners.entry(o.to_string()).or_default() += 1;
        }
    }
    Some(StatusView {
        pending: parts.iter().filter_map(|p| p["pending"].as_i64()).sum(),
        owners,
        nodes: v["nodes"]
            .as_array()?
            .iter()
            .map(|n| {
                (
                    n["node_id"].as_str().unwrap_or_default().to_string(),
                    n["partitions"].as_i64().unwrap_or(-1),
                )
            })
            .collect(),
    })
}

/// Polls `status` until the backlog is empty; returns how long it took.
async fn wait_drained(database_url: &str, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if status(database_url).await.is_some_and(|s| s.pending == 0) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

// ---------------------------------------------------------------------------
// Load

/// What a writer committed: ids in commit order, and transactions that
/// failed (not counted; their fate is unknown to the writer).
struct Written {
    committed: Vec<Uuid>,
    failed_tx: u64,
}

/// Writes `per_tx` events per transaction, one per aggregate
/// `<key>0..<key>{per_tx-1}` with increasing `seq`, pausing `pause` between
/// transactions, until `stop`. A failed transaction (the database going
/// away) is retried after a moment; only committed ones count.
fn spawn_load(
    pool: PgPool,
    key: &str,
    per_tx: usize,
    pause: Duration,
    stop: CancellationToken,
) -> JoinHandle<Written> {
    let key = key.to_string();
    tokio::spawn(async move {
        let outbox = Enqueuer::new("public").expect("enqueuer");
        let mut written = Written {
            committed: Vec::new(),
            failed_tx: 0,
        };
        let mut seq = 0i64;
        while !stop.is_cancelled() {
            let events: Vec<NewEvent> = (0..per_tx)
                .map(|a| {
                    NewEvent::new("order", format!("{key}{a}"), "Tick", &json!({ "seq": seq }))
                        .expect("event")
                })
                .collect();
            seq += 1;
            let tx = async {
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, &events).await?;
                tx.commit().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            match tokio::time::timeout(Duration::from_secs(10), tx).await {
                Ok(Ok(())) => written.committed.extend(events.iter().map(|e| e.id)),
                _ => {
                    written.failed_tx += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            tokio::time::sleep(pause).await;
        }
        written
    })
}

// ---------------------------------------------------------------------------
// Consuming

/// Reads `topics` from the beginning at `bootstrap` until every id of
/// `want` arrived (then `grace` longer, to see duplicates) or `timeout`.
async fn consume_ids(
    bootstrap: &str,
    topics: &[String],
    want: &[Uuid],
    timeout: Duration,
    grace: Duration,
) -> Vec<Received> {
    let bootstrap = bootstrap.to_string();
    let topics = topics.to_vec();
    let mut missing: HashSet<Uuid> = want.iter().copied().collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("faults-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for t in &topics {
            for p in 0..TOPIC_PARTITIONS {
                tpl.add_partition_offset(t, p, Offset::Beginning)
                    .expect("partition offset");
            }
        }
        consumer.assign(&tpl).expect("assign");
        let start = Instant::now();
        let mut out = Vec::new();
        let mut done_at: Option<Instant> = missing.is_empty().then(Instant::now);
        let mut errors = 0;
        loop {
            if start.elapsed() > timeout || done_at.is_some_and(|t| t.elapsed() > grace) {
                break;
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let r = Received::from_message(&m);
                    missing.remove(&r.id());
                    out.push(r);
                    if missing.is_empty() && done_at.is_none() {
                        done_at = Some(Instant::now());
                    }
                }
                Some(Err(e)) => {
                    errors += 1;
                    if errors <= 5 {
                        eprintln!("consumer error: {e}");
                    }
                }
                None => {}
            }
        }
        out
    })
    .await
    .expect("consumer thread")
}

/// Delivery figures of `committed` in `received`.
struct Delivery {
    received: usize,
    lost: usize,
    duplicates: usize,
    order_violations: usize,
}

fn delivery(committed: &[Uuid], received: &[Received]) -> Delivery {
    let (lost, duplicates) = lost_and_duplicates(committed, received);
    Delivery {
        received: received.len(),
        lost,
        duplicates,
        order_violations: order_violations(received),
    }
}

/// Consumes `topic` at `bootstrap` until every id of `committed` arrived
/// (then `grace` longer, to see duplicates) and returns the delivery
/// figures. If the backlog did not drain, it waits 10 s rather than 60 s.
async fn delivered(
    bootstrap: &str,
    topic: &str,
    committed: &[Uuid],
    drained: Option<Duration>,
    grace: Duration,
) -> Delivery {
    let wait = Duration::from_secs(if drained.is_some() { 60 } else { 10 });
    let got = consume_ids(bootstrap, &[topic.to_string()], committed, wait, grace).await;
    delivery(committed, &got)
}

/// The checks every fault test ends with: the engine (if `running` is
/// given, whether it was still up) did not exit or panic, the backlog
/// drained (else `not_drained` is the message), no committed event was
/// lost (else `lost` is the message), at most `max_duplicates` were
/// re-sent, and first deliveries came in order.
fn assert_recovered(
    running: Option<bool>,
    log: &Path,
    drained: Option<Duration>,
    not_drained: &str,
    d: &Delivery,
    lost: &str,
    max_duplicates: usize,
) {
    if let Some(running) = running {
        assert!(running, "the engine exited; {}", log_summary(log));
    }
    assert_no_panic(log);
    assert!(drained.is_some(), "{not_drained}");
    assert_eq!(d.lost, 0, "{lost}");
    assert!(
        d.duplicates <= max_duplicates,
        "{} duplicates > {max_duplicates}",
        d.duplicates
    );
    assert_eq!(d.order_violations, 0, "first deliveries out of order");
}

/// The engine used under a quarter of a core (`cpu_share` of one) while
/// `during` lasted: it waited rather than spinning.
fn assert_idle(cpu_share: f64, during: &str) {
    assert!(
        cpu_share < 0.25,
        "engine used {:.0}% of a core while {during} (busy loop?)",
        cpu_share * 100.0
    );
}

/// The engine's memory (RSS, KiB) grew by under 64 MiB from `rss0` to
/// `rss_max` while `during` lasted.
fn assert_small(rss0: u64, rss_max: u64, during: &str) {
    assert!(
        rss_max.saturating_sub(rss0) < 64 * 1024,
        "engine memory grew by {} KiB while {during}",
        rss_max.saturating_sub(rss0)
    );
}

// ---------------------------------------------------------------------------
// Helpers for the network

/// `url` with its `host:port` replaced by `addr`.
fn url_via(url: &str, addr: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("url has a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let userinfo = authority.rfind('@').map(|i| &authority[..=i]).unwrap_or("");
    format!("{scheme}://{userinfo}{addr}{}", &rest[end..])
}

/// The `host:port` of a postgres URL, resolved.
fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("url has a scheme").1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    host_port
        .to_socket_addrs()
        .expect("resolve database host")
        .find(|a| a.is_ipv4())
        .expect("an IPv4 address for the database")
}

/// A gauge from the node's /metrics, if it has been set.
async fn gauge(http_port: u16, name: &str) -> Option<i64> {
    let (_, body) = http_get(http_port, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

/// Sleeps up to `period` inside the fault window `start..start + total`;
/// returns whether there is time left for another sample (a status call
/// takes up to a second). Once it returns false, the window is over.
async fn next_sample(start: Instant, total: Duration, period: Duration) -> bool {
    tokio::time::sleep(period.min(total.saturating_sub(start.elapsed()))).await;
    if total.saturating_sub(start.elapsed()) > Duration::from_secs(1) {
        return true;
    }
    tokio::time::sleep(total.saturating_sub(start.elapsed())).await;
    false
}

fn outage_secs() -> u64 {
    std::env::var("OUTBOX_FAULT_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

// ---------------------------------------------------------------------------
// The tests

/// The broker is down for 30 s and comes back empty (tansu in memory mode
/// loses its topics too). Meanwhile writers keep committing: the backlog
/// grows in `status`, the engine neither spins nor grows, and once the
/// broker is back the engine re-creates the topic and drains everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_30s() {
    let started = Instant::now();
    let outage = Duration::from_secs(outage_secs());
    let tck = clock_ticks_per_sec();
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    let mut broker = tokio::task::block_in_place(PrivateBroker::start);
    let log = log_path("broker_outage");
    let http_port = free_port();
    let node = spawn_node(&NodeSpec {
        database_url: &db.url,
        brokers: &broker.addr(),
        node_id: "outage",
        prefix: &prefix,
        lease_ttl_ms: 2_000,
        heartbeat_ms: 250,
        log: &log,
        http_port,
    });
    let pid = node.id().expect("pid");

    // Phase 1: the pipeline works; everything written so far is consumed.
    let stop1 = CancellationToken::new();
    let w1 = spawn_load(
        db.pool.clone(),
        "p1-",
        10,
        Duration::from_millis(10),
        stop1.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop1.cancel();
    let phase1 = w1.await.unwrap();
    let drained1 = wait_drained(&db.url, Duration::from_secs(60)).await;
    assert!(drained1.is_some(), "phase 1 did not drain");
    let got1 = consume_ids(
        &broker.addr(),
        std::slice::from_ref(&topic),
        &phase1.committed,
        Duration::from_secs(60),
        Duration::from_millis(300),
    )
    .await;
    let d1 = delivery(&phase1.committed, &got1);
    eprintln!(
        "[broker_outage] phase 1: committed {} received {} lost {}",
        phase1.committed.len(),
        d1.received,
        d1.lost
    );
    assert_eq!(d1.lost, 0, "phase 1 lost events before any fault");

    // Phase 2: the broker goes away; writers go on.
    tokio::task::block_in_place(|| broker.stop());
    let outage_start = Instant::now();
    let cpu0 = cpu_secs(pid, tck);
    let rss0 = rss_kib(pid).unwrap_or(0);
    let stop2 = CancellationToken::new();
    let w2 = spawn_load(
        db.pool.clone(),
        "p2-",
        10,
        Duration::from_millis(10),
        stop2.clone(),
    );
    let mut samples: Vec<(u64, i64)> = Vec::new();
    let mut rss_max = rss0;
    // librdkafka's queue (the events in flight) and /readyz, as sampled.
    let mut queued: Vec<Option<i64>> = Vec::new();
    let mut readyz: Vec<Option<u16>> = Vec::new();
    let mut node = node;
    while next_sample(outage_start, outage, Duration::from_secs(2)).await {
        if let Some(s) = status(&db.url).await {
            samples.push((outage_start.elapsed().as_secs(), s.pending));
        }
        rss_max = rss_max.max(rss_kib(pid).unwrap_or(0));
        queued.push(gauge(http_port, "outbox_kafka_queue_messages").await);
        readyz.push(http_get(http_port, "/readyz").await.map(|r| r.0));
        assert!(
            node.try_wait().unwrap().is_none(),
            "the engine exited while the broker was away; {}",
            log_summary(&log)
        );
    }
    let outage_took = outage_start.elapsed();
    let cpu1 = cpu_secs(pid, tck);
    let rss1 = rss_kib(pid).unwrap_or(0);
    rss_max = rss_max.max(rss1);

    // Phase 3: the broker is back (empty); writers go on a little longer.
    tokio::task::block_in_place(|| broker.restart());
    let restored = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop2.cancel();
    let phase2 = w2.await.unwrap();
    // Backlog per second after the restore, recorded when it changes.
    let mut drain_samples: Vec<(u64, i64)> = Vec::new();
    let drained = loop {
        if let Some(s) = status(&db.url).await {
            let at = restored.elapsed().as_secs();
            if drain_samples.last().is_none_or(|l| l.1 != s.pending) {
                drain_samples.push((at, s.pending));
            }
            if s.pending == 0 {
                break Some(restored.elapsed());
            }
        }
        if restored.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let cpu_after = cpu_secs(pid, tck);
    let after_took = restored.elapsed();
    let queued_after = gauge(http_port, "outbox_kafka_queue_messages").await;
    let ready_after = http_get(http_port, "/readyz").await.map(|r| r.0);
    let d = delivered(
        &broker.addr(),
        &topic,
        &phase2.committed,
        drained,
        Duration::from_secs(1),
    )
    .await;
    let running = node.try_wait().unwrap().is_none();
    let cpu_total = cpu_secs(pid, tck);
    let rss_end = rss_kib(pid).unwrap_or(0);
    let code = if drained.is_some() {
        stop_node(node).await
    } else {
        // A stuck engine would spend its whole shutdown timeout draining.
        let _ = node.start_kill();
        None
    };
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let outage_cpu = (cpu1 - cpu0) / outage_took.as_secs_f64();
    let first_pending = samples.first().map_or(0, |s| s.1);
    let max_pending = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "[broker_outage] outage {:.1}s: committed during+after {} (failed tx {}), received {}, \
         lost {}, duplicates {}, order violations {}",
        outage_took.as_secs_f64(),
        phase2.committed.len(),
        phase2.failed_tx,
        d.received,
        d.lost,
        d.duplicates,
        d.order_violations
    );
    let max_queued = queued.iter().flatten().max().copied();
    eprintln!(
        "[broker_outage] pending during outage (s, pending): {samples:?}; max pending \
         {max_pending}; producer queue (events in flight) {queued:?}, max {max_queued:?} \
         (window {WINDOW}); /readyz {readyz:?}"
    );
    eprintln!(
        "[broker_outage] after restore (s, pending): {drain_samples:?}; drained in {drained:?}; \
         engine cpu meanwhile {:.1}% of a core; producer queue {queued_after:?}; /readyz \
         {ready_after:?}",
        (cpu_after - cpu1) / after_took.as_secs_f64() * 100.0
    );
    eprintln!(
        "[broker_outage] engine during outage: cpu {:.2}s = {:.1}% of a core; rss {} -> {} KiB \
         (max {}, growth {} KiB); total cpu {cpu_total:.1}s, rss at end {rss_end} KiB; \
         exit {code:?}; test took {:.1}s",
        cpu1 - cpu0,
        outage_cpu * 100.0,
        rss0,
        rss1,
        rss_max,
        rss_max.saturating_sub(rss0),
        started.elapsed().as_secs_f64()
    );
    eprintln!("[broker_outage] {}", log_summary(&log));

    // Once it was back: everything arrived, once, in order.
    assert_recovered(
        Some(running),
        &log,
        drained,
        &format!(
            "the backlog did not drain within 60 s after the broker came back \
             (pending after restore: {drain_samples:?}; librdkafka's queue {queued_after:?}; \
             /readyz {ready_after:?})"
        ),
        &d,
        "events committed during/after the outage lost",
        WINDOW,
    );
    // While the broker was away: the backlog grew, the engine stayed small
    // and idle.
    assert!(
        max_pending > first_pending && max_pending > 1_000,
        "status did not show the backlog growing: {samples:?}"
    );
    assert!(
        max_queued.is_some_and(|q| q <= WINDOW as i64),
        "the in-flight window is not bounded: producer queue {queued:?} > {WINDOW}"
    );
    assert_idle(outage_cpu, "the broker was away");
    assert_small(rss0, rss_max, "the broker was away");
    assert_eq!(code, Some(0), "SIGTERM after recovery did not exit 0");
    let _ = std::fs::remove_file(&log);
}

/// The engine's connections to PostgreSQL go through a proxy that is cut
/// for 8 s, longer than the 2 s lease TTL: the node loses its leases and
/// registration, then takes its partitions back, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut() {
    let started = Instant::now();
    let tck = clock_ticks_per_sec();
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    let proxy = Proxy::start(url_addr(&db.url));
    let proxied_url = url_via(&db.url, &proxy.addr());
    let log = log_path("database_cut");
    let mut node = spawn_node(&NodeSpec {
        database_url: &proxied_url,
        brokers: &brokers(),
        node_id: "cut",
        prefix: &prefix,
        lease_ttl_ms: 2_000,
        heartbeat_ms: 250,
        log: &log,
        http_port: 0,
    });
    let pid = node.id().expect("pid");
    let spread = wait_for_owners(&db, &[("cut", PARTITIONS as i64)], Duration::from_secs(20)).await;
    assert_eq!(spread.get("cut"), Some(&(PARTITIONS as i64)), "{spread:?}");

    // The writer goes straight to PostgreSQL, not through the proxy.
    let stop = CancellationToken::new();
    let writer = spawn_load(
        db.pool.clone(),
        "a",
        10,
        Duration::from_millis(10),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy.cut();
    let cut_at = Instant::now();
    let cpu0 = cpu_secs(pid, tck);
    let rss0 = rss_kib(pid).unwrap_or(0);
    let mut samples = Vec::new();
    while next_sample(cut_at, Duration::from_secs(8), Duration::from_secs(1)).await {
        if let Some(s) = status(&db.url).await {
            samples.push((
                cut_at.elapsed().as_secs(),
                s.pending,
                s.owners.get("cut").copied().unwrap_or(0),
            ));
        }
        assert!(
            node.try_wait().unwrap().is_none(),
            "the engine exited while the database was unreachable; {}",
            log_summary(&log)
        );
    }
    let cut_took = cut_at.elapsed();
    let cut_cpu = (cpu_secs(pid, tck) - cpu0) / cut_took.as_secs_f64();
    let rss1 = rss_kib(pid).unwrap_or(0);
    proxy.restore();
    let restored = Instant::now();
    let owned = wait_for_owners(&db, &[("cut", PARTITIONS as i64)], Duration::from_secs(30)).await;
    let reowned_in = restored.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let written = writer.await.unwrap();
    let drained = wait_drained(&db.url, Duration::from_secs(60)).await;
    let view = status(&db.url).await;
    let d = delivered(
        &brokers(),
        &topic,
        &written.committed,
        drained,
        Duration::from_secs(1),
    )
    .await;
    let running = node.try_wait().unwrap().is_none();
    let (forwarded, reset) = proxy.counts();
    let rss_end = rss_kib(pid).unwrap_or(0);
    let code = stop_node(node).await;
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let max_pending = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "[database_cut] committed {} received {} lost {} duplicates {} (bound {WINDOW}) \
         order violations {}",
        written.committed.len(),
        d.received,
        d.lost,
        d.duplicates,
        d.order_violations
    );
    eprintln!(
        "[database_cut] during the {:.1}s cut (s, pending, partitions owned): {samples:?}; \
         max pending {max_pending}; engine cpu {:.1}% of a core, rss {rss0} -> {rss1} KiB \
         (end {rss_end})",
        cut_took.as_secs_f64(),
        cut_cpu * 100.0
    );
    eprintln!(
        "[database_cut] owners after restore {owned:?} within {reowned_in:?}; drained {drained:?}; \
         status nodes {:?}; proxy: {forwarded} connections forwarded, {reset} reset; exit {code:?}; \
         test took {:.1}s",
        view.as_ref().map(|v| v.nodes.clone()),
        started.elapsed().as_secs_f64()
    );
    eprintln!("[database_cut] {}", log_summary(&log));
    let retries = logged_retries(&log);
    let (lo, hi) = (
        retries.iter().min().copied().unwrap_or_default(),
        retries.iter().max().copied().unwrap_or_default(),
    );
    let distinct: HashSet<Duration> = retries.iter().copied().collect();
    eprintln!(
        "[database_cut] {} retries logged with a delay, {} distinct delays, from {lo:?} to {hi:?}",
        retries.len(),
        distinct.len()
    );

    assert_recovered(
        Some(running),
        &log,
        drained,
        "backlog did not drain after the cut",
        &d,
        "events lost",
        WINDOW,
    );
    // It logged, and backed off with jitter rather than hammering.
    assert!(
        !retries.is_empty() && retries.len() < 400,
        "{} retries logged in an 8 s cut",
        retries.len()
    );
    assert!(
        distinct.len() * 2 > retries.len(),
        "retry delays without jitter: {retries:?}"
    );
    assert!(hi >= lo * 3, "the backoff did not grow: {retries:?}");
    assert_eq!(
        owned.get("cut"),
        Some(&(PARTITIONS as i64)),
        "the node did not take its partitions back: {owned:?}"
    );
    let view = view.expect("status after the cut");
    assert_eq!(
        view.owners.get("cut"),
        Some(&(PARTITIONS as usize)),
        "status does not show the node owning every partition"
    );
    assert_eq!(view.nodes, vec![("cut".to_string(), PARTITIONS as i64)]);
    assert!(
        samples.iter().any(|s| s.2 == 0),
        "the leases never expired during the cut: {samples:?}"
    );
    assert_idle(cut_cpu, "the database was cut");
    assert_eq!(code, Some(0), "SIGTERM after recovery did not exit 0");
    let _ = std::fs::remove_file(&log);
}

/// A private PostgreSQL cluster (initdb in a temp dir), so that a test can
/// restart a real server without touching the shared one.
struct PrivatePg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// Run the server's tools as `postgres` (initdb refuses root).
    as_postgres: bool,
}

impl PrivatePg {
    fn bin_dir() -> Option<PathBuf> {
        if let Ok(out) = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").exists() {
                return Some(dir);
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, b)| b)
    }

    fn tool(&self, name: &str) -> std::process::Command {
        let exe = self.bin.join(name);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    fn run(&self, name: &str, args: &[&str]) -> Result<(), String> {
        let out = self
            .tool(name)
            .args(args)
            .output()
            .map_err(|e| format!("{name}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{name} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn log(&self) -> String {
        self.dir.join("server.log").to_string_lossy().into_owned()
    }

    /// initdb + start on a free port; an error says why it cannot be done
    /// here (no PostgreSQL binaries, no `postgres` user to run them as).
    fn start() -> Result<PrivatePg, String> {
        let bin = Self::bin_dir().ok_or("no initdb found (pg_config, /usr/lib/postgresql)")?;
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = std::env::temp_dir().join(format!(
            "outbox-faults-pg-{}",
            &Uuid::new_v4().simple().to_string()[..10]
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pg = PrivatePg {
            dir,
            bin,
            port: free_port(),
            as_postgres: root,
        };
        if root {
            let ok = std::process::Command::new("chown")
                .args(["postgres"])
                .arg(&pg.dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err("running as root and cannot chown the data dir to postgres".into());
            }
        }
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n",
            pg.port,
            pg.dir.display()
        );
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(pg.dir.join("data/postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        pg.run(
            "pg_ctl",
            &["-D", &pg.data(), "-l", &pg.log(), "-w", "start"],
        )?;
        Ok(pg)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn restart(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &self.log(),
                "-m",
                "fast",
                "-w",
                "restart",
            ],
        )
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PostgreSQL itself restarts (`pg_ctl restart -m fast`) under load: every
/// connection of the engine dies at once. Writers' transactions may fail
/// during the restart; every one that committed is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart() {
    let started = Instant::now();
    let pg = match tokio::task::block_in_place(PrivatePg::start) {
        Ok(pg) => pg,
        Err(why) => {
            // Only a machine without PostgreSQL's server binaries gets here;
            // `database_cut` still covers a database that goes away.
            eprintln!("[database_restart] SKIPPED: cannot run a private PostgreSQL: {why}");
            return;
        }
    };
    let setup = started.elapsed();
    let url = pg.url();
    let out = outbox_at(&url, "unused:1")
        .args(["migrate", "--partitions", &PARTITIONS.to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .expect("connect the private cluster");
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    let log = log_path("database_restart");
    let mut node = spawn_node(&NodeSpec {
        database_url: &url,
        brokers: &brokers(),
        node_id: "restart",
        prefix: &prefix,
        lease_ttl_ms: 2_000,
        heartbeat_ms: 250,
        log: &log,
        http_port: 0,
    });
    let pid = node.id().expect("pid");
    let owned = eventually(Duration::from_secs(20), || async {
        status(&url)
            .await
            .is_some_and(|s| s.owners.get("restart") == Some(&(PARTITIONS as usize)))
    })
    .await;
    assert!(owned, "the node did not take its partitions");

    let stop = CancellationToken::new();
    let writer = spawn_load(
        pool.clone(),
        "a",
        10,
        Duration::from_millis(10),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restart_at = Instant::now();
    tokio::task::block_in_place(|| pg.restart()).expect("pg_ctl restart");
    let restart_took = restart_at.elapsed();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let written = writer.await.unwrap();
    let drained = wait_drained(&url, Duration::from_secs(60)).await;
    let view = status(&url).await;
    let d = delivered(
        &brokers(),
        &topic,
        &written.committed,
        drained,
        Duration::from_secs(1),
    )
    .await;
    let running = node.try_wait().unwrap().is_none();
    let rss = rss_kib(pid).unwrap_or(0);
    let cpu = cpu_secs(pid, clock_ticks_per_sec());
    let code = stop_node(node).await;
    pool.close().await;

    eprintln!(
        "[database_restart] private cluster ready in {:.2}s; restart took {:.2}s; committed {} \
         (failed tx {}) received {} lost {} duplicates {} (bound {WINDOW}) order violations {}",
        setup.as_secs_f64(),
        restart_took.as_secs_f64(),
        written.committed.len(),
        written.failed_tx,
        d.received,
        d.lost,
        d.duplicates,
        d.order_violations
    );
    eprintln!(
        "[database_restart] drained {drained:?}; owners after {:?}; engine cpu {cpu:.1}s rss {rss} \
         KiB; exit {code:?}; test took {:.1}s",
        view.as_ref().map(|v| v.owners.clone()),
        started.elapsed().as_secs_f64()
    );
    eprintln!("[database_restart] {}", log_summary(&log));

    assert_recovered(
        Some(running),
        &log,
        drained,
        "backlog did not drain after the restart",
        &d,
        "events lost",
        WINDOW,
    );
    assert_eq!(code, Some(0), "SIGTERM after recovery did not exit 0");
    let _ = std::fs::remove_file(&log);
    drop(pg);
}

/// The network between the engine and the broker is cut for 10 s: every
/// connection (bootstrap and the advertised address alike) goes through a
/// proxy. The broker keeps its data, so everything committed is on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_network_cut() {
    let started = Instant::now();
    let tck = clock_ticks_per_sec();
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    let broker = tokio::task::block_in_place(ProxiedBroker::start);
    let log = log_path("broker_network_cut");
    let mut node = spawn_node(&NodeSpec {
        database_url: &db.url,
        brokers: &broker.addr(),
        node_id: "netcut",
        prefix: &prefix,
        lease_ttl_ms: 2_000,
        heartbeat_ms: 250,
        log: &log,
        http_port: 0,
    });
    let pid = node.id().expect("pid");
    let stop = CancellationToken::new();
    let writer = spawn_load(
        db.pool.clone(),
        "a",
        10,
        Duration::from_millis(10),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    broker.proxy.cut();
    let cut_at = Instant::now();
    let cpu0 = cpu_secs(pid, tck);
    let rss0 = rss_kib(pid).unwrap_or(0);
    let mut rss_max = rss0;
    let mut samples = Vec::new();
    while next_sample(cut_at, Duration::from_secs(10), Duration::from_secs(2)).await {
        if let Some(s) = status(&db.url).await {
            samples.push((cut_at.elapsed().as_secs(), s.pending));
        }
        rss_max = rss_max.max(rss_kib(pid).unwrap_or(0));
        assert!(
            node.try_wait().unwrap().is_none(),
            "the engine exited while the broker was unreachable; {}",
            log_summary(&log)
        );
    }
    let cut_took = cut_at.elapsed();
    let cut_cpu = (cpu_secs(pid, tck) - cpu0) / cut_took.as_secs_f64();
    broker.proxy.restore();
    let restored = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let written = writer.await.unwrap();
    let drained = wait_drained(&db.url, Duration::from_secs(60)).await;
    let drained_after_restore = restored.elapsed();
    let d = delivered(
        &broker.addr(),
        &topic,
        &written.committed,
        drained,
        Duration::from_secs(1),
    )
    .await;
    let running = node.try_wait().unwrap().is_none();
    let (forwarded, reset) = broker.proxy.counts();
    let code = stop_node(node).await;
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let first_pending = samples.first().map_or(0, |s| s.1);
    let max_pending = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "[broker_network_cut] committed {} received {} lost {} duplicates {} (bound {WINDOW}) \
         order violations {}",
        written.committed.len(),
        d.received,
        d.lost,
        d.duplicates,
        d.order_violations
    );
    eprintln!(
        "[broker_network_cut] during the {:.1}s cut (s, pending): {samples:?}; max pending \
         {max_pending}; engine cpu {:.1}% of a core; rss {rss0} -> max {rss_max} KiB; \
         drained {drained:?} ({drained_after_restore:?} after restore); proxy: {forwarded} \
         connections forwarded, {reset} reset; exit {code:?}; test took {:.1}s",
        cut_took.as_secs_f64(),
        cut_cpu * 100.0,
        started.elapsed().as_secs_f64()
    );
    eprintln!("[broker_network_cut] {}", log_summary(&log));

    assert_recovered(
        Some(running),
        &log,
        drained,
        "backlog did not drain after the cut",
        &d,
        "events lost",
        WINDOW,
    );
    assert!(
        max_pending > first_pending,
        "status did not show the backlog growing: {samples:?}"
    );
    assert_idle(cut_cpu, "the broker was unreachable");
    assert_small(rss0, rss_max, "the broker was unreachable");
    assert_eq!(code, Some(0), "SIGTERM after recovery did not exit 0");
    let _ = std::fs::remove_file(&log);
}

/// Twenty nodes in a row, each killed -9 after a random 300–1500 ms under
/// load, then a last node drains: nothing lost, first deliveries in order,
/// duplicates within 20 in-flight windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9_under_load() {
    const KILLS: usize = 20;
    let started = Instant::now();
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    let log = log_path("kill9");
    let spec = |id: &str| {
        spawn_node(&NodeSpec {
            database_url: &db.url,
            brokers: &brokers(),
            node_id: id,
            prefix: &prefix,
            lease_ttl_ms: 1_000,
            heartbeat_ms: 200,
            log: &log,
            http_port: 0,
        })
    };
    let stop = CancellationToken::new();
    let writer = spawn_load(
        db.pool.clone(),
        "a",
        10,
        Duration::from_millis(5),
        stop.clone(),
    );
    let mut held_at_kill = Vec::new();
    for i in 1..=KILLS {
        let id = format!("node-{i}");
        let mut node = spec(&id);
        let life = rand::thread_rng().gen_range(300..=1500);
        tokio::time::sleep(Duration::from_millis(life)).await;
        let held = owners(&db).await.get(&id).copied().unwrap_or(0);
        if let Some(status) = node.try_wait().unwrap() {
            panic!(
                "{id} exited by itself ({status}) before it was killed; {}",
                log_summary(&log)
            );
        }
        node.start_kill().unwrap();
        node.wait().await.unwrap();
        held_at_kill.push((life, held));
    }
    let last = spec("node-final");
    // The writer keeps going while the last node takes over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let written = writer.await.unwrap();
    let drained = wait_drained(&db.url, Duration::from_secs(90)).await;
    let d = delivered(
        &brokers(),
        &topic,
        &written.committed,
        drained,
        Duration::from_secs(2),
    )
    .await;
    let code = stop_node(last).await;
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let bound = KILLS * WINDOW;
    let with_leases = held_at_kill.iter().filter(|h| h.1 > 0).count();
    eprintln!(
        "[kill9] {KILLS} kill -9 (life ms, partitions held at kill): {held_at_kill:?}; \
         {with_leases} killed while holding leases"
    );
    eprintln!(
        "[kill9] committed {} received {} lost {} duplicates {} (bound {bound}) order violations \
         {}; drained {drained:?}; final node exit {code:?}; test took {:.1}s",
        written.committed.len(),
        d.received,
        d.lost,
        d.duplicates,
        d.order_violations,
        started.elapsed().as_secs_f64()
    );
    eprintln!("[kill9] {}", log_summary(&log));

    // `None`: the nodes were killed on purpose; the last one's exit code is
    // checked below.
    assert_recovered(
        None,
        &log,
        drained,
        "backlog did not drain",
        &d,
        "events lost",
        bound,
    );
    assert!(
        with_leases >= KILLS / 2,
        "too few nodes held leases when killed: {held_at_kill:?}"
    );
    assert_eq!(code, Some(0), "SIGTERM of the last node did not exit 0");
    let _ = std::fs::remove_file(&log);
}
