#!/usr/bin/env bash
# Stop the local SLURM cluster started by hpc/slurm_up.sh.
#
# Only the daemons whose PIDs slurm_up.sh recorded under $STATE_DIR are
# stopped (a PID is trusted only if its command name and start time still
# match what was recorded). Idempotent: with nothing recorded it is a no-op.
set -euo pipefail

STATE_DIR=/var/run/bayesflip-slurm
STOP_TIMEOUT_S=30
ORDER=(slurmd slurmctld slurmdbd mariadbd munged)

log() { echo "[slurm-down] $*"; }

proc_start() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo "${20}"
}

# is_ours NAME PID START: PID is alive (not a zombie awaiting reaping by
# init) and still the process we recorded.
is_ours() {
    local st
    st=$(cat "/proc/$2/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st:0:1} != Z ]] || return 1
    [[ $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]] || return 1
    [[ $(proc_start "$2") == "$3" ]]
}

[[ -d $STATE_DIR ]] || { log "nothing recorded; nothing to stop"; exit 0; }

stopped=0
for name in "${ORDER[@]}"; do
    f=$STATE_DIR/$name.pid
    [[ -f $f ]] || continue
    pid="" start=""
    read -r pid start < "$f" || true
    if [[ -n $pid ]] && is_ours "$name" "$pid" "$start"; then
        t0=$EPOCHREALTIME
        kill -TERM "$pid" 2>/dev/null || true
        end=$((SECONDS + STOP_TIMEOUT_S))
        while is_ours "$name" "$pid" "$start"; do
            if ((SECONDS >= end)); then
                log "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_S}s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                sleep 0.5
                break
            fi
            sleep 0.1
        done
        log "stopped $name (pid $pid) in $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}")s"
        stopped=$((stopped + 1))
    else
        log "$name: recorded pid ${pid:-?} no longer running"
    fi
    rm -f "$f"
done
((stopped)) && log "stopped $stopped daemon(s)" || log "nothing to stop"
exit 0
