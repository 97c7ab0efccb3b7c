//! A node's supervisor: registers the node, keeps its leases, and runs one
//! relay worker per partition it owns. Every heartbeat it renews, reads the
//! cluster's view, and follows [`assignment::plan`]: starting workers for
//! partitions it acquired, and draining (then releasing) those it gives up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::{assignment, LeaseStore, Member, Registration};
use crate::config::{ClusterConfig, RelayConfig};
use crate::error::StoreError;
use crate::ops::metrics as m;
use crate::relay::worker::{Exit, Signals, Totals, Worker};
use crate::relay::{Claim, EventSource};
use crate::sink::Sink;

struct Running {
    claim: Claim,
    signals: Signals,
    handle: JoinHandle<(Exit, Totals)>,
    /// Until when the lease is known to hold, by this node's clock.
    valid_until: Instant,
    /// Being drained to be released.
    releasing: bool,
}

/// How often a node samples the backlog of the partitions it owns.
const BACKLOG_SAMPLE_PERIOD: Duration = Duration::from_secs(5);

async fn sample_backlog<S: EventSource>(source: Arc<S>, partitions: Vec<u32>) {
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
}

/// Everything a node needs to run.
pub struct Node<S, K, L> {
    pub member: Member,
    pub source: Arc<S>,
    pub sink: Arc<K>,
    pub leases: Arc<L>,
    pub relay: RelayConfig,
    pub cluster: ClusterConfig,
}

impl<S: EventSource, K: Sink, L: LeaseStore> Node<S, K, L> {
    /// Runs until `shutdown` is cancelled, then drains every worker (within
    /// the relay's shutdown timeout) and releases the leases.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let ttl = self.cluster.lease_ttl();
        if !self.register(&shutdown).await? {
            return Ok(());
        }
        tracing::info!(node = %self.member.node_id, incarnation = %self.member.incarnation, "node registered");
        let mut workers: BTreeMap<u32, Running> = BTreeMap::new();
        let mut tick = tokio::time::interval(self.cluster.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampler: Option<JoinHandle<()>> = None;
        let mut last_sample = Instant::now() - BACKLOG_SAMPLE_PERIOD;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.step(&mut workers, ttl).await {
                tracing::warn!(%error, "cluster step failed; retrying next heartbeat");
            }
            metrics::gauge!(m::LEASES_HELD).set(workers.len() as f64);
            if last_sample.elapsed() >= BACKLOG_SAMPLE_PERIOD
                && sampler.as_ref().is_none_or(|s| s.is_finished())
            {
                last_sample = Instant::now();
                let owned: Vec<u32> = workers.keys().copied().collect();
                sampler = Some(tokio::spawn(sample_backlog(
                    Arc::clone(&self.source),
                    owned,
                )));
            }
            // Leases not renewed in time may have moved: stop acting on them.
            let now = Instant::now();
            for (p, w) in workers.iter_mut() {
                if now >= w.valid_until && !w.signals.revoke.is_cancelled() {
                    metrics::counter!(m::LEASES_LOST).increment(1);
                    tracing::warn!(partition = p, "lease not renewed in time; revoking worker");
                    w.signals.revoke.cancel();
                }
            }
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
    ) -> Result<(), StoreError> {
        self.reap(workers).await;
        let started = Instant::now();
        if !self.leases.heartbeat(&self.member, ttl).await? {
            tracing::error!(node = %self.member.node_id, "registration lost; revoking all workers and registering again");
            for w in workers.values() {
                w.signals.revoke.cancel();
            }
            self.leases.register(&self.member, ttl).await?;
            return Ok(());
        }
        let held: Vec<Claim> = workers.values().map(|w| w.claim).collect();
        let renewed = self.leases.renew(&self.member, &held, ttl).await?;
        let valid_until = started + ttl.mul_f32(0.9);
        for (p, w) in workers.iter_mut() {
            if renewed.iter().any(|c| c == &w.claim) {
                w.valid_until = valid_until;
            } else if !w.signals.revoke.is_cancelled() {
                tracing::warn!(
                    partition = p,
                    epoch = w.claim.epoch,
                    "lease lost; revoking worker"
                );
                w.signals.revoke.cancel();
            }
        }

        let live = self.leases.live_nodes().await?;
        let view = self.leases.leases().await?;
        let plan = assignment::plan(&live, &self.member.node_id, &view);
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
            if let Some(claim) = self.leases.acquire(&self.member, p, ttl).await? {
                metrics::counter!(m::LEASES_ACQUIRED).increment(1);
                tracing::info!(partition = p, epoch = claim.epoch, "partition acquired");
                workers.insert(p, self.spawn(claim, valid_until));
            }
        }
        Ok(())
    }

    fn spawn(&self, claim: Claim, valid_until: Instant) -> Running {
        let signals = Signals::default();
        let worker = Worker::new(
            claim,
            &self.member.node_id,
            Arc::clone(&self.source),
            Arc::clone(&self.sink),
            self.relay.clone(),
        );
        let handle = tokio::spawn(worker.run(signals.clone()));
        Running {
            claim,
            signals,
            handle,
            valid_until,
            releasing: false,
        }
    }

    /// Removes finished workers, releasing the leases of drained ones.
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
                Ok((Exit::Drained, _)) => self.release(&w.claim).await,
                Ok((exit, _)) => tracing::info!(partition = p, ?exit, "worker ended"),
                Err(error) => tracing::error!(partition = p, %error, "worker panicked"),
            }
        }
    }

    async fn release(&self, claim: &Claim) {
        match self.leases.release(claim).await {
            Ok(()) => tracing::info!(
                partition = claim.partition,
                epoch = claim.epoch,
                "lease released"
            ),
            Err(error) => {
                tracing::warn!(partition = claim.partition, %error, "could not release lease; it will expire")
            }
        }
    }

    async fn shutdown(&self, workers: BTreeMap<u32, Running>) {
        tracing::info!(
            workers = workers.len(),
            "stopping: draining in-flight batches"
        );
        for w in workers.values() {
            w.signals.stop.cancel();
        }
        let deadline = Instant::now() + self.relay.shutdown_timeout();
        for (p, w) in workers {
            let mut handle = w.handle;
            let result = tokio::select! {
                r = &mut handle => r,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(partition = p, "drain timed out; abandoning in-flight batch (it will be re-sent)");
                    w.signals.revoke.cancel();
                    handle.await
                }
            };
            if let Ok((Exit::Drained, _)) = result {
                self.release(&w.claim).await;
            }
        }
        if let Err(error) = self.leases.deregister(&self.member).await {
            tracing::warn!(%error, "could not deregister node; it will expire");
        }
    }
}
