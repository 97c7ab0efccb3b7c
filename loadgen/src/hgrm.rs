//! Latency histograms as `.hgrm` text: HdrHistogram's percentile
//! distribution (`outputPercentileDistribution` in the Java library), the
//! format HdrHistogram's online plotter and `hdr-plot` read. Values are
//! recorded in microseconds and written in milliseconds.
//!
//! Also the percentile curve itself, as points for the latency chart.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Percentile steps per halving of the distance to 100%, as in the Java
/// library's default output.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Microseconds per millisecond: the output unit scaling ratio.
pub const US_PER_MS: f64 = 1000.0;

/// One line of the distribution: the value at or below which `quantile`
/// of the recordings fall.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub value_ms: f64,
    pub quantile: f64,
    pub total_count: u64,
}

impl Point {
    /// `1/(1-quantile)`, the x of a percentile plot; `None` at 100%.
    pub fn inverted(&self) -> Option<f64> {
        (self.quantile < 1.0).then(|| 1.0 / (1.0 - self.quantile))
    }
}

/// The percentile curve of `h` (recorded in microseconds).
pub fn points(h: &Histogram<u64>) -> Vec<Point> {
    let mut total = 0;
    h.iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .map(|v| {
            total += v.count_since_last_iteration();
            Point {
                value_ms: v.value_iterated_to() as f64 / US_PER_MS,
                quantile: v.quantile_iterated_to(),
                total_count: total,
            }
        })
        .collect()
}

/// Sub-buckets per bucket of a histogram with `sigfig` significant
/// digits: the power of two at or above `2 * 10^sigfig`.
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10u64.pow(u32::from(sigfig))).next_power_of_two()
}

/// The `.hgrm` text of `h`.
pub fn percentile_distribution(h: &Histogram<u64>) -> String {
    let digits = usize::from(h.sigfig());
    let mut s = String::new();
    let _ = write!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for p in points(h) {
        match p.inverted() {
            Some(inv) => {
                let _ = writeln!(
                    s,
                    "{:>12.digits$} {:>2.12} {:>10} {:>14.2}",
                    p.value_ms, p.quantile, p.total_count, inv
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "{:>12.digits$} {:>2.12} {:>10}",
                    p.value_ms, p.quantile, p.total_count
                );
            }
        }
    }
    let (mean, stdev) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (h.mean() / US_PER_MS, h.stdev() / US_PER_MS)
    };
    let _ = writeln!(
        s,
        "#[Mean    = {mean:>12.digits$}, StdDeviation   = {stdev:>12.digits$}]"
    );
    let _ = writeln!(
        s,
        "#[Max     = {:>12.digits$}, Total count    = {:>12}]",
        h.max() as f64 / US_PER_MS,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values_us: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in values_us {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn the_layout_is_hdrhistograms() {
        let h = histogram((1..=1000).map(|i| i * 100));
        let text = percentile_distribution(&h);
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("       Value     Percentile TotalCount 1/(1-Percentile)")
        );
        assert_eq!(lines.next(), Some(""));
        let first: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(first, ["0.100", "0.000000000000", "1", "1.00"]);
        // Data lines: four columns, the last one three; quantiles rise.
        let data: Vec<Vec<f64>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        let (last, body) = data.split_last().unwrap();
        assert!(body.iter().all(|row| row.len() == 4));
        assert_eq!(last.len(), 3);
        assert_eq!(last[1], 1.0);
        assert_eq!(last[2], 1000.0);
        assert!(data.windows(2).all(|w| w[0][1] <= w[1][1]));
        assert!((last[0] - 100.0).abs() < 0.1, "{last:?}");
        // The p50 line is at about 50 ms.
        let p50 = data.iter().find(|r| r[1] >= 0.5).unwrap();
        assert!((p50[0] - 50.0).abs() < 0.1, "{p50:?}");
        assert!(text.contains("#[Mean    =       50.0"), "{text}");
        assert!(text.contains("Total count    =         1000]"), "{text}");
        assert!(text.ends_with("SubBuckets     =         2048]\n"), "{text}");
    }

    #[test]
    fn an_empty_histogram_has_a_header_and_a_footer() {
        let text = percentile_distribution(&histogram([]));
        assert!(text.starts_with("       Value"));
        assert!(text.contains("#[Mean    =        0.000"), "{text}");
        assert!(text.contains("Total count    =            0]"), "{text}");
    }

    #[test]
    fn inverted_percentiles() {
        let p = |quantile| Point {
            value_ms: 1.0,
            quantile,
            total_count: 1,
        };
        assert_eq!(p(0.0).inverted(), Some(1.0));
        assert!((p(0.99).inverted().unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(p(1.0).inverted(), None);
        assert_eq!(sub_bucket_count(3), 2048);
        assert_eq!(sub_bucket_count(2), 256);
    }
}
