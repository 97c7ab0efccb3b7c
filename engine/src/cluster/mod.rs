//! Partition ownership: nodes register and heartbeat; each partition has a
//! lease (owner, epoch, expiry) that nodes take when free or expired and
//! renew while they hold it. The epoch is the fencing token every
//! acknowledgement carries.

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use crate::error::StoreError;
use crate::relay::Claim;

pub mod assignment;
pub mod node;

pub use assignment::LeaseView;

/// This process as a cluster member.
#[derive(Debug, Clone)]
pub struct Member {
    pub node_id: String,
    /// New on every start, so a restarted node is told from its old self.
    pub incarnation: Uuid,
}

/// A lease just taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    pub claim: Claim,
    /// How long the lease holds, by the database's clock.
    pub ttl: Duration,
    /// How long to wait before sending: messages of the previous owner may
    /// still land until then (its lease expired without a release).
    pub quiet_for: Duration,
}

/// Whether a node could register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Registered,
    /// Another live process uses this node id; it expires in this long.
    Taken {
        expires_in: Duration,
    },
}

/// Where nodes and leases live.
pub trait LeaseStore: Send + Sync + 'static {
    fn register(
        &self,
        member: &Member,
        ttl: Duration,
    ) -> impl Future<Output = Result<Registration, StoreError>> + Send;

    /// Extends this node's registration; false if it was lost (expired and
    /// taken over by another process with the same node id).
    fn heartbeat(
        &self,
        member: &Member,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Ids of the nodes whose registration has not expired.
    fn live_nodes(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Every partition's lease; expired leases show no owner.
    fn leases(&self) -> impl Future<Output = Result<Vec<LeaseView>, StoreError>> + Send;

    /// Takes a free or expired lease, bumping its epoch. `delivery_timeout`
    /// is how long this node's messages may take to land; the next owner
    /// waits that out if this node loses the lease without releasing it.
    fn acquire(
        &self,
        member: &Member,
        partition: u32,
        ttl: Duration,
        delivery_timeout: Duration,
    ) -> impl Future<Output = Result<Option<Acquired>, StoreError>> + Send;

    /// Extends the leases of `claims` that this node still holds; returns those.
    fn renew(
        &self,
        member: &Member,
        claims: &[Claim],
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send;

    /// [`heartbeat`](Self::heartbeat), then [`renew`](Self::renew) if the
    /// registration held, as one atomic step (what a node does every
    /// heartbeat): `None` if the registration was lost (nothing renewed),
    /// else the claims renewed.
    fn keep(
        &self,
        member: &Member,
        claims: &[Claim],
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Vec<Claim>>, StoreError>> + Send;

    /// Gives a lease up (only if `claim` still holds it). `quiet` is how
    /// long messages sent under it may still land (zero once every one of
    /// them has reported); the next owner sends nothing before that.
    fn release(
        &self,
        claim: &Claim,
        quiet: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn deregister(&self, member: &Member) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The node that holds the replication slot's lease, if any: it owns
    /// every partition in CDC mode (see [`assignment::plan`]).
    fn slot_owner(&self) -> impl Future<Output = Result<Option<String>, StoreError>> + Send {
        async { Ok(None) }
    }
}
