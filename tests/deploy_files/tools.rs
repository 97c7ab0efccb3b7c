//! The tools made for these files, where installed: they render and
//! validate what the checks above only read. Each is skipped with a note
//! when missing (none is installed by the tests).

use std::path::PathBuf;
use std::process::Command;

use crate::compose::COMPOSE;
use crate::{check, root, skip};

/// The program `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs `cmd` in the repository root: its output, or the failure with it.
pub fn run(mut cmd: Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .current_dir(root())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{shown} exited with {}:\n{text}", out.status))
    }
}

/// `kustomize build` or `kubectl kustomize`, whichever is installed.
fn kustomize() -> Option<(Command, String)> {
    if let Some(k) = which("kustomize") {
        let mut cmd = Command::new(k);
        cmd.args(["build", "deploy/k8s"]);
        Some((cmd, "kustomize build".into()))
    } else {
        let mut cmd = Command::new(which("kubectl")?);
        cmd.args(["kustomize", "deploy/k8s"]);
        Some((cmd, "kubectl kustomize".into()))
    }
}

/// The manifests as kustomize renders them, with stdout only.
fn rendered() -> Result<String, String> {
    let (mut cmd, name) = kustomize().ok_or("neither kustomize nor kubectl is installed")?;
    let out = cmd
        .current_dir(root())
        .output()
        .map_err(|e| format!("{name}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{name} deploy/k8s:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn kustomize_renders_the_manifests() {
    let Some((_, name)) = kustomize() else {
        return skip("kustomize rendering: neither kustomize nor kubectl is installed");
    };
    check(&format!("{name} deploy/k8s renders"), |_| {
        let text = rendered()?;
        let objects = text.lines().filter(|l| l.starts_with("kind:")).count();
        Ok(format!("{objects} objects"))
    });
}

#[test]
fn kubeconform_validates_the_rendered_manifests() {
    let Some(kubeconform) = which("kubeconform") else {
        return skip("kubeconform is not installed: no schema validation of the manifests (no cluster is contacted either)");
    };
    check("kubeconform -strict", |_| {
        let text = rendered()?;
        let dir = std::env::temp_dir().join(format!(
            "outbox-kubeconform-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let file = dir.join("rendered.yaml");
        std::fs::write(&file, text).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(kubeconform);
        cmd.args(["-strict", "-summary"]).arg(&file);
        let result = run(cmd);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(result?.lines().last().unwrap_or_default().to_string())
    });
}

#[test]
fn docker_compose_accepts_the_compose_file() {
    let plugin = which("docker").filter(|d| {
        let mut cmd = Command::new(d);
        cmd.args(["compose", "version"]);
        run(cmd).is_ok()
    });
    let Some(docker) = plugin else {
        return skip("docker compose config: the compose plugin is not installed");
    };
    check("docker compose config -q", |_| {
        let mut cmd = Command::new(docker);
        cmd.args(["compose", "-f", COMPOSE, "config", "-q"]);
        run(cmd).map(|_| String::new())
    });
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let Some(hadolint) = which("hadolint") else {
        return skip(
            "hadolint is not installed; the image itself is not built here (no Docker engine)",
        );
    };
    check("hadolint deploy/Dockerfile", |_| {
        let mut cmd = Command::new(hadolint);
        cmd.arg("deploy/Dockerfile");
        run(cmd).map(|_| String::new())
    });
}
