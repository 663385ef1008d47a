#!/usr/bin/env bash
# Stop the daemons that slurm-up.sh started (by the PIDs recorded in the state
# dir). Idempotent; a foreign cluster/munged is left alone. Logs are kept in
# $SLURM_STATE_DIR/log until the next slurm-up.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
. "$HERE/common.sh"
ensure_root "$@"

STATE="$SLURM_STATE_DIR"

stop_pidfile() {  # stop_pidfile PIDFILE NAME
    local pidfile=$1 name=$2 pid
    if pid_alive "$pidfile" "$name"; then
        pid=$(tr -dc '0-9' <"$pidfile")
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do
            [ -d "/proc/$pid" ] || break
            sleep 0.5
        done
        if [ -d "/proc/$pid" ]; then
            log "$name did not exit; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# Cancel jobs still running on our cluster so no slurmstepd is orphaned.
if pid_alive "$STATE/slurmctld.pid" slurmctld && [ -f "$STATE/slurm.conf" ]; then
    export SLURM_CONF="$STATE/slurm.conf"
    if [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]; then
        log "cancelling remaining jobs"
        timeout 10 scancel --partition=debug 2>/dev/null || true
        for _ in $(seq 1 20); do
            [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

stop_pidfile "$STATE/slurmd.pid" slurmd
stop_pidfile "$STATE/slurmctld.pid" slurmctld
stop_pidfile "$STATE/munged.pid" munged
if is_our_shim "$SACCT_SHIM_PATH"; then rm -f "$SACCT_SHIM_PATH"; fi
exit 0
