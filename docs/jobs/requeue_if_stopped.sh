#!/bin/bash
# The end of each job script here: requeue the job if this start of it stopped the run (the
# signal, or --time-limit), and on nothing else. STATUS_BEFORE is <run>/status.json as it was
# before the start: a "stopped" left over from an earlier start is not this one's.
#   bash docs/jobs/requeue_if_stopped.sh RUN_DIR "$STATUS_BEFORE" EXIT_STATUS
AFTER=$(cat "$1/status.json" 2>/dev/null)
STATE=$(python -c 'import json, sys; print(json.loads(sys.argv[1])["state"])' "$AFTER" 2>/dev/null)
echo "$(basename "$1"): ${STATE:-no status} (exit $3)"
if [ "$AFTER" != "$2" ] && [ "$STATE" = stopped ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
