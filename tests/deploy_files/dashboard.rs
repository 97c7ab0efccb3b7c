//! deploy/observability/grafana-dashboard.json: well formed (datasource
//! variable, variables its queries use, panel ids, the grid), and every
//! query valid PromQL by promtool where installed. The metric names in it
//! are checked against a scrape in `tests/observability.rs`.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{json, Value};

use crate::text::scalar;
use crate::tools::{run, which};
use crate::{check, observability_dir, read, skip};

const DS_VAR: &str = "DS_PROMETHEUS";
const GRAFANA_BUILTINS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__range",
    "__range_s",
    "__range_ms",
    "__interval_ms",
    "__dashboard",
    "__from",
    "__to",
];
/// Values substituted for promtool's syntax check.
const SUBST: &[(&str, &str)] = &[
    ("__rate_interval", "5m"),
    ("__interval", "1m"),
    ("__range", "1h"),
    ("job", "outbox"),
    ("instance", ".*"),
    ("partitions", "16"),
];

pub fn dashboard() -> Result<Value, String> {
    let path = observability_dir().join("grafana-dashboard.json");
    serde_json::from_str(&read(&path)?)
        .map_err(|e| format!("grafana-dashboard.json is not valid JSON: {e}"))
}

/// Every panel, those inside collapsed rows too.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// A PromQL expression of the dashboard: where it is, a key usable as a
/// metric name, the expression.
pub struct Query {
    pub place: String,
    pub key: String,
    pub expr: String,
}

/// The panels' queries and the query variables'.
pub fn queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                let (id, title, r) = (&p["id"], scalar(&p["title"]), scalar(&t["refId"]));
                out.push(Query {
                    place: format!("dashboard panel {id} \"{title}\" {r}"),
                    key: format!("dashboard_panel_{id}_{r}"),
                    expr: expr.to_string(),
                });
            }
        }
    }
    for v in variables(d).values() {
        if v["type"] == "query" {
            let q = &v["query"];
            let expr = if q.is_object() {
                scalar(&q["query"])
            } else {
                scalar(q)
            };
            let name = scalar(&v["name"]);
            out.push(Query {
                place: format!("dashboard variable {name}"),
                key: format!("dashboard_variable_{name}"),
                expr,
            });
        }
    }
    out
}

fn variables(d: &Value) -> BTreeMap<String, &Value> {
    d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (scalar(&v["name"]), v))
        .collect()
}

/// A variable reference: `${name}`, `${name:format}`, `$name` or `[[name]]`.
struct VarRef {
    start: usize,
    end: usize,
    name: String,
}

fn var_refs(expr: &str) -> Vec<VarRef> {
    let word = |s: &str| {
        s.find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < expr.len() {
        let rest = &expr[i..];
        let found = if let Some(body) = rest.strip_prefix("${") {
            let n = word(body);
            let after = &body[n..];
            let format = after.strip_prefix(':').map_or(0, |f| 1 + word(f));
            (n > 0 && after[format..].starts_with('}')).then(|| (n, 2 + n + format + 1, 2))
        } else if let Some(body) = rest.strip_prefix('$') {
            let n = word(body);
            (n > 0).then_some((n, 1 + n, 1))
        } else if let Some(body) = rest.strip_prefix("[[") {
            let n = word(body);
            (n > 0 && body[n..].starts_with("]]")).then_some((n, 2 + n + 2, 2))
        } else {
            None
        };
        match found {
            Some((n, len, skip)) => {
                out.push(VarRef {
                    start: i,
                    end: i + len,
                    name: rest[skip..skip + n].to_string(),
                });
                i += len;
            }
            None => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    out
}

/// `expr` with the variables promtool cannot know replaced by examples.
fn substituted(expr: &str) -> String {
    let mut out = String::new();
    let mut at = 0;
    for r in var_refs(expr) {
        out.push_str(&expr[at..r.start]);
        match SUBST.iter().find(|(name, _)| *name == r.name) {
            Some((_, value)) => out.push_str(value),
            None => out.push_str(&expr[r.start..r.end]),
        }
        at = r.end;
    }
    out.push_str(&expr[at..]);
    out
}

/// `label_values(EXPR, label)` -> `EXPR`.
fn label_values_inner(expr: &str) -> Option<&str> {
    let inner = expr
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (inner, label) = inner.rsplit_once(',')?;
    let label = label.trim();
    (!label.is_empty() && label.chars().all(|c| c.is_alphanumeric() || c == '_')).then_some(inner)
}

fn grid(p: &Value) -> Option<[i64; 4]> {
    let g = &p["gridPos"];
    Some([
        g["x"].as_i64()?,
        g["y"].as_i64()?,
        g["w"].as_i64()?,
        g["h"].as_i64()?,
    ])
}

#[test]
fn dashboard_is_well_formed() {
    check(
        "dashboard structure (variables, datasources, panel ids, grid)",
        |problems| {
            let d = dashboard()?;
            if d["schemaVersion"].as_i64().is_none_or(|v| v < 36) {
                problems.push(format!(
                    "schemaVersion {}: expected 36 or later",
                    d["schemaVersion"]
                ));
            }
            for key in ["title", "uid"] {
                if scalar(&d[key]).is_empty() {
                    problems.push(format!("no {key}"));
                }
            }
            let vars = variables(&d);
            let ds = vars.get(DS_VAR);
            if !ds.is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus") {
                problems.push(format!(
                    "no datasource variable {DS_VAR} of type prometheus"
                ));
            }
            if !vars.get("instance").is_some_and(|v| v["multi"] == true) {
                problems.push("no multi-select variable `instance`".into());
            }
            let parts = vars.get("partitions");
            let numeric = |v: &Value| {
                let q = scalar(&v["query"]);
                !q.is_empty() && q.bytes().all(|b| b.is_ascii_digit())
            };
            if !parts.is_some_and(|v| v["type"] == "constant" && numeric(v)) {
                problems.push("no constant variable `partitions` with a number".into());
            }
            let want_ds = json!({"type": "prometheus", "uid": format!("${{{DS_VAR}}}")});
            for (name, v) in &vars {
                if v["type"] == "query" && v["datasource"] != want_ds {
                    problems.push(format!(
                        "variable {name}: datasource {}, expected {want_ds}",
                        v["datasource"]
                    ));
                }
            }
            let mut ids: BTreeMap<String, String> = BTreeMap::new();
            let mut boxes: Vec<(String, [i64; 4])> = Vec::new();
            let panels = all_panels(&d);
            for p in &panels {
                let (pid, title) = (p["id"].to_string(), scalar(&p["title"]));
                if let Some(other) = ids.insert(pid.clone(), title.clone()) {
                    problems.push(format!(
                        "panel id {pid} used by \"{other}\" and \"{title}\""
                    ));
                }
                let Some([x, y, w, h]) = grid(p) else {
                    problems.push(format!("panel {pid} \"{title}\": no complete gridPos"));
                    continue;
                };
                if x < 0 || w < 1 || x + w > 24 {
                    problems.push(format!(
                        "panel {pid} \"{title}\": outside the 24-column grid"
                    ));
                }
                for (other, [ox, oy, ow, oh]) in &boxes {
                    if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                        problems.push(format!("panel {pid} \"{title}\" overlaps panel {other}"));
                    }
                }
                boxes.push((pid.clone(), [x, y, w, h]));
                if p["type"] == "row" {
                    continue;
                }
                if p["datasource"] != want_ds {
                    problems.push(format!(
                        "panel {pid} \"{title}\": datasource {}, expected {want_ds}",
                        p["datasource"]
                    ));
                }
                let targets = p["targets"].as_array().cloned().unwrap_or_default();
                if targets.is_empty() {
                    problems.push(format!("panel {pid} \"{title}\": no query"));
                }
                for t in &targets {
                    if !t["datasource"].is_null() && t["datasource"] != want_ds {
                        problems.push(format!(
                            "panel {pid} \"{title}\" {}: datasource {}",
                            scalar(&t["refId"]),
                            t["datasource"]
                        ));
                    }
                }
            }
            let qs = queries(&d);
            for q in &qs {
                for r in var_refs(&q.expr) {
                    if !vars.contains_key(&r.name) && !GRAFANA_BUILTINS.contains(&r.name.as_str()) {
                        problems.push(format!(
                            "{}: ${} is not a dashboard variable",
                            q.place, r.name
                        ));
                    }
                }
            }
            let n = panels.iter().filter(|p| p["type"] != "row").count();
            Ok(format!("{n} panels, {} queries", qs.len()))
        },
    );
}

#[test]
fn promtool_accepts_every_dashboard_query() {
    let Some(promtool) = which("promtool") else {
        return skip("promtool not installed: the dashboard's PromQL is not checked (apt-get install prometheus)");
    };
    check("promtool: every dashboard query is valid PromQL", |_| {
        // Every query as a recording rule (JSON is YAML), for `check rules`.
        let rules: Vec<Value> = queries(&dashboard()?)
            .into_iter()
            .map(|q| {
                let expr = label_values_inner(&q.expr).unwrap_or(&q.expr);
                let record: String = q
                    .key
                    .chars()
                    .map(|c| if c.is_alphanumeric() || c == '_' { c } else { '_' })
                    .collect();
                json!({"record": record, "expr": substituted(expr), "labels": {"dashboard_query": q.place}})
            })
            .collect();
        let n = rules.len();
        let doc = json!({"groups": [{"name": "dashboard", "rules": rules}]});
        let dir =
            std::env::temp_dir().join(format!("outbox-promtool-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let file = dir.join("dashboard-rules.yaml");
        std::fs::write(&file, doc.to_string()).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(promtool);
        cmd.args(["check", "rules"]).arg(&file);
        let result = run(cmd);
        let _ = std::fs::remove_dir_all(&dir);
        result.map(|_| format!("{n} queries"))
    });
}

#[test]
fn variables_are_found_and_substituted() {
    let refs: Vec<String> =
        var_refs("a{job=\"$job\", i=~\"${instance:regex}\"}[$__rate_interval] [[x]] $ 5")
            .into_iter()
            .map(|r| r.name)
            .collect();
    assert_eq!(refs, ["job", "instance", "__rate_interval", "x"]);
    assert_eq!(
        substituted("rate(x{job=\"$job\"}[$__rate_interval]) $other"),
        "rate(x{job=\"outbox\"}[5m]) $other"
    );
    assert_eq!(
        label_values_inner("label_values(up{a=\"b\"}, instance)"),
        Some("up{a=\"b\"}")
    );
    assert_eq!(label_values_inner("sum(x)"), None);
}
