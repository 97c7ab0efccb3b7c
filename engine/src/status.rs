//! What `outbox status` reports, as a table or as JSON.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// `poll` or `cdc`; `None` until the first node set it.
    pub mode: Option<String>,
    /// Under CDC: streams from the slot (false: catching up from the table).
    pub cdc_streaming: bool,
}

/// The replication slot of the CDC source, if the outbox has one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CdcStatus {
    /// The node holding the slot's lease (it relays every CDC partition).
    pub holder: Option<String>,
    pub slot: String,
    /// The slot exists on the server.
    pub exists: bool,
    /// A walsender reads it.
    pub active: bool,
    pub wal_status: Option<String>,
    /// WAL written since the slot's confirmed position.
    pub confirmed_lag_bytes: Option<i64>,
    /// WAL the slot keeps on the server.
    pub retained_wal_bytes: Option<i64>,
    /// Times the slot was lost and made again.
    pub recoveries: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub last_heartbeat_ms: i64,
    /// Partitions this node holds unexpired leases on.
    pub partitions: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub partitions: Vec<PartitionStatus>,
    pub nodes: Vec<NodeStatus>,
    /// Set once a slot was created for the outbox.
    pub cdc: Option<CdcStatus>,
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
            "{:>9}  {:<5} {:<20} {:>6} {:>8} {:>10} {:>9} {:>10} {:>12}",
            "partition",
            "mode",
            "owner",
            "epoch",
            "lease",
            "pending",
            "oldest",
            "rate/s",
            "published"
        );
        for p in &self.partitions {
            let mode = match (p.mode.as_deref(), p.cdc_streaming) {
                (Some("cdc"), false) => "cdc*",
                (Some(m), _) => m,
                (None, _) => "-",
            };
            let _ = writeln!(
                out,
                "{:>9}  {:<5} {:<20} {:>6} {:>8} {:>10} {:>9} {:>10} {:>12}",
                p.partition,
                mode,
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
        if self
            .partitions
            .iter()
            .any(|p| p.mode.as_deref() == Some("cdc") && !p.cdc_streaming)
        {
            let _ = writeln!(out, "(cdc*: catching up from the table before streaming)");
        }
        let _ = writeln!(out, "\ntotal pending: {}", self.total_pending());
        if let Some(c) = &self.cdc {
            let mib = |b: Option<i64>| {
                b.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
                    .unwrap_or_else(|| "-".into())
            };
            let _ =
                writeln!(
                out,
                "\nslot {}: {} holder {} wal_status {} confirmed lag {} retained {} recoveries {}",
                c.slot,
                if !c.exists { "MISSING" } else if c.active { "active" } else { "inactive" },
                c.holder.as_deref().unwrap_or("-"),
                c.wal_status.as_deref().unwrap_or("-"),
                mib(c.confirmed_lag_bytes),
                mib(c.retained_wal_bytes),
                c.recoveries
            );
        }
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
