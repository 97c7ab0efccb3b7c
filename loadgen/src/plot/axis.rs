//! Axis arithmetic: round tick steps (1, 2, 5 × 10^n), compact tick
//! labels, and the percentile axis (decades of `1/(1-p)`).

/// A linear axis from 0 (or below, for data below 0) to a round maximum.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticks {
    pub step: f64,
    pub values: Vec<f64>,
}

impl Ticks {
    pub fn max(&self) -> f64 {
        self.values.last().copied().unwrap_or(1.0)
    }
    pub fn min(&self) -> f64 {
        self.values.first().copied().unwrap_or(0.0)
    }
}

/// A round step that splits `span` into about `target` intervals.
pub fn nice_step(span: f64, target: usize) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let residual = raw / magnitude;
    let nice = if residual <= 1.0 {
        1.0
    } else if residual <= 2.0 {
        2.0
    } else if residual <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Ticks covering `[min(0, lo), hi]` in round steps; a flat or empty range
/// gets `[0, 1]`.
pub fn ticks(lo: f64, hi: f64, target: usize) -> Ticks {
    let lo = lo.min(0.0);
    let hi = if hi.is_finite() && hi > lo {
        hi
    } else {
        lo + 1.0
    };
    let step = nice_step(hi - lo, target);
    let first = (lo / step).floor() as i64;
    let last = (hi / step - 1e-9).ceil() as i64;
    let values = (first..=last.max(first + 1))
        .map(|i| i as f64 * step)
        .collect();
    Ticks { step, values }
}

/// A tick label: `150k`, `1.5M`, `12.5`, `0.25`. The unit follows the
/// axis maximum so that one axis uses one unit; decimals follow the step.
pub fn label(value: f64, step: f64, axis_max: f64) -> String {
    if value.abs() < step.abs() * 1e-9 {
        return "0".into();
    }
    let (div, suffix) = if axis_max.abs() >= 1e6 {
        (1e6, "M")
    } else if axis_max.abs() >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let scaled_step = step / div;
    let decimals = if scaled_step >= 1.0 {
        0
    } else {
        (-scaled_step.log10().floor()) as usize
    };
    format!("{:.decimals$}{suffix}", value / div)
}

/// The percentile at decade `d` of `1/(1-p)`: 0%, 90%, 99%, 99.9%...
pub fn percentile_label(decade: u32) -> String {
    if decade == 0 {
        return "0%".into();
    }
    let p = 100.0 - 100.0 / 10f64.powi(decade as i32);
    let decimals = decade.saturating_sub(2) as usize;
    format!("{p:.decimals$}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(93_000.0, 5), 20_000.0);
        assert_eq!(nice_step(7.0, 5), 2.0);
        assert_eq!(nice_step(0.3, 5), 0.1);
        assert_eq!(nice_step(0.0, 5), 1.0);
    }

    #[test]
    fn ticks_cover_the_data() {
        let t = ticks(0.0, 93_000.0, 5);
        assert_eq!(
            t.values,
            [0.0, 20_000.0, 40_000.0, 60_000.0, 80_000.0, 100_000.0]
        );
        assert_eq!((t.min(), t.max()), (0.0, 100_000.0));
        // A maximum on a tick stays the top.
        assert_eq!(ticks(0.0, 100.0, 5).max(), 100.0);
        // Flat data still has an axis.
        let flat = ticks(0.0, 0.0, 5);
        assert_eq!((flat.values.len(), flat.max()), (6, 1.0));
        assert!(ticks(-5.0, 10.0, 5).min() <= -5.0);
    }

    #[test]
    fn labels_are_compact() {
        assert_eq!(label(150_000.0, 50_000.0, 200_000.0), "150k");
        assert_eq!(label(1_500_000.0, 500_000.0, 2_000_000.0), "1.5M");
        assert_eq!(label(500_000.0, 500_000.0, 2_000_000.0), "0.5M");
        assert_eq!(label(12.5, 0.5, 20.0), "12.5");
        assert_eq!(label(0.25, 0.05, 1.0), "0.25");
        assert_eq!(label(40.0, 20.0, 100.0), "40");
        assert_eq!(label(12_500.0, 500.0, 14_000.0), "12.5k");
        assert_eq!(label(0.0, 50_000.0, 200_000.0), "0");
    }

    #[test]
    fn percentile_axis() {
        let labels: Vec<String> = (0..=5).map(percentile_label).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
    }
}
