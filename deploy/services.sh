#!/usr/bin/env bash
# deploy/services.sh — bring up the services the outbox engine and its tests
# need on one machine: PostgreSQL and a tansu (Kafka-compatible) broker.
#
# Usage:
#   eval "$(deploy/services.sh up)"    # start what is missing, print exports
#   deploy/services.sh env             # print exports for running services only
#                                      # (never starts anything; exit 1 if one is missing)
#   deploy/services.sh down            # stop tansu + the private PG cluster
#
# Only `export ...` lines go to stdout; every other message goes to stderr.
# Safe to re-run: already running services are reused, never started twice.
#
# PostgreSQL, in order of preference:
#   a. $DATABASE_URL, if it answers `select 1`;
#   b. the local server postgres://postgres@127.0.0.1:5432/test (a stopped
#      Debian cluster under /etc/postgresql is started first);
#   c. a private cluster in <repo>/.local/pg (initdb, trust auth, database
#      `outbox`) on 127.0.0.1:$OUTBOX_PG_PORT.
# Kafka: whatever answers on $KAFKA_BROKERS, else `tansu broker` in memory
#   mode started in the background (installed with cargo if missing).
# PostgreSQL for change data capture (exported as CDC_DATABASE_URL): a
#   private cluster in <repo>/.local/pg-logical with wal_level=logical on
#   127.0.0.1:$OUTBOX_CDC_PG_PORT (the local server keeps wal_level=replica;
#   changing that needs a restart of a server this script does not own).
#
# Environment knobs:
#   DATABASE_URL          preferred PostgreSQL URL (used only if it answers)
#   OUTBOX_SKIP_LOCAL_PG  =1 skips step b (local server on 5432), e.g. to
#                         force/test the private cluster path
#   OUTBOX_PG_PORT        port of the private cluster (default 55432)
#   OUTBOX_CDC_PG_PORT    port of the logical-decoding cluster (default 55433)
#   OUTBOX_SKIP_CDC_PG    =1 does not start the logical-decoding cluster
#   KAFKA_BROKERS         host:port of the broker (default 127.0.0.1:9092;
#                         only the first entry of a comma list is used)
#   TANSU_VERSION         version for `cargo install` (default 0.6.0)
#
# `down` only stops what this script started: tansu (via .local/tansu.pid)
# and the private cluster in .local/pg — never a system PostgreSQL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
PG_DIR="$LOCAL/pg"
PG_DATA="$PG_DIR/data"
PG_LOG="$PG_DIR/log"
PG_PORT="${OUTBOX_PG_PORT:-55432}"
TANSU_LOG="$LOCAL/tansu.log"
TANSU_PID="$LOCAL/tansu.pid"
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
LOCAL_PG_URL="postgres://postgres@127.0.0.1:5432/test"
PRIVATE_PG_URL="postgres://postgres@127.0.0.1:${PG_PORT}/outbox"
PG_OPTS=""
CDC_PG_PORT="${OUTBOX_CDC_PG_PORT:-55433}"
CDC_PG_URL="postgres://postgres@127.0.0.1:${CDC_PG_PORT}/outbox"
# Settings of the logical-decoding cluster: slots for the engine and its
# tests, and a bound on the WAL a forgotten slot may keep.
CDC_PG_OPTS="-c wal_level=logical -c max_replication_slots=32 -c max_wal_senders=32 -c max_slot_wal_keep_size=4GB -c autovacuum=off"

log() { printf 'services.sh: %s\n' "$*" >&2; }
die() { printf 'services.sh: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

# ---------------------------------------------------------------- helpers --

# Find a PostgreSQL client/server binary: PATH first, then Debian's
# versioned directories (newest version last, so pick the last match).
pg_bin() {
    local name="$1" p cand=""
    if p="$(command -v "$name" 2>/dev/null)"; then
        printf '%s\n' "$p"
        return 0
    fi
    for p in /usr/lib/postgresql/*/bin/"$name"; do
        [[ -x "$p" ]] && cand="$p"
    done
    [[ -n "$cand" ]] || return 1
    printf '%s\n' "$cand"
}

PSQL=""
need_psql() {
    [[ -n "$PSQL" ]] && return 0
    PSQL="$(pg_bin psql)" ||
        die "psql not found (PATH, /usr/lib/postgresql/*/bin); install postgresql-client (apt-get install -y postgresql-client)"
}

# pg_answers URL -> 0 if `select 1` works within a short connect timeout.
pg_answers() {
    need_psql
    PGCONNECT_TIMEOUT=3 "$PSQL" "$1" -XqAt -c 'select 1' </dev/null >/dev/null 2>&1
}

# Run a command as the `postgres` OS user when we are root (initdb, pg_ctl
# and postgres refuse to run as root); as ourselves otherwise.
as_pg() {
    if [[ "$(id -u)" -ne 0 ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        local cmd
        printf -v cmd '%q ' "$@"
        su postgres -s /bin/sh -c "$cmd"
    fi
}

broker_host() { local b="${KAFKA_BROKERS%%,*}"; printf '%s\n' "${b%:*}"; }
broker_port() { local b="${KAFKA_BROKERS%%,*}"; printf '%s\n' "${b##*:}"; }

port_open() { timeout 1 bash -c "</dev/tcp/$1/$2" >/dev/null 2>&1; }

# pid_is_tansu PID -> 0 if PID is alive and is a tansu process.
pid_is_tansu() {
    local pid="$1"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q tansu
}

private_pg_initialised() { [[ -f "$PG_DATA/PG_VERSION" ]]; }

private_pg_running() {
    private_pg_initialised || return 1
    local pg_ctl
    pg_ctl="$(pg_bin pg_ctl)" || return 1
    as_pg "$pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

# ------------------------------------------------------------- PostgreSQL --

# Resolve a database URL into $DB_URL. With $1 = start, may start/create
# servers; with $1 = check, only looks at what is running.
DB_URL=""
resolve_pg() {
    local mode="$1"
    DB_URL=""

    # a. explicit DATABASE_URL
    if [[ -n "${DATABASE_URL:-}" ]]; then
        if pg_answers "$DATABASE_URL"; then
            log "postgres: using DATABASE_URL as given"
            DB_URL="$DATABASE_URL"
            return 0
        fi
        log "postgres: DATABASE_URL is set but does not answer; trying other options"
    fi

    # b. local server on 127.0.0.1:5432 (skipped with OUTBOX_SKIP_LOCAL_PG=1)
    if [[ "${OUTBOX_SKIP_LOCAL_PG:-0}" != 1 ]]; then
        if local_pg_ok; then
            DB_URL="$LOCAL_PG_URL"
            return 0
        fi
        if [[ "$mode" == start && -d /etc/postgresql ]] && command -v pg_ctlcluster >/dev/null 2>&1; then
            # First installed version, like `ls /etc/postgresql | head -1`.
            local ver="" d
            for d in /etc/postgresql/*/; do
                [[ -d "$d" ]] && { ver="$(basename "$d")"; break; }
            done
            if [[ -n "$ver" ]]; then
                log "postgres: trying to start Debian cluster $ver/main"
                pg_ctlcluster --skip-systemctl-redirect "$ver" main start </dev/null 9>&- >&2 2>&1 || true
                local i
                for i in 1 2 3 4 5; do
                    local_pg_ok && { DB_URL="$LOCAL_PG_URL"; return 0; }
                    sleep "$i"
                done
            fi
        fi
        log "postgres: no usable local server at 127.0.0.1:5432"
    else
        log "postgres: OUTBOX_SKIP_LOCAL_PG=1, skipping the local server"
    fi

    # c. private cluster in .local/pg
    if [[ "$mode" == start ]]; then
        start_private_pg
    elif private_pg_running && pg_answers "$PRIVATE_PG_URL"; then
        log "postgres: private cluster in $PG_DATA is running"
    else
        return 1
    fi
    DB_URL="$PRIVATE_PG_URL"
}

# The local server answers as postgres@.../test. If it answers but has no
# `test` database, create it (cheap, and makes the default URL usable).
local_pg_ok() {
    pg_answers "$LOCAL_PG_URL" && { log "postgres: using local server 127.0.0.1:5432"; return 0; }
    local base="postgres://postgres@127.0.0.1:5432/postgres"
    if pg_answers "$base"; then
        log "postgres: local server answers but has no database 'test'; creating it"
        PGCONNECT_TIMEOUT=3 "$PSQL" "$base" -Xq -c 'create database test' </dev/null >&2 2>&1 || true
        pg_answers "$LOCAL_PG_URL" && return 0
    fi
    return 1
}

start_private_pg() {
    local initdb pg_ctl
    initdb="$(pg_bin initdb)" ||
        die "initdb not found (PATH, /usr/lib/postgresql/*/bin); install postgresql (apt-get install -y postgresql) or set DATABASE_URL"
    pg_ctl="$(pg_bin pg_ctl)" ||
        die "pg_ctl not found next to initdb; install postgresql or set DATABASE_URL"

    mkdir -p "$PG_DIR"
    if [[ "$(id -u)" -eq 0 ]]; then
        id postgres >/dev/null 2>&1 ||
            die "running as root and no 'postgres' user exists; run as a normal user, create user postgres, or set DATABASE_URL"
        chown postgres: "$PG_DIR"
        as_pg test -w "$PG_DIR" ||
            die "user postgres cannot write $PG_DIR (parent directories not traversable?); fix permissions or set DATABASE_URL"
    fi

    if ! private_pg_initialised; then
        log "postgres: initialising private cluster in $PG_DATA"
        as_pg "$initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C \
            </dev/null >&2 2>&1 ||
            die "initdb failed for $PG_DATA (see output above); remove $PG_DATA and retry, or set DATABASE_URL"
    fi

    if private_pg_running; then
        log "postgres: private cluster already running"
    else
        log "postgres: starting private cluster on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
        if ! as_pg "$pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 \
            -o "-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1 $PG_OPTS" start \
            </dev/null 9>&- >&2 2>&1; then
            tail -n 20 "$PG_LOG" >&2 2>/dev/null || true
            die "could not start the private cluster (log above, $PG_LOG); is port $PG_PORT taken? try OUTBOX_PG_PORT=<free port>"
        fi
    fi

    local base="postgres://postgres@127.0.0.1:${PG_PORT}/postgres"
    pg_answers "$base" ||
        die "private cluster in $PG_DATA is running but not on 127.0.0.1:$PG_PORT; run '$0 down' and retry (or set OUTBOX_PG_PORT to the port it was started with)"
    if [[ "$(PGCONNECT_TIMEOUT=3 "$PSQL" "$base" -XqAt -c "select 1 from pg_database where datname='outbox'" </dev/null)" != 1 ]]; then
        log "postgres: creating database outbox"
        PGCONNECT_TIMEOUT=3 "$PSQL" "$base" -Xq -c 'create database outbox' </dev/null >&2 ||
            die "could not create database outbox on 127.0.0.1:$PG_PORT"
    fi
}

stop_private_pg() {
    if ! private_pg_initialised; then
        log "postgres: no private cluster in $PG_DATA"
        return 0
    fi
    if private_pg_running; then
        log "postgres: stopping private cluster in $PG_DATA"
        as_pg "$(pg_bin pg_ctl)" -D "$PG_DATA" -m fast -w stop </dev/null >&2 2>&1 ||
            die "pg_ctl stop failed for $PG_DATA; check $PG_LOG"
    else
        log "postgres: private cluster not running"
    fi
}

# Runs "$@" with the private-cluster variables pointing at the
# logical-decoding cluster.
# The logical cluster's directory: <repo>/.local/pg-logical, unless the
# `postgres` user cannot reach it (a checkout under a private home), then
# one under $TMPDIR.
logical_dir() {
    local dir="$LOCAL/pg-logical"
    [[ -f "$dir/data/PG_VERSION" ]] && { printf '%s\n' "$dir"; return 0; }
    mkdir -p "$dir"
    if [[ "$(id -u)" -eq 0 ]] && id postgres >/dev/null 2>&1; then
        chown postgres: "$dir" 2>/dev/null || true
        if ! as_pg test -w "$dir" 2>/dev/null; then
            dir="${TMPDIR:-/tmp}/outbox-pg-logical-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
            mkdir -p "$dir"
        fi
    fi
    printf '%s\n' "$dir"
}

with_logical() {
    PG_DIR="$(logical_dir)"
    PG_DATA="$PG_DIR/data"
    PG_LOG="$PG_DIR/log"
    PG_PORT="$CDC_PG_PORT"
    PG_OPTS="$CDC_PG_OPTS"
    "$@"
}

# wal_level of the server at URL $1 ("" if it does not answer).
wal_level_of() {
    PGCONNECT_TIMEOUT=3 "$PSQL" "$1" -XqAt -c 'show wal_level' </dev/null 2>/dev/null || true
}

start_logical_pg() {
    # A logical-decoding server given or already running is used as it is.
    if [[ -n "${CDC_DATABASE_URL:-}" && "$(wal_level_of "$CDC_DATABASE_URL")" == logical ]]; then
        log "postgres (CDC): using CDC_DATABASE_URL as given"
        CDC_PG_URL="$CDC_DATABASE_URL"
        return 0
    fi
    if [[ "$(wal_level_of "$CDC_PG_URL")" == logical ]]; then
        log "postgres (CDC): a wal_level=logical server already answers on 127.0.0.1:$CDC_PG_PORT; using it"
        return 0
    fi
    (with_logical start_private_pg) ||
        die "could not start the logical-decoding cluster (above); set OUTBOX_SKIP_CDC_PG=1 to go without CDC"
    local level
    level="$(PGCONNECT_TIMEOUT=3 "$PSQL" "$CDC_PG_URL" -XqAt -c 'show wal_level' </dev/null)"
    [[ "$level" == logical ]] ||
        die "the cluster in $LOCAL/pg-logical answers with wal_level=$level, not logical; run '$0 down' and retry"
}

# ------------------------------------------------------------------ tansu --

find_tansu() {
    local p
    if p="$(command -v tansu 2>/dev/null)"; then
        printf '%s\n' "$p"
        return 0
    fi
    for p in "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" "$HOME/.cargo/bin/tansu" /root/.cargo/bin/tansu; do
        [[ -x "$p" ]] && { printf '%s\n' "$p"; return 0; }
    done
    return 1
}

cargo_install_running() { pgrep -f "cargo install tansu" >/dev/null 2>&1; }

# Sets $TANSU_BIN, installing tansu if needed.
TANSU_BIN=""
ensure_tansu() {
    local bin=""
    if ! bin="$(find_tansu)" && cargo_install_running; then
        log "tansu: not installed yet, but a 'cargo install tansu' is running; waiting up to 10 minutes for it"
        local waited=0
        while cargo_install_running && ((waited < 600)); do
            sleep 5
            waited=$((waited + 5))
        done
        cargo_install_running && die "'cargo install tansu' still running after 10 minutes; re-run this script once it has finished"
    fi
    if ! bin="$(find_tansu)"; then
        command -v cargo >/dev/null 2>&1 ||
            die "tansu not found and cargo not available; install Rust (rustup) or put tansu on PATH"
        log "tansu: not found; running 'cargo install tansu --version $TANSU_VERSION --locked --features dynostore' (takes ~7 minutes)"
        cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore </dev/null 9>&- >&2 2>&1 ||
            die "cargo install tansu failed (output above); fix the build error or install tansu manually"
        bin="$(find_tansu)" || die "cargo install tansu finished but the tansu binary was not found; check ~/.cargo/bin"
    fi
    TANSU_BIN="$bin"
}

wait_for_broker() {
    local host="$1" port="$2" pid="$3" i
    for ((i = 0; i < 60; i++)); do
        port_open "$host" "$port" && return 0
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.5
    done
    log "tansu: broker did not answer on $host:$port; last lines of $TANSU_LOG:"
    tail -n 30 "$TANSU_LOG" >&2 2>/dev/null || true
    die "tansu broker failed to start on $host:$port (see $TANSU_LOG); is the port taken? set KAFKA_BROKERS=host:port"
}

start_tansu() {
    local host port
    host="$(broker_host)"
    port="$(broker_port)"
    [[ -n "$host" && "$port" =~ ^[0-9]+$ ]] || die "cannot parse KAFKA_BROKERS='$KAFKA_BROKERS'; expected host:port"

    if port_open "$host" "$port"; then
        log "kafka: something already answers on $host:$port; using it"
        return 0
    fi

    # A tansu we started earlier may still be booting: wait for it instead of
    # starting a second one.
    local pid=""
    [[ -f "$TANSU_PID" ]] && pid="$(cat "$TANSU_PID" 2>/dev/null || true)"
    local url="tcp://$host:$port"
    if pid_is_tansu "$pid"; then
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--listener-url $url "; then
            log "tansu: pid $pid is running; waiting for $host:$port"
            wait_for_broker "$host" "$port" "$pid"
            return 0
        fi
        die "a tansu started by this script (pid $pid) is running on another address, not $url; run '$0 down' first or use the same KAFKA_BROKERS"
    fi
    rm -f "$TANSU_PID"

    ensure_tansu
    mkdir -p "$LOCAL"
    log "tansu: starting $TANSU_BIN broker on $url (memory storage, log: $TANSU_LOG)"
    # setsid: own session, so it survives the caller's process group/terminal.
    # The inner shell writes its own pid, then execs tansu (same pid).
    # shellcheck disable=SC2016  # expanded by the inner shell, on purpose
    TANSU_BIN="$TANSU_BIN" TANSU_URL="$url" TANSU_PID="$TANSU_PID" \
        nohup setsid bash -c 'echo $$ >"$TANSU_PID"; exec "$TANSU_BIN" broker --listener-url "$TANSU_URL" --advertised-listener-url "$TANSU_URL" --storage-engine memory://tansu/' \
        </dev/null >>"$TANSU_LOG" 2>&1 9>&- &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s "$TANSU_PID" ]] && break
        sleep 0.1
    done
    pid="$(cat "$TANSU_PID" 2>/dev/null || true)"
    wait_for_broker "$host" "$port" "$pid"
    log "tansu: broker up on $host:$port (pid $pid)"
}

stop_tansu() {
    local pid=""
    [[ -f "$TANSU_PID" ]] && pid="$(cat "$TANSU_PID" 2>/dev/null || true)"
    if ! pid_is_tansu "$pid"; then
        log "tansu: not running (no live pid in $TANSU_PID)"
        rm -f "$TANSU_PID"
        return 0
    fi
    log "tansu: stopping pid $pid"
    kill "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "tansu: pid $pid ignored SIGTERM; sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$TANSU_PID"
}

# ---------------------------------------------------------------- main --

print_export() { printf 'export %s=%q\n' "$1" "$2"; }

take_lock() {
    mkdir -p "$LOCAL"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$LOCAL/services.lock"
        flock -w 1200 9 || die "another services.sh is still running (lock $LOCAL/services.lock); wait for it and retry"
    fi
}

cmd_up() {
    take_lock
    resolve_pg start
    if [[ "${OUTBOX_SKIP_CDC_PG:-0}" != 1 ]]; then
        need_psql
        start_logical_pg
    fi
    start_tansu
    print_export DATABASE_URL "$DB_URL"
    [[ "${OUTBOX_SKIP_CDC_PG:-0}" != 1 ]] && print_export CDC_DATABASE_URL "$CDC_PG_URL"
    print_export KAFKA_BROKERS "$(broker_host):$(broker_port)"
}

cmd_env() {
    local rc=0
    if resolve_pg check; then
        print_export DATABASE_URL "$DB_URL"
    else
        log "postgres: nothing running; run '$0 up'"
        rc=1
    fi
    if (with_logical private_pg_running) && pg_answers "$CDC_PG_URL"; then
        print_export CDC_DATABASE_URL "$CDC_PG_URL"
    fi
    if port_open "$(broker_host)" "$(broker_port)"; then
        print_export KAFKA_BROKERS "$(broker_host):$(broker_port)"
    else
        log "kafka: nothing answers on $(broker_host):$(broker_port); run '$0 up'"
        rc=1
    fi
    return "$rc"
}

cmd_down() {
    take_lock
    stop_tansu
    stop_private_pg
    (with_logical stop_private_pg)
}

main() {
    case "${1:-up}" in
        up) cmd_up ;;
        env) cmd_env ;;
        down) cmd_down ;;
        -h | --help | help) usage ;;
        *) usage; die "unknown subcommand '$1'; use up, env or down" ;;
    esac
}

main "$@"
