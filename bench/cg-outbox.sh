#!/usr/bin/env bash
# Stand-in for the outbox binary in the scale-out runs (`loadgen drain
# --outbox-bin bench/cg-outbox.sh`): an `outbox run --node-id <name>-nK`
# first moves itself into the cgroup-v1 groups $BENCH_CG_NAME-nK of the
# `cpu` controller (the cap) and of `cpuacct` (its CPU time), then execs the
# real binary $BENCH_OUTBOX_REAL with the same pid. Other commands (migrate,
# --version) run uncapped.
set -euo pipefail
real="${BENCH_OUTBOX_REAL:?set BENCH_OUTBOX_REAL to the outbox binary}"
node="" prev=""
for a in "$@"; do
    [[ "$prev" == --node-id ]] && node="$a"
    prev="$a"
done
if [[ -n "${BENCH_CG_NAME:-}" && -n "$node" ]]; then
    group="$BENCH_CG_NAME-${node##*-}"
    echo $$ >"/sys/fs/cgroup/cpu/$group/cgroup.procs"
    if [[ -d "/sys/fs/cgroup/cpuacct/$group" ]]; then
        echo $$ >"/sys/fs/cgroup/cpuacct/$group/cgroup.procs"
    fi
fi
exec "$real" "$@"
