#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (slurmctld + slurmd + munge from the distribution's packages):
# localhost only, CPU only, 2 CPUs, no accounting database. For tests and trying `recscale grid --launcher slurm`;
# not a production setup. Needs root and a Debian/Ubuntu machine. Idempotent: a running cluster with the same
# configuration is left alone. Stop it with scripts/slurm/down.sh (`make slurm-down`).
#
#   SLURM_CPUS (default 2)   CPUs the node offers
#   SLURM_STATE (default /var/lib/recscale-slurm), SLURM_LOGS (default /var/log/recscale-slurm)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CONF=/etc/slurm/slurm.conf
MARK="# recscale test cluster"
CPUS="${SLURM_CPUS:-2}"
STATE="${SLURM_STATE:-/var/lib/recscale-slurm}"
LOGS="${SLURM_LOGS:-/var/log/recscale-slurm}"

die() { echo "slurm-up: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons): sudo $0"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are not installed and there is no apt-get to install them"
    echo "slurm-up: installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # policy-rc.d keeps the packages from starting their services (no systemd here); we start the daemons below
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.recscale && chmod +x /usr/sbin/policy-rc.d.recscale
    [ -e /usr/sbin/policy-rc.d ] || ln -s /usr/sbin/policy-rc.d.recscale /usr/sbin/policy-rc.d
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    [ "$(readlink /usr/sbin/policy-rc.d || true)" = /usr/sbin/policy-rc.d.recscale ] && rm -f /usr/sbin/policy-rc.d
    rm -f /usr/sbin/policy-rc.d.recscale
fi

HOST="$(hostname -s)"
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # MB, leaving 1 GiB to the system
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
NEW="$(sed -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" -e "s|@STATE@|$STATE|g" \
           -e "s|@LOG@|$LOGS|g" "$HERE/slurm.conf.in")"
if [ -e "$CONF" ] && ! head -1 "$CONF" | grep -q "^$MARK"; then
    die "$CONF exists and was not written by this script: this machine has its own SLURM configuration; use that cluster"
fi

# munge: one key, the daemon running as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$STATE/munged-started-here"  # down.sh stops only a munged that this script started
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munge does not answer (see /var/log/munge/munged.log)"
fi

stop_daemon() {  # PIDFILE: stop the daemon it names (one we started), if running
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$1"
}
running() { local pid; pid="$(cat "$1" 2>/dev/null || true)"; [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

if [ "$(cat "$CONF" 2>/dev/null || true)" != "$NEW" ]; then  # a new or changed configuration: (re)start both
    stop_daemon "$STATE/slurmd.pid"
    stop_daemon "$STATE/slurmctld.pid"
    printf '%s\n' "$NEW" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
fi
if ! running "$STATE/slurmctld.pid"; then
    /usr/sbin/slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)"
fi
if ! running "$STATE/slurmd.pid"; then
    /usr/sbin/slurmd -N "$HOST" || die "slurmd did not start (see $LOGS/slurmd.log)"
fi

# wait for the node to be usable (idle or busy, not down/drained)
for _ in $(seq 120); do
    state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)"
    case "$state" in idle|mix|alloc|comp) break ;; esac
    case "$state" in down*|drain*|drng*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;; esac
    sleep 0.5
done
case "$state" in
    idle|mix|alloc|comp) ;;
    *) die "node $HOST is '$state' after 60 s (see $LOGS/slurmctld.log and $LOGS/slurmd.log)" ;;
esac
echo "slurm-up: cluster 'recscale' is up: node $HOST ($CPUS CPUs, ${MEM} MB), partition debug; logs in $LOGS"
sinfo
