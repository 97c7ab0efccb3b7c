//! The in-flight window of one partition: batches sent and not yet
//! acknowledged, oldest first. Pure bookkeeping, no I/O.

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

use crate::error::SinkError;
use crate::event::OutboxEvent;
use crate::sink::DeliveryReport;

/// One batch in flight: its events' positions and ids, and the handle that
/// resolves when the sink is done with it.
#[derive(Debug)]
pub struct InFlight<D> {
    pub positions: Vec<i64>,
    pub ids: Vec<Uuid>,
    pub delivery: D,
}

/// At most `max_batches` batches in flight, with the positions they hold.
#[derive(Debug)]
pub struct Window<D> {
    batches: VecDeque<InFlight<D>>,
    positions: Vec<i64>,
    max_batches: usize,
}

impl<D> Window<D> {
    pub fn new(max_batches: usize) -> Self {
        Self {
            batches: VecDeque::with_capacity(max_batches),
            positions: Vec::new(),
            max_batches: max_batches.max(1),
        }
    }

    pub fn is_full(&self) -> bool {
        self.batches.len() >= self.max_batches
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Every position in flight, for the next fetch to leave out.
    pub fn positions(&self) -> &[i64] {
        &self.positions
    }

    pub fn push(&mut self, events: &[OutboxEvent], delivery: D) {
        let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
        self.positions.extend_from_slice(&positions);
        self.batches.push_back(InFlight {
            positions,
            ids: events.iter().map(|e| e.id).collect(),
            delivery,
        });
    }

    pub fn front_mut(&mut self) -> Option<&mut InFlight<D>> {
        self.batches.front_mut()
    }

    /// Removes the oldest batch; its positions are no longer in flight.
    pub fn pop_front(&mut self) -> Option<InFlight<D>> {
        let batch = self.batches.pop_front()?;
        // Batches are appended in order, so the oldest batch's positions
        // are the head of the flat list.
        self.positions.drain(..batch.positions.len());
        Some(batch)
    }
}

/// A finished batch split into what to acknowledge and what failed.
#[derive(Debug, Default, PartialEq)]
pub struct Settled {
    pub acked: Vec<i64>,
    pub failed: Vec<(i64, SinkError)>,
}

/// Splits a batch by its delivery report. Failures the report names by an id
/// not in the batch (a sink that lost track of a message) fail the whole
/// batch: acknowledging anything unconfirmed could lose it.
pub fn settle(positions: &[i64], ids: &[Uuid], report: DeliveryReport) -> Settled {
    if report.failed.is_empty() {
        return Settled {
            acked: positions.to_vec(),
            failed: Vec::new(),
        };
    }
    let failed_ids: HashSet<Uuid> = report.failed.iter().map(|(id, _)| *id).collect();
    if failed_ids.iter().any(|id| !ids.contains(id)) {
        let err = report.failed[0].1.clone();
        return Settled {
            acked: Vec::new(),
            failed: positions.iter().map(|p| (*p, err.clone())).collect(),
        };
    }
    let mut out = Settled::default();
    for (pos, id) in positions.iter().zip(ids) {
        match report.failed.iter().find(|(f, _)| f == id) {
            Some((_, err)) => out.failed.push((*pos, err.clone())),
            None => out.acked.push(*pos),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(position: i64) -> OutboxEvent {
        OutboxEvent {
            position,
            id: Uuid::from_u128(position as u128),
            aggregate_type: "a".into(),
            aggregate_id: "1".into(),
            event_type: "e".into(),
            payload: b"{}".to_vec(),
            headers: None,
            topic: None,
            created_at_ms: 0,
        }
    }

    #[test]
    fn window_tracks_positions_in_flight() {
        let mut w = Window::new(2);
        w.push(&[ev(1), ev(2)], "a");
        assert!(!w.is_full());
        w.push(&[ev(5)], "b");
        assert!(w.is_full());
        assert_eq!(w.positions(), &[1, 2, 5]);
        let first = w.pop_front().unwrap();
        assert_eq!(first.delivery, "a");
        assert_eq!(w.positions(), &[5]);
        w.pop_front();
        assert!(w.is_empty() && w.positions().is_empty());
    }

    #[test]
    fn settle_acks_everything_without_failures() {
        let s = settle(
            &[1, 2],
            &[Uuid::from_u128(1), Uuid::from_u128(2)],
            DeliveryReport::default(),
        );
        assert_eq!(s.acked, vec![1, 2]);
        assert!(s.failed.is_empty());
    }

    #[test]
    fn settle_keeps_failed_events() {
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
        let err = SinkError::Transient("timed out".into());
        let report = DeliveryReport {
            failed: vec![(ids[1], err.clone())],
        };
        let s = settle(&[10, 11, 12], &ids, report);
        assert_eq!(s.acked, vec![10, 12]);
        assert_eq!(s.failed, vec![(11, err)]);
    }

    #[test]
    fn settle_fails_everything_on_an_unknown_id() {
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2)];
        let report = DeliveryReport {
            failed: vec![(Uuid::nil(), SinkError::Transient("?".into()))],
        };
        let s = settle(&[10, 11], &ids, report);
        assert!(s.acked.is_empty());
        assert_eq!(s.failed.len(), 2);
    }
}
