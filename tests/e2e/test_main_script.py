"""The main job, shortened: `bash scripts/main.sh` itself (README's first command) with STEPS=30 and a
limited lm-eval: tokenizer + indexed data, `deepspeed --num_gpus 2 pretrain/main.py --ds_config
ds_configs/zero3.json --config pretrain/configs/debug.yaml` on 2 CPU ranks, conversion to Hugging Face,
held-out perplexity, lm-eval on the local tasks, a greedy sample; with `eval_tasks` during training (an lm-eval and
a paper task on the last checkpoint). Validation loss must fall well below its
start, and every stage must leave its output."""

import json
import os

import pytest

from tests.helpers.dist import REPO, base_env, run_group


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_main_script_end_to_end_shortened(tmp_path):
    run_dir = tmp_path / "run"
    env = {**base_env(), "RUN_DIR": str(run_dir), "STEPS": "30", "EVAL_LIMIT": "4", "WANDB_MODE": "disabled"}
    env.pop("VIRTUAL_ENV", None)
    cmd = ["bash", "scripts/main.sh", "--set", "eval_every=30", "--set", "log_every=10", "--set", "save_every=30",
           "--set", "eval_tasks=[ressformer_shakespeare_next_line, paper:set@8]", "--set", "eval_tasks_limit=4"]
    p = run_group(cmd, timeout=840, cwd=REPO, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert set(val) == {0, 30}
    assert val[30] < val[0] - 0.5, val
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30] and all(r["tflops"] > 0 for r in train)
    [ev] = [r for r in recs if "eval_tasks/seconds" in r]  # eval_tasks on the last checkpoint, rank 0
    assert ev["step"] == 30 and 0 <= ev["eval_tasks/ressformer_shakespeare_next_line/acc"] <= 1, ev
    assert 0 <= ev["eval_tasks/paper:set@8/acc@8"] == ev["eval_tasks/paper:set@8/acc"] <= 1
    assert "eval_tasks at step 30" in out
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["precision"] == "fp32"
    assert (run_dir / "FINISHED").exists() and (run_dir / "step_00000030" / "COMPLETE").exists()

    hf = run_dir / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors")) and (hf / "tokenizer.model").is_file()
    ppl = json.loads((run_dir / "eval_ppl.json").read_text())["ppl"]
    assert 1 < ppl < 0.5 * 2.718281828 ** val[0], (ppl, val)  # the export scores held-out text like the trainer
    results = [json.loads(f.read_text()) for f in (run_dir / "lm_eval").rglob("results*.json")]
    assert results and {"ressformer_shakespeare_ppl", "ressformer_shakespeare_next_line"} <= set(results[0]["results"])
    assert "validation perplexity by step: 0:" in out and "ROMEO:" in out
    assert f"plot of the run: {run_dir / 'metrics.png'}" in out and (run_dir / "metrics.png").stat().st_size > 10_000

    # Re-running finds the finished run and only re-does conversion and evaluation.
    p2 = run_group(["bash", "scripts/main.sh"], timeout=600, cwd=REPO, env={**env, "EVAL_LIMIT": "1"})
    assert p2.returncode == 0, (p2.stdout + p2.stderr)[-4000:]
    assert "pretraining already done" in p2.stdout
    assert os.path.getmtime(run_dir / "FINISHED") < os.path.getmtime(run_dir / "eval_ppl.json")
