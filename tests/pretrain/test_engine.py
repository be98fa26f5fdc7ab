"""ZeRO-3 on 2 real gloo CPU ranks == one plain torch process: parity is the proof.

One optimizer step (AdamW + grad clipping + warmup LR, the engine's own optimizer/schedule builders) of the
debug ReSSFormer (dense MLP: moe.num_experts=1; MoE parity is tests/pretrain/test_expert_parallel.py) with and without
activation checkpointing, K = 1 and K = 3 recurrent steps (the shared block runs K times under ZeRO-3), must
give the same loss and the same updated weights as the reference within fp32 tolerance.
Adam's first step is
lr * g / (|g| + eps): with eps = 1e-8 an element whose gradient is ~1e-8 flips sign under fp32 reduction-order
noise and moves by 2 lr, so the test uses eps = 1e-4, which keeps the update a smooth function of the gradient.
The same launch builds the full debug model from its seed under ZeRO-3: the weights equal init_weights() in one
process, and no rank ever gathered more than one parameter while building.
"""


import pytest
import torch

from pretrain.config import RunConfig
from pretrain.engine import build_optimizer, checkpoint_fn
from ressformer import build_model
from tests.helpers.dist import REPO, launch_ranks

WORLD, MB, T = 2, 2, 32
CASES = [("ac_off_k1", False, 1), ("ac_off_k3", False, 3), ("ac_on_k1", True, 1), ("ac_on_k3", True, 3)]


def _run_cfg(ac: bool) -> dict:
    return RunConfig(model="debug", model_overrides={"moe.num_experts": 1}, seq_len=T, micro_batch=MB, steps=10,
                     lr=1e-2, warmup_steps=2, grad_clip=0.5, seed=7, eps=1e-4,
                     activation_checkpointing={"enabled": ac, "every": 1}, wandb={"mode": "disabled"}).to_dict()


def _reference(run_d: dict, state: dict, ids: torch.Tensor, k: int):
    run = RunConfig.from_dict(run_d)
    model = build_model(run.model_config())
    model.load_state_dict(state)
    if run.activation_checkpointing.enabled:
        model.set_checkpointing(checkpoint_fn, every=1)
    opt, sched = build_optimizer(model, run)
    # each rank averages over its own tokens, DeepSpeed averages the ranks: the same mean of per-rank means
    losses = [model(x, labels=x, num_steps=k).loss for x in ids.chunk(WORLD)]
    loss = torch.stack(losses).mean()
    loss.backward()
    for p in model.parameters():  # DeepSpeed gives parameters unused this step (R2MU memory at K=1) a zero
        if p.grad is None:        # gradient, so AdamW's weight decay still moves them; mirror that here
            p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
    opt.step()
    sched.step()
    return loss.item(), {k_: v.detach() for k_, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_two_ranks_match_single_process(tmp_path):
    torch.manual_seed(0)
    run0 = RunConfig.from_dict(_run_cfg(False))
    cfg = run0.model_config()
    state = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (WORLD * MB, T))
    ds_json = (REPO / "ds_configs" / "zero3.json").read_text()
    cases = [{"name": n, "run": _run_cfg(ac), "num_steps": k, "ds_json": ds_json} for n, ac, k in CASES]
    # the debug model with prelude and coda blocks: three blocks, so one parameter is a small part of the model
    seed_run = RunConfig(model="debug", model_overrides={"r2mu.n_prelude": 1, "r2mu.n_coda": 1}, seq_len=T,
                         micro_batch=MB, seed=11, wandb={"mode": "disabled"}).to_dict()
    torch.save({"state": state, "input_ids": ids, "cases": cases, "seed_init": {"run": seed_run, "ds_json": ds_json}},
               tmp_path / "in.pt")
    launch_ranks(["tests/helpers/parity_worker.py", str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                 WORLD, timeout=540)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, ac, k in CASES:
        ref_loss, ref_state = _reference(_run_cfg(ac), state, ids, k)
        assert abs(got[name]["loss"] - ref_loss) < 1e-5, (name, got[name]["loss"], ref_loss)
        moved = 0.0
        for key, ref in ref_state.items():
            torch.testing.assert_close(got[name]["state"][key], ref, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{name}: {key}: {m}")
            moved = max(moved, (ref - state[key]).abs().max().item())
        assert moved > 1e-4, f"{name}: the step did not change the weights (max change {moved})"

    # Seeded initialisation under ZeRO-3 (full debug model: MoE, R2MU memory, SOES) == the plain model API, and
    # built one parameter at a time: no GatheredParameters call during the build held more than one parameter.
    seed_cfg = RunConfig.from_dict(seed_run).model_config()
    torch.manual_seed(11)
    ref = build_model(seed_cfg)
    torch.manual_seed(11)
    ref.init_weights()
    init = got["seed_init"]
    assert init["state"].keys() == ref.state_dict().keys()
    for key, want in ref.state_dict().items():
        assert torch.equal(init["state"][key], want), f"seeded ZeRO-3 init differs from init_weights() at {key}"
    sizes = [p.numel() for p in ref.parameters()]
    assert len(init["gathered"]) == len(sizes), init["gathered"]
    assert max(init["gathered"]) == max(sizes) < sum(sizes) / 4, (max(init["gathered"]), max(sizes), sum(sizes))
