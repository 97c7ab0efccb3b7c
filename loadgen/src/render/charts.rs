//! The charts of a run: throughput and lag over time from its samples,
//! latency percentile curves from its histograms; which charts each kind
//! of run has, and what their lines are called.

use hdrhistogram::Histogram;

use crate::hgrm;
use crate::plot::{Chart, XAxis};
use crate::report::histogram as h;
use crate::report::AnyReport;
use crate::timeseries::Sample;

/// The label of a histogram's curve in `latency.svg`.
fn curve(name: &str) -> &str {
    match name {
        h::COMMIT_TO_RECEIVE => "commit → receive",
        h::COMMIT_TO_APPEND => "commit → broker append",
        h::INTENDED_TO_RECEIVE => "intended → receive",
        h::TRANSACTION => "transaction",
        h::SEND_TO_ACK => "send → ack",
        other => other,
    }
}

/// The charts of `report`, as (file stem, chart), in the order they are
/// written; `histograms` are the report's, decoded. A report without
/// histograms (written before they were kept) gets no latency chart.
pub fn of(
    report: &AnyReport,
    histograms: &[(String, Histogram<u64>)],
) -> Vec<(&'static str, Chart)> {
    let title = |what: &str| format!("{what}: {}", report.name());
    let ts = report.timeseries();
    let mut out = match report {
        AnyReport::E2e(_) => vec![
            (
                "throughput",
                throughput(
                    &title("throughput"),
                    ts,
                    Some("committed/s"),
                    Some("delivered/s"),
                ),
            ),
            ("lag", lag(&title("lag (committed − delivered)"), ts, "lag")),
        ],
        AnyReport::WriteOnly(_) => vec![(
            "throughput",
            throughput(&title("throughput"), ts, Some("committed/s"), None),
        )],
        AnyReport::Broker(_) => vec![
            (
                "throughput",
                throughput(&title("throughput"), ts, Some("sent/s"), Some("acked/s")),
            ),
            (
                "lag",
                lag(&title("in flight (sent − acked)"), ts, "in flight"),
            ),
        ],
        AnyReport::Drain(_) => vec![
            (
                "throughput",
                throughput(&title("drain rate"), ts, None, Some("relayed/s (estimate)")),
            ),
            (
                "lag",
                lag(
                    &title("backlog left in the outbox"),
                    ts,
                    "events left (estimate)",
                ),
            ),
        ],
    };
    if !histograms.is_empty() {
        let curves: Vec<(&str, &Histogram<u64>)> =
            histograms.iter().map(|(n, h)| (curve(n), h)).collect();
        out.push(("latency", latency(&title("latency"), &curves)));
    }
    out
}

/// Where the load stopped: the time of the last `writing` sample, if the
/// run went on draining after it.
fn end_of_load(samples: &[Sample]) -> Option<f64> {
    let last_writing = samples.iter().rposition(Sample::writing)?;
    (last_writing + 1 < samples.len()).then(|| samples[last_writing].t_secs)
}

fn with_end_marker(chart: Chart, samples: &[Sample]) -> Chart {
    match end_of_load(samples) {
        Some(t) => chart.marker(t, "load ends"),
        None => chart,
    }
}

/// What went in and what came out, per second. `None` leaves a series out
/// (a db ceiling delivers nothing; a drain commits nothing while it runs).
pub fn throughput(
    title: &str,
    samples: &[Sample],
    committed: Option<&str>,
    delivered: Option<&str>,
) -> Chart {
    let mut chart = Chart::new(title, "time since start (s)", "events/s", XAxis::Linear);
    if let Some(name) = committed {
        chart = chart.series(
            name,
            samples
                .iter()
                .map(|s| (s.t_secs, s.committed_per_sec))
                .collect(),
        );
    }
    if let Some(name) = delivered {
        chart = chart.series(
            name,
            samples
                .iter()
                .filter_map(|s| s.delivered_per_sec.map(|d| (s.t_secs, d)))
                .collect(),
        );
    }
    with_end_marker(chart, samples)
}

/// Lag (or backlog) over time.
pub fn lag(title: &str, samples: &[Sample], name: &str) -> Chart {
    let chart = Chart::new(title, "time since start (s)", "events", XAxis::Linear).series(
        name,
        samples
            .iter()
            .filter_map(|s| s.lag.map(|l| (s.t_secs, l as f64)))
            .collect(),
    );
    with_end_marker(chart, samples)
}

/// Percentile curves of microsecond histograms, in milliseconds.
pub fn latency(title: &str, curves: &[(&str, &Histogram<u64>)]) -> Chart {
    let mut chart = Chart::new(
        title,
        "percentile (log scale of 1/(1-p))",
        "latency (ms)",
        XAxis::Percentile,
    );
    for (name, h) in curves {
        let points = hgrm::points(h)
            .iter()
            .filter_map(|p| p.inverted().map(|x| (x, p.value_ms)))
            .collect();
        chart = chart.series(name, points);
    }
    chart
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::svg::check_well_formed;
    use crate::timeseries::Reading;
    use std::time::Duration;

    fn samples() -> Vec<Sample> {
        let mut prev = Reading::default();
        (1..=6u64)
            .map(|i| {
                let committed = 1_000 * i.min(4);
                let now = Reading {
                    at: Duration::from_secs(i),
                    committed,
                    delivered: Some(committed.saturating_sub(300 / i)),
                    p99_us: Some(5_000),
                    writing: i <= 4,
                };
                let s = Sample::between(&prev, &now);
                prev = now;
                s
            })
            .collect()
    }

    #[test]
    fn time_charts_mark_the_end_of_the_load() {
        let s = samples();
        assert_eq!(end_of_load(&s), Some(4.0));
        let t = throughput("t", &s, Some("committed/s"), Some("delivered/s"));
        assert_eq!(t.series.len(), 2);
        assert_eq!(t.series[1].points.len(), 6);
        assert_eq!(t.markers[0].x, 4.0);
        let l = lag("l", &s, "lag");
        assert_eq!(l.series[0].points[0], (1.0, 300.0));
        for svg in [t.to_svg(), l.to_svg()] {
            check_well_formed(&svg).unwrap_or_else(|e| panic!("{e}"));
        }
        // Without a draining phase there is nothing to mark.
        assert_eq!(end_of_load(&s[..4]), None);
    }

    #[test]
    fn latency_curves_leave_out_the_100th_percentile() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in 1..=10_000u64 {
            h.record(us).unwrap();
        }
        let c = latency("latency", &[("commit→receive", &h)]);
        let pts = &c.series[0].points;
        assert!(pts.len() > 20);
        assert_eq!(pts[0].0, 1.0);
        assert!(pts.iter().all(|p| p.0.is_finite()));
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        check_well_formed(&c.to_svg()).unwrap_or_else(|e| panic!("{e}"));
    }
}
