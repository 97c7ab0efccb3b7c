//! The loop that relays one partition while its claim holds.
//!
//! Fetch a batch (leaving out what is in flight), hand it to the sink, and
//! fetch the next while the broker works, up to `max_inflight_batches`.
//! Batches complete oldest first; each is acknowledged to the source (with
//! the claim's epoch) only for the events the broker acknowledged. Failed
//! events stay in the source and are fetched again after a backoff.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{PoisonPolicy, RelayConfig};
use crate::error::SinkError;
use crate::ops::metrics as m;
use crate::relay::backoff::Backoff;
use crate::relay::window::{settle, Window};
use crate::relay::{Ack, Claim, EventSource, Parked};
use crate::sink::{Delivery, DeliveryReport, Sink};

/// Why a worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop; everything in flight was settled first.
    Drained,
    /// The store refused an acknowledgement: another owner has the partition.
    Fenced,
    /// The claim was revoked (lease lost); in-flight batches were abandoned.
    Revoked,
}

/// The signals a worker obeys.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Stop fetching, settle what is in flight, then exit.
    pub stop: CancellationToken,
    /// Exit now, acknowledging nothing more.
    pub revoke: CancellationToken,
}

/// Running totals of one worker, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub published: u64,
    pub failed: u64,
    pub batches: u64,
}

/// A batch handed to the sink: its delivery, when it was sent, its span.
struct Sent {
    delivery: Delivery,
    at: Instant,
    span: tracing::Span,
}

/// Metric handles of one partition, made once (no label building per batch).
struct Meters {
    published: Counter,
    failed: Counter,
    store_errors: Counter,
    vacuums: Counter,
    dead_letters: Counter,
    batch_size: Histogram,
    fetch: Histogram,
    send: Histogram,
    ack: Histogram,
}

impl Meters {
    fn new(partition: u32) -> Self {
        let p = partition.to_string();
        Self {
            published: metrics::counter!(m::EVENTS_PUBLISHED, "partition" => p.clone()),
            failed: metrics::counter!(m::EVENTS_FAILED, "partition" => p.clone()),
            store_errors: metrics::counter!(m::STORE_ERRORS, "partition" => p.clone()),
            vacuums: metrics::counter!(m::VACUUMS, "partition" => p.clone()),
            dead_letters: metrics::counter!(m::DEAD_LETTERS, "partition" => p),
            batch_size: metrics::histogram!(m::BATCH_SIZE),
            fetch: metrics::histogram!(m::FETCH_SECONDS),
            send: metrics::histogram!(m::SEND_SECONDS),
            ack: metrics::histogram!(m::ACK_SECONDS),
        }
    }
}

/// Counts and logs a failed store operation; returns how long to wait before
/// trying again. Every failure is retried (the database may come back, an
/// operator may fix a schema), but one that will not go away by itself is
/// logged as an error that needs an operator.
fn store_failure(
    meters: &Meters,
    backoff: &mut Backoff,
    partition: u32,
    what: &str,
    error: &crate::error::StoreError,
) -> Duration {
    meters.store_errors.increment(1);
    let delay = backoff.next_delay();
    if error.is_retriable() {
        tracing::warn!(partition, %error, retry_in = ?delay, "{what} failed");
    } else {
        tracing::error!(partition, %error, retry_in = ?delay, "{what} failed and will fail again until the cause is fixed");
    }
    delay
}

pub struct Worker<S, K> {
    claim: Claim,
    source: Arc<S>,
    sink: Arc<K>,
    config: RelayConfig,
    totals: Totals,
    backoff: Backoff,
    deleted_since_vacuum: u64,
    last_vacuum: Instant,
    vacuum: Option<JoinHandle<()>>,
    meters: Meters,
    node_id: String,
    /// Events the broker refused for good: position -> (tries, first failure).
    poison: std::collections::HashMap<i64, (u32, std::time::SystemTime)>,
}

impl<S: EventSource, K: Sink> Worker<S, K> {
    pub fn new(
        claim: Claim,
        node_id: &str,
        source: Arc<S>,
        sink: Arc<K>,
        config: RelayConfig,
    ) -> Self {
        let backoff = Backoff::new(
            Duration::from_millis(config.retry_backoff_min_ms),
            Duration::from_millis(config.retry_backoff_max_ms),
        );
        Self {
            claim,
            source,
            sink,
            config,
            totals: Totals::default(),
            backoff,
            deleted_since_vacuum: 0,
            last_vacuum: Instant::now(),
            vacuum: None,
            meters: Meters::new(claim.partition),
            node_id: node_id.to_string(),
            poison: std::collections::HashMap::new(),
        }
    }

    /// Relays until told to stop or the claim is lost.
    pub async fn run(mut self, signals: Signals) -> (Exit, Totals) {
        let exit = self.relay(&signals).await;
        tracing::info!(
            partition = self.claim.partition,
            epoch = self.claim.epoch,
            ?exit,
            published = self.totals.published,
            "partition worker stopped"
        );
        (exit, self.totals)
    }

    async fn relay(&mut self, signals: &Signals) -> Exit {
        let partition = self.claim.partition;
        let mut window: Window<Sent> = Window::new(self.config.max_inflight_batches);
        // When the next fetch may run; pushed out when idle or backing off.
        let mut next_fetch = Instant::now();
        // A batch fetched together with the last acknowledgement.
        let mut prefetched: Option<Vec<crate::event::OutboxEvent>> = None;
        loop {
            if signals.revoke.is_cancelled() {
                return Exit::Revoked;
            }
            let stopping = signals.stop.is_cancelled();
            if stopping && window.is_empty() {
                return Exit::Drained;
            }
            if stopping {
                prefetched = None;
            }
            if !stopping
                && !window.is_full()
                && (prefetched.is_some() || Instant::now() >= next_fetch)
            {
                let fetched = match prefetched.take() {
                    Some(events) => Ok(events),
                    None => {
                        let started = Instant::now();
                        let r = tokio::select! {
                            biased;
                            _ = signals.revoke.cancelled() => return Exit::Revoked,
                            r = self.source.fetch(&self.claim, self.config.batch_size, window.positions()) => r,
                        };
                        self.meters.fetch.record(started.elapsed().as_secs_f64());
                        r
                    }
                };
                match fetched {
                    Ok(events) if events.is_empty() => {
                        next_fetch = Instant::now() + self.config.poll_interval();
                    }
                    Ok(events) => {
                        let full = events.len() >= self.config.batch_size;
                        self.meters.batch_size.record(events.len() as f64);
                        let span = tracing::debug_span!(
                            "batch",
                            partition,
                            epoch = self.claim.epoch,
                            size = events.len(),
                            first = events[0].position,
                        );
                        let at = Instant::now();
                        match self.sink.send(&events).instrument(span.clone()).await {
                            Ok(delivery) => {
                                window.push(&events, Sent { delivery, at, span });
                                self.totals.batches += 1;
                                if !full {
                                    // Caught up: give writers a moment.
                                    next_fetch = Instant::now() + self.config.poll_interval();
                                }
                            }
                            Err(error) => {
                                let delay = self.backoff.next_delay();
                                tracing::warn!(partition, %error, retry_in = ?delay, "could not send batch");
                                next_fetch = Instant::now() + delay;
                            }
                        }
                        continue;
                    }
                    Err(error) => {
                        let delay = store_failure(
                            &self.meters,
                            &mut self.backoff,
                            partition,
                            "fetch",
                            &error,
                        );
                        next_fetch = Instant::now() + delay;
                    }
                }
            }

            // Wait for the oldest batch, the next fetch, or a signal.
            let may_fetch_later = !stopping && !window.is_full();
            tokio::select! {
                biased;
                _ = signals.revoke.cancelled() => return Exit::Revoked,
                report = async {
                    match window.front_mut() {
                        Some(b) => (&mut b.delivery.delivery).await,
                        None => std::future::pending().await,
                    }
                }, if !window.is_empty() => {
                    let Some(batch) = window.pop_front() else { continue };
                    self.meters.send.record(batch.delivery.at.elapsed().as_secs_f64());
                    let span = batch.delivery.span.clone();
                    let report = report.unwrap_or_else(|e| DeliveryReport {
                        failed: batch.ids.iter().map(|id| (*id, e.clone())).collect(),
                    });
                    let settled = settle(&batch.positions, &batch.ids, report);
                    if let Some((_, error)) = settled.failed.first() {
                        let delay = self.backoff.next_delay();
                        span.in_scope(|| tracing::warn!(
                            partition,
                            failed = settled.failed.len(),
                            %error,
                            retry_in = ?delay,
                            "broker did not acknowledge events; they stay in the outbox"
                        ));
                        self.totals.failed += settled.failed.len() as u64;
                        self.meters.failed.increment(settled.failed.len() as u64);
                        next_fetch = next_fetch.max(Instant::now() + delay);
                    } else {
                        self.backoff.reset();
                    }
                    let permanent: Vec<(i64, SinkError)> = settled
                        .failed
                        .into_iter()
                        .filter(|(_, e)| !e.is_retriable())
                        .collect();
                    if !permanent.is_empty() {
                        if let Some(exit) = self.handle_poison(permanent).instrument(span.clone()).await {
                            return exit;
                        }
                    }
                    if !self.poison.is_empty() {
                        for p in &settled.acked {
                            self.poison.remove(p);
                        }
                    }
                    if !settled.acked.is_empty() {
                        // Fetch the next batch in the same round trip when one is due.
                        let fetch_next = (!signals.stop.is_cancelled() && Instant::now() >= next_fetch)
                            .then(|| window.positions().to_vec());
                        let started = Instant::now();
                        match self.acknowledge(&settled.acked, fetch_next.as_deref(), signals).instrument(span).await {
                            Err(exit) => return exit,
                            Ok(next) => {
                                self.meters.ack.record(started.elapsed().as_secs_f64());
                                self.meters.published.increment(settled.acked.len() as u64);
                                self.totals.published += settled.acked.len() as u64;
                                match next {
                                    Some(events) if events.is_empty() => {
                                        next_fetch = Instant::now() + self.config.poll_interval();
                                    }
                                    Some(events) => prefetched = Some(events),
                                    None => {}
                                }
                            }
                        }
                    }
                    self.maybe_vacuum();
                }
                _ = signals.stop.cancelled(), if !stopping => {}
                _ = tokio::time::sleep_until(next_fetch), if may_fetch_later => {}
            }
        }
    }

    /// Counts a try of each event the broker refused for good; once an event
    /// used up its tries, parks it or (policy `block`) says loudly that the
    /// partition is stuck on it.
    async fn handle_poison(&mut self, failed: Vec<(i64, SinkError)>) -> Option<Exit> {
        let partition = self.claim.partition;
        for (position, error) in failed {
            let entry = self
                .poison
                .entry(position)
                .or_insert((0, std::time::SystemTime::now()));
            entry.0 += 1;
            let (attempts, first_failed_at) = *entry;
            if attempts < self.config.max_attempts {
                continue;
            }
            match self.config.poison_policy {
                PoisonPolicy::Block => {
                    tracing::error!(
                        partition,
                        position,
                        attempts,
                        %error,
                        "partition blocked: the broker refuses this event for good \
                         (poison_policy = block); fix the cause or switch to park"
                    );
                }
                PoisonPolicy::Park => {
                    let parked = Parked {
                        position,
                        error: error.to_string(),
                        attempts,
                        first_failed_at,
                        node_id: self.node_id.clone(),
                    };
                    match self.source.park(&self.claim, &parked).await {
                        Ok(Ack::Done { removed }) => {
                            self.poison.remove(&position);
                            self.deleted_since_vacuum += removed;
                            self.meters.dead_letters.increment(removed);
                            tracing::warn!(partition, position, attempts, %error, "event parked in outbox_dead_letters");
                        }
                        Ok(Ack::Fenced) => return Some(Exit::Fenced),
                        Err(error) => {
                            // Tried again at the event's next failure.
                            let delay = store_failure(
                                &self.meters,
                                &mut self.backoff,
                                partition,
                                "parking",
                                &error,
                            );
                            tracing::debug!(position, retry_in = ?delay, "parking deferred");
                        }
                    }
                }
            }
        }
        None
    }

    /// Acknowledges `positions`, retrying while the store is unreachable.
    /// With `fetch_next` (the positions still in flight), the first try also
    /// fetches the next batch in the same round trip and returns it.
    /// Returns `Err` with the exit if the worker must stop.
    async fn acknowledge(
        &mut self,
        positions: &[i64],
        fetch_next: Option<&[i64]>,
        signals: &Signals,
    ) -> Result<Option<Vec<crate::event::OutboxEvent>>, Exit> {
        let mut backoff = self.backoff.clone();
        backoff.reset();
        let mut fetch_next = fetch_next;
        loop {
            let result = tokio::select! {
                biased;
                _ = signals.revoke.cancelled() => return Err(Exit::Revoked),
                r = async {
                    match fetch_next {
                        Some(in_flight) => self
                            .source
                            .acknowledge_and_fetch(&self.claim, positions, self.config.batch_size, in_flight)
                            .await
                            .map(|(ack, events)| (ack, Some(events))),
                        None => self.source.acknowledge(&self.claim, positions).await.map(|a| (a, None)),
                    }
                } => r,
            };
            match result {
                Ok((Ack::Done { removed }, next)) => {
                    self.deleted_since_vacuum += removed;
                    return Ok(next);
                }
                Ok((Ack::Fenced, _)) => {
                    tracing::warn!(
                        partition = self.claim.partition,
                        epoch = self.claim.epoch,
                        "acknowledgement refused: the partition has a newer owner"
                    );
                    return Err(Exit::Fenced);
                }
                Err(error) => {
                    // Retry the acknowledgement alone; fetching can wait.
                    fetch_next = None;
                    let delay = store_failure(
                        &self.meters,
                        &mut backoff,
                        self.claim.partition,
                        "acknowledgement",
                        &error,
                    );
                    tokio::select! {
                        _ = signals.revoke.cancelled() => return Err(Exit::Revoked),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Starts a vacuum of the partition in the background when enough was
    /// deleted since the last one, so dead rows do not pile up.
    fn maybe_vacuum(&mut self) {
        if self.vacuum.as_ref().is_some_and(|v| !v.is_finished()) || self.deleted_since_vacuum == 0
        {
            return;
        }
        let interval = self.config.vacuum_interval_ms;
        let due = self.deleted_since_vacuum >= self.config.vacuum_threshold_rows
            || (interval > 0 && self.last_vacuum.elapsed() >= Duration::from_millis(interval));
        if !due {
            return;
        }
        let source = Arc::clone(&self.source);
        let partition = self.claim.partition;
        let deleted = self.deleted_since_vacuum;
        self.deleted_since_vacuum = 0;
        self.meters.vacuums.increment(1);
        self.last_vacuum = Instant::now();
        self.vacuum = Some(tokio::spawn(async move {
            let started = Instant::now();
            match source.maintain(partition).await {
                Ok(()) => {
                    tracing::debug!(partition, deleted, took = ?started.elapsed(), "vacuumed")
                }
                Err(error) => tracing::warn!(partition, %error, "vacuum failed"),
            }
        }));
    }
}
