//! Several `outbox run` processes against one database: even spread,
//! takeover after `kill -9`, scaling 1 -> 3 -> 1 under load, and fencing of
//! a node that was paused past its lease.

use std::time::Duration;

use outbox_harness::ordering::tally;
use outbox_harness::status::status_at;
use outbox_harness::*;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 12;
const BATCH: usize = 1000;
const INFLIGHT: usize = 2;

/// A node with the test's 2 s leases and the batch window the duplicate
/// bounds assume ([`BATCH`], [`INFLIGHT`]).
fn node(db: &TestDb, id: &str, prefix: &str) -> tokio::process::Child {
    node_command(db, id, prefix)
        .args(["--batch-size", &BATCH.to_string()])
        .args(["--max-inflight-batches", &INFLIGHT.to_string()])
        .spawn()
        .unwrap()
}

/// Consumes everything written and checks: nothing lost, first deliveries
/// in order per aggregate, duplicates within `dup_bound`.
async fn verify(prefix: &str, committed: &[uuid::Uuid], dup_bound: usize) {
    let topics = [format!("{prefix}order")];
    let wait = Duration::from_secs(90);
    let t = tally(&brokers(), &topics, committed, wait, Duration::from_secs(2)).await;
    eprintln!("{t}");
    t.assert_delivered("committed under load", dup_bound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_spread_partitions_evenly() {
    let _turn = heavy_turn().await;
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(steady_node_command(&db, id, &prefix).spawn().unwrap());
    }
    let spread = wait_for_owners(
        &db,
        &[("n1", 4), ("n2", 4), ("n3", 4)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        spread,
        [("n1", 4), ("n2", 4), ("n3", 4)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        "not evenly spread"
    );

    // `status --json` agrees.
    let status = status_at(&db.url).await.expect("status --json");
    assert_eq!(status.nodes.len(), 3);
    assert!(
        status.nodes.iter().all(|n| n.partitions == 4),
        "{:?}",
        status.nodes
    );
    assert!(
        status
            .partitions
            .iter()
            .all(|p| p.owner.is_some() && p.epoch >= 1),
        "{:?}",
        status.partitions
    );

    for n in &nodes {
        send_signal(n, "TERM");
    }
    for mut n in nodes {
        assert!(n.wait().await.unwrap().success());
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_partitions_move_to_survivors_under_load() {
    let _turn = heavy_turn().await;
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    let mut n1 = node(&db, "n1", &prefix);
    let mut n2 = node(&db, "n2", &prefix);
    let mut n3 = node(&db, "n3", &prefix);
    wait_for_owners(
        &db,
        &[("n1", 4), ("n2", 4), ("n3", 4)],
        Duration::from_secs(20),
    )
    .await;

    let stop = CancellationToken::new();
    let writer = spawn_writer(&db, 20, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    n2.start_kill().unwrap(); // SIGKILL
    n2.wait().await.unwrap();
    // The lease TTL is 2 s: the survivors take n2's partitions soon after.
    let spread = wait_for_owners(&db, &[("n1", 6), ("n3", 6)], Duration::from_secs(15)).await;
    assert_eq!(
        spread.get("n2"),
        None,
        "dead node still owns partitions: {spread:?}"
    );
    assert_eq!(
        spread.values().sum::<i64>(),
        PARTITIONS as i64,
        "{spread:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let committed = writer.await.unwrap();

    // Only n2's in-flight batches may be sent twice.
    verify(&prefix, &committed, 4 * INFLIGHT * BATCH).await;
    for n in [&mut n1, &mut n3] {
        send_signal(n, "TERM");
        assert!(n.wait().await.unwrap().success());
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_scales_1_to_3_to_1_under_load() {
    let _turn = heavy_turn().await;
    let db = TestDb::new(PARTITIONS).await;
    let prefix = unique_prefix();
    // Leases that a loaded machine cannot lose by a stall: the handoffs
    // here are graceful, and none may send anything twice.
    let mut n1 = steady_node_command(&db, "n1", &prefix).spawn().unwrap();
    wait_for_owners(&db, &[("n1", 12)], Duration::from_secs(20)).await;

    let stop = CancellationToken::new();
    let writer = spawn_writer(&db, 20, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut n2 = steady_node_command(&db, "n2", &prefix).spawn().unwrap();
    let mut n3 = steady_node_command(&db, "n3", &prefix).spawn().unwrap();
    let up = wait_for_owners(
        &db,
        &[("n1", 4), ("n2", 4), ("n3", 4)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        up.values().copied().collect::<Vec<_>>(),
        vec![4, 4, 4],
        "{up:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Graceful scale-in: the leaving nodes drain and release.
    send_signal(&n2, "TERM");
    send_signal(&n3, "TERM");
    assert!(n2.wait().await.unwrap().success());
    assert!(n3.wait().await.unwrap().success());
    let down = wait_for_owners(&db, &[("n1", 12)], Duration::from_secs(15)).await;
    assert_eq!(down.get("n1"), Some(&12), "{down:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let committed = writer.await.unwrap();

    // Graceful handoffs re-send nothing: every batch is settled before its
    // lease is released.
    verify(&prefix, &committed, 0).await;
    send_signal(&n1, "TERM");
    assert!(n1.wait().await.unwrap().success());
    db.drop_db().await;
}

/// Records every progress mark written by a node that did not own the
/// partition at that moment. The relay's acknowledgement updates the lease
/// row itself, so the owner seen here is the one it was checked against.
const AUDIT: &str = "
create table fencing_violations (deleter text, partition int, owner text, at timestamptz default clock_timestamp());
create function audit_outbox_mark() returns trigger language plpgsql as $$
begin
    if current_setting('application_name') is distinct from 'outbox/' || old.owner then
        insert into fencing_violations (deleter, partition, owner)
        values (current_setting('application_name'), old.partition, old.owner);
    end if;
    return new;
end $$;
create trigger audit_mark before update on outbox_leases
    for each row when (old.mark_hi::text is distinct from new.mark_hi::text
                       or old.mark_pos is distinct from new.mark_pos
                       or old.mark_lo::text is distinct from new.mark_lo::text)
    execute function audit_outbox_mark();
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_fenced_after_its_leases_move() {
    let _turn = heavy_turn().await;
    let db = TestDb::new(4).await;
    sqlx::raw_sql(AUDIT).execute(&db.pool).await.unwrap();
    let prefix = unique_prefix();
    let mut a = node(&db, "a", &prefix);
    wait_for_owners(&db, &[("a", 4)], Duration::from_secs(20)).await;
    let mut b = node(&db, "b", &prefix);
    wait_for_owners(&db, &[("a", 2), ("b", 2)], Duration::from_secs(20)).await;

    let stop = CancellationToken::new();
    let writer = spawn_writer(&db, 20, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Freeze `a` with batches in flight, past its lease TTL (2 s).
    send_signal(&a, "STOP");
    let moved = wait_for_owners(&db, &[("b", 4)], Duration::from_secs(15)).await;
    assert_eq!(moved.get("b"), Some(&4), "b did not take over: {moved:?}");
    let epochs_before: Vec<i64> =
        sqlx::query_scalar("select epoch from outbox_leases order by partition")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Wake it: its acknowledgements must be refused, and the cluster
    // rebalances to 2 + 2 with newer epochs.
    send_signal(&a, "CONT");
    let healed = wait_for_owners(&db, &[("a", 2), ("b", 2)], Duration::from_secs(20)).await;
    assert_eq!(
        healed.values().copied().collect::<Vec<_>>(),
        vec![2, 2],
        "{healed:?}"
    );
    let epochs_after: Vec<i64> =
        sqlx::query_scalar("select epoch from outbox_leases order by partition")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (before, after) in epochs_before.iter().zip(&epochs_after) {
        assert!(
            after >= before,
            "an epoch went back: {epochs_before:?} -> {epochs_after:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let committed = writer.await.unwrap();
    verify(&prefix, &committed, 4 * INFLIGHT * BATCH).await;

    let violations: Vec<(String, i32, Option<String>)> =
        sqlx::query_as("select deleter, partition, owner from fencing_violations")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        violations.is_empty(),
        "progress marked by a node that did not own the partition: {violations:?}"
    );
    for n in [&mut a, &mut b] {
        send_signal(n, "TERM");
        assert!(n.wait().await.unwrap().success());
    }
    db.drop_db().await;
}
