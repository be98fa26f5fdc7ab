#!/bin/bash
# The debug ReSSFormer on CPU ranks: first-time check of a cluster and the Slurm tests (tests/e2e/test_slurm.py).
#
#   sbatch slurm/pretrain_debug.sh                    # 2 nodes x 1 CPU rank, gloo, a few dozen steps
#   EXTRA_ARGS="--set steps=200" sbatch --nodes=1 slurm/pretrain_debug.sh
#
# Same variables as slurm/pretrain_1b.sh (GPUS_PER_NODE = CPU ranks per node here, CONFIG, DS_CONFIG,
# DATA, RUN_DIR, WANDB_PROJECT, EXTRA_ARGS, PYTHON, MAX_REQUEUES), with debug defaults; the launch,
# preemption and requeue logic is the shared slurm/_launch.sh.
#
#SBATCH --job-name=ressformer-debug
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
CONFIG=${CONFIG:-pretrain/configs/debug.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
DATA=${DATA:-}
RUN_DIR=${RUN_DIR:-$REPO/runs/debug}
WANDB_PROJECT=${WANDB_PROJECT:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
MAX_REQUEUES=${MAX_REQUEUES:-20}

# CPU ranks: DeepSpeed's CPU accelerator and gloo; one thread per rank, offline wandb.
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}

# shellcheck source=slurm/_launch.sh
source "$REPO/slurm/_launch.sh" || { echo "cannot read $REPO/slurm/_launch.sh: submit from the repository root or set REPO" >&2; exit 2; }
ressformer_launch
exit $?
