//! Once-a-second samples of a measurement (what goes in, what comes out,
//! what is in between) and what they say about lag: its peak and whether
//! it stayed bounded while the load ran. Pure; `progress` takes the
//! readings.
//!
//! One sample type serves every kind of run. `committed` is what entered
//! the system, `delivered` what came out, `lag` the difference:
//!
//! | run | committed | delivered | lag |
//! |---|---|---|---|
//! | e2e | events committed | unique events consumed | committed − delivered |
//! | db ceiling | events committed | – | – |
//! | broker ceiling | messages handed to librdkafka | acknowledged | in flight |
//! | drain | the backlog | relayed (left the outbox) | still in the outbox |

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A cumulative reading of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// Since the start of the load.
    pub at: Duration,
    pub committed: u64,
    /// `None` when nothing is consumed (db ceiling).
    pub delivered: Option<u64>,
    /// Latency p99 so far, microseconds, where one is measured.
    pub p99_us: Option<u64>,
    /// Whether the load was still being written.
    pub writing: bool,
}

/// Whether the load was still being written when a sample was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Writing,
    Draining,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Phase::Writing => "writing",
            Phase::Draining => "draining",
        })
    }
}

/// One point of `report.json`'s `timeseries`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the start of the load.
    pub t_secs: f64,
    /// `writing` while the load runs, then `draining`.
    pub phase: Phase,
    pub committed: u64,
    pub delivered: Option<u64>,
    pub committed_per_sec: f64,
    pub delivered_per_sec: Option<f64>,
    pub lag: Option<u64>,
    pub p99_ms: Option<f64>,
}

impl Sample {
    /// The sample at `now`, rates taken over the interval since `prev`
    /// (its real length, not an assumed second).
    pub fn between(prev: &Reading, now: &Reading) -> Self {
        let dt = now.at.saturating_sub(prev.at).as_secs_f64();
        let rate = |a: u64, b: u64| {
            if dt > 0.0 {
                b.saturating_sub(a) as f64 / dt
            } else {
                0.0
            }
        };
        Self {
            t_secs: round3(now.at.as_secs_f64()),
            phase: if now.writing {
                Phase::Writing
            } else {
                Phase::Draining
            },
            committed: now.committed,
            delivered: now.delivered,
            committed_per_sec: round1(rate(prev.committed, now.committed)),
            delivered_per_sec: now
                .delivered
                .map(|d| round1(rate(prev.delivered.unwrap_or(0), d))),
            lag: now.delivered.map(|d| now.committed.saturating_sub(d)),
            p99_ms: now.p99_us.map(|us| us as f64 / 1000.0),
        }
    }

    pub fn writing(&self) -> bool {
        self.phase == Phase::Writing
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Lag growth, as a share of the commit rate, up to which lag counts as
/// bounded: the noise of a consumer that keeps up, not a trend.
pub const LAG_GROWTH_TOLERANCE: f64 = 0.05;

/// What the lag did while the load ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LagSummary {
    /// Highest lag seen, in events.
    pub max: u64,
    /// Lag at the last sample of the writing phase.
    pub at_end_of_load: u64,
    /// Least-squares slope of lag over the second half of the writing
    /// phase, events per second: about 0 when the engine keeps up, the
    /// commit rate minus the relay rate when it does not.
    pub growth_eps: f64,
    /// `growth_eps` stayed within [`LAG_GROWTH_TOLERANCE`] of the commit
    /// rate, or the lag over the second half never exceeded one second of
    /// commits (a short run's noise is not a trend). Too few samples to
    /// fit a slope count as bounded only if the lag never exceeded one
    /// second of commits.
    pub bounded: bool,
}

/// The lag summary of `samples`, `None` when they carry no lag.
pub fn lag_summary(samples: &[Sample], commit_rate_eps: f64) -> Option<LagSummary> {
    let lagged: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.writing())
        .filter_map(|s| s.lag.map(|l| (s.t_secs, l as f64)))
        .collect();
    let max = samples.iter().filter_map(|s| s.lag).max()?;
    let at_end_of_load = lagged.last().map_or(0, |&(_, l)| l as u64);
    let second_half = &lagged[lagged.len() / 2..];
    let one_second = commit_rate_eps.max(1.0);
    let (growth_eps, bounded) = match slope(second_half) {
        Some(g) if second_half.len() >= 3 => {
            let late_max = second_half.iter().map(|p| p.1).fold(0.0, f64::max);
            (
                g,
                g <= LAG_GROWTH_TOLERANCE * commit_rate_eps || late_max <= one_second,
            )
        }
        other => (other.unwrap_or(0.0), max as f64 <= one_second),
    };
    Some(LagSummary {
        max,
        at_end_of_load,
        growth_eps: round1(growth_eps),
        bounded,
    })
}

/// Least-squares slope of `y` over `x`; `None` for fewer than two points
/// or a single `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(ms: u64, committed: u64, delivered: u64, writing: bool) -> Reading {
        Reading {
            at: Duration::from_millis(ms),
            committed,
            delivered: Some(delivered),
            p99_us: Some(12_500),
            writing,
        }
    }

    #[test]
    fn rates_use_the_real_interval() {
        let s = Sample::between(
            &reading(1_000, 1_000, 900, true),
            &reading(2_500, 4_000, 3_900, true),
        );
        assert_eq!(s.t_secs, 2.5);
        assert_eq!(s.committed_per_sec, 2_000.0);
        assert_eq!(s.delivered_per_sec, Some(2_000.0));
        assert_eq!(s.lag, Some(100));
        assert_eq!(s.p99_ms, Some(12.5));
        assert_eq!(s.phase, Phase::Writing);
    }

    #[test]
    fn without_a_consumer_there_is_no_lag() {
        let prev = Reading::default();
        let now = Reading {
            at: Duration::from_secs(1),
            committed: 10,
            ..Reading::default()
        };
        let s = Sample::between(&prev, &now);
        assert_eq!(
            (s.delivered, s.lag, s.delivered_per_sec),
            (None, None, None)
        );
        assert_eq!(s.phase, Phase::Draining);
        assert_eq!(format!("[{:<9}]", s.phase), "[draining ]");
        assert_eq!(serde_json::to_value(s.phase).unwrap(), "draining");
        assert!(lag_summary(&[s], 10.0).is_none());
    }

    fn series(lags: &[u64]) -> Vec<Sample> {
        let mut prev = Reading::default();
        lags.iter()
            .enumerate()
            .map(|(i, &lag)| {
                let committed = 10_000 * (i as u64 + 1);
                let now = reading(1_000 * (i as u64 + 1), committed, committed - lag, true);
                let s = Sample::between(&prev, &now);
                prev = now;
                s
            })
            .collect()
    }

    #[test]
    fn a_lag_that_hovers_is_bounded() {
        let s = series(&[500, 800, 300, 900, 400, 700, 500, 600, 450, 650]);
        let l = lag_summary(&s, 10_000.0).expect("lag");
        assert!(l.bounded, "{l:?}");
        assert_eq!((l.max, l.at_end_of_load), (900, 650));
    }

    #[test]
    fn a_lag_that_grows_is_not() {
        // The relay falls 2,000 events/s behind 10,000 commits/s.
        let lags: Vec<u64> = (1..=10).map(|i| 2_000 * i).collect();
        let l = lag_summary(&series(&lags), 10_000.0).expect("lag");
        assert!(!l.bounded, "{l:?}");
        assert!((l.growth_eps - 2_000.0).abs() < 1.0, "{l:?}");
    }

    #[test]
    fn noise_under_a_second_of_commits_is_not_growth() {
        // A rising tail, but never more than 1 s of the 10,000/s commits.
        let l = lag_summary(
            &series(&[500, 800, 300, 900, 1_000, 3_000, 6_000, 9_000]),
            10_000.0,
        )
        .expect("lag");
        assert!(l.growth_eps > 500.0 && l.bounded, "{l:?}");
    }

    #[test]
    fn short_runs_are_judged_by_the_peak() {
        assert!(lag_summary(&series(&[100, 200]), 10_000.0).unwrap().bounded);
        assert!(
            !lag_summary(&series(&[100, 20_000]), 10_000.0)
                .unwrap()
                .bounded
        );
    }

    #[test]
    fn slope_of_a_line() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some(2.0));
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }
}
