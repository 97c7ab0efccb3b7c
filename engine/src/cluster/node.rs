//! A node's supervisor: registers the node, keeps its leases, and runs one
//! relay worker per partition it owns. Every heartbeat it renews, reads the
//! cluster's view, and follows [`assignment::plan`]: starting workers for
//! partitions it acquired, and draining (then releasing) those it gives up.
//!
//! Leases are renewed for as long as any worker runs, during a drain too,
//! so a slow drain never hands a partition over mid-flight. A lease is
//! released once its worker drained (every batch reported: nothing of it
//! can land later); the lease of a worker abandoned at the shutdown timeout
//! is left to expire, so the next owner waits out its delivery timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::{assignment, Acquired, LeaseStore, Member, Registration};
use crate::config::{ClusterConfig, RelayConfig};
use crate::error::StoreError;
use crate::ops::metrics as m;
use crate::relay::worker::{Exit, Signals, Totals, Worker, WorkerSpec};
use crate::relay::{Claim, DeadLetters, EventSource, LeaseDeadline};
use crate::sink::Sink;

struct Running {
    claim: Claim,
    signals: Signals,
    handle: JoinHandle<(Exit, Totals)>,
    /// Until when the lease is known to hold, by the database's clock as
    /// this node saw it; the worker and the sink check it too.
    lease: LeaseDeadline,
    /// Being drained to be released.
    releasing: bool,
}

/// How often a node samples the backlog of the partitions it owns, at
/// most.
const BACKLOG_SAMPLE_PERIOD: Duration = Duration::from_secs(5);
/// A sample counts rows, so under a large backlog it takes long (48 s for
/// 5M events on 2 cores, back to back, one backend busy all the drain long):
/// the next one waits this many times as long as the last took.
const BACKLOG_SAMPLE_SPACING: u32 = 20;

/// When the sample that started at `started` and took `took` allows the
/// next one.
fn next_sample_at(started: Instant, took: Duration) -> Instant {
    started + BACKLOG_SAMPLE_PERIOD.max(took * BACKLOG_SAMPLE_SPACING)
}

/// Samples the backlog gauges; returns how long it took.
async fn sample_backlog<S: EventSource>(source: Arc<S>, partitions: Vec<u32>) -> Duration {
    let started = Instant::now();
    match source.backlog(&partitions).await {
        Ok(backlog) => {
            for b in backlog {
                let p = b.partition.to_string();
                metrics::gauge!(m::PENDING_EVENTS, "partition" => p.clone()).set(b.pending as f64);
                metrics::gauge!(m::OLDEST_AGE_SECONDS, "partition" => p)
                    .set(b.oldest_age_secs.unwrap_or(0.0));
            }
        }
        Err(error) => tracing::debug!(%error, "backlog sample failed"),
    }
    started.elapsed()
}

/// Everything a node needs to run.
pub struct Node<S, K, L, D> {
    pub member: Member,
    pub source: Arc<S>,
    pub sink: Arc<K>,
    pub leases: Arc<L>,
    pub dead_letters: Arc<D>,
    pub relay: RelayConfig,
    pub cluster: ClusterConfig,
    /// The runtime workers and backlog samples run on (the node itself may
    /// run on another, see `engine::run`).
    pub spawner: tokio::runtime::Handle,
}

/// Share of the TTL a renewal is trusted for, against clock rate drift and
/// the time the renewal's answer took to arrive.
const TRUSTED_TTL_SHARE: f32 = 0.9;

impl<S: EventSource, K: Sink, L: LeaseStore, D: DeadLetters> Node<S, K, L, D> {
    /// Runs until `shutdown` is cancelled, then drains every worker (within
    /// the relay's shutdown timeout) and releases the leases.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let ttl = self.cluster.lease_ttl();
        if !self.register(&shutdown).await? {
            return Ok(());
        }
        tracing::info!(node = %self.member.node_id, incarnation = %self.member.incarnation, "node registered");
        let mut workers: BTreeMap<u32, Running> = BTreeMap::new();
        // The first step one heartbeat after registering: nodes started
        // together all see each other then and take their shares at once,
        // instead of the first taking every partition and handing most of
        // them over mid-backlog (6-9 s before 2 and 4 nodes all relayed a
        // 1M backlog; Kafka's group.initial.rebalance.delay.ms is the same).
        let beat = self.cluster.heartbeat_interval();
        let mut tick = tokio::time::interval_at(Instant::now() + beat, beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampler: Option<(Instant, JoinHandle<Duration>)> = None;
        let mut next_sample = Instant::now();
        loop {
            let due = tokio::select! {
                _ = shutdown.cancelled() => break,
                due = tick.tick() => due,
            };
            if let Err(error) = self.step(&mut workers, ttl, due).await {
                tracing::warn!(%error, "cluster step failed; retrying next heartbeat");
            }
            metrics::gauge!(m::LEASES_HELD).set(workers.len() as f64);
            if let Some((started, done)) = sampler.take_if(|(_, s)| s.is_finished()) {
                next_sample = next_sample_at(started, done.await.unwrap_or_default());
            }
            if sampler.is_none() && Instant::now() >= next_sample {
                let owned: Vec<u32> = workers.keys().copied().collect();
                sampler = Some((
                    Instant::now(),
                    self.spawner
                        .spawn(sample_backlog(Arc::clone(&self.source), owned)),
                ));
            }
            revoke_expired(&workers);
        }
        self.shutdown(workers).await;
        Ok(())
    }

    /// Registers, waiting while a previous incarnation of this node id is
    /// still live. Returns false if shut down while waiting.
    async fn register(&self, shutdown: &CancellationToken) -> Result<bool, StoreError> {
        let ttl = self.cluster.lease_ttl();
        loop {
            match self.leases.register(&self.member, ttl).await? {
                Registration::Registered => return Ok(true),
                Registration::Taken { expires_in } => {
                    tracing::warn!(
                        node = %self.member.node_id,
                        ?expires_in,
                        "node id is registered by another live process; waiting for it to expire"
                    );
                    let wait = expires_in.clamp(Duration::from_millis(100), ttl);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn step(
        &self,
        workers: &mut BTreeMap<u32, Running>,
        ttl: Duration,
        due: Instant,
    ) -> Result<(), StoreError> {
        let mut stages = Stages::new(due);
        stages.mark("wake");
        // The renewal first: everything else can wait a heartbeat.
        let alive = self.keep(workers, ttl).await?;
        stages.mark("renew");
        if !alive {
            tracing::error!(node = %self.member.node_id, "registration lost; revoking all workers and registering again");
            for w in workers.values() {
                w.signals.revoke.cancel();
            }
            self.leases.register(&self.member, ttl).await?;
            return Ok(());
        }
        self.reap(workers).await;
        stages.mark("reap");

        let live = self.leases.live_nodes().await?;
        let view = self.leases.leases().await?;
        let slot_owner = self.leases.slot_owner().await?;
        stages.mark("view");
        let plan = assignment::plan(&live, &self.member.node_id, &view, slot_owner.as_deref());
        for p in plan.release {
            if let Some(w) = workers.get_mut(&p) {
                if !w.releasing {
                    tracing::info!(partition = p, "handing partition off");
                    w.releasing = true;
                    w.signals.stop.cancel();
                }
            }
        }
        for p in plan.acquire {
            if workers.contains_key(&p) {
                continue; // still winding down from a lost lease
            }
            let asked = Instant::now();
            let delivery = self.sink.delivery_timeout();
            if let Some(acquired) = self.leases.acquire(&self.member, p, ttl, delivery).await? {
                metrics::counter!(m::LEASES_ACQUIRED).increment(1);
                tracing::info!(
                    partition = p,
                    epoch = acquired.claim.epoch,
                    quiet_for = ?acquired.quiet_for,
                    "partition acquired"
                );
                workers.insert(p, self.spawn(acquired, asked));
            }
        }
        stages.mark("acquire");
        stages.report(self.cluster.heartbeat_interval());
        Ok(())
    }

    /// Heartbeats and renews the leases of `workers`; extends the deadlines
    /// of those renewed, revokes the others. False if the registration was
    /// lost (nothing renewed then).
    async fn keep(
        &self,
        workers: &mut BTreeMap<u32, Running>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let held: Vec<Claim> = workers
            .values()
            .filter(|w| !w.signals.revoke.is_cancelled())
            .map(|w| w.claim)
            .collect();
        let asked = Instant::now();
        let Some(renewed) = self.leases.keep(&self.member, &held, ttl).await? else {
            return Ok(false);
        };
        let valid_until = asked + ttl.mul_f32(TRUSTED_TTL_SHARE);
        for (p, w) in workers.iter_mut() {
            if renewed.iter().any(|c| c == &w.claim) {
                w.lease.extend(valid_until);
            } else if !w.signals.revoke.is_cancelled() {
                tracing::warn!(
                    partition = p,
                    epoch = w.claim.epoch,
                    "lease lost; revoking worker"
                );
                metrics::counter!(m::LEASES_LOST).increment(1);
                w.lease.expire();
                w.signals.revoke.cancel();
            }
        }
        Ok(true)
    }

    fn spawn(&self, acquired: Acquired, asked: Instant) -> Running {
        let signals = Signals::default();
        let lease = LeaseDeadline::new(asked + acquired.ttl.mul_f32(TRUSTED_TTL_SHARE));
        let claim = acquired.claim;
        let spec = WorkerSpec {
            claim,
            node_id: self.member.node_id.clone(),
            config: self.relay.clone(),
            lease: lease.clone(),
            not_before: Instant::now() + acquired.quiet_for,
            doorbell: self.source.doorbell(&claim),
        };
        let worker = Worker::new(
            spec,
            self.source.open(&claim),
            Arc::clone(&self.sink),
            Arc::clone(&self.dead_letters),
        );
        let handle = self.spawner.spawn(worker.run(signals.clone()));
        Running {
            claim,
            signals,
            handle,
            lease,
            releasing: false,
        }
    }

    /// Removes finished workers, releasing the leases of drained ones: they
    /// have nothing left that could land later. Any other lease is left to
    /// expire.
    async fn reap(&self, workers: &mut BTreeMap<u32, Running>) {
        let done: Vec<u32> = workers
            .iter()
            .filter(|(_, w)| w.handle.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in done {
            let Some(w) = workers.remove(&p) else {
                continue;
            };
            match w.handle.await {
                Ok((Exit::Drained, _)) => self.release(&w.claim, Duration::ZERO).await,
                Ok((exit, _)) => {
                    tracing::info!(
                        partition = p,
                        ?exit,
                        "worker ended; its lease is left to expire"
                    )
                }
                Err(error) => tracing::error!(partition = p, %error, "worker panicked"),
            }
        }
    }

    async fn release(&self, claim: &Claim, quiet: Duration) {
        match self.leases.release(claim, quiet).await {
            Ok(()) => {
                metrics::counter!(m::LEASES_RELEASED).increment(1);
                tracing::info!(
                    partition = claim.partition,
                    epoch = claim.epoch,
                    ?quiet,
                    "lease released"
                )
            }
            Err(error) => {
                tracing::warn!(partition = claim.partition, %error, "could not release lease; it will expire")
            }
        }
    }

    /// Stops every worker and waits for them, renewing their leases every
    /// heartbeat meanwhile, so that no partition changes hands before its
    /// worker is done. Workers still running at the shutdown timeout are
    /// abandoned, and their leases released with the time their messages
    /// may still land.
    async fn shutdown(&self, mut workers: BTreeMap<u32, Running>) {
        tracing::info!(
            workers = workers.len(),
            "stopping: draining in-flight batches"
        );
        for w in workers.values() {
            w.signals.stop.cancel();
        }
        let ttl = self.cluster.lease_ttl();
        let deadline = Instant::now() + self.relay.shutdown_timeout();
        let mut tick = tokio::time::interval(self.cluster.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut abandoned = false;
        while !workers.is_empty() {
            let finished = async {
                loop {
                    if workers.values().any(|w| w.handle.is_finished()) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::select! {
                _ = finished => {}
                _ = tick.tick() => {
                    match self.keep(&mut workers, ttl).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!("registration lost while draining"),
                        Err(error) => tracing::warn!(%error, "lease renewal failed while draining"),
                    }
                    revoke_expired(&workers);
                }
                _ = tokio::time::sleep_until(deadline), if !abandoned => {
                    abandoned = true;
                    for (p, w) in &workers {
                        tracing::warn!(partition = p, "drain timed out; abandoning in-flight batches (the next owner sends them again)");
                        w.signals.revoke.cancel();
                    }
                    // Nothing of theirs is left queued to land late; what
                    // is already on the wire is covered by the lease: it is
                    // left to expire, and the next owner waits out the
                    // delivery timeout after the expiry.
                    self.sink.purge().await;
                }
            }
            self.reap(&mut workers).await;
        }
        if let Err(error) = self.leases.deregister(&self.member).await {
            tracing::warn!(%error, "could not deregister node; it will expire");
        }
    }
}

/// How long each stage of a heartbeat step took, logged when the step ran
/// longer than a heartbeat interval: a renewal that comes late revokes
/// every worker, and this says which stage made it late.
struct Stages {
    start: Instant,
    last: Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Stages {
    /// From `due`, when the step should have started.
    fn new(due: Instant) -> Self {
        Self {
            start: due,
            last: due,
            took: Vec::with_capacity(6),
        }
    }

    fn mark(&mut self, stage: &'static str) {
        let now = Instant::now();
        self.took.push((stage, now - self.last));
        self.last = now;
    }

    fn report(&self, budget: Duration) {
        let total = self.last - self.start;
        if total > budget {
            let stages: Vec<String> = self
                .took
                .iter()
                .map(|(stage, d)| format!("{stage}={}ms", d.as_millis()))
                .collect();
            tracing::warn!(took = ?total, stages = %stages.join(" "), "slow heartbeat step");
        }
    }
}

/// Leases not renewed in time may have moved: stop acting on them.
fn revoke_expired(workers: &BTreeMap<u32, Running>) {
    for (p, w) in workers {
        if w.lease.is_past() && !w.signals.revoke.is_cancelled() {
            metrics::counter!(m::LEASES_LOST).increment(1);
            tracing::warn!(partition = p, "lease not renewed in time; revoking worker");
            w.signals.revoke.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slow_backlog_sample_spaces_out_the_next() {
        let started = Instant::now();
        // Fast samples keep the period.
        assert_eq!(
            next_sample_at(started, Duration::from_millis(30)),
            started + BACKLOG_SAMPLE_PERIOD
        );
        // A sample that took 48 s (a 5M backlog) leaves the next for 16 min.
        assert_eq!(
            next_sample_at(started, Duration::from_secs(48)),
            started + Duration::from_secs(48 * 20)
        );
    }
}
