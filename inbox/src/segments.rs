//! Which daily segments of the inbox should exist on a given day: the pure
//! half of retention. A segment holds the ids of the events whose time
//! falls on one UTC day; retention keeps `retention_days` whole days
//! behind today and creates `ahead_days` in advance, and everything older
//! goes by dropping its segment (no row is ever deleted one by one).

use std::fmt;

/// A UTC calendar day, as days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i64);

impl Day {
    /// The day that contains `epoch_ms`.
    pub fn of_epoch_ms(epoch_ms: i64) -> Day {
        Day(epoch_ms.div_euclid(86_400_000))
    }

    /// Seconds since the epoch at 00:00 UTC of this day.
    pub fn start_epoch_secs(self) -> i64 {
        self.0 * 86_400
    }

    /// (year, month, day) in the proleptic Gregorian calendar
    /// (H. Hinnant's `civil_from_days`).
    pub fn civil(self) -> (i64, u32, u32) {
        let z = self.0 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y, m, d)
    }

    /// The inverse of [`Day::civil`] (`days_from_civil`).
    pub fn from_civil(y: i64, m: u32, d: u32) -> Day {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(m);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Day(era * 146_097 + doe - 719_468)
    }

    /// The name of this day's segment: `inbox_YYYYMMDD`.
    pub fn segment_name(self) -> String {
        let (y, m, d) = self.civil();
        format!("{SEGMENT_PREFIX}{y:04}{m:02}{d:02}")
    }

    /// The day a segment name stands for, if it is one.
    pub fn from_segment_name(name: &str) -> Option<Day> {
        let digits = name.strip_prefix(SEGMENT_PREFIX)?;
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let y = digits[..4].parse().ok()?;
        let m = digits[4..6].parse().ok()?;
        let d = digits[6..].parse().ok()?;
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return None;
        }
        let day = Day::from_civil(y, m, d);
        (day.civil() == (y, m, d)).then_some(day)
    }

    /// `YYYY-MM-DD 00:00:00+00`, a timestamptz literal of the day's start.
    pub fn start_literal(self) -> String {
        let (y, m, d) = self.civil();
        format!("{y:04}-{m:02}-{d:02} 00:00:00+00")
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

/// Segment tables are named `inbox_YYYYMMDD`.
pub const SEGMENT_PREFIX: &str = "inbox_";

/// What retention should do today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Days whose segment is missing and must be created, oldest first.
    pub create: Vec<Day>,
    /// Days whose segment is past retention and is dropped, oldest first.
    pub drop: Vec<Day>,
    /// The oldest day kept: events older than it are filed under it.
    pub oldest: Day,
    /// The newest day with a segment: later events are filed under it.
    pub newest: Day,
}

/// Keeps the days `today - retention_days ..= today + ahead_days`: an id is
/// kept at least `retention_days` full days after its event's day ended
/// and at most one day longer.
pub fn plan(today: Day, existing: &[Day], retention_days: u32, ahead_days: u32) -> Plan {
    let oldest = Day(today.0 - i64::from(retention_days));
    let newest = Day(today.0 + i64::from(ahead_days));
    let mut drop: Vec<Day> = existing.iter().copied().filter(|d| *d < oldest).collect();
    drop.sort();
    drop.dedup();
    let create = (oldest.0..=newest.0)
        .map(Day)
        .filter(|d| !existing.contains(d))
        .collect();
    Plan {
        create,
        drop,
        oldest,
        newest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(Day(0).civil(), (1970, 1, 1));
        assert_eq!(Day::from_civil(2026, 12, 1).to_string(), "2026-12-01");
        assert_eq!(Day::from_civil(2024, 2, 29).civil(), (2024, 2, 29));
        for n in -800_000..800_000 {
            let (y, m, d) = Day(n).civil();
            assert_eq!(Day::from_civil(y, m, d), Day(n));
        }
    }

    #[test]
    fn segment_names_round_trip_and_reject_others() {
        let day = Day::from_civil(2026, 3, 7);
        assert_eq!(day.segment_name(), "inbox_20260307");
        assert_eq!(Day::from_segment_name("inbox_20260307"), Some(day));
        for bad in [
            "inbox_window",
            "inbox_2026030",
            "inbox_20261301",
            "inbox_20260230",
            "outbox_20260307",
            "inbox_2026030x",
        ] {
            assert_eq!(Day::from_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn epoch_ms_maps_to_utc_days() {
        assert_eq!(Day::of_epoch_ms(0), Day(0));
        assert_eq!(Day::of_epoch_ms(86_399_999), Day(0));
        assert_eq!(Day::of_epoch_ms(86_400_000), Day(1));
        assert_eq!(Day::of_epoch_ms(-1), Day(-1));
        assert_eq!(Day(1).start_literal(), "1970-01-02 00:00:00+00");
    }

    #[test]
    fn a_fresh_schema_gets_the_whole_window() {
        let today = Day(100);
        let p = plan(today, &[], 7, 2);
        assert_eq!(p.create, (93..=102).map(Day).collect::<Vec<_>>());
        assert!(p.drop.is_empty());
        assert_eq!((p.oldest, p.newest), (Day(93), Day(102)));
    }

    #[test]
    fn the_next_day_drops_one_and_creates_one() {
        let existing: Vec<Day> = (93..=102).map(Day).collect();
        let p = plan(Day(101), &existing, 7, 2);
        assert_eq!(p.drop, vec![Day(93)]);
        assert_eq!(p.create, vec![Day(103)]);
        // Unchanged on the same day: idempotent.
        let p = plan(Day(100), &existing, 7, 2);
        assert!(p.drop.is_empty() && p.create.is_empty());
    }

    #[test]
    fn after_a_long_pause_every_expired_segment_goes_at_once() {
        let existing: Vec<Day> = (93..=102).map(Day).collect();
        let p = plan(Day(200), &existing, 7, 2);
        assert_eq!(p.drop, existing);
        assert_eq!(p.create, (193..=202).map(Day).collect::<Vec<_>>());
    }
}
