#!/usr/bin/env bash
# Checks the observability files beside this script as far as possible
# without Prometheus or Grafana running:
#
#   - grafana-dashboard.json parses (python3 -m json.tool) and is well formed:
#     the `DS_PROMETHEUS` datasource variable (type prometheus) used by every
#     panel and query, a multi-select `instance`, the constant `partitions`,
#     every $variable used in a query defined, unique panel ids, panels on
#     the 24-column grid without overlaps
#   - prometheus-alerts.yaml, prometheus.yaml and alerts-test.yaml parse; the
#     rules have severity, summary, description and runbook; every expected
#     alert is there; the rule and test files they name exist
#   - every metric name (`outbox_...`) in a PromQL expression of the
#     dashboard (queries and variable queries), of the rules and of the rule
#     tests' input series is one engine/src/ops/metrics.rs defines; a
#     histogram only with _bucket/_sum/_count, the others only bare; unknown
#     names are listed. As a control, the same check must reject a bogus name
#   - the baked-in partition count agrees everywhere: the rule
#     OutboxPartitionWithoutOwner, the dashboard's `partitions` constant and
#     `migrate --partitions` in deploy/k8s/migrate-job.yaml and
#     deploy/compose/compose.yaml; the rule OutboxNodeDown selects the scrape
#     job prometheus.yaml defines
#   - with promtool: `promtool check rules` and `promtool check config`, the
#     unit tests (`promtool test rules alerts-test.yaml`), and the syntax of
#     every dashboard query (variables substituted, checked as recording
#     rules); skipped with a note when promtool is missing (Debian/Ubuntu:
#     `apt-get install prometheus` ships it)
#
# One line per check (ok / skip / FAIL); the exit code is 1 if any failed.
#
#   deploy/observability/check.sh [DIR]
#
# DIR (default: this script's folder) holds the files to check, so a modified
# copy can be checked; metrics.rs and the deploy manifests are always read
# from this repository. Needs python3 with PyYAML (it fails with a clear
# message when missing: `pip install pyyaml` or `apt-get install
# python3-yaml`). It installs nothing and connects to nothing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

case ${1:-} in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
if [ $# -gt 1 ]; then
  echo "usage: deploy/observability/check.sh [DIR]" >&2
  exit 2
fi
DIR="$(cd "${1:-$HERE}" && pwd)"

FAILURES=0
ok()   { printf 'ok    %s\n' "$*"; }
skip() { printf 'skip  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILURES=$((FAILURES + 1)); }
indent() { sed 's/^/        /'; }
have() { command -v "$1" >/dev/null 2>&1; }

if ! have python3; then
  fail "python3 is required"
  exit 1
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  fail "python3 has no PyYAML module: install it with \`pip install pyyaml\` or \`apt-get install python3-yaml\`, then run this again"
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

DASHBOARD="$DIR/grafana-dashboard.json"
RULES="$DIR/prometheus-alerts.yaml"
CONFIG="$DIR/prometheus.yaml"
TESTS="$DIR/alerts-test.yaml"

for f in "$DASHBOARD" "$RULES" "$CONFIG" "$TESTS"; do
  [ -f "$f" ] || fail "missing ${f#"$ROOT"/}"
done
[ "$FAILURES" -eq 0 ] || exit 1

if out=$(python3 -m json.tool "$DASHBOARD" 2>&1 >/dev/null); then
  ok "grafana-dashboard.json is valid JSON"
else
  fail "grafana-dashboard.json is not valid JSON"
  printf '%s\n' "$out" | indent
  exit 1
fi

# ---------------------------------------------------------------------------
# Everything read from the files alone. Prints check lines; exits 1 if any
# failed. Writes $TMP/dashboard-rules.yaml: every dashboard query, variables
# substituted, as a recording rule for promtool's syntax check.
PY=$(cat <<'PYEOF'
import json, os, re, sys
import yaml

ROOT, DIR, TMP = sys.argv[1:4]
METRICS_RS = os.path.join(ROOT, "engine/src/ops/metrics.rs")
DASHBOARD = os.path.join(DIR, "grafana-dashboard.json")
RULES = os.path.join(DIR, "prometheus-alerts.yaml")
CONFIG = os.path.join(DIR, "prometheus.yaml")
TESTS = os.path.join(DIR, "alerts-test.yaml")
DS_VAR = "DS_PROMETHEUS"
# name -> severities it must have
EXPECTED_ALERTS = {
    "OutboxLagHigh": {"warning", "critical"},
    "OutboxPendingGrowing": {"warning"},
    "OutboxPartitionWithoutOwner": {"critical"},
    "OutboxDeadLettersGrowing": {"warning"},
    "OutboxNodeNotReady": {"warning"},
    "OutboxBrokerErrors": {"warning"},
    "OutboxLeaseChurn": {"warning"},
}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__range_ms",
                    "__interval_ms", "__dashboard", "__from", "__to"}
# Values substituted for the promtool syntax check.
SUBST = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "job": "outbox",
         "instance": ".*", "partitions": "16"}
FAILS = 0


def rel(path):
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def line(status, msg, details=()):
    global FAILS
    print(f"{status:<5} {msg}")
    for d in details:
        for part in str(d).splitlines():
            print(f"        {part}")
    if status == "FAIL":
        FAILS += 1


def check(msg, fn):
    """Runs fn, which returns a list of problems, or (problems, suffix)."""
    try:
        out = fn()
    except Exception as e:  # a broken file must give a FAIL line, not a traceback
        out = [f"{type(e).__name__}: {e}"]
    problems, suffix = out if isinstance(out, tuple) else (out, "")
    line("FAIL" if problems else "ok", msg + (f" ({suffix})" if suffix else ""), problems)


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


# --- what the engine exports -------------------------------------------------
def engine_metrics():
    src = open(METRICS_RS).read()
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', src))
    histograms = {consts[c] for c in re.findall(r"describe_histogram!\(\s*(\w+)", src)}
    described = set(re.findall(r"describe_(?:counter|gauge|histogram)!\(\s*(\w+)", src))
    if not consts:
        raise RuntimeError(f"no metric constants found in {rel(METRICS_RS)}")
    undescribed = sorted(set(consts) - described)
    return set(consts.values()), histograms, undescribed


TOKEN = re.compile(r"(?<![A-Za-z0-9_])outbox_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")


def unknown_names(exprs, known, histograms):
    """exprs: [(where, expr)]. Returns (problems, metric base names used)."""
    problems, used = [], set()
    for where, expr in exprs:
        for tok in TOKEN.findall(expr):
            base = next((tok[: -len(s)] for s in SUFFIXES if tok.endswith(s)), None)
            if tok in known and tok not in histograms:
                used.add(tok)
            elif tok in histograms:
                problems.append(f"{where}: {tok} is a histogram: it has only {tok}_bucket/_sum/_count series")
            elif base in histograms:
                used.add(base)
            elif base in known:
                problems.append(f"{where}: {tok}: {base} is not a histogram, it has no {tok[len(base):]} series")
            else:
                problems.append(f"{where}: unknown metric {tok}")
    return problems, used


# --- the dashboard -----------------------------------------------------------
def dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(d):
    for p in d.get("panels", []):
        yield p
        yield from p.get("panels", [])  # collapsed rows hold their panels


def dashboard_exprs(d, keys=False):
    """[(where, expr)], or [(where, key, expr)] with a metric-name-safe key."""
    out = []
    for p in all_panels(d):
        for t in p.get("targets", []):
            if "expr" in t:
                out.append((f'dashboard panel {p.get("id")} "{p.get("title")}" {t.get("refId")}',
                            f'dashboard_panel_{p.get("id")}_{t.get("refId")}', t["expr"]))
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            out.append((f'dashboard variable {v.get("name")}', f'dashboard_variable_{v.get("name")}', q))
    return out if keys else [(w, e) for w, _, e in out]


VAR_REF = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def check_dashboard():
    d = dashboard()
    problems = []
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        problems.append(f'schemaVersion {d.get("schemaVersion")!r}: expected 36 or later')
    for key in ("title", "uid"):
        if not d.get(key):
            problems.append(f"no {key}")
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get(DS_VAR)
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append(f"no datasource variable {DS_VAR} of type prometheus")
    inst = variables.get("instance")
    if not inst or not inst.get("multi"):
        problems.append("no multi-select variable `instance`")
    parts = variables.get("partitions")
    if not parts or parts.get("type") != "constant" or not str(parts.get("query", "")).isdigit():
        problems.append("no constant variable `partitions` with a number")
    want_ds = {"type": "prometheus", "uid": "${%s}" % DS_VAR}
    for name, v in variables.items():
        if v.get("type") == "query" and v.get("datasource") != want_ds:
            problems.append(f"variable {name}: datasource {v.get('datasource')!r}, expected {want_ds}")
    ids, boxes = {}, []
    for p in all_panels(d):
        pid, title = p.get("id"), p.get("title")
        if pid in ids:
            problems.append(f'panel id {pid} used by "{ids[pid]}" and "{title}"')
        ids[pid] = title
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in "xywh"):
            problems.append(f'panel {pid} "{title}": no complete gridPos')
            continue
        if g["x"] < 0 or g["w"] < 1 or g["x"] + g["w"] > 24:
            problems.append(f'panel {pid} "{title}": outside the 24-column grid')
        for other_id, o in boxes:
            if (g["x"] < o["x"] + o["w"] and o["x"] < g["x"] + g["w"]
                    and g["y"] < o["y"] + o["h"] and o["y"] < g["y"] + g["h"]):
                problems.append(f'panel {pid} "{title}" overlaps panel {other_id}')
        boxes.append((pid, g))
        if p.get("type") == "row":
            continue
        if p.get("datasource") != want_ds:
            problems.append(f'panel {pid} "{title}": datasource {p.get("datasource")!r}, expected {want_ds}')
        if not p.get("targets"):
            problems.append(f'panel {pid} "{title}": no query')
        for t in p.get("targets", []):
            if t.get("datasource", want_ds) != want_ds:
                problems.append(f'panel {pid} "{title}" {t.get("refId")}: datasource {t.get("datasource")!r}')
    for where, expr in dashboard_exprs(d):
        for m in VAR_REF.finditer(expr):
            name = next(g for g in m.groups() if g)
            if name not in variables and name not in GRAFANA_BUILTINS:
                problems.append(f"{where}: ${name} is not a dashboard variable")
    n = sum(1 for p in all_panels(d) if p.get("type") != "row")
    return problems, f"{n} panels, {len(dashboard_exprs(d))} queries"


def write_dashboard_rules():
    """Every dashboard query as a recording rule, for `promtool check rules`."""
    rules = []
    for where, key, expr in dashboard_exprs(dashboard(), keys=True):
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)
        if m:
            expr = m.group(1)
        def sub(m):
            name = next(g for g in m.groups() if g)
            return SUBST.get(name, m.group(0))
        rules.append({"record": re.sub(r"\W", "_", key), "expr": VAR_REF.sub(sub, expr),
                      "labels": {"dashboard_query": where}})
    with open(os.path.join(TMP, "dashboard-rules.yaml"), "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)
    return [], f"{len(rules)} queries written for promtool"


# --- the rules, the config, the tests --------------------------------------
def rules_list():
    doc = load_yaml(RULES)
    out = []
    for g in doc["groups"]:
        for r in g["rules"]:
            out.append((g["name"], r))
    return out


def check_rules():
    doc = load_yaml(RULES)
    problems = []
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not doc["groups"]:
        return ["no `groups` list"]
    names = set()
    for g in doc["groups"]:
        if not g.get("name") or not isinstance(g.get("rules"), list):
            problems.append(f"group {g.get('name')!r}: needs a name and a rules list")
            continue
        for r in g["rules"]:
            name = r.get("alert") or r.get("record")
            if not name or not r.get("expr"):
                problems.append(f"group {g['name']}: a rule without alert/record name or expr")
                continue
            if "alert" not in r:
                continue
            sev = (r.get("labels") or {}).get("severity")
            names.add((name, sev))
            if sev not in ("warning", "critical"):
                problems.append(f"{name}: severity {sev!r}, expected warning or critical")
            ann = r.get("annotations") or {}
            for key in ("summary", "description", "runbook"):
                if not str(ann.get(key, "")).strip():
                    problems.append(f"{name} ({sev}): no {key} annotation")
    for name, sevs in EXPECTED_ALERTS.items():
        for sev in sevs:
            if (name, sev) not in names:
                problems.append(f"missing alert {name} with severity {sev}")
    return problems, f"{len(names)} alerts"


def check_config():
    doc = load_yaml(CONFIG)
    problems = []
    base = os.path.dirname(CONFIG)
    files = doc.get("rule_files") or []
    if not any(os.path.realpath(os.path.join(base, f)) == os.path.realpath(RULES) for f in files):
        problems.append(f"rule_files does not load {os.path.basename(RULES)}")
    for f in files:
        if not os.path.exists(os.path.join(base, f)):
            problems.append(f"rule file {f} does not exist")
    jobs = {j.get("job_name"): j for j in doc.get("scrape_configs") or []}
    for name, r in rules_list():
        for job in re.findall(r'\bup\{[^}]*\bjob="([^"]+)"', r.get("expr", "")):
            if job not in jobs:
                problems.append(f'{r.get("alert")}: selects up{{job="{job}"}} but prometheus.yaml has no such scrape job')
    targets = [t for j in jobs.values() for sc in j.get("static_configs") or [] for t in sc.get("targets") or []]
    return problems, f"jobs {sorted(jobs)}, targets {', '.join(targets)}"


def check_tests():
    doc = load_yaml(TESTS)
    problems = []
    base = os.path.dirname(TESTS)
    files = doc.get("rule_files") or []
    if not any(os.path.realpath(os.path.join(base, f)) == os.path.realpath(RULES) for f in files):
        problems.append(f"rule_files does not load {os.path.basename(RULES)}")
    tested = {t.get("alertname") for case in doc.get("tests") or [] for t in case.get("alert_rule_test") or []}
    for name in ("OutboxLagHigh", "OutboxNodeNotReady"):
        if name not in tested:
            problems.append(f"no test for {name}")
    return problems, f"{len(doc.get('tests') or [])} test cases on {', '.join(sorted(tested))}"


def test_series():
    doc = load_yaml(TESTS)
    return [(f"alerts-test.yaml input series", s.get("series", ""))
            for case in doc.get("tests") or [] for s in case.get("input_series") or []]


def all_exprs():
    exprs = dashboard_exprs(dashboard())
    exprs += [(f'rule {r.get("alert") or r.get("record")}', r["expr"]) for _, r in rules_list()]
    exprs += test_series()
    return exprs


def check_names():
    known, histograms, undescribed = engine_metrics()
    problems, used = unknown_names(all_exprs(), known, histograms)
    problems += [f"{c} is not described in metrics.rs" for c in undescribed]
    unused = sorted(known - used)
    return problems, f"{len(used)} of {len(known)} metrics used" + (f"; not shown: {', '.join(unused)}" if unused else "")


def check_names_control():
    """The same check on the same expressions plus one bogus name must fail."""
    known, histograms, _ = engine_metrics()
    bogus = "outbox_check_sh_bogus_total"
    exprs = all_exprs() + [("control", f"rate({bogus}[5m])"),
                           ("control", "outbox_pending_events_count"),
                           ("control", "outbox_send_duration_seconds")]
    problems, _ = unknown_names(exprs, known, histograms)
    flagged = [p for p in problems if p.startswith("control:")]
    if len(flagged) != 3:
        return [f"expected 3 problems for 3 bogus references, got: {flagged}"]
    return [], "unknown name, _count on a gauge, bare histogram all rejected"


def check_partitions():
    counts = {}
    for _, r in rules_list():
        if r.get("alert") == "OutboxPartitionWithoutOwner":
            m = re.match(r"\s*\(?\s*(\d+)\s*-\s*sum\b", r["expr"])
            counts["rule OutboxPartitionWithoutOwner"] = int(m.group(1)) if m else None
    for v in dashboard().get("templating", {}).get("list", []):
        if v.get("name") == "partitions":
            counts["dashboard constant partitions"] = int(v.get("query"))
    for path in ("deploy/k8s/migrate-job.yaml", "deploy/compose/compose.yaml"):
        full = os.path.join(ROOT, path)
        if os.path.exists(full):
            m = re.search(r'"--partitions",\s*"(\d+)"', open(full).read())
            if m:
                counts[f"{path} migrate --partitions"] = int(m.group(1))
    problems = []
    if None in counts.values() or len(counts) < 2:
        problems.append(f"could not find the partition count in all places: {counts}")
    elif len(set(counts.values())) != 1:
        problems += [f"{k}: {v}" for k, v in counts.items()]
    return problems, ", ".join(f"{k} = {v}" for k, v in counts.items())


check("dashboard structure (variables, datasources, panel ids, grid)", check_dashboard)
check("prometheus-alerts.yaml parses; alerts complete", check_rules)
check("prometheus.yaml parses; loads the rules; up{job=...} matches a scrape job", check_config)
check("alerts-test.yaml parses; loads the rules", check_tests)
check("metric names in dashboard, rules and tests exist in engine/src/ops/metrics.rs", check_names)
check("control: the metric-name check rejects bogus names", check_names_control)
check("one partition count everywhere", check_partitions)
check("dashboard queries extracted for promtool", write_dashboard_rules)
sys.exit(1 if FAILS else 0)
PYEOF
)

if ! python3 -c "$PY" "$ROOT" "$DIR" "$TMP"; then
  FAILURES=$((FAILURES + 1))
fi

# ---------------------------------------------------------------------------
if have promtool; then
  version=$(promtool --version 2>&1 | head -n1)
  run_promtool() { # description, then the command
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
      ok "$what"
    else
      fail "$what"
      printf '%s\n' "$out" | indent
    fi
  }
  run_promtool "promtool check rules prometheus-alerts.yaml ($version)" promtool check rules "$RULES"
  run_promtool "promtool check config prometheus.yaml" promtool check config "$CONFIG"
  run_promtool "promtool test rules alerts-test.yaml" promtool test rules "$TESTS"
  if [ -f "$TMP/dashboard-rules.yaml" ]; then
    run_promtool "promtool: every dashboard query is valid PromQL" promtool check rules "$TMP/dashboard-rules.yaml"
  else
    fail "promtool: dashboard queries were not extracted"
  fi
else
  skip "promtool not installed: rules/config syntax, alert unit tests and dashboard PromQL not checked (apt-get install prometheus)"
fi

if [ "$FAILURES" -gt 0 ]; then
  echo "check.sh: $FAILURES check(s) failed" >&2
  exit 1
fi
echo "all observability checks passed"
