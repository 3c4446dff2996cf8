#!/bin/bash
# One node, train.py's own launcher. Submit from the repo:
#   sbatch docs/jobs/one_node.sh OUT_DIR RUN_NAME [train.py flags]
# (STAGE=finetune.py sbatch ... for finetune.py). The job requeues itself when the run stops on
# the signal (time limit or preemption) and on nothing else: it reads <run>/status.json.
#SBATCH --nodes=1 --gpus-per-node=8 --time=24:00:00 --requeue --signal=B:USR1@180
OUT=$1 RUN=$2; shift 2
BEFORE=$(cat "$OUT/$RUN/status.json" 2>/dev/null)
python "${STAGE:-train.py}" --nproc-per-node "${SLURM_GPUS_ON_NODE:-8}" --resume --out-dir "$OUT" --run-name "$RUN" "$@" &
PID=$!
trap 'kill -USR1 $PID' USR1 TERM   # SLURM signals this shell (B:): the launcher passes it to the ranks
wait $PID; CODE=$?
while kill -0 $PID 2>/dev/null; do wait $PID; CODE=$?; done   # a trap interrupted `wait`: wait again
bash docs/jobs/requeue_if_stopped.sh "$OUT/$RUN" "$BEFORE" $CODE   # on "stopped" written by this start only
exit $CODE
