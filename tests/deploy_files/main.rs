//! The deployment and observability files checked without Docker, a
//! cluster, Prometheus or Grafana: that they parse, agree with each other
//! and with the engine (its configuration types, its `outbox check-config`,
//! its Cargo manifests). Schema validation is left to the tools made for it
//! (`kubectl kustomize`/`kustomize`, `kubeconform`, `docker compose config`,
//! `hadolint`, `promtool`), each skipped with a note when not installed.
//!
//! Needs no services. `deploy/check.sh` runs all of it with `--nocapture`,
//! so every check prints one `ok`/`skip` line; a failing check panics with
//! every problem it found. That the metric names the dashboard and the rules
//! use are ones the engine records is checked against a real scrape in
//! `tests/observability.rs`.
//!
//! `OUTBOX_OBSERVABILITY_DIR` points the observability checks at a modified
//! copy of `deploy/observability/`, `OUTBOX_CHECK_ROOT` all of them at
//! another checkout; `OUTBOX_CHECK_VERBOSE=1` also prints the
//! configurations `check-config` accepted.

mod check_config;
mod compose;
mod dashboard;
mod dockerfile;
mod k8s;
mod manifests;
mod prometheus;
mod text;
mod tools;

use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The repository root, or `OUTBOX_CHECK_ROOT`: another checkout whose
/// files are to be checked (against this build).
pub fn root() -> PathBuf {
    match std::env::var_os("OUTBOX_CHECK_ROOT") {
        Some(dir) => PathBuf::from(dir),
        None => outbox_harness::workspace_root().to_path_buf(),
    }
}

/// The folder of the dashboard, the rules and their tests.
pub fn observability_dir() -> PathBuf {
    match std::env::var_os("OUTBOX_OBSERVABILITY_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root().join("deploy/observability"),
    }
}

/// `path` relative to the repository root when it lies inside it.
pub fn shown(path: &Path) -> String {
    let root = root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

pub fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", shown(path)))
}

/// Every document of a YAML file, as JSON values (the dashboard is JSON:
/// one tree type for both). Merge keys (`<<: *anchor`) are applied.
pub fn yaml_docs(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path)?;
    let docs = yaml_rust2::YamlLoader::load_from_str(&text)
        .map_err(|e| format!("{}: {e}", shown(path)))?;
    docs.into_iter()
        .map(|d| text::yaml_to_json(d).map_err(|e| format!("{}: {e}", shown(path))))
        .collect()
}

/// A file holding one YAML document.
pub fn yaml_doc(path: &Path) -> Result<Value, String> {
    let mut docs = yaml_docs(path)?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => Err(format!("{}: {n} documents, expected one", shown(path))),
    }
}

/// Runs one check: `body` pushes the problems it finds and returns a short
/// summary, or `Err` when it cannot go on. Prints `ok    what (summary)` or
/// panics with every problem, one per line.
pub fn check(what: &str, body: impl FnOnce(&mut Vec<String>) -> Result<String, String>) {
    let mut problems = Vec::new();
    let summary = body(&mut problems);
    let summary = match summary {
        Ok(summary) => summary,
        Err(fatal) => {
            problems.push(fatal);
            String::new()
        }
    };
    if !problems.is_empty() {
        panic!("FAIL  {what}\n        {}", problems.join("\n        "));
    }
    if summary.is_empty() {
        println!("ok    {what}");
    } else {
        println!("ok    {what} ({summary})");
    }
}

/// A check that cannot run here (a tool is not installed).
pub fn skip(why: impl Display) {
    println!("skip  {why}");
}

/// Whether `OUTBOX_CHECK_VERBOSE` asks for the effective configurations.
pub fn verbose() -> bool {
    std::env::var("OUTBOX_CHECK_VERBOSE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Every YAML file of the compose and Kubernetes folders.
pub fn deploy_yaml_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["deploy/compose", "deploy/k8s"] {
        text::walk(&root().join(sub), &mut |p| {
            if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p.to_path_buf());
            }
        });
    }
    out.sort();
    out
}

#[test]
fn every_yaml_file_parses() {
    check("yaml parses: deploy/compose, deploy/k8s", |problems| {
        let files = deploy_yaml_files();
        if files.is_empty() {
            return Err("no YAML files under deploy/compose and deploy/k8s".into());
        }
        let mut counts = Vec::new();
        for path in &files {
            match yaml_docs(path) {
                Ok(docs) => counts.push(format!(
                    "{} {}",
                    shown(path),
                    docs.iter().filter(|d| !d.is_null()).count()
                )),
                Err(e) => problems.push(e),
            }
        }
        Ok(format!("documents: {}", counts.join(", ")))
    });
}
