"""Initialisation plans (ressformer.initialization) and the trainer's parameter-at-a-time initialisation.

The plan is what lets ZeRO-3 initialise one gathered parameter at a time (tests/pretrain/test_engine.py runs it on
2 gloo ranks); here: it names every parameter once for every architecture variant, it touches every parameter,
its values follow the documented rules, and the trainer's single-process path gives init_weights()' weights.
"""

import math

import pytest
import torch

from pretrain.config import RunConfig
from pretrain.engine import build_model_for, set_initial_weights
from ressformer import ModelConfig, build_model
from ressformer.initialization import check_plan, run_plan

VARIANTS = [
    ("ressformer", {}),
    ("ressformer", {"tie_embeddings": True}),
    ("ressformer", {"moe.num_experts": 1}),
    ("ressformer", {"moe.shared_experts": 1}),
    ("ressformer", {"r2mu.memory": False, "soes.enabled": False}),
    ("ressformer", {"r2mu.enabled": False}),
    ("ressformer", {"r2mu.n_prelude": 1, "r2mu.n_coda": 1}),
    ("transformer", {}),
    ("transformer", {"tie_embeddings": True, "moe.num_experts": 1}),
]


def _cfg(arch, over):
    return ModelConfig.from_preset("debug", arch=arch, **over)


@pytest.mark.parametrize("arch,over", VARIANTS)
def test_plan_names_every_parameter_once_and_touches_it(arch, over):
    model = build_model(_cfg(arch, over))
    plan = model.init_plan()
    check_plan(model, plan)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    run_plan(model, plan)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} was not initialised by the plan"


def test_plan_values_follow_the_rules():
    cfg = _cfg("ressformer", {"moe.shared_experts": 1})
    torch.manual_seed(0)
    model = build_model(cfg)
    sd = dict(model.named_parameters())
    depth = cfg.r2mu.n_prelude + cfg.r2mu.steps + cfg.r2mu.n_coda
    out_std = cfg.init_std / math.sqrt(2 * depth)
    for name, p in sd.items():
        if "layernorm" in name or name.endswith(("graph_scale", "norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("memory.gate.bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.numel() >= 256:
            want = out_std if ("o_proj" in name or "down_proj" in name) else cfg.init_std
            assert abs(p.std().item() - want) < 0.25 * want, (name, p.std().item(), want)


def test_check_plan_names_what_is_wrong():
    model = build_model(_cfg("ressformer", {}))
    plan = model.init_plan()
    with pytest.raises(ValueError, match=r"missing \['model.embed_tokens.weight'\]"):
        check_plan(model, plan[1:])
    with pytest.raises(ValueError, match="repeated"):
        check_plan(model, plan + plan[:1])
    with pytest.raises(ValueError, match="not parameters"):
        check_plan(model, plan + [("model.nope", plan[0][1])])


@pytest.mark.parametrize("arch,over", [VARIANTS[0], VARIANTS[1], VARIANTS[7]])
def test_trainer_seeded_init_equals_init_weights(arch, over):
    run = RunConfig(model="debug", model_overrides={"arch": arch, **over}, seed=5, wandb={"mode": "disabled"})
    built = build_model_for(run, {"zero_optimization": {"stage": 1}})
    torch.manual_seed(123)  # the seed the model is built under does not matter: the plan reseeds
    ref = build_model(run.model_config())
    torch.manual_seed(5)
    ref.init_weights()
    for (n, p), (_, q) in zip(built.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    if over.get("tie_embeddings"):
        assert built.lm_head.weight is built.model.embed_tokens.weight


def test_init_state_loads_and_rejects_a_foreign_state():
    cfg = _cfg("ressformer", {})
    torch.manual_seed(1)
    src = build_model(cfg).state_dict()
    model = build_model(cfg)
    set_initial_weights(model, 0, init_state=src)
    for k, v in model.state_dict().items():
        assert torch.equal(v, src[k]), k
    bad = dict(src)
    del bad["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        set_initial_weights(model, 0, init_state=bad)
    bad = {**src, "model.extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['model.extra'\]"):
        set_initial_weights(model, 0, init_state=bad)
    bad = {**src, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\)"):
        set_initial_weights(model, 0, init_state=bad)
    for k, v in model.state_dict().items():  # a rejected state changed nothing
        assert torch.equal(v, src[k]), k
