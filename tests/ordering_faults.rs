//! Per-aggregate order and fencing under failure (issue 9), against real
//! `outbox run` processes, PostgreSQL and tansu: a poison event in the
//! middle of a backlog (under `park` and `block`), a broker frozen longer
//! than the delivery timeout, an owner paused past its lease while a second
//! node takes over, and SIGTERM while the broker is cut off.
//!
//! Every test reads back everything the broker has and counts, per
//! aggregate, lost events, copies, first deliveries out of order and stale
//! deliveries (see `outbox_harness::ordering`). Each has its own database, topics
//! and, where it breaks the broker or the network, its own broker.
//!
//! The tests take turns (`SERIAL`): they time leases of 2 s against
//! SIGSTOP and network cuts, and two of them at once on a 2-core machine
//! would blur the timings they rely on.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outbox_harness::links::{Link, LinkedBroker};
use outbox_harness::node::{
    assert_no_panic, log_summary, log_text, logging_to, remove_files, running, stop_node,
};
use outbox_harness::ordering::{consume_ids, tally_after_drain, Tally};
use outbox_harness::*;
use tokio::process::Child;
use tokio::sync::MutexGuard;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Outbox partitions of every test database.
const PARTITIONS: u32 = 4;
/// Relay batch size and in-flight batches per partition; both smaller
/// than the backlogs, so that later batches could overtake a failed one.
const BATCH: usize = 200;
const INFLIGHT: usize = 2;
/// At most this many events may be re-sent per failure: every partition's
/// whole in-flight window.
const WINDOW: usize = PARTITIONS as usize * INFLIGHT * BATCH;
/// Lease TTL of every node, and the delivery timeout of the nodes of the
/// stale-owner test: a new owner waits out its predecessor's timeout.
const LEASE_TTL_MS: u64 = 2_000;
const DELIVERY_TIMEOUT_MS: u64 = 2_000;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What every test here starts with: its turn ([`SERIAL`]), when it
/// started, its database and its topic (with its prefix).
async fn setup() -> (
    MutexGuard<'static, ()>,
    Instant,
    TestDb,
    String,
    [String; 1],
) {
    let turn = SERIAL.lock().await;
    let started = Instant::now();
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let topics = [format!("{prefix}order")];
    (turn, started, db, prefix, topics)
}

// ---------------------------------------------------------------------------
// Engine processes

/// How an `outbox run` child is started.
struct Node<'a> {
    id: &'a str,
    brokers: &'a str,
    prefix: &'a str,
    /// Extra lines of the `[relay]` table of its config file.
    relay: &'a str,
    /// librdkafka `client.id`, for a [`LinkedBroker`] to route by.
    client_id: Option<&'a str>,
    /// Extra flags.
    args: &'a [&'a str],
    log: &'a Path,
}

/// `node` with the batch size and window above, in a config file beside
/// its log; the engine's own delivery timeout unless `args` set one.
fn spawn_node(db: &TestDb, node: &Node) -> Child {
    let mut toml = format!(
        "[relay]\nbatch_size = {BATCH}\nmax_inflight_batches = {INFLIGHT}\n{}\n",
        node.relay
    );
    if let Some(id) = node.client_id {
        toml.push_str(&format!("[kafka.properties]\n\"client.id\" = \"{id}\"\n"));
    }
    let config = node.log.with_extension("toml");
    std::fs::write(&config, toml).expect("write the node's config file");
    let spec = NodeSpec {
        lease_ttl_ms: LEASE_TTL_MS,
        delivery_timeout_ms: None,
        ..NodeSpec::new(&db.url, node.brokers, node.id, node.prefix)
    };
    let mut cmd = spec.command();
    logging_to(&mut cmd, node.log)
        .expect("the node's log file")
        .arg("--config")
        .arg(&config)
        .args(node.args)
        .spawn()
        .expect("spawn outbox run")
}

/// A log file for one node of one test.
fn log_path(test: &str, node: &str) -> PathBuf {
    outbox_harness::node::log_path(&format!("ordering-{test}-{node}"))
}

/// Two nodes on a broker where each has a link of its own, under load.
struct Pair {
    broker: LinkedBroker,
    /// Node A's link, and what every client bootstraps from.
    link_a: Link,
    addr: String,
    a: Child,
    b: Child,
    logs: [PathBuf; 2],
    stop: CancellationToken,
    writer: JoinHandle<Vec<Uuid>>,
}

/// Prints the summary of each node's log of a [`Pair`].
fn report_logs(test: &str, [a, b]: &[PathBuf; 2]) {
    eprintln!("[{test}] a: {}", log_summary(a));
    eprintln!("[{test}] b: {}", log_summary(b));
}

/// A [`LinkedBroker`] with a link for `node-a` and `node-b` (their
/// `client.id`s); `node-a`, then `node-b`, each with the flag `flag`, once
/// they share the partitions 2 + 2; then a writer, for 3 s.
async fn start_pair(db: &TestDb, prefix: &str, test: &str, (flag, value): (&str, u64)) -> Pair {
    let value = value.to_string();
    let args = [flag, value.as_str()];
    let broker = tokio::task::block_in_place(|| LinkedBroker::start(&["node-a", "node-b"]))
        .expect("a linked broker");
    let addr = broker.addr();
    let logs = [log_path(test, "a"), log_path(test, "b")];
    let spec = |id, log| Node {
        id,
        brokers: &addr,
        prefix,
        relay: "",
        client_id: Some(id),
        args: &args,
        log,
    };
    let a = spawn_node(db, &spec("node-a", &logs[0]));
    let spread = wait_for_owners(db, &[("node-a", 4)], Duration::from_secs(20)).await;
    assert_eq!(
        spread.get("node-a"),
        Some(&4),
        "a did not start: {spread:?}"
    );
    let b = spawn_node(db, &spec("node-b", &logs[1]));
    let spread =
        wait_for_owners(db, &[("node-a", 2), ("node-b", 2)], Duration::from_secs(20)).await;
    assert_eq!(spread.len(), 2, "a and b did not share: {spread:?}");
    let stop = CancellationToken::new();
    let writer = spawn_paced_writer(db, 10, Duration::from_millis(10), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    Pair {
        link_a: broker.link("node-a"),
        broker,
        addr,
        a,
        b,
        logs,
        stop,
        writer,
    }
}

/// Stops the writer and waits up to 60 s for the backlog to drain: what it
/// committed, whether the backlog drained, what is still pending.
async fn stop_writing(
    db: &TestDb,
    stop: CancellationToken,
    writer: JoinHandle<Vec<Uuid>>,
) -> (Vec<Uuid>, bool, i64) {
    stop.cancel();
    let committed = writer.await.expect("writer task");
    let drained = eventually(Duration::from_secs(60), || async {
        db.pending().await == 0
    })
    .await;
    (committed, drained, db.pending().await)
}

// ---------------------------------------------------------------------------
// The database

async fn dead_letters(db: &TestDb) -> Vec<(Uuid, String, i32)> {
    sqlx::query_as("select event_id, error, attempts from outbox_dead_letters order by parked_at")
        .fetch_all(&db.pool)
        .await
        .expect("read outbox_dead_letters")
}

/// Partitions whose live lease `node` holds.
async fn owned_by(db: &TestDb, node: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "select partition from outbox_leases
          where owner = $1 and expires_at > now() order by partition",
    )
    .bind(node)
    .fetch_all(&db.pool)
    .await
    .expect("read outbox_leases")
}

/// A lease row: (partition, epoch, owner).
type LeaseRow = (i32, i64, Option<String>);

/// Every lease row, by partition.
async fn lease_rows(db: &TestDb) -> Vec<LeaseRow> {
    sqlx::query_as("select partition, epoch, owner from outbox_leases order by partition")
        .fetch_all(&db.pool)
        .await
        .expect("read outbox_leases")
}

/// The lowest position still unpublished in partition `p`, if any.
async fn lowest_position(db: &TestDb, p: i32) -> Option<i64> {
    sqlx::query_scalar(&format!(
        "select min(position) from outbox_pending where shard = {p}"
    ))
    .fetch_one(&db.pool)
    .await
    .expect("lowest position")
}

async fn position_present(db: &TestDb, p: i32, position: i64) -> bool {
    sqlx::query_scalar(&format!(
        "select exists (select 1 from outbox_pending where shard = {p} and position = $1)"
    ))
    .bind(position)
    .fetch_one(&db.pool)
    .await
    .expect("position present")
}

// ---------------------------------------------------------------------------
// A backlog with a poison event in the middle

const BACKLOG: i64 = 6_000;
const AGGREGATES: i64 = 8;

/// Events written while no relay runs, one of them refused by the sink.
struct Backlog {
    /// Every id, by position.
    all: Vec<Uuid>,
    poison: Uuid,
    poison_position: i64,
    /// The partition table of the poison event.
    poison_partition: String,
    /// Its partition's events before it, and after it.
    before: Vec<Uuid>,
    after: Vec<Uuid>,
    /// Events of the other partitions.
    elsewhere: Vec<Uuid>,
}

impl Backlog {
    /// `BACKLOG` events over `AGGREGATES` aggregates (`a0`.., each with an
    /// increasing `seq`), then the event in the middle of `a0`'s gets the
    /// topic `no such topic!`, which is not a valid topic name.
    async fn write(db: &TestDb) -> Backlog {
        sqlx::query(
            "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
             select 'order', 'a' || (i % $2), 'Tick', jsonb_build_object('seq', i / $2)
               from generate_series(0, $1 - 1) as i order by i",
        )
        .bind(BACKLOG)
        .bind(AGGREGATES)
        .execute(&db.pool)
        .await
        .expect("insert the backlog");
        // The test relies on position order being seq order per aggregate.
        let disorder: i64 = sqlx::query_scalar(
            "select count(*) from (
                select (payload->>'seq')::bigint as seq,
                       lag((payload->>'seq')::bigint)
                           over (partition by aggregate_id order by position) as prev
                  from outbox) t
              where seq <= prev",
        )
        .fetch_one(&db.pool)
        .await
        .expect("check the backlog's order");
        assert_eq!(disorder, 0, "the backlog's positions are not in seq order");
        let (poison, poison_position, poison_partition): (Uuid, i64, String) = sqlx::query_as(
            "update outbox set topic = 'no such topic!'
              where aggregate_id = 'a0' and (payload->>'seq')::bigint = $1
             returning id, position, 'outbox_p' || shard::text",
        )
        .bind(BACKLOG / AGGREGATES / 2)
        .fetch_one(&db.pool)
        .await
        .expect("poison one event");
        let rows: Vec<(Uuid, i64, String)> = sqlx::query_as(
            "select id, position, 'outbox_p' || shard::text from outbox order by position",
        )
        .fetch_all(&db.pool)
        .await
        .expect("read the backlog");
        let mut b = Backlog {
            all: rows.iter().map(|r| r.0).collect(),
            poison,
            poison_position,
            poison_partition,
            before: Vec::new(),
            after: Vec::new(),
            elsewhere: Vec::new(),
        };
        for (id, position, table) in rows {
            if table != b.poison_partition {
                b.elsewhere.push(id);
            } else if position < poison_position {
                b.before.push(id);
            } else if position > poison_position {
                b.after.push(id);
            }
        }
        b
    }

    fn all_but_poison(&self) -> Vec<Uuid> {
        self.all
            .iter()
            .copied()
            .filter(|id| *id != self.poison)
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "backlog {BACKLOG} events over {AGGREGATES} aggregates; poison {} at position {} of \
             {} ({} events before it there, {} after it, {} in other partitions); batch {BATCH}, \
             {INFLIGHT} in flight",
            self.poison,
            self.poison_position,
            self.poison_partition,
            self.before.len(),
            self.after.len(),
            self.elsewhere.len()
        )
    }
}

/// Node `policy` on the shared broker, with the poison policy `policy`, 3
/// tries and quick retries.
fn spawn_poison_node(db: &TestDb, prefix: &str, policy: &str, log: &Path) -> Child {
    let relay = format!(
        "poison_policy = \"{policy}\"\nmax_attempts = 3\n\
         retry_backoff_min_ms = 50\nretry_backoff_max_ms = 200"
    );
    let node = Node {
        id: policy,
        brokers: &brokers(),
        prefix,
        relay: &relay,
        client_id: None,
        args: &[],
        log,
    };
    spawn_node(db, &node)
}

// ---------------------------------------------------------------------------
// The tests

/// A poison event in the middle of a partition's backlog, `park`: it is
/// tried 3 times and parked, every other event arrives, and nothing of its
/// partition overtakes it while it is being retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_in_backlog_park() {
    let (_turn, started, db, prefix, topics) = setup().await;
    let backlog = Backlog::write(&db).await;
    let log = log_path("park", "n1");
    let mut node = spawn_poison_node(&db, &prefix, "park", &log);
    let settled = eventually(Duration::from_secs(60), || async {
        db.pending().await == 0 && !dead_letters(&db).await.is_empty()
    })
    .await;
    let pending = db.pending().await;
    let parked = dead_letters(&db).await;
    let want = backlog.all_but_poison();
    let wait = Duration::from_secs(if settled { 60 } else { 10 });
    let got = consume_ids(&brokers(), &topics, &want, wait, Duration::from_secs(1)).await;
    let poison_copies = got.iter().filter(|r| r.id() == backlog.poison).count();
    let t = Tally::of(&want, &got);
    let alive = running(&mut node);
    let code = stop_node(node, Duration::from_secs(40)).await;
    db.drop_db().await;

    eprintln!("[poison_in_backlog_park] {}", backlog.describe());
    eprintln!(
        "[poison_in_backlog_park] {t}; poison copies received {poison_copies}; settled {settled} \
         (pending {pending}); parked {parked:?}; exit {code:?}; took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    eprintln!("[poison_in_backlog_park] {}", log_summary(&log));

    assert!(alive, "the engine exited; {}", log_summary(&log));
    assert_no_panic(&log);
    assert!(
        settled,
        "the backlog did not drain with the poison event parked within 60 s (pending {pending}, \
         parked {parked:?}); {t}"
    );
    let parked_ids: Vec<Uuid> = parked.iter().map(|p| p.0).collect();
    assert_eq!(
        parked_ids,
        vec![backlog.poison],
        "not exactly the poison event was parked; {t}"
    );
    assert_eq!(poison_copies, 0, "the refused event reached the topic; {t}");
    t.assert_delivered(
        "the backlog but the poison event (out of order: events overtook it)",
        WINDOW,
    );
    remove_files(&log);
}

/// The same backlog under `block`: nothing of the poison event's partition
/// after it is delivered, not even once, for 5 s after everything else
/// arrived; once an operator fixes the row, the rest follows in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_in_backlog_block() {
    const HOLD: Duration = Duration::from_secs(5);
    let (_turn, started, db, prefix, topics) = setup().await;
    let backlog = Backlog::write(&db).await;
    let log = log_path("block", "n1");
    let mut node = spawn_poison_node(&db, &prefix, "block", &log);

    // Everything not behind the poison event arrives.
    let free: Vec<Uuid> = backlog
        .before
        .iter()
        .chain(&backlog.elsewhere)
        .copied()
        .collect();
    let early = consume_ids(
        &brokers(),
        &topics,
        &free,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    let early_lost = lost_and_duplicates(&free, &early).0;
    let free_at = started.elapsed();

    // A good while later, still nothing from behind it.
    tokio::time::sleep(HOLD).await;
    let so_far = consume_ids(
        &brokers(),
        &topics,
        &free,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    let blocked: HashSet<Uuid> = backlog
        .after
        .iter()
        .copied()
        .chain([backlog.poison])
        .collect();
    let overtaking: Vec<&Received> = so_far
        .iter()
        .filter(|r| blocked.contains(&r.id()))
        .collect();
    let overtaking_events = overtaking.iter().map(|r| r.id()).collect::<HashSet<_>>();
    let pending_held = db.pending().await;
    let parked_held = dead_letters(&db).await;
    let blocked_said = log_text(&log).contains("partition blocked");

    // The operator fixes the row; the partition goes on.
    let fixed = sqlx::query("update outbox set topic = null where id = $1")
        .bind(backlog.poison)
        .execute(&db.pool)
        .await
        .expect("fix the poison event")
        .rows_affected();
    let fixed_at = Instant::now();
    let released = eventually(Duration::from_secs(60), || async {
        db.pending().await == 0
    })
    .await;
    let released_in = fixed_at.elapsed();
    let pending = db.pending().await;
    let grace = Duration::from_secs(1);
    let t = tally_after_drain(&brokers(), &topics, &backlog.all, released, grace).await;
    let parked = dead_letters(&db).await;
    let alive = running(&mut node);
    let code = stop_node(node, Duration::from_secs(40)).await;
    db.drop_db().await;

    eprintln!("[poison_in_backlog_block] {}", backlog.describe());
    eprintln!(
        "[poison_in_backlog_block] before the fix: {} of {} free events arrived ({early_lost} \
         missing) by {:.1}s; {HOLD:?} later {} deliveries of {} events from behind the poison \
         event had arrived, pending {pending_held} (poison + after = {}), parked \
         {parked_held:?}, 'partition blocked' logged: {blocked_said}",
        free.len() - early_lost,
        free.len(),
        free_at.as_secs_f64(),
        overtaking.len(),
        overtaking_events.len(),
        backlog.after.len() + 1
    );
    eprintln!(
        "[poison_in_backlog_block] after the fix (rows {fixed}): released {released} in \
         {released_in:?} (pending {pending}); {t}; parked {parked:?}; exit {code:?}; took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    eprintln!("[poison_in_backlog_block] {}", log_summary(&log));

    assert!(alive, "the engine exited; {}", log_summary(&log));
    assert_no_panic(&log);
    assert_eq!(
        early_lost, 0,
        "events before the poison event or in other partitions did not arrive"
    );
    assert!(
        overtaking.is_empty(),
        "{} deliveries of {} events from behind the poison event arrived while it was blocked \
         (of {} behind it)",
        overtaking.len(),
        overtaking_events.len(),
        backlog.after.len()
    );
    assert!(
        parked_held.is_empty(),
        "block parked events: {parked_held:?}"
    );
    assert_eq!(
        fixed, 1,
        "the poison event was no longer in the outbox to fix"
    );
    assert!(
        released,
        "the partition did not drain within 60 s after the fix (pending {pending}); {t}"
    );
    t.assert_delivered("the backlog", WINDOW);
    remove_files(&log);
}

/// A private broker frozen (SIGSTOP) for 6 s under load, twice the 3 s
/// delivery timeout: deliveries time out, the producer is recreated, and
/// once the broker runs again everything arrives, first deliveries in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_frozen_past_delivery_timeout() {
    const FREEZE: Duration = Duration::from_secs(6);
    let (_turn, started, db, prefix, topics) = setup().await;
    let broker = tokio::task::block_in_place(PrivateBroker::start).expect("a private broker");
    let broker_pid = broker.pid().expect("the private broker runs");
    let log = log_path("frozen", "n1");
    let mut node = spawn_node(
        &db,
        &Node {
            id: "frozen",
            brokers: &broker.addr(),
            prefix: &prefix,
            relay: "",
            client_id: None,
            args: &["--delivery-timeout-ms", "3000"],
            log: &log,
        },
    );
    let spread = wait_for_owners(
        &db,
        &[("frozen", PARTITIONS as i64)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        spread.get("frozen"),
        Some(&(PARTITIONS as i64)),
        "the node did not take its partitions: {spread:?}; {}",
        log_summary(&log)
    );
    let stop = CancellationToken::new();
    let writer = spawn_paced_writer(&db, 10, Duration::from_millis(10), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    signal_pid(broker_pid, "STOP").expect("freeze the broker");
    let frozen_at = Instant::now();
    let mut pending_frozen = Vec::new();
    while frozen_at.elapsed() < FREEZE {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pending_frozen.push(db.pending().await);
        if !running(&mut node) {
            break;
        }
    }
    signal_pid(broker_pid, "CONT").expect("thaw the broker");
    let frozen_for = frozen_at.elapsed();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (committed, drained, pending) = stop_writing(&db, stop, writer).await;
    let drained_in = frozen_at.elapsed();
    let grace = Duration::from_secs(1);
    let t = tally_after_drain(&broker.addr(), &topics, &committed, drained, grace).await;
    let alive = running(&mut node);
    let recreated = log_text(&log).contains("recreated the Kafka producer");
    let code = stop_node(node, Duration::from_secs(40)).await;
    db.drop_db().await;
    drop(broker);

    eprintln!(
        "[broker_frozen_past_delivery_timeout] frozen {:.1}s (delivery timeout 3 s); pending \
         each second while frozen {pending_frozen:?}; drained {drained} {:.1}s after the freeze \
         began (pending {pending}); producer recreated: {recreated}",
        frozen_for.as_secs_f64(),
        drained_in.as_secs_f64()
    );
    eprintln!(
        "[broker_frozen_past_delivery_timeout] {t} (bound {WINDOW}); exit {code:?}; took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "[broker_frozen_past_delivery_timeout] {}",
        log_summary(&log)
    );

    assert!(alive, "the engine exited; {}", log_summary(&log));
    assert_no_panic(&log);
    assert!(
        drained,
        "the backlog did not drain within 60 s after the broker ran again (pending {pending}); \
         {t}"
    );
    assert!(
        recreated,
        "no 'recreated the Kafka producer' in the log after a freeze twice the delivery \
         timeout; {}",
        log_summary(&log)
    );
    t.assert_delivered("committed under load", WINDOW);
    remove_files(&log);
}

/// Node A is paused (SIGSTOP) with its broker link cut, past its lease,
/// while node B takes its partitions over; A is woken only once B has
/// delivered on every one of them. Nothing A had queued may land after
/// that: no delivery behind a newer one of its key (no stale delivery),
/// not even a copy.
///
/// A's link is held for 500 ms before the pause: its requests stop reaching
/// the broker while the responses still come back, so A acknowledges all
/// the broker wrote. Without that, a request in flight at the pause could
/// be written with A never acknowledging it, and B would rightly send it
/// again behind the original: a stale copy that is no fencing failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_owner_paused_past_lease() {
    let (_turn, started, db, prefix, topics) = setup().await;
    let flag = ("--delivery-timeout-ms", DELIVERY_TIMEOUT_MS);
    let mut pair = start_pair(&db, &prefix, "stale", flag).await;

    let taken = owned_by(&db, "node-a").await;
    pair.link_a.hold();
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_signal(&pair.a, "STOP");
    pair.link_a.cut();
    let paused_at = Instant::now();
    // B sends these partitions from here on: the oldest event of each
    // (A, frozen, acknowledges nothing more; B cannot own them yet).
    let mut lowest: BTreeMap<i32, i64> = BTreeMap::new();
    while lowest.len() < taken.len() && paused_at.elapsed() < Duration::from_secs(1) {
        for p in &taken {
            if let Some(pos) = lowest_position(&db, *p).await {
                lowest.entry(*p).or_insert(pos);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        lowest.len(),
        taken.len(),
        "no backlog in a's partitions {taken:?}: {lowest:?}"
    );
    let moved = wait_for_owners(&db, &[("node-b", 4)], Duration::from_secs(15)).await;
    let moved_in = paused_at.elapsed();
    assert_eq!(
        moved.get("node-b"),
        Some(&4),
        "b did not take over: {moved:?}"
    );
    let b_sent = eventually(Duration::from_secs(20), || async {
        for (p, pos) in &lowest {
            if position_present(&db, *p, *pos).await {
                return false;
            }
        }
        true
    })
    .await;
    let b_sent_in = paused_at.elapsed();
    send_signal(&pair.a, "CONT");
    pair.link_a.restore();
    let woke_at = paused_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (committed, drained, pending) = stop_writing(&db, pair.stop, pair.writer).await;
    let owners_after = owners(&db).await;
    let (alive_a, alive_b) = (running(&mut pair.a), running(&mut pair.b));
    let code_a = stop_node(pair.a, Duration::from_secs(40)).await;
    let code_b = stop_node(pair.b, Duration::from_secs(40)).await;
    let grace = Duration::from_secs(1);
    let t = tally_after_drain(&pair.addr, &topics, &committed, drained, grace).await;
    let (forwarded, reset) = pair.link_a.counts();
    db.drop_db().await;
    drop(pair.broker);

    eprintln!(
        "[stale_owner_paused_past_lease] a held {taken:?}; paused, b owned all after \
         {moved_in:?}, b had delivered the oldest event of each ({lowest:?}: {b_sent}) after \
         {b_sent_in:?}; a woken at {woke_at:?}; owners after {owners_after:?}; drained \
         {drained} (pending {pending}); a's link: {forwarded} connections forwarded, {reset} \
         reset"
    );
    eprintln!(
        "[stale_owner_paused_past_lease] {t} (bound {WINDOW}); exit a {code_a:?} b {code_b:?}; \
         took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    report_logs("stale_owner_paused_past_lease", &pair.logs);

    assert!(
        alive_a && alive_b,
        "a node exited: a {alive_a}, b {alive_b}"
    );
    assert_no_panic(&pair.logs[0]);
    assert_no_panic(&pair.logs[1]);
    assert!(
        b_sent,
        "b did not deliver a's partitions within 20 s of owning them"
    );
    assert!(
        drained,
        "the backlog did not drain (pending {pending}); {t}"
    );
    t.assert_delivered("committed under load", WINDOW);
    assert_eq!(
        t.order.stale_deliveries, 0,
        "the paused owner's messages landed after the new owner's (stale deliveries); {t}"
    );
    pair.logs.iter().for_each(|log| remove_files(log));
}

/// Node A's broker link is cut, A goes on sending into it for a second,
/// then gets SIGTERM: its drain cannot finish (its delivery timeout is the
/// default, longer than its shutdown timeout) and runs into its 4 s
/// shutdown timeout, longer than the 2 s lease. A keeps renewing its leases
/// while it drains, so no partition changes hands (no epoch changes) before
/// A's process has exited; then B takes them all and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_broker_cut_keeps_leases() {
    const SHUTDOWN_MS: u64 = 4_000;
    let (_turn, started, db, prefix, topics) = setup().await;
    let flag = ("--shutdown-timeout-ms", SHUTDOWN_MS);
    let mut pair = start_pair(&db, &prefix, "sigterm", flag).await;

    let before = lease_rows(&db).await;
    pair.link_a.cut();
    // A fetches and sends into the dead link: batches in flight at SIGTERM.
    tokio::time::sleep(Duration::from_secs(1)).await;
    send_signal(&pair.a, "TERM");
    let term_at = Instant::now();
    // (ms since SIGTERM, lease rows) for every sample that changed an epoch
    // while A still ran; the lease rows are read before A is polled, so A
    // was running when they were read.
    let mut changed_while_running: Vec<(u128, Vec<LeaseRow>)> = Vec::new();
    let mut samples = 0;
    let a_exit = loop {
        let rows = lease_rows(&db).await;
        samples += 1;
        if let Some(status) = pair.a.try_wait().expect("poll a") {
            break Some(status);
        }
        let epochs_changed = rows.iter().zip(&before).any(|(now, then)| now.1 != then.1);
        if epochs_changed && changed_while_running.len() < 5 {
            changed_while_running.push((term_at.elapsed().as_millis(), rows));
        }
        if term_at.elapsed() > Duration::from_millis(SHUTDOWN_MS) + Duration::from_secs(16) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let exited_in = term_at.elapsed();
    let moved = wait_for_owners(&db, &[("node-b", 4)], Duration::from_secs(20)).await;
    let moved_in = term_at.elapsed();
    pair.link_a.restore();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (committed, drained, pending) = stop_writing(&db, pair.stop, pair.writer).await;
    let after = lease_rows(&db).await;
    let alive_b = running(&mut pair.b);
    let code_a = match a_exit {
        Some(status) => status.code(),
        None => stop_node(pair.a, Duration::from_secs(1)).await,
    };
    let code_b = stop_node(pair.b, Duration::from_secs(40)).await;
    let grace = Duration::from_secs(1);
    let t = tally_after_drain(&pair.addr, &topics, &committed, drained, grace).await;
    db.drop_db().await;
    drop(pair.broker);

    eprintln!(
        "[sigterm_during_broker_cut_keeps_leases] leases before {before:?}; a exited \
         ({code_a:?}) {exited_in:?} after SIGTERM (shutdown timeout {SHUTDOWN_MS} ms); \
         {samples} lease samples, epochs changed while a ran: {changed_while_running:?}"
    );
    eprintln!(
        "[sigterm_during_broker_cut_keeps_leases] owners {moved:?} {moved_in:?} after SIGTERM; \
         leases at the end {after:?}; drained {drained} (pending {pending})"
    );
    eprintln!(
        "[sigterm_during_broker_cut_keeps_leases] {t} (bound {WINDOW}); exit b {code_b:?}; \
         took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    report_logs("sigterm_during_broker_cut_keeps_leases", &pair.logs);

    assert!(
        a_exit.is_some(),
        "a did not exit within its shutdown timeout + 16 s of SIGTERM; {}",
        log_summary(&pair.logs[0])
    );
    assert_no_panic(&pair.logs[0]);
    assert_no_panic(&pair.logs[1]);
    assert!(
        exited_in > Duration::from_millis(LEASE_TTL_MS),
        "test precondition: a's drain ({exited_in:?}) must outlast its {LEASE_TTL_MS} ms lease \
         for the leases to be at risk; {}",
        log_summary(&pair.logs[0])
    );
    assert!(
        changed_while_running.is_empty(),
        "partitions changed hands while a was still draining (leases before {before:?}): \
         {changed_while_running:?}"
    );
    assert_eq!(
        moved.get("node-b"),
        Some(&4),
        "b did not take every partition after a exited: {moved:?}"
    );
    assert!(alive_b, "b exited; {}", log_summary(&pair.logs[1]));
    assert!(
        drained,
        "the backlog did not drain (pending {pending}); {t}"
    );
    t.assert_delivered("committed under load", WINDOW);
    pair.logs.iter().for_each(|log| remove_files(log));
}
