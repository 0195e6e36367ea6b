#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by scripts/slurm/up.sh (its daemons only; packages and config stay).
set -euo pipefail
STATE="${SLURM_STATE:-/var/lib/recscale-slurm}"
[ "$(id -u)" = 0 ] || { echo "slurm-down: error: run as root" >&2; exit 1; }
stop() {  # PIDFILE NAME
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "slurm-down: stopped $2 ($pid)"
    fi
    rm -f "$1"
}
stop "$STATE/slurmd.pid" slurmd
stop "$STATE/slurmctld.pid" slurmctld
if [ -e "$STATE/munged-started-here" ]; then
    stop /run/munge/munged.pid munged
    rm -f "$STATE/munged-started-here"
fi
