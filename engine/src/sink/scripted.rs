//! A sink whose failures are scripted, for deterministic tests of the relay
//! (polling and CDC alike). It records every event handed to it, with the
//! session and the time, and what a broker would have: the deliveries, in
//! the order it reported them.
//!
//! Its failures follow librdkafka's: an event that fails in a report does
//! not stop the later events of its batch from landing (a timed-out message
//! is skipped by an epoch bump and later ones are written), and a purge
//! fails every batch in flight and starts a new session.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::SinkError;
use crate::event::OutboxEvent;
use crate::sink::{Delivery, DeliveryReport, SendOptions, Sent, Sink};

/// What happens to an event the next time it is handed over.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Refused at once: it and the rest of its batch are not handed over.
    Refuse(SinkError),
    /// Handed over, then reported failed (the rest of its batch lands).
    Fail(SinkError),
}

/// One event handed to the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Handed {
    pub position: i64,
    pub id: Uuid,
    pub aggregate_id: String,
    pub session: u64,
    pub at: Instant,
    pub deadline: Instant,
}

struct Pending {
    ids: Vec<Uuid>,
    failed: Vec<(Uuid, SinkError)>,
    tx: oneshot::Sender<DeliveryReport>,
}

#[derive(Default)]
struct State {
    session: u64,
    /// Per event, the faults of its next hand-overs.
    faults: HashMap<Uuid, VecDeque<Fault>>,
    /// Faults of whole batches, by batch number (1 = the first batch sent).
    batch_faults: HashMap<usize, SinkError>,
    batches: usize,
    hold: bool,
    pending: VecDeque<Pending>,
    handed: Vec<Handed>,
    delivered: Vec<Uuid>,
    aggregates: HashMap<Uuid, String>,
}

/// The scripted sink. Clones share one state.
#[derive(Clone, Default)]
pub struct ScriptedSink {
    state: Arc<Mutex<State>>,
}

impl ScriptedSink {
    pub fn new() -> Self {
        let s = Self::default();
        s.lock().session = 1;
        s
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `times` hand-overs of `id` meet `fault`.
    pub fn script(&self, id: Uuid, fault: Fault, times: usize) {
        let mut s = self.lock();
        let q = s.faults.entry(id).or_default();
        q.extend(std::iter::repeat_n(fault, times));
    }

    /// Removes the faults left for `id`.
    pub fn clear(&self, id: Uuid) {
        self.lock().faults.remove(&id);
    }

    /// Every event of the `n`-th batch sent (from 1) fails with `error`.
    pub fn fail_batch(&self, n: usize, error: SinkError) {
        self.lock().batch_faults.insert(n, error);
    }

    /// Holds reports back until [`report`](Self::report) or
    /// [`report_all`](Self::report_all); without holding, a batch is
    /// reported as soon as it is sent.
    pub fn hold_reports(&self, hold: bool) {
        self.lock().hold = hold;
    }

    /// Reports the `i`-th unreported batch (0 = oldest), out of order if
    /// `i > 0`. Returns false if there is none.
    pub fn report(&self, i: usize) -> bool {
        let mut s = self.lock();
        let Some(p) = s.pending.remove(i) else {
            return false;
        };
        s.finish(p);
        true
    }

    pub fn report_all(&self) {
        let mut s = self.lock();
        while let Some(p) = s.pending.pop_front() {
            s.finish(p);
        }
    }

    /// Batches not reported yet.
    pub fn unreported(&self) -> usize {
        self.lock().pending.len()
    }

    /// A producer reset: every unreported batch fails (nothing of it
    /// lands) and a new session starts.
    pub fn purge(&self) {
        let mut s = self.lock();
        let purged = SinkError::Transient("purged by a producer reset".into());
        while let Some(mut p) = s.pending.pop_front() {
            p.failed = p.ids.iter().map(|id| (*id, purged.clone())).collect();
            let _ = p.tx.send(DeliveryReport { failed: p.failed });
        }
        s.session += 1;
    }

    pub fn handed(&self) -> Vec<Handed> {
        self.lock().handed.clone()
    }

    /// Event ids as a broker would have them, in the order they landed.
    pub fn delivered(&self) -> Vec<Uuid> {
        self.lock().delivered.clone()
    }

    /// Per aggregate, first deliveries that came after a later event of the
    /// same aggregate (by position) had landed.
    pub fn first_delivery_violations(&self, position_of: impl Fn(Uuid) -> i64) -> usize {
        let s = self.lock();
        let mut seen = std::collections::HashSet::new();
        let mut last: HashMap<&str, i64> = HashMap::new();
        let mut violations = 0;
        for id in &s.delivered {
            if !seen.insert(*id) {
                continue;
            }
            let agg = s.aggregates.get(id).map(String::as_str).unwrap_or("");
            let pos = position_of(*id);
            if let Some(prev) = last.insert(agg, pos) {
                if pos < prev {
                    violations += 1;
                }
            }
        }
        violations
    }
}

impl State {
    fn finish(&mut self, p: Pending) {
        for id in &p.ids {
            if !p.failed.iter().any(|(f, _)| f == id) {
                self.delivered.push(*id);
            }
        }
        let _ = p.tx.send(DeliveryReport { failed: p.failed });
    }
}

impl Sink for ScriptedSink {
    async fn send(&self, events: &[OutboxEvent], options: SendOptions) -> Result<Sent, SinkError> {
        let mut s = self.lock();
        if let Some(expected) = options.session {
            if expected != s.session {
                return Err(SinkError::Transient("session changed".into()));
            }
        }
        s.batches += 1;
        let n = s.batches;
        let batch_fault = s.batch_faults.remove(&n);
        let (tx, delivery) = Delivery::channel();
        let mut pending = Pending {
            ids: Vec::with_capacity(events.len()),
            failed: Vec::new(),
            tx,
        };
        let mut accepted = events.len();
        let now = Instant::now();
        for (i, e) in events.iter().enumerate() {
            if i >= accepted {
                pending
                    .failed
                    .push((e.id, SinkError::Transient("held back".into())));
                pending.ids.push(e.id);
                continue;
            }
            if now >= options.deadline {
                accepted = i;
                pending
                    .failed
                    .push((e.id, SinkError::Transient("past deadline".into())));
                pending.ids.push(e.id);
                continue;
            }
            let fault = s.faults.get_mut(&e.id).and_then(VecDeque::pop_front);
            if let Some(Fault::Refuse(err)) = &fault {
                accepted = i;
                pending.failed.push((e.id, err.clone()));
                pending.ids.push(e.id);
                continue;
            }
            let session = s.session;
            s.handed.push(Handed {
                position: e.position,
                id: e.id,
                aggregate_id: e.aggregate_id.clone(),
                session,
                at: now,
                deadline: options.deadline,
            });
            s.aggregates.insert(e.id, e.aggregate_id.clone());
            pending.ids.push(e.id);
            if let Some(Fault::Fail(err)) = fault {
                pending.failed.push((e.id, err));
            } else if let Some(err) = &batch_fault {
                pending.failed.push((e.id, err.clone()));
            }
        }
        let session = s.session;
        if s.hold {
            s.pending.push_back(pending);
        } else {
            s.finish(pending);
        }
        Ok(Sent {
            delivery,
            session,
            accepted,
        })
    }

    async fn check(&self) -> Result<(), SinkError> {
        Ok(())
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(3)
    }

    async fn purge(&self) {
        ScriptedSink::purge(self);
    }
}
