"""The main job, shortened: train the tokenizer and preprocess the embedded corpus (`python -m pretrain.data
prepare`), then `deepspeed --num_gpus 2 pretrain/main.py --ds_config ds_configs/zero3.json --config
pretrain/configs/debug.yaml` on 2 CPU ranks for 30 steps; validation loss must fall well below its start."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers.dist import REPO, base_env, free_port


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_debug_job_two_ranks_zero3_val_loss_falls(tmp_path):
    art = tmp_path / "art"
    subprocess.run([sys.executable, "-m", "pretrain.data", "prepare", "--out", str(art)], cwd=REPO, env=base_env(),
                   check=True, timeout=300, capture_output=True)
    run_dir = tmp_path / "run"
    launcher = shutil.which("deepspeed", path=str(REPO / ".venv" / "bin")) or shutil.which("deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "pretrain/main.py",
           "--ds_config", "ds_configs/zero3.json", "--config", "pretrain/configs/debug.yaml",
           "--set", f"run_dir={run_dir}", "--set", "steps=30", "--set", "eval_every=30", "--set", "log_every=10",
           "--set", "save_every=30", "--set", "wandb.mode=disabled",
           "--set", f"data.blend=[[1.0, {art}/data/shakespeare]]", "--set", f"data.tokenizer={art}/tokenizer"]
    p = subprocess.run(cmd, cwd=REPO, env=base_env(), timeout=540, capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert set(val) == {0, 30}
    assert val[30] < val[0] - 0.5, val
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30] and all(r["tflops"] > 0 for r in train)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["precision"] == "fp32"
    assert (run_dir / "FINISHED").exists() and (run_dir / "step_00000030" / "COMPLETE").exists()
