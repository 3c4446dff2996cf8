#!/bin/bash
# One node, train.py's own launcher. Submit from the repo:
#   sbatch docs/jobs/one_node.sh OUT_DIR RUN_NAME [train.py flags]
# (STAGE=finetune.py sbatch ... for finetune.py). The job requeues itself when the run stops on
# the signal (time limit or preemption) and on nothing else: it reads <run>/status.json.
#SBATCH --nodes=1 --gpus-per-node=8 --time=24:00:00 --requeue --signal=B:USR1@180
OUT=$1 RUN=$2; shift 2
STATUS_FILE=$OUT/$RUN/status.json
BEFORE=$(cat "$STATUS_FILE" 2>/dev/null)
python "${STAGE:-train.py}" --nproc-per-node "${SLURM_GPUS_ON_NODE:-8}" --resume --out-dir "$OUT" --run-name "$RUN" "$@" &
PID=$!
trap 'kill -USR1 $PID' USR1 TERM   # SLURM signals this shell (B:): the launcher passes it to the ranks
wait $PID; CODE=$?
while kill -0 $PID 2>/dev/null; do wait $PID; CODE=$?; done   # a trap interrupted `wait`: wait again
AFTER=$(cat "$STATUS_FILE" 2>/dev/null)
STATE=$(python -c 'import json, sys; print(json.loads(sys.argv[1])["state"])' "$AFTER" 2>/dev/null)
echo "$RUN: ${STATE:-no status} (exit $CODE)"
if [ "$AFTER" != "$BEFORE" ] && [ "$STATE" = stopped ]; then   # written by this job, not left from the last one
    scontrol requeue "$SLURM_JOB_ID"
fi
exit $CODE
