//! Retention against PostgreSQL: migrate is idempotent, expired segments
//! are dropped whole with their ids (no row deleted one by one), and an
//! event whose id expired is applied again.

mod support;

use outbox_inbox::segments::Day;
use outbox_inbox::{maintain_as_of, migrate, segment_days, Inbox, Verdict};
use support::{now_ms, Ev, TestSchema, DAY_MS};
use uuid::Uuid;

#[tokio::test]
async fn migrate_twice_changes_nothing() {
    let db = TestSchema::with(|c| {
        c.retention_days = 3;
        c.ahead_days = 1;
    })
    .await;
    let mut conn = db.pool.acquire().await.unwrap();
    let before = segment_days(&mut conn, db.schema()).await.unwrap();
    assert_eq!(before.len(), 3 + 1 + 1, "{before:?}");
    migrate(&mut conn, &db.config).await.unwrap();
    assert_eq!(segment_days(&mut conn, db.schema()).await.unwrap(), before);
    drop(conn);
    db.drop().await;
}

#[tokio::test]
async fn expired_segments_are_dropped_whole() {
    let db = TestSchema::with(|c| {
        c.retention_days = 3;
        c.ahead_days = 1;
    })
    .await;
    let s = db.schema().to_string();
    let inbox = Inbox::new(&s, "g").unwrap();
    let t = now_ms();
    let today = Day::of_epoch_ms(t);
    // One id per live day: today-3 ..= today+1.
    let events: Vec<Ev> = (-3..=1)
        .map(|d| Ev::new(Uuid::now_v7(), t + d * DAY_MS))
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    let claim = inbox.claim(&mut tx, &events).await.unwrap();
    assert_eq!(claim.count(Verdict::Apply), 5);
    tx.commit().await.unwrap();

    // Two days later, the two oldest days are past retention.
    let mut conn = db.pool.acquire().await.unwrap();
    let done = maintain_as_of(&mut conn, &db.config, Day(today.0 + 2))
        .await
        .unwrap();
    assert_eq!(done.dropped, vec![Day(today.0 - 3), Day(today.0 - 2)]);
    assert_eq!(done.created, vec![Day(today.0 + 2), Day(today.0 + 3)]);
    let days = segment_days(&mut conn, &s).await.unwrap();
    assert_eq!(
        days,
        (today.0 - 1..=today.0 + 3).map(Day).collect::<Vec<_>>()
    );
    let left: Vec<Uuid> = sqlx::query_scalar(&format!("select event_id from {s}.inbox"))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(left.len(), 3);
    assert!(!left.contains(&events[0].id) && !left.contains(&events[1].id));
    // Same day again: nothing to do.
    let again = maintain_as_of(&mut conn, &db.config, Day(today.0 + 2))
        .await
        .unwrap();
    assert!(again.created.is_empty() && again.dropped.is_empty());

    // No segment ever saw a delete: expiry is by drop only.
    sqlx::query("select pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    let deletes: i64 = sqlx::query_scalar(
        "select coalesce(sum(n_tup_del), 0)::int8 from pg_stat_user_tables where schemaname = $1",
    )
    .bind(&s)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(deletes, 0);

    // An event whose id expired is new again: applied a second time.
    // Its time is now before the window, so it is filed in the oldest
    // live segment.
    let mut tx = db.pool.begin().await.unwrap();
    let claim = inbox
        .claim(&mut tx, &[events[0].clone(), events[3].clone()])
        .await
        .unwrap();
    assert_eq!(claim.verdicts, [Verdict::Apply, Verdict::Duplicate]);
    tx.commit().await.unwrap();
    drop(conn);
    db.drop().await;
}
