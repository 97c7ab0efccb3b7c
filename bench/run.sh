#!/usr/bin/env bash
# bench/run.sh — the polling v2 measurements of issue 10, rerunnable.
#
#   bench/run.sh all              # every measurement, in one session (~15 min on 2 cores)
#   bench/run.sh insert-path      # pgbench: 50-row statements, plain table vs the outbox
#   bench/run.sh app-overhead     # pgbench: 1 business row + 1 event/tx, no engine vs engine
#   bench/run.sh e2e-50           # end to end, engine and bench/python_relay.py side by side
#   bench/run.sh python-baseline  # the Python relay alone
#   bench/run.sh latency-5k       # p99 commit → consumer receipt at 5,000 events/s (loadgen run)
#   bench/run.sh drain-5m         # a 5M backlog drained by one node (loadgen drain)
#   bench/run.sh scale-out        # 1, 2, 4 nodes each capped by a cgroup-v1 cpu quota
#   bench/run.sh fetch-plan       # EXPLAIN ANALYZE of what one fetch of one shard reads (seconds)
#   bench/plan-cache.sh           # (separately) planning vs execution time of the prepared fetch
#   bench/run.sh summary          # only regenerate bench-results/v2/README.md
#   options: --quick (seconds-long runs, to check the scripts), --set key=value (see --help)
#
# CDC side by side with polling (issue 11), results in bench-results/cdc/:
#   bench/run.sh cdc              # the four below in one session (~20 min on 2 cores)
#   bench/run.sh latency-cdc      # p99 commit → consumer receipt at 5,000 and 20,000 events/s
#   bench/run.sh app-overhead-cdc # pgbench 1 business row + 1 event/tx: no relay vs poll vs cdc
#   bench/run.sh e2e-50-cdc       # end to end, 50 events/statement, poll and cdc alternating
#   bench/run.sh db-cpu-cdc       # PostgreSQL CPU per event (backends + walsender), none/poll/cdc
#   bench/run.sh profile-cdc      # the latency load with the node's /metrics scraped (where time goes)
#   bench/run.sh cdc-summary      # only regenerate bench-results/cdc/README.md
#   The CDC driver is bench/cdc.py (it imports bench/bench.py for the broker,
#   samplers, pgbench and consumer).
#   Both sources run against the wal_level=logical cluster of deploy/services.sh
#   (CDC_DATABASE_URL, default 127.0.0.1:55433), so the source is the only
#   difference. Options as above, plus --engine-env KEY=VALUE (repeatable;
#   OUTBOX_* variables for every engine node of both sources, e.g.
#   OUTBOX_KAFKA__PROPERTIES__LINGER_MS=1). Each run first waits while
#   another worktree's loadgen/outbox runs (pgrep 'wt-perf.*(loadgen|outbox)')
#   and is repeated if one appeared during it.
#
# Needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust; BENCH_PG to
# change), pgbench, tansu on PATH (a private broker is started on
# 127.0.0.1:$BENCH_TANSU_PORT, default 19092, and restarted before each
# measurement), and root for the scale-out cgroups. Creates and drops its own
# databases (bench_v2_*). Builds the release binaries unless BENCH_NO_BUILD=1
# (BENCH_BUILD=head builds the committed HEAD from `git archive` in
# .local/bench-src into target/bench-head instead of the working tree);
# copies them to .local/bench-bin so a concurrent build cannot swap them.
# A Python venv with confluent-kafka and psycopg2 is made in .local/bench-venv.
# Results: bench-results/v2/<name>.json and .md, bench-results/v2/README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.local/bench-venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import confluent_kafka, psycopg2' 2>/dev/null; then
    echo "bench/run.sh: creating $VENV (confluent-kafka, psycopg2-binary)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q confluent-kafka psycopg2-binary >&2
fi
export BENCH_BIN_DIR="${BENCH_BIN_DIR:-$ROOT/target/release}"
if [[ "${1:-}" != summary && "${1:-}" != cdc-summary && "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    if [[ "${BENCH_BUILD:-worktree}" == head ]]; then
        rm -rf "$ROOT/.local/bench-src" && mkdir -p "$ROOT/.local/bench-src"
        git -C "$ROOT" archive HEAD | tar -x -C "$ROOT/.local/bench-src"
        git -C "$ROOT" rev-parse HEAD >"$ROOT/.local/bench-src/COMMIT"
        (cd "$ROOT/.local/bench-src" &&
            cargo build --release --target-dir "$ROOT/target/bench-head" -p outbox-engine -p loadgen >&2)
        BENCH_BIN_DIR="$ROOT/target/bench-head/release"
    else
        cargo build --release -p outbox-engine -p loadgen >&2
    fi
fi

case "${1:-}" in
    cdc | *-cdc | cdc-summary) cdc=1 ;;
    *) cdc=0 ;;
esac
if [[ $cdc == 1 ]]; then
    # The CDC driver reuses bench.py's pieces (binaries, broker, samplers,
    # pgbench, consumer) by importing it.
    BENCH_ROOT="$ROOT" exec "$VENV/bin/python" "$ROOT/bench/cdc.py" "$@"
fi
exec "$VENV/bin/python" "$ROOT/bench/bench.py" "$@"
