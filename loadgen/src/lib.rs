//! loadgen as a library: drives the outbox engine end to end, checks what
//! comes out, measures the baselines it is compared with, and runs the
//! benchmark suite. The `loadgen` binary (`src/main.rs`) only parses flags
//! and calls in here.
//!
//! Measuring and rendering are kept apart. A measurement ([`run`],
//! [`broker`], [`drain`], [`suite`]) produces data: a [`report::Report`],
//! written as `report.json` (the suite's record as `suite.json`). Every
//! other file of a run (`summary.md`, `.hgrm`, SVG charts, the suite's
//! README) is a pure function of that data ([`render`]), so it can be
//! drawn again without measuring again: `loadgen render DIR`.
//!
//! What loadgen reads of the engine's state (schema, live nodes, leases,
//! backlog) goes through the engine's library, in [`engine_state`].

pub mod broker;
pub mod cli;
pub mod clock;
pub mod drain;
pub mod engine_state;
pub mod hgrm;
pub mod kafka;
pub mod nodes;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod render;
pub mod report;
pub mod run;
pub mod suite;
pub mod timeseries;
pub mod verifier;
pub mod writer;
