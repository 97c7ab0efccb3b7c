//! The Kubernetes manifests as the kubelet would read them: each
//! workload's environment (Secret, ConfigMap, fieldRef resolved), the file
//! a volume mount shows, the pod names the API server would give.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use outbox_engine::config::{Config, RelayConfig};

use crate::text::{self, flag, scalar};
use crate::{root, yaml_docs};

/// Every document of deploy/k8s with the file it came from.
pub struct Manifests {
    pub docs: Vec<(PathBuf, Value)>,
}

impl Manifests {
    pub fn load() -> Manifests {
        let mut docs = Vec::new();
        for path in crate::deploy_yaml_files() {
            if path.starts_with(root().join("deploy/k8s")) {
                let parsed = yaml_docs(&path).unwrap_or_else(|e| panic!("{e}"));
                docs.extend(
                    parsed
                        .into_iter()
                        .filter(|d| !d.is_null())
                        .map(|d| (path.clone(), d)),
                );
            }
        }
        Manifests { docs }
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["kind"] == kind)
            .collect()
    }

    pub fn only(&self, kind: &str) -> Result<&Value, String> {
        match self.of_kind(kind).as_slice() {
            [one] => Ok(one),
            found => Err(format!(
                "expected exactly one {kind}, found {}",
                found.len()
            )),
        }
    }

    /// The Deployments and Jobs.
    pub fn workloads(&self) -> Vec<&Value> {
        let mut w = self.of_kind("Deployment");
        w.extend(self.of_kind("Job"));
        w
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
    }

    pub fn secret_data(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        let Some(s) = self.named("Secret", name) else {
            return Ok(None);
        };
        let mut data = BTreeMap::new();
        for (k, v) in s["data"].as_object().into_iter().flatten() {
            let bytes =
                text::base64_decode(&scalar(v)).map_err(|e| format!("Secret {name} {k}: {e}"))?;
            let value =
                String::from_utf8(bytes).map_err(|_| format!("Secret {name} {k}: not UTF-8"))?;
            data.insert(k.clone(), value);
        }
        for (k, v) in s["stringData"].as_object().into_iter().flatten() {
            data.insert(k.clone(), scalar(v));
        }
        Ok(Some(data))
    }

    pub fn configmap_data(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let c = self.named("ConfigMap", name)?;
        let data = c["data"].as_object().into_iter().flatten();
        Some(data.map(|(k, v)| (k.clone(), scalar(v))).collect())
    }

    fn data(&self, kind: &str, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        if kind == "Secret" {
            self.secret_data(name)
        } else {
            Ok(self.configmap_data(name))
        }
    }

    /// The container's environment as the kubelet builds it, and what in
    /// it could not be resolved.
    pub fn resolve_env(
        &self,
        w: &Value,
    ) -> Result<(BTreeMap<String, String>, Vec<String>), String> {
        let c = main_container(w)?;
        let (mut env, mut problems) = (BTreeMap::new(), Vec::new());
        for src in c["envFrom"].as_array().into_iter().flatten() {
            let prefix = scalar(&src["prefix"]);
            let (kind, r) = if src["secretRef"].is_object() {
                ("Secret", &src["secretRef"])
            } else {
                ("ConfigMap", &src["configMapRef"])
            };
            match self.data(kind, &scalar(&r["name"]))? {
                Some(data) => {
                    env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)))
                }
                None => problems.push(format!("envFrom {src}: no such object")),
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let name = scalar(&e["name"]);
            let vf = &e["valueFrom"];
            if vf.is_null() {
                let value = expand(&scalar(&e["value"]), &env);
                env.insert(name, value);
            } else if vf["secretKeyRef"].is_object() || vf["configMapKeyRef"].is_object() {
                let (kind, r) = if vf["secretKeyRef"].is_object() {
                    ("Secret", &vf["secretKeyRef"])
                } else {
                    ("ConfigMap", &vf["configMapKeyRef"])
                };
                let (obj, key) = (scalar(&r["name"]), scalar(&r["key"]));
                match self.data(kind, &obj)? {
                    None => {
                        problems.push(format!("{name}: {kind} {obj} is not among the manifests"))
                    }
                    Some(data) => match data.get(&key) {
                        None => problems.push(format!("{name}: {kind} {obj} has no key {key}")),
                        Some(v) => {
                            env.insert(name, v.clone());
                        }
                    },
                }
            } else if vf["fieldRef"].is_object() {
                let field = scalar(&vf["fieldRef"]["fieldPath"]);
                let value = match field.as_str() {
                    "metadata.name" => pod_name(w),
                    "metadata.namespace" => "default".into(),
                    "spec.nodeName" => "node-1".into(),
                    "status.podIP" => "10.0.0.10".into(),
                    _ => {
                        problems.push(format!(
                            "{name}: fieldRef {field} not simulated by the check"
                        ));
                        String::new()
                    }
                };
                env.insert(name, value);
            } else {
                problems.push(format!("{name}: valueFrom {vf} not simulated by the check"));
            }
        }
        Ok((env, problems))
    }

    /// (ConfigMap, key, text) of the file at `path` inside the container.
    pub fn mounted_config(
        &self,
        w: &Value,
        path: &str,
    ) -> Result<(String, String, String), String> {
        let spec = pod_spec(w);
        for m in main_container(w)?["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let mp = scalar(&m["mountPath"]);
            let mp = mp.trim_end_matches('/');
            let sub = scalar(&m["subPath"]);
            let rel = if !sub.is_empty() && path == mp {
                sub
            } else if let Some(rel) = path.strip_prefix(mp).and_then(|r| r.strip_prefix('/')) {
                if !sub.is_empty() {
                    continue;
                }
                rel.to_string()
            } else {
                continue;
            };
            let vol = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == m["name"]);
            let Some(cm) = vol.map(|v| &v["configMap"]).filter(|c| c.is_object()) else {
                return Err(format!(
                    "{path}: volume {} is not a configMap volume",
                    m["name"]
                ));
            };
            let items: BTreeMap<String, String> = cm["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| (scalar(&i["path"]), scalar(&i["key"])))
                .collect();
            let key = items.get(&rel).cloned().unwrap_or(rel);
            let name = scalar(&cm["name"]);
            let Some(data) = self.configmap_data(&name) else {
                return Err(format!(
                    "{path}: ConfigMap {name} is not among the manifests"
                ));
            };
            let Some(text) = data.get(&key) else {
                return Err(format!("{path}: ConfigMap {name} has no key {key}"));
            };
            return Ok((name, key, text.clone()));
        }
        Err(format!(
            "OUTBOX_CONFIG={path} lies under no volumeMount of {}",
            w["metadata"]["name"]
        ))
    }

    /// The configuration file text `w` reads through OUTBOX_CONFIG ("" if none).
    pub fn config_text(&self, w: &Value) -> Result<String, String> {
        let (env, _) = self.resolve_env(w)?;
        match env.get("OUTBOX_CONFIG").filter(|p| !p.is_empty()) {
            Some(path) => Ok(self.mounted_config(w, path)?.2),
            None => Ok(String::new()),
        }
    }
}

/// `$(VAR)` references to variables defined earlier, as the kubelet expands them.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(end)
                if after[..end]
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_') =>
            {
                let name = &after[..end];
                match env.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[i..i + 3 + end]),
                }
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

pub fn pod_spec(w: &Value) -> &Value {
    &w["spec"]["template"]["spec"]
}

pub fn main_container(w: &Value) -> Result<&Value, String> {
    match pod_spec(w)["containers"].as_array().map(Vec::as_slice) {
        Some([one]) => Ok(one),
        _ => Err(format!("{}: expected one container", w["metadata"]["name"])),
    }
}

pub fn what(w: &Value) -> String {
    format!("{} {}", scalar(&w["kind"]), scalar(&w["metadata"]["name"]))
}

/// What the API server would name a pod of `w` (at most 63 characters).
pub fn pod_name(w: &Value) -> String {
    let name = scalar(&w["metadata"]["name"]);
    if w["kind"] == "Deployment" {
        format!("{name}-6b8f7c9d5f-x7k2p")
    } else {
        format!("{name}-x7k2p")
    }
}

/// `relay.shutdown_timeout_ms` of a node started with `args` and the
/// configuration file `toml` ("" for none): the flag, else the file, else
/// the engine's default.
pub fn shutdown_ms(args: &[String], toml: &str) -> Result<u64, String> {
    if let Some(v) = flag(args, "--shutdown-timeout-ms") {
        return v
            .parse()
            .map_err(|_| format!("--shutdown-timeout-ms {v:?} is not a number"));
    }
    if toml.is_empty() {
        return Ok(RelayConfig::default().shutdown_timeout_ms);
    }
    Config::from_toml(toml)
        .map(|c| c.relay.shutdown_timeout_ms)
        .map_err(|e| e.to_string())
}
