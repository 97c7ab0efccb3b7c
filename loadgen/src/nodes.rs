//! Engine nodes as child processes, for the runs that start the engine
//! themselves (drain, suite): `outbox migrate`, N × `outbox run` with their
//! logs in files, SIGTERM to stop (readiness is read through the engine's
//! library, in [`crate::engine_state::wait_ready`]).
//!
//! The processes come from the test harness's launcher
//! ([`outbox_harness::EngineBinary`], [`outbox_harness::node`]): the same
//! command, log files and signals as the engine's own tests, with the
//! engine's production settings (loadgen passes no lease or delivery
//! timing of its own).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use outbox_harness::node::{log_tail, logging_to, signal_pid};
use outbox_harness::EngineBinary;
use tokio::process::{Child, Command};

use crate::report::EngineSetup;

/// How long a node may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// The configuration keys loadgen sets itself, per node or per run: a
/// caller's variable for one of these (under any of its names, e.g.
/// `DATABASE_URL` or `OUTBOX_DATABASE__URL`) never reaches a node. Every
/// other configuration variable of loadgen's environment does (e.g.
/// `OUTBOX_KAFKA__PROPERTIES__LINGER_MS=1`); `OUTBOX_CONFIG` does not.
const SET_BY_LOADGEN: [&str; 7] = [
    "database.url",
    "database.schema",
    "kafka.brokers",
    "kafka.topic_prefix",
    "kafka.topic_partitions",
    "cluster.node_id",
    "http.addr",
];

/// The `outbox` binary.
#[derive(Debug, Clone)]
pub struct Engine {
    binary: EngineBinary,
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
    /// Where each node's log goes, `<log_dir>/<name>-n<i>.log`.
    pub log_dir: &'a Path,
    pub name: &'a str,
}

impl Engine {
    /// Checks the binary runs and reads its version.
    pub async fn locate(binary: &Path) -> Result<Self> {
        let binary = EngineBinary::at(binary);
        let version = binary.version().await.with_context(|| {
            format!(
                "cannot run the engine binary {} (build it: cargo build --release -p outbox-engine)",
                binary.path().display()
            )
        })?;
        Ok(Self { binary, version })
    }

    /// Where the binary is.
    pub fn binary(&self) -> &Path {
        self.binary.path()
    }

    pub fn setup(&self, spec: &NodeSpec<'_>) -> EngineSetup {
        EngineSetup {
            binary: self.binary.path().display().to_string(),
            version: self.version.clone(),
            nodes: spec.nodes,
            partitions: spec.partitions,
            topic_prefix: spec.topic_prefix.to_string(),
            topic_partitions: spec.topic_partitions,
            args: spec.args.to_vec(),
        }
    }

    /// The harness's command ([`EngineBinary::command`]: nothing of the
    /// engine's configuration inherited, warnings only, killed on drop)
    /// with the database, the schema, and the caller's configuration
    /// variables but those of the keys loadgen sets ([`SET_BY_LOADGEN`]).
    fn command(&self, database_url: &str, schema: &str) -> Command {
        let mut cmd = self.binary.command();
        for (name, value) in std::env::vars_os() {
            let passed = name
                .to_str()
                .and_then(outbox_engine::config::env_key)
                .is_some_and(|key| !SET_BY_LOADGEN.contains(&key.join(".").as_str()));
            if passed {
                cmd.env(name, value);
            }
        }
        cmd.env("DATABASE_URL", database_url)
            .env("OUTBOX_SCHEMA", schema);
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
            // A log of this run only (the harness appends).
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let mut cmd = self.command(spec.database_url, spec.schema);
            cmd.env("KAFKA_BROKERS", spec.kafka_brokers)
                .args(["run", "--node-id", &id, "--http-addr", "127.0.0.1:0"])
                .args(["--topic-prefix", spec.topic_prefix])
                .args(["--topic-partitions", &spec.topic_partitions.to_string()])
                .args(spec.args);
            let child = logging_to(&mut cmd, &log)?
                .spawn()
                .with_context(|| format!("starting {}", self.binary.path().display()))?;
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
                    log_tail(&n.log, 10)
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
                // One that has exited already is reported by the wait below.
                let _ = signal_pid(pid, "TERM");
            }
        }
        let mut problems = Vec::new();
        for n in &mut self.nodes {
            match tokio::time::timeout(STOP_TIMEOUT, n.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(format!(
                    "{} exited with {status}: {}",
                    n.id,
                    log_tail(&n.log, 5)
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

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn env_of<'c>(cmd: &'c Command, key: &str) -> Option<Option<&'c OsStr>> {
        cmd.as_std()
            .get_envs()
            .find(|(k, _)| *k == OsStr::new(key))
            .map(|(_, v)| v)
    }

    #[test]
    fn nodes_get_the_callers_engine_settings_but_those_loadgen_sets() {
        // Names no other test reads or writes.
        std::env::set_var("OUTBOX_LOADGEN_NODES_TEST__PASSED", "1");
        std::env::set_var("OUTBOX_NODE_ID", "from-the-caller");
        std::env::set_var("OUTBOX_DATABASE__URL", "postgres://elsewhere/y");
        let engine = Engine {
            binary: EngineBinary::at("outbox"),
            version: "outbox test".into(),
        };
        let cmd = engine.command("postgres://db/x", "bench");
        assert_eq!(
            env_of(&cmd, "OUTBOX_LOADGEN_NODES_TEST__PASSED"),
            Some(Some(OsStr::new("1")))
        );
        // Removed, so the node's own --node-id holds, and its database is
        // the one loadgen checks (the long form would win over
        // DATABASE_URL).
        assert_eq!(env_of(&cmd, "OUTBOX_NODE_ID"), Some(None));
        assert_eq!(env_of(&cmd, "OUTBOX_DATABASE__URL"), Some(None));
        assert_eq!(
            env_of(&cmd, "DATABASE_URL"),
            Some(Some(OsStr::new("postgres://db/x")))
        );
        assert_eq!(
            env_of(&cmd, "OUTBOX_SCHEMA"),
            Some(Some(OsStr::new("bench")))
        );
        std::env::remove_var("OUTBOX_LOADGEN_NODES_TEST__PASSED");
        std::env::remove_var("OUTBOX_NODE_ID");
        std::env::remove_var("OUTBOX_DATABASE__URL");
    }
}
