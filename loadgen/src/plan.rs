//! The shape of the load, as pure functions: when each transaction is due
//! (open loop), which aggregates each writer owns, and what a payload looks
//! like. The writer wraps these in I/O.

use std::time::Duration;

use rand::distributions::Alphanumeric;
use rand::Rng;

/// When a writer's transactions are due.
#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    /// Transaction `n` of writer `w` is due at `(n * writers + w) * interval`
    /// after the start, so the writers together keep the target rate and
    /// each stays on its own beat, however late the others run.
    Open {
        interval_secs: f64,
        writers: usize,
        writer: usize,
        duration: Duration,
    },
    /// As fast as possible: a transaction starts when the last one is done.
    Closed { duration: Duration },
}

impl Schedule {
    /// The schedule of `writer` for `rate` events per second in
    /// transactions of `events_per_tx` (a rate of 0 is closed loop).
    pub fn new(
        rate: f64,
        events_per_tx: usize,
        writers: usize,
        writer: usize,
        duration: Duration,
    ) -> Self {
        if rate > 0.0 {
            Schedule::Open {
                interval_secs: events_per_tx as f64 / rate,
                writers,
                writer,
                duration,
            }
        } else {
            Schedule::Closed { duration }
        }
    }

    /// When transaction `n` is due, as an offset from the start; `None` when
    /// it falls after the end. For closed loop, whether `elapsed` still
    /// leaves time to start one, which is then due at `elapsed`.
    pub fn due(&self, n: u64, elapsed: Duration) -> Option<Duration> {
        match *self {
            Schedule::Open {
                interval_secs,
                writers,
                writer,
                duration,
            } => {
                let slot = n as f64 * writers as f64 + writer as f64;
                let at = Duration::try_from_secs_f64(slot * interval_secs).ok()?;
                (at < duration).then_some(at)
            }
            Schedule::Closed { duration } => (elapsed < duration).then_some(elapsed),
        }
    }
}

/// The aggregates of a run: aggregate `i` has id `i` and type
/// `types[i % types.len()]`, and belongs to writer `i % writers`.
#[derive(Debug, Clone)]
pub struct Aggregates {
    pub count: usize,
    pub types: Vec<String>,
}

impl Aggregates {
    pub fn id(&self, i: usize) -> String {
        i.to_string()
    }

    pub fn type_index(&self, i: usize) -> usize {
        i % self.types.len()
    }

    /// The aggregates writer `writer` of `writers` owns.
    pub fn owned_by(&self, writer: usize, writers: usize) -> impl Iterator<Item = usize> {
        (writer..self.count).step_by(writers.max(1))
    }
}

/// Builds payloads of about a given size:
/// `{"seq":n,"sent_at_us":t,"pad":"..."}`.
#[derive(Debug, Clone)]
pub struct Payload {
    target: usize,
    pad: String,
}

impl Payload {
    /// Padding is random letters and digits, drawn once, so the payloads do
    /// not compress to nothing should a compressing codec be turned on.
    pub fn new(target_bytes: usize, rng: &mut impl Rng) -> Self {
        let pad = rng
            .sample_iter(&Alphanumeric)
            .take(target_bytes)
            .map(char::from)
            .collect();
        Self {
            target: target_bytes,
            pad,
        }
    }

    pub fn render(&self, seq: u64, sent_at_us: u64) -> String {
        let head = format!(r#"{{"seq":{seq},"sent_at_us":{sent_at_us},"pad":""#);
        let tail = "\"}";
        let n = self.target.saturating_sub(head.len() + tail.len());
        let mut out = String::with_capacity(head.len() + n + tail.len());
        out.push_str(&head);
        out.push_str(&self.pad[..n.min(self.pad.len())]);
        out.push_str(tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn open_loop_interleaves_writers_at_the_target_rate() {
        // 1000 events/s in transactions of 10 = one transaction per 10 ms,
        // shared by 4 writers.
        let d = Duration::from_secs(1);
        let s = |w| Schedule::new(1000.0, 10, 4, w, d);
        let ms = |n, w| {
            s(w).due(n, Duration::ZERO)
                .map(|t: Duration| t.as_secs_f64() * 1000.0)
        };
        assert_eq!(ms(0, 0), Some(0.0));
        assert!((ms(0, 1).unwrap() - 10.0).abs() < 1e-9);
        assert!((ms(1, 0).unwrap() - 40.0).abs() < 1e-9);
        assert!((ms(1, 3).unwrap() - 70.0).abs() < 1e-9);
        // 100 transactions in the second, 25 per writer.
        let total: usize = (0..4)
            .map(|w| {
                (0..)
                    .take_while(|&n| s(w).due(n, Duration::ZERO).is_some())
                    .count()
            })
            .sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn closed_loop_runs_until_the_duration() {
        let s = Schedule::new(0.0, 10, 4, 0, Duration::from_secs(2));
        let t = Duration::from_millis(1500);
        assert_eq!(s.due(7, t), Some(t));
        assert_eq!(s.due(8, Duration::from_secs(2)), None);
    }

    #[test]
    fn each_aggregate_has_one_writer_and_one_type() {
        let a = Aggregates {
            count: 10,
            types: vec!["order".into(), "invoice".into()],
        };
        let mut all: Vec<usize> = (0..3).flat_map(|w| a.owned_by(w, 3)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(a.owned_by(1, 3).collect::<Vec<_>>(), [1, 4, 7]);
        assert_eq!(a.types[a.type_index(3)], "invoice");
        assert_eq!(a.id(3), "3");
    }

    #[test]
    fn payloads_are_json_of_about_the_target_size() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let p = Payload::new(256, &mut rng);
        let s = p.render(42, 1_700_000_000_000_000);
        assert_eq!(s.len(), 256);
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["sent_at_us"], 1_700_000_000_000_000u64);
        // Smaller than the fields themselves: no padding, still valid.
        let tiny = Payload::new(8, &mut rng).render(1, 2);
        assert!(serde_json::from_str::<serde_json::Value>(&tiny).is_ok());
    }
}
