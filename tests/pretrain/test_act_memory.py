"""Activation checkpointing across the K recurrent R2MU steps: with every step a checkpoint
boundary, the activation memory kept for backward grows much less than linearly in K (K = 1, 2, 4, 8),
and checkpointing does not change the loss or the gradients."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from act_memory import saved_bytes  # noqa: E402
from pretrain.engine import checkpoint_fn  # noqa: E402
from ressformer import ModelConfig, build_model  # noqa: E402


@pytest.fixture(scope="module")
def model_and_ids():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    return build_model(cfg), torch.randint(0, cfg.vocab_size, (2, 128))


@pytest.mark.timeout(120)
def test_checkpointed_memory_grows_much_less_than_linearly_in_k(model_and_ids):
    model, ids = model_and_ids
    off = {k: saved_bytes(model, ids, k, False) for k in (1, 2, 4, 8)}
    on = {k: saved_bytes(model, ids, k, True) for k in (1, 2, 4, 8)}
    print("saved MiB off:", {k: round(v / 2**20, 2) for k, v in off.items()},
          "on:", {k: round(v / 2**20, 2) for k, v in on.items()})
    assert all(off[a] < off[b] for a, b in ((1, 2), (2, 4), (4, 8)))  # without it: linear in K
    per_step_off = (off[8] - off[1]) / 7
    per_step_on = (on[8] - on[1]) / 7
    assert per_step_on < 0.25 * per_step_off, (per_step_on, per_step_off)
    assert on[8] < 0.5 * off[8]


@pytest.mark.timeout(120)
def test_checkpointing_keeps_loss_and_grads(model_and_ids):
    model, ids = model_and_ids
    res = []
    for fn in (None, checkpoint_fn):
        model.zero_grad()
        model.set_checkpointing(fn, every=2)
        out = model(ids, labels=ids, num_steps=3)
        out.loss.backward()
        res.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    model.set_checkpointing(None)
    torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=1e-6)
    assert len(res[0][1]) == len(res[1][1]) > 0
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
