//! Line charts as SVG, written by hand: the throughput and lag of a run
//! over time, and latency percentile curves. A run has at most a few
//! hundred points per series, so a polyline per series is all it takes;
//! no plotting library (plotters would bring fonts and image codecs).

pub mod axis;
pub mod svg;

use axis::{label, percentile_label, ticks, Ticks};
use svg::{Anchor, Canvas};

pub const WIDTH: u32 = 820;
pub const HEIGHT: u32 = 420;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 28.0;
const TOP: f64 = 66.0;
const BOTTOM: f64 = 58.0;
/// Series colours, in order (colour-blind friendly enough for two to four lines).
const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// One line of a chart, in data coordinates.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// How x values map to the width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Linear,
    /// x is `1/(1-p)` for a percentile `p`, drawn on a log scale with
    /// decades labelled 0%, 90%, 99%, 99.9%...
    Percentile,
}

/// A dashed vertical line with a label, such as the end of the load.
#[derive(Debug, Clone)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: XAxis,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
}

/// The x axis once the data is known: ticks and a transform to [0, 1].
struct XScale {
    kind: XAxis,
    lo: f64,
    hi: f64,
    ticks: Vec<(f64, String)>,
}

impl XScale {
    fn new(kind: XAxis, xs: impl Iterator<Item = f64> + Clone) -> Self {
        match kind {
            XAxis::Linear => {
                let lo = xs.clone().fold(f64::INFINITY, f64::min);
                let hi = xs.fold(f64::NEG_INFINITY, f64::max);
                let lo = if lo.is_finite() { lo } else { 0.0 };
                let t: Ticks = ticks(lo, hi, 8);
                let max = t.max();
                Self {
                    kind,
                    lo: t.min(),
                    hi: max,
                    ticks: t
                        .values
                        .iter()
                        .map(|&v| (v, label(v, t.step, max)))
                        .collect(),
                }
            }
            XAxis::Percentile => {
                let top = xs.filter(|x| *x >= 1.0).fold(1.0, f64::max).log10();
                // At least up to 99%, so short runs still show a tail.
                let decades = (top - 1e-9).ceil().max(2.0) as u32;
                Self {
                    kind,
                    lo: 0.0,
                    hi: f64::from(decades),
                    ticks: (0..=decades)
                        .map(|d| (f64::from(d), percentile_label(d)))
                        .collect(),
                }
            }
        }
    }

    /// `x` in axis units (log10 for percentiles).
    fn unit(&self, x: f64) -> f64 {
        match self.kind {
            XAxis::Linear => x,
            XAxis::Percentile => x.max(1.0).log10(),
        }
    }

    fn fraction(&self, x: f64) -> f64 {
        (self.unit(x) - self.lo) / (self.hi - self.lo)
    }
}

impl Chart {
    pub fn new(title: &str, x_label: &str, y_label: &str, x_axis: XAxis) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x_axis,
            series: Vec::new(),
            markers: Vec::new(),
        }
    }

    pub fn series(mut self, name: &str, points: Vec<(f64, f64)>) -> Self {
        self.series.push(Series {
            name: name.into(),
            points: points
                .into_iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
        });
        self
    }

    pub fn marker(mut self, x: f64, label: &str) -> Self {
        self.markers.push(Marker {
            x,
            label: label.into(),
        });
        self
    }

    /// Whether any series has a point.
    pub fn has_data(&self) -> bool {
        self.series.iter().any(|s| !s.points.is_empty())
    }

    pub fn to_svg(&self) -> String {
        let (w, h) = (f64::from(WIDTH), f64::from(HEIGHT));
        let (x0, x1, y0, y1) = (LEFT, w - RIGHT, TOP, h - BOTTOM);
        let mut c = Canvas::new(WIDTH, HEIGHT);
        c.text((w / 2.0, 24.0), Anchor::Middle, &self.title, true, 0.0);

        let all = || self.series.iter().flat_map(|s| s.points.iter());
        let xs = XScale::new(
            self.x_axis,
            all().map(|p| p.0).chain(self.markers.iter().map(|m| m.x)),
        );
        let y_hi = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let y_lo = all().map(|p| p.1).fold(0.0, f64::min);
        let yt = ticks(y_lo, y_hi, 5);
        let px = |x: f64| x0 + xs.fraction(x).clamp(0.0, 1.0) * (x1 - x0);
        let py = |y: f64| y1 - (y - yt.min()) / (yt.max() - yt.min()) * (y1 - y0);

        for &v in &yt.values {
            let y = py(v);
            c.line((x0, y), (x1, y), "#e3e3e3", false);
            c.text(
                (x0 - 6.0, y + 4.0),
                Anchor::End,
                &label(v, yt.step, yt.max()),
                false,
                0.0,
            );
        }
        for (v, text) in &xs.ticks {
            let x = x0 + (v - xs.lo) / (xs.hi - xs.lo) * (x1 - x0);
            c.line((x, y0), (x, y1), "#e3e3e3", false);
            c.text((x, y1 + 16.0), Anchor::Middle, text, false, 0.0);
        }
        c.line((x0, y1), (x1, y1), "#333", false);
        c.line((x0, y0), (x0, y1), "#333", false);
        c.text(
            ((x0 + x1) / 2.0, h - 16.0),
            Anchor::Middle,
            &self.x_label,
            false,
            0.0,
        );
        c.text(
            (18.0, (y0 + y1) / 2.0),
            Anchor::Middle,
            &self.y_label,
            false,
            -90.0,
        );

        for m in &self.markers {
            let x = px(m.x);
            c.line((x, y0), (x, y1), "#777", true);
            c.text((x + 4.0, y0 + 12.0), Anchor::Start, &m.label, false, 0.0);
        }
        if !self.has_data() {
            c.text(
                ((x0 + x1) / 2.0, (y0 + y1) / 2.0),
                Anchor::Middle,
                "no data",
                false,
                0.0,
            );
        }
        let mut legend_x = x0;
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            if !s.points.is_empty() {
                let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (px(x), py(y))).collect();
                c.polyline(&pts, colour);
            }
            let y = TOP - 22.0;
            c.line((legend_x, y), (legend_x + 20.0, y), colour, false);
            c.line(
                (legend_x, y + 1.0),
                (legend_x + 20.0, y + 1.0),
                colour,
                false,
            );
            c.text(
                (legend_x + 26.0, y + 4.0),
                Anchor::Start,
                &s.name,
                false,
                0.0,
            );
            legend_x += 46.0 + 6.5 * s.name.chars().count() as f64;
        }
        c.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::svg::check_well_formed;
    use super::*;

    #[test]
    fn a_chart_is_well_formed_svg_with_its_lines_and_labels() {
        let svg = Chart::new(
            "Throughput <run & 1>",
            "time (s)",
            "events/s",
            XAxis::Linear,
        )
        .series(
            "committed/s",
            vec![(1.0, 90_000.0), (2.0, 95_000.0), (3.0, 93_000.0)],
        )
        .series(
            "delivered/s",
            vec![(1.0, 80_000.0), (2.0, f64::NAN), (3.0, 99_000.0)],
        )
        .marker(2.5, "load ends")
        .to_svg();
        check_well_formed(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("Throughput &lt;run &amp; 1&gt;"));
        assert!(svg.contains(">100k</text>"), "{svg}");
        assert!(svg.contains(">committed/s</text>"));
        assert!(svg.contains("stroke-dasharray"));
        // The NaN point is dropped, not drawn.
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn points_stay_inside_the_plot_area() {
        let svg = Chart::new("t", "x", "y", XAxis::Linear)
            .series("s", vec![(0.0, 0.0), (10.0, 7.0)])
            .to_svg();
        let pts = svg
            .split("points=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("points");
        for p in pts.split(' ') {
            let (x, y) = p.split_once(',').expect("x,y");
            let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
            assert!((LEFT..=f64::from(WIDTH) - RIGHT).contains(&x), "{p}");
            assert!((TOP..=f64::from(HEIGHT) - BOTTOM).contains(&y), "{p}");
        }
    }

    #[test]
    fn the_percentile_axis_is_labelled_in_decades() {
        let svg = Chart::new("latency", "percentile", "ms", XAxis::Percentile)
            .series(
                "commit→receive",
                vec![(1.0, 2.0), (10.0, 4.0), (1000.0, 9.0)],
            )
            .to_svg();
        check_well_formed(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        for l in ["0%", "90%", "99%", "99.9%"] {
            assert!(svg.contains(&format!(">{l}</text>")), "{l}");
        }
        assert!(!svg.contains(">99.99%</text>"));
    }

    #[test]
    fn an_empty_chart_says_so() {
        let svg = Chart::new("lag", "time (s)", "events", XAxis::Linear)
            .series("lag", vec![])
            .to_svg();
        check_well_formed(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert!(svg.contains(">no data</text>"));
        assert!(!svg.contains("<polyline"));
    }
}
