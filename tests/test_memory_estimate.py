"""pretrain/memory_estimate.py: per-GPU memory terms follow the model's own parameter counts and the
settings that make a long-context run fit (ZeRO-3, activation checkpointing across K steps, micro batch 1)."""

from __future__ import annotations

import math

import pytest

from pretrain.memory_estimate import GiB, estimate_memory, main
from ressformer.config import ModelConfig
from ressformer.flops import count_params


def test_model_states_follow_zero_partitioning():
    cfg = ModelConfig.from_preset("1b")
    P = count_params(cfg)["total"]
    for stage, expect in ((0, 16 * P), (1, 4 * P + 12 * P / 8), (2, 2 * P + 14 * P / 8), (3, 16 * P / 8)):
        est = estimate_memory(cfg, seq_len=1024, world_size=8, zero_stage=stage)
        assert est.terms["model_states"] == pytest.approx(expect)
    assert "zero3_gathered" not in estimate_memory(cfg, seq_len=1024, world_size=8, zero_stage=2).terms
    z3 = estimate_memory(cfg, seq_len=1024, world_size=8, zero_stage=3, max_live_parameters=1e8)
    assert z3.terms["zero3_gathered"] == pytest.approx(4 * 1e8)


def test_checkpoint_units_and_logits():
    cfg = ModelConfig.from_preset("debug")
    r, T, B, D = cfg.r2mu, 64, 2, cfg.d_model
    est = estimate_memory(cfg, seq_len=T, micro_batch=B, world_size=1, ckpt_every=1)
    n_units = r.n_prelude + r.steps + r.n_coda
    n_sum = (T // r.segment_len) * r.summary_slots
    assert est.terms["checkpoints"] == pytest.approx(n_units * 2 * B * T * D + r.steps * 2 * B * n_sum * D)
    assert est.terms["logits"] == 10 * B * T * cfg.vocab_size
    # More recurrent steps K: one more stored boundary each (the shared block adds no parameters).
    k6 = estimate_memory(cfg, seq_len=T, micro_batch=B, world_size=1, ckpt_every=1, num_steps=r.steps + 3)
    assert k6.terms["checkpoints"] - est.terms["checkpoints"] == pytest.approx(3 * 2 * B * (T + n_sum) * D)
    assert k6.terms["model_states"] == est.terms["model_states"]


# The block-selection extension pretrain/configs/1b_long.yaml turns on (no gathered top-k keys to keep).
BLOCK_DENSE = {"asam.impl": "block", "asam.block_select": "chunk", "asam.block_size": 256, "asam.topk": 0}


def test_checkpointing_and_sparsity_are_what_make_32k_fit():
    cfg = ModelConfig.from_preset("1b-long")
    kw = dict(seq_len=32768, micro_batch=1, world_size=32, zero_stage=3)
    full = estimate_memory(cfg, ckpt_every=None, **kw)
    every = estimate_memory(cfg, ckpt_every=1, **kw)
    sparse = estimate_memory(cfg.replace(**BLOCK_DENSE), ckpt_every=1, **kw)
    assert full.total > 5 * every.total  # no checkpointing: hundreds of GiB
    assert every.total > sparse.total  # gathered top-k keys/values dominate the recomputed unit
    # Activation memory scales linearly in T with block-sparse attention (no T^2 term).
    half = estimate_memory(cfg.replace(**BLOCK_DENSE), ckpt_every=1, **dict(kw, seq_len=16384))
    act = lambda e: e.terms["checkpoints"] + e.terms["unit_recompute"] + e.terms["logits"]  # noqa: E731
    assert act(sparse) / act(half) == pytest.approx(2.0, rel=0.1)
    assert math.isfinite(sparse.with_slack) and sparse.with_slack > sparse.total


def test_bad_values_name_themselves():
    cfg = ModelConfig.from_preset("debug")
    with pytest.raises(ValueError, match="world_size=0"):
        estimate_memory(cfg, seq_len=8, world_size=0)
    with pytest.raises(ValueError, match="ckpt_every=0"):
        estimate_memory(cfg, seq_len=8, ckpt_every=0)


def test_cli_prints_a_table(capsys):
    sets = [a for k, v in BLOCK_DENSE.items() for a in ("--set", f"{k}={v}")]
    assert main(["--preset", "1b-long", "--seq-len", "32768", *sets, "--world-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "model_states" in out and "total" in out and "GiB" in out
    assert float(out.split("total")[1].split()[0]) < 80  # fits an 80 GiB GPU
    assert GiB == 2**30


def test_1b_long_config_note_is_the_estimators_output(capsys):
    """The per-GPU memory note in pretrain/configs/1b_long.yaml is what the estimator prints for it."""
    from pathlib import Path

    from pretrain.memory_estimate import run_config_settings

    path = Path(__file__).resolve().parents[1] / "pretrain" / "configs" / "1b_long.yaml"
    run = run_config_settings(str(path))
    assert run["seq_len"] >= 32768 and run["micro_batch"] == 1 and run["ckpt_every"] == 1
    assert main(["--config", str(path), "--world-size", "32"]) == 0
    printed = capsys.readouterr().out.splitlines()[1:]
    note = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#   ")]
    for row in printed:
        assert " ".join(row.split()) in {" ".join(n.split()) for n in note}, f"stale note, missing: {row}"
    assert float(printed[-1].split()[2]) < 80  # "with slack" fits an 80 GiB GPU
