# shellcheck shell=bash
# Shared launch logic for slurm/pretrain_*.sh (sourced, never run on its own). Each script only sets the
# user-facing variables below and calls `ressformer_launch`; everything else lives here or in
# pretrain/slurm_env.py, so a fix applies to every script.
#
# Inputs (environment variables, already defaulted by the calling script):
#   REPO            repository root (the scripts default it to $SLURM_SUBMIT_DIR: sbatch runs a *copy* of
#                   the script from the spool folder, so `dirname $0` is useless there)
#   PYTHON          interpreter with ressformer + deepspeed installed
#   GPUS_PER_NODE   srun tasks per node (one per GPU; 1 on CPU nodes)
#   CONFIG          run config YAML             DS_CONFIG   DeepSpeed JSON
#   RUN_DIR         run folder (checkpoints, metrics.jsonl, FINISHED marker, per-job logs)
#   DATA            megatron data prefix (or a YAML blend list), passed as `--set data.blend=[[1.0, $DATA]]`
#   WANDB_PROJECT   passed as `--set wandb.project=$WANDB_PROJECT` when non-empty (WANDB_MODE picks offline/online)
#   SP              sequence-parallel size, passed as `--set sequence_parallel_size=$SP` (the config's otherwise)
#   EXTRA_ARGS      more trainer arguments, word-split, e.g. "--set steps=40 --set micro_batch=1"
#   MAX_REQUEUES    stop requeueing after this many restarts in all (preemptions and crashes)
#   MAX_CRASH_RESTARTS  requeue after a crash (a rank killed, a hang the watchdog ended, an error) at most this
#                   many times for the run folder [3]; the same step failing twice in a row stops at once
#
# Flow:
#   1. RUN_DIR/FINISHED exists -> nothing to do, exit 0 (a finished run is never restarted or requeued).
#   2. MASTER_ADDR/MASTER_PORT resolved once here (pretrain/slurm_env.py), exported to the tasks by srun.
#   3. `srun` starts GPUS_PER_NODE tasks per node; each task maps SLURM_PROCID/LOCALID/NTASKS to
#      RANK/LOCAL_RANK/WORLD_SIZE and execs pretrain/main.py ... --resume auto (fresh start when RUN_DIR
#      holds no checkpoint, resume from the latest one otherwise: the same command serves a requeued job).
#   4. USR1/TERM reach this batch shell (`#SBATCH --signal=B:USR1@N`, or `scancel --signal=USR1 --batch`):
#      the trap sends USR1 to srun, which delivers it to every task; the trainer saves a
#      checkpoint and exits 0. srun runs in the background and the shell `wait`s, because bash runs traps
#      only between commands.
#   5. After srun, pretrain/launch_policy.py decides: FINISHED -> exit 0; a signal or a clean stop (rc 0) before
#      the last step -> `scontrol requeue` (Slurm restarts the job with the same id, it resumes at step 3); exit 2
#      (a bad config, the run folder refused, a failed write) -> stop; any other failure is a crash -> requeue
#      within MAX_CRASH_RESTARTS, excluding the node that hung or died (the watchdog's dumps in RUN_DIR/hang/, else
#      srun's first `srun: error: NODE` line) when the cluster has nodes to spare, and stop when the newest
#      checkpoint did not move since the previous crash (the same step failed twice).
#   NCCL's flight recorder is on: the last collectives of each rank go to RUN_DIR/hang/nccl_trace_rank_<R> when a
#   collective times out (faults.dist_timeout_s in the run config).

ressformer_launch() {
    set -uo pipefail
    local -a extra trainer_args
    cd "$REPO" || { echo "ressformer_launch: REPO=$REPO is not a folder; submit from the repository root or set REPO" >&2; return 2; }
    mkdir -p "$RUN_DIR"
    local restarts=${SLURM_RESTART_COUNT:-0}
    echo "[launch] $(date -u +%FT%TZ) job=${SLURM_JOB_ID:-none} restarts=$restarts nodes=${SLURM_JOB_NODELIST:-?} gpus_per_node=$GPUS_PER_NODE run_dir=$RUN_DIR"
    if [ -f "$RUN_DIR/FINISHED" ]; then
        echo "[launch] $RUN_DIR/FINISHED exists: the run is complete, nothing to do"
        return 0
    fi

    local exports
    exports=$("$PYTHON" -m pretrain.slurm_env master) || { echo "[launch] could not resolve MASTER_ADDR/MASTER_PORT" >&2; return 2; }
    eval "$exports"
    echo "[launch] MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"

    trainer_args=(pretrain/main.py --ds_config "$DS_CONFIG" --config "$CONFIG" --set "run_dir=$RUN_DIR")
    if [ -n "${DATA:-}" ]; then
        # One megatron prefix -> a one-entry blend; a YAML list ("[[0.7, a], [0.3, b]]") is passed as is.
        local blend=$DATA
        [ "${DATA:0:1}" = "[" ] || blend="[[1.0, $DATA]]"
        trainer_args+=(--set "data.blend=$blend")
    fi
    [ -n "${WANDB_PROJECT:-}" ] && trainer_args+=(--set "wandb.project=$WANDB_PROJECT")
    [ -n "${SP:-}" ] && trainer_args+=(--set "sequence_parallel_size=$SP")
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    trainer_args+=("${extra[@]}" --resume auto)
    mkdir -p "$RUN_DIR/hang" "$RUN_DIR/.launch"
    export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$RUN_DIR/hang/nccl_trace_rank_}

    local nodes=${SLURM_JOB_NUM_NODES:-1}
    local ntasks=$((nodes * GPUS_PER_NODE))
    echo "[launch] srun --nodes=$nodes --ntasks=$ntasks --ntasks-per-node=$GPUS_PER_NODE $PYTHON -m pretrain.slurm_env exec -- $PYTHON ${trainer_args[*]}"

    _RESSFORMER_SIGNAL=""
    _RESSFORMER_SRUN_PID=""
    trap '_ressformer_forward USR1' USR1
    trap '_ressformer_forward TERM' TERM
    local srun_log="$RUN_DIR/.launch/srun-${SLURM_JOB_ID:-local}-$restarts.log" job_start
    job_start=$(date +%s)
    # srun's output also goes to a file: its `srun: error: NODE: task N` lines name the node of a rank that died
    srun --nodes="$nodes" --ntasks="$ntasks" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
        "$PYTHON" -m pretrain.slurm_env exec -- "$PYTHON" "${trainer_args[@]}" > >(tee "$srun_log") 2>&1 &
    _RESSFORMER_SRUN_PID=$!
    local rc=0
    # `wait` returns early (rc > 128) when a trapped signal arrives while srun still runs: wait again then. srun's
    # own job entry says whether it runs (`kill -0 PID` would not: once srun is reaped, another process may get its
    # pid, and `wait` on a pid that is not a child returns 127 at once).
    while :; do
        wait "$_RESSFORMER_SRUN_PID"
        rc=$?
        [ "$rc" -gt 128 ] && jobs -pr | grep -qx "$_RESSFORMER_SRUN_PID" || break
    done
    trap - USR1 TERM
    echo "[launch] $(date -u +%FT%TZ) srun exited rc=$rc signal=${_RESSFORMER_SIGNAL:-none}"

    local ACTION EXCLUDE REASON
    eval "$("$PYTHON" -m pretrain.launch_policy --run-dir "$RUN_DIR" --rc "$rc" --signal "${_RESSFORMER_SIGNAL:-}" \
        --srun-log "$srun_log" --job-start "$job_start" --max-crash-restarts "${MAX_CRASH_RESTARTS:-3}")" \
        || { echo "[launch] pretrain.launch_policy failed: not requeueing" >&2; return 1; }
    case "$ACTION" in
        done)
            echo "[launch] run finished ($RUN_DIR/FINISHED): not requeueing"
            return 0 ;;
        stop)
            echo "[launch] $REASON: not requeueing" >&2
            [ "$rc" = 0 ] && return 1
            return "$rc" ;;
    esac
    echo "[launch] $REASON"
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "[launch] not under Slurm: rerun the same command to resume"
        [ "$rc" = 0 ] && return 0
        return "$rc"
    fi
    if [ "$restarts" -ge "${MAX_REQUEUES:-20}" ]; then
        echo "[launch] already restarted $restarts times (MAX_REQUEUES=${MAX_REQUEUES:-20}): not requeueing" >&2
        return 1
    fi
    echo "[launch] scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || { echo "[launch] scontrol requeue failed (JobRequeue=0 on this cluster and no --requeue?)" >&2; return 1; }
    if [ -n "$EXCLUDE" ]; then
        scontrol update "JobId=$SLURM_JOB_ID" "ExcNodeList=$EXCLUDE" \
            && echo "[launch] the requeued job excludes $EXCLUDE" \
            || echo "[launch] could not exclude $EXCLUDE from the requeued job" >&2
    fi
    return 0
}

_ressformer_forward() {
    _RESSFORMER_SIGNAL=$1
    # Always forward USR1 (the trainer's "save and exit 0" signal): srun treats a TERM of its own as "kill
    # the step", and at the time limit Slurm TERMs the tasks directly anyway.
    echo "[launch] $(date -u +%FT%TZ) got SIG$1: sending USR1 to srun (pid ${_RESSFORMER_SRUN_PID:-?}) so the trainer saves and exits"
    [ -n "${_RESSFORMER_SRUN_PID:-}" ] && kill -USR1 "$_RESSFORMER_SRUN_PID" 2>/dev/null
    return 0
}
