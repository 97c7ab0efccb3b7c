//! The operations endpoint of a running node: metrics with their labels,
//! liveness, and readiness that follows the broker. (A `traceparent` row
//! header reaching Kafka is checked in `relay_guarantees`.) Every metric
//! name the dashboard, the alert rules and their tests use must be in a
//! real scrape after a run: a metric declared but never recorded fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use outbox_engine::ops::metrics::ALL;
use outbox_harness::ops::{metric_total, scrape_until};
use outbox_harness::*;

/// More events than one ring segment holds (2^TEST_RING_SHIFT positions),
/// so that the run truncates a segment.
const RUN_EVENTS: i64 = 4_200;

/// A configuration file: a small producer message limit, one attempt, so
/// that one oversized event is a broker error and a dead letter at once.
fn poison_config() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-obs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("config folder");
    let path = dir.join("outbox.toml");
    std::fs::write(
        &path,
        "[relay]\nmax_attempts = 1\nretry_backoff_min_ms = 50\nretry_backoff_max_ms = 200\n\
         [kafka.properties]\n\"message.max.bytes\" = \"20000\"\n",
    )
    .expect("config file");
    path
}

/// What of `used` (file, name) the node on `port` does not export
/// ([`unscraped_names`]), once its scrape backs every name or after 30 s;
/// and that scrape.
async fn unexported(port: u16, used: &[(String, String)]) -> (Vec<String>, String) {
    let declared = declared();
    let problems = |body: &str| unscraped_names(used, &Scrape::parse(body), &declared);
    let scraped = scrape_until(port, Duration::from_secs(30), |b| problems(b).is_empty()).await;
    (problems(&scraped), scraped)
}

/// A run that records every metric the dashboard and the rules read:
/// events published and one parked (a broker error, a dead letter), a
/// segment truncated, a lease handed off to a second node and one taken
/// away, librdkafka statistics. Its scrape holds each of those names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exist_with_their_labels_after_a_run() {
    let _turn = heavy_turn().await;
    let db = TestDb::new(2).await;
    let prefix = unique_prefix();
    let port = free_port();
    let config = poison_config();
    // Leases a stall cannot cost: the counts below are exact.
    let mut node = steady_node_command(&db, "m1", &prefix)
        .env("OUTBOX_CONFIG", &config)
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    db.insert_series(RUN_EVENTS, "g::text", "'{}'").await;
    sqlx::query(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
         values ('order', 'big', 'E', jsonb_build_object('pad', repeat('x', 30000)))",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let got = consume(
        &[format!("{prefix}order")],
        RUN_EVENTS as usize,
        Duration::from_secs(30),
        Duration::ZERO,
    )
    .await;
    assert_eq!(got.len(), RUN_EVENTS as usize);

    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    let needles = [
        "outbox_events_published_total{partition=\"0\"}",
        "outbox_events_published_total{partition=\"1\"}",
        "outbox_pending_events{partition=\"0\"}",
        "outbox_oldest_event_age_seconds{partition=\"1\"}",
        "outbox_batch_size_bucket{le=",
        "outbox_fetch_duration_seconds_bucket{le=",
        "outbox_send_duration_seconds_bucket{le=",
        "outbox_ack_duration_seconds_count",
        "outbox_leases_held 2",
        "outbox_leases_acquired_total 2",
        "outbox_kafka_retries_total",
        "outbox_kafka_queue_messages",
        "outbox_ready 1",
    ];
    // Backlog gauges and librdkafka statistics arrive every 5 s; a batch
    // is counted once acknowledged, after its messages are readable.
    let body = scrape_until(port, Duration::from_secs(20), |b| {
        needles.iter().all(|n| b.contains(n))
            && metric_total(b, "outbox_events_published_total") == RUN_EVENTS as f64
    })
    .await;
    for needle in needles {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    assert_eq!(
        metric_total(&body, "outbox_events_published_total"),
        RUN_EVENTS as f64
    );
    let foreign: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty() && !l.starts_with("outbox_"))
        .collect();
    assert!(
        foreign.is_empty(),
        "metrics without the outbox_ prefix: {foreign:?}"
    );

    // A second node: m1 hands one partition off (a lease released).
    let mut other = node_command(&db, "m2", &prefix)
        .args(["--http-addr", "off"])
        .spawn()
        .unwrap();
    let split = wait_for_owners(&db, &[("m1", 1), ("m2", 1)], Duration::from_secs(20)).await;
    assert_eq!(
        split.get("m1"),
        Some(&1),
        "m1 kept both partitions: {split:?}"
    );
    // m1's remaining lease taken behind its back (a lease lost); again
    // should the assignment still be moving.
    let lost = eventually(Duration::from_secs(20), || async {
        sqlx::query(
            "update outbox_leases set incarnation = gen_random_uuid(), epoch = epoch + 1,
                    expires_at = now() + interval '1 second'
              where owner = 'm1' and expires_at > now()",
        )
        .execute(&db.pool)
        .await
        .expect("take m1's lease");
        tokio::time::sleep(Duration::from_millis(500)).await;
        http_get(port, "/metrics").await.is_some_and(|(_, b)| {
            b.lines()
                .any(|l| l.starts_with("outbox_leases_lost_total "))
        })
    })
    .await;
    assert!(lost, "m1 never lost a lease");

    // The CDC source's metrics come from a CDC run (below).
    let used: Vec<_> = used_metric_names()
        .into_iter()
        .filter(|(_, n)| !n.starts_with(CDC_PREFIX))
        .collect();
    let (problems, scraped) = unexported(port, &used).await;
    assert!(
        problems.is_empty(),
        "names the dashboard, the rules or their tests use that the run does not export \
         (a metric the engine declares must be recorded by this run):\n  {}\nscrape:\n{scraped}",
        problems.join("\n  ")
    );

    send_signal(&other, "TERM");
    send_signal(&node, "TERM");
    assert!(other.wait().await.unwrap().success());
    assert!(node.wait().await.unwrap().success());
    let _ = std::fs::remove_dir_all(config.parent().expect("config folder"));
    db.drop_db().await;
}

/// Metrics only a node reading the replication slot records.
const CDC_PREFIX: &str = "outbox_cdc_";

/// A node on the CDC source (the logical-decoding server) records every
/// `outbox_cdc_*` metric the dashboard and the rules read: events streamed,
/// the slot's state and lag, and one recovery of a dropped slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_metrics_exist_after_a_cdc_run() {
    let _turn = heavy_turn().await;
    let db = TestDb::new_cdc(2).await;
    let prefix = unique_prefix();
    let port = free_port();
    let slot = format!("{}_slot", db.name);
    let mut node = node_command(&db, "c1", &prefix)
        .args([
            "--source",
            "cdc",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("OUTBOX_CDC__SLOT", &slot)
        .env("OUTBOX_CDC__PUBLICATION", format!("{}_pub", db.name))
        .env("OUTBOX_CDC__HEARTBEAT_MS", "200")
        .env("OUTBOX_CDC__STATUS_INTERVAL_MS", "50")
        .spawn()
        .unwrap();
    // Events through the stream once every partition streams.
    let streams = || async {
        sqlx::query_scalar::<_, Option<bool>>(
            "select bool_and(mode = 'cdc' and cdc_streaming) from outbox_leases",
        )
        .fetch_one(&db.pool)
        .await
        .ok()
        .flatten()
            == Some(true)
    };
    assert!(
        eventually(Duration::from_secs(30), streams).await,
        "the partitions never streamed"
    );
    db.insert_series(100, "g::text", "'{}'").await;
    let got = consume(
        &[format!("{prefix}order")],
        100,
        Duration::from_secs(30),
        Duration::ZERO,
    )
    .await;
    assert_eq!(got.len(), 100);
    // The walsender comes back quickly: end it and drop the slot until the
    // drop wins the race (a slot recovery).
    let dropped = eventually(Duration::from_secs(20), || async {
        let _ = sqlx::query(
            "select pg_terminate_backend(active_pid) from pg_replication_slots
              where slot_name = $1 and active_pid is not null",
        )
        .bind(&slot)
        .execute(&db.pool)
        .await;
        sqlx::query("select pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&db.pool)
            .await
            .is_ok()
    })
    .await;
    assert!(dropped, "could not drop the slot");

    let used: Vec<_> = used_metric_names()
        .into_iter()
        .filter(|(_, n)| n.starts_with(CDC_PREFIX))
        .collect();
    let (problems, scraped) = unexported(port, &used).await;
    assert!(
        problems.is_empty(),
        "CDC metric names the dashboard, the rules or their tests use that a CDC run does \
         not export:\n  {}\nscrape:\n{scraped}",
        problems.join("\n  ")
    );
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    let db = TestDb::new(2).await;
    let mut broker = PrivateBroker::start().expect("a private broker");
    let port = free_port();
    let mut node = node_command(&db, "r1", &unique_prefix())
        .env("KAFKA_BROKERS", broker.addr())
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    let ready = || async move { http_get(port, "/readyz").await.map(|r| r.0) == Some(200) };
    let unready = || async move { http_get(port, "/readyz").await.map(|r| r.0) == Some(503) };
    assert!(
        eventually(Duration::from_secs(20), ready).await,
        "never ready"
    );

    broker.stop();
    assert!(
        eventually(Duration::from_secs(30), unready).await,
        "still ready without a broker"
    );
    let (_, body) = http_get(port, "/readyz").await.unwrap();
    assert!(
        body.contains("broker: unreachable") && body.contains("database: ok"),
        "{body}"
    );
    assert_eq!(
        http_get(port, "/healthz").await.map(|r| r.0),
        Some(200),
        "alive all along"
    );

    broker.restart().expect("the broker back");
    assert!(
        eventually(Duration::from_secs(30), ready).await,
        "not ready after the broker came back"
    );
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    db.drop_db().await;
}

/// The files whose `outbox_*` names are checked (`OUTBOX_OBSERVABILITY_DIR`
/// points at a modified copy of deploy/observability).
const OBSERVABILITY_FILES: &[&str] = &[
    "grafana-dashboard.json",
    "prometheus-alerts.yaml",
    "alerts-test.yaml",
];

fn declared() -> BTreeSet<&'static str> {
    ALL.iter().map(|(_, n)| *n).collect()
}

/// Every `outbox_*` name of the observability files: (file, name).
fn used_metric_names() -> Vec<(String, String)> {
    let dir = std::env::var_os("OUTBOX_OBSERVABILITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("deploy/observability"));
    let mut out = Vec::new();
    for file in OBSERVABILITY_FILES {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("observability file {}: {e}", path.display()));
        out.extend(
            metric_names_in(&text)
                .into_iter()
                .map(|n| (file.to_string(), n)),
        );
    }
    out
}

/// Every `outbox_*` name in the dashboard, the alert rules and their tests
/// is one the engine declares, every declared metric is described, and
/// every one is recorded somewhere in the engine (not only declared), by
/// its constant. (That each is also in a real scrape, with the series its
/// type has, is checked after a run above.)
#[test]
fn dashboards_and_rules_use_only_metrics_the_engine_records() {
    let declared = declared();
    let mut unknown = Vec::new();
    for (file, name) in used_metric_names() {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| declared.contains(b)))
            .unwrap_or(&name);
        if !declared.contains(base) {
            unknown.push(format!("{file}: {name}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics not declared by the engine: {unknown:?}"
    );

    // The engine's own recorder renders a HELP line for each described name.
    let handle = outbox_engine::ops::metrics::install().expect("install the recorder");
    for (_, name) in ALL {
        metrics::counter!(*name).absolute(0);
    }
    let help = Scrape::parse(&handle.render()).help;
    let undescribed: Vec<&str> = ALL
        .iter()
        .map(|(_, n)| *n)
        .filter(|n| !help.contains(*n))
        .collect();
    assert!(
        undescribed.is_empty(),
        "declared but not described in ops/metrics.rs: {undescribed:?}"
    );

    let mut sources = String::new();
    collect_sources(&workspace_root().join("engine/src"), &mut sources);
    let unrecorded: Vec<&str> = ALL
        .iter()
        .filter(|(ident, _)| !records(&sources, ident))
        .map(|(_, name)| *name)
        .collect();
    assert!(
        unrecorded.is_empty(),
        "declared but never recorded by the engine: {unrecorded:?}"
    );
    let used: BTreeSet<String> = used_metric_names().into_iter().map(|(_, n)| n).collect();
    let not_shown: Vec<&str> = declared
        .iter()
        .copied()
        .filter(|d| !used.iter().any(|u| u.starts_with(d)))
        .collect();
    println!(
        "ok    metric names in dashboard, rules and tests: declared and described by the engine \
         ({} of {} metrics used; not shown: {})",
        ALL.len() - not_shown.len(),
        ALL.len(),
        not_shown.join(", ")
    );
}

/// What a Prometheus text exposition holds: each family's type, the
/// families with a HELP line, the series names.
#[derive(Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    help: BTreeSet<String>,
    series: BTreeSet<String>,
}

impl Scrape {
    fn parse(body: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in body.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("#"), Some("TYPE"), Some(name)) => {
                    let kind = words.next().unwrap_or_default();
                    s.types.insert(name.to_string(), kind.to_string());
                }
                (Some("#"), Some("HELP"), Some(name)) => {
                    s.help.insert(name.to_string());
                }
                (Some(first), _, _) if !first.starts_with('#') => {
                    let name = first.split('{').next().unwrap_or(first);
                    s.series.insert(name.to_string());
                }
                _ => {}
            }
        }
        s
    }
}

/// Each used name that the scrape does not back: absent (declared but not
/// recorded, or unknown), a histogram used bare, a suffix on a metric that
/// is not a histogram, a family without HELP.
fn unscraped_names(
    used: &[(String, String)],
    scrape: &Scrape,
    declared: &BTreeSet<&str>,
) -> Vec<String> {
    let mut problems = BTreeSet::new();
    for (place, name) in used {
        let suffixed = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| Some((name.strip_suffix(s)?, *s)))
            .filter(|(base, _)| scrape.types.contains_key(*base));
        let problem = match (scrape.types.get(name.as_str()), suffixed) {
            (Some(kind), _) if kind == "histogram" => Some(format!(
                "{name} is a histogram: it has only {name}_bucket/_sum/_count series"
            )),
            (Some(_), _) if scrape.series.contains(name.as_str()) => None,
            (None, Some((base, _))) if scrape.types[base] == "histogram" => {
                (!scrape.series.contains(name.as_str()))
                    .then(|| format!("{name}: no such series in the scrape"))
            }
            (None, Some((base, suffix))) => Some(format!(
                "{name}: {base} is a {}, it has no {suffix} series",
                scrape.types[base]
            )),
            _ if declared.contains(name.as_str()) => Some(format!(
                "{name} is declared by the engine but not in /metrics after the run: never recorded"
            )),
            _ => Some(format!(
                "unknown metric {name}: the engine does not declare it"
            )),
        };
        if let Some(p) = problem {
            problems.insert(format!("{place}: {p}"));
        }
        let base = suffixed.map_or(name.as_str(), |(b, _)| b);
        if scrape.types.contains_key(base) && !scrape.help.contains(base) {
            problems.insert(format!("{place}: {base} has no HELP line (not described)"));
        }
    }
    problems.into_iter().collect()
}

/// The scrape check rejects what it must: an unknown name, a declared name
/// nothing recorded, `_count` of a gauge, a bare histogram.
#[test]
fn the_scrape_check_rejects_names_a_run_does_not_export() {
    let scrape = Scrape::parse(
        "# HELP outbox_pending_events p\n# TYPE outbox_pending_events gauge\n\
         outbox_pending_events{partition=\"0\"} 1\n\
         # HELP outbox_send_duration_seconds s\n# TYPE outbox_send_duration_seconds histogram\n\
         outbox_send_duration_seconds_bucket{le=\"0.5\"} 1\noutbox_send_duration_seconds_sum 0.1\n\
         outbox_send_duration_seconds_count 1\n",
    );
    let declared: BTreeSet<&str> = [
        "outbox_pending_events",
        "outbox_send_duration_seconds",
        "outbox_declared_only",
    ]
    .into();
    let used = |names: &[&str]| -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| ("control".to_string(), n.to_string()))
            .collect()
    };
    let fine = used(&[
        "outbox_pending_events",
        "outbox_send_duration_seconds_bucket",
        "outbox_send_duration_seconds_count",
    ]);
    assert_eq!(
        unscraped_names(&fine, &scrape, &declared),
        Vec::<String>::new()
    );
    for bogus in [
        "outbox_bogus_total",
        "outbox_declared_only",
        "outbox_pending_events_count",
        "outbox_send_duration_seconds",
    ] {
        let problems = unscraped_names(&used(&[bogus]), &scrape, &declared);
        assert_eq!(problems.len(), 1, "{bogus}: {problems:?}");
    }
}

/// `outbox_[a-z0-9_]+` words of `text`, in order.
fn metric_names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("outbox_") {
        let word: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let before = rest[..i].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(word.clone());
        }
        rest = &rest[i + word.len().max(1)..];
    }
    out
}

/// The engine's sources except the file that declares the metrics.
fn collect_sources(dir: &std::path::Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).expect("engine sources") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("ops/metrics.rs") {
            out.push_str(&std::fs::read_to_string(&path).expect("source file"));
        }
    }
}

/// Whether `sources` use the constant `ident` (as `m::IDENT`,
/// `metrics::IDENT` or a bare import), not merely mention a longer name.
fn records(sources: &str, ident: &str) -> bool {
    sources.match_indices(ident).any(|(i, _)| {
        let after = sources[i + ident.len()..].chars().next();
        let before = sources[..i].chars().next_back();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}
