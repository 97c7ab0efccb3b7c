//! Where the `outbox` binary comes from: a path the caller gives (loadgen's
//! `--outbox-bin`), `OUTBOX_BIN`, or the workspace's own build.
//!
//! Cargo hands `CARGO_BIN_EXE_<name>` only to the tests of the package that
//! has the binary, and builds another package's binaries before a test
//! runs only for artifact dependencies (unstable). So the harness asks
//! cargo itself: `cargo build -p outbox-engine --bin outbox` for the
//! profile the caller was built with, once per process. On a fresh build
//! that is a no-op of about a second; on a clean target directory it
//! builds the binary first, and a test never runs a missing or stale one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use tokio::process::Command;

use crate::{Error, Result};

/// Variables the engine reads besides its `OUTBOX_*` ones; a child gets
/// them only where the caller sets them.
const ENGINE_ENV: [&str; 2] = ["DATABASE_URL", "KAFKA_BROKERS"];

/// What cargo sets for the test (or build script) it runs, as prefixes.
/// A nested cargo must not see them: build scripts that watch these
/// (ring's `rerun-if-env-changed=CARGO_PKG_NAME`, ...) would run again,
/// and everything above them would be rebuilt, every time a plain
/// `cargo build` and a test take turns.
const CARGO_RUN_ENV: [&str; 9] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_BIN_EXE_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// The `outbox` binary.
#[derive(Debug, Clone)]
pub struct EngineBinary {
    path: PathBuf,
}

impl EngineBinary {
    /// The binary at `path` (not checked: [`EngineBinary::version`] does).
    pub fn at(path: impl Into<PathBuf>) -> EngineBinary {
        EngineBinary { path: path.into() }
    }

    /// `OUTBOX_BIN` if set, else the workspace's build of the binary (see
    /// the module's comment), built once per process.
    pub fn workspace() -> Result<EngineBinary> {
        if let Some(path) = std::env::var_os("OUTBOX_BIN").filter(|p| !p.is_empty()) {
            return Ok(EngineBinary::at(path));
        }
        static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        BUILT
            .get_or_init(|| {
                let args = ["-p", "outbox-engine", "--bin", "outbox"];
                cargo_build(&args, "outbox").map_err(|e| e.to_string())
            })
            .clone()
            .map(EngineBinary::at)
            .map_err(Error::Failed)
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `outbox --version`, which also shows that the binary runs.
    pub async fn version(&self) -> Result<String> {
        let out = Command::new(&self.path)
            .arg("--version")
            .output()
            .await
            .map_err(|e| Error::io(self.path.display(), e))?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "{} --version: {}",
                self.path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The binary as a child process that takes nothing of its
    /// configuration from the caller's environment (no `DATABASE_URL`,
    /// `KAFKA_BROKERS` or `OUTBOX_*`; the caller sets what it means):
    /// warnings only, the operations endpoint on any free port, no stdin,
    /// killed when dropped.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        for (key, _) in std::env::vars_os() {
            let engine_reads = key.to_str().is_some_and(|k| {
                k.starts_with(outbox_engine::config::ENV_PREFIX) || ENGINE_ENV.contains(&k)
            });
            if engine_reads {
                cmd.env_remove(key);
            }
        }
        cmd.env("RUST_LOG", "warn")
            .env("OUTBOX_HTTP_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }
}

/// Runs `cargo build <args>` in this workspace for the profile (and into
/// the target directory) of the running executable; returns the executable
/// of the target `name` that cargo built or found fresh. Each call runs
/// cargo: callers keep the path (a `OnceLock`).
pub fn cargo_build(args: &[&str], name: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(&cargo);
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| CARGO_RUN_ENV.iter().any(|p| k.starts_with(p)))
        {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(crate::workspace_root())
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        // Progress and errors go to the caller's stderr, as cargo's own.
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some((target_dir, profile)) = std::env::current_exe().ok().and_then(|e| layout(&e)) {
        cmd.arg("--target-dir")
            .arg(target_dir)
            .args(["--profile", &profile]);
    }
    let what = format!("cargo build {}", args.join(" "));
    let out = cmd.output().map_err(|e| Error::io(&what, e))?;
    if !out.status.success() {
        return Err(Error::Failed(format!("{what} failed ({})", out.status)));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| Error::Failed(format!("{what} named no executable")))
}

/// The target directory and cargo profile of an executable cargo built:
/// `<target>/<dir>/deps/<test>` or `<target>/<dir>/<bin>`, where `<dir>` is
/// `debug` for the `dev` (and `test`) profile and the profile's name for the
/// others. `None` for an executable elsewhere (or cross-compiled, under
/// `<target>/<triple>/<dir>`): cargo's defaults then.
fn layout(exe: &Path) -> Option<(PathBuf, String)> {
    let mut dir = exe.parent()?;
    if dir.file_name()? == "deps" {
        dir = dir.parent()?;
    }
    let target = dir.parent()?;
    // Cargo marks the target directory itself, not a triple's folder in it.
    if !target.join("CACHEDIR.TAG").exists() {
        return None;
    }
    let profile = match dir.file_name()?.to_str()? {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    };
    Some((target.to_path_buf(), profile))
}

#[cfg(test)]
mod tests {
    use super::layout;
    use std::path::Path;

    #[test]
    fn the_profile_comes_from_the_folder_cargo_built_into() {
        let dir = std::env::temp_dir().join(format!("harness-layout-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("debug/deps")).unwrap();
        std::fs::write(dir.join("CACHEDIR.TAG"), "").unwrap();
        assert_eq!(
            layout(&dir.join("debug/deps/faults-0123")),
            Some((dir.clone(), "dev".into()))
        );
        assert_eq!(
            layout(&dir.join("release/loadgen")),
            Some((dir.clone(), "release".into()))
        );
        assert_eq!(
            layout(&dir.join("x86_64-unknown-linux-gnu/debug/deps/t")),
            None
        );
        assert_eq!(layout(Path::new("/usr/bin/outbox")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
