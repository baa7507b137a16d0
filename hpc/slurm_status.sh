#!/usr/bin/env bash
# Exit 0 if the local SLURM cluster answers and its node is usable
# (idle/mixed/allocated/completing), else 1. Prints one line either way.
set -uo pipefail
PARTITION=${1:-debug}
# Without a local slurmctld, sinfo retries for ~9 s before failing.
if ! pgrep -x -r D,R,S,T,t,I slurmctld >/dev/null 2>&1; then
    echo "[slurm-status] down (no slurmctld running)"; exit 1
fi
state=$(timeout 10 sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n1)
case "$state" in
    idle|mixed|allocated|completing)
        echo "[slurm-status] up (partition $PARTITION, node $state)"; exit 0 ;;
    "")
        echo "[slurm-status] down (sinfo does not answer)"; exit 1 ;;
    *)
        echo "[slurm-status] not ready (partition $PARTITION, node $state)"; exit 1 ;;
esac
