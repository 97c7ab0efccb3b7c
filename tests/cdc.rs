//! The CDC source against a real logical-decoding PostgreSQL (the private
//! cluster `deploy/services.sh` starts, `CDC_DATABASE_URL`) and tansu:
//! order and no loss with a late commit, migration between polling and CDC
//! under load, a dropped slot recovered, an idle slot advancing, the slot
//! holder killed -9 under load, PostgreSQL restarted under load, multi-row
//! COPYs (rows sharing one LSN) across an engine restart, and eight
//! concurrent writers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_engine::cdc::slot::{self, SlotStore};
use outbox_engine::config::{Config, SourceKind};
use outbox_engine::relay::Mode;
use outbox_engine::store::Names;
use outbox_harness::db::{migrate, pending};
use outbox_harness::node::{log_tail, logging_to};
use outbox_harness::ordering::{consume_ids, Tally};
use outbox_harness::pg::PrivatePg;
use outbox_harness::{
    brokers, config, config_at, consume, eventually, heavy_turn, node_command, owners, spawn_load,
    spawn_paced_writer, unique_prefix, EngineHandle, Load, TestDb, Written,
};

/// A CDC configuration with a slot and publication of the test's own (slots
/// are per server, and every test database shares the server).
fn cdc_config(db: &TestDb, prefix: &str, kind: SourceKind) -> Config {
    let mut c = config(db, prefix);
    c.cdc.slot = format!("{}_slot", db.name);
    c.cdc.publication = format!("{}_pub", db.name);
    with_cdc(c, kind)
}

/// Fast heartbeats and confirmations, so that tests see the slot move.
fn with_cdc(mut c: Config, kind: SourceKind) -> Config {
    c.source.kind = kind;
    c.cdc.heartbeat_ms = 200;
    c.cdc.status_interval_ms = 50;
    c.validate().expect("cdc test config is valid");
    c
}

fn slot_store(db: &TestDb, c: &Config) -> SlotStore {
    SlotStore::new(
        db.pool.clone(),
        &Names::new("public").expect("names"),
        &c.cdc.slot,
        &c.cdc.publication,
    )
    .expect("slot store")
}

async fn modes(db: &TestDb) -> Vec<(Option<String>, bool)> {
    modes_in(&db.pool).await.expect("modes")
}

/// Each partition's (mode, cdc_streaming).
async fn modes_in(pool: &PgPool) -> Result<Vec<(Option<String>, bool)>, sqlx::Error> {
    let rows = sqlx::query("select mode, cdc_streaming from outbox_leases order by partition")
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn all_streaming(db: &TestDb) -> bool {
    all_streaming_in(&db.pool).await
}

/// Every partition is in CDC mode and streams; false while the database
/// does not answer.
async fn all_streaming_in(pool: &PgPool) -> bool {
    modes_in(pool)
        .await
        .is_ok_and(|m| !m.is_empty() && m.iter().all(|(m, s)| m.as_deref() == Some("cdc") && *s))
}

/// Fails unless every partition of the outbox at `pool` streams within
/// `timeout`; `when` ends the message.
async fn assert_all_streaming(pool: &PgPool, timeout: Duration, when: &str) {
    assert!(
        eventually(timeout, || all_streaming_in(pool)).await,
        "every partition streams{when}: {:?}",
        modes_in(pool).await
    );
}

/// A fresh outbox of `partitions` on the logical server and an in-process
/// CDC engine, once every partition streams.
async fn streaming_engine(partitions: u32) -> (TestDb, String, Config, EngineHandle) {
    let db = TestDb::new_cdc(partitions).await;
    let prefix = unique_prefix();
    let c = cdc_config(&db, &prefix, SourceKind::Cdc);
    let engine = EngineHandle::start(c.clone()).await;
    assert_all_streaming(&db.pool, Duration::from_secs(20), "").await;
    (db, prefix, c, engine)
}

#[tokio::test]
async fn the_shard_computed_from_the_stream_is_the_servers() {
    let db = TestDb::new_cdc(1).await;
    let keys: Vec<String> = (0..600)
        .map(|i| match i % 4 {
            0 => format!("a{i}"),
            1 => "x".repeat(i % 40),
            2 => format!("order-{i}-ключ-{}", "z".repeat(i % 13)),
            _ => Uuid::from_u128(i as u128 * 7919).to_string(),
        })
        .collect();
    for shards in [1u32, 4, 16, 1000] {
        let server: Vec<i32> = sqlx::query_scalar(
            "select ((hashtextextended(k, 0) & 9223372036854775807) % $2)::int
               from unnest($1::text[]) with ordinality as t(k, i) order by i",
        )
        .bind(&keys)
        .bind(shards as i64)
        .fetch_all(&db.pool)
        .await
        .expect("server hashes");
        for (k, s) in keys.iter().zip(server) {
            assert_eq!(
                outbox_engine::cdc::shard::shard_of(k, shards),
                s as u32,
                "key {k:?}, {shards} shards"
            );
        }
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_streams_in_order_including_a_transaction_that_commits_late() {
    let (db, prefix, c, engine) = streaming_engine(4).await;
    // A transaction takes a low position and commits after later ones.
    let mut late = db.pool.begin().await.expect("begin");
    let late_id = Uuid::now_v7();
    sqlx::query(
        "insert into outbox (id, aggregate_type, aggregate_id, event_type, payload)
         values ($1, 'order', 'late', 'Tick', '{\"seq\": 0}')",
    )
    .bind(late_id)
    .execute(&mut *late)
    .await
    .expect("late insert");
    let stop = CancellationToken::new();
    let writer = spawn_paced_writer(&db, 8, Duration::from_millis(5), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    late.commit().await.expect("late commit");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut committed = writer.await.expect("writer");
    committed.push(late_id);
    let topic = format!("{prefix}order");
    let received = consume(
        &[topic],
        committed.len(),
        Duration::from_secs(40),
        Duration::from_secs(2),
    )
    .await;
    let tally = Tally::of(&committed, &received);
    assert_eq!(tally.lost, 0, "{tally}");
    assert_eq!(tally.order.first_delivery_violations, 0, "{tally}");
    // The slot is confirmed past everything, the marks follow, and the
    // table holds nothing unpublished.
    assert!(
        eventually(Duration::from_secs(10), || async {
            db.pending().await == 0
        })
        .await,
        "pending after the stream published everything: {}",
        db.pending().await
    );
    let store = slot_store(&db, &c);
    let state = store.state().await.expect("state").expect("slot exists");
    assert!(state.active_pid.is_some(), "the engine reads the slot");
    engine.stop().await;
    db.drop_db().await;
}

async fn switch(db: &TestDb, c: &Config, mode: Mode, partitions: Option<&[u32]>) -> Vec<u32> {
    slot::switch(&slot_store(db, c), mode, partitions)
        .await
        .expect("switch")
}

async fn check_delivery(prefix: &str, committed: &[Uuid]) -> Tally {
    let received = consume(
        &[format!("{prefix}order")],
        committed.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    let tally = Tally::of(committed, &received);
    assert_eq!(tally.lost, 0, "{tally}");
    assert_eq!(tally.order.first_delivery_violations, 0, "{tally}");
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_move_from_polling_to_cdc_and_back_under_load_losing_nothing() {
    let _turn = heavy_turn().await;
    let db = TestDb::new_cdc(4).await;
    let prefix = unique_prefix();
    let c = cdc_config(&db, &prefix, SourceKind::Poll);
    let engine = EngineHandle::start(c.clone()).await;
    let stop = CancellationToken::new();
    let writer = spawn_paced_writer(&db, 8, Duration::from_millis(5), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(switch(&db, &c, Mode::Cdc, None).await, vec![0, 1, 2, 3]);
    assert_all_streaming(&db.pool, Duration::from_secs(30), " after the switch").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Back, one partition first, then the rest.
    assert_eq!(switch(&db, &c, Mode::Poll, Some(&[1])).await, vec![1]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(switch(&db, &c, Mode::Poll, None).await, vec![0, 2, 3]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let committed = writer.await.expect("writer");
    let tally = check_delivery(&prefix, &committed).await;
    eprintln!("poll -> cdc -> poll: {tally}");
    assert!(
        modes(&db)
            .await
            .iter()
            .all(|(m, _)| m.as_deref() == Some("poll")),
        "{:?}",
        modes(&db).await
    );
    engine.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_dropped_mid_stream_is_made_again_and_nothing_is_lost() {
    let (db, prefix, c, engine) = streaming_engine(4).await;
    let stop = CancellationToken::new();
    let writer = spawn_paced_writer(&db, 8, Duration::from_millis(5), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The walsender comes back quickly: end it and drop the slot until the
    // drop wins the race.
    let dropped = eventually(Duration::from_secs(20), || async {
        let _ = sqlx::query(
            "select pg_terminate_backend(active_pid) from pg_replication_slots
              where slot_name = $1 and active_pid is not null",
        )
        .bind(&c.cdc.slot)
        .execute(&db.pool)
        .await;
        sqlx::query("select pg_drop_replication_slot($1)")
            .bind(&c.cdc.slot)
            .execute(&db.pool)
            .await
            .is_ok()
    })
    .await;
    assert!(dropped, "could not drop the slot");
    let store = slot_store(&db, &c);
    assert!(
        eventually(Duration::from_secs(30), || async {
            store.recoveries().await.unwrap_or(0) >= 1 && all_streaming(&db).await
        })
        .await,
        "the slot was made again and every partition streams: recoveries {:?}, {:?}",
        store.recoveries().await,
        modes(&db).await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let committed = writer.await.expect("writer");
    let tally = check_delivery(&prefix, &committed).await;
    eprintln!("slot dropped mid-stream: {tally}");
    engine.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_slot_advances_past_wal_that_has_no_outbox_rows() {
    let (db, _, c, engine) = streaming_engine(2).await;
    let store = slot_store(&db, &c);
    // WAL the publication does not cover.
    sqlx::raw_sql("create table noise (n int); insert into noise select generate_series(1, 20000)")
        .execute(&db.pool)
        .await
        .expect("noise");
    let after: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .expect("lsn");
    let after = slot::parse_lsn(&after).expect("lsn");
    assert!(
        eventually(Duration::from_secs(15), || async {
            store
                .state()
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.confirmed_flush >= after)
        })
        .await,
        "the slot's confirmed position {:?} did not pass {}",
        store.state().await,
        slot::lsn_text(after)
    );
    engine.stop().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------
// Faults and load: the slot holder killed, PostgreSQL restarted, multi-row
// COPYs across an engine restart, concurrent writers.

/// `writers` concurrent writers until `stop`: writer `k` writes, per
/// transaction, one event to each of its aggregates `w{k}-a0 ..` with a
/// `seq` that grows with every attempt; a failure (the database going
/// away) is retried after a moment, and only confirmed commits count.
fn spawn_writers(
    pool: &PgPool,
    writers: usize,
    aggregates: usize,
    pause: Duration,
    stop: CancellationToken,
) -> JoinHandle<Written> {
    let tasks: Vec<JoinHandle<Written>> = (0..writers)
        .map(|k| {
            let load = Load::retrying(&format!("w{k}-a"), aggregates, pause);
            spawn_load(pool.clone(), load, stop.clone())
        })
        .collect();
    tokio::spawn(async move {
        let mut all = Written::default();
        for t in tasks {
            let w = t.await.expect("writer");
            all.committed.extend(w.committed);
            all.failed_tx += w.failed_tx;
        }
        all
    })
}

/// Consumes `{prefix}order` until every committed id arrived (or
/// `timeout`), and judges the delivery.
async fn delivery(prefix: &str, committed: &[Uuid], timeout: Duration) -> Tally {
    let received = consume_ids(
        &brokers(),
        &[format!("{prefix}order")],
        committed,
        timeout,
        Duration::from_secs(2),
    )
    .await;
    Tally::of(committed, &received)
}

/// The holder of the slot's live lease.
async fn slot_owner(db: &TestDb) -> Option<String> {
    sqlx::query_scalar("select owner from outbox_cdc where expires_at > now()")
        .fetch_optional(&db.pool)
        .await
        .expect("slot owner")
        .flatten()
}

/// Events each partition published under its current lease holders
/// (`outbox_leases.published`), by partition.
async fn published(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("select published from outbox_leases order by partition")
        .fetch_all(&db.pool)
        .await
        .expect("published")
}

/// An `outbox run --source cdc` child process with the test database's slot
/// and publication, logging to `log`.
fn spawn_cdc_node(db: &TestDb, id: &str, prefix: &str, log: &Path) -> tokio::process::Child {
    let mut cmd = node_command(db, id, prefix);
    logging_to(&mut cmd, log)
        .expect("the node's log file")
        .args(["--source", "cdc"])
        .env("OUTBOX_CDC__SLOT", format!("{}_slot", db.name))
        .env("OUTBOX_CDC__PUBLICATION", format!("{}_pub", db.name))
        .env("OUTBOX_CDC__HEARTBEAT_MS", "200")
        .env("OUTBOX_CDC__STATUS_INTERVAL_MS", "50")
        .env("RUST_LOG", "warn,outbox_engine=info")
        .spawn()
        .expect("spawn outbox run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_node_takes_the_slot_when_its_holder_is_killed_under_load() {
    let _turn = heavy_turn().await;
    let db = TestDb::new_cdc(4).await;
    let prefix = unique_prefix();
    let dir = std::env::temp_dir();
    let logs: Vec<PathBuf> = ["k1", "k2"]
        .iter()
        .map(|n| dir.join(format!("{}-{n}.log", db.name)))
        .collect();
    let mut nodes = vec![
        ("k1", spawn_cdc_node(&db, "k1", &prefix, &logs[0])),
        ("k2", spawn_cdc_node(&db, "k2", &prefix, &logs[1])),
    ];
    let settled = eventually(Duration::from_secs(30), || async {
        let Some(holder) = slot_owner(&db).await else {
            return false;
        };
        owners(&db).await.get(&holder) == Some(&4) && all_streaming(&db).await
    })
    .await;
    assert!(
        settled,
        "one node holds the slot and streams every partition: slot {:?}, leases {:?}, {:?}\n{}\n{}",
        slot_owner(&db).await,
        owners(&db).await,
        modes(&db).await,
        log_tail(&logs[0], 20),
        log_tail(&logs[1], 20)
    );
    let holder = slot_owner(&db).await.expect("a slot holder");
    let c = cdc_config(&db, &prefix, SourceKind::Cdc);
    let store = slot_store(&db, &c);
    let walsender = store
        .state()
        .await
        .expect("slot state")
        .and_then(|s| s.active_pid)
        .expect("the holder reads the slot");
    let (writers, aggregates) = (2, 6);
    let mut shards: Vec<u32> = (0..writers)
        .flat_map(|k| (0..aggregates).map(move |j| format!("w{k}-a{j}")))
        .map(|key| outbox_engine::cdc::shard::shard_of(&key, db.partitions))
        .collect();
    shards.sort_unstable();
    shards.dedup();
    assert_eq!(
        shards.len(),
        4,
        "the writers' aggregates cover every partition"
    );
    let stop = CancellationToken::new();
    let writer = spawn_writers(
        &db.pool,
        writers,
        aggregates,
        Duration::from_millis(5),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let i = nodes
        .iter()
        .position(|(id, _)| *id == holder)
        .expect("the holder is one of ours");
    for (n, (id, node)) in nodes.iter_mut().enumerate() {
        assert!(
            node.try_wait().expect("node status").is_none(),
            "{id} runs before the kill\n{}",
            log_tail(&logs[n], 20)
        );
    }
    let (_, mut victim) = nodes.remove(i);
    let (survivor, _) = nodes[0];
    victim.start_kill().expect("kill -9");
    victim.wait().await.expect("reaped");
    let killed = Instant::now();
    let took_over = eventually(Duration::from_secs(40), || async {
        let reader = store
            .state()
            .await
            .ok()
            .flatten()
            .and_then(|s| s.active_pid);
        slot_owner(&db).await.as_deref() == Some(survivor)
            && reader.is_some_and(|pid| pid != walsender)
            && owners(&db).await.get(survivor) == Some(&4)
            && all_streaming(&db).await
    })
    .await;
    let takeover = killed.elapsed();
    assert!(
        took_over,
        "{survivor} holds the slot, reads it and leases every partition: slot {:?} ({:?}), \
         leases {:?}, {:?}\n{}",
        slot_owner(&db).await,
        store.state().await,
        owners(&db).await,
        modes(&db).await,
        log_tail(&logs[1 - i], 30)
    );
    // The stored flags still say what the dead node left: that every
    // partition streams again shows in what the survivor publishes.
    let before = published(&db).await;
    let streams = eventually(Duration::from_secs(30), || async {
        let now = published(&db).await;
        now.iter().zip(&before).all(|(n, b)| n > b)
    })
    .await;
    let resumed = killed.elapsed();
    assert!(
        streams,
        "every partition publishes again: {before:?} -> {:?}\n{}",
        published(&db).await,
        log_tail(&logs[1 - i], 30)
    );
    // Events written after the takeover go through the survivor's stream.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let written = writer.await.expect("writers");
    assert_eq!(written.failed_tx, 0, "the database stayed up");
    let tally = delivery(&prefix, &written.committed, Duration::from_secs(60)).await;
    eprintln!(
        "slot holder {holder} killed -9: {survivor} held the slot and every lease after {:.1}s, \
         every partition published again after {:.1}s; {} failed transactions; {tally}",
        takeover.as_secs_f64(),
        resumed.as_secs_f64(),
        written.failed_tx
    );
    assert_eq!(tally.lost, 0, "{tally}\n{}", log_tail(&logs[1 - i], 30));
    assert_eq!(tally.order.first_delivery_violations, 0, "{tally}");
    let (_, mut rest) = nodes.remove(0);
    outbox_harness::send_signal(&rest, "TERM");
    assert!(
        rest.wait().await.expect("survivor").success(),
        "SIGTERM exits 0"
    );
    for l in &logs {
        let _ = std::fs::remove_file(l);
    }
    db.drop_db().await;
}

/// Settings of a private cluster that decodes logically. The restart test
/// uses a cluster of its own ([`PrivatePg`]): every other CDC test of this
/// binary runs in parallel on the shared one, and a restart would fail
/// them.
const LOGICAL: &str = "wal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\n\
                       autovacuum = off\n";

/// [`cdc_config`] for a database at `url` (not a [`TestDb`]): the settings
/// of `outbox_harness::config`.
fn cdc_config_at(url: &str, prefix: &str) -> Config {
    let mut c = config_at(url, prefix);
    c.cluster.node_id = "restart".into();
    with_cdc(c, SourceKind::Cdc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_committed_streams_in_order_across_a_postgres_restart_under_load() {
    let _turn = heavy_turn().await;
    let started = Instant::now();
    let mut pg = tokio::task::spawn_blocking(|| PrivatePg::start_with(LOGICAL))
        .await
        .expect("initdb task")
        .expect("a private logical-decoding cluster (PostgreSQL server binaries, initdb)");
    let setup = started.elapsed();
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&pg.url())
        .await
        .expect("connect the private cluster");
    let mut conn = pool.acquire().await.expect("conn");
    migrate(&mut conn, 4).await.expect("migrate");
    drop(conn);
    let prefix = unique_prefix();
    let engine = EngineHandle::start(cdc_config_at(&pg.url(), &prefix)).await;
    assert_all_streaming(&pool, Duration::from_secs(20), "").await;
    let stop = CancellationToken::new();
    let writer = spawn_writers(&pool, 2, 4, Duration::from_millis(5), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restart_at = Instant::now();
    let restarted = {
        let pg = &mut pg;
        tokio::task::block_in_place(|| pg.restart())
    };
    if let Err(error) = restarted {
        let walsenders = std::process::Command::new("ps")
            .args(["-eo", "pid,args"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.contains("walsender"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        panic!(
            "pg_ctl restart -m fast: {error}\nwalsenders: {walsenders}\nserver log:\n{}",
            log_tail(Path::new(&pg.log()), 15)
        );
    }
    let restart_took = restart_at.elapsed();
    // Write on after the restart: the engine must stream these too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let written = writer.await.expect("writers");
    let stopped_writing = Instant::now();
    let drained = eventually(Duration::from_secs(60), || async {
        pending(&pool).await.ok() == Some(0)
    })
    .await;
    let drain_took = stopped_writing.elapsed();
    let tally = delivery(&prefix, &written.committed, Duration::from_secs(60)).await;
    eprintln!(
        "postgres restart: private cluster ready in {:.1}s, restart took {:.1}s, {} failed \
         transactions, drained {drained} {:.1}s after the writers stopped; {tally}",
        setup.as_secs_f64(),
        restart_took.as_secs_f64(),
        written.failed_tx,
        drain_took.as_secs_f64()
    );
    assert_eq!(tally.lost, 0, "{tally}");
    assert_eq!(tally.order.first_delivery_violations, 0, "{tally}");
    assert!(
        drained,
        "the outbox holds nothing unpublished: {:?} pending, {:?}",
        pending(&pool).await.ok(),
        modes_in(&pool).await
    );
    assert!(
        all_streaming_in(&pool).await,
        "every partition streams again: {:?}",
        modes_in(&pool).await
    );
    engine.stop().await;
    pool.close().await;
    drop(pg);
}

/// `rows` events in one `COPY` (one transaction): row `i` goes to
/// aggregate `c{i % aggregates}` with `seq` `first_seq + i / aggregates`.
/// Returns the ids in row order.
async fn copy_events(db: &TestDb, rows: usize, aggregates: usize, first_seq: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..rows).map(|_| Uuid::now_v7()).collect();
    let mut data = String::new();
    for (i, id) in ids.iter().enumerate() {
        let (agg, seq) = (i % aggregates, first_seq + i / aggregates);
        data.push_str(&format!("{id}\torder\tc{agg}\tTick\t{{\"seq\": {seq}}}\n"));
    }
    let mut tx = db.pool.begin().await.expect("begin");
    let mut copy = tx
        .copy_in_raw(
            "copy outbox (id, aggregate_type, aggregate_id, event_type, payload) from stdin",
        )
        .await
        .expect("copy in");
    copy.send(data.as_bytes()).await.expect("copy data");
    assert_eq!(copy.finish().await.expect("copy finish"), rows as u64);
    tx.commit().await.expect("commit");
    ids
}

async fn published_total(db: &TestDb) -> i64 {
    published(db).await.iter().sum()
}

/// The rows of one `COPY` share one LSN (FIELD-NOTES: "A `COPY` gave three
/// rows one LSN"), so only (commit LSN, ordinal in the transaction) tells
/// them apart. A stop in the middle of a 5,000-row COPY leaves the slot
/// before that transaction and the partitions' marks inside it; the next
/// engine streams the transaction again and must skip exactly what was
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_whose_rows_share_an_lsn_are_published_whole_across_an_engine_restart() {
    let _turn = heavy_turn().await;
    let db = TestDb::new_cdc(4).await;
    let prefix = unique_prefix();
    // Leases a stall cannot cost: the restart below is graceful, and
    // nothing may be sent twice.
    let mut c = outbox_harness::engine::steady(cdc_config(&db, &prefix, SourceKind::Cdc));
    // Small batches, one at a time: 5,000 events take long enough to stop
    // the engine in the middle of them.
    c.relay.batch_size = 25;
    c.relay.max_inflight_batches = 1;
    let store = slot_store(&db, &c);
    let engine = EngineHandle::start(c.clone()).await;
    assert_all_streaming(&db.pool, Duration::from_secs(20), "").await;
    let (small, big) = (3, 5_000);
    let mut committed = copy_events(&db, small, 3, 0).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            published_total(&db).await == small as i64
        })
        .await,
        "the {small}-row COPY is published: {}",
        published_total(&db).await
    );
    committed.extend(copy_events(&db, big, 50, 1).await);
    let after: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .expect("lsn");
    let after = slot::parse_lsn(&after).expect("lsn");
    let total = (small + big) as i64;
    let started = Instant::now();
    let mut at_stop = published_total(&db).await;
    while at_stop <= small as i64 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        at_stop = published_total(&db).await;
    }
    engine.stop().await;
    let stopped = published_total(&db).await;
    assert!(
        at_stop > small as i64 && stopped < total,
        "the engine stopped in the middle of the {big}-row COPY: {at_stop} published at the \
         stop, {stopped} after draining, of {total}"
    );
    let state = store.state().await.expect("slot state").expect("slot");
    assert!(
        state.confirmed_flush < after,
        "the slot is not confirmed past a partly published transaction: confirmed {}, the COPY \
         ends before {}",
        slot::lsn_text(state.confirmed_flush),
        slot::lsn_text(after)
    );
    let restarted = Instant::now();
    let engine = EngineHandle::start(c.clone()).await;
    let tally = delivery(&prefix, &committed, Duration::from_secs(60)).await;
    let took = restarted.elapsed();
    eprintln!(
        "COPY {small} + {big} rows: stopped with {stopped} of {total} published, everything \
         consumed {:.1}s after the restart (2 s of grace included); {tally}",
        took.as_secs_f64()
    );
    assert_eq!(tally.lost, 0, "{tally}");
    assert_eq!(tally.order.first_delivery_violations, 0, "{tally}");
    // A graceful stop stored every acknowledged event's (LSN, ordinal):
    // the replayed COPY must skip exactly those.
    assert_eq!(tally.duplicates, 0, "{tally}");
    engine.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_writers_stream_in_order_losing_nothing() {
    let _turn = heavy_turn().await;
    let (db, prefix, _, engine) = streaming_engine(4).await;
    let stop = CancellationToken::new();
    let writer = spawn_writers(&db.pool, 8, 3, Duration::from_millis(2), stop.clone());
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let written = writer.await.expect("writers");
    let wrote_for = started.elapsed();
    assert_eq!(written.failed_tx, 0, "every transaction committed");
    let tally = delivery(&prefix, &written.committed, Duration::from_secs(60)).await;
    eprintln!(
        "8 concurrent writers for {:.1}s ({:.0} events/s): {tally}",
        wrote_for.as_secs_f64(),
        written.committed.len() as f64 / wrote_for.as_secs_f64()
    );
    assert_eq!(tally.lost, 0, "{tally}");
    assert_eq!(tally.order.first_delivery_violations, 0, "{tally}");
    engine.stop().await;
    db.drop_db().await;
}
