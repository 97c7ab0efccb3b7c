#!/usr/bin/env bash
# Runs the whole test suite: brings up PostgreSQL and the broker if needed
# (deploy/services.sh), builds the binaries the tests start (`outbox`, the
# inbox's read_model example), then unit and integration tests of the
# workspace.
# Extra arguments go to `cargo test`, e.g. `deploy/test.sh --test cli`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A failure to bring a service up stops here, with services.sh's message.
services="$(deploy/services.sh up)"
eval "$services"
export OUTBOX_TEST_DATABASE_URL="${OUTBOX_TEST_DATABASE_URL:-$DATABASE_URL}"
export OUTBOX_TEST_CDC_DATABASE_URL="${OUTBOX_TEST_CDC_DATABASE_URL:-${CDC_DATABASE_URL:-}}"
echo "tests against DATABASE_URL=$OUTBOX_TEST_DATABASE_URL KAFKA_BROKERS=$KAFKA_BROKERS" >&2
# What the tests start as processes, built here with the same commands the
# harness runs (tests/src/binary.rs), so that its own builds find them
# fresh: no test waits for a compile, nor runs beside one. (A build of one
# package resolves features apart from the workspace's test build.)
cargo build -p outbox-engine --bin outbox
cargo build -p outbox-inbox --features kafka --example read_model
cargo test --workspace --no-fail-fast "$@"
