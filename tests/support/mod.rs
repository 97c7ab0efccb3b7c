//! Shared by the integration tests: a fresh database per test, unique
//! topics, an in-process engine node, a consumer that assigns partitions
//! (no slow group join) and the `outbox` binary as a child process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_engine::cluster::node::Node;
use outbox_engine::cluster::Member;
use outbox_engine::config::{Config, DatabaseUrl};
use outbox_engine::sink::kafka::KafkaSink;
use outbox_engine::store::leases::PgLeaseStore;
use outbox_engine::store::source::PgSource;
use outbox_engine::store::{self, schema, Names};

/// Kafka partitions of every test topic.
pub const TOPIC_PARTITIONS: i32 = 4;

pub fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// `admin_url` with its database replaced by `db`.
fn url_for(db: &str) -> String {
    let base = admin_url();
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h.to_string(), format!("?{q}")),
        None => (base.clone(), String::new()),
    };
    let root = match head.rfind('/') {
        Some(i) if i > "postgres://".len() => head[..i].to_string(),
        _ => head,
    };
    format!("{root}/{db}{query}")
}

/// A database of its own for one test, migrated with `partitions`.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    pub partitions: u32,
}

impl TestDb {
    pub async fn new(partitions: u32) -> TestDb {
        let name = format!("outbox_t_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("connect to the test server (set OUTBOX_TEST_DATABASE_URL)");
        sqlx::raw_sql(&format!("create database {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let url = url_for(&name);
        let pool = PgPool::connect(&url).await.expect("connect test database");
        let mut conn = pool.acquire().await.expect("conn");
        schema::migrate(
            &mut conn,
            "public",
            schema::MigrateOptions::partitions(partitions),
        )
        .await
        .expect("migrate");
        TestDb {
            name,
            url,
            pool,
            partitions,
        }
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
            let _ = sqlx::raw_sql(&format!(
                "drop database if exists {} with (force)",
                self.name
            ))
            .execute(&mut admin)
            .await;
        }
    }

    pub async fn pending(&self) -> i64 {
        sqlx::query_scalar("select count(*) from outbox")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

/// A topic prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}.", &Uuid::new_v4().simple().to_string()[..10])
}

/// An engine configuration for tests: fast leases, small batches.
pub fn config(db: &TestDb, prefix: &str) -> Config {
    let mut c = Config::default();
    c.database.url = DatabaseUrl::new(db.url.clone());
    c.kafka.brokers = brokers();
    c.kafka.topic_prefix = prefix.to_string();
    c.kafka.topic_partitions = TOPIC_PARTITIONS;
    c.cluster.node_id = "test-node".into();
    c.cluster.lease_ttl_ms = 2_000;
    c.cluster.heartbeat_interval_ms = 250;
    c.relay.poll_interval_ms = 5;
    c.validate().expect("test config is valid");
    c
}

/// An engine node running inside the test process.
pub struct EngineHandle {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl EngineHandle {
    pub async fn start(config: Config) -> EngineHandle {
        let names = Names::new(&config.database.schema).expect("names");
        let pool = store::connect(&config.database, config.database.max_connections)
            .await
            .expect("engine pool");
        let partitions = store::partitions(&pool, &names).await.expect("partitions");
        let sink = Arc::new(KafkaSink::new(&config.kafka).expect("sink"));
        let node = Node {
            member: Member {
                node_id: config.cluster.node_id.clone(),
                incarnation: Uuid::now_v7(),
            },
            source: Arc::new(PgSource::new(pool.clone(), &names, partitions)),
            sink,
            leases: Arc::new(PgLeaseStore::new(pool, &names)),
            relay: config.relay.clone(),
            cluster: config.cluster.clone(),
        };
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            node.run(token).await.expect("node run");
        });
        EngineHandle { shutdown, task }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("engine task");
    }
}

/// A message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub key: String,
    pub payload: serde_json::Value,
    pub headers: HashMap<String, String>,
    pub timestamp_ms: Option<i64>,
}

impl Received {
    /// What a consumer saw in `m`: its headers as strings, its payload as
    /// JSON (`null` if it is not).
    pub fn from_message(m: &impl Message) -> Received {
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                headers.insert(
                    hd.key.to_string(),
                    String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        Received {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            payload: serde_json::from_slice(m.payload().unwrap_or_default())
                .unwrap_or(serde_json::Value::Null),
            headers,
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    pub fn id(&self) -> Uuid {
        self.headers
            .get("id")
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("every message has an id header")
    }
}

/// Reads `topics` from the beginning until `want` messages arrived (then
/// `grace` longer, to see duplicates) or `timeout` passed.
pub async fn consume(
    topics: &[String],
    want: usize,
    timeout: Duration,
    grace: Duration,
) -> Vec<Received> {
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || consume_blocking(&topics, want, timeout, grace))
        .await
        .expect("consumer thread")
}

fn consume_blocking(
    topics: &[String],
    want: usize,
    timeout: Duration,
    grace: Duration,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("test-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..TOPIC_PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)
                .expect("partition offset");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let start = Instant::now();
    let mut out = Vec::new();
    let mut done_at: Option<Instant> = None;
    loop {
        if start.elapsed() > timeout {
            break;
        }
        if let Some(t) = done_at {
            if t.elapsed() > grace {
                break;
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(Received::from_message(&m));
                if out.len() >= want && done_at.is_none() {
                    done_at = Some(Instant::now());
                }
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Checks a delivery against what was committed: returns (lost, duplicates).
pub fn lost_and_duplicates(committed: &[Uuid], received: &[Received]) -> (usize, usize) {
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for r in received {
        *seen.entry(r.id()).or_default() += 1;
    }
    let lost = committed.iter().filter(|id| !seen.contains_key(id)).count();
    let dups = seen.values().map(|n| n - 1).sum();
    (lost, dups)
}

/// Per aggregate, whether first deliveries come in `seq` order. Returns
/// the number of violations.
pub fn order_violations(received: &[Received]) -> usize {
    let mut first_seen = std::collections::HashSet::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let mut violations = 0;
    for r in received {
        if !first_seen.insert(r.id()) {
            continue; // a re-send
        }
        let seq = r.payload["seq"].as_i64().expect("payload has seq");
        if let Some(prev) = last_seq.insert(r.key.clone(), seq) {
            if seq <= prev {
                violations += 1;
            }
        }
    }
    violations
}

/// The `outbox` binary as a child process.
pub fn outbox_command(db: &TestDb) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"));
    cmd.env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", brokers())
        .env("RUST_LOG", "warn")
        .env("OUTBOX_HTTP_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Flags every test node runs with: fast leases, test topics.
pub fn node_command(db: &TestDb, node_id: &str, prefix: &str) -> tokio::process::Command {
    let mut cmd = outbox_command(db);
    cmd.args(["run", "--node-id", node_id, "--topic-prefix", prefix])
        .args(["--topic-partitions", &TOPIC_PARTITIONS.to_string()])
        .args(["--lease-ttl-ms", "2000", "--heartbeat-interval-ms", "250"]);
    cmd
}

/// Live lease counts per owner.
pub async fn owners(db: &TestDb) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select owner, count(*) from outbox_leases
          where owner is not null and expires_at > now() group by owner",
    )
    .fetch_all(&db.pool)
    .await
    .expect("lease owners");
    rows.into_iter().collect()
}

/// Waits until the live leases are spread as `want` (owner -> count).
pub async fn wait_for_owners(
    db: &TestDb,
    want: &[(&str, i64)],
    timeout: Duration,
) -> HashMap<String, i64> {
    let want: HashMap<String, i64> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let start = Instant::now();
    loop {
        let now = owners(db).await;
        if now == want || start.elapsed() > timeout {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `per_tx` events per transaction, one per aggregate `a0..`, each
/// aggregate's `seq` increasing, until `stop` is cancelled. Returns the ids.
pub fn spawn_writer(db: &TestDb, per_tx: usize, stop: CancellationToken) -> JoinHandle<Vec<Uuid>> {
    let pool = db.pool.clone();
    tokio::spawn(async move {
        let outbox = outbox_engine::Enqueuer::new("public").expect("enqueuer");
        let mut ids = Vec::new();
        let mut seq = 0i64;
        while !stop.is_cancelled() {
            let events: Vec<_> = (0..per_tx)
                .map(|a| {
                    outbox_engine::NewEvent::new(
                        "order",
                        format!("a{a}"),
                        "Tick",
                        &serde_json::json!({"seq": seq}),
                    )
                    .expect("event")
                })
                .collect();
            seq += 1;
            let mut tx = pool.begin().await.expect("begin");
            outbox.enqueue(&mut tx, &events).await.expect("enqueue");
            tx.commit().await.expect("commit");
            ids.extend(events.iter().map(|e| e.id));
            // Leave the CPU to the nodes under test.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ids
    })
}

/// Sends a signal with the `kill` command (no `unsafe` in tests).
pub fn send_signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("child has a pid");
    let ok = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{signal} {pid} failed");
}

/// A free TCP port on localhost (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` over plain HTTP/1.1; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `check` every 200 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A tansu broker of the test's own, in memory, on a free port: tests that
/// stop the broker must not stop the one other tests share.
pub struct PrivateBroker {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let port = free_port();
        let mut b = PrivateBroker { port, child: None };
        b.restart();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn binary() -> String {
        if let Ok(path) = std::env::var("TANSU") {
            return path;
        }
        let home = std::env::var("HOME").unwrap_or_default();
        let cargo_bin = format!("{home}/.cargo/bin/tansu");
        if std::path::Path::new(&cargo_bin).exists() {
            cargo_bin
        } else {
            "tansu".into()
        }
    }

    /// Starts it (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(spawn_tansu(self.port, self.port));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts an in-memory tansu broker listening on `listen_port` and
/// advertising `advertised_port` to clients, and waits until it accepts
/// connections (panics after 20 s, the broker killed).
pub fn spawn_tansu(listen_port: u16, advertised_port: u16) -> std::process::Child {
    let listen = format!("tcp://127.0.0.1:{listen_port}");
    let advertised = format!("tcp://127.0.0.1:{advertised_port}");
    let mut child = std::process::Command::new(PrivateBroker::binary())
        .args(["broker", "--listener-url", &listen])
        .args(["--advertised-listener-url", &advertised])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu (deploy/services.sh installs it)");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", listen_port)).is_err() {
        if start.elapsed() >= Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tansu did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

pub mod proxy;
