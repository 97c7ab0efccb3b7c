//! `outbox` child processes: the commands tests run (the binary with a
//! database and broker, `outbox run` with the test topics and fast leases),
//! their logs in files of their own, signals, and stopping them.
//!
//! The commands build on [`EngineBinary::command`], which takes nothing of
//! the engine's configuration from the test's own environment.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::db::TestDb;
use crate::{brokers, EngineBinary, Error, Result, TEST_DELIVERY_TIMEOUT_MS, TOPIC_PARTITIONS};

/// The workspace's `outbox` binary as a child process
/// ([`EngineBinary::workspace`], [`EngineBinary::command`]).
///
/// # Panics
///
/// If the binary cannot be built: every test that runs it would fail.
pub fn outbox_binary() -> Command {
    EngineBinary::workspace()
        .expect("the outbox binary (cargo build -p outbox-engine --bin outbox)")
        .command()
}

/// The `outbox` binary with the given database and broker.
pub fn outbox_at(database_url: &str, brokers: &str) -> Command {
    let mut cmd = outbox_binary();
    cmd.env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", brokers);
    cmd
}

/// The `outbox` binary with the test's database and the shared broker.
pub fn outbox_command(db: &TestDb) -> Command {
    outbox_at(&db.url, &brokers())
}

/// Runs `cmd` to its end; fails the test, showing `what` and its stderr,
/// unless it exits 0.
pub async fn succeed(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().await.expect("run the outbox binary");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `outbox run` as node `node_id` on the test topics (`prefix`, the
/// tests' partition count), the engine's own lease settings.
pub fn run_at(database_url: &str, brokers: &str, node_id: &str, prefix: &str) -> Command {
    let mut cmd = outbox_at(database_url, brokers);
    cmd.args(["run", "--node-id", node_id, "--topic-prefix", prefix])
        .args(["--topic-partitions", &TOPIC_PARTITIONS.to_string()]);
    cmd
}

/// How a test's `outbox run` child is started: [`run_at`] with the lease
/// timing and delivery timeout of the test.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpec<'a> {
    /// The outbox's database.
    pub database_url: &'a str,
    /// The brokers (`bootstrap.servers`).
    pub brokers: &'a str,
    /// `--node-id`.
    pub node_id: &'a str,
    /// The topic prefix.
    pub prefix: &'a str,
    /// `--lease-ttl-ms`.
    pub lease_ttl_ms: u64,
    /// `--heartbeat-interval-ms`.
    pub heartbeat_ms: u64,
    /// `None`: the engine's default.
    pub delivery_timeout_ms: Option<u64>,
}

impl<'a> NodeSpec<'a> {
    /// 2 s leases, heartbeats every 250 ms, the test delivery timeout
    /// ([`TEST_DELIVERY_TIMEOUT_MS`]).
    pub fn new(
        database_url: &'a str,
        brokers: &'a str,
        node_id: &'a str,
        prefix: &'a str,
    ) -> NodeSpec<'a> {
        NodeSpec {
            database_url,
            brokers,
            node_id,
            prefix,
            lease_ttl_ms: 2_000,
            heartbeat_ms: 250,
            delivery_timeout_ms: Some(TEST_DELIVERY_TIMEOUT_MS),
        }
    }

    /// This spec with 10 s leases renewed every second and the engine's own
    /// delivery timeout: for tests whose handoffs are graceful and which
    /// assert that nothing is sent twice, so that a stall of a second or two
    /// on a loaded machine does not cost a lease. A takeover after a crash
    /// waits out 10 s plus the delivery timeout: not for kill tests.
    pub fn steady(self) -> NodeSpec<'a> {
        NodeSpec {
            lease_ttl_ms: 10_000,
            heartbeat_ms: 1_000,
            delivery_timeout_ms: None,
            ..self
        }
    }

    /// The command; a test adds its own flags, environment and log
    /// ([`logging_to`]) before it spawns it.
    pub fn command(&self) -> Command {
        let mut cmd = run_at(self.database_url, self.brokers, self.node_id, self.prefix);
        cmd.args(["--lease-ttl-ms", &self.lease_ttl_ms.to_string()])
            .args(["--heartbeat-interval-ms", &self.heartbeat_ms.to_string()]);
        if let Some(ms) = self.delivery_timeout_ms {
            cmd.args(["--delivery-timeout-ms", &ms.to_string()]);
        }
        cmd
    }
}

/// [`NodeSpec::new`]'s command on the test's database and the shared
/// broker.
pub fn node_command(db: &TestDb, node_id: &str, prefix: &str) -> Command {
    NodeSpec::new(&db.url, &brokers(), node_id, prefix).command()
}

/// [`NodeSpec::steady`]'s command on the test's database and the shared
/// broker.
pub fn steady_node_command(db: &TestDb, node_id: &str, prefix: &str) -> Command {
    NodeSpec::new(&db.url, &brokers(), node_id, prefix)
        .steady()
        .command()
}

/// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`...) to a process with the
/// `kill` command (no `unsafe`, no libc binding).
pub fn signal_pid(pid: u32, signal: &str) -> Result<()> {
    let what = format!("kill -{signal} {pid}");
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map_err(|e| Error::io(&what, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Failed(format!("{what} failed ({status})")))
    }
}

/// Sends `signal` to a child the test started.
///
/// # Panics
///
/// If the child has been reaped or `kill` fails: the test meant to signal a
/// live process.
pub fn send_signal(child: &Child, signal: &str) {
    let pid = child.id().expect("child has a pid");
    signal_pid(pid, signal).unwrap_or_else(|e| panic!("{e}"));
}

/// A fresh log file name for `name` (e.g. `faults-kill9`) in the temporary
/// directory; tests remove it when they pass.
pub fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "outbox-{name}-{}.log",
        &Uuid::new_v4().simple().to_string()[..8]
    ))
}

/// `cmd` with its stdout dropped and its stderr (the engine's log, without
/// colours) appended to `log`.
pub fn logging_to<'c>(cmd: &'c mut Command, log: &Path) -> Result<&'c mut Command> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(log.display(), e))?;
    Ok(cmd
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file)))
}

/// What a log holds so far (empty if it cannot be read).
pub fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The last `lines` lines of a log, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = log_text(path);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Lines and WARN/ERROR/panic counts of an engine log, its distinct
/// messages (timestamps and fields stripped) and its last lines, for
/// reports and assertion messages.
pub fn log_summary(path: &Path) -> String {
    let text = log_text(path);
    let lines: Vec<&str> = text.lines().collect();
    let (mut warn, mut error, mut panics) = (0, 0, 0);
    let mut kinds: Vec<String> = Vec::new();
    for line in &lines {
        if line.contains(" WARN ") {
            warn += 1;
        }
        if line.contains(" ERROR ") || line.starts_with("error") {
            error += 1;
        }
        if line.contains("panicked") {
            panics += 1;
        }
        // `... WARN target: message key=value ...` -> `WARN target: message`
        let rest = if line.starts_with("error") {
            line
        } else {
            let Some(i) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
                continue;
            };
            &line[i + 1..]
        };
        let cut = rest
            .find(" partition=")
            .or_else(|| rest.find(" error="))
            .or_else(|| rest.find(" retry_in="))
            .unwrap_or(rest.len());
        let kind: String = rest[..cut].chars().take(110).collect();
        if !kinds.contains(&kind) && kinds.len() < 8 {
            kinds.push(kind);
        }
    }
    let tail: Vec<String> = lines[lines.len().saturating_sub(4)..]
        .iter()
        .map(|l| l.chars().take(240).collect())
        .collect();
    format!(
        "log {}: {} lines, {warn} WARN, {error} ERROR, {panics} panics; kinds: {kinds:#?}; \
         last: {tail:#?}",
        path.display(),
        lines.len()
    )
}

/// Fails if an engine process panicked (a worker task included).
#[track_caller]
pub fn assert_no_panic(path: &Path) {
    assert!(
        !log_text(path).contains("panicked"),
        "an engine process panicked; {}",
        log_summary(path)
    );
}

/// Whether the child still runs.
///
/// # Panics
///
/// If the child cannot be polled.
pub fn running(node: &mut Child) -> bool {
    node.try_wait().expect("poll the node process").is_none()
}

/// SIGTERMs a node (if it still runs) and waits up to `timeout` for its
/// exit code; kills it after that. `None`: it did not exit by itself in
/// time (or was ended by a signal).
pub async fn stop_node(mut node: Child, timeout: Duration) -> Option<i32> {
    if node.try_wait().ok().flatten().is_none() {
        if let Some(pid) = node.id() {
            // Should it have exited just now, the wait below tells.
            let _ = signal_pid(pid, "TERM");
        }
    }
    match tokio::time::timeout(timeout, node.wait()).await {
        Ok(Ok(status)) => status.code(),
        _ => {
            let _ = node.start_kill();
            None
        }
    }
}

/// Removes a node's log and its config file, if it had one (both are kept
/// when a test fails).
pub fn remove_files(log: &Path) {
    let _ = std::fs::remove_file(log);
    let _ = std::fs::remove_file(log.with_extension("toml"));
}
