# Shared settings for slurm-up.sh / slurm-down.sh (sourced, not executed).
# shellcheck shell=bash

SLURM_STATE_DIR="${SLURM_STATE_DIR:-/tmp/vqt-slurm}"
SLURM_CONF_PATH="${SLURM_CONF_PATH:-/etc/slurm/slurm.conf}"
SLURM_CTLD_PORT="${SLURM_CTLD_PORT:-6817}"
SLURM_SLURMD_PORT="${SLURM_SLURMD_PORT:-6818}"
SLURM_UP_TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
# sacct shim (see sacct-shim.sh); set SLURM_SACCT_SHIM=0 to not install it.
SLURM_SACCT_SHIM="${SLURM_SACCT_SHIM:-1}"
SACCT_SHIM_PATH="${SACCT_SHIM_PATH:-/usr/local/bin/sacct}"
SACCT_SHIM_MARKER="vqt-slurm sacct shim"

log() { printf '[slurm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Re-run the calling script as root (via sudo) when needed.
ensure_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            exec sudo -E SLURM_STATE_DIR="$SLURM_STATE_DIR" SLURM_SACCT_SHIM="$SLURM_SACCT_SHIM" bash "$0" "$@"
        fi
        die "must run as root (or with sudo available)"
    fi
}

# pid_alive PIDFILE NAME: true when PIDFILE names a live process called NAME.
pid_alive() {
    local pidfile=$1 name=$2 pid comm
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$name" ]
}

# cluster_ready [TIMEOUT]: sinfo answers and some node is usable
# (idle/mixed/allocated). sinfo retries for ~10 s when no slurmctld answers.
cluster_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    if [ -z "${SLURM_CONF:-}" ] && [ ! -e /etc/slurm/slurm.conf ] && [ ! -e /etc/slurm-llnl/slurm.conf ]; then
        return 1
    fi
    timeout "${1:-10}" sinfo -h -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|mixed|alloc|allocated|comp|completing)$'
}

# is_our_shim PATH: true when PATH is the sacct shim installed by slurm-up.sh.
is_our_shim() { [ -f "$1" ] && grep -q "$SACCT_SHIM_MARKER" "$1" 2>/dev/null; }
