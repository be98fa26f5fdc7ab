"""Seconds a checkpoint save blocks training, with the model folder and hashes written in the foreground
(`async_save: false`) and in the background (`async_save: true`), measured in the same run of this script.

    python bench/save_time.py [--model 125m] [--steps 4] [--ranks 1] [--ds-config ds_configs/zero3.json]

Each mode trains `steps` steps of `pretrain/main.py` saving after every step, and reads the trainer's own
per-save timings from metrics.jsonl (`save/blocked_s`: DeepSpeed's save + the model gather + whatever the
foreground writes; `save/background_s`: what the thread wrote meanwhile). The last step's save always completes
in the foreground (the run ends there) and is left out. Prints a table and the ratio sync / async of the mean
blocked seconds. CPU here; on a GPU the gather and DeepSpeed's save are faster and the ratio larger.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_mode(async_save: bool, args, root: Path) -> list[dict]:
    run_dir = root / ("async" if async_save else "sync")
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks)] if args.ranks > 1 \
        else [sys.executable]
    cmd = [*launcher, "pretrain/main.py", "--ds_config", args.ds_config, "--config", "pretrain/configs/debug.yaml",
           "--set", f"model={args.model}", "--set", f"seq_len={args.seq_len}", "--set", "micro_batch=1",
           "--set", f"steps={args.steps}", "--set", "save_every=1", "--set", "keep_last=2", "--set", "eval_iters=0",
           "--set", "log_every=1", "--set", "preflight=false", "--set", f"async_save={str(async_save).lower()}",
           "--set", "model.r2mu.step_sampling=fixed", "--set", f"run_dir={run_dir}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in recs if "save/blocked_s" in r), key=lambda r: r["step"])[:-1]  # not the last step's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="125m")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--ds-config", default="ds_configs/zero3.json")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
        rows = {mode: run_mode(mode, args, Path(tmp)) for mode in (False, True)}
    print(f"# {args.model} T={args.seq_len} ranks={args.ranks} {args.ds_config}: seconds per save (mean over "
          f"{args.steps - 1} saves)")
    print(f"{'async_save':<11} {'blocked_s':>10} {'deepspeed_s':>12} {'gather_s':>9} {'background_s':>13}")
    means = {}
    for mode, recs in rows.items():
        m = {k: statistics.mean(r.get(f"save/{k}", 0.0) for r in recs)
             for k in ("blocked_s", "deepspeed_s", "gather_s", "background_s")}
        means[mode] = m
        print(f"{str(mode).lower():<11} {m['blocked_s']:>10.2f} {m['deepspeed_s']:>12.2f} {m['gather_s']:>9.2f} "
              f"{m['background_s']:>13.2f}")
    ratio = means[False]["blocked_s"] / max(means[True]["blocked_s"], 1e-9)
    print(f"blocked seconds per save, sync / async: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "means": {str(k): v for k, v in means.items()},
                                               "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
