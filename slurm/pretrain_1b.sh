#!/bin/bash
# Pretrain the paper's 1B ReSSFormer at a 32k context (ZeRO-3 + AutoEP expert parallelism) on a multi-node GPU
# Slurm cluster. pretrain/configs/1b_long.yaml says why it fits an 80 GiB GPU (with the Triton ASAM kernel).
#
#   sbatch slurm/pretrain_1b.sh                                   # 4 nodes x 8 GPUs, defaults below
#   sbatch --nodes=16 --time=72:00:00 slurm/pretrain_1b.sh        # any #SBATCH line can be overridden
#   RUN_DIR=/scratch/me/1b DATA=/data/fineweb_text_document WANDB_PROJECT=me-1b sbatch slurm/pretrain_1b.sh
#   GPUS_PER_NODE=4 sbatch --gpus-per-node=4 --ntasks-per-node=4 slurm/pretrain_1b.sh
#   CONFIG=pretrain/configs/1b_long_blocks.yaml sbatch slurm/pretrain_1b.sh   # no triton on the cluster
#   CONFIG=pretrain/configs/1b_1m.yaml DS_CONFIG=ds_configs/zero3.json sbatch slurm/pretrain_1b.sh  # 1M tokens, SP 16
#
# Submit from the repository root (sbatch runs a copy of this file; REPO defaults to the submit folder).
# Variables (environment overrides; sbatch exports the submitting shell's environment):
#   GPUS_PER_NODE  tasks (= GPUs) per node; keep equal to --gpus-per-node/--ntasks-per-node   [8]
#   CONFIG         run config (model preset, seq len, batch, activation checkpointing)  [pretrain/configs/1b_long.yaml]
#   DS_CONFIG      DeepSpeed JSON (ZeRO-3 + AutoEP, autoep_size 8 = one node, bf16)  [ds_configs/zero3_autoep_ep8.json]
#   DATA           megatron .bin/.idx prefix, or a YAML blend "[[0.7, a], [0.3, b]]" -> data.blend  [config's]
#   RUN_DIR        checkpoints, metrics.jsonl, FINISHED; keep it on a shared file system [$REPO/runs/1b_long]
#   WANDB_PROJECT  wandb project (WANDB_MODE=offline works on nodes without network)  [ressformer]
#   SP             sequence-parallel size (Ulysses; the config's sequence_parallel_size otherwise) [config's]
#   EXTRA_ARGS     more trainer arguments, e.g. "--set steps=20000 --set lr=3e-4"     []
#   PYTHON         interpreter with the project installed                 [$REPO/.venv/bin/python or python3]
#   MAX_REQUEUES   give up requeueing after this many restarts                        [20]
# Nodes, time limit, partition, account: sbatch options (--nodes, --time, --partition, --account).
#
# Launch: `srun` one task per GPU with ranks from Slurm (RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID,
# WORLD_SIZE=SLURM_NTASKS, MASTER_ADDR = NodeAddr of the first node, MASTER_PORT from the job id), see
# pretrain/slurm_env.py; no passwordless ssh needed. Documented alternative, for sites that prefer the
# DeepSpeed launcher: inside an allocation run
#   python -m pretrain.slurm_env hostfile hostfile.txt
#   deepspeed --hostfile hostfile.txt --launcher slurm pretrain/main.py --ds_config ... --config ...
# Preemption: 300 s before the time limit Slurm sends USR1 to this shell (B: = batch shell only), it is
# forwarded to the trainer, which saves and exits 0; the job requeues itself and resumes (slurm/_launch.sh).
#
#SBATCH --job-name=ressformer-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-pretrain/configs/1b_long.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_autoep_ep8.json}
DATA=${DATA:-}
RUN_DIR=${RUN_DIR:-$REPO/runs/1b_long}
WANDB_PROJECT=${WANDB_PROJECT:-ressformer}
EXTRA_ARGS=${EXTRA_ARGS:-}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
MAX_REQUEUES=${MAX_REQUEUES:-20}

# GPU cluster defaults: NCCL between nodes, one OpenMP thread per rank unless set. DS_ACCELERATOR is left
# to DeepSpeed (cuda here); the CPU tests set DS_ACCELERATOR=cpu in the environment.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# shellcheck source=slurm/_launch.sh
source "$REPO/slurm/_launch.sh" || { echo "cannot read $REPO/slurm/_launch.sh: submit from the repository root or set REPO" >&2; exit 2; }
ressformer_launch
exit $?
