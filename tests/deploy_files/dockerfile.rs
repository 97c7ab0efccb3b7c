//! deploy/Dockerfile: what it copies covers the workspace (and is not
//! excluded by .dockerignore), it builds the engine's binary with
//! `--locked`, and the runtime stage is what the manifests expect.

use std::path::{Path, PathBuf};

use crate::text::{flag, fnmatch, normpath, shell_words, walk};
use crate::{check, read, root};

/// One instruction: (stage index, INSTRUCTION, the rest of the line).
pub struct Instruction {
    pub stage: usize,
    pub name: String,
    pub rest: String,
}

pub struct Dockerfile {
    pub instructions: Vec<Instruction>,
}

impl Dockerfile {
    /// Parses deploy/Dockerfile, continuation lines joined, comments dropped.
    pub fn load() -> Result<Dockerfile, String> {
        let text = read(&root().join("deploy/Dockerfile"))?;
        let (mut instructions, mut stage, mut buf) = (Vec::new(), None::<usize>, String::new());
        for raw in text.lines() {
            if buf.is_empty() && (raw.trim().is_empty() || raw.trim_start().starts_with('#')) {
                continue;
            }
            if let Some(head) = raw.strip_suffix('\\') {
                buf.push_str(head);
                buf.push(' ');
                continue;
            }
            let line = std::mem::take(&mut buf) + raw;
            let line = line.trim();
            let (name, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let name = name.to_ascii_uppercase();
            if name == "FROM" {
                stage = Some(stage.map_or(0, |s| s + 1));
            }
            instructions.push(Instruction {
                stage: stage.unwrap_or(0),
                name,
                rest: rest.trim().to_string(),
            });
        }
        Ok(Dockerfile { instructions })
    }

    fn rests(&self, name: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|i| i.name == name)
            .map(|i| i.rest.as_str())
            .collect()
    }

    /// The instructions of the runtime (last) stage.
    fn last_stage(&self) -> Vec<&Instruction> {
        let last = self.instructions.iter().map(|i| i.stage).max().unwrap_or(0);
        self.instructions
            .iter()
            .filter(|i| i.stage == last)
            .collect()
    }

    /// The runtime stage's numeric USER.
    pub fn uid(&self) -> Result<u64, String> {
        let users: Vec<&str> = self
            .last_stage()
            .into_iter()
            .filter(|i| i.name == "USER")
            .map(|i| i.rest.as_str())
            .collect();
        users
            .last()
            .and_then(|u| u.split(':').next())
            .and_then(|u| u.parse().ok())
            .ok_or_else(|| {
                format!(
                    "the runtime stage's USER {:?} is not numeric (runAsNonRoot cannot verify a name)",
                    users.last()
                )
            })
    }

    /// The sources of COPY/ADD from the build context, normalised.
    fn copy_sources(&self) -> Result<Vec<PathBuf>, String> {
        let mut out = Vec::new();
        for i in &self.instructions {
            if i.name != "COPY" && i.name != "ADD" {
                continue;
            }
            let words = shell_words(&i.rest)?;
            if words.iter().any(|w| w.starts_with("--from")) {
                continue;
            }
            let plain: Vec<&String> = words.iter().filter(|w| !w.starts_with("--")).collect();
            if let Some((_, sources)) = plain.split_last() {
                out.extend(sources.iter().map(|s| normpath(Path::new(s.as_str()))));
            }
        }
        Ok(out)
    }
}

/// `["a", "b"]` (exec form) or shell words.
fn json_or_shell(rest: &str) -> Result<Vec<String>, String> {
    if rest.trim_start().starts_with('[') {
        serde_json::from_str(rest).map_err(|e| format!("{rest}: {e}"))
    } else {
        shell_words(rest)
    }
}

/// .dockerignore's patterns, in order.
fn dockerignore() -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(root().join(".dockerignore")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_matches('/').to_string())
        .collect()
}

/// Whether `rel` (or a folder it is in) is excluded; later patterns win,
/// `!` re-includes.
fn ignored(rel: &Path, patterns: &[String]) -> bool {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let prefixes: Vec<String> = (1..=parts.len()).map(|i| parts[..i].join("/")).collect();
    let mut result = false;
    for p in patterns {
        let (neg, pat) = match p.strip_prefix('!') {
            Some(pat) => (true, pat),
            None => (false, p.as_str()),
        };
        if prefixes.iter().any(|x| fnmatch(x, pat)) {
            result = !neg;
        }
    }
    result
}

fn toml_file(path: &Path) -> Result<toml::Value, String> {
    toml::from_str(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

#[test]
fn copy_sources_exist_are_not_ignored_and_cover_the_workspace() {
    check(
        "Dockerfile: COPY sources exist, are not .dockerignored, cover the workspace",
        |problems| {
            let root = root();
            let patterns = dockerignore();
            let srcs = Dockerfile::load()?.copy_sources()?;
            for s in &srcs {
                let full = root.join(s);
                if !full.exists() {
                    problems.push(format!("COPY source {} does not exist", s.display()));
                } else if ignored(s, &patterns) {
                    problems.push(format!(
                        "COPY source {} is excluded by .dockerignore",
                        s.display()
                    ));
                } else if full.is_dir() {
                    walk(&full, &mut |f| {
                        let rel = f.strip_prefix(&root).unwrap_or(f);
                        let name = f
                            .file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default();
                        if (name.ends_with(".rs") || name == "Cargo.toml")
                            && ignored(rel, &patterns)
                        {
                            problems
                                .push(format!("{} is excluded by .dockerignore", rel.display()));
                        }
                    });
                }
            }
            // Cargo reads every member's manifest (tests/ is one, the
            // harness) and the targets' files: all of it must be in the
            // image's context.
            let copied = |p: &Path| {
                let p = normpath(p);
                srcs.iter().any(|s| s == Path::new(".") || p.starts_with(s))
            };
            let workspace = toml_file(&root.join("Cargo.toml"))?;
            let members = workspace["workspace"]["members"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for m in members.iter().filter_map(|m| m.as_str()) {
                if !copied(&Path::new(m).join("Cargo.toml")) {
                    problems.push(format!("workspace member {m} is not copied"));
                    continue;
                }
                let manifest = toml_file(&root.join(m).join("Cargo.toml"))?;
                for section in ["lib", "bin", "test", "bench", "example"] {
                    let targets = match manifest.get(section) {
                        Some(toml::Value::Array(list)) => list.clone(),
                        Some(one) => vec![one.clone()],
                        None => Vec::new(),
                    };
                    for t in targets {
                        if let Some(path) = t.get("path").and_then(|p| p.as_str()) {
                            if !copied(&Path::new(m).join(path)) {
                                let name = t.get("name").and_then(|n| n.as_str()).unwrap_or("?");
                                problems.push(format!(
                                    "{m}: [{section}] {name} at {path} is not copied"
                                ));
                            }
                        }
                    }
                }
            }
            for p in ["Cargo.toml", "Cargo.lock"] {
                if !srcs.iter().any(|s| s == Path::new(p)) {
                    problems.push(format!("{p} is not copied"));
                }
            }
            let shown: Vec<String> = srcs.iter().map(|s| s.display().to_string()).collect();
            Ok(shown.join(" "))
        },
    );
}

#[test]
fn the_image_builds_the_engine_binary_and_runs_it_as_expected() {
    check(
        "Dockerfile: builds the outbox binary on one Debian release, ENTRYPOINT outbox, CMD run, non-root, EXPOSE 9090",
        |problems| {
            let d = Dockerfile::load()?;
            let froms = d.rests("FROM");
            let releases: Vec<Option<&str>> = froms
                .iter()
                .map(|f| ["buster", "bullseye", "bookworm", "trixie"].into_iter().find(|r| f.contains(r)))
                .collect();
            let mut distinct: Vec<&str> = releases.iter().flatten().copied().collect();
            distinct.sort_unstable();
            distinct.dedup();
            if froms.len() < 2 {
                problems.push("not a multi-stage build".into());
            } else if releases.contains(&None) || distinct.len() != 1 {
                problems.push(format!("builder and runtime are not on one Debian release: {froms:?}"));
            }
            let runs = d.rests("RUN").join(" ");
            let build: Vec<String> = runs
                .split_once("cargo build ")
                .map(|(_, after)| after.split(['&', ';']).next().unwrap_or_default())
                .map(|a| a.split_whitespace().map(String::from).collect())
                .unwrap_or_default();
            for want in ["--release", "--locked"] {
                if !build.iter().any(|a| a == want) {
                    problems.push(format!("cargo build lacks {want}"));
                }
            }
            let engine = toml_file(&root().join("engine/Cargo.toml"))?;
            let package = engine["package"]["name"].as_str().unwrap_or_default();
            if flag(&build, "-p") != Some(package) {
                problems.push(format!("cargo build -p {:?} is not {package}", flag(&build, "-p")));
            }
            let bins: Vec<&str> = engine
                .get("bin")
                .and_then(|b| b.as_array())
                .into_iter()
                .flatten()
                .filter_map(|b| b.get("name").and_then(|n| n.as_str()))
                .collect();
            if !flag(&build, "--bin").is_some_and(|b| bins.contains(&b)) {
                problems.push(format!("--bin {:?} is not a binary of the engine", flag(&build, "--bin")));
            }
            let last = d.last_stage();
            let final_of = |name: &str| -> Vec<&str> {
                last.iter().filter(|i| i.name == name).map(|i| i.rest.as_str()).collect()
            };
            let entry = final_of("ENTRYPOINT").last().map(|r| json_or_shell(r)).transpose()?;
            let cmd = final_of("CMD").last().map(|r| json_or_shell(r)).transpose()?;
            if entry.as_deref() != Some(&["outbox".to_string()][..])
                || cmd.as_deref() != Some(&["run".to_string()][..])
            {
                problems.push(format!(
                    "ENTRYPOINT {entry:?} / CMD {cmd:?} are not [\"outbox\"] / [\"run\"]"
                ));
            }
            let dests: Vec<&str> = final_of("COPY")
                .into_iter()
                .filter(|r| r.contains("--from"))
                .filter_map(|r| r.split_whitespace().last())
                .collect();
            if !dests
                .iter()
                .any(|d| ["/usr/local/bin/outbox", "/usr/local/bin/", "/usr/local/bin"].contains(d))
            {
                problems.push("the binary is not copied to /usr/local/bin/outbox".into());
            }
            let expose = final_of("EXPOSE");
            if expose.last() != Some(&"9090") {
                problems.push(format!("EXPOSE {expose:?} is not 9090"));
            }
            let uid = match d.uid() {
                Ok(0) => {
                    problems.push("USER is root".into());
                    Some(0)
                }
                Ok(uid) => Some(uid),
                Err(e) => {
                    problems.push(e);
                    None
                }
            };
            let uid = uid.map(|u| u.to_string()).unwrap_or_else(|| "?".into());
            Ok(format!("{}; uid {uid}", froms.join(" -> ")))
        },
    );
}

#[test]
fn dockerignore_patterns_match_like_docker() {
    let patterns: Vec<String> = ["target", "**/*.log", "*.log", "!keep.log"]
        .map(String::from)
        .into();
    assert!(ignored(Path::new("target/debug/x"), &patterns));
    assert!(ignored(Path::new("engine/a.log"), &patterns));
    assert!(ignored(Path::new("a.log"), &patterns));
    assert!(!ignored(Path::new("engine/src/lib.rs"), &patterns));
    assert!(!ignored(Path::new("keep.log"), &patterns));
    assert_eq!(
        json_or_shell(r#"["outbox"]"#).expect("exec form"),
        ["outbox"]
    );
}
