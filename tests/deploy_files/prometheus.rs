//! deploy/observability: the alert rules (complete, with severities and
//! runbooks), the Prometheus configuration and the rule tests that load
//! them, one partition count everywhere, and promtool's own checks where
//! it is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::manifests::{main_container, Manifests};
use crate::text::{flag, scalar, strings};
use crate::tools::{run, which};
use crate::{check, compose, observability_dir, skip, yaml_doc};

/// Alert name and the severities it must have.
const EXPECTED_ALERTS: &[(&str, &[&str])] = &[
    ("OutboxLagHigh", &["warning", "critical"]),
    ("OutboxPendingGrowing", &["warning"]),
    ("OutboxPartitionWithoutOwner", &["critical"]),
    ("OutboxDeadLettersGrowing", &["warning"]),
    ("OutboxNodeNotReady", &["warning"]),
    ("OutboxBrokerErrors", &["warning"]),
    ("OutboxLeaseChurn", &["warning"]),
];
/// Alerts the rule tests must cover.
const TESTED_ALERTS: &[&str] = &["OutboxLagHigh", "OutboxNodeNotReady"];

fn file(name: &str) -> PathBuf {
    observability_dir().join(name)
}

/// Every rule of the rules file.
fn rules() -> Result<Vec<Value>, String> {
    let doc = yaml_doc(&file("prometheus-alerts.yaml"))?;
    Ok(doc["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect())
}

/// Whether `rule_files` of the file at `base` loads the alert rules; the
/// listed files that do not exist.
fn loads_the_rules(doc: &Value, base: &Path) -> (bool, Vec<String>) {
    let want = file("prometheus-alerts.yaml").canonicalize().ok();
    let listed = strings(&doc["rule_files"]);
    let loads = listed
        .iter()
        .any(|f| base.join(f).canonicalize().ok() == want && want.is_some());
    let missing = listed
        .into_iter()
        .filter(|f| !base.join(f).exists())
        .collect();
    (loads, missing)
}

/// The `job` values of `up{...job="X"...}` selectors in `expr`.
fn up_jobs(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("up{") {
        let before = expr[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let body = &expr[i + 3..];
        let body = &body[..body.find('}').unwrap_or(body.len())];
        for (j, _) in body.match_indices("job=\"") {
            let word_before = body[..j].chars().next_back();
            if word_before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let value = &body[j + 5..];
            if let Some(end) = value.find('"') {
                out.push(value[..end].to_string());
            }
        }
    }
    out
}

#[test]
fn alert_rules_are_complete() {
    check(
        "prometheus-alerts.yaml parses; alerts complete",
        |problems| {
            let doc = yaml_doc(&file("prometheus-alerts.yaml"))?;
            let groups = doc["groups"]
                .as_array()
                .filter(|g| !g.is_empty())
                .ok_or("no `groups` list")?;
            let mut alerts: Vec<(String, String)> = Vec::new();
            for g in groups {
                let gname = scalar(&g["name"]);
                let Some(rules) = g["rules"].as_array().filter(|_| !gname.is_empty()) else {
                    problems.push(format!("group {gname:?}: needs a name and a rules list"));
                    continue;
                };
                for r in rules {
                    let name = if r["alert"].is_null() {
                        scalar(&r["record"])
                    } else {
                        scalar(&r["alert"])
                    };
                    if name.is_empty() || scalar(&r["expr"]).is_empty() {
                        problems.push(format!(
                            "group {gname}: a rule without alert/record name or expr"
                        ));
                        continue;
                    }
                    if r["alert"].is_null() {
                        continue;
                    }
                    let sev = scalar(&r["labels"]["severity"]);
                    if sev != "warning" && sev != "critical" {
                        problems.push(format!(
                            "{name}: severity {sev:?}, expected warning or critical"
                        ));
                    }
                    for key in ["summary", "description", "runbook"] {
                        if scalar(&r["annotations"][key]).trim().is_empty() {
                            problems.push(format!("{name} ({sev}): no {key} annotation"));
                        }
                    }
                    alerts.push((name, sev));
                }
            }
            for (name, sevs) in EXPECTED_ALERTS {
                for sev in *sevs {
                    if !alerts.iter().any(|(n, s)| n == name && s == sev) {
                        problems.push(format!("missing alert {name} with severity {sev}"));
                    }
                }
            }
            alerts.sort();
            alerts.dedup();
            Ok(format!("{} alerts", alerts.len()))
        },
    );
}

#[test]
fn prometheus_config_loads_the_rules_and_scrapes_the_job_they_select() {
    check(
        "prometheus.yaml parses; loads the rules; up{job=...} matches a scrape job",
        |problems| {
            let path = file("prometheus.yaml");
            let doc = yaml_doc(&path)?;
            let (loads, missing) = loads_the_rules(&doc, path.parent().unwrap_or(Path::new(".")));
            if !loads {
                problems.push("rule_files does not load prometheus-alerts.yaml".into());
            }
            problems.extend(
                missing
                    .into_iter()
                    .map(|f| format!("rule file {f} does not exist")),
            );
            let jobs: Vec<&Value> = doc["scrape_configs"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            let names: Vec<String> = jobs.iter().map(|j| scalar(&j["job_name"])).collect();
            for r in rules()? {
                for job in up_jobs(&scalar(&r["expr"])) {
                    if !names.contains(&job) {
                        problems.push(format!(
                            "{}: selects up{{job=\"{job}\"}} but prometheus.yaml has no such scrape job",
                            scalar(&r["alert"])
                        ));
                    }
                }
            }
            let targets: Vec<String> = jobs
                .iter()
                .flat_map(|j| j["static_configs"].as_array().cloned().unwrap_or_default())
                .flat_map(|sc| strings(&sc["targets"]))
                .collect();
            Ok(format!("jobs {names:?}, targets {}", targets.join(", ")))
        },
    );
}

#[test]
fn rule_tests_load_the_rules_and_cover_the_key_alerts() {
    check("alerts-test.yaml parses; loads the rules", |problems| {
        let path = file("alerts-test.yaml");
        let doc = yaml_doc(&path)?;
        let (loads, _) = loads_the_rules(&doc, path.parent().unwrap_or(Path::new(".")));
        if !loads {
            problems.push("rule_files does not load prometheus-alerts.yaml".into());
        }
        let cases = doc["tests"].as_array().cloned().unwrap_or_default();
        let mut tested: Vec<String> = cases
            .iter()
            .flat_map(|c| c["alert_rule_test"].as_array().cloned().unwrap_or_default())
            .map(|t| scalar(&t["alertname"]))
            .collect();
        tested.sort();
        tested.dedup();
        for name in TESTED_ALERTS {
            if !tested.iter().any(|t| t == name) {
                problems.push(format!("no test for {name}"));
            }
        }
        Ok(format!(
            "{} test cases on {}",
            cases.len(),
            tested.join(", ")
        ))
    });
}

#[test]
fn one_partition_count_everywhere() {
    check("one partition count everywhere", |problems| {
        let mut counts: Vec<(String, Option<u64>)> = Vec::new();
        for r in rules()?
            .iter()
            .filter(|r| r["alert"] == "OutboxPartitionWithoutOwner")
        {
            // `16 - sum by (job) (outbox_leases_held) > 0`
            let expr = scalar(&r["expr"]);
            let expr = expr.trim_start().trim_start_matches('(').trim_start();
            let n = expr
                .split_once('-')
                .filter(|(_, rest)| rest.trim_start().starts_with("sum"))
                .and_then(|(n, _)| n.trim().parse().ok());
            counts.push(("rule OutboxPartitionWithoutOwner".into(), n));
        }
        let d = crate::dashboard::dashboard()?;
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["name"] == "partitions" {
                counts.push((
                    "dashboard constant partitions".into(),
                    scalar(&v["query"]).parse().ok(),
                ));
            }
        }
        let m = Manifests::load();
        let job_args = strings(&main_container(m.only("Job")?)?["args"]);
        counts.push((
            "deploy/k8s/migrate-job.yaml migrate --partitions".into(),
            flag(&job_args, "--partitions").and_then(|p| p.parse().ok()),
        ));
        let svcs = compose::services()?;
        let migrate = compose::args(compose::service(&svcs, "migrate")?)?;
        counts.push((
            format!("{} migrate --partitions", compose::COMPOSE),
            flag(&migrate, "--partitions").and_then(|p| p.parse().ok()),
        ));
        let shown: Vec<String> = counts
            .iter()
            .map(|(k, v)| format!("{k} = {}", v.map_or("?".into(), |v| v.to_string())))
            .collect();
        let mut values: Vec<Option<u64>> = counts.iter().map(|(_, v)| *v).collect();
        values.sort_unstable();
        values.dedup();
        if values.contains(&None) || counts.len() < 4 {
            problems.push(format!(
                "could not find the partition count in all places: {shown:?}"
            ));
        } else if values.len() != 1 {
            problems.extend(shown.iter().cloned());
        }
        Ok(shown.join(", "))
    });
}

/// `promtool ARGS...` on the files of the observability folder.
fn promtool(what: &str, args: &[&str], name: &str) {
    let Some(promtool) = which("promtool") else {
        return skip(format!(
            "promtool not installed: {what} not checked (apt-get install prometheus)"
        ));
    };
    check(&format!("promtool {} {name}", args.join(" ")), |_| {
        let mut cmd = Command::new(promtool);
        cmd.args(args).arg(file(name));
        run(cmd).map(|_| String::new())
    });
}

#[test]
fn promtool_checks_the_rules() {
    promtool(
        "rules syntax",
        &["check", "rules"],
        "prometheus-alerts.yaml",
    );
}

#[test]
fn promtool_checks_the_config() {
    promtool("config syntax", &["check", "config"], "prometheus.yaml");
}

#[test]
fn promtool_runs_the_alert_unit_tests() {
    promtool("alert unit tests", &["test", "rules"], "alerts-test.yaml");
}

#[test]
fn up_selectors_are_found() {
    assert_eq!(
        up_jobs("up{job=\"outbox\"} == 0 or setup{job=\"x\"}"),
        ["outbox"]
    );
    assert_eq!(up_jobs("up{instance=\"a\", job=\"j\"}"), ["j"]);
    assert!(up_jobs("sum(up)").is_empty());
}
