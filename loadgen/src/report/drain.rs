//! Results of `loadgen drain`, and the checks that make it fail.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainResults {
    pub events: u64,
    /// Loading the backlog (no engine running).
    pub load_secs: f64,
    pub load_eps: f64,
    pub analyze_secs: f64,
    /// The outbox was empty before the timeout.
    pub drained: bool,
    /// From starting the engine nodes to an empty outbox.
    pub drain_secs: f64,
    /// `events / drain_secs`.
    pub drain_eps: f64,
    /// Unique events consumed afterwards.
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub consumer_rereads: u64,
    pub order_violations: u64,
    pub malformed: u64,
    /// Consuming the topics afterwards.
    pub verify_secs: f64,
    /// The nodes stopped cleanly on SIGTERM.
    pub engine_stopped_cleanly: bool,
    pub topics_deleted: bool,
}

/// The checks a drain failed, if any: not drained within the timeout,
/// events lost, broken order.
pub fn failed_checks(r: &DrainResults, timeout_secs: f64) -> Vec<String> {
    let mut out = Vec::new();
    if !r.drained {
        out.push(format!("the outbox was not empty after {timeout_secs} s"));
    }
    if r.lost > 0 {
        out.push(format!(
            "{} of {} events were not received",
            r.lost, r.events
        ));
    }
    if r.order_violations > 0 {
        out.push(format!(
            "{} events arrived out of order for their aggregate",
            r.order_violations
        ));
    }
    out
}
