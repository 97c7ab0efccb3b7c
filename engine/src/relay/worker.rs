//! The loop that relays one partition while its claim holds.
//!
//! Fetch a batch, hand it to the sink, and fetch the next while the broker
//! works, up to `max_inflight_batches`. Batches are reported oldest first;
//! each is acknowledged to the reader only for the events delivered before
//! the partition's first failure.
//!
//! **Stop the line.** Once any event fails (refused at once or by the
//! broker, timed out, purged by a producer reset, lost with the connection,
//! or not sent because the lease's deadline passed), the worker sends
//! nothing more and acknowledges nothing at or after that event. When every
//! batch in flight has reported it rewinds the reader to the oldest
//! unacknowledged event and *probes*: that event goes alone, after a
//! backoff. Only when the probe is delivered do batches flow again. An event
//! refused for good when sent alone is poison: after `max_attempts` probes
//! it is parked (policy `park`) and the partition goes on, or (policy
//! `block`) probed for ever while nothing after it is sent. Events that were
//! already in flight when the failure happened, and were delivered, are sent
//! again after it (at most the in-flight window).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::{Counter, Histogram};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{PoisonPolicy, RelayConfig};
use crate::error::{SinkError, StoreError};
use crate::event::OutboxEvent;
use crate::ops::metrics as m;
use crate::relay::backoff::Backoff;
use crate::relay::window::{settle, InFlight, Window};
use crate::relay::{Ack, Claim, ClaimReader, DeadLetters, Doorbell, LeaseDeadline, Parked, Read};
use crate::sink::{Delivery, DeliveryReport, SendOptions, Sink};

/// Why a worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop; everything in flight had reported first.
    Drained,
    /// The store refused an acknowledgement: another owner has the partition.
    Fenced,
    /// The claim was revoked (lease lost); in-flight batches were abandoned.
    Revoked,
}

/// The signals a worker obeys.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Stop fetching, let what is in flight report, then exit.
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
    pub parked: u64,
}

/// A batch in flight, besides its ids: its delivery, when it was sent, its
/// span, and the event itself when it went alone as a probe.
struct Batch {
    delivery: Delivery,
    at: Instant,
    span: tracing::Span,
    probe: Option<OutboxEvent>,
}

/// A failure that stopped the line.
#[derive(Debug)]
struct Failure {
    error: SinkError,
    /// The event, when it had been sent alone: only then is it to blame.
    alone: Option<OutboxEvent>,
    /// Whether the failed send held more than one event.
    batch: bool,
}

/// The state of the line.
#[derive(Debug, Default)]
struct Line {
    /// Send nothing more; resolve once every batch in flight has reported.
    halted: bool,
    /// The first failure in the partition's order seen in a report: nothing
    /// from it on is acknowledged.
    blocked: Option<Failure>,
    /// A send that handed nothing over, after every batch in flight.
    tail: Option<Failure>,
    /// The next send is the oldest unacknowledged event alone.
    probing: bool,
}

impl Line {
    fn refuse_send(&mut self, failure: Failure) {
        self.halted = true;
        if self.tail.is_none() {
            self.tail = Some(failure);
        }
    }
}

/// Metric handles of one partition, made once (no label building per batch).
struct Meters {
    published: Counter,
    failed: Counter,
    store_errors: Counter,
    dead_letters: Counter,
    probes: Counter,
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
            dead_letters: metrics::counter!(m::DEAD_LETTERS, "partition" => p.clone()),
            probes: metrics::counter!(m::LINE_STOPS, "partition" => p),
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
    error: &StoreError,
) -> Duration {
    meters.store_errors.increment(1);
    let delay = backoff.next_delay();
    let attempt = backoff.attempt();
    if error.is_retriable() {
        tracing::warn!(partition, %error, attempt, retry_in = ?delay, "{what} failed");
    } else {
        tracing::error!(partition, %error, attempt, retry_in = ?delay, "{what} failed and will fail again until the cause is fixed");
    }
    delay
}

/// Waits until the doorbell rings; false if it never will again.
async fn ring(doorbell: &mut Option<Doorbell>) -> bool {
    match doorbell {
        Some(bell) => bell.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// What the worker needs besides its ports.
pub struct WorkerSpec {
    pub claim: Claim,
    pub node_id: String,
    pub config: RelayConfig,
    /// Until when the lease holds; renewed by the supervisor and by fetches.
    pub lease: LeaseDeadline,
    /// Nothing is sent before this (a previous owner's messages may still
    /// be landing until then).
    pub not_before: Instant,
    /// Rings when the partition may have new events.
    pub doorbell: Option<Doorbell>,
}

pub struct Worker<R, K, D> {
    claim: Claim,
    reader: R,
    sink: Arc<K>,
    dead: Arc<D>,
    config: RelayConfig,
    lease: LeaseDeadline,
    not_before: Instant,
    doorbell: Option<Doorbell>,
    node_id: String,
    totals: Totals,
    /// Paces the retries of a stopped line (probes, parking).
    backoff: Backoff,
    /// Paces fetches after store failures; reset by a fetch that succeeds.
    store_backoff: Backoff,
    meters: Meters,
    /// Tries of events refused for good when sent alone: id -> (tries, first failure).
    attempts: HashMap<Uuid, (u32, SystemTime)>,
}

impl<R: ClaimReader, K: Sink, D: DeadLetters> Worker<R, K, D> {
    pub fn new(spec: WorkerSpec, reader: R, sink: Arc<K>, dead: Arc<D>) -> Self {
        let backoff = Backoff::new(
            Duration::from_millis(spec.config.retry_backoff_min_ms),
            Duration::from_millis(spec.config.retry_backoff_max_ms),
        );
        Self {
            claim: spec.claim,
            reader,
            sink,
            dead,
            meters: Meters::new(spec.claim.partition),
            config: spec.config,
            lease: spec.lease,
            not_before: spec.not_before,
            doorbell: spec.doorbell,
            node_id: spec.node_id,
            totals: Totals::default(),
            store_backoff: backoff.clone(),
            backoff,
            attempts: HashMap::new(),
        }
    }

    /// Relays until told to stop or the claim is lost.
    pub async fn run(mut self, signals: Signals) -> (Exit, Totals) {
        let exit = self.relay(&signals).await;
        if exit == Exit::Drained {
            if let Err(error) = self.reader.flush().await {
                tracing::warn!(partition = self.claim.partition, %error, "could not store the last progress mark; its events may be sent again");
            }
        }
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
        let mut window: Window<Batch> = Window::new(self.config.max_inflight_batches);
        let mut line = Line::default();
        // When the next fetch may run; pushed out when idle or backing off.
        let mut next_fetch = self.not_before;
        // Events per send; halved after a batch was refused for its size.
        let mut limit = self.config.batch_size.max(1);
        // A batch fetched together with the last acknowledgement.
        let mut prefetched: Option<Vec<OutboxEvent>> = None;
        // Caught up: the next fetch waits for the doorbell (or `idle_poll`).
        let mut idle = false;
        loop {
            if signals.revoke.is_cancelled() {
                return Exit::Revoked;
            }
            let stopping = signals.stop.is_cancelled();
            if window.is_empty() && line.halted {
                prefetched = None;
                if stopping {
                    return Exit::Drained;
                }
                match self.resolve(&mut line, &mut limit, signals).await {
                    Ok(delay) => next_fetch = next_fetch.max(Instant::now() + delay),
                    Err(exit) => return exit,
                }
            }
            if stopping && window.is_empty() {
                return Exit::Drained;
            }
            let room = if line.probing {
                window.is_empty()
            } else {
                !window.is_full()
            };
            let may_send = !stopping && !line.halted && room;
            if may_send && (prefetched.is_some() || Instant::now() >= next_fetch) {
                let want = if line.probing { 1 } else { limit };
                let events = match prefetched.take() {
                    Some(events) => Ok(events),
                    None => match self.fetch(want, signals).await {
                        Ok(events) => events,
                        Err(exit) => return exit,
                    },
                };
                match events {
                    Err(retry_in) => {
                        // The store failed (logged with this delay).
                        next_fetch = Instant::now() + retry_in;
                    }
                    Ok(events) if events.is_empty() => {
                        idle = true;
                        next_fetch = Instant::now() + self.idle_wait();
                    }
                    Ok(events) => {
                        let full = events.len() >= want;
                        self.send(events, &mut window, &mut line).await;
                        if !full {
                            // Caught up: wait for writers.
                            idle = true;
                            next_fetch = Instant::now() + self.idle_wait();
                        } else {
                            idle = false;
                        }
                        continue;
                    }
                }
            }

            // Wait for the oldest batch, the next fetch, or a signal.
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
                    let fetch_next = (!signals.stop.is_cancelled()
                        && !line.halted
                        && !line.probing
                        && prefetched.is_none()
                        && Instant::now() >= next_fetch)
                        .then_some(limit);
                    match self.on_report(batch, report, &mut line, &mut limit, fetch_next, signals).await {
                        Ok(next) => {
                            match next {
                                Some(events) if events.is_empty() => {
                                    idle = true;
                                    next_fetch = Instant::now() + self.idle_wait();
                                }
                                Some(events) => prefetched = Some(events),
                                None => {}
                            }
                        }
                        Err(exit) => return exit,
                    }
                }
                _ = signals.stop.cancelled(), if !stopping => {}
                _ = tokio::time::sleep_until(next_fetch), if may_send => {}
                rang = ring(&mut self.doorbell), if may_send && idle => {
                    if rang {
                        idle = false;
                        next_fetch = next_fetch.min(Instant::now());
                    } else {
                        // The source stopped ringing: poll.
                        self.doorbell = None;
                    }
                }
            }
        }
    }

    /// How long a caught-up worker waits before it looks again.
    fn idle_wait(&self) -> Duration {
        if self.doorbell.is_some() {
            self.config.idle_poll()
        } else {
            self.config.poll_interval()
        }
    }

    /// Fetches up to `limit` events; `Ok(Err(delay))` if the store failed
    /// (logged, with how long to wait before the next try). Refreshes the
    /// lease deadline from what the store said of the lease.
    async fn fetch(
        &mut self,
        limit: usize,
        signals: &Signals,
    ) -> Result<Result<Vec<OutboxEvent>, Duration>, Exit> {
        let started = Instant::now();
        let read = tokio::select! {
            biased;
            _ = signals.revoke.cancelled() => return Err(Exit::Revoked),
            r = self.reader.fetch(limit) => r,
        };
        self.meters.fetch.record(started.elapsed().as_secs_f64());
        match read {
            Ok(read) => {
                self.store_backoff.reset();
                self.take_read(read, started).map(Ok)
            }
            Err(error) => Ok(Err(store_failure(
                &self.meters,
                &mut self.store_backoff,
                self.claim.partition,
                "fetch",
                &error,
            ))),
        }
    }

    fn take_read(&mut self, read: Read, started: Instant) -> Result<Vec<OutboxEvent>, Exit> {
        match read {
            Read::Events { events, lease_left } => {
                self.lease.extend(started + lease_left);
                Ok(events)
            }
            Read::Fenced => {
                tracing::warn!(
                    partition = self.claim.partition,
                    epoch = self.claim.epoch,
                    "fetch refused: the partition has a newer owner"
                );
                Err(Exit::Fenced)
            }
        }
    }

    /// Hands a batch to the sink, unless the lease's deadline has passed.
    async fn send(
        &mut self,
        events: Vec<OutboxEvent>,
        window: &mut Window<Batch>,
        line: &mut Line,
    ) {
        let partition = self.claim.partition;
        let probe = (line.probing && events.len() == 1).then(|| events[0].clone());
        if self.lease.is_past() {
            tracing::debug!(
                partition,
                "lease deadline passed; not sending until it is renewed"
            );
            line.refuse_send(Failure {
                error: SinkError::Transient(
                    "the lease's deadline passed before the batch was sent".into(),
                ),
                alone: None,
                batch: events.len() > 1,
            });
            return;
        }
        self.meters.batch_size.record(events.len() as f64);
        let span = tracing::debug_span!(
            "batch",
            partition,
            epoch = self.claim.epoch,
            size = events.len(),
            first = events[0].position,
            probe = probe.is_some(),
        );
        let options = SendOptions {
            deadline: self.lease.get(),
            session: window.session(),
        };
        let at = Instant::now();
        match self
            .sink
            .send(&events, options)
            .instrument(span.clone())
            .await
        {
            Ok(sent) => {
                if sent.accepted < events.len() {
                    // The report will name the refusal; send nothing more.
                    line.halted = true;
                }
                self.totals.batches += 1;
                window.push(InFlight {
                    ids: events.iter().map(|e| e.id).collect(),
                    session: sent.session,
                    delivery: Batch {
                        delivery: sent.delivery,
                        at,
                        span,
                        probe,
                    },
                });
            }
            Err(error) => {
                span.in_scope(|| tracing::warn!(partition, %error, "could not send batch"));
                line.refuse_send(Failure {
                    error,
                    alone: probe,
                    batch: events.len() > 1,
                });
            }
        }
    }

    /// Settles the oldest batch: acknowledges its delivered prefix unless
    /// the line is blocked by an earlier failure, and blocks the line at its
    /// own first failure. Returns a batch fetched with the acknowledgement.
    async fn on_report(
        &mut self,
        batch: InFlight<Batch>,
        report: Result<DeliveryReport, SinkError>,
        line: &mut Line,
        limit: &mut usize,
        fetch_next: Option<usize>,
        signals: &Signals,
    ) -> Result<Option<Vec<OutboxEvent>>, Exit> {
        let partition = self.claim.partition;
        let InFlight {
            ids, delivery: b, ..
        } = batch;
        self.meters.send.record(b.at.elapsed().as_secs_f64());
        let report = report.unwrap_or_else(|e| DeliveryReport {
            failed: ids.iter().map(|id| (*id, e.clone())).collect(),
        });
        let settled = settle(&ids, report);
        let acknowledge = if line.blocked.is_none() {
            settled.delivered_prefix
        } else {
            0
        };
        if let Some((at, error)) = settled.failure {
            line.halted = true;
            if line.blocked.is_none() {
                let unacked = ids.len() - at;
                self.totals.failed += unacked as u64;
                self.meters.failed.increment(unacked as u64);
                self.meters.probes.increment(1);
                b.span.in_scope(|| {
                    tracing::warn!(
                        partition,
                        failed_at = at,
                        of = ids.len(),
                        %error,
                        "broker did not acknowledge an event; stopping the line until it is resolved"
                    )
                });
                line.blocked = Some(Failure {
                    error,
                    alone: b.probe,
                    batch: ids.len() > 1,
                });
            }
        } else if b.probe.is_some() && line.blocked.is_none() {
            // The probe went through: the line flows again.
            line.probing = false;
            self.backoff.reset();
            *limit = (*limit * 2).min(self.config.batch_size.max(1));
            if let Some(p) = &b.probe {
                self.attempts.remove(&p.id);
            }
            tracing::info!(partition, "probe delivered; resuming");
        }
        if acknowledge == 0 {
            return Ok(None);
        }
        let fetch_next = if line.halted { None } else { fetch_next };
        let started = Instant::now();
        let next = self
            .acknowledge(acknowledge, fetch_next, signals)
            .instrument(b.span)
            .await?;
        self.meters.ack.record(started.elapsed().as_secs_f64());
        self.meters.published.increment(acknowledge as u64);
        self.totals.published += acknowledge as u64;
        match next {
            Some(read) => self.take_read(read, started).map(Some),
            None => Ok(None),
        }
    }

    /// Once the window is empty after a failure: counts the try of an event
    /// refused alone, parks it when its tries are used up (policy `park`),
    /// rewinds the reader and switches to probing. Returns how long to wait
    /// before the next send.
    async fn resolve(
        &mut self,
        line: &mut Line,
        limit: &mut usize,
        signals: &Signals,
    ) -> Result<Duration, Exit> {
        let partition = self.claim.partition;
        line.halted = false;
        let failure = line.blocked.take().or(line.tail.take());
        let mut delay = Duration::ZERO;
        let mut parked = false;
        if let Some(f) = failure {
            delay = self.backoff.next_delay();
            match (f.alone, f.error.is_retriable()) {
                (Some(event), false) => {
                    let entry = self
                        .attempts
                        .entry(event.id)
                        .or_insert((0, SystemTime::now()));
                    entry.0 += 1;
                    let (attempts, first_failed_at) = *entry;
                    if attempts >= self.config.max_attempts {
                        match self.config.poison_policy {
                            PoisonPolicy::Block => tracing::error!(
                                partition,
                                position = event.position,
                                id = %event.id,
                                attempts,
                                error = %f.error,
                                "partition blocked: the broker refuses this event for good \
                                 (poison_policy = block); nothing after it is sent until the \
                                 cause is fixed (or switch to park)"
                            ),
                            PoisonPolicy::Park => {
                                let info = Parked {
                                    error: f.error.to_string(),
                                    attempts,
                                    first_failed_at,
                                    node_id: self.node_id.clone(),
                                };
                                parked = self.park(&event, &info, signals).await?;
                                if parked {
                                    delay = Duration::ZERO;
                                }
                            }
                        }
                    } else {
                        tracing::warn!(partition, position = event.position, attempts, error = %f.error, retry_in = ?delay, "event refused when sent alone");
                    }
                }
                (_, _) => {
                    if f.batch && matches!(f.error, SinkError::TooLarge(_)) {
                        *limit = (*limit / 2).max(1);
                        tracing::warn!(
                            partition,
                            limit = *limit,
                            "a batch was refused for its size; sending smaller batches"
                        );
                    }
                }
            }
        }
        self.reader.rewind();
        line.probing = !parked;
        Ok(delay)
    }

    /// Parks the probed event (the oldest outstanding one) and acknowledges
    /// it. Returns whether it was parked; on a store failure it stays and is
    /// tried again at its next failure.
    async fn park(
        &mut self,
        event: &OutboxEvent,
        info: &Parked,
        signals: &Signals,
    ) -> Result<bool, Exit> {
        let partition = self.claim.partition;
        match self.dead.park(&self.claim, event, info).await {
            Ok(Ack::Fenced) => Err(Exit::Fenced),
            Ok(Ack::Done) => {
                self.acknowledge(1, None, signals).await?;
                self.attempts.remove(&event.id);
                self.meters.dead_letters.increment(1);
                self.totals.parked += 1;
                tracing::warn!(partition, position = event.position, id = %event.id, attempts = info.attempts, error = %info.error, "event parked in the dead letters");
                Ok(true)
            }
            Err(error) => {
                store_failure(
                    &self.meters,
                    &mut self.backoff,
                    partition,
                    "parking",
                    &error,
                );
                Ok(false)
            }
        }
    }

    /// Acknowledges the oldest `count` outstanding events, retrying while the
    /// store is unreachable. With `fetch_next`, the first try also fetches
    /// the next batch. Returns `Err` with the exit if the worker must stop.
    async fn acknowledge(
        &mut self,
        count: usize,
        fetch_next: Option<usize>,
        signals: &Signals,
    ) -> Result<Option<Read>, Exit> {
        let mut backoff = self.backoff.clone();
        backoff.reset();
        let mut fetch_next = fetch_next;
        loop {
            let result = tokio::select! {
                biased;
                _ = signals.revoke.cancelled() => return Err(Exit::Revoked),
                r = self.reader.acknowledge(count, fetch_next) => r,
            };
            match result {
                Ok((Ack::Done, next)) => return Ok(next),
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
}
