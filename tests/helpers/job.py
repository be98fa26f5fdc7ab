"""The job the e2e fault tests launch: the trainer CLI on 2 real gloo ranks through the `deepspeed` launcher (or one
process), ZeRO-3, the debug model, 12 steps, a checkpoint every 3; its losses and complete checkpoint tags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers.dist import REPO, base_env, free_port, run_group

STEPS = 12
ARGS = ["--config", "pretrain/configs/debug.yaml", "--set", "plot=false", "--set", "log_every=1",
        "--set", "save_every=3",
        "--set", "eval_iters=0", "--set", "micro_batch=2", "--set", "seq_len=64", "--set", "warmup_steps=2",
        "--set", "keep_last=10", "--set", f"steps={STEPS}"]
DS = "ds_configs/zero3.json"


def cmd(run_dir, *extra, ranks=2, ds=DS, script="pretrain/main.py"):
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                str(free_port())] if ranks > 1 else [sys.executable]
    return [*launcher, script, "--ds_config", ds, *ARGS, "--set", f"run_dir={run_dir}", *extra]


def run(run_dir, *extra, ok=True, env=None, **kw):
    p = run_group(cmd(run_dir, *extra, **kw), timeout=300, cwd=REPO, env=env or base_env())
    if ok:
        assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p


def losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice in {run_dir}/metrics.jsonl"
            out[r["step"]] = r["loss"]
    return out


def tags(run_dir) -> list[str]:
    return sorted(p.name for p in Path(run_dir).glob("step_*") if (p / "COMPLETE").is_file())
