"""Entry point: parse, build, train (the loop lives in pretrain/trainer.py).

    deepspeed [--num_gpus N] pretrain/main.py --ds_config ds_configs/zero3.json --config pretrain/configs/debug.yaml \
        [--set key=value ...] [--resume auto|TAG|PATH] [--overwrite]
    python pretrain/main.py ...            # one process, no launcher (world size 1, gloo on CPU)
    srun ... python pretrain/main.py ...   # RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the env
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python pretrain/main.py` from anywhere

EPILOG = """run folder (RUN_DIR = run_dir; pretrain/checkpoint.py owns it):
  LOCK                  the job writing here (host, pid); a second job on the folder is refused
  metrics.jsonl         one JSON object per logged step ({"step", "loss", "lm_loss", aux losses, "lr",
                        "grad_norm", "tokens_per_s", "tflops", "skipped_micro_batches", ...}) and per evaluation
                        ({"step", "val_loss", "val_ppl"}); a resume drops the records after its checkpoint
  run_info.json         resolved run/model/DeepSpeed configs, git SHA, library versions, precision
  step_XXXXXXXX/        one checkpoint: DeepSpeed's files, model.safetensors + model_config.yaml + tokenizer/
                        (the consolidated fp32 model), run_state.json, manifest.json (sha256 of every file),
                        COMPLETE (written last); `latest` names the newest
  superseded/           checkpoints newer than the one a run was resumed from (--resume TAG)
  FINISHED              written only when all `steps` are done
resume: --resume auto verifies the newest complete checkpoint and falls back to the previous one when a file
  is damaged (the warning names it); another world size or ZeRO stage is resharded (ds_to_universal).
exit status: 0 when all steps are done AND when stopped by SIGTERM/SIGUSR1/SIGINT (checkpoint saved, no
  FINISHED): a wrapper requeues when FINISHED is absent. 2: the run folder is in use or holds another run, no
  usable checkpoint, or a save failed (the message names the cause and file; the previous checkpoint is intact).
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

    # `kill -USR2 <pid>` prints every thread's Python stack to stderr and the run goes on: for a hung rank.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    from pretrain.config import load_run_config
    from pretrain import trainer

    run = load_run_config(a.config, a.set)
    with open(a.ds_config) as f:
        ds_json = json.load(f)
    trainer.setup_distributed()
    from pretrain.checkpoint import CheckpointSaveError, RunFolderError

    import torch.distributed as dist

    try:
        trainer.train(run, ds_json, resume=a.resume, overwrite=a.overwrite)
    except (RunFolderError, CheckpointSaveError) as e:  # raised on every rank alike
        print(f"[pretrain] error: {e}", file=sys.stderr, flush=True)
        rc = 2
    else:
        rc = 0
    if dist.is_initialized():
        dist.destroy_process_group()  # leave together: a rank exiting under a live gloo group can abort its peer
    return rc


if __name__ == "__main__":
    sys.exit(main())
