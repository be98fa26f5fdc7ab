"""Checkpoint/resume and signals of the engine, through the real CLI (`python pretrain/main.py`, one process,
no launcher). Needs the default data (`python -m pretrain.data prepare`, prepared here when absent).

- SIGKILL after the step-3 checkpoint completes, `--resume auto`: the loss at every later step equals the
  uninterrupted run's exactly (CPU fp32), which also proves the same data order (consumed_samples) was used.
  Both runs train with document masking (data.document_mask), so the CLI path of the document ids is exercised.
- SIGTERM: the run saves, exits 0 and leaves no FINISHED marker; the resumed run finishes and writes it.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.dist import REPO, base_env, run_group

pytestmark = pytest.mark.usefixtures("default_data")

ARGS = ["--ds_config", "ds_configs/zero3.json", "--config", "pretrain/configs/debug.yaml",
        "--set", "log_every=1", "--set", "save_every=3", "--set", "eval_iters=0", "--set", "wandb.mode=disabled", "--set", "plot=false",
        "--set", "micro_batch=2", "--set", "seq_len=64", "--set", "warmup_steps=2", "--set", "data.document_mask=true"]


def _cmd(run_dir, steps, *extra):
    return [sys.executable, "pretrain/main.py", *ARGS, "--set", f"steps={steps}", "--set", f"run_dir={run_dir}", *extra]


def _run(cmd):
    p = run_group(cmd, timeout=200, cwd=REPO, env=base_env())
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def _losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]  # a resumed run re-logs steps after the checkpoint: the last one wins
    return out


def _wait_for(proc, path, timeout):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} never appeared (rc={proc.poll()}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_resume_matches_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(_cmd(a, 8))
    ref = _losses(a)
    assert sorted(ref) == list(range(1, 9)) and (a / "FINISHED").exists()

    p = subprocess.Popen(_cmd(b, 8), cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    _wait_for(p, b / "step_00000003" / "COMPLETE", 150)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (b / "FINISHED").exists()
    _run(_cmd(b, 8, "--resume", "auto"))
    got = _losses(b)
    for s in range(4, 9):
        assert got[s] == ref[s], (s, got[s], ref[s])
    assert (b / "FINISHED").exists()
    tags = sorted(x.name for x in b.glob("step_*"))
    assert tags == ["step_00000006", "step_00000008"], tags  # keep_last 2
    assert (b / "latest").read_text() == "step_00000008"
    client = json.loads((b / "step_00000008" / "run_state.json").read_text())
    assert client["consumed_samples"] == 8 * 2 and client["tokens_seen"] == 8 * 2 * 64


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_saves_and_exits_zero_without_finished(tmp_path):
    d = tmp_path / "r"
    p = subprocess.Popen(_cmd(d, 400, "--set", "save_every=1000"), cwd=REPO, env=base_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(p, d / "metrics.jsonl", 150)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert not (d / "FINISHED").exists()
    tags = [x for x in d.glob("step_*") if (x / "COMPLETE").exists()]
    assert len(tags) == 1 and 0 < int(tags[0].name[5:]) < 400
