//! One time base for writers and verifier: microseconds since the UNIX
//! epoch, read from the monotonic clock anchored once at start, so a wall
//! clock step during a run cannot produce negative or inflated latencies.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_unix_us: u64,
}

impl Clock {
    /// A clock whose origin is now.
    pub fn start() -> Self {
        let origin_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Self {
            origin: Instant::now(),
            origin_unix_us,
        }
    }

    /// The instant the clock was started.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    pub fn now_us(&self) -> u64 {
        self.at(Instant::now())
    }

    /// `t` as microseconds since the epoch.
    pub fn at(&self, t: Instant) -> u64 {
        self.origin_unix_us + t.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// The timestamp `offset` after the origin.
    pub fn offset_us(&self, offset: Duration) -> u64 {
        self.origin_unix_us + offset.as_micros() as u64
    }

    /// Microseconds since the epoch at the origin.
    pub fn origin_us(&self) -> u64 {
        self.origin_unix_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_follow_the_monotonic_clock() {
        let c = Clock::start();
        let later = c.origin() + Duration::from_millis(1500);
        assert_eq!(c.at(later) - c.origin_us(), 1_500_000);
        assert_eq!(c.offset_us(Duration::from_millis(2)), c.origin_us() + 2_000);
        assert!(c.now_us() >= c.origin_us());
    }
}
