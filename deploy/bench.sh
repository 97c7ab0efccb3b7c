#!/usr/bin/env bash
# deploy/bench.sh — the benchmark suite in one command.
#
#   deploy/bench.sh            # standard suite (about 12 minutes on 2 cores)
#   deploy/bench.sh --quick    # a few minutes, for checking the tooling
#   deploy/bench.sh --only e2e-50ev --duration 30   # a subset (README untouched)
#
# Brings up PostgreSQL and the broker (deploy/services.sh up), builds the
# engine and loadgen in release mode, and runs `loadgen suite` with the
# arguments given (see `target/release/loadgen suite --help`). Results go to
# bench-results/<date>-<name>/ and bench-results/README.md is regenerated.
# The suite drops and creates the database `outbox_bench` on the server of
# DATABASE_URL, and starts and stops its own engine nodes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
eval "$(deploy/services.sh up)"
cargo build --release -p outbox-engine -p loadgen >&2
exec target/release/loadgen suite "$@"
