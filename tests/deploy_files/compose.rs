//! deploy/compose/compose.yaml: the services' wiring (start order, URLs and
//! credentials, the advertised broker address) and engine replicas that do
//! not collide.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::manifests::shutdown_ms;
use crate::text::{duration_s, flag, normpath, parse_url, scalar, shell_words, strings};
use crate::{check, root, yaml_doc};

pub const COMPOSE: &str = "deploy/compose/compose.yaml";

pub fn services() -> Result<Map<String, Value>, String> {
    let doc = yaml_doc(&root().join(COMPOSE))?;
    Ok(doc["services"].as_object().cloned().unwrap_or_default())
}

pub fn service<'a>(svcs: &'a Map<String, Value>, name: &str) -> Result<&'a Value, String> {
    svcs.get(name).ok_or_else(|| format!("no service {name}"))
}

/// `${VAR:-default}` and `${VAR-default}` give the default, `${VAR}` and
/// `$VAR` nothing, `$$` a dollar: what compose does with an empty
/// environment.
pub fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').unwrap_or(body.len());
            let inner = &body[..end];
            let name_len = inner
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            let tail = &inner[name_len..];
            if let Some(default) = tail.strip_prefix(":-").or_else(|| tail.strip_prefix('-')) {
                out.push_str(default);
            }
            rest = body.get(end + 1..).unwrap_or_default();
        } else {
            let name_len = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if name_len == 0 {
                out.push('$');
            }
            rest = &after[name_len..];
        }
    }
    out.push_str(rest);
    out
}

/// A service's environment as its container gets it.
pub fn env(service: &Value) -> Result<BTreeMap<String, String>, String> {
    if !service["env_file"].is_null() {
        return Err("env_file is not simulated by the check".into());
    }
    let mut out = BTreeMap::new();
    match &service["environment"] {
        Value::Array(list) => {
            for e in list.iter().map(scalar) {
                let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                out.insert(k.to_string(), interpolate(v));
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone(), interpolate(&scalar(v)));
            }
        }
        _ => {}
    }
    Ok(out)
}

/// A service's command as words.
pub fn args(service: &Value) -> Result<Vec<String>, String> {
    match &service["command"] {
        Value::String(s) => shell_words(s),
        other => Ok(strings(other)),
    }
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// `[IP:]HOST_PORT:CONTAINER_PORT`: a fixed host port.
fn publishes_fixed_port(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split(':').collect();
    let is_ip = |s: &str| {
        s.split('.').count() == 4
            && s.split('.')
                .all(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()))
    };
    let rest = match parts.as_slice() {
        [ip, rest @ ..] if is_ip(ip) => rest,
        all => all,
    };
    rest.len() >= 2 && !rest[0].is_empty() && rest[0].bytes().all(|b| b.is_ascii_digit())
}

#[test]
fn services_start_in_order_and_build_the_dockerfile() {
    check(
        "compose: services, dependency order, healthchecks, one-shot migrate, build of deploy/Dockerfile",
        |problems| {
            let svcs = services()?;
            for name in ["postgres", "kafka", "migrate", "engine"] {
                service(&svcs, name)?;
            }
            let mut dep = |svc: &str, on: &str, cond: &str| {
                if svcs[svc]["depends_on"][on]["condition"] != cond {
                    problems.push(format!("{svc} does not depend on {on} with condition {cond}"));
                }
            };
            dep("migrate", "postgres", "service_healthy");
            dep("engine", "migrate", "service_completed_successfully");
            dep("engine", "kafka", "service_healthy");
            for name in ["postgres", "kafka", "engine"] {
                if svcs[name]["healthcheck"]["test"].is_null() {
                    problems.push(format!("{name} has no healthcheck"));
                }
            }
            let restart = &svcs["migrate"]["restart"];
            if !restart.is_null() && restart != "no" {
                problems.push("migrate must not restart (restart: \"no\")".into());
            }
            let margs = args(&svcs["migrate"])?;
            let partitions = flag(&margs, "--partitions").and_then(|p| p.parse::<u32>().ok());
            if margs.first().map(String::as_str) != Some("migrate") || partitions.is_none() {
                problems.push(format!("migrate command {margs:?} is not `migrate --partitions <N>`"));
            }
            if args(&svcs["engine"])?.first().map(String::as_str) != Some("run") {
                problems.push("engine command does not start with run".into());
            }
            let compose_dir = Path::new(COMPOSE).parent().unwrap_or(Path::new("."));
            for name in ["migrate", "engine"] {
                let b = &svcs[name]["build"];
                let context = scalar(&b["context"]);
                let dockerfile = scalar(&b["dockerfile"]);
                let ctx = normpath(&compose_dir.join(if context.is_empty() { "." } else { &context }));
                let df = normpath(&ctx.join(if dockerfile.is_empty() { "Dockerfile" } else { &dockerfile }));
                if ctx != Path::new(".") || df != Path::new("deploy/Dockerfile") {
                    problems.push(format!(
                        "{name} builds {} with context {}, not deploy/Dockerfile with the repository root",
                        df.display(),
                        ctx.display()
                    ));
                }
            }
            Ok(String::new())
        },
    );
}

#[test]
fn database_url_and_brokers_match_the_postgres_credentials_and_the_advertised_listener() {
    check(
        "compose: DATABASE_URL and KAFKA_BROKERS match the postgres credentials and the advertised listener",
        |problems| {
            let svcs = services()?;
            let pg = env(service(&svcs, "postgres")?)?;
            let user = pg.get("POSTGRES_USER").cloned().unwrap_or_else(|| "postgres".into());
            let want = (
                Some(user.clone()),
                pg.get("POSTGRES_PASSWORD").cloned(),
                pg.get("POSTGRES_DB").cloned().unwrap_or(user),
            );
            for name in ["migrate", "engine"] {
                let e = env(service(&svcs, name)?)?;
                let u = parse_url(e.get("DATABASE_URL").map(String::as_str).unwrap_or_default())?;
                if !u.host.as_ref().is_some_and(|h| svcs.contains_key(h)) {
                    problems.push(format!("{name}: DATABASE_URL host {:?} is not a service", u.host));
                }
                if u.port.unwrap_or(5432) != 5432 {
                    problems.push(format!(
                        "{name}: DATABASE_URL port {:?} is not the container port 5432",
                        u.port
                    ));
                }
                let got = (u.user, u.password, u.path.trim_start_matches('/').to_string());
                if got != want {
                    problems.push(format!(
                        "{name}: DATABASE_URL user/password/database do not match the postgres service"
                    ));
                }
            }
            let engine = env(service(&svcs, "engine")?)?;
            let kafka = args(service(&svcs, "kafka")?)?;
            let advertised: Vec<&str> = flag(&kafka, "--advertise-kafka-addr")
                .map(|a| {
                    a.split(',')
                        .map(|x| x.rsplit_once("://").map_or(x, |(_, addr)| addr))
                        .collect()
                })
                .unwrap_or_default();
            let brokers = engine.get("KAFKA_BROKERS").cloned().unwrap_or_default();
            for b in brokers.split(',') {
                let host = b.rsplit_once(':').map_or(b, |(h, _)| h);
                if !svcs.contains_key(host) {
                    problems.push(format!("engine: broker {b} is not a service"));
                }
                if !advertised.contains(&b) {
                    problems.push(format!(
                        "engine: broker {b} is not among the advertised addresses {advertised:?}"
                    ));
                }
            }
            Ok(String::new())
        },
    );
}

#[test]
fn engine_replicas_get_distinct_node_ids_reachable_readiness_and_grace() {
    check(
        "compose: engine replicas get distinct node ids, reachable /readyz, enough grace to drain",
        |problems| {
            let svcs = services()?;
            let e = service(&svcs, "engine")?;
            let environment = env(e)?;
            let replicas = e["deploy"]["replicas"].as_u64().unwrap_or(1);
            if environment.contains_key("OUTBOX_NODE_ID") {
                problems.push(
                    "OUTBOX_NODE_ID is set: every replica would claim the same node id".into(),
                );
            }
            for key in ["container_name", "hostname"] {
                if !e[key].is_null() {
                    problems.push(format!(
                        "{key} is set: replicas need distinct host names (the default node id)"
                    ));
                }
            }
            for p in e["ports"].as_array().into_iter().flatten() {
                if publishes_fixed_port(&scalar(p)) {
                    problems.push(format!(
                        "published fixed host port {p} collides between replicas"
                    ));
                }
            }
            let addr = environment
                .get("OUTBOX_HTTP_ADDR")
                .cloned()
                .unwrap_or_default();
            if !addr.starts_with("0.0.0.0:") {
                problems.push(format!(
                    "OUTBOX_HTTP_ADDR={addr:?} is unreachable from outside the container"
                ));
            } else {
                let test = strings(&e["healthcheck"]["test"]).join(" ");
                let port = port_of(&addr).map(|p| format!("/{p}")).unwrap_or_default();
                if port.is_empty() || !test.contains(&port) || !test.contains("/readyz") {
                    problems.push(
                        "the healthcheck does not ask /readyz on the OUTBOX_HTTP_ADDR port".into(),
                    );
                }
            }
            let ms = shutdown_ms(&args(e)?, "")?;
            let grace = match &e["stop_grace_period"] {
                Value::Null => 10.0, // compose's default
                v => duration_s(&scalar(v))?,
            };
            if grace * 1000.0 <= ms as f64 {
                problems.push(format!(
                    "stop_grace_period {grace} s does not exceed the shutdown timeout {ms} ms"
                ));
            }
            Ok(format!(
                "replicas {replicas}, stop_grace_period {grace} s > {ms} ms"
            ))
        },
    );
}

#[test]
fn interpolation_and_ports_read_like_compose() {
    assert_eq!(interpolate("a${X:-b}c${Y-d}e${Z}$W$$"), "abcde$");
    assert!(publishes_fixed_port("127.0.0.1:15432:5432"));
    assert!(publishes_fixed_port("8080:80"));
    assert!(!publishes_fixed_port("9090"));
    assert!(!publishes_fixed_port("127.0.0.1:9090"));
}
