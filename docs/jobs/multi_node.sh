#!/bin/bash
# Several nodes: srun starts one torchrun per node, which meet by c10d rendezvous on the first
# node. Submit from the repo (on a shared file system):
#   sbatch docs/jobs/multi_node.sh OUT_DIR RUN_NAME [train.py flags]
# (STAGE=finetune.py sbatch ... for finetune.py). The job requeues itself when the run stops on
# the signal (time limit or preemption) and on nothing else: it reads <run>/status.json, not the
# exit status of srun or torchrun.
#SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --time=24:00:00 --requeue --signal=B:USR1@180
OUT=$1 RUN=$2; shift 2
BEFORE=$(cat "$OUT/$RUN/status.json" 2>/dev/null)
export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) STAGE=${STAGE:-train.py}
# on each node: torchrun, and a trap that passes srun's signal to this node's ranks (torchrun's children)
srun --kill-on-bad-exit=0 bash -c '
    torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" --max-restarts=3 \
        --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${MASTER_PORT:-29500}" --rdzv-id="$SLURM_JOB_ID" \
        -- "$STAGE" --resume "$@" &
    PID=$!
    trap "pkill -USR1 -P $PID" USR1 TERM
    wait $PID; CODE=$?
    while kill -0 $PID 2>/dev/null; do wait $PID; CODE=$?; done
    exit $CODE' node --out-dir "$OUT" --run-name "$RUN" "$@" &
PID=$!
trap 'kill -USR1 $PID' USR1 TERM   # SLURM signals this shell (B:); srun passes the signal to its tasks
wait $PID; CODE=$?
while kill -0 $PID 2>/dev/null; do wait $PID; CODE=$?; done   # a trap interrupted `wait`: wait again
bash docs/jobs/requeue_if_stopped.sh "$OUT/$RUN" "$BEFORE" $CODE   # on "stopped" written by this start only
exit $CODE
