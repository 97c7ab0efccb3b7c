//! Engine nodes as child processes, for the runs that start the engine
//! themselves (drain, suite): `outbox migrate`, N × `outbox run` with their
//! logs in files, SIGTERM to stop (readiness is read through the engine's
//! library, in [`crate::engine_state::wait_ready`]).
//! Signals go through the `kill` command, as in the engine's tests, so
//! loadgen needs no `unsafe` and no libc binding.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::process::{Child, Command};

use crate::report::EngineSetup;

/// How long a node may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// Environment that would change the engine's configuration behind the
/// flags loadgen passes.
const CLEARED_ENV: [&str; 5] = [
    "OUTBOX_CONFIG",
    "OUTBOX_TOPIC_PREFIX",
    "OUTBOX_NODE_ID",
    "OUTBOX_HTTP_ADDR",
    "OUTBOX_PARTITIONS",
];

/// The `outbox` binary.
#[derive(Debug, Clone)]
pub struct Engine {
    pub binary: PathBuf,
    pub version: String,
}

/// How to start a set of nodes.
#[derive(Debug, Clone)]
pub struct NodeSpec<'a> {
    pub database_url: &'a str,
    pub kafka_brokers: &'a str,
    pub schema: &'a str,
    pub topic_prefix: &'a str,
    pub topic_partitions: i32,
    pub partitions: u32,
    pub nodes: usize,
    /// Extra `outbox run` flags.
    pub args: &'a [String],
    /// Where each node's stdout and stderr go, `<log_dir>/<name>-n<i>.log`.
    pub log_dir: &'a Path,
    pub name: &'a str,
}

impl Engine {
    /// Checks the binary runs and reads its version.
    pub async fn locate(binary: &Path) -> Result<Self> {
        let out = Command::new(binary)
            .arg("--version")
            .output()
            .await
            .with_context(|| {
                format!(
                    "cannot run the engine binary {} (build it: cargo build --release -p outbox-engine)",
                    binary.display()
                )
            })?;
        if !out.status.success() {
            bail!("{} --version failed", binary.display());
        }
        Ok(Self {
            binary: binary.to_path_buf(),
            version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    pub fn setup(&self, spec: &NodeSpec<'_>) -> EngineSetup {
        EngineSetup {
            binary: self.binary.display().to_string(),
            version: self.version.clone(),
            nodes: spec.nodes,
            partitions: spec.partitions,
            topic_prefix: spec.topic_prefix.to_string(),
            topic_partitions: spec.topic_partitions,
            args: spec.args.to_vec(),
        }
    }

    fn command(&self, database_url: &str, schema: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        for var in CLEARED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("DATABASE_URL", database_url)
            .env("OUTBOX_SCHEMA", schema)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// `outbox migrate --partitions N`.
    pub async fn migrate(&self, database_url: &str, schema: &str, partitions: u32) -> Result<()> {
        let out = self
            .command(database_url, schema)
            .args(["migrate", "--partitions", &partitions.to_string()])
            .output()
            .await
            .context("running outbox migrate")?;
        if !out.status.success() {
            bail!(
                "outbox migrate --partitions {partitions} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts `spec.nodes` nodes `<name>-n1..`.
    pub fn start(&self, spec: &NodeSpec<'_>) -> Result<Cluster> {
        std::fs::create_dir_all(spec.log_dir)
            .with_context(|| format!("creating {}", spec.log_dir.display()))?;
        let mut nodes = Vec::with_capacity(spec.nodes);
        for i in 1..=spec.nodes {
            let id = format!("{}-n{i}", spec.name);
            let log = spec.log_dir.join(format!("{id}.log"));
            let file = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let err = file.try_clone().context("log file handle")?;
            let child = self
                .command(spec.database_url, spec.schema)
                .env("KAFKA_BROKERS", spec.kafka_brokers)
                .args(["run", "--node-id", &id, "--http-addr", "127.0.0.1:0"])
                .args(["--topic-prefix", spec.topic_prefix])
                .args(["--topic-partitions", &spec.topic_partitions.to_string()])
                .args(spec.args)
                .stdout(file)
                .stderr(err)
                .spawn()
                .with_context(|| format!("starting {}", self.binary.display()))?;
            nodes.push(Node { id, child, log });
        }
        Ok(Cluster {
            nodes,
            started: Instant::now(),
        })
    }
}

struct Node {
    id: String,
    child: Child,
    log: PathBuf,
}

/// Running nodes; dropping it kills them (`kill_on_drop`), [`Cluster::stop`]
/// stops them gracefully.
pub struct Cluster {
    nodes: Vec<Node>,
    started: Instant,
}

/// The last `n` lines of a log, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    /// When the nodes were spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Fails if a node has exited, with the end of its log.
    pub fn check_running(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(status) = n.child.try_wait().context("checking an engine node")? {
                bail!(
                    "engine node {} exited ({status}); end of {}:\n{}",
                    n.id,
                    n.log.display(),
                    tail(&n.log, 10)
                );
            }
        }
        Ok(())
    }

    /// How many nodes were started.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// SIGTERM to every node, then waits for each; a node that does not
    /// exit within the stop timeout is killed. Fails if one did not exit 0.
    pub async fn stop(mut self) -> Result<()> {
        for n in &self.nodes {
            if let Some(pid) = n.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        let mut problems = Vec::new();
        for n in &mut self.nodes {
            match tokio::time::timeout(STOP_TIMEOUT, n.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(format!(
                    "{} exited with {status}: {}",
                    n.id,
                    tail(&n.log, 5)
                )),
                Ok(Err(e)) => problems.push(format!("{}: {e}", n.id)),
                Err(_) => {
                    let _ = n.child.start_kill();
                    let _ = n.child.wait().await;
                    problems.push(format!(
                        "{} did not stop within {}s of SIGTERM; killed",
                        n.id,
                        STOP_TIMEOUT.as_secs()
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("stopping the engine: {}", problems.join("; ")))
        }
    }
}
