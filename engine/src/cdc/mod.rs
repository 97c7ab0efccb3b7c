//! Change data capture: a relay source that streams the outbox from
//! PostgreSQL's logical decoding instead of polling it.
//!
//! - [`pgoutput`] decodes the messages of the replication stream;
//! - [`hub`] fans the stream out to the partitions' workers and decides how
//!   far the slot may be confirmed;
//! - [`snapshot`] judges which transactions a partition's mark covers;
//! - [`slot`] keeps the publication, the slot, its lease and the marks;
//! - [`source`] gives each claim the reader of its mode;
//! - `stream` and `keeper` (feature `cdc`) run the replication connection
//!   on the node that holds the slot's lease.

pub mod hub;
#[cfg(feature = "cdc")]
pub mod keeper;
pub mod pgoutput;
pub mod shard;
pub mod slot;
pub mod snapshot;
pub mod source;
#[cfg(feature = "cdc")]
pub mod stream;
