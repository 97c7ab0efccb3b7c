//! The outbox engine's test harness: what the integration tests (the files
//! beside this crate's manifest), the fault tests and loadgen need to run
//! the engine against real services and break them.
//!
//! - where the shared services are ([`admin_url`], [`brokers`],
//!   [`cdc_admin_url`]) and a database of a test's own on them ([`db`]);
//! - the engine, in-process through the library's own wiring ([`engine`])
//!   or as `outbox` child processes ([`binary`], [`node`]);
//! - services a test may break: a private PostgreSQL ([`pg`]), a private
//!   tansu broker ([`broker`]), a TCP proxy ([`proxy`]) and per-client
//!   links to a broker ([`links`]);
//! - load and delivery: writers ([`load`]), one consumer ([`consumer`]),
//!   lost/duplicate/order figures ([`ordering`]), `outbox status` typed
//!   ([`status`]), the operations endpoint ([`ops`]) and a process's CPU
//!   and memory ([`usage`]).
//!
//! Functions that start processes or services return a [`Result`]: a
//! machine without PostgreSQL's server binaries or tansu gets an error that
//! says so. Test fixtures ([`db::TestDb`], the consumer, the tallies'
//! `assert_*`) panic instead, as a failed test does.
//!
//! The root re-exports what most tests use, so `use outbox_harness::*`
//! brings it in.
//!
//! Outside the tests (loadgen), the pieces that take no test environment
//! are [`EngineBinary::at`] (a given binary, its version, a command that
//! inherits none of the engine's configuration), [`node::logging_to`],
//! [`node::signal_pid`], [`stop_node`], [`status::status_of`], [`pg`],
//! [`broker`], [`proxy`], [`links`] and [`usage`].
#![warn(missing_docs)]

use std::time::{Duration, Instant};

use uuid::Uuid;

pub mod binary;
pub mod broker;
pub mod consumer;
pub mod db;
pub mod engine;
pub mod links;
pub mod load;
pub mod node;
pub mod ops;
pub mod ordering;
pub mod pg;
pub mod proxy;
pub mod status;
pub mod usage;

pub use binary::EngineBinary;
pub use broker::PrivateBroker;
pub use consumer::{consume, consume_until, Received};
pub use db::{owners, wait_for_owners, TestDb};
pub use engine::{config, config_at, EngineHandle};
pub use load::{spawn_load, spawn_paced_writer, spawn_writer, Load, Written};
pub use node::{
    node_command, outbox_at, outbox_binary, outbox_command, run_at, send_signal, signal_pid,
    steady_node_command, stop_node, succeed, NodeSpec,
};
pub use ops::{free_port, http_get};
pub use ordering::{lost_and_duplicates, order_violations};

/// Kafka partitions of every test topic.
pub const TOPIC_PARTITIONS: i32 = 4;

/// Ring segments of test outboxes hold 2^12 positions, so that tests see
/// segments truncated.
pub const TEST_RING_SHIFT: u32 = 12;

/// The delivery timeout of test nodes: short, so that a takeover of an
/// expired lease waits only this plus 2 s.
pub const TEST_DELIVERY_TIMEOUT_MS: u64 = 3_000;

/// Why a process or service of the harness could not be started or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program could not be started or waited for, a port not bound, a
    /// file not written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed, or did not do what it should have.
    #[error("{0}")]
    Failed(String),
    /// This machine lacks something the harness needs (PostgreSQL's server
    /// binaries, a user to run them as).
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    /// An [`Error::Io`] of `what`.
    pub fn io(what: impl std::fmt::Display, source: std::io::Error) -> Error {
        Error::Io {
            what: what.to_string(),
            source,
        }
    }
}

/// The harness's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The server tests create their databases on: `OUTBOX_TEST_DATABASE_URL`,
/// else `DATABASE_URL`, else the local server `deploy/services.sh` uses.
pub fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The shared broker: `KAFKA_BROKERS`, else `127.0.0.1:9092`.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The server with `wal_level = logical` for CDC tests
/// (`OUTBOX_TEST_CDC_DATABASE_URL`, else `CDC_DATABASE_URL`, as
/// `deploy/services.sh` exports it); `None` if neither is set.
pub fn cdc_admin_url() -> Option<String> {
    ["OUTBOX_TEST_CDC_DATABASE_URL", "CDC_DATABASE_URL"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.is_empty())
}

/// The workspace this harness was built in (its `tests/` is the harness).
pub fn workspace_root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the harness lies inside the workspace")
}

/// A topic prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{}.", &Uuid::new_v4().simple().to_string()[..10])
}

/// The turn of a heavy test: tests of one binary that each start several
/// engine nodes, a writer at full speed, or a service of their own take
/// turns, so that on a 2-core machine one such test does not starve
/// another's lease renewals or deliveries. Light tests of the same binary
/// still run beside them. (Each test binary is a process of its own: the
/// turn is per binary.)
pub async fn heavy_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Polls `check` every 200 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
