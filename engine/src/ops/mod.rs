//! Operations: metrics (names and recording), the HTTP endpoint that serves
//! them with health and readiness, and the readiness checks.

pub mod http;
pub mod metrics;
pub mod readiness;
