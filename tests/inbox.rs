//! The consumer inbox end to end: real `outbox` processes relaying to the
//! broker and the inbox's example consumer (`inbox/examples/read_model.rs`)
//! applying the events to a read model, both killed with SIGKILL under
//! load; and two consumers of one group reading the same partitions at
//! once (a hand-over). The read model must count every event exactly
//! once, in order per aggregate.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_harness::*;

/// Aggregates the writer touches per transaction (`a0..a19`).
const AGGREGATES: usize = 20;

/// Builds the example consumer once (cargo hands a package's tests only
/// that package's binaries) and returns its path.
fn read_model_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let args = [
            "-p",
            "outbox-inbox",
            "--features",
            "kafka",
            "--example",
            "read_model",
        ];
        outbox_harness::binary::cargo_build(&args, "read_model")
            .unwrap_or_else(|e| panic!("building the example consumer: {e}"))
    })
    .clone()
}

/// The example consumer as a child process.
fn consumer(db: &TestDb, topic: &str, group: &str, apply_delay_ms: u64) -> tokio::process::Child {
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let mut cmd = tokio::process::Command::new(read_model_binary());
    cmd.env(
        "DATABASE_URL",
        format!("{}{sep}application_name=read_model_{group}", db.url),
    )
    .env("KAFKA_BROKERS", brokers())
    .env("INBOX_TOPIC", topic)
    .env("INBOX_GROUP", group)
    .env("INBOX_PARTITIONS", TOPIC_PARTITIONS.to_string())
    .env("INBOX_BATCH", "200")
    .env("INBOX_APPLY_DELAY_MS", apply_delay_ms.to_string())
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    if std::env::var("INBOX_TEST_BYPASS").as_deref() == Ok("1") {
        // Shows that the checks below catch double application.
        cmd.env("INBOX_BYPASS", "1");
    }
    cmd.spawn().expect("spawn the example consumer")
}

/// An engine node that re-sends a lot after a kill: 4 batches of 100 in
/// flight per partition.
fn engine(db: &TestDb, node_id: &str, prefix: &str) -> tokio::process::Child {
    let mut cmd = node_command(db, node_id, prefix);
    cmd.args(["--batch-size", "100", "--max-inflight-batches", "4"]);
    cmd.spawn().expect("spawn outbox run")
}

/// The engine creates the topic with its first delivery: wait for it.
async fn wait_for_first_delivery(topic: &str) {
    let topics = [topic.to_string()];
    assert!(
        eventually(Duration::from_secs(30), || async {
            !consume(&topics, 1, Duration::from_secs(1), Duration::ZERO)
                .await
                .is_empty()
        })
        .await,
        "nothing published to {topic}"
    );
}

async fn kill9(child: &mut tokio::process::Child) {
    child.start_kill().expect("kill -9");
    let status = child.wait().await.expect("wait");
    assert!(!status.success());
}

/// What both consumer tests start with: the example consumer built, a
/// database with a writer running, and an engine node that has published
/// to the topic. Returns the database, the topic prefix, the topic, the
/// writer (its stop and task) and the node.
async fn relaying() -> (
    TestDb,
    String,
    String,
    CancellationToken,
    JoinHandle<Vec<Uuid>>,
    tokio::process::Child,
) {
    let binary = tokio::task::spawn_blocking(read_model_binary)
        .await
        .unwrap();
    assert!(binary.exists());
    let db = TestDb::new(4).await;
    let prefix = unique_prefix();
    let topic = format!("{prefix}order");
    let stop = CancellationToken::new();
    let writer = spawn_writer(&db, AGGREGATES, stop.clone());
    let node = engine(&db, "n0", &prefix);
    wait_for_first_delivery(&topic).await;
    (db, prefix, topic, stop, writer, node)
}

/// Once the writer stopped: the engine drains the outbox within 60 s and
/// the read model counts the `committed` events (see
/// [`wait_for_read_model`]); returns what it counts.
async fn drained_and_applied(db: &TestDb, committed: usize) -> i64 {
    assert!(
        eventually(Duration::from_secs(60), || async {
            db.pending().await == 0
        })
        .await,
        "the engine did not drain the outbox"
    );
    wait_for_read_model(db, committed as i64, Duration::from_secs(90)).await
}

/// Whether the group's consumer has a transaction open right now.
async fn in_transaction(db: &TestDb, group: &str) -> bool {
    sqlx::query_scalar::<_, bool>(
        "select exists (select 1 from pg_stat_activity
          where application_name = $1 and state like 'idle in transaction%'
             or application_name = $1 and state = 'active' and xact_start is not null)",
    )
    .bind(format!("read_model_{group}"))
    .fetch_one(&db.pool)
    .await
    .expect("pg_stat_activity")
}

/// The read model: aggregate -> (events, last_seq, out_of_order).
async fn read_model(db: &TestDb) -> HashMap<String, (i64, Option<i64>, i64)> {
    let rows: Vec<(String, i64, Option<i64>, i64)> =
        sqlx::query_as("select aggregate_id, events, last_seq, out_of_order from read_model")
            .fetch_all(&db.pool)
            .await
            .unwrap_or_default();
    rows.into_iter()
        .map(|(a, n, s, bad)| (a, (n, s, bad)))
        .collect()
}

async fn applied_total(db: &TestDb) -> i64 {
    read_model(db).await.values().map(|v| v.0).sum()
}

/// Waits until the read model counts at least `want` events and stays
/// put for 3 s (so double applications would have shown), or `timeout`.
async fn wait_for_read_model(db: &TestDb, want: i64, timeout: Duration) -> i64 {
    let start = Instant::now();
    let mut last = (-1, Instant::now());
    loop {
        let n = applied_total(db).await;
        if n != last.0 {
            last = (n, Instant::now());
        }
        if (n >= want && last.1.elapsed() > Duration::from_secs(3)) || start.elapsed() > timeout {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every committed event counted once per aggregate, the last seq the
/// highest written, no seq applied out of order or twice.
fn check_exactly_once(model: &HashMap<String, (i64, Option<i64>, i64)>, transactions: i64) {
    assert_eq!(model.len(), AGGREGATES, "aggregates in the read model");
    for a in 0..AGGREGATES {
        let key = format!("a{a}");
        let (events, last_seq, out_of_order) = model[&key];
        assert_eq!(
            events, transactions,
            "{key}: {events} applications of {transactions} distinct events"
        );
        assert_eq!(last_seq, Some(transactions - 1), "{key}: last seq");
        assert_eq!(out_of_order, 0, "{key}: seqs applied out of order or twice");
    }
}

/// The engine killed -9 three times under load (the broker gets
/// duplicates) and the consumer killed -9 five times, mostly mid-batch
/// (uncommitted work, offsets behind the database): the read model counts
/// every event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_applied_once_across_kill_9_of_engine_and_consumer() {
    let _turn = heavy_turn().await;
    let group = "rm";
    let (db, prefix, topic, stop, writer, mut node) = relaying().await;
    let mut reader = consumer(&db, &topic, group, 40);

    let start = Instant::now();
    let (mut engine_kills, mut consumer_kills, mut mid_batch) = (0, 0, 0);
    let mut next_engine_kill = Duration::from_secs(3);
    // 14 s of kills, longer if a loaded machine made the kills too few
    // (each waits for the consumer to open a transaction).
    let enough = |engine_kills: usize, consumer_kills: usize, elapsed: Duration| {
        elapsed >= Duration::from_secs(60)
            || (elapsed >= Duration::from_secs(14) && engine_kills >= 3 && consumer_kills >= 5)
    };
    while !enough(engine_kills, consumer_kills, start.elapsed()) {
        let wait = rand::thread_rng().gen_range(900..1_800);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        // Kill it mid-batch: wait (up to 5 s) until it has a transaction open.
        if eventually(Duration::from_secs(5), || in_transaction(&db, group)).await {
            mid_batch += 1;
        }
        kill9(&mut reader).await;
        consumer_kills += 1;
        if start.elapsed() >= next_engine_kill && engine_kills < 3 {
            kill9(&mut node).await;
            engine_kills += 1;
            node = engine(&db, &format!("n{engine_kills}"), &prefix);
            next_engine_kill += Duration::from_secs(4);
        }
        reader = consumer(&db, &topic, group, 40);
    }
    stop.cancel();
    let committed = writer.await.unwrap();
    let transactions = (committed.len() / AGGREGATES) as i64;
    // A redelivery the consumer must skip, whatever the kills produced
    // (a kill -9 of the engine between two acknowledgements sends nothing
    // twice): 200 published events written to the outbox again, same ids
    // and event times, as a re-send by the relay carries them.
    let copied = sqlx::query(
        "insert into outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, topic,
                             created_at)
         select id, aggregate_type, aggregate_id, event_type, payload, headers, topic, created_at
           from (select * from outbox order by position desc limit 200) o",
    )
    .execute(&db.pool)
    .await
    .expect("copy published events")
    .rows_affected();
    assert_eq!(copied, 200, "events copied for redelivery");
    let applied = drained_and_applied(&db, committed.len()).await;
    let delivered = consume(
        std::slice::from_ref(&topic),
        committed.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    let (lost, broker_duplicates) = lost_and_duplicates(&committed, &delivered);
    let recorded: i64 = sqlx::query_scalar("select count(*) from inbox where consumer_group = $1")
        .bind(group)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eprintln!(
        "committed {} ({transactions} per aggregate), on the broker {} (lost {lost}, duplicates {broker_duplicates}), \
         engine kills {engine_kills}, consumer kills {consumer_kills} ({mid_batch} with a transaction open), \
         applied {applied}, inbox rows {recorded}",
        committed.len(),
        delivered.len()
    );
    if recorded != committed.len() as i64 {
        // Where the missing events sit in each partition (diagnostics).
        let applied_ids: std::collections::HashSet<Uuid> =
            sqlx::query_scalar("select event_id from inbox where consumer_group = $1")
                .bind(group)
                .fetch_all(&db.pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        let mut per_partition: HashMap<i32, Vec<usize>> = HashMap::new();
        let mut index: HashMap<i32, usize> = HashMap::new();
        for r in &delivered {
            let i = index.entry(r.partition).or_default();
            if !applied_ids.contains(&r.id()) {
                per_partition.entry(r.partition).or_default().push(*i);
            }
            *i += 1;
        }
        for (p, v) in &per_partition {
            eprintln!(
                "partition {p}: {} not applied, first at {:?}, last at {:?} of {}",
                v.len(),
                v.first(),
                v.last(),
                index[p]
            );
        }
    }
    assert_eq!(engine_kills, 3);
    assert!(consumer_kills >= 5, "{consumer_kills} consumer kills");
    assert!(
        mid_batch * 2 >= consumer_kills,
        "only {mid_batch} of {consumer_kills} consumer kills hit an open transaction"
    );
    assert_eq!(lost, 0);
    check_exactly_once(&read_model(&db).await, transactions);
    assert_eq!(recorded, committed.len() as i64);
    // The last instance re-read what its killed predecessor had applied
    // but not yet committed to Kafka.
    let (_, reread) = summary(&stop_consumer(reader).await);
    eprintln!("the last consumer instance skipped {reread} duplicates");
    assert!(
        broker_duplicates as u64 + reread > 0,
        "no duplicate was delivered (broker or consumer side): nothing was shown"
    );
    let _ = node.start_kill();
    db.drop_db().await;
}

/// Stops a consumer with SIGINT and returns its summary line.
async fn stop_consumer(mut child: tokio::process::Child) -> String {
    send_signal(&child, "INT");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("consumer exits after SIGINT")
        .expect("wait");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err).await;
    }
    assert!(status.success(), "consumer failed: {err}");
    err
}

/// "applied N duplicates M" from a consumer's summary.
fn summary(line: &str) -> (u64, u64) {
    let word = |w: &str| {
        line.split_whitespace()
            .skip_while(|x| *x != w)
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {w} in {line:?}"))
    };
    (word("applied"), word("duplicates"))
}

/// Two instances of one group assigned the same partitions at the same
/// time (what a hand-over looks like while the old owner still works),
/// then a third taking over from the first: every event is claimed by
/// several instances and applied by exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_one_group_overlapping_on_partitions_apply_once() {
    let _turn = heavy_turn().await;
    let group = "overlap";
    let (db, _, topic, stop, writer, mut node) = relaying().await;
    let first = consumer(&db, &topic, group, 5);
    let second = consumer(&db, &topic, group, 5);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let first_summary = stop_consumer(first).await;
    let third = consumer(&db, &topic, group, 5);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let committed = writer.await.unwrap();
    let transactions = (committed.len() / AGGREGATES) as i64;
    let applied = drained_and_applied(&db, committed.len()).await;
    let summaries = [
        first_summary,
        stop_consumer(second).await,
        stop_consumer(third).await,
    ];
    let counts: Vec<(u64, u64)> = summaries.iter().map(|s| summary(s)).collect();
    eprintln!(
        "committed {}, applied {applied}, per instance (applied, duplicates): {counts:?}",
        committed.len()
    );
    check_exactly_once(&read_model(&db).await, transactions);
    let total_applied: u64 = counts.iter().map(|c| c.0).sum();
    assert_eq!(total_applied, committed.len() as u64);
    // The overlap was real: more than one instance applied events, and
    // each skipped what another had applied.
    assert!(counts.iter().filter(|c| c.0 > 0).count() >= 2, "{counts:?}");
    assert!(counts.iter().filter(|c| c.1 > 0).count() >= 2, "{counts:?}");
    let _ = node.start_kill();
    let _ = node.wait().await;
    db.drop_db().await;
}

#[test]
fn summary_lines_parse() {
    assert_eq!(
        summary("read_model: applied 12 duplicates 3 stale 0"),
        (12, 3)
    );
    let _ = Uuid::nil();
}

/// A consumer resuming at a committed offset inside a record batch
/// reads on from that offset. tansu 0.6.0 answers such a fetch with the
/// next batch, which would skip the rest of the batch: the reader sees the
/// gap and rewinds (the inbox drops the re-read messages).
#[tokio::test]
async fn a_reader_resuming_inside_a_record_batch_skips_nothing() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let topic = format!("{}resume", unique_prefix());
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .expect("admin client");
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .expect("create topic");
    // 1,000 messages sent at once: one or a few record batches.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "50")
        .create()
        .expect("producer");
    let sends: Vec<_> = (0..1000)
        .map(|i| {
            let (p, t) = (producer.clone(), topic.clone());
            tokio::spawn(async move {
                let id = Uuid::now_v7().to_string();
                let headers =
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: "id",
                        value: Some(&id),
                    });
                let payload = format!("{i}");
                p.send(
                    FutureRecord::<(), _>::to(&t)
                        .payload(&payload)
                        .partition(0)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map(|d| d.offset)
                .expect("send")
            })
        })
        .collect();
    for s in sends {
        s.await.expect("send task");
    }
    // The group has processed up to 537.
    let group = format!("resume-{}", Uuid::new_v4());
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(537))
        .expect("tpl");
    committer
        .commit(&tpl, CommitMode::Sync)
        .expect("commit 537");
    drop(committer);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut reader =
        outbox_inbox::kafka::Reader::assign(consumer, &topic, &[0], Duration::from_secs(10))
            .expect("assign");
    // tansu answers the fetch at 537 only once a later batch exists; the
    // reader sees the gap with that batch's first message.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..10 {
        let id = Uuid::now_v7().to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "id",
            value: Some(&id),
        });
        let payload = format!("late {i}");
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .payload(&payload)
                    .partition(0)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("send");
    }
    let mut offsets = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(537..1010).all(|o| offsets.contains(&o)) && Instant::now() < deadline {
        let opts = outbox_inbox::kafka::BatchOptions::default();
        if let Ok(Ok(b)) =
            tokio::time::timeout(Duration::from_secs(2), reader.next_batch(opts)).await
        {
            offsets.extend(b.events.iter().map(|e| e.offset));
        }
    }
    let missing = (537..1010).filter(|o| !offsets.contains(o)).count();
    eprintln!(
        "resumed at 537: read {} offsets from {:?}, {missing} of 537..1009 missing, rewinds {}",
        offsets.len(),
        offsets.first(),
        reader.rewinds
    );
    assert_eq!(
        missing, 0,
        "messages after the committed offset were skipped"
    );
}
