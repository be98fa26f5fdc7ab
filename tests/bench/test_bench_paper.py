"""The paper suite end to end at smoke size (slow tier): data through the loss-mask pipeline, training with the real
trainer, accuracy, the K sweep, the language-modelling row and the report. It checks the pipeline, not the result."""

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_dense_baselines_are_matched_to_the_paper_model():
    from bench.paper.suite import SUITES, dense_layers, paper_config, variant_sets
    from ressformer.config import ModelConfig
    from ressformer.flops import count_params, flops_per_token

    suite = SUITES["small"]
    paper = paper_config(suite)
    base = ModelConfig.from_preset("debug-transformer", max_seq_len=suite.seq_len)
    n_p, n_f = dense_layers(suite, "params"), dense_layers(suite, "flops")
    p_total = count_params(paper)["total"]
    dense = [count_params(base.replace(n_layers=n))["total"] for n in (n_p - 1, n_p, n_p + 1)]
    assert abs(dense[1] - p_total) <= min(abs(d - p_total) for d in dense)  # the closest layer count
    fl = [flops_per_token(base.replace(n_layers=n), suite.seq_len, causal_skip=True) for n in (n_f - 1, n_f, n_f + 1)]
    target = flops_per_token(paper, suite.seq_len, attend="gather")  # the sparse algorithm's (flops.matched_dense)
    assert abs(fl[1] - target) <= min(abs(f - target) for f in fl)
    assert n_f > n_p  # ReSSFormer spends K x its block's compute on fewer parameters
    assert "model.position=none" in variant_sets(suite, "dense_nope")
    assert variant_sets(suite, "dense_nope")[:3] == variant_sets(suite, "dense_params")[:3]
    assert variant_sets(suite, "paper")[0] == "model=debug"  # the paper preset, nothing switched


def test_causal_skip_halves_the_baselines_attention_flops():
    from ressformer.config import ModelConfig
    from ressformer.flops import flops_per_token

    cfg = ModelConfig.from_preset("debug-transformer")
    T, d = 128, cfg.d_model
    diff = flops_per_token(cfg, T) - flops_per_token(cfg, T, causal_skip=True)
    assert diff == pytest.approx(6.0 * cfg.n_layers * 2.0 * (T - (T + 1) / 2) * d)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_suite_runs_end_to_end(tmp_path, monkeypatch):
    from bench.paper.__main__ import main
    from bench.paper.suite import SUITES

    monkeypatch.chdir(REPO)
    out = tmp_path / "paper"
    assert main(["run", "--suite", "smoke", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    tasks = {r["variant"]: r for r in runs.values() if r["kind"] == "tasks"}
    assert set(tasks) == {"paper", "dense_params"}
    for r in tasks.values():
        assert set(r["acc"]) == {name for name, _, _ in SUITES["smoke"].tasks}
        for name, _, test in SUITES["smoke"].tasks:
            assert set(r["acc"][name]) == {str(s) for s in test}
            assert all(0.0 <= a <= 1.0 for a in r["acc"][name].values())
        assert math.isfinite(r["val_loss"]) and r["tokens_per_s"] > 0 and r["params"] > 0
    assert tasks["dense_params"]["params"] == pytest.approx(tasks["paper"]["params"], rel=0.25)
    assert sorted(int(k) for k in tasks["paper"]["k_sweep"]) == list(range(1, 9))  # K = 1 .. 2 x 4
    lm = [r for r in runs.values() if r["kind"] == "lm"]
    assert {r["variant"] for r in lm} == {"paper", "dense_params"} and all(r["val_ppl"] > 1 for r in lm)
    assert set(res["lr_choice"]) == {"paper", "dense_params"}
    # the labels the trainer saw were the answers only: the validation loss is over answer tokens and EOS
    log = (out / "data" / "tasks.json").read_text()
    assert json.loads(log)["target_tokens"] == 2 * 600  # one answer symbol + EOS per example
    # resuming reads finished runs back instead of retraining
    mtime = (out / "runs" / "tasks-paper-s0-lr0.003" / "metrics.jsonl").stat().st_mtime
    assert main(["run", "--suite", "smoke", "--out", str(out)]) == 0
    assert (out / "runs" / "tasks-paper-s0-lr0.003" / "metrics.jsonl").stat().st_mtime == mtime
    assert main(["report", "--out", str(out)]) == 0
    md = (out / "RESULTS.md").read_text()
    for part in ("Figure 1", "Figure 2", "Figure 3", "K changed at inference", "Language modelling", "paper",
                 "dense_params"):
        assert part in md
    for png in ("fig1_accuracy_vs_length.png", "fig2_structure_tasks.png", "fig3_accuracy_vs_distractors.png",
                "k_sweep.png"):
        assert (out / png).stat().st_size > 1000
