//! The in-flight window of one partition: batches handed to the sink and not
//! yet reported, oldest first, and how a report splits a batch into the
//! prefix that may be acknowledged and the first failure. Pure bookkeeping,
//! no I/O.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::error::SinkError;
use crate::sink::DeliveryReport;

/// One batch in flight: its events' ids in order, the sink session it went
/// out on, and the handle that resolves when the sink is done with it.
#[derive(Debug)]
pub struct InFlight<D> {
    pub ids: Vec<Uuid>,
    pub session: u64,
    pub delivery: D,
}

/// At most `max_batches` batches in flight.
#[derive(Debug)]
pub struct Window<D> {
    batches: VecDeque<InFlight<D>>,
    max_batches: usize,
}

impl<D> Window<D> {
    pub fn new(max_batches: usize) -> Self {
        Self {
            batches: VecDeque::with_capacity(max_batches),
            max_batches: max_batches.max(1),
        }
    }

    pub fn is_full(&self) -> bool {
        self.batches.len() >= self.max_batches
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The sink session of the batches in flight (all share one).
    pub fn session(&self) -> Option<u64> {
        self.batches.back().map(|b| b.session)
    }

    pub fn push(&mut self, batch: InFlight<D>) {
        self.batches.push_back(batch);
    }

    pub fn front_mut(&mut self) -> Option<&mut InFlight<D>> {
        self.batches.front_mut()
    }

    pub fn pop_front(&mut self) -> Option<InFlight<D>> {
        self.batches.pop_front()
    }
}

/// A reported batch: how many events from its start were delivered before
/// the first failure, and that failure (index in the batch, error).
#[derive(Debug, PartialEq)]
pub struct Settled {
    pub delivered_prefix: usize,
    pub failure: Option<(usize, SinkError)>,
}

/// Splits a batch by its delivery report. Only the delivered prefix may be
/// acknowledged: an event after a failed one, even if delivered, is sent
/// again after it. A failure named by an id not in the batch (a sink that
/// lost track of a message) fails the whole batch: acknowledging anything
/// unconfirmed could lose it. An id that occurs twice fails at its first
/// place.
pub fn settle(ids: &[Uuid], report: DeliveryReport) -> Settled {
    let Some(first) = report.failed.first() else {
        return Settled {
            delivered_prefix: ids.len(),
            failure: None,
        };
    };
    if report.failed.iter().any(|(f, _)| !ids.contains(f)) {
        return Settled {
            delivered_prefix: 0,
            failure: Some((0, first.1.clone())),
        };
    }
    let at = ids
        .iter()
        .position(|id| report.failed.iter().any(|(f, _)| f == id))
        .unwrap_or(0);
    let error = report
        .failed
        .iter()
        .find(|(f, _)| *f == ids[at])
        .map(|(_, e)| e.clone())
        .unwrap_or_else(|| first.1.clone());
    Settled {
        delivered_prefix: at,
        failure: Some((at, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn window_keeps_batches_in_order_with_their_session() {
        let mut w = Window::new(2);
        assert_eq!(w.session(), None);
        w.push(InFlight {
            ids: ids(2),
            session: 3,
            delivery: "a",
        });
        assert!(!w.is_full());
        w.push(InFlight {
            ids: ids(1),
            session: 3,
            delivery: "b",
        });
        assert!(w.is_full());
        assert_eq!(w.session(), Some(3));
        assert_eq!(w.pop_front().map(|b| b.delivery), Some("a"));
        assert_eq!(w.pop_front().map(|b| b.delivery), Some("b"));
        assert!(w.is_empty());
    }

    #[test]
    fn settle_acks_everything_without_failures() {
        let s = settle(&ids(2), DeliveryReport::default());
        assert_eq!(s.delivered_prefix, 2);
        assert!(s.failure.is_none());
    }

    #[test]
    fn settle_stops_at_the_first_failure_in_batch_order() {
        let ids = ids(4);
        let late = SinkError::Transient("late".into());
        let early = SinkError::Permanent("early".into());
        // Reported out of order: the later event's failure came first.
        let report = DeliveryReport {
            failed: vec![(ids[3], late), (ids[1], early.clone())],
        };
        let s = settle(&ids, report);
        assert_eq!(s.delivered_prefix, 1);
        assert_eq!(s.failure, Some((1, early)));
    }

    #[test]
    fn settle_fails_everything_on_an_unknown_id() {
        let report = DeliveryReport {
            failed: vec![(Uuid::nil(), SinkError::Transient("?".into()))],
        };
        let s = settle(&ids(2), report);
        assert_eq!(s.delivered_prefix, 0);
        assert_eq!(s.failure.map(|f| f.0), Some(0));
    }
}
