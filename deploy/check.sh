#!/usr/bin/env bash
# Checks the deployment files (deploy/Dockerfile, deploy/compose/,
# deploy/k8s/) as far as possible without Docker or a cluster:
#
#   - every YAML file parses; every Kubernetes document has apiVersion, kind
#     and metadata.name; kustomization.yaml lists exactly the manifests present
#   - the manifests agree with each other: selectors and pod labels, Secret and
#     ConfigMap names and keys, OUTBOX_CONFIG and the mounted ConfigMap, the
#     port 9090 everywhere, the grace period against relay.shutdown_timeout_ms,
#     the Job and the Deployment (image, database, config), the non-root uid
#     and the Dockerfile's USER; compose's wiring (dependencies, URLs and
#     credentials, advertised broker address, no fixed node id for replicas)
#   - the configuration is accepted by the engine itself: the Deployment's and
#     the migrate Job's environment (secret, ConfigMap TOML, fieldRef pod name
#     resolved) and the compose engine's environment are run through
#     `outbox check-config`, which must exit 0; and, as a control, the same
#     TOML with one unknown key must be rejected
#   - the Dockerfile: COPY sources exist and are not excluded by .dockerignore,
#     the workspace's targets are inside what is copied, builder and runtime
#     share a Debian release, Cargo.lock is current (the image builds with
#     --locked)
#   - with the tools present: kubectl kustomize / kustomize, kubeconform,
#     docker compose config, hadolint; each is skipped with a note otherwise
#
# One line per check (ok / skip / FAIL); the exit code is 1 if any failed.
#
#   deploy/check.sh [-v]      -v also prints the effective configurations
#
# Needs python3 with PyYAML (it fails with a clear message when missing;
# `pip install pyyaml` or `apt-get install python3-yaml`) and builds
# target/debug/outbox with `cargo build --locked -p outbox-engine --bin outbox`
# (a no-op when it is current); OUTBOX_BIN=path/to/outbox skips the build.
# It installs nothing and connects to nothing.
set -euo pipefail
if [[ -n ${OUTBOX_BIN:-} ]]; then OUTBOX_BIN=$(realpath "$OUTBOX_BIN"); fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VERBOSE=0
case ${1:-} in
  -v|--verbose) VERBOSE=1 ;;
  "") ;;
  *) echo "usage: deploy/check.sh [-v]" >&2; exit 2 ;;
esac

FAILURES=0
ok()   { printf 'ok    %s\n' "$*"; }
skip() { printf 'skip  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILURES=$((FAILURES + 1)); }
indent() { sed 's/^/        /'; }
have() { command -v "$1" >/dev/null 2>&1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# A key no section of the configuration has; the control check expects
# check-config to name it in its error.
UNKNOWN_KEY=check_sh_unknown_key

# ---------------------------------------------------------------------------
# The Python half: `static` prints check lines for everything that is read
# from the files alone; `envs OUTDIR` writes, per case, the environment and
# the arguments `outbox check-config` is to be run with (NUL-separated).
PY=$(cat <<'PYEOF'
import base64, fnmatch, os, re, shlex, sys, tomllib
from urllib.parse import urlsplit
import yaml

K8S, COMPOSE = "deploy/k8s", "deploy/compose/compose.yaml"
DOCKERFILE, DOCKERIGNORE = "deploy/Dockerfile", ".dockerignore"
DEFAULT_SHUTDOWN_MS = 30000  # RelayConfig::default().shutdown_timeout_ms
FAILS = 0


class Problem(Exception):
    pass


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


def yaml_files():
    out = []
    for sub in ("deploy/compose", K8S):
        for dirpath, _, files in os.walk(sub):
            out += [os.path.join(dirpath, f) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(out)


def k8s_docs():
    docs = []
    for path in yaml_files():
        if path.startswith(K8S + "/"):
            with open(path) as f:
                docs += [(path, d) for d in yaml.safe_load_all(f) if d is not None]
    return docs


def of_kind(docs, kind):
    return [d for _, d in docs if isinstance(d, dict) and d.get("kind") == kind]


def only(docs, kind):
    found = of_kind(docs, kind)
    if len(found) != 1:
        raise Problem(f"expected exactly one {kind}, found {len(found)}")
    return found[0]


def named(docs, kind, name):
    for d in of_kind(docs, kind):
        if d["metadata"]["name"] == name:
            return d
    return None


def secret_data(docs, name):
    s = named(docs, "Secret", name)
    if s is None:
        return None
    data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
    data.update({k: str(v) for k, v in (s.get("stringData") or {}).items()})
    return data


def configmap_data(docs, name):
    c = named(docs, "ConfigMap", name)
    return None if c is None else {k: str(v) for k, v in (c.get("data") or {}).items()}


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def main_container(workload):
    containers = pod_spec(workload)["containers"]
    if len(containers) != 1:
        raise Problem(f"{workload['metadata']['name']}: expected one container")
    return containers[0]


def pod_name(workload):
    # What the API server generates, at most 63 characters.
    name = workload["metadata"]["name"]
    return f"{name}-6b8f7c9d5f-x7k2p" if workload["kind"] == "Deployment" else f"{name}-x7k2p"


def resolve_env(docs, workload):
    """The container's environment as the kubelet would build it."""
    c, env, problems = main_container(workload), {}, []
    for src in c.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "secretRef" in src:
            data = secret_data(docs, src["secretRef"]["name"])
        else:
            data = configmap_data(docs, src["configMapRef"]["name"])
        if data is None:
            problems.append(f"envFrom {src}: no such object")
        else:
            env.update({prefix + k: v for k, v in data.items()})
    for e in c.get("env") or []:
        name = e["name"]
        if "valueFrom" not in e:
            value = str(e.get("value", ""))
            env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
            continue
        vf = e["valueFrom"]
        if "secretKeyRef" in vf or "configMapKeyRef" in vf:
            kind, ref = ("Secret", vf["secretKeyRef"]) if "secretKeyRef" in vf else ("ConfigMap", vf["configMapKeyRef"])
            data = (secret_data if kind == "Secret" else configmap_data)(docs, ref["name"])
            if data is None:
                problems.append(f"{name}: {kind} {ref['name']} is not among the manifests")
            elif ref["key"] not in data:
                problems.append(f"{name}: {kind} {ref['name']} has no key {ref['key']}")
            else:
                env[name] = data[ref["key"]]
        elif "fieldRef" in vf:
            field = vf["fieldRef"]["fieldPath"]
            fake = {"metadata.name": pod_name(workload), "metadata.namespace": "default",
                    "spec.nodeName": "node-1", "status.podIP": "10.0.0.10"}
            if field not in fake:
                problems.append(f"{name}: fieldRef {field} not simulated by check.sh")
            env[name] = fake.get(field, "")
        else:
            problems.append(f"{name}: valueFrom {sorted(vf)} not simulated by check.sh")
    return env, problems


def mounted_config(docs, workload, path):
    """(configmap, key, text) of the file at `path` inside the container."""
    spec, c = pod_spec(workload), main_container(workload)
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if m.get("subPath") and path == mp:
            rel = m["subPath"]
        elif not m.get("subPath") and path.startswith(mp + "/"):
            rel = path[len(mp) + 1:]
        else:
            continue
        vol = next((v for v in spec.get("volumes") or [] if v["name"] == m["name"]), None)
        if vol is None or "configMap" not in vol:
            raise Problem(f"{path}: volume {m['name']} is not a configMap volume")
        cm = vol["configMap"]
        items = {i["path"]: i["key"] for i in cm.get("items") or []}
        key = items.get(rel, rel) if items else rel
        data = configmap_data(docs, cm["name"])
        if data is None:
            raise Problem(f"{path}: ConfigMap {cm['name']} is not among the manifests")
        if key not in data:
            raise Problem(f"{path}: ConfigMap {cm['name']} has no key {key}")
        return cm["name"], key, data[key]
    raise Problem(f"OUTBOX_CONFIG={path} lies under no volumeMount of {workload['metadata']['name']}")


def flag(args, name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def shutdown_ms(args, toml_text):
    v = flag(args, "--shutdown-timeout-ms")
    if v is not None:
        return int(v)
    if toml_text:
        return tomllib.loads(toml_text).get("relay", {}).get("shutdown_timeout_ms", DEFAULT_SHUTDOWN_MS)
    return DEFAULT_SHUTDOWN_MS


def compose():
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def interpolate(value):
    # ${VAR:-default} / ${VAR-default} take the default, ${VAR} / $VAR are
    # empty (as when unset), $$ is a dollar: what compose does with a bare env.
    value = str(value)
    value = re.sub(r"\$\{(\w+)(:?-)([^}]*)\}", lambda m: m.group(3), value)
    value = re.sub(r"\$\{\w+\}|\$(?!\$)\w+", "", value)
    return value.replace("$$", "$")


def compose_env(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    if service.get("env_file"):
        raise Problem("env_file is not simulated by check.sh")
    return {k: interpolate(v if v is not None else "") for k, v in env.items()}


def compose_args(service):
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def duration_s(text):
    total, rest = 0.0, str(text)
    for amount, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", rest):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    if not re.fullmatch(r"([\d.]+(ms|us|h|m|s))+", rest):
        raise Problem(f"cannot read duration {text!r}")
    return total


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


# --- Dockerfile -------------------------------------------------------------

def dockerfile():
    """[(stage index, INSTRUCTION, rest)] with continuations joined."""
    out, stage, buf = [], -1, ""
    with open(DOCKERFILE) as f:
        for raw in f:
            s = raw.rstrip("\n")
            if not buf and (not s.strip() or s.lstrip().startswith("#")):
                continue
            if s.endswith("\\"):
                buf += s[:-1] + " "
                continue
            s, buf = buf + s, ""
            instr, _, rest = s.strip().partition(" ")
            instr = instr.upper()
            if instr == "FROM":
                stage += 1
            out.append((stage, instr, rest.strip()))
    return out


def dockerignore():
    if not os.path.exists(DOCKERIGNORE):
        return []
    with open(DOCKERIGNORE) as f:
        return [p.strip().strip("/") for p in f if p.strip() and not p.lstrip().startswith("#")]


def ignored(rel, patterns):
    result = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(x, pat) for x in prefixes):
            result = not neg
    return result


def copy_sources():
    srcs = []
    for stage, instr, rest in dockerfile():
        if instr in ("COPY", "ADD"):
            toks = [t for t in shlex.split(rest) if not t.startswith("--")]
            if any(t.startswith("--from") for t in shlex.split(rest)):
                continue
            srcs += toks[:-1]
    return [os.path.normpath(s) for s in srcs]


def json_or_shell(rest):
    rest = rest.strip()
    if rest.startswith("["):
        return yaml.safe_load(rest)
    return shlex.split(rest)


# --- the static checks --------------------------------------------------------

def static():
    files = yaml_files()
    if not files:
        line("FAIL", "no YAML files under deploy/compose and deploy/k8s")
        return
    parsed = {}
    for path in files:
        def parse(path=path):
            with open(path) as f:
                parsed[path] = list(yaml.safe_load_all(f))
            return [], f"{len([d for d in parsed[path] if d is not None])} document(s)"
        check(f"yaml parses: {path}", parse)
    if len(parsed) != len(files):
        return

    docs = k8s_docs()

    def structure():
        problems = []
        for path, d in docs:
            if not isinstance(d, dict):
                problems.append(f"{path}: a document is not a mapping")
                continue
            missing = [k for k in ("apiVersion", "kind") if not d.get(k)]
            if d.get("kind") != "Kustomization" and not (d.get("metadata") or {}).get("name"):
                missing.append("metadata.name")
            if missing:
                problems.append(f"{path}: {d.get('kind', '?')} lacks {', '.join(missing)}")
            if (d.get("metadata") or {}).get("namespace"):
                problems.append(f"{path}: {d['kind']} sets a namespace; the manifests are namespace-less")
        return problems, f"{len(docs)} documents"
    check("k8s: every document has apiVersion, kind and metadata.name, no namespace", structure)

    def kustomization():
        k = only(docs, "Kustomization")
        listed = sorted(k.get("resources") or [])
        present = sorted(os.path.relpath(p, K8S) for p, d in docs if d.get("kind") != "Kustomization")
        present = sorted(set(present))
        problems = []
        if len(set(listed)) != len(listed):
            problems.append(f"resources lists a file twice: {listed}")
        for f in sorted(set(present) - set(listed)):
            problems.append(f"{f} is present but not listed in resources")
        for f in sorted(set(listed) - set(present)):
            problems.append(f"{f} is listed in resources but not present")
        return problems, ", ".join(listed)
    check("k8s: kustomization.yaml lists exactly the manifests present", kustomization)

    def selectors():
        dep = only(docs, "Deployment")
        labels = dep["spec"]["template"]["metadata"].get("labels") or {}
        problems = []
        def matches(sel, what):
            if not sel or any(labels.get(k) != v for k, v in sel.items()):
                problems.append(f"{what} selector {sel} does not select the pod labels {labels}")
        matches(dep["spec"]["selector"].get("matchLabels"), "Deployment")
        for s in of_kind(docs, "Service"):
            matches(s["spec"].get("selector"), f"Service {s['metadata']['name']}")
        for p in of_kind(docs, "PodDisruptionBudget"):
            matches(p["spec"]["selector"].get("matchLabels"), f"PodDisruptionBudget {p['metadata']['name']}")
            if p["spec"].get("maxUnavailable") != 1:
                problems.append("PodDisruptionBudget: maxUnavailable is not 1")
        for t in dep["spec"]["template"]["spec"].get("topologySpreadConstraints") or []:
            matches(t["labelSelector"].get("matchLabels"), "topologySpreadConstraints")
        return problems
    check("k8s: Deployment, Service and PodDisruptionBudget selectors match the pod labels", selectors)

    def references():
        problems = []
        for w in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            what = f"{w['kind']} {w['metadata']['name']}"
            _, p = resolve_env(docs, w)
            problems += [f"{what}: {x}" for x in p]
            for v in pod_spec(w).get("volumes") or []:
                if "configMap" in v and configmap_data(docs, v["configMap"]["name"]) is None:
                    problems.append(f"{what}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
                if "secret" in v and secret_data(docs, v["secret"]["secretName"]) is None:
                    problems.append(f"{what}: volume {v['name']}: no Secret {v['secret']['secretName']}")
        return problems
    check("k8s: every Secret and ConfigMap name and key referenced exists", references)

    def config_mount():
        problems, seen = [], []
        for w in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            env, _ = resolve_env(docs, w)
            path = env.get("OUTBOX_CONFIG")
            if not path:
                problems.append(f"{w['kind']} {w['metadata']['name']}: OUTBOX_CONFIG is not set")
                continue
            cm, key, _ = mounted_config(docs, w, path)
            seen.append(f"{path} = {cm}/{key}")
        return problems, "; ".join(sorted(set(seen)))
    check("k8s: OUTBOX_CONFIG names a file of the mounted ConfigMap", config_mount)

    def ports():
        dep = only(docs, "Deployment")
        c = main_container(dep)
        env, _ = resolve_env(docs, dep)
        problems = []
        addr = env.get("OUTBOX_HTTP_ADDR", "")
        if not addr.startswith("0.0.0.0:"):
            problems.append(f"OUTBOX_HTTP_ADDR={addr!r}: probes and scrapes need 0.0.0.0:<port>")
            return problems
        port = port_of(addr)
        named_ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        if named_ports.get("http") != port:
            problems.append(f"containerPort named http is {named_ports.get('http')}, OUTBOX_HTTP_ADDR says {port}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            g = (c.get(probe) or {}).get("httpGet") or {}
            if g.get("path") != path:
                problems.append(f"{probe} is not httpGet {path}")
            if g.get("port") not in ("http", port):
                problems.append(f"{probe} port {g.get('port')} is not http/{port}")
        ann = dep["spec"]["template"]["metadata"].get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(port) \
                or ann.get("prometheus.io/path") != "/metrics":
            problems.append(f"prometheus.io annotations {ann} do not point at :{port}/metrics")
        for s in of_kind(docs, "Service"):
            for sp in s["spec"]["ports"]:
                if sp.get("targetPort") not in ("http", port):
                    problems.append(f"Service {s['metadata']['name']} targetPort {sp.get('targetPort')}")
        return problems, f"port {port}"
    check("k8s: OUTBOX_HTTP_ADDR, containerPort, probes, scrape annotations and Service agree", ports)

    def grace():
        dep = only(docs, "Deployment")
        env, _ = resolve_env(docs, dep)
        text = mounted_config(docs, dep, env["OUTBOX_CONFIG"])[2] if env.get("OUTBOX_CONFIG") else ""
        ms = shutdown_ms(main_container(dep).get("args") or [], text)
        grace_s = pod_spec(dep).get("terminationGracePeriodSeconds", 30)
        problems = [] if grace_s * 1000 > ms else [
            f"terminationGracePeriodSeconds {grace_s} does not exceed relay.shutdown_timeout_ms {ms}"]
        return problems, f"{grace_s} s > {ms} ms"
    check("k8s: terminationGracePeriodSeconds exceeds relay.shutdown_timeout_ms", grace)

    def job_matches():
        dep, job = only(docs, "Deployment"), only(docs, "Job")
        dc, jc = main_container(dep), main_container(job)
        denv, _ = resolve_env(docs, dep)
        jenv, _ = resolve_env(docs, job)
        problems = []
        if dc["image"] != jc["image"]:
            problems.append(f"images differ: {dc['image']} / {jc['image']}")
        for key in ("DATABASE_URL", "OUTBOX_SCHEMA", "OUTBOX_CONFIG"):
            if denv.get(key) != jenv.get(key):
                problems.append(f"{key} differs between the Deployment and the Job")
        if denv.get("OUTBOX_CONFIG"):
            dtext = mounted_config(docs, dep, denv["OUTBOX_CONFIG"])[2]
            jtext = mounted_config(docs, job, jenv["OUTBOX_CONFIG"])[2]
            if dtext != jtext:
                problems.append("the Job reads another configuration file than the Deployment")
        args = jc.get("args") or []
        if args[:1] != ["migrate"] or not (flag(args, "--partitions") or "").isdigit() \
                or int(flag(args, "--partitions")) < 1:
            problems.append(f"Job args {args} are not `migrate --partitions <N>`")
        if jc.get("command"):
            problems.append("the Job overrides the image's ENTRYPOINT")
        if dc.get("command"):
            problems.append("the Deployment overrides the image's ENTRYPOINT")
        if (dc.get("args") or [])[:1] != ["run"]:
            problems.append(f"Deployment args {dc.get('args')} do not start with run")
        if job["spec"]["template"]["spec"].get("restartPolicy") not in ("OnFailure", "Never"):
            problems.append("Job restartPolicy must be OnFailure or Never")
        return problems, f"migrate --partitions {flag(args, '--partitions')}"
    check("k8s: the migrate Job uses the Deployment's image, database and configuration", job_matches)

    def security():
        uid = docker_uid()
        problems = []
        for w in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            what = f"{w['kind']} {w['metadata']['name']}"
            psc = pod_spec(w).get("securityContext") or {}
            csc = main_container(w).get("securityContext") or {}
            if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
                problems.append(f"{what}: runAsNonRoot is not set")
            run_as = csc.get("runAsUser", psc.get("runAsUser"))
            if run_as is not None and run_as != uid:
                problems.append(f"{what}: runAsUser {run_as} is not the Dockerfile's USER {uid}")
            if not csc.get("readOnlyRootFilesystem"):
                problems.append(f"{what}: readOnlyRootFilesystem is not set")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{what}: allowPrivilegeEscalation is not false")
            res = main_container(w).get("resources") or {}
            if not res.get("requests") or not res.get("limits"):
                problems.append(f"{what}: resources need requests and limits")
        return problems, f"uid {uid}"
    check("k8s: pods run as the image's non-root uid, read-only root, with requests and limits", security)

    # --- compose ---
    c = compose()
    svcs = c.get("services") or {}

    def compose_wiring():
        problems = []
        for name in ("postgres", "kafka", "migrate", "engine"):
            if name not in svcs:
                problems.append(f"no service {name}")
        if problems:
            return problems
        def dep(svc, on, cond):
            d = svcs[svc].get("depends_on") or {}
            if not isinstance(d, dict) or (d.get(on) or {}).get("condition") != cond:
                problems.append(f"{svc} does not depend on {on} with condition {cond}")
        dep("migrate", "postgres", "service_healthy")
        dep("engine", "migrate", "service_completed_successfully")
        dep("engine", "kafka", "service_healthy")
        for name in ("postgres", "kafka", "engine"):
            if not (svcs[name].get("healthcheck") or {}).get("test"):
                problems.append(f"{name} has no healthcheck")
        if str(svcs["migrate"].get("restart", "no")) != "no":
            problems.append("migrate must not restart (restart: \"no\")")
        margs = compose_args(svcs["migrate"])
        if margs[:1] != ["migrate"] or not (flag(margs, "--partitions") or "").isdigit():
            problems.append(f"migrate command {margs} is not `migrate --partitions <N>`")
        if compose_args(svcs["engine"])[:1] != ["run"]:
            problems.append("engine command does not start with run")
        for name in ("migrate", "engine"):
            b = svcs[name].get("build") or {}
            ctx = os.path.normpath(os.path.join(os.path.dirname(COMPOSE), b.get("context", ".")))
            df = os.path.normpath(os.path.join(ctx, b.get("dockerfile", "Dockerfile")))
            if ctx != "." or df != DOCKERFILE:
                problems.append(f"{name} builds {df} with context {ctx}, not {DOCKERFILE} with the repository root")
        return problems
    check("compose: services, dependency order, healthchecks, one-shot migrate, "
          "build of deploy/Dockerfile", compose_wiring)

    def compose_urls():
        problems = []
        pg = compose_env(svcs["postgres"])
        for name in ("migrate", "engine"):
            env = compose_env(svcs[name])
            u = urlsplit(env.get("DATABASE_URL", ""))
            if u.hostname not in svcs:
                problems.append(f"{name}: DATABASE_URL host {u.hostname} is not a service")
            if (u.port or 5432) != 5432:
                problems.append(f"{name}: DATABASE_URL port {u.port} is not the container port 5432")
            user = pg.get("POSTGRES_USER", "postgres")
            want = (user, pg.get("POSTGRES_PASSWORD"), pg.get("POSTGRES_DB", user))
            if (u.username, u.password, u.path.lstrip("/")) != want:
                problems.append(f"{name}: DATABASE_URL user/password/database do not match the postgres service")
        env = compose_env(svcs["engine"])
        kafka_cmd = " ".join(compose_args(svcs["kafka"]))
        m = re.search(r"--advertise-kafka-addr[ =](\S+)", kafka_cmd)
        advertised = [a.split("://")[-1] for a in m.group(1).split(",")] if m else []
        for b in env.get("KAFKA_BROKERS", "").split(","):
            host = b.rsplit(":", 1)[0]
            if host not in svcs:
                problems.append(f"engine: broker {b} is not a service")
            if b not in advertised:
                problems.append(f"engine: broker {b} is not among the advertised addresses {advertised}")
        return problems
    check("compose: DATABASE_URL and KAFKA_BROKERS match the postgres credentials "
          "and the advertised listener", compose_urls)

    def compose_replicas():
        e = svcs["engine"]
        env = compose_env(e)
        replicas = (e.get("deploy") or {}).get("replicas", 1)
        problems = []
        if "OUTBOX_NODE_ID" in env:
            problems.append("OUTBOX_NODE_ID is set: every replica would claim the same node id")
        for key in ("container_name", "hostname"):
            if key in e:
                problems.append(f"{key} is set: replicas need distinct host names (the default node id)")
        for p in e.get("ports") or []:
            if re.match(r"^(\d+\.\d+\.\d+\.\d+:)?\d+:", str(p)):
                problems.append(f"published fixed host port {p} collides between replicas")
        addr = env.get("OUTBOX_HTTP_ADDR", "")
        if not addr.startswith("0.0.0.0:"):
            problems.append(f"OUTBOX_HTTP_ADDR={addr!r} is unreachable from outside the container")
        else:
            test = " ".join(map(str, e.get("healthcheck", {}).get("test") or []))
            if f"/{port_of(addr)}" not in test or "/readyz" not in test:
                problems.append("the healthcheck does not ask /readyz on the OUTBOX_HTTP_ADDR port")
        ms = shutdown_ms(compose_args(e), "")
        grace = duration_s(e.get("stop_grace_period", "10s"))
        if grace * 1000 <= ms:
            problems.append(f"stop_grace_period {grace} s does not exceed the shutdown timeout {ms} ms")
        return problems, f"replicas {replicas}, stop_grace_period {grace:g} s > {ms} ms"
    check("compose: engine replicas get distinct node ids, reachable /readyz, enough grace to drain", compose_replicas)

    # --- Dockerfile ---
    def copies():
        patterns = dockerignore()
        problems = []
        srcs = copy_sources()
        for s in srcs:
            if not os.path.exists(s):
                problems.append(f"COPY source {s} does not exist")
            elif ignored(s, patterns):
                problems.append(f"COPY source {s} is excluded by {DOCKERIGNORE}")
            elif os.path.isdir(s):
                for dirpath, dirs, files in os.walk(s):
                    for f in files:
                        rel = os.path.join(dirpath, f)
                        if (f.endswith(".rs") or f == "Cargo.toml") and ignored(rel, patterns):
                            problems.append(f"{rel} is excluded by {DOCKERIGNORE}")
        # Every workspace member and every target path of theirs must be copied.
        with open("Cargo.toml", "rb") as f:
            members = tomllib.load(f).get("workspace", {}).get("members", [])
        def copied(path):
            path = os.path.normpath(path)
            return any(path == s or path.startswith(s.rstrip("/") + "/") or s == "." for s in srcs)
        for m in members:
            if not copied(os.path.join(m, "Cargo.toml")):
                problems.append(f"workspace member {m} is not copied")
                continue
            with open(os.path.join(m, "Cargo.toml"), "rb") as f:
                manifest = tomllib.load(f)
            for section in ("lib", "bin", "test", "bench", "example"):
                targets = manifest.get(section, [])
                for t in targets if isinstance(targets, list) else [targets]:
                    if "path" in t and not copied(os.path.join(m, t["path"])):
                        problems.append(f"{m}: [{section}] {t.get('name')} at {t['path']} is not copied")
        for p in ("Cargo.toml", "Cargo.lock"):
            if p not in srcs:
                problems.append(f"{p} is not copied")
        return problems, " ".join(srcs)
    check("Dockerfile: COPY sources exist, are not .dockerignored, cover the workspace", copies)

    def image():
        instrs = dockerfile()
        problems = []
        froms = [r for _, i, r in instrs if i == "FROM"]
        releases = [re.search(r"(buster|bullseye|bookworm|trixie)", f) for f in froms]
        if len(froms) < 2:
            problems.append("not a multi-stage build")
        elif None in releases or len({r.group(1) for r in releases}) != 1:
            problems.append(f"builder and runtime are not on one Debian release: {froms}")
        last = max(s for s, _, _ in instrs)
        final = [(i, r) for s, i, r in instrs if s == last]
        runs = " ".join(r for _, i, r in instrs if i == "RUN")
        build = re.search(r"cargo build ([^&;]*)", runs)
        bargs = build.group(1).split() if build else []
        for want in ("--release", "--locked"):
            if want not in bargs:
                problems.append(f"cargo build lacks {want}")
        with open("engine/Cargo.toml", "rb") as f:
            eng = tomllib.load(f)
        if flag(bargs, "-p") != eng["package"]["name"]:
            problems.append(f"cargo build -p {flag(bargs, '-p')} is not {eng['package']['name']}")
        if flag(bargs, "--bin") not in [b["name"] for b in eng.get("bin", [])]:
            problems.append(f"--bin {flag(bargs, '--bin')} is not a binary of the engine")
        entry = [json_or_shell(r) for i, r in final if i == "ENTRYPOINT"]
        cmd = [json_or_shell(r) for i, r in final if i == "CMD"]
        if entry[-1:] != [["outbox"]] or cmd[-1:] != [["run"]]:
            problems.append(f"ENTRYPOINT {entry[-1:]} / CMD {cmd[-1:]} are not [\"outbox\"] / [\"run\"]")
        dests = [r.split()[-1] for i, r in final if i == "COPY" and "--from" in r]
        if not set(dests) & {"/usr/local/bin/outbox", "/usr/local/bin/", "/usr/local/bin"}:
            problems.append("the binary is not copied to /usr/local/bin/outbox")
        expose = [r for i, r in final if i == "EXPOSE"]
        if expose[-1:] != ["9090"]:
            problems.append(f"EXPOSE {expose} is not 9090")
        uid = None
        try:
            uid = docker_uid()
            if uid == 0:
                problems.append("USER is root")
        except Problem as e:
            problems.append(str(e))
        return problems, f"{' -> '.join(froms)}; uid {uid}"
    check("Dockerfile: builds the outbox binary on one Debian release, "
          "ENTRYPOINT outbox, CMD run, non-root, EXPOSE 9090", image)


def docker_uid():
    instrs = dockerfile()
    last = max(s for s, _, _ in instrs)
    users = [r for s, i, r in instrs if s == last and i == "USER"]
    if not users or not users[-1].split(":")[0].isdigit():
        raise Problem(f"the runtime stage's USER {users[-1:]} is not numeric (runAsNonRoot cannot verify a name)")
    return int(users[-1].split(":")[0])


# --- environments for check-config -------------------------------------------

def write_case(outdir, name, env, args):
    with open(os.path.join(outdir, name + ".env"), "w") as f:
        f.write("".join(f"{k}={v}\0" for k, v in sorted(env.items())))
    with open(os.path.join(outdir, name + ".args"), "w") as f:
        f.write("".join(f"{a}\0" for a in args))


def with_unknown_key(text, key):
    lines = text.splitlines()
    for i, l in enumerate(lines):
        if re.match(r"^\s*\[[^\[]", l):  # the first table: an unknown key inside it
            return "\n".join(lines[:i + 1] + [f"{key} = 1"] + lines[i + 1:]) + "\n"
    return f"{key} = 1\n" + text


def envs(outdir, unknown_key):
    docs = k8s_docs()
    for kind, case in (("Deployment", "k8s-deployment"), ("Job", "k8s-migrate-job")):
        w = only(docs, kind)
        env, problems = resolve_env(docs, w)
        if problems:
            raise Problem("; ".join(problems))
        args = [str(a) for a in main_container(w).get("args") or []]
        if kind == "Deployment":
            if args[:1] != ["run"]:
                raise Problem(f"Deployment args {args} do not start with run")
            args = args[1:]
        else:
            # migrate connects at once; check-config validates the same
            # database URL, schema, file and log format without connecting.
            args = ["--node-id", pod_name(w)]
        if env.get("OUTBOX_CONFIG"):
            _, key, text = mounted_config(docs, w, env["OUTBOX_CONFIG"])
            good = os.path.join(outdir, f"{case}-{key}")
            with open(good, "w") as f:
                f.write(text)
            env["OUTBOX_CONFIG"] = good
            if kind == "Deployment":
                bad = os.path.join(outdir, f"{case}-unknown-key-{key}")
                with open(bad, "w") as f:
                    f.write(with_unknown_key(text, unknown_key))
                write_case(outdir, case + "-unknown-key", dict(env, OUTBOX_CONFIG=bad), args)
        write_case(outdir, case, env, args)

    svc = (compose().get("services") or {})["engine"]
    args = compose_args(svc)
    if args[:1] != ["run"]:
        raise Problem(f"compose engine command {args} does not start with run")
    # No OUTBOX_NODE_ID: the node id is the container's host name, its id.
    write_case(outdir, "compose-engine", compose_env(svc), args[1:] + ["--node-id", "3f2a9c1b7e4d"])


if __name__ == "__main__":
    if sys.argv[1] == "static":
        static()
        sys.exit(1 if FAILS else 0)
    else:
        try:
            envs(sys.argv[2], sys.argv[3])
        except Exception as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
PYEOF
)

# ---------------------------------------------------------------------------
if ! have python3; then
  fail "python3 is required"; exit 1
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  fail "PyYAML is missing for $(command -v python3): pip install pyyaml (or apt-get install python3-yaml)"
  exit 1
fi
if ! python3 -c 'import tomllib' 2>/dev/null; then
  fail "python3 >= 3.11 is required (tomllib)"; exit 1
fi

# Static checks: lines come from Python.
if ! python3 -c "$PY" static; then
  FAILURES=$((FAILURES + 1))
fi

# Renderers and schema validation, when installed.
if have kustomize; then
  KUSTOMIZE=(kustomize build)
elif have kubectl; then
  KUSTOMIZE=(kubectl kustomize)
else
  KUSTOMIZE=()
fi
if ((${#KUSTOMIZE[@]})); then
  if "${KUSTOMIZE[@]}" deploy/k8s >"$TMP/rendered.yaml" 2>"$TMP/kustomize.err"; then
    ok "${KUSTOMIZE[*]} deploy/k8s renders ($(grep -c '^kind:' "$TMP/rendered.yaml") objects)"
  else
    fail "${KUSTOMIZE[*]} deploy/k8s"; indent <"$TMP/kustomize.err"
  fi
else
  skip "kustomize rendering: neither kustomize nor kubectl is installed"
fi
if have kubeconform; then
  if [[ -s $TMP/rendered.yaml ]] && kubeconform -strict -summary "$TMP/rendered.yaml" >"$TMP/kubeconform.out" 2>&1; then
    ok "kubeconform -strict: $(tail -n 1 "$TMP/kubeconform.out")"
  else
    fail "kubeconform -strict"; indent <"$TMP/kubeconform.out"
  fi
else
  skip "kubeconform is not installed: no schema validation of the manifests (no cluster is contacted either)"
fi

# The image builds with --locked: Cargo.lock must be current. (cargo tree
# resolves for this platform only, from the local registry cache.)
if ! have cargo; then
  skip "Cargo.lock currency: cargo is not installed"
elif cargo tree --locked --offline --workspace --depth 0 >/dev/null 2>"$TMP/lock.err"; then
  ok "Cargo.lock is current (the image builds with --locked)"
elif ! grep -qE 'needs to be updated|--locked was passed' "$TMP/lock.err" \
    && grep -q 'but --offline was specified' "$TMP/lock.err"; then
  skip "Cargo.lock currency: dependencies are not in the local cargo cache"
else
  fail "Cargo.lock is not current for --locked"; indent <"$TMP/lock.err"
fi

# The configuration the files pass, through the engine's own validation.
BIN=${OUTBOX_BIN:-}
if [[ -z $BIN ]]; then
  BIN=target/debug/outbox
  if ! have cargo; then
    if [[ -x $BIN ]]; then
      skip "cargo build: cargo is not installed; using $BIN as it is"
    else
      fail "cargo is not installed and $BIN is not built"; BIN=""
    fi
  elif cargo build --locked --quiet -p outbox-engine --bin outbox >"$TMP/build.out" 2>&1; then
    ok "cargo build -p outbox-engine --bin outbox ($BIN is current)"
  else
    fail "cargo build -p outbox-engine --bin outbox"; tail -n 20 "$TMP/build.out" | indent
    BIN=""
  fi
fi

# check_config CASE EXPECT: runs `outbox check-config` with exactly the
# case's environment (env -i: nothing leaks in from this shell) and args.
check_config() {
  local case=$1 expect=$2 label=$3 rc=0 out node
  local -a envs=() args=()
  mapfile -d '' envs <"$TMP/$case.env"
  mapfile -d '' args <"$TMP/$case.args"
  out=$(env -i PATH="$PATH" "${envs[@]}" "$BIN" check-config "${args[@]}" 2>&1) || rc=$?
  if [[ $expect == accept ]]; then
    node=$(sed -n 's/^ *node_id: "\(.*\)",$/\1/p' <<<"$out" | head -n 1)
    if ((rc == 0)); then
      ok "check-config accepts $label (node id $node)"
      if ((VERBOSE)); then indent <<<"$out"; fi
    else
      fail "check-config rejects $label (exit $rc)"; indent <<<"$out"
    fi
  else
    if ((rc != 0)) && grep -q "$UNKNOWN_KEY" <<<"$out"; then
      ok "check-config rejects $label (exit $rc: $(head -n 1 <<<"$out"))"
    else
      fail "check-config did not reject $label with an error naming $UNKNOWN_KEY (exit $rc)"
      indent <<<"$out"
    fi
  fi
}

if [[ -n $BIN ]]; then
  if python3 -c "$PY" envs "$TMP" "$UNKNOWN_KEY" 2>"$TMP/envs.err"; then
    check_config k8s-deployment accept "the k8s Deployment's env, Secret and ConfigMap TOML"
    check_config k8s-migrate-job accept "the k8s migrate Job's env, Secret and ConfigMap TOML"
    check_config k8s-deployment-unknown-key reject "the ConfigMap TOML with an unknown key (control)"
    check_config compose-engine accept "the compose engine's environment"
  else
    fail "extracting the environments for check-config"; indent <"$TMP/envs.err"
  fi
else
  skip "check-config: no outbox binary"
fi

# Tools that may be missing here.
if docker compose version >/dev/null 2>&1; then
  if docker compose -f deploy/compose/compose.yaml config -q 2>"$TMP/compose.err"; then
    ok "docker compose config -q"
  else
    fail "docker compose config -q"; indent <"$TMP/compose.err"
  fi
else
  skip "docker compose config: the compose plugin is not installed"
fi
if have hadolint; then
  if hadolint deploy/Dockerfile >"$TMP/hadolint.out" 2>&1; then
    ok "hadolint deploy/Dockerfile"
  else
    fail "hadolint deploy/Dockerfile"; indent <"$TMP/hadolint.out"
  fi
else
  skip "hadolint is not installed; the image itself is not built here (no Docker engine)"
fi

if ((FAILURES)); then
  echo "check.sh: $FAILURES check(s) failed" >&2
  exit 1
fi
echo "check.sh: all checks passed" >&2
