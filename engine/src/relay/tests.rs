//! The worker's state machine against the memory source and the scripted
//! sink, in virtual time: what reaches the broker, in which order, and what
//! is acknowledged, when events are refused, time out, are reported out of
//! order, or are purged by a producer reset.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::{PoisonPolicy, RelayConfig};
use crate::error::SinkError;
use crate::event::test_event;
use crate::relay::worker::{Exit, Signals, Totals, Worker, WorkerSpec};
use crate::relay::{Claim, EventSource, LeaseDeadline};
use crate::sink::scripted::{Fault, ScriptedSink};
use crate::store::memory::MemorySource;

const EVENTS: i64 = 12;

fn claim() -> Claim {
    Claim {
        partition: 0,
        epoch: 1,
        incarnation: Uuid::nil(),
        mode: crate::relay::Mode::Poll,
    }
}

fn id(position: i64) -> Uuid {
    Uuid::from_u128(position as u128)
}

fn position(id: Uuid) -> i64 {
    id.as_u128() as i64
}

fn config(batch: usize, inflight: usize, policy: PoisonPolicy) -> RelayConfig {
    RelayConfig {
        batch_size: batch,
        max_inflight_batches: inflight,
        poll_interval_ms: 10,
        retry_backoff_min_ms: 100,
        retry_backoff_max_ms: 1_000,
        poison_policy: policy,
        max_attempts: 3,
        ..RelayConfig::default()
    }
}

/// A partition of `EVENTS` events over three aggregates (position % 3).
fn source() -> MemorySource {
    let source = MemorySource::new();
    source.set_epoch(0, 1);
    source.push(
        0,
        (1..=EVENTS).map(|p| test_event(p, &format!("agg{}", p % 3))),
    );
    source
}

struct Running {
    signals: Signals,
    handle: JoinHandle<(Exit, Totals)>,
}

fn start(
    source: &MemorySource,
    sink: &ScriptedSink,
    config: RelayConfig,
    lease: LeaseDeadline,
) -> Running {
    let spec = WorkerSpec {
        claim: claim(),
        node_id: "test".into(),
        config,
        lease,
        not_before: Instant::now(),
        doorbell: source.doorbell(&claim()),
    };
    let worker = Worker::new(
        spec,
        source.open(&claim()),
        Arc::new(sink.clone()),
        Arc::new(source.clone()),
    );
    let signals = Signals::default();
    let handle = tokio::spawn(worker.run(signals.clone()));
    Running { signals, handle }
}

fn long_lease() -> LeaseDeadline {
    LeaseDeadline::new(Instant::now() + Duration::from_secs(3_600))
}

/// Waits (in virtual time) until `done` holds, at most `limit`.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done()
}

async fn stop(run: Running) -> Exit {
    run.signals.stop.cancel();
    run.handle.await.expect("worker task").0
}

fn positions(ids: &[Uuid]) -> Vec<i64> {
    ids.iter().map(|i| position(*i)).collect()
}

fn handed_positions(sink: &ScriptedSink) -> Vec<i64> {
    sink.handed().iter().map(|h| h.position).collect()
}

fn all_but(skip: &[i64]) -> Vec<i64> {
    (1..=EVENTS).filter(|p| !skip.contains(p)).collect()
}

#[tokio::test(start_paused = true)]
async fn a_refused_event_stops_the_line_and_is_parked_after_its_tries() {
    let (source, sink) = (source(), ScriptedSink::new());
    sink.script(
        id(5),
        Fault::Refuse(SinkError::Permanent("no such topic".into())),
        100,
    );
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Park),
        long_lease(),
    );
    assert!(until(Duration::from_secs(60), || source.pending(0).is_empty()).await);
    // Nothing after the refused event was handed over before it was parked:
    // [4, 5, 6] stopped at 5 (4 went), then 5 alone until parked, then 6 on.
    assert_eq!(handed_positions(&sink), all_but(&[5]));
    // Parking acknowledges the event in its place: the partition moves on.
    assert_eq!(positions(&source.acknowledged(0)), all_but(&[]));
    let parked = source.parked();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].0.position, 5);
    assert_eq!(parked[0].1.attempts, 3);
    assert_eq!(sink.first_delivery_violations(position), 0);
    assert_eq!(stop(run).await, Exit::Drained);
}

#[tokio::test(start_paused = true)]
async fn under_block_nothing_after_a_refused_event_is_ever_sent() {
    let (source, sink) = (source(), ScriptedSink::new());
    sink.script(
        id(5),
        Fault::Refuse(SinkError::Permanent("no such topic".into())),
        1_000,
    );
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Block),
        long_lease(),
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(handed_positions(&sink), vec![1, 2, 3, 4]);
    assert_eq!(positions(&source.acknowledged(0)), vec![1, 2, 3, 4]);
    assert!(source.parked().is_empty());
    assert_eq!(source.pending(0).len(), 8);
    // The operator fixes the cause: it goes through, then the rest, in order.
    sink.clear(id(5));
    assert!(until(Duration::from_secs(60), || source.pending(0).is_empty()).await);
    assert_eq!(handed_positions(&sink), all_but(&[]));
    assert_eq!(positions(&source.acknowledged(0)), all_but(&[]));
    assert_eq!(stop(run).await, Exit::Drained);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_event_is_resent_before_anything_after_it_is_acknowledged() {
    let (source, sink) = (source(), ScriptedSink::new());
    sink.hold_reports(true);
    sink.script(
        id(2),
        Fault::Fail(SinkError::Transient("Message timed out".into())),
        1,
    );
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Park),
        long_lease(),
    );
    assert!(until(Duration::from_secs(5), || sink.unreported() == 2).await);
    // The later batch reports first; nothing of it may be acknowledged
    // before the earlier one, whose event 2 timed out (3 landed anyway).
    assert!(sink.report(1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(source.acknowledged(0).is_empty());
    assert!(sink.report(0));
    sink.hold_reports(false);
    assert!(until(Duration::from_secs(60), || source.pending(0).is_empty()).await);
    // Acknowledged strictly in order, each once.
    assert_eq!(positions(&source.acknowledged(0)), all_but(&[]));
    // After the failure the line restarted at 2, alone, then went on in order.
    let handed = handed_positions(&sink);
    assert_eq!(&handed[..6], &[1, 2, 3, 4, 5, 6]);
    assert_eq!(handed[6], 2, "the probe is the timed-out event: {handed:?}");
    let resent: Vec<i64> = handed[6..].to_vec();
    assert!(
        resent.windows(2).all(|w| w[0] < w[1]),
        "re-sent in order: {resent:?}"
    );
    assert_eq!(resent.last(), Some(&EVENTS));
    assert!(
        source.parked().is_empty(),
        "a transient failure is not poison"
    );
    assert_eq!(stop(run).await, Exit::Drained);
}

#[tokio::test(start_paused = true)]
async fn a_producer_reset_never_interleaves_sessions() {
    let (source, sink) = (source(), ScriptedSink::new());
    sink.hold_reports(true);
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Park),
        long_lease(),
    );
    assert!(until(Duration::from_secs(5), || sink.unreported() == 2).await);
    sink.purge();
    sink.hold_reports(false);
    assert!(until(Duration::from_secs(60), || source.pending(0).is_empty()).await);
    let handed = sink.handed();
    let first_new = handed
        .iter()
        .position(|h| h.session == 2)
        .expect("sent on the new session");
    assert_eq!(
        first_new, 6,
        "nothing more on the old session after the purge"
    );
    assert!(handed[first_new..].iter().all(|h| h.session == 2));
    // The new session starts at the oldest unacknowledged event, alone.
    assert_eq!(handed[first_new].position, 1);
    assert_eq!(positions(&source.acknowledged(0)), all_but(&[]));
    assert_eq!(sink.first_delivery_violations(position), 0);
    assert_eq!(stop(run).await, Exit::Drained);
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_past_the_lease_deadline_until_it_is_renewed() {
    let (source, sink) = (source(), ScriptedSink::new());
    source.set_lease_left(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(1);
    sink.hold_reports(true);
    let run = start(
        &source,
        &sink,
        config(2, 1, PoisonPolicy::Park),
        LeaseDeadline::new(deadline),
    );
    assert!(until(Duration::from_secs(5), || sink.unreported() == 1).await);
    tokio::time::sleep_until(deadline + Duration::from_millis(500)).await;
    sink.hold_reports(false);
    sink.report_all();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let handed = sink.handed();
    assert_eq!(
        handed.len(),
        2,
        "only the batch sent before the deadline: {handed:?}"
    );
    assert!(handed.iter().all(|h| h.at < deadline && h.at < h.deadline));
    // The database says the lease holds again: the worker goes on.
    source.set_lease_left(Duration::from_secs(5));
    assert!(until(Duration::from_secs(60), || source.pending(0).is_empty()).await);
    assert_eq!(positions(&source.acknowledged(0)), all_but(&[]));
    assert_eq!(stop(run).await, Exit::Drained);
}

#[tokio::test(start_paused = true)]
async fn a_batch_refused_for_its_size_blames_no_event() {
    let (source, sink) = (source(), ScriptedSink::new());
    sink.fail_batch(2, SinkError::TooLarge("MessageBatchTooLarge".into()));
    let run = start(
        &source,
        &sink,
        config(3, 1, PoisonPolicy::Park),
        long_lease(),
    );
    assert!(until(Duration::from_secs(60), || source.pending(0).is_empty()).await);
    assert!(source.parked().is_empty());
    assert_eq!(positions(&source.acknowledged(0)), all_but(&[]));
    assert_eq!(stop(run).await, Exit::Drained);
}

#[tokio::test(start_paused = true)]
async fn a_stale_claim_stops_the_worker() {
    let (source, sink) = (source(), ScriptedSink::new());
    source.set_epoch(0, 2);
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Park),
        long_lease(),
    );
    let (exit, _) = run.handle.await.expect("worker task");
    assert_eq!(exit, Exit::Fenced);
    assert!(sink.handed().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stop_lets_every_batch_in_flight_report_first() {
    let (source, sink) = (source(), ScriptedSink::new());
    sink.hold_reports(true);
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Park),
        long_lease(),
    );
    assert!(until(Duration::from_secs(5), || sink.unreported() == 2).await);
    run.signals.stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!run.handle.is_finished(), "waits for its batches");
    sink.report_all();
    let (exit, totals) = run.handle.await.expect("worker task");
    assert_eq!(exit, Exit::Drained);
    assert_eq!(totals.published, 6);
    assert_eq!(
        positions(&source.acknowledged(0)),
        (1..=6).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn store_failures_are_retried_without_loss_or_reorder() {
    let (source, sink) = (source(), ScriptedSink::new());
    source.fail_next(3);
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Park),
        long_lease(),
    );
    assert!(until(Duration::from_secs(60), || source.pending(0).is_empty()).await);
    assert_eq!(positions(&source.acknowledged(0)), all_but(&[]));
    assert_eq!(stop(run).await, Exit::Drained);
}

/// The gaps between consecutive injected failures, in milliseconds.
fn failure_gaps(source: &MemorySource) -> Vec<u128> {
    let at = source.failed_at();
    at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect()
}

#[tokio::test(start_paused = true)]
async fn fetch_retries_back_off_with_growing_bounds_and_start_over_after_a_success() {
    // With min 100 ms and max 1 s the k-th retry waits between 100 ms and
    // max(2, 2^k) × 100 ms, capped at 1 s: the bounds grow, the draws are
    // jittered inside them, and a fetch that succeeds starts over.
    let (source, sink) = (MemorySource::new(), ScriptedSink::new());
    source.set_epoch(0, 1);
    source.fail_next(6);
    let run = start(
        &source,
        &sink,
        config(3, 2, PoisonPolicy::Park),
        long_lease(),
    );
    assert!(until(Duration::from_secs(30), || source.failed_at().len() == 6).await);
    let bounds = [200, 400, 800, 1_000, 1_000];
    let gaps = failure_gaps(&source);
    assert_eq!(gaps.len(), bounds.len(), "{gaps:?}");
    for (gap, bound) in gaps.iter().zip(bounds) {
        assert!(
            (100..=bound + 1).contains(gap),
            "gaps {gaps:?} outside their bounds {bounds:?}"
        );
    }
    assert!(
        gaps.iter().zip(bounds).any(|(gap, bound)| *gap + 1 < bound),
        "every retry waited its ceiling, not the jittered delay it logged: {gaps:?}"
    );
    // The seventh fetch succeeds (an empty partition); then two more
    // failures after new events arrive retry from the smallest bound.
    tokio::time::sleep(Duration::from_secs(2)).await;
    source.fail_next(2);
    source.push(0, (1..=3).map(|p| test_event(p, "agg")));
    assert!(until(Duration::from_secs(30), || source.pending(0).is_empty()).await);
    let gaps = failure_gaps(&source);
    assert_eq!(gaps.len(), 7, "{gaps:?}");
    assert!((100..=201).contains(&gaps[6]), "not reset: {gaps:?}");
    assert_eq!(positions(&source.acknowledged(0)), vec![1, 2, 3]);
    assert_eq!(stop(run).await, Exit::Drained);
}
