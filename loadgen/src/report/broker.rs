//! Results of `loadgen broker-ceiling`.

use serde::{Deserialize, Serialize};

use super::Latency;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerResults {
    /// Messages handed to librdkafka.
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// From the first send to the last acknowledgement.
    pub secs: f64,
    /// Acknowledged messages per second over `secs`.
    pub acked_per_sec: f64,
    /// Send (handed to librdkafka) to acknowledgement.
    pub ack_latency_ms: Latency,
    /// The producer's librdkafka properties (the engine's defaults).
    pub producer_properties: std::collections::BTreeMap<String, String>,
    pub topics_deleted: bool,
}
