#!/bin/bash
# Downstream evaluation of one checkpoint as a job of its own, so that evaluation never holds the training
# allocation (the run config's `eval_tasks` do the same inside training, on rank 0 while the other ranks wait).
#
#   sbatch slurm/eval_checkpoint.sh step_00002000                        # RUN_DIR/step_00002000
#   sbatch slurm/eval_checkpoint.sh                                      # the run's newest usable checkpoint
#   sbatch --dependency=afterany:$TRAIN_JOB slurm/eval_checkpoint.sh     # once the training job has ended
#   TASKS="paper:hops paper:noisy ressformer_shakespeare_next_line" LIMIT=200 RUN_DIR=/scratch/me/1b \
#       sbatch slurm/eval_checkpoint.sh step_00004000
#
# Variables (environment overrides; sbatch exports the submitting shell's environment):
#   RUN_DIR    the training run folder                                                  [$REPO/runs/1b_long]
#   TASKS      paper:NAME[@S1,S2] (bench/paper) and lm-eval task names (eval/tasks holds the offline ones)
#              [paper:hops paper:set paper:table paper:reach paper:listops paper:noisy]
#   LIMIT      examples per lm-eval task and per paper-task setting                                  [100]
#   NUM_STEPS  recurrent steps K of the evaluation                                        [the training K]
#   PYTHON     interpreter with the project installed              [$REPO/.venv/bin/python or python3]
# The checkpoint is held against the training job's keep_last while it is read. Results: RUN_DIR/eval_tasks/
# <tag>.json, and one record appended to RUN_DIR/metrics.jsonl (eval_tasks/<task>/<metric> at the checkpoint's
# step), which `python -m pretrain.plot RUN_DIR` draws. One GPU by default; on CPU nodes submit with
# `--gpus-per-node=0`.
#
#SBATCH --job-name=ressformer-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
RUN_DIR=${RUN_DIR:-$REPO/runs/1b_long}
TASKS=${TASKS:-paper:hops paper:set paper:table paper:reach paper:listops paper:noisy}
LIMIT=${LIMIT:-100}
NUM_STEPS=${NUM_STEPS:-}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
TAG=${1:-}
cd "$REPO" || { echo "eval_checkpoint: REPO=$REPO is not a folder; submit from the repository root or set REPO" >&2; exit 2; }
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
MODEL=$RUN_DIR${TAG:+/$TAG}
echo "[eval] $(date -u +%FT%TZ) job=${SLURM_JOB_ID:-none} node=${SLURMD_NODENAME:-$(hostname)} model=$MODEL tasks=$TASKS"
# shellcheck disable=SC2086  # TASKS is a word list
exec "$PYTHON" -m pretrain.eval_tasks --model "$MODEL" --tasks $TASKS --limit "$LIMIT" \
    ${NUM_STEPS:+--num-steps "$NUM_STEPS"} --out-dir "$RUN_DIR/eval_tasks" --metrics "$RUN_DIR/metrics.jsonl"
