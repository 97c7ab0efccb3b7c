//! The lease store and the fence on acknowledgements, against the real
//! PostgreSQL, step by step (no timing races): a stale owner's
//! acknowledgement is refused and removes nothing.

mod support;

use std::time::Duration;

use outbox_engine::cluster::{LeaseStore, Member, Registration};
use outbox_engine::relay::{Ack, EventSource};
use outbox_engine::store::leases::PgLeaseStore;
use outbox_engine::store::source::PgSource;
use outbox_engine::store::Names;
use support::*;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(30);

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

/// Inserts `count` events; `aggregate` and `payload` are SQL over `g`.
async fn insert(db: &TestDb, count: i32, aggregate: &str, payload: &str) {
    sqlx::query(&format!(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
         select 'order', {aggregate}, 'E', {payload} from generate_series(1, {count}) g"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stale_owner_cannot_acknowledge() {
    let (db, leases, source) = one_partition().await;
    insert(&db, 10, "g::text", "'{}'").await;

    let (a, b) = (member("a"), member("b"));
    let old = leases
        .acquire(&a, 0, TTL)
        .await
        .unwrap()
        .expect("a takes the free lease");
    assert_eq!(old.epoch, 1);
    assert!(
        leases.acquire(&b, 0, TTL).await.unwrap().is_none(),
        "a live lease was taken"
    );
    let batch = source.fetch(&old, 100, &[]).await.unwrap();
    assert_eq!(batch.len(), 10);
    let positions: Vec<i64> = batch.iter().map(|e| e.position).collect();

    // a stalls past its lease; b takes over and publishes the first half.
    expire_lease(&db, 0).await;
    let new = leases
        .acquire(&b, 0, TTL)
        .await
        .unwrap()
        .expect("b takes the expired lease");
    assert_eq!(new.epoch, 2);
    assert_eq!(
        source.acknowledge(&new, &positions[..5]).await.unwrap(),
        Ack::Done { removed: 5 }
    );

    // a wakes and acknowledges its whole batch with the old epoch: refused.
    assert_eq!(
        source.acknowledge(&old, &positions).await.unwrap(),
        Ack::Fenced
    );
    assert_eq!(
        db.pending().await,
        5,
        "a stale acknowledgement removed rows"
    );
    // Nor can it renew or release what it lost.
    assert!(leases.renew(&a, &[old], TTL).await.unwrap().is_empty());
    leases.release(&old).await.unwrap();
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
    let rest = source.fetch(&new, 100, &[]).await.unwrap();
    assert_eq!(
        rest.iter().map(|e| e.position).collect::<Vec<_>>(),
        positions[5..]
    );
    assert_eq!(leases.renew(&b, &[new], TTL).await.unwrap(), vec![new]);
    db.drop_db().await;
}

#[tokio::test]
async fn fetch_leaves_out_what_is_in_flight_and_keeps_position_order() {
    let (db, leases, source) = one_partition().await;
    insert(&db, 9, "(g % 3)::text", "jsonb_build_object('g', g)").await;
    let claim = leases.acquire(&member("a"), 0, TTL).await.unwrap().unwrap();
    let first = source.fetch(&claim, 4, &[]).await.unwrap();
    let in_flight: Vec<i64> = first.iter().map(|e| e.position).collect();
    let second = source.fetch(&claim, 100, &in_flight).await.unwrap();
    assert_eq!(second.len(), 5);
    assert!(second.iter().all(|e| !in_flight.contains(&e.position)));
    let all: Vec<i64> = first.iter().chain(&second).map(|e| e.position).collect();
    let mut sorted = all.clone();
    sorted.sort_unstable();
    assert_eq!(all, sorted, "fetches are not in position order");
    assert_eq!(
        first[0].payload,
        br#"{"g": 1}"#.to_vec(),
        "payload bytes are the JSON text"
    );
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

#[tokio::test]
async fn acknowledge_and_fetch_is_fenced_and_leaves_out_what_is_in_flight() {
    let (db, leases, source) = one_partition().await;
    insert(&db, 12, "g::text", "'{}'").await;
    let (a, b) = (member("a"), member("b"));
    let claim = leases.acquire(&a, 0, TTL).await.unwrap().unwrap();
    let first = source.fetch(&claim, 4, &[]).await.unwrap();
    let second = source
        .fetch(
            &claim,
            4,
            &first.iter().map(|e| e.position).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let acked: Vec<i64> = first.iter().map(|e| e.position).collect();
    let in_flight: Vec<i64> = second.iter().map(|e| e.position).collect();

    let (ack, next) = source
        .acknowledge_and_fetch(&claim, &acked, 100, &in_flight)
        .await
        .unwrap();
    assert_eq!(ack, Ack::Done { removed: 4 });
    let next: Vec<i64> = next.iter().map(|e| e.position).collect();
    assert_eq!(next.len(), 4, "{next:?}");
    assert!(
        next.windows(2).all(|w| w[0] < w[1]),
        "not in position order: {next:?}"
    );
    assert!(next
        .iter()
        .all(|p| !acked.contains(p) && !in_flight.contains(p)));
    assert_eq!(db.pending().await, 8);

    // Stale: nothing removed, nothing fetched.
    expire_lease(&db, 0).await;
    let newer = leases.acquire(&b, 0, TTL).await.unwrap().unwrap();
    let (ack, fetched) = source
        .acknowledge_and_fetch(&claim, &in_flight, 100, &[])
        .await
        .unwrap();
    assert_eq!(ack, Ack::Fenced);
    assert!(fetched.is_empty());
    assert_eq!(db.pending().await, 8);
    // The new owner's combined call with nothing left to fetch.
    let all: Vec<i64> = source
        .fetch(&newer, 100, &[])
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    let (ack, fetched) = source
        .acknowledge_and_fetch(&newer, &all, 100, &[])
        .await
        .unwrap();
    assert_eq!(ack, Ack::Done { removed: 8 });
    assert!(fetched.is_empty());
    db.drop_db().await;
}
