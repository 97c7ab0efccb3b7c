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
    /// Events published from this partition since the outbox was created.
    pub published: i64,
    /// Recent publish rate, events per second (between two samples).
    pub rate_per_sec: Option<f64>,
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

    /// Fills in each partition's rate from an earlier sample `secs` ago.
    pub fn with_rates(mut self, earlier: &Status, secs: f64) -> Status {
        if secs <= 0.0 {
            return self;
        }
        for p in &mut self.partitions {
            if let Some(e) = earlier
                .partitions
                .iter()
                .find(|e| e.partition == p.partition)
            {
                p.rate_per_sec = Some((p.published - e.published).max(0) as f64 / secs);
            }
        }
        self
    }

    /// Sum of the partitions' rates, if known.
    pub fn total_rate(&self) -> Option<f64> {
        self.partitions.iter().map(|p| p.rate_per_sec).sum()
    }

    /// A readable table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>9}  {:<20} {:>6} {:>8} {:>10} {:>9} {:>10} {:>12}",
            "partition", "owner", "epoch", "lease", "pending", "oldest", "rate/s", "published"
        );
        for p in &self.partitions {
            let _ = writeln!(
                out,
                "{:>9}  {:<20} {:>6} {:>8} {:>10} {:>9} {:>10} {:>12}",
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
                p.rate_per_sec
                    .map(|r| format!("{r:.0}"))
                    .unwrap_or_else(|| "-".into()),
                p.published,
            );
        }
        let _ = writeln!(out, "\ntotal pending: {}", self.total_pending());
        if let Some(rate) = self.total_rate() {
            let _ = writeln!(out, "total rate: {rate:.0} events/s");
        }
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
