"""Entry point: parse, build, train (the loop lives in pretrain/trainer.py).

    deepspeed [--num_gpus N] pretrain/main.py --ds_config ds_configs/zero3.json --config pretrain/configs/debug.yaml \
        [--set key=value ...] [--resume auto|TAG|PATH] [--overwrite]
    python pretrain/main.py ...            # one process, no launcher (world size 1, gloo on CPU)
    srun ... python pretrain/main.py ...   # RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the env
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python pretrain/main.py` from anywhere

EPILOG = """run folder (RUN_DIR = run_dir; pretrain/checkpoint/ owns it):
  LOCK                  the job writing here (host, pid); a second job on the folder is refused
  metrics.jsonl         one JSON object per logged step ({"step", "loss", "lm_loss", aux losses, "lr",
                        "grad_norm", "tokens_per_s", "tflops", "skipped_micro_batches", ...}) and per evaluation
                        ({"step", "val_loss", "val_ppl"}); a resume drops the records after its checkpoint
  run_info.json         resolved run/model/DeepSpeed configs, git SHA, library versions, precision
  step_XXXXXXXX/        one checkpoint: DeepSpeed's files, model.safetensors + model_config.yaml + tokenizer/
                        (the consolidated fp32 model), run_state.json, manifest.json (sha256 of every file),
                        COMPLETE (written last); `latest` names the newest (for people and DeepSpeed's tools)
  superseded/           checkpoints newer than the one a run was resumed from (--resume TAG)
  FINISHED              written only when all `steps` are done
  nan_storm.json        the last launch stopped in a NaN storm (step, the checkpoint it started from)
resume: --resume auto verifies the newest complete checkpoint and falls back to the previous one when a file
  is damaged (the warning names it); another world size or ZeRO stage is resharded (ds_to_universal).
hangs: a rank that completes no step within faults.step_timeout_s (automatic: 10x the median step, at least 10 min)
  writes its stacks and phase to RUN_DIR/hang/rank<R>.{stacks.txt,json}, names the ranks that stopped reporting, and
  exits 4; on GPUs NCCL's flight recorder dumps to RUN_DIR/hang/nccl_trace_rank_<R> when a collective times out.
exit status: 0 when all steps are done AND when stopped by SIGTERM/SIGUSR1/SIGINT (checkpoint saved, no
  FINISHED; a signal while resharding saves nothing): a wrapper requeues when FINISHED is absent. 2: a bad config,
  the run folder is in use or holds another run, no usable checkpoint, or a write of the run's files failed (a save,
  metrics, logs: one line names the cause and file; the previous checkpoint is intact). 3: a NaN storm
  (nan_max_consecutive in a row, or more than nan_max_fraction of the run's micro batches; nan_storm.json records
  it and the next --resume auto warns when it picks the same checkpoint). 4: the watchdog found a hang. 5: the
  preflight found a rank it cannot trust (python -m pretrain.preflight runs it alone).
every run-config key, with its default and meaning: python -m pretrain.config
a hung rank: `kill -USR2 PID` prints every thread's Python stack to its stderr; the run goes on."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pretrain/main.py", description="Pretrain a ReSSFormer with DeepSpeed.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ds_configs/zero3.json, zero1.json, ...)")
    ap.add_argument("--config", default=None, help="run config YAML (pretrain/configs/debug.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-config field: steps=40, run_dir=/tmp/x, model.asam.topk=8 (repeatable)")
    ap.add_argument("--resume", default="none", metavar="none|auto|TAG|PATH",
                    help="none (default): a fresh run, refused if run_dir holds checkpoints; auto: the newest usable "
                         "checkpoint in run_dir (a damaged one is skipped for the previous), fresh if there is none; "
                         "TAG (step_00000100) or PATH (a tag folder): exactly that checkpoint")
    ap.add_argument("--overwrite", action="store_true",
                    help="with --resume none: delete the checkpoints and logs of an earlier run in run_dir first")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    a = ap.parse_args(argv)
    if a.overwrite and a.resume != "none":
        return _fail(f"--overwrite deletes the run folder's checkpoints and starts over, --resume {a.resume} "
                     f"continues from one: give one of them")

    from pretrain.config import load_run_config
    from pretrain.ds_config import load_ds_json

    try:  # before any process group: every rank finds the same error, rank 0 says it
        run = load_run_config(a.config, a.set)
        ds_json = load_ds_json(a.ds_config)
        from pretrain.metrics import wandb_mode

        if wandb_mode(run) != "disabled" and importlib.util.find_spec("wandb") is None:  # before rank 0 alone meets it
            raise ValueError(f"wandb.mode={wandb_mode(run)} needs wandb: pip install -e '.[train]', or --set "
                             f"wandb.mode=disabled (metrics.jsonl keeps every record)")
    except ValueError as e:
        return _fail(f"config error: {e}")

    from pretrain import distributed, trainer
    from pretrain.checkpoint import CheckpointSaveError, RunFolderError
    from pretrain.config import ConfigError
    from pretrain.run_files import RunWriteError

    # `kill -USR2 <pid>` prints every thread's Python stack to stderr and the run goes on: for a hung rank.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    nccl_flight_recorder(run.run_dir)
    distributed.setup_distributed(run.faults.dist_timeout_s)
    from pretrain.preflight import PREFLIGHT_EXIT, PreflightError

    try:  # every error below is raised on every rank alike
        trainer.train(run, ds_json, resume=a.resume, overwrite=a.overwrite)
    except ConfigError as e:
        rc = _fail(f"config error: {e}")
    except (RunFolderError, CheckpointSaveError, RunWriteError) as e:
        rc = _fail(f"error: {e}")
    except trainer.NanStormError as e:
        rc = _fail(f"stopped: {e}", rc=3)
    except PreflightError as e:
        rc = _fail(str(e), rc=PREFLIGHT_EXIT)
    else:
        rc = 0
    distributed.teardown_distributed()  # leave together: a rank exiting under a live gloo group can abort its peer
    return rc


def nccl_flight_recorder(run_dir: str) -> None:
    """On GPUs, NCCL's flight recorder: the last collectives of each rank kept in a ring buffer and dumped to
    RUN_DIR/hang/nccl_trace_rank_<R> when a collective times out (faults.dist_timeout_s). Values already in the
    environment (the Slurm script's) win."""
    import torch

    if not torch.cuda.is_available():
        return
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(Path(run_dir).resolve() / "hang" / "nccl_trace_rank_"))
    Path(run_dir, "hang").mkdir(parents=True, exist_ok=True)


def _fail(msg: str, rc: int = 2) -> int:
    """One line per job (global rank 0 prints it; every rank exits `rc`). A log that cannot be written (a full disk)
    leaves the exit status to say it."""
    if os.environ.get("RANK", "0") == "0":
        try:
            print(f"[pretrain] {msg}", file=sys.stderr, flush=True)
        except OSError:
            pass
    return rc


if __name__ == "__main__":
    sys.exit(main())
