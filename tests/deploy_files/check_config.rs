//! The configuration the deploy files hand the engine, through the
//! engine's own validation: `outbox check-config` with exactly the
//! environment (Secret, ConfigMap TOML, fieldRef pod name resolved) and the
//! arguments a pod or a compose container gets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use crate::manifests::{main_container, pod_name, Manifests};
use crate::text::strings;
use crate::{check, compose, verbose};

/// A key no section of the configuration has; the control case expects
/// check-config to name it in its error.
const UNKNOWN_KEY: &str = "deploy_check_unknown_key";

/// A folder of its own for the configuration files of one case.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "outbox-deploy-check-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("a scratch file");
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The environment and the `check-config` arguments of a k8s workload
/// (`kind`), its OUTBOX_CONFIG written to `scratch`; `edit` changes that
/// file's text first.
fn k8s_case(
    kind: &str,
    scratch: &Scratch,
    edit: impl FnOnce(&str) -> String,
) -> Result<(BTreeMap<String, String>, Vec<String>), String> {
    let m = Manifests::load();
    let w = m.only(kind)?;
    let (mut env, problems) = m.resolve_env(w)?;
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let args = if kind == "Deployment" {
        let args = strings(&main_container(w)?["args"]);
        match args.split_first() {
            Some((run, rest)) if run == "run" => rest.to_vec(),
            _ => return Err(format!("Deployment args {args:?} do not start with run")),
        }
    } else {
        // migrate connects at once; check-config validates the same
        // database URL, schema, file and log format without connecting.
        vec!["--node-id".to_string(), pod_name(w)]
    };
    if let Some(path) = env.get("OUTBOX_CONFIG").filter(|p| !p.is_empty()).cloned() {
        let (_, key, text) = m.mounted_config(w, &path)?;
        env.insert("OUTBOX_CONFIG".into(), scratch.write(&key, &edit(&text)));
    }
    Ok((env, args))
}

/// `text` with `key = 1` inside its first table.
fn with_unknown_key(text: &str, key: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let first_table = lines.iter().position(|l| {
        let l = l.trim_start();
        l.starts_with('[') && !l.starts_with("[[")
    });
    match first_table {
        Some(i) => {
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            out.insert(i + 1, format!("{key} = 1"));
            out.join("\n") + "\n"
        }
        None => format!("{key} = 1\n{text}"),
    }
}

/// Runs `outbox check-config` with exactly `env` (nothing leaks in from
/// the test's environment but PATH): (exit code, stdout and stderr).
fn check_config(env: &BTreeMap<String, String>, args: &[String]) -> (Option<i32>, String) {
    let binary = outbox_harness::EngineBinary::workspace().expect("the outbox binary");
    let out = Command::new(binary.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .arg("check-config")
        .args(args)
        .output()
        .expect("run outbox check-config");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// `check-config` must accept the case: returns the node id it resolved.
fn accepts(label: &str, env: &BTreeMap<String, String>, args: &[String]) -> Result<String, String> {
    let (code, out) = check_config(env, args);
    if code != Some(0) {
        return Err(format!(
            "check-config rejects {label} (exit {code:?}):\n{out}"
        ));
    }
    if verbose() {
        println!("{out}");
    }
    let node = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("node_id: \""))
        .and_then(|l| l.strip_suffix("\","))
        .unwrap_or("?");
    Ok(format!("node id {node}"))
}

#[test]
fn check_config_accepts_the_deployments_environment() {
    check(
        "check-config accepts the k8s Deployment's env, Secret and ConfigMap TOML",
        |_| {
            let scratch = Scratch::new();
            let (env, args) = k8s_case("Deployment", &scratch, str::to_string)?;
            accepts("the Deployment's configuration", &env, &args)
        },
    );
}

#[test]
fn check_config_accepts_the_migrate_jobs_environment() {
    check(
        "check-config accepts the k8s migrate Job's env, Secret and ConfigMap TOML",
        |_| {
            let scratch = Scratch::new();
            let (env, args) = k8s_case("Job", &scratch, str::to_string)?;
            accepts("the migrate Job's configuration", &env, &args)
        },
    );
}

#[test]
fn check_config_rejects_the_configmap_toml_with_an_unknown_key() {
    check(
        "check-config rejects the ConfigMap TOML with an unknown key (control)",
        |problems| {
            let scratch = Scratch::new();
            let (env, args) =
                k8s_case("Deployment", &scratch, |t| with_unknown_key(t, UNKNOWN_KEY))?;
            let (code, out) = check_config(&env, &args);
            if code == Some(0) || !out.contains(UNKNOWN_KEY) {
                problems.push(format!(
                    "check-config did not reject it with an error naming {UNKNOWN_KEY} (exit {code:?}):\n{out}"
                ));
            }
            Ok(format!(
                "exit {code:?}: {}",
                out.lines().next().unwrap_or_default()
            ))
        },
    );
}

#[test]
fn check_config_accepts_the_compose_engines_environment() {
    check(
        "check-config accepts the compose engine's environment",
        |_| {
            let svcs = compose::services()?;
            let engine = compose::service(&svcs, "engine")?;
            let args = compose::args(engine)?;
            let Some(("run", rest)) = args.split_first().map(|(a, r)| (a.as_str(), r)) else {
                return Err(format!(
                    "compose engine command {args:?} does not start with run"
                ));
            };
            // No OUTBOX_NODE_ID: the node id is the container's host name, its id.
            let mut args = rest.to_vec();
            args.extend(["--node-id".to_string(), "3f2a9c1b7e4d".to_string()]);
            accepts(
                "the compose engine's environment",
                &compose::env(engine)?,
                &args,
            )
        },
    );
}

#[test]
fn the_unknown_key_goes_into_the_first_table() {
    assert_eq!(
        with_unknown_key("# c\n[a]\nx = 1\n", "k"),
        "# c\n[a]\nk = 1\nx = 1\n"
    );
    assert_eq!(with_unknown_key("x = 1", "k"), "k = 1\nx = 1");
}
