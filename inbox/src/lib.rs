//! The consumer's half of the outbox pattern: an inbox that makes a
//! consumer's effects exactly once although Kafka delivers at least once.
//!
//! A consumer that keeps its state in PostgreSQL processes each batch of
//! messages in one transaction: [`Inbox::claim`] records "consumer group G
//! processed event X" for every message in one statement and says which
//! ones are new; the consumer applies those through the same transaction;
//! commit makes both durable together. A message delivered again (after a
//! relay crash, a consumer crash before its offset commit, a rebalance)
//! is recognised and skipped. [`Inbox::process`] does the whole round:
//! begin, claim, your [`Handler`], commit. Kafka offsets are committed
//! only afterwards (see [`kafka`] with the `kafka` feature).
//!
//! Retention: ids are kept in daily segments (by event time) and expire
//! by dropping whole segments ([`maintain`]); an event redelivered after
//! its id expired is applied again, so keep `retention_days` longer than
//! anything can redeliver (default 7 days, Kafka's default retention).
//!
//! The SQL contract, for consumers in other languages, is in the README
//! ("Consuming events exactly once") and in [`claim_sql`].

mod claim;
mod error;
mod process;
mod schema;
pub mod segments;

#[cfg(feature = "kafka")]
pub mod kafka;

pub use claim::{
    claim_functions_sql, claim_sql, claim_stale_sql, Claim, Inbox, InboxEvent, OrderKey, Verdict,
};
pub use error::{InboxError, ProcessError};
pub use process::{Handler, Processed};
pub use schema::{
    maintain, maintain_as_of, migrate, segment_days, InboxConfig, Maintained, DEFAULT_AHEAD_DAYS,
    DEFAULT_RETENTION_DAYS,
};
