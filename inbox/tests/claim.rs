//! The claim statement against PostgreSQL: duplicates within a batch and
//! across batches and segments, rollback, racing transactions of one
//! group, independent groups, and the stale-event check.

mod support;

use std::time::Duration;

use outbox_inbox::{Inbox, Verdict};
use support::{now_ms, Ev, TestSchema, DAY_MS};
use uuid::Uuid;

use Verdict::{Apply, Duplicate, Stale};

#[tokio::test]
async fn a_batch_is_claimed_once_and_duplicates_are_skipped() {
    let db = TestSchema::new().await;
    let inbox = Inbox::new(db.schema(), "billing").unwrap();
    let t = now_ms();
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());

    // A repeated id inside one batch is applied once.
    let mut tx = db.pool.begin().await.unwrap();
    let claim = inbox
        .claim(&mut tx, &[Ev::new(a, t), Ev::new(b, t), Ev::new(a, t)])
        .await
        .unwrap();
    assert_eq!(claim.verdicts, [Apply, Apply, Duplicate]);
    // Rolled back: nothing recorded, the batch is new again.
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let claim = inbox
        .claim(&mut tx, &[Ev::new(a, t), Ev::new(b, t)])
        .await
        .unwrap();
    assert_eq!(claim.verdicts, [Apply, Apply]);
    tx.commit().await.unwrap();

    // Committed: the same ids again are duplicates, a new one is not.
    let mut tx = db.pool.begin().await.unwrap();
    let claim = inbox
        .claim(&mut tx, &[Ev::new(b, t), Ev::new(c, t), Ev::new(a, t)])
        .await
        .unwrap();
    assert_eq!(claim.verdicts, [Duplicate, Apply, Duplicate]);
    tx.commit().await.unwrap();

    // Another group has its own record.
    let other = Inbox::new(db.schema(), "shipping").unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let claim = other.claim(&mut tx, &[Ev::new(a, t)]).await.unwrap();
    assert_eq!(claim.verdicts, [Apply]);
    tx.commit().await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn a_duplicate_is_found_in_any_segment() {
    let db = TestSchema::new().await;
    let inbox = Inbox::new(db.schema(), "g").unwrap();
    let t = now_ms();
    let a = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        inbox
            .claim(&mut tx, &[Ev::new(a, t - 5 * DAY_MS)])
            .await
            .unwrap()
            .verdicts,
        [Apply]
    );
    tx.commit().await.unwrap();
    // The same id with another time (a LogAppendTime topic, another
    // producer) maps to another segment; the check spans all of them.
    for at in [t, t + DAY_MS, t - 2 * DAY_MS, t - 50 * DAY_MS] {
        let mut tx = db.pool.begin().await.unwrap();
        let claim = inbox.claim(&mut tx, &[Ev::new(a, at)]).await.unwrap();
        assert_eq!(claim.verdicts, [Duplicate], "event time {at}");
        tx.commit().await.unwrap();
    }
    let segment: String = sqlx::query_scalar(&format!(
        "select tableoid::regclass::text from {}.inbox where event_id = $1",
        db.schema()
    ))
    .bind(a)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let five_days_ago = outbox_inbox::segments::Day::of_epoch_ms(t - 5 * DAY_MS);
    assert!(
        segment.ends_with(&five_days_ago.segment_name()),
        "{segment} is not the segment of {five_days_ago}"
    );
    db.drop().await;
}

#[tokio::test]
async fn event_times_outside_the_window_are_clamped_into_it() {
    let db = TestSchema::new().await;
    let inbox = Inbox::new(db.schema(), "g").unwrap();
    let t = now_ms();
    let (old, future, untimed) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let mut tx = db.pool.begin().await.unwrap();
    let mut batch = vec![
        Ev::new(old, t - 400 * DAY_MS),
        Ev::new(future, t + 400 * DAY_MS),
    ];
    batch.push(Ev {
        id: untimed,
        at_ms: None,
        aggregate: None,
    });
    let claim = inbox.claim(&mut tx, &batch).await.unwrap();
    assert_eq!(claim.verdicts, [Apply, Apply, Apply]);
    tx.commit().await.unwrap();
    let days = outbox_inbox::segment_days(&mut db.pool.acquire().await.unwrap(), db.schema())
        .await
        .unwrap();
    let seg = |id: Uuid| {
        let pool = db.pool.clone();
        let sql = format!(
            "select tableoid::regclass::text from {}.inbox where event_id = $1",
            db.schema()
        );
        async move {
            sqlx::query_scalar::<_, String>(&sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(seg(old).await.ends_with(&days[0].segment_name()));
    assert!(seg(future)
        .await
        .ends_with(&days[days.len() - 1].segment_name()));
    db.drop().await;
}

/// Two consumers of one group with the same message in flight (a
/// rebalance hand-over): the second claim waits for the first
/// transaction and then sees a duplicate; had the first rolled back, the
/// second applies. Exactly one applies either way.
#[tokio::test]
async fn racing_claims_of_one_group_apply_once() {
    let db = TestSchema::new().await;
    let inbox = Inbox::new(db.schema(), "g").unwrap();
    let t = now_ms();
    for first_commits in [true, false] {
        let a = Uuid::now_v7();
        let mut first = db.pool.begin().await.unwrap();
        assert_eq!(
            inbox
                .claim(&mut first, &[Ev::new(a, t)])
                .await
                .unwrap()
                .verdicts,
            [Apply]
        );
        let second = {
            let (pool, inbox) = (db.pool.clone(), inbox.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let claim = inbox.claim(&mut tx, &[Ev::new(a, t)]).await.unwrap();
                tx.commit().await.unwrap();
                claim.verdicts
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second claim did not wait");
        if first_commits {
            first.commit().await.unwrap();
            assert_eq!(second.await.unwrap(), [Duplicate]);
        } else {
            first.rollback().await.unwrap();
            assert_eq!(second.await.unwrap(), [Apply]);
        }
    }
    db.drop().await;
}

/// Many rounds of two transactions claiming overlapping batches in
/// different orders at the same time: every id is applied exactly once.
#[tokio::test]
async fn concurrent_overlapping_batches_apply_each_id_once() {
    let db = TestSchema::new().await;
    let inbox = Inbox::new(db.schema(), "g").unwrap();
    let t = now_ms();
    let ids: Vec<Uuid> = (0..2_000).map(|_| Uuid::now_v7()).collect();
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let (pool, inbox, ids) = (db.pool.clone(), inbox.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut applied = Vec::new();
            // Each worker walks the ids in its own order, 100 at a time.
            let mut order = ids;
            if worker % 2 == 1 {
                order.reverse();
            }
            order.rotate_left(worker * 300);
            for chunk in order.chunks(100) {
                let batch: Vec<Ev> = chunk.iter().map(|id| Ev::new(*id, t)).collect();
                loop {
                    let mut tx = pool.begin().await.unwrap();
                    match inbox.claim(&mut tx, &batch).await {
                        Ok(claim) => {
                            tx.commit().await.unwrap();
                            applied.extend(claim.to_apply(&batch).into_iter().map(|e| e.id));
                            break;
                        }
                        Err(e) if e.is_retriable() => continue,
                        Err(e) => panic!("claim: {e}"),
                    }
                }
            }
            applied
        }));
    }
    let mut all = Vec::new();
    let mut per_worker = Vec::new();
    for t in tasks {
        let applied = t.await.unwrap();
        per_worker.push(applied.len());
        all.extend(applied);
    }
    eprintln!("applied per worker: {per_worker:?}");
    let distinct: std::collections::HashSet<Uuid> = all.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len(), "an id was never applied");
    assert_eq!(all.len(), ids.len(), "an id was applied twice");
    db.drop().await;
}

#[tokio::test]
async fn stale_events_are_rejected_per_aggregate() {
    let db = TestSchema::new().await;
    let inbox = Inbox::new(db.schema(), "lww").unwrap().reject_stale();
    let plain = Inbox::new(db.schema(), "plain").unwrap();
    let t = now_ms();
    let id = |_| Uuid::now_v7();
    let ids: Vec<Uuid> = (0..10).map(id).collect();
    let claim = |batch: Vec<Ev>, inbox: Inbox| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let c = inbox.claim(&mut tx, &batch).await.unwrap();
            tx.commit().await.unwrap();
            c.verdicts
        }
    };
    assert_eq!(
        claim(vec![Ev::of(ids[0], t, "42", 10)], inbox.clone()).await,
        [Apply]
    );
    // Older position, new id: stale. Another aggregate is not affected.
    assert_eq!(
        claim(
            vec![Ev::of(ids[1], t, "42", 5), Ev::of(ids[2], t, "43", 1)],
            inbox.clone()
        )
        .await,
        [Stale, Apply]
    );
    // Several newer events of one aggregate in a batch all apply; an
    // older one in the same batch does not.
    assert_eq!(
        claim(
            vec![
                Ev::of(ids[3], t, "42", 11),
                Ev::of(ids[4], t, "42", 9),
                Ev::of(ids[5], t, "42", 13),
            ],
            inbox.clone()
        )
        .await,
        [Apply, Stale, Apply]
    );
    let newest: i64 = sqlx::query_scalar(&format!(
        "select position from {}.inbox_aggregates where consumer_group = 'lww' and aggregate_id = '42'",
        db.schema()
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(newest, 13);
    // A stale event is recorded as processed: its redelivery is a duplicate.
    // An event without an order key is never stale.
    let no_key = Ev::new(ids[6], t);
    assert_eq!(
        claim(vec![Ev::of(ids[1], t, "42", 5), no_key], inbox.clone()).await,
        [Duplicate, Apply]
    );
    // Inside one batch, an event older than one before it is stale too
    // (the handler applies the batch in order).
    assert_eq!(
        claim(
            vec![Ev::of(ids[8], t, "77", 11), Ev::of(ids[9], t, "77", 9)],
            inbox.clone()
        )
        .await,
        [Apply, Stale]
    );
    // Without reject_stale, positions are not looked at.
    assert_eq!(
        claim(vec![Ev::of(ids[7], t, "42", 1)], plain).await,
        [Apply]
    );
    db.drop().await;
}
