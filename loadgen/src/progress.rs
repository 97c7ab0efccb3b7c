//! Live progress on stderr once a second, from counters the writers and
//! the verifier (or producer, or drain poller) update; the same readings
//! become the run's time series.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::timeseries::{Reading, Sample};

/// Updated by writers (committed) and the verifier (the rest).
#[derive(Debug, Default)]
pub struct Counters {
    /// Events in committed transactions.
    pub committed: AtomicU64,
    /// Unique events received.
    pub delivered: AtomicU64,
    /// Latency p99 so far, microseconds.
    pub p99_us: AtomicU64,
    /// Set once every writer has stopped.
    pub writing_done: AtomicBool,
}

/// What the counters mean in a given kind of run.
#[derive(Debug, Clone, Copy)]
pub struct Labels {
    /// Empty to leave the committed rate out of the live line (a drain
    /// commits nothing while it runs).
    pub committed: &'static str,
    /// `None` when nothing comes out (db ceiling).
    pub delivered: Option<&'static str>,
    /// Whether `p99_us` is measured.
    pub p99: bool,
}

pub const E2E: Labels = Labels {
    committed: "committed",
    delivered: Some("delivered"),
    p99: true,
};
pub const WRITE_ONLY: Labels = Labels {
    committed: "committed",
    delivered: None,
    p99: false,
};

impl Counters {
    fn reading(&self, at: Duration, labels: Labels) -> Reading {
        Reading {
            at,
            committed: self.committed.load(Ordering::Relaxed),
            delivered: labels
                .delivered
                .map(|_| self.delivered.load(Ordering::Relaxed)),
            p99_us: labels.p99.then(|| self.p99_us.load(Ordering::Relaxed)),
            writing: !self.writing_done.load(Ordering::Relaxed),
        }
    }
}

/// One progress line.
pub fn line(s: &Sample, labels: Labels) -> String {
    let mut l = format!("[{:>5.0}s] {:<8}", s.t_secs, s.phase);
    if !labels.committed.is_empty() {
        l.push_str(&format!(
            " {} {:>8.0}/s",
            labels.committed, s.committed_per_sec
        ));
    }
    if let (Some(name), Some(rate), Some(lag)) = (labels.delivered, s.delivered_per_sec, s.lag) {
        l.push_str(&format!("  {name} {rate:>8.0}/s  lag {lag:>8}"));
    }
    if let Some(p99) = s.p99_ms {
        l.push_str(&format!("  p99 {p99:>8.1} ms"));
    }
    l
}

/// Prints a line every second until `stop`; returns the samples, the
/// last one taken at `stop` if at least 200 ms passed since the one
/// before.
pub fn spawn(
    counters: Arc<Counters>,
    clock: Clock,
    stop: CancellationToken,
    labels: Labels,
) -> JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut prev = counters.reading(Duration::ZERO, labels);
        let mut samples = Vec::new();
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            let now = counters.reading(clock.origin().elapsed(), labels);
            if stopping && now.at.saturating_sub(prev.at) < Duration::from_millis(200) {
                return samples;
            }
            let sample = Sample::between(&prev, &now);
            if !stopping {
                eprintln!("{}", line(&sample, labels));
            }
            samples.push(sample);
            prev = now;
            if stopping {
                return samples;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_shows_rates_and_lag() {
        let c = Counters::default();
        c.committed.store(4000, Ordering::Relaxed);
        c.delivered.store(3950, Ordering::Relaxed);
        let prev = c.reading(Duration::from_secs(2), E2E);
        c.committed.store(6000, Ordering::Relaxed);
        c.delivered.store(5900, Ordering::Relaxed);
        c.p99_us.store(12_345, Ordering::Relaxed);
        let now = c.reading(Duration::from_secs(3), E2E);
        let l = line(&Sample::between(&prev, &now), E2E);
        assert!(l.contains("committed     2000/s"), "{l}");
        assert!(l.contains("delivered     1950/s"), "{l}");
        assert!(l.contains("lag      100"), "{l}");
        assert!(l.contains("p99     12.3 ms"), "{l}");
        let w = line(
            &Sample::between(&prev, &c.reading(Duration::from_secs(3), WRITE_ONLY)),
            WRITE_ONLY,
        );
        assert!(!w.contains("delivered") && !w.contains("p99"), "{w}");
    }

    #[tokio::test(start_paused = true)]
    async fn samples_are_taken_every_second() {
        let counters = Arc::new(Counters::default());
        counters.committed.store(300, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let task = spawn(Arc::clone(&counters), Clock::start(), stop.clone(), E2E);
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        stop.cancel();
        let samples = task.await.expect("samples");
        // One per tick; the one at `stop` only if 200 ms of (real) time
        // passed since the last.
        assert!((3..=4).contains(&samples.len()), "{samples:?}");
        assert!(samples
            .iter()
            .all(|s| s.committed == 300 && s.phase == crate::timeseries::Phase::Writing));
    }
}
