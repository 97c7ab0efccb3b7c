//! The outbox engine: applications write events into a hash-partitioned
//! PostgreSQL `outbox` table inside their own transactions; the relay owns
//! partitions through leases, publishes each partition's events in order to a
//! sink (Kafka), and deletes them only after the sink acknowledged them.
//!
//! The seams:
//! - [`relay::EventSource`] and its per-claim [`relay::ClaimReader`]: where
//!   events come from (the polling Postgres source today; logical decoding
//!   later), with a memory double in [`store::memory`].
//! - [`relay::DeadLetters`]: where poison events are parked.
//! - [`sink::Sink`]: where events go (Kafka, and a scripted double in
//!   [`sink::scripted`]).
//! - [`cluster::LeaseStore`]: who owns which partition.
//!
//! [`engine::run`] wires them as `outbox run` does.

pub mod cdc;
pub mod cluster;
pub mod config;
#[cfg(all(feature = "kafka", feature = "cdc"))]
pub mod engine;
pub mod enqueue;
pub mod error;
pub mod event;
pub mod ops;
pub mod relay;
pub mod sink;
pub mod status;
pub mod store;

pub use enqueue::{Enqueuer, NewEvent};
pub use error::{ConfigError, SinkError, StoreError};
pub use event::OutboxEvent;
