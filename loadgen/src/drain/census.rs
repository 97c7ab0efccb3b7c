//! Counting a drained backlog by consuming it: a slot per event (the
//! backlog is numbered 0..N by `seq`), so millions of events cost a few
//! bytes each rather than a hash map entry, and a per-aggregate last `seq`
//! for order. Pure; the consumer loop feeds it.

use crate::verifier::Location;

/// No delivery yet.
const EMPTY: Location = Location {
    partition: -1,
    offset: -1,
};

pub struct Census {
    first: Vec<Location>,
    last_seq: Vec<Option<u64>>,
    pub unique: u64,
    /// Delivered again from another partition or offset: published twice.
    pub duplicates: u64,
    /// The same partition and offset read again: the consumer's doing.
    pub rereads: u64,
    pub order_violations: u64,
    /// Unreadable, or a `seq` or key outside the backlog.
    pub malformed: u64,
}

impl Census {
    pub fn new(events: u64, aggregates: usize) -> Self {
        Self {
            first: vec![EMPTY; events as usize],
            last_seq: vec![None; aggregates],
            unique: 0,
            duplicates: 0,
            rereads: 0,
            order_violations: 0,
            malformed: 0,
        }
    }

    pub fn events(&self) -> u64 {
        self.first.len() as u64
    }

    pub fn complete(&self) -> bool {
        self.unique == self.events()
    }

    /// A message with its `seq` and aggregate index, read at `at`.
    pub fn on_message(&mut self, seq: u64, aggregate: usize, at: Location) {
        let (Some(slot), Some(last)) = (
            usize::try_from(seq)
                .ok()
                .and_then(|s| self.first.get_mut(s)),
            self.last_seq.get_mut(aggregate),
        ) else {
            self.malformed += 1;
            return;
        };
        if *slot != EMPTY {
            if *slot == at {
                self.rereads += 1;
            } else {
                self.duplicates += 1;
            }
            return;
        }
        *slot = at;
        self.unique += 1;
        if last.is_some_and(|l| seq <= l) {
            self.order_violations += 1;
        }
        *last = Some(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: i64) -> Location {
        Location {
            partition: 0,
            offset,
        }
    }

    #[test]
    fn counts_unique_duplicates_rereads_and_order() {
        let mut c = Census::new(4, 2);
        c.on_message(0, 0, at(0));
        c.on_message(2, 0, at(1));
        c.on_message(1, 1, at(2));
        c.on_message(0, 0, at(0)); // read again
        c.on_message(0, 0, at(9)); // published again
        assert_eq!((c.unique, c.rereads, c.duplicates), (3, 1, 1));
        assert!(!c.complete());
        c.on_message(3, 1, at(3));
        assert!(c.complete());
        assert_eq!(c.order_violations, 0);
    }

    #[test]
    fn a_lower_seq_after_a_higher_one_is_a_violation() {
        let mut c = Census::new(10, 1);
        c.on_message(5, 0, at(0));
        c.on_message(3, 0, at(1));
        assert_eq!(c.order_violations, 1);
    }

    #[test]
    fn out_of_range_is_malformed() {
        let mut c = Census::new(2, 1);
        c.on_message(2, 0, at(0));
        c.on_message(0, 1, at(0));
        assert_eq!((c.malformed, c.unique), (2, 0));
    }
}
