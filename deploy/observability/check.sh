#!/usr/bin/env bash
# Checks the observability files beside this script without Prometheus or
# Grafana running: the dashboard and prometheus:: checks of
# tests/deploy_files/ (dashboard structure, rules complete, prometheus.yaml
# and alerts-test.yaml load the rules, one partition count everywhere,
# promtool check rules/config, test rules and every dashboard query, where
# promtool is installed: `apt-get install prometheus`) and the metric names
# against the engine's declared list (tests/observability.rs). Whether each
# name is in a real scrape after a run needs the services:
# `deploy/test.sh --test observability`.
#
#   deploy/observability/check.sh [DIR]
#
# DIR (default: this script's folder) holds the files to check, so a
# modified copy can be checked; the engine and the deploy manifests are
# always read from this repository.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case ${1:-} in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
if [ $# -gt 1 ]; then
  echo "usage: deploy/observability/check.sh [DIR]" >&2
  exit 2
fi
OUTBOX_OBSERVABILITY_DIR="$(cd "${1:-$HERE}" && pwd)"
export OUTBOX_OBSERVABILITY_DIR
cd "$HERE/../.."
checks() { cargo test --locked --workspace "$@" 2>&1 | sed -u 's/^\.\.*//'; }
rc=0
checks --test deploy_files -- --nocapture --test-threads=1 -q dashboard:: prometheus:: || rc=1
checks --test observability -- --nocapture --test-threads=1 -q \
  dashboards_and_rules_use_only_metrics the_scrape_check_rejects || rc=1
exit "$rc"
