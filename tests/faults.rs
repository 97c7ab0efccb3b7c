//! Transient faults against real `outbox run` processes: the broker goes
//! away and comes back empty, the network to the database or to the broker
//! is cut for a while, PostgreSQL restarts, and nodes are killed -9 at
//! random moments under load. In every case the engine must recover by
//! itself and lose nothing; duplicates stay within the in-flight bound.
//!
//! Every test has its own database, topics, and (where it breaks things)
//! its own broker, proxy or PostgreSQL cluster: the shared broker and the
//! system PostgreSQL are never stopped.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use outbox_harness::db::{url_addr, url_via};
use outbox_harness::node::{assert_no_panic, log_path, log_summary, logging_to};
use outbox_harness::ops::gauge;
use outbox_harness::ordering::{tally, tally_after_drain, Tally};
use outbox_harness::pg::PrivatePg;
use outbox_harness::proxy::{ProxiedBroker, Proxy};
use outbox_harness::status::{nodes, owned, status_at, wait_drained};
use outbox_harness::usage::{cpu_secs, rss_kib, Usage, Window};
use outbox_harness::*;
use rand::Rng;
use sqlx::postgres::PgPoolOptions;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Outbox partitions of every test database.
const PARTITIONS: u32 = 4;
/// Relay batch size and in-flight batches per partition, passed as flags
/// so that the duplicate bound is known.
const BATCH: usize = 200;
const INFLIGHT: usize = 2;
/// At most this many events can be re-sent per node failure: every
/// partition's whole in-flight window.
const WINDOW: usize = PARTITIONS as usize * INFLIGHT * BATCH;
/// How long a node may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------
// Engine processes

/// The relay's retry backoff in these tests.
const RETRY_MIN_MS: u64 = 100;
const RETRY_MAX_MS: u64 = 5_000;

/// `spec`'s node with the batch size and window above and the retry
/// backoff of these tests, logging to `log`, its operations endpoint on
/// `http_port` (0: any).
fn spawn_node(spec: &NodeSpec, log: &Path, http_port: u16) -> Child {
    spawn_node_with(spec, log, http_port, &[])
}

/// [`spawn_node`] with more configuration variables.
fn spawn_node_with(spec: &NodeSpec, log: &Path, http_port: u16, env: &[(&str, &str)]) -> Child {
    let mut cmd = spec.command();
    cmd.envs(env.iter().copied());
    logging_to(&mut cmd, log)
        .expect("the node's log file")
        .args(["--batch-size", &BATCH.to_string()])
        .args(["--max-inflight-batches", &INFLIGHT.to_string()])
        .env("OUTBOX_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env(
            "OUTBOX_RELAY__RETRY_BACKOFF_MIN_MS",
            RETRY_MIN_MS.to_string(),
        )
        .env(
            "OUTBOX_RELAY__RETRY_BACKOFF_MAX_MS",
            RETRY_MAX_MS.to_string(),
        )
        .spawn()
        .expect("spawn outbox run")
}

/// A retry an engine log announced: what failed, for which partition, the
/// attempt since the last success, and the delay drawn.
#[derive(Debug, Clone, PartialEq)]
struct Retry {
    what: String,
    partition: u32,
    attempt: u32,
    delay: Duration,
}

/// The value of `key=` in a log line, up to the next space.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

/// A `Debug`-printed duration (`142.46ms`, `1.2s`).
fn parse_duration(v: &str) -> Option<Duration> {
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
}

/// The retries an engine log announced, in order.
fn logged_retries(path: &Path) -> Vec<Retry> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let delay = parse_duration(field(l, "retry_in")?)?;
            let message = l.split_once(": ")?.1;
            let what = message.split(" failed").next()?.to_string();
            Some(Retry {
                what,
                partition: field(l, "partition")?.parse().ok()?,
                attempt: field(l, "attempt")?.parse().ok()?,
                delay,
            })
        })
        .collect()
}

/// Where a worker's retries do not follow its backoff: an attempt that is
/// neither a first one nor the one after the same partition's previous
/// retry of the same kind (the store was down throughout, nothing reset it),
/// or a delay outside `[min, min × max(2, 2^(attempt-1))]` capped at `max`.
fn backoff_breaches(retries: &[Retry], min: Duration, max: Duration) -> Vec<String> {
    let mut last: HashMap<(String, u32), u32> = HashMap::new();
    let mut breaches = vec![];
    for r in retries {
        let previous = last.insert((r.what.clone(), r.partition), r.attempt);
        if r.attempt != 1 && previous.map(|p| p + 1) != Some(r.attempt) {
            breaches.push(format!("{r:?} after attempt {previous:?}"));
        }
        let factor = 1u32 << (r.attempt.saturating_sub(1)).clamp(1, 20);
        let bound = min.saturating_mul(factor).min(max) + Duration::from_millis(1);
        if r.delay < min || r.delay > bound {
            breaches.push(format!("{r:?} outside [{min:?}, {bound:?}]"));
        }
    }
    breaches
}

// ---------------------------------------------------------------------------
// Checks

/// The engine used under a quarter of a core in `window` while `during`
/// lasted: it waited rather than spinning.
#[track_caller]
fn assert_idle(window: &Window, during: &str) {
    assert!(
        window.cpu_share() < 0.25,
        "engine used {:.0}% of a core while {during} (busy loop?)",
        window.cpu_share() * 100.0
    );
}

/// [`assert_idle`], and the engine's memory grew by under 64 MiB.
#[track_caller]
fn assert_quiet(window: &Window, during: &str) {
    assert_idle(window, during);
    assert!(
        window.rss_growth() < 64 * 1024,
        "engine memory grew by {} KiB while {during}",
        window.rss_growth()
    );
}

/// The last check of a recovered node: SIGTERM made it exit 0. Its log
/// goes then (a failed test keeps it).
#[track_caller]
fn assert_stopped(code: Option<i32>, log: &Path) {
    assert_eq!(code, Some(0), "SIGTERM after recovery did not exit 0");
    let _ = std::fs::remove_file(log);
}

/// One sample of a fault window: the engine's memory, and that it still
/// runs while `fault` lasts.
#[track_caller]
fn sample(usage: &mut Usage, node: &mut Child, log: &Path, fault: &str) {
    usage.sample();
    assert!(
        node.try_wait().unwrap().is_none(),
        "the engine exited while {fault}; {}",
        log_summary(log)
    );
}

// ---------------------------------------------------------------------------
// Load and delivery

/// What most tests here start with: when it started, its database and the
/// topic its events go to (with its prefix).
async fn setup() -> (Instant, TestDb, String, String) {
    let started = Instant::now();
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    (started, db, prefix, topic)
}

/// The fault tests' load: 10 events per transaction, 10 ms apart, failed
/// transactions retried.
fn load(key: &str) -> Load {
    Load::retrying(key, 10, Duration::from_millis(10))
}

/// What a fault test has once the fault is over: what the writer
/// committed, whether the backlog drained, what arrived.
struct Outcome {
    /// The events whose delivery is judged, for the assertion messages.
    what: &'static str,
    written: Written,
    /// How long the backlog took to drain (`None`: not within the wait).
    drained: Option<Duration>,
    delivery: Tally,
}

impl Outcome {
    /// Consumes `topic` at `bootstrap` until every event `written` arrived
    /// (then `grace` longer, to see duplicates) and judges the delivery
    /// ([`tally_after_drain`]).
    async fn judge(
        what: &'static str,
        written: Written,
        drained: Option<Duration>,
        (bootstrap, topic): (&str, &str),
        grace: Duration,
    ) -> Outcome {
        let (topics, committed) = ([topic.to_string()], &written.committed);
        let delivery =
            tally_after_drain(bootstrap, &topics, committed, drained.is_some(), grace).await;
        Outcome {
            what,
            written,
            drained,
            delivery,
        }
    }

    /// The checks every fault test ends with: the engine (if `running` is
    /// given, whether it was still up) did not exit or panic, the backlog
    /// drained (else `not_drained` is the message), and the events arrived:
    /// none lost, at most `max_duplicates` re-sent, first deliveries in
    /// order.
    #[track_caller]
    fn assert_recovered(
        &self,
        running: Option<bool>,
        log: &Path,
        not_drained: &str,
        max_duplicates: usize,
    ) {
        if let Some(running) = running {
            assert!(running, "the engine exited; {}", log_summary(log));
        }
        assert_no_panic(log);
        assert!(self.drained.is_some(), "{not_drained}");
        self.delivery.assert_delivered(self.what, max_duplicates);
    }
}

/// The end of a fault under load: stops the writer, waits up to `drain`
/// for the backlog of the outbox at `url` to empty, and judges what
/// `bootstrap` has on `topic` (copies: for `grace` more).
async fn after_the_fault(
    url: &str,
    (bootstrap, topic): (&str, &str),
    (stop, writer): (CancellationToken, JoinHandle<Written>),
    drain: Duration,
    grace: Duration,
) -> Outcome {
    stop.cancel();
    let written = writer.await.expect("writer task");
    let drained = wait_drained(url, drain).await;
    let what = "committed under load";
    Outcome::judge(what, written, drained, (bootstrap, topic), grace).await
}

// ---------------------------------------------------------------------------
// Helpers for the network

/// librdkafka's queue (the events in flight) from the node's /metrics.
async fn queue(http_port: u16) -> Option<i64> {
    let queued = gauge(http_port, "outbox_kafka_queue_messages").await;
    queued.map(|v| v as i64)
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
    let _turn = heavy_turn().await;
    let outage = Duration::from_secs(outage_secs());
    let (started, db, prefix, topic) = setup().await;
    let mut broker = tokio::task::block_in_place(PrivateBroker::start).expect("a private broker");
    let log = log_path("faults-broker_outage");
    let http_port = free_port();
    let addr = broker.addr();
    let node = spawn_node(
        &NodeSpec::new(&db.url, &addr, "outage", &prefix),
        &log,
        http_port,
    );
    let pid = node.id().expect("pid");

    // Phase 1: the pipeline works; everything written so far is consumed.
    let stop1 = CancellationToken::new();
    let w1 = spawn_load(db.pool.clone(), load("p1-"), stop1.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop1.cancel();
    let phase1 = w1.await.unwrap();
    let drained1 = wait_drained(&db.url, Duration::from_secs(60)).await;
    assert!(drained1.is_some(), "phase 1 did not drain");
    let d1 = tally(
        &broker.addr(),
        std::slice::from_ref(&topic),
        &phase1.committed,
        Duration::from_secs(60),
        Duration::from_millis(300),
    )
    .await;
    eprintln!("[broker_outage] phase 1: {d1}");
    assert_eq!(d1.lost, 0, "phase 1 lost events before any fault; {d1}");

    // Phase 2: the broker goes away; writers go on.
    tokio::task::block_in_place(|| broker.stop());
    let outage_start = Instant::now();
    let mut usage = Usage::start(pid);
    let stop2 = CancellationToken::new();
    let w2 = spawn_load(db.pool.clone(), load("p2-"), stop2.clone());
    let mut samples: Vec<(u64, i64)> = Vec::new();
    // librdkafka's queue (the events in flight) and /readyz, as sampled.
    let mut queued: Vec<Option<i64>> = Vec::new();
    let mut readyz: Vec<Option<u16>> = Vec::new();
    let mut node = node;
    while next_sample(outage_start, outage, Duration::from_secs(2)).await {
        if let Some(s) = status_at(&db.url).await {
            samples.push((outage_start.elapsed().as_secs(), s.total_pending()));
        }
        queued.push(queue(http_port).await);
        readyz.push(http_get(http_port, "/readyz").await.map(|r| r.0));
        sample(&mut usage, &mut node, &log, "the broker was away");
    }
    let during = usage.end();

    // Phase 3: the broker is back (empty); writers go on a little longer.
    tokio::task::block_in_place(|| broker.restart()).expect("the broker back");
    let restored = Instant::now();
    let usage = Usage::start(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop2.cancel();
    let phase2 = w2.await.unwrap();
    // Backlog per second after the restore, recorded when it changes.
    let mut drain_samples: Vec<(u64, i64)> = Vec::new();
    let drained = loop {
        if let Some(s) = status_at(&db.url).await {
            let at = restored.elapsed().as_secs();
            let pending = s.total_pending();
            if drain_samples.last().is_none_or(|l| l.1 != pending) {
                drain_samples.push((at, pending));
            }
            if pending == 0 {
                break Some(restored.elapsed());
            }
        }
        if restored.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let after = usage.end();
    let queued_after = queue(http_port).await;
    let ready_after = http_get(http_port, "/readyz").await.map(|r| r.0);
    let what = "committed during and after the outage";
    let bootstrap = broker.addr();
    let grace = Duration::from_secs(1);
    let out = Outcome::judge(what, phase2, drained, (&bootstrap, &topic), grace).await;
    let running = node.try_wait().unwrap().is_none();
    let cpu_total = cpu_secs(pid);
    let rss_end = rss_kib(pid).unwrap_or(0);
    let code = if drained.is_some() {
        stop_node(node, STOP_TIMEOUT).await
    } else {
        // A stuck engine would spend its whole shutdown timeout draining.
        let _ = node.start_kill();
        None
    };
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let first_pending = samples.first().map_or(0, |s| s.1);
    let max_pending = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "[broker_outage] outage {:.1}s: during+after {} (failed tx {})",
        during.took.as_secs_f64(),
        out.delivery,
        out.written.failed_tx,
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
        after.cpu_share() * 100.0
    );
    eprintln!(
        "[broker_outage] the outage's {during}; total cpu {cpu_total:.1}s, rss at end \
         {rss_end} KiB; exit {code:?}; test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    eprintln!("[broker_outage] {}", log_summary(&log));

    // Once it was back: everything arrived, once, in order.
    out.assert_recovered(
        Some(running),
        &log,
        &format!(
            "the backlog did not drain within 60 s after the broker came back \
             (pending after restore: {drain_samples:?}; librdkafka's queue {queued_after:?}; \
             /readyz {ready_after:?})"
        ),
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
    assert_quiet(&during, "the broker was away");
    assert_stopped(code, &log);
}

/// The engine's connections to PostgreSQL go through a proxy that is cut
/// for 8 s, longer than the 2 s lease TTL: the node loses its leases and
/// registration, then takes its partitions back, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut() {
    let _turn = heavy_turn().await;
    let (started, db, prefix, topic) = setup().await;
    let proxy = Proxy::start(url_addr(&db.url).expect("the database's address")).expect("a proxy");
    let proxied_url = url_via(&db.url, &proxy.addr());
    let log = log_path("faults-database_cut");
    let brokers = brokers();
    let spec = NodeSpec::new(&proxied_url, &brokers, "cut", &prefix);
    // A caught-up worker fetches when its doorbell rings, and the doorbell
    // cannot ring while the database is cut: with the default 2 s idle
    // poll, every worker was revoked (at 0.9 of the 2 s lease) before it
    // tried the database at all. Looking every 100 ms, each tries, fails
    // and backs off in the cut's first seconds, which is what is checked.
    let mut node = spawn_node_with(&spec, &log, 0, &[("OUTBOX_RELAY__IDLE_POLL_MS", "100")]);
    let pid = node.id().expect("pid");
    let spread = wait_for_owners(&db, &[("cut", PARTITIONS as i64)], Duration::from_secs(20)).await;
    assert_eq!(spread.get("cut"), Some(&(PARTITIONS as i64)), "{spread:?}");

    // The writer goes straight to PostgreSQL, not through the proxy.
    let stop = CancellationToken::new();
    let writer = spawn_load(db.pool.clone(), load("a"), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy.cut();
    let cut_at = Instant::now();
    let mut usage = Usage::start(pid);
    let mut samples = Vec::new();
    while next_sample(cut_at, Duration::from_secs(8), Duration::from_secs(1)).await {
        if let Some(s) = status_at(&db.url).await {
            samples.push((
                cut_at.elapsed().as_secs(),
                s.total_pending(),
                owned(&s).get("cut").copied().unwrap_or(0),
            ));
        }
        sample(&mut usage, &mut node, &log, "the database was unreachable");
    }
    let cut = usage.end();
    proxy.restore();
    let restored = Instant::now();
    let reowned =
        wait_for_owners(&db, &[("cut", PARTITIONS as i64)], Duration::from_secs(30)).await;
    let reowned_in = restored.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (drain, grace) = (Duration::from_secs(60), Duration::from_secs(1));
    let out = after_the_fault(&db.url, (&brokers, &topic), (stop, writer), drain, grace).await;
    let view = status_at(&db.url).await;
    let running = node.try_wait().unwrap().is_none();
    let (forwarded, reset) = proxy.counts();
    let rss_end = rss_kib(pid).unwrap_or(0);
    let code = stop_node(node, STOP_TIMEOUT).await;
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let max_pending = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!("[database_cut] {} (bound {WINDOW})", out.delivery);
    eprintln!(
        "[database_cut] during the cut (s, pending, partitions owned): {samples:?}; max \
         pending {max_pending}; the cut's {cut}; rss at end {rss_end} KiB"
    );
    eprintln!(
        "[database_cut] owners after restore {reowned:?} within {reowned_in:?}; drained {:?}; \
         status nodes {:?}; proxy: {forwarded} connections forwarded, {reset} reset; exit {code:?}; \
         test took {:.1}s",
        out.drained,
        view.as_ref().map(nodes),
        started.elapsed().as_secs_f64()
    );
    eprintln!("[database_cut] {}", log_summary(&log));
    let retries = logged_retries(&log);
    let delays: Vec<Duration> = retries.iter().map(|r| r.delay).collect();
    let distinct: HashSet<Duration> = delays.iter().copied().collect();
    let deepest = retries.iter().map(|r| r.attempt).max().unwrap_or(0);
    let breaches = backoff_breaches(
        &retries,
        Duration::from_millis(RETRY_MIN_MS),
        Duration::from_millis(RETRY_MAX_MS),
    );
    eprintln!(
        "[database_cut] {} retries logged with a delay, {} distinct delays, deepest attempt \
         {deepest}: {delays:?}",
        retries.len(),
        distinct.len()
    );

    let not_drained = "backlog did not drain after the cut";
    out.assert_recovered(Some(running), &log, not_drained, WINDOW);
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
    // Each worker's retries follow its backoff: attempts count up while the
    // store is down, every delay inside its attempt's bounds. (How high the
    // attempts get depends on how long a fetch takes to fail through the
    // proxy; the growth of the bounds is the relay unit tests' business.)
    assert!(
        breaches.is_empty(),
        "retries off their backoff: {breaches:?}"
    );
    assert_eq!(
        reowned.get("cut"),
        Some(&(PARTITIONS as i64)),
        "the node did not take its partitions back: {reowned:?}"
    );
    let view = view.expect("status after the cut");
    assert_eq!(
        owned(&view).get("cut"),
        Some(&(PARTITIONS as usize)),
        "status does not show the node owning every partition"
    );
    assert_eq!(nodes(&view), vec![("cut".to_string(), PARTITIONS as i64)]);
    assert!(
        samples.iter().any(|s| s.2 == 0),
        "the leases never expired during the cut: {samples:?}"
    );
    assert_idle(&cut, "the database was cut");
    assert_stopped(code, &log);
}

/// PostgreSQL itself restarts (`pg_ctl restart -m fast`) under load: every
/// connection of the engine dies at once. Writers' transactions may fail
/// during the restart; every one that committed is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart() {
    let _turn = heavy_turn().await;
    let started = Instant::now();
    let mut pg = match tokio::task::block_in_place(PrivatePg::start) {
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
    let partitions = PARTITIONS.to_string();
    let migrate = ["migrate", "--partitions", &partitions];
    succeed(outbox_at(&url, "unused:1").args(migrate), "migrate").await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .expect("connect the private cluster");
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    let log = log_path("faults-database_restart");
    let brokers = brokers();
    let mut node = spawn_node(&NodeSpec::new(&url, &brokers, "restart", &prefix), &log, 0);
    let pid = node.id().expect("pid");
    let took_partitions = eventually(Duration::from_secs(20), || async {
        status_at(&url)
            .await
            .is_some_and(|s| owned(&s).get("restart") == Some(&(PARTITIONS as usize)))
    })
    .await;
    assert!(took_partitions, "the node did not take its partitions");

    let stop = CancellationToken::new();
    let writer = spawn_load(pool.clone(), load("a"), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restart_at = Instant::now();
    tokio::task::block_in_place(|| pg.restart()).expect("pg_ctl restart");
    let restart_took = restart_at.elapsed();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (drain, grace) = (Duration::from_secs(60), Duration::from_secs(1));
    let out = after_the_fault(&url, (&brokers, &topic), (stop, writer), drain, grace).await;
    let view = status_at(&url).await;
    let running = node.try_wait().unwrap().is_none();
    let rss = rss_kib(pid).unwrap_or(0);
    let cpu = cpu_secs(pid);
    let code = stop_node(node, STOP_TIMEOUT).await;
    pool.close().await;

    eprintln!(
        "[database_restart] private cluster ready in {:.2}s; restart took {:.2}s; {} (failed \
         tx {}, bound {WINDOW})",
        setup.as_secs_f64(),
        restart_took.as_secs_f64(),
        out.delivery,
        out.written.failed_tx,
    );
    eprintln!(
        "[database_restart] drained {:?}; owners after {:?}; engine cpu {cpu:.1}s rss {rss} \
         KiB; exit {code:?}; test took {:.1}s",
        out.drained,
        view.as_ref().map(owned),
        started.elapsed().as_secs_f64()
    );
    eprintln!("[database_restart] {}", log_summary(&log));

    let not_drained = "backlog did not drain after the restart";
    out.assert_recovered(Some(running), &log, not_drained, WINDOW);
    assert_stopped(code, &log);
    drop(pg);
}

/// The network between the engine and the broker is cut for 10 s: every
/// connection (bootstrap and the advertised address alike) goes through a
/// proxy. The broker keeps its data, so everything committed is on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_network_cut() {
    let _turn = heavy_turn().await;
    let (started, db, prefix, topic) = setup().await;
    let broker = tokio::task::block_in_place(ProxiedBroker::start).expect("a proxied broker");
    let log = log_path("faults-broker_network_cut");
    let addr = broker.addr();
    let mut node = spawn_node(&NodeSpec::new(&db.url, &addr, "netcut", &prefix), &log, 0);
    let pid = node.id().expect("pid");
    let stop = CancellationToken::new();
    let writer = spawn_load(db.pool.clone(), load("a"), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    broker.proxy.cut();
    let cut_at = Instant::now();
    let mut usage = Usage::start(pid);
    let mut samples = Vec::new();
    while next_sample(cut_at, Duration::from_secs(10), Duration::from_secs(2)).await {
        if let Some(s) = status_at(&db.url).await {
            samples.push((cut_at.elapsed().as_secs(), s.total_pending()));
        }
        sample(&mut usage, &mut node, &log, "the broker was unreachable");
    }
    let cut = usage.end();
    broker.proxy.restore();
    let restored = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (drain, grace) = (Duration::from_secs(60), Duration::from_secs(1));
    let writing_after_restore = restored.elapsed();
    let out = after_the_fault(&db.url, (&addr, &topic), (stop, writer), drain, grace).await;
    let drained_after_restore = out.drained.map(|d| writing_after_restore + d);
    let running = node.try_wait().unwrap().is_none();
    let (forwarded, reset) = broker.proxy.counts();
    let code = stop_node(node, STOP_TIMEOUT).await;
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let first_pending = samples.first().map_or(0, |s| s.1);
    let max_pending = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!("[broker_network_cut] {} (bound {WINDOW})", out.delivery);
    eprintln!(
        "[broker_network_cut] during the cut (s, pending): {samples:?}; max pending \
         {max_pending}; the cut's {cut}; drained {:?} ({drained_after_restore:?} after \
         restore); proxy: {forwarded} connections forwarded, {reset} reset; exit {code:?}; test \
         took {:.1}s",
        out.drained,
        started.elapsed().as_secs_f64()
    );
    eprintln!("[broker_network_cut] {}", log_summary(&log));

    let not_drained = "backlog did not drain after the cut";
    out.assert_recovered(Some(running), &log, not_drained, WINDOW);
    assert!(
        max_pending > first_pending,
        "status did not show the backlog growing: {samples:?}"
    );
    assert_quiet(&cut, "the broker was unreachable");
    assert_stopped(code, &log);
}

/// Twenty nodes in a row, each killed -9 after a random 300–1500 ms under
/// load, then a last node drains: nothing lost, first deliveries in order,
/// duplicates within 20 in-flight windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9_under_load() {
    let _turn = heavy_turn().await;
    const KILLS: usize = 20;
    let (started, db, prefix, topic) = setup().await;
    let log = log_path("faults-kill9");
    let brokers = brokers();
    let spec = |id: &str| {
        let spec = NodeSpec {
            lease_ttl_ms: 1_000,
            heartbeat_ms: 200,
            ..NodeSpec::new(&db.url, &brokers, id, &prefix)
        };
        spawn_node(&spec, &log, 0)
    };
    let stop = CancellationToken::new();
    let writer = spawn_load(
        db.pool.clone(),
        Load::retrying("a", 10, Duration::from_millis(5)),
        stop.clone(),
    );
    let mut held_at_kill = Vec::new();
    for i in 1..=KILLS {
        let id = format!("node-{i}");
        let mut node = spec(&id);
        // Killed at a random moment after it took leases (a loaded machine
        // can take seconds to start a node; a kill before it holds anything
        // tests nothing), or after 10 s without any.
        let born = Instant::now();
        let mut took = false;
        while !took && born.elapsed() < Duration::from_secs(10) {
            took = owners(&db).await.get(&id).copied().unwrap_or(0) > 0;
            if !took {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(
            rand::thread_rng().gen_range(0..=1_000),
        ))
        .await;
        let life = born.elapsed().as_millis();
        let held = owners(&db).await.get(&id).copied().unwrap_or(0);
        if let Some(status) = node.try_wait().unwrap() {
            panic!(
                "{id} exited by itself ({status}) before it was killed; {}",
                log_summary(&log)
            );
        }
        node.start_kill().unwrap();
        node.wait().await.unwrap();
        held_at_kill.push((life, held, took));
    }
    let last = spec("node-final");
    // The writer keeps going while the last node takes over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (drain, grace) = (Duration::from_secs(90), Duration::from_secs(2));
    let out = after_the_fault(&db.url, (&brokers, &topic), (stop, writer), drain, grace).await;
    let code = stop_node(last, STOP_TIMEOUT).await;
    // Every figure is in hand: the database goes even if an assertion fails.
    db.drop_db().await;

    let bound = KILLS * WINDOW;
    // A node that took leases is killed with them or just after losing
    // them to a stall (1 s leases): either way in the middle of its work.
    let with_leases = held_at_kill.iter().filter(|h| h.2).count();
    eprintln!(
        "[kill9] {KILLS} kill -9 (life ms, partitions held at kill, took leases): \
         {held_at_kill:?}; {with_leases} killed after taking leases"
    );
    eprintln!(
        "[kill9] {} (bound {bound}); drained {:?}; final node exit {code:?}; test took {:.1}s",
        out.delivery,
        out.drained,
        started.elapsed().as_secs_f64()
    );
    eprintln!("[kill9] {}", log_summary(&log));

    // `None`: the nodes were killed on purpose; the last one's exit code is
    // checked below.
    out.assert_recovered(None, &log, "backlog did not drain", bound);
    assert!(
        with_leases >= KILLS / 2,
        "too few nodes took leases before they were killed: {held_at_kill:?}"
    );
    assert_eq!(code, Some(0), "SIGTERM of the last node did not exit 0");
    let _ = std::fs::remove_file(&log);
}
