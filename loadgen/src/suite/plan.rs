//! Which measurements the suite makes, in which order. Pure.
//!
//! The sweep has four factors (events per transaction 1/10/50, payload
//! 100 B/1 KiB, outbox partitions 16/64, nodes 1/2/3): 36 combinations of
//! ~30 s each would take too long, and on a 2-core machine most of them
//! say little more than their neighbours. So the standard suite crosses
//! the two workload factors, which change what the database and broker do
//! per event (events/tx × payload, 6 runs at 16 partitions and 1 node),
//! and moves the engine factors one at a time around the base (50 events/tx,
//! 100 B, 16 partitions, 1 node): 64 partitions; 2 and 3 nodes. Each e2e
//! run has its database ceiling measured just before it (same workload,
//! same partitions, same writers, no engine), and each payload its broker
//! ceiling, so ratios compare numbers taken minutes apart on the same
//! machine. Then the target runs: application overhead (1 event/tx with
//! the engine relaying, no consumer), latency at 10,000 events/s open
//! loop (with at least 32 writers, so that the writers keep the rate), and
//! the drain of a 5M backlog.

use serde::{Deserialize, Serialize};

/// What a transaction writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub events_per_tx: usize,
    pub payload_bytes: usize,
}

/// How the engine is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub partitions: u32,
    pub nodes: usize,
}

pub const BASE: Workload = Workload {
    events_per_tx: 50,
    payload_bytes: 100,
};
pub const BASE_SHAPE: Shape = Shape {
    partitions: 16,
    nodes: 1,
};
/// The open-loop rate of the latency target.
pub const LATENCY_RATE: f64 = 10_000.0;
/// Events per transaction of the latency run: 1,000 transactions/s, well
/// within the database's reach, so the latency is the relay's.
pub const LATENCY_EVENTS_PER_TX: usize = 10;
/// Writers of the latency run, at least: an open-loop writer runs one
/// transaction at a time, so 1,000 transactions/s over 32 writers leaves
/// each 32 ms per transaction before it falls behind its schedule (8
/// writers on a busy 2-core machine did fall behind).
pub const LATENCY_WRITERS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Step {
    /// The same transactions, no engine, no consumer.
    DbCeiling { workload: Workload, partitions: u32 },
    /// Messages of that size straight to the broker.
    BrokerCeiling { payload_bytes: usize },
    /// Closed loop, verified end to end.
    E2e { workload: Workload, shape: Shape },
    /// Closed loop with the engine relaying and no consumer: the
    /// application's commit rate.
    Overhead { workload: Workload, shape: Shape },
    /// Open loop at `rate` events/s, verified end to end.
    Latency {
        workload: Workload,
        shape: Shape,
        rate: f64,
    },
    /// A backlog of `events`, drained from a standing start.
    Drain {
        events: u64,
        payload_bytes: usize,
        shape: Shape,
    },
}

/// A step with its name and how long it writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    pub name: String,
    pub step: Step,
    pub duration_secs: f64,
}

fn bytes(b: usize) -> String {
    if b.is_multiple_of(1024) {
        format!("{}kib", b / 1024)
    } else {
        format!("{b}b")
    }
}

fn count(n: u64) -> String {
    if n.is_multiple_of(1_000_000) {
        format!("{}m", n / 1_000_000)
    } else if n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

fn w(w: Workload) -> String {
    format!("{}ev-{}", w.events_per_tx, bytes(w.payload_bytes))
}

fn s(s: Shape) -> String {
    format!("{}p-{}n", s.partitions, s.nodes)
}

impl Step {
    pub fn name(&self) -> String {
        match *self {
            Step::DbCeiling {
                workload,
                partitions,
            } => format!("db-ceiling-{}-{partitions}p", w(workload)),
            Step::BrokerCeiling { payload_bytes } => {
                format!("broker-ceiling-{}", bytes(payload_bytes))
            }
            Step::E2e { workload, shape } => format!("e2e-{}-{}", w(workload), s(shape)),
            Step::Overhead { workload, shape } => {
                format!("overhead-{}-{}", w(workload), s(shape))
            }
            Step::Latency {
                workload,
                shape,
                rate,
            } => format!(
                "latency-{}-{}-{}",
                count(rate as u64),
                w(workload),
                s(shape)
            ),
            Step::Drain {
                events,
                payload_bytes,
                shape,
            } => format!(
                "drain-{}-{}-{}",
                count(events),
                bytes(payload_bytes),
                s(shape)
            ),
        }
    }
}

/// Durations of the suite's measurements.
#[derive(Debug, Clone, Copy)]
pub struct Durations {
    pub ceiling: f64,
    pub e2e: f64,
    pub drain_events: u64,
}

impl Durations {
    pub fn standard() -> Self {
        Self {
            ceiling: 15.0,
            e2e: 20.0,
            drain_events: 5_000_000,
        }
    }

    pub fn quick() -> Self {
        Self {
            ceiling: 6.0,
            e2e: 8.0,
            drain_events: 500_000,
        }
    }
}

fn planned(step: Step, duration_secs: f64) -> Planned {
    Planned {
        name: step.name(),
        step,
        duration_secs,
    }
}

/// The standard suite (about 12 minutes on 2 cores) or the quick one (a
/// few minutes: the base and 1 event/tx, one broker ceiling, 2 nodes once,
/// short runs, a 500k drain).
pub fn plan(quick: bool, d: Durations) -> Vec<Planned> {
    let mut out = Vec::new();
    let db = |workload, partitions| Step::DbCeiling {
        workload,
        partitions,
    };
    let e2e = |workload, shape| Step::E2e { workload, shape };
    let one = Workload {
        events_per_tx: 1,
        payload_bytes: 100,
    };
    let (payloads, events): (&[usize], &[usize]) = if quick {
        (&[100], &[1, 50])
    } else {
        (&[100, 1024], &[1, 10, 50])
    };
    for &payload_bytes in payloads {
        out.push(planned(Step::BrokerCeiling { payload_bytes }, d.ceiling));
        for &events_per_tx in events {
            let workload = Workload {
                events_per_tx,
                payload_bytes,
            };
            out.push(planned(db(workload, BASE_SHAPE.partitions), d.ceiling));
            if workload == one {
                // Right after its ceiling: the application-overhead target.
                out.push(planned(
                    Step::Overhead {
                        workload,
                        shape: BASE_SHAPE,
                    },
                    d.ceiling,
                ));
            }
            out.push(planned(e2e(workload, BASE_SHAPE), d.e2e));
        }
    }
    if !quick {
        let wide = Shape {
            partitions: 64,
            nodes: 1,
        };
        out.push(planned(db(BASE, 64), d.ceiling));
        out.push(planned(e2e(BASE, wide), d.e2e));
    }
    let nodes: &[usize] = if quick { &[2] } else { &[2, 3] };
    for &n in nodes {
        let shape = Shape {
            partitions: BASE_SHAPE.partitions,
            nodes: n,
        };
        out.push(planned(e2e(BASE, shape), d.e2e));
    }
    out.push(planned(
        Step::Latency {
            workload: Workload {
                events_per_tx: LATENCY_EVENTS_PER_TX,
                payload_bytes: 100,
            },
            shape: BASE_SHAPE,
            rate: LATENCY_RATE,
        },
        d.e2e,
    ));
    out.push(planned(
        Step::Drain {
            events: d.drain_events,
            payload_bytes: 100,
            shape: BASE_SHAPE,
        },
        0.0,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_suite_covers_every_factor_level() {
        let p = plan(false, Durations::standard());
        let names: Vec<&str> = p.iter().map(|s| s.name.as_str()).collect();
        for n in [
            "broker-ceiling-100b",
            "broker-ceiling-1kib",
            "db-ceiling-1ev-100b-16p",
            "db-ceiling-50ev-1kib-16p",
            "db-ceiling-50ev-100b-64p",
            "e2e-10ev-1kib-16p-1n",
            "e2e-50ev-100b-16p-1n",
            "e2e-50ev-100b-64p-1n",
            "e2e-50ev-100b-16p-2n",
            "e2e-50ev-100b-16p-3n",
            "overhead-1ev-100b-16p-1n",
            "latency-10k-10ev-100b-16p-1n",
            "drain-5m-100b-16p-1n",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let e2e = p
            .iter()
            .filter(|s| matches!(s.step, Step::E2e { .. }))
            .count();
        assert_eq!(e2e, 9);
        // Unique names: they are directory names.
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        // Writing time stays well under 25 minutes.
        let writing: f64 = p.iter().map(|s| s.duration_secs).sum();
        assert!(writing < 600.0, "{writing}");
    }

    #[test]
    fn every_e2e_run_has_its_ceilings_earlier_in_the_suite() {
        for quick in [false, true] {
            let p = plan(
                quick,
                if quick {
                    Durations::quick()
                } else {
                    Durations::standard()
                },
            );
            for (i, s) in p.iter().enumerate() {
                if let Step::E2e { workload, shape } = s.step {
                    let before = &p[..i];
                    let partitions = if before.iter().any(|b| {
                        b.step
                            == Step::DbCeiling {
                                workload,
                                partitions: shape.partitions,
                            }
                    }) {
                        shape.partitions
                    } else {
                        BASE_SHAPE.partitions
                    };
                    assert!(
                        before.iter().any(|b| b.step
                            == Step::DbCeiling {
                                workload,
                                partitions
                            }),
                        "{}",
                        s.name
                    );
                    assert!(before.iter().any(|b| b.step
                        == Step::BrokerCeiling {
                            payload_bytes: workload.payload_bytes
                        }));
                }
            }
        }
    }

    #[test]
    fn the_quick_suite_is_small_but_complete() {
        let p = plan(true, Durations::quick());
        assert!(p.len() <= 10, "{}", p.len());
        for kind in [
            "broker-ceiling",
            "db-ceiling",
            "e2e",
            "overhead",
            "latency",
            "drain-500k",
        ] {
            assert!(p.iter().any(|s| s.name.starts_with(kind)), "{kind}");
        }
    }
}
