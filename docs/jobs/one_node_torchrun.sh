#!/bin/bash
# One node, torchrun. Submit from the repo:
#   sbatch docs/jobs/one_node_torchrun.sh OUT_DIR RUN_NAME [train.py flags]
# (STAGE=finetune.py sbatch ... for finetune.py). torchrun restarts the ranks if one dies
# (--max-restarts); the job requeues itself when the run stops on the signal (time limit or
# preemption) and on nothing else: it reads <run>/status.json, not torchrun's exit status.
#SBATCH --nodes=1 --gpus-per-node=8 --time=24:00:00 --requeue --signal=B:USR1@180
OUT=$1 RUN=$2; shift 2
BEFORE=$(cat "$OUT/$RUN/status.json" 2>/dev/null)
torchrun --standalone --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" --max-restarts=3 \
    -- "${STAGE:-train.py}" --resume --out-dir "$OUT" --run-name "$RUN" "$@" &
PID=$!
trap 'pkill -USR1 -P $PID' USR1 TERM   # to the ranks, torchrun's children (torchrun kills them 30 s after a TERM)
wait $PID; CODE=$?
while kill -0 $PID 2>/dev/null; do wait $PID; CODE=$?; done   # a trap interrupted `wait`: wait again
bash docs/jobs/requeue_if_stopped.sh "$OUT/$RUN" "$BEFORE" $CODE   # on "stopped" written by this start only
exit $CODE
