//! What `outbox status` reports, as a table or as JSON.

use std::fmt::Write;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// Owner of the unexpired lease, if any.
    pub owner: Option<String>,
    /// The lease's fencing epoch (grows with every change of owner).
    pub epoch: i64,
    /// Milliseconds until the lease expires (negative: expired).
    pub lease_expires_in_ms: Option<i64>,
    /// Events waiting to be published.
    pub pending: i64,
    /// Age of the oldest waiting event, in milliseconds.
    pub oldest_age_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub last_heartbeat_ms: i64,
    /// Partitions this node holds unexpired leases on.
    pub partitions: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub partitions: Vec<PartitionStatus>,
    pub nodes: Vec<NodeStatus>,
}

impl Status {
    pub fn total_pending(&self) -> i64 {
        self.partitions.iter().map(|p| p.pending).sum()
    }

    /// A readable table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>9}  {:<20} {:>6} {:>10} {:>10} {:>12}",
            "partition", "owner", "epoch", "lease", "pending", "oldest"
        );
        for p in &self.partitions {
            let _ = writeln!(
                out,
                "{:>9}  {:<20} {:>6} {:>10} {:>10} {:>12}",
                p.partition,
                p.owner.as_deref().unwrap_or("-"),
                p.epoch,
                p.lease_expires_in_ms
                    .filter(|ms| *ms > 0 && p.owner.is_some())
                    .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                p.pending,
                p.oldest_age_ms
                    .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        let _ = writeln!(out, "\ntotal pending: {}", self.total_pending());
        let _ = writeln!(out, "\nlive nodes: {}", self.nodes.len());
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "  {:<20} partitions {:>4}  heartbeat {:.1}s ago",
                n.node_id,
                n.partitions,
                n.last_heartbeat_ms as f64 / 1000.0
            );
        }
        out
    }
}
