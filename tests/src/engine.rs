//! The engine inside the test process: a test configuration and a handle
//! on [`outbox_engine::engine::run`], the wiring `outbox run` uses, so an
//! in-process engine runs the production code path.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use outbox_engine::config::{Config, DatabaseUrl};

use crate::db::TestDb;
use crate::{brokers, TEST_DELIVERY_TIMEOUT_MS, TOPIC_PARTITIONS};

/// An engine configuration for tests: fast leases, small batches.
pub fn config(db: &TestDb, prefix: &str) -> Config {
    config_at(&db.url, prefix)
}

/// [`config`] for the database at `url` (one not made by [`TestDb`]).
///
/// # Panics
///
/// If the resulting configuration does not validate (a bad `url`).
pub fn config_at(url: &str, prefix: &str) -> Config {
    let mut c = Config::default();
    c.database.url = DatabaseUrl::new(url.to_string());
    c.kafka.brokers = brokers();
    c.kafka.topic_prefix = prefix.to_string();
    c.kafka.topic_partitions = TOPIC_PARTITIONS;
    c.cluster.node_id = "test-node".into();
    c.cluster.lease_ttl_ms = 2_000;
    c.cluster.heartbeat_interval_ms = 250;
    c.kafka.delivery_timeout_ms = TEST_DELIVERY_TIMEOUT_MS;
    c.relay.poll_interval_ms = 5;
    // In-process engines share the process: no operations endpoint.
    c.http.addr = "off".into();
    c.validate().expect("test config is valid");
    c
}

/// `c` with the lease timing of [`crate::NodeSpec::steady`]: 10 s leases
/// renewed every second and the engine's own delivery timeout, for tests
/// that assert nothing is sent twice across graceful stops.
pub fn steady(mut c: Config) -> Config {
    let defaults = Config::default();
    c.cluster.lease_ttl_ms = 10_000;
    c.cluster.heartbeat_interval_ms = 1_000;
    c.kafka.delivery_timeout_ms = defaults.kafka.delivery_timeout_ms;
    c.validate().expect("steady test config is valid");
    c
}

/// An engine node running inside the test process.
pub struct EngineHandle {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl EngineHandle {
    /// Runs [`outbox_engine::engine::run`] on a task of its own. With
    /// `RUST_LOG` set, the engine's logs go to the test's output.
    ///
    /// The task panics if the engine stops with an error, and
    /// [`EngineHandle::stop`] passes that on.
    pub async fn start(config: Config) -> EngineHandle {
        if let Ok(filter) = std::env::var("RUST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            outbox_engine::engine::run(config, token)
                .await
                .expect("engine run");
        });
        EngineHandle { shutdown, task }
    }

    /// Cancels the engine's shutdown token and waits until it has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("engine task");
    }
}
