//! A process's CPU time and memory, read from `/proc` (Linux): what a
//! fault test checks of the engine while a fault lasts (it waits rather
//! than spins, it does not grow).

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// CPU seconds (user + system) `pid` has used so far; 0 once it is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    let tck = *TICKS.get_or_init(clock_ticks_per_sec);
    cpu_ticks(pid).unwrap_or(0) as f64 / tck as f64
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized command: state is field 3, so utime
    // (field 14) and stime (field 15) are at 11 and 12.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A process's CPU time and memory over a window (a fault, a recovery):
/// started, sampled for its memory as the window goes, ended.
pub struct Usage {
    pid: u32,
    start: Instant,
    cpu0: f64,
    rss0: u64,
    rss_max: u64,
}

impl Usage {
    /// A window of `pid` from now.
    pub fn start(pid: u32) -> Usage {
        let rss0 = rss_kib(pid).unwrap_or(0);
        Usage {
            pid,
            start: Instant::now(),
            cpu0: cpu_secs(pid),
            rss0,
            rss_max: rss0,
        }
    }

    /// Notes the memory now.
    pub fn sample(&mut self) {
        self.rss_max = self.rss_max.max(rss_kib(self.pid).unwrap_or(0));
    }

    /// The window, ending now.
    pub fn end(mut self) -> Window {
        self.sample();
        Window {
            took: self.start.elapsed(),
            cpu: cpu_secs(self.pid) - self.cpu0,
            rss0: self.rss0,
            rss1: rss_kib(self.pid).unwrap_or(0),
            rss_max: self.rss_max,
        }
    }
}

/// What [`Usage`] saw of a window once it ended.
#[derive(Debug, Clone)]
pub struct Window {
    /// How long the window lasted.
    pub took: Duration,
    /// CPU seconds used in the window.
    pub cpu: f64,
    /// RSS (KiB) at its start.
    pub rss0: u64,
    /// RSS (KiB) at its end.
    pub rss1: u64,
    /// The most RSS (KiB) seen in it.
    pub rss_max: u64,
}

impl Window {
    /// The share of one core the process used.
    pub fn cpu_share(&self) -> f64 {
        self.cpu / self.took.as_secs_f64()
    }

    /// How much its memory grew at the most (KiB).
    pub fn rss_growth(&self) -> u64 {
        self.rss_max.saturating_sub(self.rss0)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1}s: cpu {:.2}s = {:.1}% of a core; rss {} -> {} KiB (max {}, growth {} KiB)",
            self.took.as_secs_f64(),
            self.cpu,
            self.cpu_share() * 100.0,
            self.rss0,
            self.rss1,
            self.rss_max,
            self.rss_growth()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_memory_and_time() {
        let pid = std::process::id();
        let usage = Usage::start(pid);
        // Spins until the kernel has counted a tick of it (at most 2 s).
        let (spin, cpu0) = (Instant::now(), cpu_secs(pid));
        while cpu_secs(pid) == cpu0 && spin.elapsed() < Duration::from_secs(2) {}
        let window = usage.end();
        assert!(window.rss1 > 0 && window.rss_max >= window.rss0, "{window}");
        assert!(window.cpu > 0.0, "{window}");
    }
}
