//! The `outbox` binary at its doors: bad input gets a clear one-line error
//! and a non-zero exit (never a panic), `migrate` is idempotent and refuses
//! another partition count, `status --json` has its documented shape, and
//! SIGTERM drains and exits 0.

use std::time::Duration;

use outbox_harness::ordering::tally;
use outbox_harness::status::Status;
use outbox_harness::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn outbox(db: Option<&TestDb>, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut cmd = outbox_binary();
    cmd.args(args);
    if let Some(db) = db {
        cmd.env("DATABASE_URL", &db.url)
            .env("KAFKA_BROKERS", brokers());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("outbox finished in time")
        .expect("outbox ran");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A failure with a clear message: non-zero, one `error:` line naming
/// `needle`, and no panic.
fn assert_clear_error(o: &Outcome, needle: &str) {
    assert!(
        o.code.is_some_and(|c| c != 0),
        "exit {:?}; stderr: {}",
        o.code,
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    let errors: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert_eq!(errors.len(), 1, "want one error line: {}", o.stderr);
    assert!(
        errors[0].contains(needle),
        "{:?} does not mention {needle:?}",
        errors[0]
    );
}

#[tokio::test]
async fn unknown_flag_is_a_usage_error() {
    let o = outbox(None, &["run", "--no-such-flag"], &[]).await;
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("--no-such-flag"), "{}", o.stderr);
}

#[tokio::test]
async fn bad_database_url_is_named() {
    let o = outbox(None, &["status"], &[("DATABASE_URL", "mysql://nope")]).await;
    assert_clear_error(&o, "database.url");
    let o = outbox(None, &["status"], &[]).await;
    assert_clear_error(&o, "DATABASE_URL");
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error() {
    let url = "postgres://app:sekrit@127.0.0.1:1/nowhere";
    let o = outbox(None, &["status"], &[("DATABASE_URL", url)]).await;
    assert_clear_error(
        &o,
        "cannot connect to the database at postgres://app:****@127.0.0.1:1/nowhere",
    );
    assert!(
        !o.stderr.contains("sekrit"),
        "password leaked: {}",
        o.stderr
    );
}

#[tokio::test]
async fn unreachable_broker_is_a_clear_error() {
    let db = TestDb::new(2).await;
    let o = outbox(
        Some(&db),
        &["run", "--node-id", "n1", "--kafka-brokers", "127.0.0.1:1"],
        &[],
    )
    .await;
    assert_clear_error(&o, "cannot reach Kafka brokers at 127.0.0.1:1");
    db.drop_db().await;
}

#[tokio::test]
async fn bad_config_file_names_the_key() {
    let dir = std::env::temp_dir().join(format!("outbox-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[relay]\nbatch_sise = 10\n").unwrap();
    let o = outbox(
        None,
        &["run", "--config", file.to_str().unwrap()],
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ],
    )
    .await;
    assert_clear_error(&o, "batch_sise");
    assert_clear_error(
        &o,
        &format!("(from config file {}, line 2)", file.display()),
    );
    let o = outbox(
        None,
        &["run", "--batch-size", "0"],
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ],
    )
    .await;
    assert_clear_error(&o, "relay.batch_size");
    assert_clear_error(&o, "relay.batch_size = 0 (from flag --batch-size)");
}

/// The environment a node could run with: every key set one way or another.
const CHECK_ENV: &[(&str, &str)] = &[
    ("DATABASE_URL", "postgres://app:sekrit@127.0.0.1/x"),
    ("KAFKA_BROKERS", "127.0.0.1:9092"),
    ("OUTBOX_RELAY__BATCH_SIZE", "77"),
    ("OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD", "sekrit2"),
    (
        "OUTBOX_CDC__DATABASE_URL",
        "postgres://repl:sekrit3@127.0.0.1/x",
    ),
    ("OUTBOX_SOURCE", "cdc"),
];

#[tokio::test]
async fn check_config_shows_values_from_env_and_where_they_came_from() {
    let o = outbox(None, &["check-config", "--node-id", "n1"], CHECK_ENV).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    for want in [
        "batch_size: 77,",
        "kind: Cdc,",
        "relay.batch_size = \"77\" (from environment variable OUTBOX_RELAY__BATCH_SIZE)",
        "source.kind = \"cdc\" (from environment variable OUTBOX_SOURCE)",
        "cluster.node_id = \"n1\" (from flag --node-id)",
        "database.url = \"postgres://app:****@127.0.0.1/x\" (from environment variable DATABASE_URL)",
        "kafka.properties.\"sasl.password\" = \"****\"",
        "repl:****@127.0.0.1",
    ] {
        assert!(o.stdout.contains(want), "no {want:?} in {}", o.stdout);
    }
    for secret in ["sekrit", "sekrit2", "sekrit3"] {
        assert!(!o.stdout.contains(secret), "{secret} leaked: {}", o.stdout);
    }

    // A flag beats the environment.
    let args = ["check-config", "--node-id", "n1", "--batch-size", "5"];
    let o = outbox(None, &args, CHECK_ENV).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("batch_size: 5,"), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("relay.batch_size = 5 (from flag --batch-size)"),
        "{}",
        o.stdout
    );
}

#[tokio::test]
async fn bad_env_value_names_the_variable() {
    let mut env = CHECK_ENV.to_vec();
    env.push(("OUTBOX_RELAY__BATCH_SIZE", "abc"));
    let o = outbox(None, &["check-config", "--node-id", "n1"], &env).await;
    assert_clear_error(
        &o,
        "relay.batch_size = \"abc\" (from environment variable OUTBOX_RELAY__BATCH_SIZE): invalid type",
    );
    let mut env = CHECK_ENV.to_vec();
    env.push(("OUTBOX_DELIVERY_TIMEOUT_MS", "5"));
    let o = outbox(None, &["run", "--node-id", "n1"], &env).await;
    assert_clear_error(
        &o,
        "kafka.delivery_timeout_ms = \"5\" (from environment variable OUTBOX_DELIVERY_TIMEOUT_MS)",
    );
    assert!(!o.stderr.contains("sekrit"), "{}", o.stderr);
}

#[tokio::test]
async fn migrate_is_idempotent_and_refuses_another_partition_count() {
    let db = TestDb::new(4).await;
    let o = outbox(Some(&db), &["migrate", "--partitions", "4"], &[]).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("nothing to do"), "{}", o.stdout);

    let o = outbox(Some(&db), &["migrate", "--partitions", "8"], &[]).await;
    assert_clear_error(&o, "already has 4 partitions");
    let shard: String = sqlx::query_scalar(
        "select pg_get_expr(d.adbin, d.adrelid) from pg_attrdef d
           join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
          where d.adrelid = 'outbox'::regclass and a.attname = 'shard'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        shard.contains("% (4)"),
        "a refused migrate changed the shard count: {shard}"
    );
    let segments: i64 =
        sqlx::query_scalar("select count(*) from pg_inherits where inhparent = 'outbox'::regclass")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(segments, 8, "a refused migrate changed the ring");
    db.drop_db().await;
}

/// The layout of schema version 4 (hash partitions, rows deleted once
/// published), as `outbox migrate` of that version created it.
const VERSION_4: &str = "
create table outbox_meta (key text primary key, value text not null);
insert into outbox_meta values ('partitions', '2'), ('schema_version', '4'), ('max_payload_bytes', '1048576');
create sequence outbox_position_seq as bigint;
create table outbox (
    position bigint not null default nextval('outbox_position_seq'),
    id uuid not null default gen_random_uuid(),
    aggregate_type text not null constraint outbox_aggregate_type_not_empty check (aggregate_type <> ''),
    aggregate_id text not null constraint outbox_aggregate_id_not_empty check (aggregate_id <> ''),
    event_type text not null,
    payload jsonb not null constraint outbox_payload_size check (pg_column_size(payload) <= 1048576),
    headers jsonb,
    topic text,
    created_at timestamptz not null default now()
) partition by hash (aggregate_id);
create table outbox_p0 partition of outbox for values with (modulus 2, remainder 0);
create table outbox_p1 partition of outbox for values with (modulus 2, remainder 1);
create index outbox_position_idx on outbox (position);
create table outbox_leases (partition int primary key, owner text, incarnation uuid,
    epoch bigint not null default 0, expires_at timestamptz, acquired_at timestamptz,
    published bigint not null default 0, delivery_ms bigint not null default 30000,
    quiet_until timestamptz);
insert into outbox_leases (partition) values (0), (1);
create table outbox_nodes (node_id text primary key, incarnation uuid not null,
    started_at timestamptz not null default now(), heartbeat_at timestamptz not null default now(),
    expires_at timestamptz not null);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_version_4_outbox_with_events_pending() {
    let _turn = heavy_turn().await;
    let db = TestDb::bare().await;
    sqlx::raw_sql(VERSION_4).execute(&db.pool).await.unwrap();
    // Events pending in the old layout, 20 aggregates, seq in position order.
    sqlx::query(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
         select 'order', 'a' || (g % 20), 'E', jsonb_build_object('seq', g)
           from generate_series(1, 3000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ids: Vec<Uuid> = sqlx::query_scalar("select id from outbox order by position")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    // A node of the old version still runs: refused, nothing changed.
    sqlx::query("insert into outbox_nodes (node_id, incarnation, expires_at) values ('old', gen_random_uuid(), now() + interval '1 minute')")
        .execute(&db.pool)
        .await
        .unwrap();
    let o = outbox(Some(&db), &["migrate", "--partitions", "2"], &[]).await;
    assert_clear_error(&o, "stop every node before upgrading");
    let still: bool = sqlx::query_scalar("select to_regclass('outbox_p0') is not null")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(still, "a refused upgrade changed the layout");
    sqlx::query("delete from outbox_nodes")
        .execute(&db.pool)
        .await
        .unwrap();
    let o = outbox(Some(&db), &["migrate", "--partitions", "2"], &[]).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let legacy: bool = sqlx::query_scalar("select to_regclass('outbox_p0') is not null")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!legacy, "the old partitions are still there");
    assert_eq!(
        db.pending().await,
        3000,
        "pending events were lost by the upgrade"
    );

    let prefix = unique_prefix();
    let mut node = steady_node_command(&db, "upgraded", &prefix)
        .spawn()
        .unwrap();
    let topics = [format!("{prefix}order")];
    let wait = Duration::from_secs(60);
    let t = tally(&brokers(), &topics, &ids, wait, Duration::from_secs(1)).await;
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    assert_eq!((t.lost, t.duplicates), (0, 0), "{t}");
    assert_eq!(
        t.order.first_delivery_violations, 0,
        "the upgrade reordered events; {t}"
    );
    assert_eq!(db.pending().await, 0);
    db.drop_db().await;
}

#[tokio::test]
async fn status_json_has_partitions_and_nodes() {
    let db = TestDb::new(3).await;
    db.insert_series(30, "g::text", "'{}'").await;
    let o = outbox(Some(&db), &["status", "--json"], &[]).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    // The engine's own type: every field it has is there with its type
    // (`nodes` an array, `epoch` a number, ...).
    let status: Status = serde_json::from_str(&o.stdout).expect("status --json is a Status");
    let parts = &status.partitions;
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0].partition, 0);
    // A missing `owner` would read as `None`: the key itself is checked.
    let raw: serde_json::Value = serde_json::from_str(&o.stdout).expect("status --json is JSON");
    assert!(raw["partitions"][0].get("owner").is_some());
    assert_eq!(status.total_pending(), 30);
    assert!(parts.iter().any(|p| p.oldest_age_ms.is_some()));
    assert!(
        parts
            .iter()
            .all(|p| p.published == 0 && p.rate_per_sec == Some(0.0)),
        "{parts:?}"
    );

    let o = outbox(Some(&db), &["status"], &[]).await;
    assert!(o.stdout.contains("total pending: 30"), "{}", o.stdout);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_zero() {
    let _turn = heavy_turn().await;
    let db = TestDb::new(4).await;
    let prefix = unique_prefix();
    let graceful = || {
        run_at(&db.url, &brokers(), "graceful", &prefix)
            .spawn()
            .unwrap()
    };
    let mut node = graceful();
    // Writers keep committing for 5 s: before, during and after the SIGTERM.
    let stop = CancellationToken::new();
    let writer = spawn_load(db.pool.clone(), Load::new(20), stop.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // SIGTERM while events are still flowing.
    send_signal(&node, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), node.wait())
        .await
        .expect("exits within the shutdown timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Its leases were released, not left to expire.
    let held: i64 =
        sqlx::query_scalar("select count(*) from outbox_leases where owner is not null")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(held, 0, "leases still held after a graceful stop");
    let committed = writer.await.unwrap().committed;

    // What it did not publish is still in the outbox; a restart publishes it.
    let mut node = graceful();
    let topics = [format!("{prefix}order")];
    let wait = Duration::from_secs(60);
    let t = tally(
        &brokers(),
        &topics,
        &committed,
        wait,
        Duration::from_secs(1),
    )
    .await;
    node.start_kill().unwrap();
    let _ = node.wait().await;
    assert_eq!(t.lost, 0, "{t}");
    db.drop_db().await;
}

#[tokio::test]
async fn cdc_source_on_a_server_without_logical_decoding_is_refused_naming_wal_level() {
    let db = TestDb::new(2).await;
    let level: String = sqlx::query_scalar("show wal_level")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    if level == "logical" {
        // The test servers deploy/test.sh uses keep wal_level = replica.
        eprintln!("SKIPPED: the test database has wal_level = logical; nothing to refuse");
        db.drop_db().await;
        return;
    }
    let o = outbox(
        Some(&db),
        &["run", "--node-id", "n1", "--source", "cdc"],
        &[],
    )
    .await;
    assert_clear_error(&o, "wal_level");
    let line = o.stderr.lines().find(|l| l.starts_with("error")).unwrap();
    assert!(
        line.contains("logical") && line.contains(&format!("wal_level = {level}")),
        "{line:?} names what is needed and what the server has"
    );
    // Refused before it changed anything: no partition got a mode, no
    // publication was made.
    let moded: i64 =
        sqlx::query_scalar("select count(*) from outbox_leases where mode is not null")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let publications: i64 = sqlx::query_scalar("select count(*) from pg_publication")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (moded, publications),
        (0, 0),
        "the refused run changed the database"
    );
    db.drop_db().await;
}
