#!/usr/bin/env bash
# vqt-slurm sacct shim (installed as /usr/local/bin/sacct by slurm-up.sh).
#
# The test cluster has no slurmdbd, so the real sacct fails with
# "Slurm accounting storage is disabled". submitit polls
#   sacct -o JobID,State,NodeList --parsable2 -j ID ...
# and, on error, reports every job as UNKNOWN (a job that dies without writing
# its result would then be waited on forever). This shim runs the real sacct
# and, only when accounting is disabled, answers from slurmctld's memory via
# squeue (finished jobs stay there for MinJobAge seconds, see slurm.conf.in).
# Supported: -o/--format, -j/--jobs, -P/--parsable2, -p/--parsable,
# -n/--noheader; other options are ignored.
set -uo pipefail

REAL_SACCT="${VQT_REAL_SACCT:-/usr/bin/sacct}"

err_file="$(mktemp)"
trap 'rm -f "$err_file"' EXIT
out="$("$REAL_SACCT" "$@" 2>"$err_file")"
rc=$?
if [ "$rc" -eq 0 ] || ! grep -q 'accounting storage is disabled' "$err_file"; then
    [ -n "$out" ] && printf '%s\n' "$out"
    cat "$err_file" >&2
    exit "$rc"
fi

format="JobID,JobName,Partition,Account,AllocCPUS,State,ExitCode"
jobs=""
mode="table"   # table | parsable | parsable2
header=1
while [ $# -gt 0 ]; do
    case "$1" in
        -o|--format) format="${2:-}"; shift ;;
        --format=*) format="${1#--format=}" ;;
        -o*) format="${1#-o}" ;;
        -j|--jobs) jobs="${jobs:+$jobs,}${2:-}"; shift ;;
        --jobs=*) jobs="${jobs:+$jobs,}${1#--jobs=}" ;;
        -j*) jobs="${jobs:+$jobs,}${1#-j}" ;;
        -P|--parsable2) mode="parsable2" ;;
        -p|--parsable) mode="parsable" ;;
        -n|--noheader) header=0 ;;
        -[a-zA-Z]*)
            # bundled short flags such as -Pn / -nP / -XP
            case "$1" in *P*) mode="parsable2" ;; *p*) mode="parsable" ;; esac
            case "$1" in *n*) header=0 ;; esac ;;
    esac
    shift
done

names=()
ofields=()
IFS=',' read -r -a req <<<"$format"
for f in "${req[@]}"; do
    f="${f%%%*}"            # drop a width spec such as JobName%30
    [ -n "$f" ] || continue
    case "${f,,}" in
        jobid) n=JobID; o=JobArrayID ;;
        jobidraw) n=JobIDRaw; o=JobID ;;
        jobname) n=JobName; o=Name ;;
        partition) n=Partition; o=Partition ;;
        account) n=Account; o=Account ;;
        alloccpus|ncpus) n=AllocCPUS; o=NumCPUs ;;
        state) n=State; o=State ;;
        exitcode) n=ExitCode; o=exit_code ;;
        nodelist) n=NodeList; o=NodeList ;;
        user) n=User; o=UserName ;;
        elapsed) n=Elapsed; o=TimeUsed ;;
        start) n=Start; o=StartTime ;;
        end) n=End; o=EndTime ;;
        submit) n=Submit; o=SubmitTime ;;
        timelimit) n=Timelimit; o=TimeLimit ;;
        reason) n=Reason; o=Reason ;;
        workdir) n=WorkDir; o=WorkDir ;;
        *) n="$f"; o="" ;;
    esac
    names+=("$n")
    ofields+=("$o")
done

# Ask squeue for the known fields, separated by a control character.
SEP=$'\x1f'
spec=""
for o in "${ofields[@]}"; do
    [ -n "$o" ] && spec="${spec:+$spec,}${o}:0${SEP}"
done
rows=""
if [ -n "$spec" ]; then
    args=(--states=all --array --noheader -O "$spec")
    [ -n "$jobs" ] && args+=(-j "$jobs")
    rows="$(squeue "${args[@]}" 2>/dev/null)" || rows=""
fi

emit() {  # emit FIELD...
    local line="" first=1 v
    for v in "$@"; do
        case "$mode" in
            table) v="$(printf '%-20s' "$v")"; line="${line:+$line }$v"; continue ;;
        esac
        if [ "$first" = 1 ]; then line="$v"; first=0; else line="$line|$v"; fi
    done
    [ "$mode" = parsable ] && line="$line|"
    printf '%s\n' "${line%"${line##*[! ]}"}"
}

[ "$header" = 1 ] && emit "${names[@]}"
while IFS= read -r row; do
    [ -n "$row" ] || continue
    IFS="$SEP" read -r -a vals <<<"$row"
    out_vals=()
    k=0
    for i in "${!names[@]}"; do
        if [ -n "${ofields[$i]}" ]; then
            v="${vals[$k]:-}"
            [ "$v" = "(null)" ] && v=""
            k=$((k + 1))
            if [ "${ofields[$i]}" = exit_code ] && [[ "$v" =~ ^[0-9]+$ ]]; then
                v="$((v >> 8)):$((v & 127))"
            fi
        else
            v=""
        fi
        out_vals+=("$v")
    done
    emit "${out_vals[@]}"
done <<<"$rows"
exit 0
