//! The slot keeper every CDC-capable node runs: it takes the slot's lease
//! when it is free (while some partition is in CDC mode), runs the
//! replication stream while it holds it, recovers a missing or lost slot,
//! moves the marks of streaming partitions as the slot is confirmed, keeps
//! an idle slot advancing with heartbeats, and reports the slot's health.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cdc::hub::Hub;
use crate::cdc::slot::{lsn_text, SlotState, SlotStore};
use crate::cdc::snapshot::Snapshot;
use crate::cdc::stream::{self, seconds_since_pg_epoch, StreamSpec};
use crate::cluster::Member;
use crate::error::StoreError;
use crate::ops::metrics as m;

/// What the keeper needs.
pub struct Keeper {
    pub store: SlotStore,
    pub hub: Arc<Hub>,
    pub member: Member,
    pub spec: StreamSpec,
    /// The slot lease's time to live, and how often it is renewed.
    pub ttl: Duration,
    pub tick: Duration,
    /// How often a heartbeat pairs a snapshot with a WAL position.
    pub heartbeat: Duration,
}

const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

struct Stream {
    stop: CancellationToken,
    handle: JoinHandle<Result<(), stream::StreamError>>,
}

impl Keeper {
    pub async fn run(self, stop: CancellationToken) {
        let mut held: Option<i64> = None;
        let mut stream: Option<Stream> = None;
        // (snapshot, WAL position after it), oldest first.
        let mut pairs: VecDeque<(Snapshot, u64)> = VecDeque::new();
        let mut tick = tokio::time::interval(self.tick.min(self.heartbeat));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_lease = tokio::time::Instant::now() - self.tick;
        let mut last_beat = tokio::time::Instant::now() - self.heartbeat;
        // When the slot's lease was last known held: the start of the last
        // acquisition or renewal that succeeded.
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if last_lease.elapsed() >= self.tick {
                last_lease = tokio::time::Instant::now();
                let step = self
                    .lease_step(&mut held, &mut stream, &mut pairs, &mut renewed)
                    .await;
                if let Err(error) = step {
                    tracing::warn!(%error, "CDC slot step failed; retrying");
                }
                if held.is_some() && renewed.elapsed() >= self.ttl {
                    // The lease expired unrenewed: another node may take the
                    // slot. And a server shutting down waits for this
                    // stream: its walsender waits for a confirmation that
                    // needs acknowledgements the server no longer accepts.
                    tracing::warn!(slot = %self.store.slot, "could not renew the slot's lease within its time to live; stopping the stream");
                    held = None;
                    stop_stream(&mut stream).await;
                    pairs.clear();
                }
            }
            if held.is_some() && last_beat.elapsed() >= self.heartbeat {
                last_beat = tokio::time::Instant::now();
                if let Err(error) = self.beat(&mut pairs).await {
                    tracing::debug!(%error, "CDC heartbeat failed");
                }
            }
            metrics::gauge!(m::CDC_SLOT_HELD).set(if held.is_some() { 1.0 } else { 0.0 });
            metrics::gauge!(m::CDC_QUEUED_EVENTS).set(self.hub.queued() as f64);
            let lag = self
                .hub
                .oldest_unconfirmed_us()
                .map_or(0.0, seconds_since_pg_epoch);
            metrics::gauge!(m::CDC_CONFIRMED_LAG_SECONDS).set(lag);
        }
        if let Some(s) = stream.take() {
            s.stop.cancel();
            let _ = s.handle.await;
        }
        if let Some(epoch) = held {
            if let Err(error) = self.store.release(&self.member, epoch).await {
                tracing::warn!(%error, "could not release the slot's lease; it will expire");
            }
        }
    }

    async fn lease_step(
        &self,
        held: &mut Option<i64>,
        stream: &mut Option<Stream>,
        pairs: &mut VecDeque<(Snapshot, u64)>,
        renewed: &mut tokio::time::Instant,
    ) -> Result<(), StoreError> {
        let asked = tokio::time::Instant::now();
        let cdc = self.store.cdc_partitions().await?;
        self.hub.retain_partitions(&cdc);
        match *held {
            Some(epoch) => {
                if !self.store.renew(&self.member, epoch, self.ttl).await? {
                    tracing::warn!(slot = %self.store.slot, "lost the slot's lease; stopping the stream");
                    *held = None;
                    stop_stream(stream).await;
                    pairs.clear();
                    return Ok(());
                }
                *renewed = asked;
            }
            // With no CDC partition the slot is still read if it exists, so
            // it is confirmed forward instead of retaining WAL.
            None if cdc.is_empty() && self.store.state().await?.is_none() => return Ok(()),
            None => {
                let Some(epoch) = self.store.acquire(&self.member, self.ttl).await? else {
                    return Ok(());
                };
                tracing::info!(slot = %self.store.slot, epoch, "took the slot's lease");
                *held = Some(epoch);
                *renewed = asked;
                if self.store.terminate_reader().await? {
                    tracing::warn!(slot = %self.store.slot, "ended the walsender of the previous slot holder");
                }
            }
        }
        let state = self.store.state().await?;
        self.report(state.as_ref());
        let finished = stream.as_ref().is_none_or(|s| s.handle.is_finished());
        if !finished {
            return Ok(());
        }
        if let Some(s) = stream.take() {
            match s.handle.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, slot = %self.store.slot, "replication stream ended; starting it again")
                }
                Err(error) => tracing::error!(%error, "replication stream panicked"),
            }
        }
        match state {
            Some(s) if !s.is_lost() => {}
            other => {
                let why = if other.is_some() {
                    "lost (wal_status = lost: the WAL it needed was removed)"
                } else {
                    "missing (dropped, or this is a replica promoted without it)"
                };
                tracing::error!(
                    slot = %self.store.slot,
                    "replication slot {why}; making a new one: every CDC partition catches up \
                     from the outbox table again, so events the old slot streamed but whose marks \
                     were not stored are published again (at least once; none is skipped)"
                );
                self.store.recover().await?;
                metrics::counter!(m::CDC_SLOT_RECOVERIES).increment(1);
                pairs.clear();
            }
        }
        let token = CancellationToken::new();
        let (spec, store, hub, t) = (
            self.spec.clone(),
            self.store.clone(),
            Arc::clone(&self.hub),
            token.clone(),
        );
        let handle = tokio::spawn(async move { stream::run(&spec, &store, &hub, t).await });
        *stream = Some(Stream {
            stop: token,
            handle,
        });
        Ok(())
    }

    /// Pairs a snapshot with the WAL position after it; once the slot is
    /// confirmed past a pair's position, every transaction its snapshot
    /// sees is on the broker, and the streaming partitions' marks move to
    /// it.
    async fn beat(&self, pairs: &mut VecDeque<(Snapshot, u64)>) -> Result<(), StoreError> {
        let pair = self.store.heartbeat().await?;
        pairs.push_back(pair);
        let confirmed = self.hub.confirmable();
        let mut ready: Option<Snapshot> = None;
        while pairs.front().is_some_and(|(_, lsn)| *lsn <= confirmed) {
            ready = pairs.pop_front().map(|(s, _)| s);
        }
        // A stuck stream must not grow this without bound.
        while pairs.len() > 600 {
            pairs.pop_front();
        }
        if let Some(snapshot) = ready {
            let claims = self.hub.streaming_claims();
            let moved = self.store.advance_marks(&claims, &snapshot).await?;
            tracing::trace!(moved, %snapshot, confirmed = %lsn_text(confirmed), "CDC marks moved");
        }
        Ok(())
    }

    fn report(&self, state: Option<&SlotState>) {
        let Some(s) = state else {
            metrics::gauge!(m::CDC_SLOT_ACTIVE).set(0.0);
            return;
        };
        let lag = |lsn: u64| s.current.saturating_sub(lsn) as f64;
        metrics::gauge!(m::CDC_CONFIRMED_LAG_BYTES).set(lag(s.confirmed_flush));
        metrics::gauge!(m::CDC_RETAINED_WAL_BYTES).set(lag(s.restart));
        metrics::gauge!(m::CDC_SLOT_ACTIVE).set(if s.active_pid.is_some() { 1.0 } else { 0.0 });
        let received = self.hub.received();
        if received > 0 {
            metrics::gauge!(m::CDC_RECEIVED_LAG_BYTES).set(lag(received));
        }
        for status in WAL_STATUSES {
            let v = if s.wal_status == status { 1.0 } else { 0.0 };
            metrics::gauge!(m::CDC_WAL_STATUS, "status" => status).set(v);
        }
    }
}

async fn stop_stream(stream: &mut Option<Stream>) {
    if let Some(s) = stream.take() {
        s.stop.cancel();
        let _ = s.handle.await;
    }
}
