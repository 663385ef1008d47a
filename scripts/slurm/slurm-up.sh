#!/usr/bin/env bash
# Start a single-node Slurm cluster (munged + slurmctld + slurmd) on localhost.
# Idempotent: exits 0 at once when sinfo already shows a usable node.
# Env: SLURM_STATE_DIR (default /tmp/vqt-slurm), SLURM_CONF_PATH
# (default /etc/slurm/slurm.conf), SLURM_CTLD_PORT, SLURM_SLURMD_PORT,
# SLURM_UP_TIMEOUT (seconds to wait for the node, default 60),
# SLURM_CRED_EXPIRE (requeue hold, default 10 s), SLURM_SACCT_SHIM=0 (no shim).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
. "$HERE/common.sh"
ensure_root "$@"

# 0. Already up (ours or a foreign cluster)? Nothing to do.
# A daemon of ours that died is not noticed by sinfo for SlurmdTimeout seconds,
# so check our recorded PIDs too.
ours_dead=0
if [ -f "$SLURM_STATE_DIR/slurmctld.pid" ] || [ -f "$SLURM_STATE_DIR/slurmd.pid" ]; then
    pid_alive "$SLURM_STATE_DIR/slurmctld.pid" slurmctld && pid_alive "$SLURM_STATE_DIR/slurmd.pid" slurmd || ours_dead=1
fi
if [ "$ours_dead" = 0 ] && cluster_ready 4; then
    log "cluster already up:"
    sinfo >&2 || true
    exit 0
fi

# 1. Install what is missing.
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    # Keep the packages' maintainer scripts from starting the daemons with the
    # stock config (systemd/sysv); we start them ourselves below.
    policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [ "$policy_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# 2. Leftovers of an earlier run (daemons alive but node not usable): stop them.
"$HERE/slurm-down.sh" >/dev/null 2>&1 || true

# 3. Fresh state dir and config.
STATE="$SLURM_STATE_DIR"
rm -rf "$STATE/ctld" "$STATE/slurmd" "$STATE/log" "$STATE"/*.pid
mkdir -p "$STATE/ctld" "$STATE/slurmd" "$STATE/log"
chmod 755 "$STATE"

HOST="$(hostname -s 2>/dev/null || uname -n)"
HOST="${HOST%%.*}"
ADDR="${SLURM_NODE_ADDR:-127.0.0.1}"
CPUS="$(nproc)"
MEM_TOTAL_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
REAL_MEM=$(( MEM_TOTAL_MB * 80 / 100 ))
DEF_MEM_PER_CPU=$(( REAL_MEM / CPUS ))
[ "$DEF_MEM_PER_CPU" -gt 1024 ] && DEF_MEM_PER_CPU=1024

sed -e "s|@HOSTNAME@|$HOST|g" \
    -e "s|@ADDR@|$ADDR|g" \
    -e "s|@STATE_DIR@|$STATE|g" \
    -e "s|@CPUS@|$CPUS|g" \
    -e "s|@REAL_MEM@|$REAL_MEM|g" \
    -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" \
    -e "s|@CRED_EXPIRE@|${SLURM_CRED_EXPIRE:-10}|g" \
    -e "s|@CTLD_PORT@|$SLURM_CTLD_PORT|g" \
    -e "s|@SLURMD_PORT@|$SLURM_SLURMD_PORT|g" \
    "$HERE/slurm.conf.in" >"$STATE/slurm.conf"
mkdir -p "$(dirname "$SLURM_CONF_PATH")"
cp "$STATE/slurm.conf" "$SLURM_CONF_PATH"
chmod 644 "$SLURM_CONF_PATH"
export SLURM_CONF="$SLURM_CONF_PATH"
log "config: $SLURM_CONF_PATH (node $HOST, CPUs=$CPUS, RealMemory=${REAL_MEM}MB, DefMemPerCPU=${DEF_MEM_PER_CPU}MB)"

# 4. munge: key, permissions, daemon (reuse a running one).
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey -c -k /etc/munge/munge.key
    else
        create-munge-key -f
    fi
fi
if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
fi
chmod 700 /etc/munge /var/log/munge
chmod 400 /etc/munge/munge.key
chmod 711 /var/lib/munge
chmod 755 /run/munge
if munge_ok; then
    log "munged already running; reusing it"
else
    rm -f /run/munge/munged.pid
    if id munge >/dev/null 2>&1 && command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- munged </dev/null || true
    fi
    if ! munge_ok; then
        # Fallback: run as root (munged refuses without --force).
        munged --force </dev/null || true
    fi
    for _ in $(seq 1 20); do munge_ok && break; sleep 0.5; done
    munge_ok || { cat /var/log/munge/munged.log >&2 2>/dev/null || true; die "munged did not start"; }
    cp /run/munge/munged.pid "$STATE/munged.pid"
    log "munged started (pid $(cat "$STATE/munged.pid"))"
fi

# 5. slurmctld, then slurmd (both daemonize and write their pid files).
slurmctld -c </dev/null || die "slurmctld failed: $(tail -n 30 "$STATE/log/slurmctld.log" 2>/dev/null)"
for _ in $(seq 1 40); do
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.5
done
slurmd -N "$HOST" </dev/null || die "slurmd failed: $(tail -n 30 "$STATE/log/slurmd.log" 2>/dev/null)"

# 6. sacct shim: without slurmdbd the real sacct fails; answer from squeue.
if [ "$SLURM_SACCT_SHIM" = 1 ]; then
    if [ ! -e "$SACCT_SHIM_PATH" ] || is_our_shim "$SACCT_SHIM_PATH"; then
        mkdir -p "$(dirname "$SACCT_SHIM_PATH")"
        install -m 755 "$HERE/sacct-shim.sh" "$SACCT_SHIM_PATH"
    else
        log "not installing the sacct shim: $SACCT_SHIM_PATH exists and is not ours"
    fi
fi

# 7. Wait for the node to become usable.
deadline=$(( $(date +%s) + SLURM_UP_TIMEOUT ))
resumed=0
while ! cluster_ready; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "node did not become idle within ${SLURM_UP_TIMEOUT}s"
        sinfo -N -l >&2 || true
        scontrol show node "$HOST" >&2 || true
        for f in "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" /var/log/munge/munged.log; do
            [ -f "$f" ] && { echo "---- $f" >&2; tail -n 50 "$f" >&2; }
        done
        exit 1
    fi
    # A node left down/drained (e.g. "Node unexpectedly rebooted") is resumed once.
    if [ "$resumed" = 0 ] && timeout 5 sinfo -h -o '%t' 2>/dev/null | grep -Eq '^(down|drain|drng)'; then
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
        resumed=1
    fi
    sleep 1
done
log "cluster up (state dir $STATE):"
sinfo >&2
