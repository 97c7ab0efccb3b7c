//! `outbox status --json` as the tests read it: deserialized into the
//! engine's own [`Status`], so a renamed or retyped field fails to parse
//! rather than reading as missing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use outbox_engine::status::Status;

use crate::EngineBinary;

/// `outbox status --json` of the workspace's binary against
/// `database_url`; `None` if it fails or takes over 15 s (the database may
/// be away on purpose).
///
/// # Panics
///
/// If the binary cannot be built ([`crate::outbox_binary`]), or its output
/// is not a [`Status`].
pub async fn status_at(database_url: &str) -> Option<Status> {
    let binary = EngineBinary::workspace().expect("the outbox binary");
    status_of(&binary, database_url).await
}

/// [`status_at`] with the given binary.
///
/// # Panics
///
/// If the binary's output is not a [`Status`]: a renamed or retyped field
/// is a failure, not a status that is not there.
pub async fn status_of(binary: &EngineBinary, database_url: &str) -> Option<Status> {
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        binary
            .command()
            .env("DATABASE_URL", database_url)
            .env("KAFKA_BROKERS", "unused:1")
            .args(["status", "--json"])
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("status --json is a Status"))
}

/// Partitions per owner, as `status` shows them.
pub fn owned(status: &Status) -> HashMap<String, usize> {
    let mut owners = HashMap::new();
    for p in &status.partitions {
        if let Some(o) = &p.owner {
            *owners.entry(o.clone()).or_default() += 1;
        }
    }
    owners
}

/// (node id, partitions held) of every node `status` lists.
pub fn nodes(status: &Status) -> Vec<(String, i64)> {
    status
        .nodes
        .iter()
        .map(|n| (n.node_id.clone(), n.partitions))
        .collect()
}

/// Polls `status` until the backlog is empty; returns how long it took.
pub async fn wait_drained(database_url: &str, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if status_at(database_url)
            .await
            .is_some_and(|s| s.total_pending() == 0)
        {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}
