//! Live progress on stderr, once per second, from counters the writers and
//! the verifier update.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;

/// Updated by writers (committed) and the verifier (the rest).
#[derive(Debug, Default)]
pub struct Counters {
    /// Events in committed transactions.
    pub committed: AtomicU64,
    /// Unique events received.
    pub delivered: AtomicU64,
    /// Commit-to-receive p99 so far, microseconds.
    pub p99_us: AtomicU64,
    /// Set once every writer has stopped.
    pub writing_done: AtomicBool,
}

/// One progress line from two readings a second apart.
pub fn line(
    elapsed: Duration,
    draining: bool,
    (committed, delivered): (u64, u64),
    (prev_committed, prev_delivered): (u64, u64),
    p99_us: u64,
) -> String {
    format!(
        "[{:>5.0}s] {:<8} committed {:>8}/s  delivered {:>8}/s  lag {:>8}  p99 {:>8.1} ms",
        elapsed.as_secs_f64(),
        if draining { "draining" } else { "writing" },
        committed.saturating_sub(prev_committed),
        delivered.saturating_sub(prev_delivered),
        committed.saturating_sub(delivered),
        p99_us as f64 / 1000.0,
    )
}

/// Prints a line every second until `stop`.
pub fn spawn(counters: Arc<Counters>, clock: Clock, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut prev = (0, 0);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (
                counters.committed.load(Ordering::Relaxed),
                counters.delivered.load(Ordering::Relaxed),
            );
            eprintln!(
                "{}",
                line(
                    clock.origin().elapsed(),
                    counters.writing_done.load(Ordering::Relaxed),
                    now,
                    prev,
                    counters.p99_us.load(Ordering::Relaxed),
                )
            );
            prev = now;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_shows_rates_and_lag() {
        let l = line(
            Duration::from_secs(3),
            false,
            (6000, 5900),
            (4000, 3950),
            12_345,
        );
        assert!(l.contains("committed     2000/s"), "{l}");
        assert!(l.contains("delivered     1950/s"), "{l}");
        assert!(l.contains("lag      100"), "{l}");
        assert!(l.contains("p99     12.3 ms"), "{l}");
    }
}
