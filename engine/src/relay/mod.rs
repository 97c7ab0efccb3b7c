//! The relay: one worker per owned partition moves events from an
//! [`EventSource`] to a [`Sink`](crate::sink::Sink), in order, acknowledging
//! to the source only what the sink acknowledged.

use std::future::Future;

use uuid::Uuid;

use crate::error::StoreError;
use crate::event::OutboxEvent;

pub mod backoff;
pub mod window;
pub mod worker;

/// The right to relay one partition, as granted by its lease. `epoch` is the
/// fencing token: every acknowledgement carries it, and the store refuses it
/// once another owner took the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub partition: u32,
    pub epoch: i64,
    /// The owning process (a node id restarted gets a new incarnation).
    pub incarnation: Uuid,
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The events are gone from the source.
    Done { removed: u64 },
    /// The claim is stale: another owner has the partition. Nothing changed.
    Fenced,
}

/// A poison event on its way to the dead letters.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    pub position: i64,
    pub error: String,
    pub attempts: u32,
    pub first_failed_at: std::time::SystemTime,
    pub node_id: String,
}

/// How far behind a partition is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub partition: u32,
    /// Events waiting (a source may cap the count).
    pub pending: u64,
    /// Age of the oldest waiting event, in seconds.
    pub oldest_age_secs: Option<f64>,
}

/// Where events come from: the polling Postgres source today, a logical
/// decoding source later.
pub trait EventSource: Send + Sync + 'static {
    /// Up to `limit` of the partition's oldest events, in position order,
    /// leaving out the positions in `in_flight`.
    fn fetch(
        &self,
        claim: &Claim,
        limit: usize,
        in_flight: &[i64],
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, StoreError>> + Send;

    /// Marks events as published, if `claim` still holds.
    fn acknowledge(
        &self,
        claim: &Claim,
        positions: &[i64],
    ) -> impl Future<Output = Result<Ack, StoreError>> + Send;

    /// [`acknowledge`](Self::acknowledge), then, if the claim held,
    /// [`fetch`](Self::fetch) leaving out `in_flight` (the acknowledged
    /// positions are gone already). A source may do both in one round trip.
    fn acknowledge_and_fetch(
        &self,
        claim: &Claim,
        positions: &[i64],
        limit: usize,
        in_flight: &[i64],
    ) -> impl Future<Output = Result<(Ack, Vec<OutboxEvent>), StoreError>> + Send {
        async move {
            let ack = self.acknowledge(claim, positions).await?;
            if ack == Ack::Fenced {
                return Ok((ack, Vec::new()));
            }
            let events = self.fetch(claim, limit, in_flight).await?;
            Ok((ack, events))
        }
    }

    /// Moves a poison event out of the partition into the dead letters, if
    /// `claim` still holds.
    fn park(
        &self,
        claim: &Claim,
        parked: &Parked,
    ) -> impl Future<Output = Result<Ack, StoreError>> + Send;

    /// The backlog of each of `partitions`.
    fn backlog(
        &self,
        partitions: &[u32],
    ) -> impl Future<Output = Result<Vec<Backlog>, StoreError>> + Send;

    /// Housekeeping after many acknowledgements (for Postgres: vacuum).
    fn maintain(&self, partition: u32) -> impl Future<Output = Result<(), StoreError>> + Send;
}
