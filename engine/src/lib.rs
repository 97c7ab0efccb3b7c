//! The outbox engine: applications write events into a hash-partitioned
//! PostgreSQL `outbox` table inside their own transactions; the relay owns
//! partitions through leases, publishes each partition's events in order to a
//! sink (Kafka), and deletes them only after the sink acknowledged them.
//!
//! The seams:
//! - [`relay::EventSource`]: where events come from (the polling Postgres
//!   source today; logical decoding later).
//! - [`sink::Sink`]: where events go (Kafka today).
//! - [`cluster::LeaseStore`]: who owns which partition.

pub mod cluster;
pub mod config;
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
