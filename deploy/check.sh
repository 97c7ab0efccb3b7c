#!/usr/bin/env bash
# Checks the deployment and observability files without Docker, a cluster
# or Prometheus: the Rust checks in tests/deploy_files/ (YAML of compose and
# k8s, cross-references between the manifests, compose's wiring, the
# Dockerfile against the workspace, the deploy files' environment and TOML
# through `outbox check-config`, the dashboard and the alert rules; the
# tools made for these files where installed: kubectl kustomize/kustomize,
# kubeconform, docker compose config, hadolint, promtool) and the metric
# names of the dashboard and the rules against the engine's list
# (tests/observability.rs; the check against a real scrape needs the
# services: deploy/test.sh --test observability).
#
# One line per check (ok / skip); a failing check prints FAIL with every
# problem it found, and the exit code is non-zero.
#
#   deploy/check.sh [-v] [FILTER...]   -v also prints the configurations
#                                      check-config accepted
#
# --locked: the image builds with --locked, so Cargo.lock must be current.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case ${1:-} in
  -v|--verbose) export OUTBOX_CHECK_VERBOSE=1; shift ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
# Serial and quiet, so that each check's line stands alone (the harness's
# progress dots are stripped).
checks() { cargo test --locked --workspace "$@" 2>&1 | sed -u 's/^\.\.*//'; }
rc=0
checks --test deploy_files -- --nocapture --test-threads=1 -q "$@" || rc=1
checks --test observability -- --nocapture --test-threads=1 -q \
  dashboards_and_rules_use_only_metrics the_scrape_check_rejects || rc=1
exit "$rc"
