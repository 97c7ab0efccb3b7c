//! Exponential backoff with full jitter, so that workers that failed
//! together do not retry together.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The ceiling of the next wait: min × 2^attempt, at least twice min
    /// (workers that failed together also spread their first retry), capped
    /// at max.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.min
            .saturating_mul(factor)
            .max(self.min.saturating_mul(2))
            .min(self.max)
    }

    /// The next wait, drawn between min and the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let lo = self.min.as_micros() as u64;
        let hi = (ceiling.as_micros() as u64).max(lo);
        Duration::from_micros(rand::thread_rng().gen_range(lo..=hi))
    }

    /// How many delays were drawn since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceilings = vec![];
        for _ in 0..8 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(100) && d <= ceiling);
        }
        assert_eq!(ceilings, vec![200, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(200));
    }

    #[test]
    fn the_first_retries_of_workers_that_failed_together_are_spread() {
        let firsts: std::collections::HashSet<Duration> = (0..16)
            .map(|_| Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).next_delay())
            .collect();
        assert!(firsts.len() > 8, "{firsts:?}");
        assert!(firsts
            .iter()
            .all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_millis(200)));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(1));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }
}
