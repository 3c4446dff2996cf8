#!/bin/bash
# One node, torchrun. Submit from the repo:
#   sbatch docs/jobs/one_node_torchrun.sh OUT_DIR RUN_NAME [train.py flags]
# (STAGE=finetune.py sbatch ... for finetune.py). torchrun restarts the ranks if one dies
# (--max-restarts); the job requeues itself when the run stops on the signal (time limit or
# preemption) and on nothing else: it reads <run>/status.json, not torchrun's exit status.
#SBATCH --nodes=1 --gpus-per-node=8 --time=24:00:00 --requeue --signal=B:USR1@180
OUT=$1 RUN=$2; shift 2
STATUS_FILE=$OUT/$RUN/status.json
BEFORE=$(cat "$STATUS_FILE" 2>/dev/null)
torchrun --standalone --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" --max-restarts=3 \
    -- "${STAGE:-train.py}" --resume --out-dir "$OUT" --run-name "$RUN" "$@" &
PID=$!
trap 'pkill -USR1 -P $PID' USR1 TERM   # to the ranks, torchrun's children (torchrun kills them 30 s after a TERM)
wait $PID; CODE=$?
while kill -0 $PID 2>/dev/null; do wait $PID; CODE=$?; done   # a trap interrupted `wait`: wait again
AFTER=$(cat "$STATUS_FILE" 2>/dev/null)
STATE=$(python -c 'import json, sys; print(json.loads(sys.argv[1])["state"])' "$AFTER" 2>/dev/null)
echo "$RUN: ${STATE:-no status} (exit $CODE)"
if [ "$AFTER" != "$BEFORE" ] && [ "$STATE" = stopped ]; then   # written by this job, not left from the last one
    scontrol requeue "$SLURM_JOB_ID"
fi
exit $CODE
