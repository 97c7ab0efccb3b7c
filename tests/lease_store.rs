//! The lease store and the fence on acknowledgements, against the real
//! PostgreSQL, step by step (no timing races): a stale owner's
//! acknowledgement is refused and removes nothing.

use std::time::{Duration, Instant};

use outbox_engine::cluster::{LeaseStore, Member, Registration};
use outbox_engine::event::OutboxEvent;
use outbox_engine::relay::{Ack, Claim, ClaimReader, EventSource, Read};
use outbox_engine::store::leases::{PgLeaseStore, TAKEOVER_MARGIN};
use outbox_engine::store::source::PgSource;
use outbox_engine::store::Names;
use outbox_harness::*;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(30);
/// The delivery timeout the test owners claim to send with.
const DELIVERY: Duration = Duration::from_secs(4);

async fn take(leases: &PgLeaseStore, m: &Member) -> Option<Claim> {
    take_for(leases, m, 0, TTL).await
}

/// [`take`] of `partition` for `ttl`.
async fn take_for(
    leases: &PgLeaseStore,
    m: &Member,
    partition: u32,
    ttl: Duration,
) -> Option<Claim> {
    leases
        .acquire(m, partition, ttl, DELIVERY)
        .await
        .unwrap()
        .map(|a| a.claim)
}

fn events(read: Read) -> Vec<OutboxEvent> {
    match read {
        Read::Events { events, .. } => events,
        Read::Fenced => panic!("unexpectedly fenced"),
    }
}

fn positions(events: &[OutboxEvent]) -> Vec<i64> {
    events.iter().map(|e| e.position).collect()
}

fn member(id: &str) -> Member {
    Member {
        node_id: id.into(),
        incarnation: Uuid::now_v7(),
    }
}

async fn expire_lease(db: &TestDb, partition: i32) {
    sqlx::query(
        "update outbox_leases set expires_at = now() - interval '1 second' where partition = $1",
    )
    .bind(partition)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// A one-partition outbox with its lease store and source.
async fn one_partition() -> (TestDb, PgLeaseStore, PgSource) {
    let db = TestDb::new(1).await;
    let names = Names::new("public").unwrap();
    let leases = PgLeaseStore::new(db.pool.clone(), &names);
    let source = PgSource::new(db.pool.clone(), &names, 1);
    (db, leases, source)
}

#[tokio::test]
async fn a_stale_owner_cannot_acknowledge() {
    let (db, leases, source) = one_partition().await;
    db.insert_series(10, "g::text", "'{}'").await;

    let (a, b) = (member("a"), member("b"));
    let old = take(&leases, &a).await.expect("a takes the free lease");
    assert_eq!(old.epoch, 1);
    assert!(take(&leases, &b).await.is_none(), "a live lease was taken");
    let mut stale = source.open(&old);
    let batch = events(stale.fetch(100).await.unwrap());
    assert_eq!(batch.len(), 10);
    let all = positions(&batch);

    // a stalls past its lease; b takes over and publishes the first half.
    expire_lease(&db, 0).await;
    let new = take(&leases, &b).await.expect("b takes the expired lease");
    assert_eq!(new.epoch, 2);
    let mut fresh = source.open(&new);
    assert_eq!(events(fresh.fetch(5).await.unwrap()).len(), 5);
    assert_eq!(fresh.acknowledge(5, None).await.unwrap().0, Ack::Done);

    // a wakes and acknowledges its whole batch with the old epoch: refused,
    // and its fetches are refused too.
    assert_eq!(stale.acknowledge(10, None).await.unwrap().0, Ack::Fenced);
    assert_eq!(stale.fetch(100).await.unwrap(), Read::Fenced);
    assert_eq!(
        db.pending().await,
        5,
        "a stale acknowledgement removed rows"
    );
    // Nor can it renew or release what it lost.
    assert!(leases.renew(&a, &[old], TTL).await.unwrap().is_empty());
    leases.release(&old, Duration::ZERO).await.unwrap();
    let owner: Option<String> =
        sqlx::query_scalar("select owner from outbox_leases where partition = 0")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        owner.as_deref(),
        Some("b"),
        "a stale release freed the new owner's lease"
    );

    // The new owner goes on from where it acknowledged.
    let rest = events(fresh.fetch(100).await.unwrap());
    assert_eq!(positions(&rest), all[5..]);
    assert_eq!(leases.renew(&b, &[new], TTL).await.unwrap(), vec![new]);
    db.drop_db().await;
}

#[tokio::test]
async fn a_takeover_waits_out_the_previous_owners_deliveries() {
    let (db, leases, _source) = one_partition().await;
    let (a, b, c) = (member("a"), member("b"), member("c"));
    let first = leases
        .acquire(&a, 0, TTL, DELIVERY)
        .await
        .unwrap()
        .expect("free lease");
    assert_eq!(
        first.quiet_for,
        Duration::ZERO,
        "a never-owned lease is quiet"
    );
    // a's lease expires without a release: b must wait until the expiry
    // plus a's delivery timeout plus the margin.
    // The wait is counted from the database's clock: the time between the
    // two statements (long on a loaded machine) comes off it.
    let expired = Instant::now();
    expire_lease(&db, 0).await;
    let second = leases
        .acquire(&b, 0, TTL, Duration::from_secs(1))
        .await
        .unwrap()
        .expect("expired lease");
    let between = expired.elapsed();
    let want = DELIVERY + TAKEOVER_MARGIN - Duration::from_secs(1);
    assert!(
        second.quiet_for <= want && second.quiet_for + between + Duration::from_millis(100) > want,
        "waits {:?}, want about {want:?} less the {between:?} between the statements",
        second.quiet_for
    );
    // b drained and released with nothing in flight: c may send at once.
    leases.release(&second.claim, Duration::ZERO).await.unwrap();
    let third = leases
        .acquire(&c, 0, TTL, DELIVERY)
        .await
        .unwrap()
        .expect("released lease");
    assert!(
        third.quiet_for < Duration::from_millis(100),
        "{:?}",
        third.quiet_for
    );
    // c abandons batches and releases with their delivery time left.
    let released = Instant::now();
    leases
        .release(&third.claim, Duration::from_secs(3))
        .await
        .unwrap();
    let fourth = leases
        .acquire(&a, 0, TTL, DELIVERY)
        .await
        .unwrap()
        .expect("released lease");
    let between = released.elapsed();
    assert!(
        fourth.quiet_for + between + Duration::from_millis(100) > Duration::from_secs(3)
            && fourth.quiet_for <= Duration::from_secs(3),
        "{:?} ({between:?} between the statements)",
        fourth.quiet_for
    );
    assert_eq!(fourth.claim.epoch, 4);
    db.drop_db().await;
}

#[tokio::test]
async fn fetch_continues_after_what_is_outstanding_and_keeps_position_order() {
    let (db, leases, source) = one_partition().await;
    db.insert_series(9, "(g % 3)::text", "jsonb_build_object('g', g)")
        .await;
    let claim = take(&leases, &member("a")).await.unwrap();
    let mut reader = source.open(&claim);
    let first = events(reader.fetch(4).await.unwrap());
    let second = events(reader.fetch(100).await.unwrap());
    assert_eq!(second.len(), 5);
    let all: Vec<i64> = first.iter().chain(&second).map(|e| e.position).collect();
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(all, sorted, "fetches are not in position order or overlap");
    assert_eq!(
        first[0].payload,
        br#"{"g": 1}"#.to_vec(),
        "payload bytes are the JSON text"
    );
    // A rewind hands everything unacknowledged out again.
    reader.rewind();
    assert_eq!(positions(&events(reader.fetch(100).await.unwrap())), all);
    db.drop_db().await;
}

#[tokio::test]
async fn a_big_window_is_read_by_keys_and_an_exact_window_takes_no_empty_read() {
    let (db, leases, source) = one_partition().await;
    // One transaction of 250 rows: a window of several batches, read by
    // its keys; every acknowledgement after the first carries the next read.
    db.insert_series(250, "(g % 7)::text", "jsonb_build_object('g', g)")
        .await;
    let claim = take(&leases, &member("a")).await.unwrap();
    let mut reader = source.open(&claim);
    let mut batch = events(reader.fetch(40).await.unwrap());
    let mut all = Vec::new();
    while !batch.is_empty() {
        assert!(batch.len() <= 40, "a read of 40 returned {}", batch.len());
        all.extend(positions(&batch));
        let (ack, next) = reader.acknowledge(batch.len(), Some(40)).await.unwrap();
        assert_eq!(ack, Ack::Done);
        batch = events(next.expect("the acknowledgement carried a read"));
    }
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(all.len(), 250, "rows were lost or repeated");
    assert_eq!(all, sorted, "reads are not in position order");
    let pending: i64 = sqlx::query_scalar("select count(*) from outbox_pending")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);
    // The window was read to its end: the mark moved past all of it.
    let whole: bool = sqlx::query_scalar("select mark_hi is null from outbox_leases")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(whole, "the mark stayed inside a window read to its end");
    // A window of exactly the limit is read whole: the next read is the
    // window after it, not an empty rest.
    db.insert_series(40, "g::text", "'{}'").await;
    assert_eq!(events(reader.fetch(40).await.unwrap()).len(), 40);
    db.insert_series(3, "g::text", "'{}'").await;
    assert_eq!(events(reader.fetch(40).await.unwrap()).len(), 3);
    db.drop_db().await;
}

#[tokio::test]
async fn rows_are_acknowledged_by_position_and_id() {
    let (db, leases, source) = one_partition().await;
    db.insert_series(3, "g::text", "'{}'").await;
    let claim = take(&leases, &member("a")).await.unwrap();
    let mut reader = source.open(&claim);
    let batch = events(reader.fetch(100).await.unwrap());
    // A restore (or an application) reuses the first event's position.
    sqlx::query(
        "insert into outbox (position, aggregate_type, aggregate_id, event_type, payload)
         values ($1, 'order', 'x', 'E', '{}')",
    )
    .bind(batch[0].position)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(reader.acknowledge(3, None).await.unwrap().0, Ack::Done);
    let left: Vec<(i64, String)> =
        sqlx::query_as("select position, aggregate_id from outbox_pending")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, vec![(batch[0].position, "x".to_string())]);
    db.drop_db().await;
}

#[tokio::test]
async fn a_node_id_in_use_by_a_live_process_is_not_taken() {
    let db = TestDb::new(1).await;
    let names = Names::new("public").unwrap();
    let leases = PgLeaseStore::new(db.pool.clone(), &names);
    let first = member("n1");
    assert_eq!(
        leases.register(&first, TTL).await.unwrap(),
        Registration::Registered
    );
    let second = member("n1");
    match leases.register(&second, TTL).await.unwrap() {
        Registration::Taken { expires_in } => assert!(expires_in > Duration::from_secs(20)),
        other => panic!("a live node id was taken: {other:?}"),
    }
    assert!(leases.heartbeat(&first, TTL).await.unwrap());
    // Once the first expires, the second may register; the first has lost it.
    sqlx::query("update outbox_nodes set expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        leases.register(&second, TTL).await.unwrap(),
        Registration::Registered
    );
    assert!(!leases.heartbeat(&first, TTL).await.unwrap());
    assert_eq!(leases.live_nodes().await.unwrap(), vec!["n1".to_string()]);
    db.drop_db().await;
}

/// The heartbeat and the renewal in one statement: the claims still held
/// come back, a lost one does not, and nothing is renewed once the
/// registration is lost.
#[tokio::test]
async fn keep_heartbeats_and_renews_only_while_registered() {
    let db = TestDb::new(2).await;
    let names = Names::new("public").unwrap();
    let leases = PgLeaseStore::new(db.pool.clone(), &names);
    let (a, b) = (member("a"), member("b"));
    assert_eq!(
        leases.register(&a, TTL).await.unwrap(),
        Registration::Registered
    );
    let expiry = |p: i32| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, f64>(
                "select extract(epoch from expires_at - now())::float8 from outbox_leases where partition = $1",
            )
            .bind(p)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let short = Duration::from_secs(2);
    let first = take_for(&leases, &a, 0, short).await.unwrap();
    let second = take_for(&leases, &a, 1, short).await.unwrap();
    assert_eq!(
        leases.keep(&a, &[first, second], TTL).await.unwrap(),
        Some(vec![first, second])
    );
    assert!(
        expiry(0).await > 20.0 && expiry(1).await > 20.0,
        "not renewed"
    );
    let node_expiry: f64 = sqlx::query_scalar(
        "select extract(epoch from expires_at - now())::float8 from outbox_nodes where node_id = 'a'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(node_expiry > 20.0, "no heartbeat: {node_expiry}");

    // b takes partition 1 over: a keeps only partition 0.
    expire_lease(&db, 1).await;
    assert!(take_for(&leases, &b, 1, TTL).await.is_some());
    assert_eq!(
        leases.keep(&a, &[first, second], TTL).await.unwrap(),
        Some(vec![first])
    );
    // With no lease to renew, still a heartbeat.
    assert_eq!(leases.keep(&a, &[], TTL).await.unwrap(), Some(vec![]));

    // a's registration is taken by a new process of the same id: keep says
    // so, and leaves a's lease to expire.
    sqlx::query("update outbox_nodes set expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "update outbox_leases set expires_at = now() + interval '2 seconds' where partition = 0",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        leases.register(&member("a"), TTL).await.unwrap(),
        Registration::Registered
    );
    assert_eq!(leases.keep(&a, &[first], TTL).await.unwrap(), None);
    assert!(
        expiry(0).await < 3.0,
        "renewed after the registration was lost"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn acknowledge_and_fetch_is_fenced_and_leaves_out_what_is_outstanding() {
    let (db, leases, source) = one_partition().await;
    db.insert_series(12, "g::text", "'{}'").await;
    let (a, b) = (member("a"), member("b"));
    let claim = take(&leases, &a).await.unwrap();
    let mut reader = source.open(&claim);
    let first = events(reader.fetch(4).await.unwrap());
    let second = events(reader.fetch(4).await.unwrap());
    let acked = positions(&first);
    let outstanding = positions(&second);

    let (ack, next) = reader.acknowledge(4, Some(100)).await.unwrap();
    assert_eq!(ack, Ack::Done);
    let next = positions(&events(next.expect("fetched with the acknowledgement")));
    assert_eq!(next.len(), 4, "{next:?}");
    assert!(
        next.windows(2).all(|w| w[0] < w[1]),
        "not in position order: {next:?}"
    );
    assert!(next
        .iter()
        .all(|p| !acked.contains(p) && !outstanding.contains(p)));
    assert_eq!(db.pending().await, 8);

    // Stale: nothing removed, nothing fetched.
    expire_lease(&db, 0).await;
    let newer = take(&leases, &b).await.unwrap();
    let (ack, fetched) = reader.acknowledge(4, Some(100)).await.unwrap();
    assert_eq!(ack, Ack::Fenced);
    assert!(fetched.is_none());
    assert_eq!(db.pending().await, 8);
    // The new owner's combined call with nothing left to fetch.
    let mut fresh = source.open(&newer);
    let all = events(fresh.fetch(100).await.unwrap());
    assert_eq!(all.len(), 8);
    let (ack, fetched) = fresh.acknowledge(8, Some(100)).await.unwrap();
    assert_eq!(ack, Ack::Done);
    assert!(events(fetched.unwrap()).is_empty());
    assert_eq!(db.pending().await, 0);
    db.drop_db().await;
}
