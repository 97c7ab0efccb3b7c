//! deploy/k8s: the manifests agree with each other (selectors, names and
//! keys, the port, the configuration file) and with the image.

use serde_json::Value;

use crate::manifests::{main_container, pod_spec, shutdown_ms, what, Manifests};
use crate::text::{flag, scalar, strings};
use crate::{check, root, shown};

fn labels_selected(sel: &Value, labels: &Value) -> bool {
    match sel.as_object() {
        Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| &labels[k] == v),
        _ => false,
    }
}

#[test]
fn every_document_has_api_version_kind_and_name_and_no_namespace() {
    check(
        "k8s: every document has apiVersion, kind and metadata.name, no namespace",
        |problems| {
            let m = Manifests::load();
            for (path, d) in &m.docs {
                let path = shown(path);
                if !d.is_object() {
                    problems.push(format!("{path}: a document is not a mapping"));
                    continue;
                }
                let mut missing: Vec<&str> = ["apiVersion", "kind"]
                    .into_iter()
                    .filter(|k| scalar(&d[*k]).is_empty())
                    .collect();
                if d["kind"] != "Kustomization" && scalar(&d["metadata"]["name"]).is_empty() {
                    missing.push("metadata.name");
                }
                if !missing.is_empty() {
                    problems.push(format!(
                        "{path}: {} lacks {}",
                        d["kind"],
                        missing.join(", ")
                    ));
                }
                if !scalar(&d["metadata"]["namespace"]).is_empty() {
                    problems.push(format!(
                        "{path}: {} sets a namespace; the manifests are namespace-less",
                        d["kind"]
                    ));
                }
            }
            Ok(format!("{} documents", m.docs.len()))
        },
    );
}

#[test]
fn kustomization_lists_exactly_the_manifests_present() {
    check(
        "k8s: kustomization.yaml lists exactly the manifests present",
        |problems| {
            let m = Manifests::load();
            let mut listed = strings(&m.only("Kustomization")?["resources"]);
            listed.sort();
            let k8s = root().join("deploy/k8s");
            let mut present: Vec<String> = m
                .docs
                .iter()
                .filter(|(_, d)| d["kind"] != "Kustomization")
                .map(|(p, _)| p.strip_prefix(&k8s).unwrap_or(p).display().to_string())
                .collect();
            present.sort();
            present.dedup();
            let mut unique = listed.clone();
            unique.dedup();
            if unique.len() != listed.len() {
                problems.push(format!("resources lists a file twice: {listed:?}"));
            }
            for f in present.iter().filter(|f| !listed.contains(f)) {
                problems.push(format!("{f} is present but not listed in resources"));
            }
            for f in unique.iter().filter(|f| !present.contains(f)) {
                problems.push(format!("{f} is listed in resources but not present"));
            }
            Ok(listed.join(", "))
        },
    );
}

#[test]
fn selectors_match_the_pod_labels() {
    check(
        "k8s: Deployment, Service and PodDisruptionBudget selectors match the pod labels",
        |problems| {
            let m = Manifests::load();
            let dep = m.only("Deployment")?;
            let labels = &dep["spec"]["template"]["metadata"]["labels"];
            let mut matches = |sel: &Value, what: String| {
                if !labels_selected(sel, labels) {
                    problems.push(format!(
                        "{what} selector {sel} does not select the pod labels {labels}"
                    ));
                }
            };
            matches(&dep["spec"]["selector"]["matchLabels"], "Deployment".into());
            for s in m.of_kind("Service") {
                matches(
                    &s["spec"]["selector"],
                    format!("Service {}", s["metadata"]["name"]),
                );
            }
            for t in pod_spec(dep)["topologySpreadConstraints"]
                .as_array()
                .into_iter()
                .flatten()
            {
                matches(
                    &t["labelSelector"]["matchLabels"],
                    "topologySpreadConstraints".into(),
                );
            }
            for p in m.of_kind("PodDisruptionBudget") {
                matches(
                    &p["spec"]["selector"]["matchLabels"],
                    format!("PodDisruptionBudget {}", p["metadata"]["name"]),
                );
            }
            for p in m.of_kind("PodDisruptionBudget") {
                if p["spec"]["maxUnavailable"] != 1 {
                    problems.push("PodDisruptionBudget: maxUnavailable is not 1".into());
                }
            }
            Ok(String::new())
        },
    );
}

#[test]
fn every_secret_and_configmap_referenced_exists() {
    check(
        "k8s: every Secret and ConfigMap name and key referenced exists",
        |problems| {
            let m = Manifests::load();
            for w in m.workloads() {
                let (_, p) = m.resolve_env(w)?;
                problems.extend(p.into_iter().map(|x| format!("{}: {x}", what(w))));
                for v in pod_spec(w)["volumes"].as_array().into_iter().flatten() {
                    let cm = scalar(&v["configMap"]["name"]);
                    if v["configMap"].is_object() && m.configmap_data(&cm).is_none() {
                        problems.push(format!(
                            "{}: volume {}: no ConfigMap {cm}",
                            what(w),
                            v["name"]
                        ));
                    }
                    let secret = scalar(&v["secret"]["secretName"]);
                    if v["secret"].is_object() && m.secret_data(&secret)?.is_none() {
                        problems.push(format!(
                            "{}: volume {}: no Secret {secret}",
                            what(w),
                            v["name"]
                        ));
                    }
                }
            }
            Ok(String::new())
        },
    );
}

#[test]
fn outbox_config_names_a_file_of_the_mounted_configmap() {
    check(
        "k8s: OUTBOX_CONFIG names a file of the mounted ConfigMap",
        |problems| {
            let m = Manifests::load();
            let mut seen = Vec::new();
            for w in m.workloads() {
                let (env, _) = m.resolve_env(w)?;
                match env.get("OUTBOX_CONFIG").filter(|p| !p.is_empty()) {
                    None => problems.push(format!("{}: OUTBOX_CONFIG is not set", what(w))),
                    Some(path) => {
                        let (cm, key, _) = m.mounted_config(w, path)?;
                        seen.push(format!("{path} = {cm}/{key}"));
                    }
                }
            }
            seen.sort();
            seen.dedup();
            Ok(seen.join("; "))
        },
    );
}

#[test]
fn http_address_ports_probes_annotations_and_service_agree() {
    check(
        "k8s: OUTBOX_HTTP_ADDR, containerPort, probes, scrape annotations and Service agree",
        |problems| {
            let m = Manifests::load();
            let dep = m.only("Deployment")?;
            let c = main_container(dep)?;
            let (env, _) = m.resolve_env(dep)?;
            let addr = env.get("OUTBOX_HTTP_ADDR").cloned().unwrap_or_default();
            let Some(port) = addr.strip_prefix("0.0.0.0:") else {
                return Err(format!(
                    "OUTBOX_HTTP_ADDR={addr:?}: probes and scrapes need 0.0.0.0:<port>"
                ));
            };
            let port: u64 = port
                .parse()
                .map_err(|_| format!("OUTBOX_HTTP_ADDR={addr:?}: no port"))?;
            let http = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == "http")
                .map(|p| &p["containerPort"]);
            if http.and_then(Value::as_u64) != Some(port) {
                problems.push(format!(
                    "containerPort named http is {http:?}, OUTBOX_HTTP_ADDR says {port}"
                ));
            }
            let named_or_port = |v: &Value| v == "http" || v.as_u64() == Some(port);
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &c[probe]["httpGet"];
                if get["path"] != path {
                    problems.push(format!("{probe} is not httpGet {path}"));
                }
                if !named_or_port(&get["port"]) {
                    problems.push(format!("{probe} port {} is not http/{port}", get["port"]));
                }
            }
            let ann = &dep["spec"]["template"]["metadata"]["annotations"];
            if ann["prometheus.io/scrape"] != "true"
                || scalar(&ann["prometheus.io/port"]) != port.to_string()
                || ann["prometheus.io/path"] != "/metrics"
            {
                problems.push(format!(
                    "prometheus.io annotations {ann} do not point at :{port}/metrics"
                ));
            }
            for s in m.of_kind("Service") {
                for sp in s["spec"]["ports"].as_array().into_iter().flatten() {
                    if !named_or_port(&sp["targetPort"]) {
                        problems.push(format!(
                            "Service {} targetPort {}",
                            s["metadata"]["name"], sp["targetPort"]
                        ));
                    }
                }
            }
            Ok(format!("port {port}"))
        },
    );
}

#[test]
fn termination_grace_exceeds_the_shutdown_timeout() {
    check(
        "k8s: terminationGracePeriodSeconds exceeds relay.shutdown_timeout_ms",
        |problems| {
            let m = Manifests::load();
            let dep = m.only("Deployment")?;
            let args = strings(&main_container(dep)?["args"]);
            let ms = shutdown_ms(&args, &m.config_text(dep)?)?;
            // Kubernetes' default grace period.
            let grace_s = pod_spec(dep)["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30);
            if grace_s * 1000 <= ms {
                problems.push(format!(
                    "terminationGracePeriodSeconds {grace_s} does not exceed relay.shutdown_timeout_ms {ms}"
                ));
            }
            Ok(format!("{grace_s} s > {ms} ms"))
        },
    );
}

#[test]
fn the_migrate_job_uses_the_deployments_image_database_and_configuration() {
    check(
        "k8s: the migrate Job uses the Deployment's image, database and configuration",
        |problems| {
            let m = Manifests::load();
            let (dep, job) = (m.only("Deployment")?, m.only("Job")?);
            let (dc, jc) = (main_container(dep)?, main_container(job)?);
            let ((denv, _), (jenv, _)) = (m.resolve_env(dep)?, m.resolve_env(job)?);
            if dc["image"] != jc["image"] {
                problems.push(format!("images differ: {} / {}", dc["image"], jc["image"]));
            }
            for key in ["DATABASE_URL", "OUTBOX_SCHEMA", "OUTBOX_CONFIG"] {
                if denv.get(key) != jenv.get(key) {
                    problems.push(format!("{key} differs between the Deployment and the Job"));
                }
            }
            if m.config_text(dep)? != m.config_text(job)? {
                problems
                    .push("the Job reads another configuration file than the Deployment".into());
            }
            let args = strings(&jc["args"]);
            let partitions = flag(&args, "--partitions").and_then(|p| p.parse::<u32>().ok());
            if args.first().map(String::as_str) != Some("migrate")
                || partitions.is_none_or(|p| p < 1)
            {
                problems.push(format!(
                    "Job args {args:?} are not `migrate --partitions <N>`"
                ));
            }
            if !jc["command"].is_null() {
                problems.push("the Job overrides the image's ENTRYPOINT".into());
            }
            if !dc["command"].is_null() {
                problems.push("the Deployment overrides the image's ENTRYPOINT".into());
            }
            let dargs = strings(&dc["args"]);
            if dargs.first().map(String::as_str) != Some("run") {
                problems.push(format!("Deployment args {dargs:?} do not start with run"));
            }
            let restart = &pod_spec(job)["restartPolicy"];
            if restart != "OnFailure" && restart != "Never" {
                problems.push("Job restartPolicy must be OnFailure or Never".into());
            }
            Ok(format!(
                "migrate --partitions {}",
                flag(&args, "--partitions").unwrap_or("?")
            ))
        },
    );
}

#[test]
fn pods_run_as_the_images_non_root_uid_read_only_with_requests_and_limits() {
    check(
        "k8s: pods run as the image's non-root uid, read-only root, with requests and limits",
        |problems| {
            let m = Manifests::load();
            let uid = crate::dockerfile::Dockerfile::load()?.uid()?;
            for w in m.workloads() {
                let psc = &pod_spec(w)["securityContext"];
                let c = main_container(w)?;
                let csc = &c["securityContext"];
                if psc["runAsNonRoot"] != true && csc["runAsNonRoot"] != true {
                    problems.push(format!("{}: runAsNonRoot is not set", what(w)));
                }
                let run_as = if csc["runAsUser"].is_null() {
                    &psc["runAsUser"]
                } else {
                    &csc["runAsUser"]
                };
                if !run_as.is_null() && run_as.as_u64() != Some(uid) {
                    problems.push(format!(
                        "{}: runAsUser {run_as} is not the Dockerfile's USER {uid}",
                        what(w)
                    ));
                }
                if csc["readOnlyRootFilesystem"] != true {
                    problems.push(format!("{}: readOnlyRootFilesystem is not set", what(w)));
                }
                if csc["allowPrivilegeEscalation"] != false {
                    problems.push(format!(
                        "{}: allowPrivilegeEscalation is not false",
                        what(w)
                    ));
                }
                let res = &c["resources"];
                let set = |v: &Value| v.as_object().is_some_and(|o| !o.is_empty());
                if !set(&res["requests"]) || !set(&res["limits"]) {
                    problems.push(format!("{}: resources need requests and limits", what(w)));
                }
            }
            Ok(format!("uid {uid}"))
        },
    );
}
