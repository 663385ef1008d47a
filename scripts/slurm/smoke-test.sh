#!/usr/bin/env bash
# Smoke test for the local cluster started by slurm-up.sh (~40 s).
# Checks: node idle, a batch job, a 2-task srun, a job array, a USR1 from
# `scancel --signal` reaching the python process of an srun step, `scontrol
# requeue` of a running job, and sacct (shim) reporting the final states.
set -euo pipefail

WORK="$(mktemp -d /tmp/vqt-slurm-smoke.XXXXXX)"
cd "$WORK"
fail() { echo "SMOKE FAIL: $*" >&2; for f in "$WORK"/*.out; do echo "== $f" >&2; cat "$f" >&2; done; exit 1; }
ok() { echo "ok: $*"; }

# wait_done JOBID... : until no job is pending/running (max 90 s)
wait_done() {
    local ids
    ids=$(IFS=,; echo "$*")
    for _ in $(seq 1 90); do
        [ -z "$(squeue -h -j "$ids" -t PD,R,CG,CF,RQ,RS,S 2>/dev/null)" ] && return 0
        sleep 1
    done
    fail "jobs $ids did not finish"
}
state_of() { squeue -h --states=all -j "$1" -o %T 2>/dev/null | head -n1; }

sinfo -h -o '%P %t' | grep -Eq '^debug\* (idle|mix)' || fail "no idle node in partition debug"
ok "sinfo: $(sinfo -h -o '%P %a %D %t %N')"

j1=$(sbatch --parsable -o j1.out --wrap 'hostname; sleep 2')
j2=$(sbatch --parsable -n 2 -o j2.out --wrap 'srun -l hostname')
j3=$(sbatch --parsable --array=0-2 -o 'j3_%a.out' --wrap 'echo task=$SLURM_ARRAY_TASK_ID')
wait_done "$j1" "$j2" "$j3"
[ "$(state_of "$j1")" = COMPLETED ] && grep -q "$(hostname -s)" j1.out || fail "simple job"
ok "simple job $j1 COMPLETED"
[ "$(grep -c "$(hostname -s)" j2.out)" = 2 ] || fail "2-task job did not run 2 tasks"
ok "2-task job $j2 ran 2 tasks"
for i in 0 1 2; do grep -qx "task=$i" "j3_$i.out" || fail "array task $i"; done
ok "array job $j3 ran tasks 0-2"

# USR1 to the srun step (as submitit's sbatch script runs python via srun).
cat >h.py <<'EOF'
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: (got.append(s), print("python got USR1", flush=True)))
print("python started", flush=True)
t0 = time.time()
while not got and time.time() - t0 < 30:
    time.sleep(0.1)
sys.exit(0 if got else 1)
EOF
j4=$(sbatch --parsable -o j4.out --mem=100M --wrap "srun --unbuffered python3 -u $WORK/h.py")
for _ in $(seq 1 30); do grep -q 'python started' j4.out 2>/dev/null && break; sleep 1; done
scancel --signal=USR1 "$j4"
wait_done "$j4"
grep -q 'python got USR1' j4.out || fail "USR1 did not reach the srun step"
ok "scancel --signal=USR1 $j4 reached python in the srun step"

# Requeue a running job; it must run again (Restarts=1).
j5=$(sbatch --parsable -o j5.out --open-mode=append --mem=100M \
    --wrap 'echo run restart=${SLURM_RESTART_COUNT:-0}; sleep 3')
for _ in $(seq 1 30); do [ "$(state_of "$j5")" = RUNNING ] && break; sleep 1; done
scontrol requeue "$j5"
sleep 2
wait_done "$j5"
grep -q 'run restart=1' j5.out || fail "requeued job did not run again"
ok "scontrol requeue $j5: job ran again (restart=1)"

out=$(sacct -o JobID,State,NodeList --parsable2 -j "$j1" -j "$j3")
echo "$out" | grep -q "^$j1|COMPLETED|" || fail "sacct: $out"
ok "sacct: $(echo "$out" | tr '\n' ' ')"

rm -rf "$WORK"
echo "slurm smoke test passed"
