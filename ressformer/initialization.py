"""Initialisation plans: a model's initialisation as an ordered list of (parameter name, in-place init).

    plan = model.init_plan()          # [("model.embed_tokens.weight", fn), ...], every parameter once
    run_plan(model, plan)             # what model.init_weights() does after re-tying embeddings

Why a list and not one function: under ZeRO-3 the parameters are partitioned across ranks, and the trainer
(pretrain/engine.py) initialises them one at a time (gather one parameter, init it on rank 0, re-partition),
so no rank ever holds the whole model. The plan's order is the order random numbers are drawn in, so a
seeded plan gives the same weights however it is run (one process, ZeRO-1/2/3, any world size).

Rules shared by both architectures' blocks (`layer_rules`): norms (names containing "layernorm") ones,
ASAM's graph_scale (gamma_h) ones, output projections (o_proj, down_proj) N(0, out_std), everything else
N(0, std); bias vectors are named by their module's own plan (R2MU memory's gate bias: zeros).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

InitFn = Callable[[torch.Tensor], object]
Plan = list[tuple[str, InitFn]]


def normal(std: float) -> InitFn:
    return lambda p: nn.init.normal_(p, mean=0.0, std=std)


def ones(p: torch.Tensor) -> object:
    return nn.init.ones_(p)


def zeros(p: torch.Tensor) -> object:
    return nn.init.zeros_(p)


def layer_rules(prefix: str, module: nn.Module, std: float, out_std: float) -> Plan:
    """Plan for a block's parameters in named_parameters order, by name (see the module docstring)."""
    plan = []
    for name, _ in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "layernorm" in name or leaf == "graph_scale":
            fn = ones
        elif "o_proj" in name or "down_proj" in name:
            fn = normal(out_std)
        else:
            fn = normal(std)
        plan.append((prefix + name, fn))
    return plan


def check_plan(model: nn.Module, plan: Plan) -> None:
    """The plan names every parameter of `model` (de-duplicated, as named_parameters gives them) exactly once."""
    names = [n for n, _ in plan]
    params = [n for n, _ in model.named_parameters()]
    dup = sorted({n for n in names if names.count(n) > 1})
    missing, unknown = sorted(set(params) - set(names)), sorted(set(names) - set(params))
    if dup or missing or unknown:
        raise ValueError(f"{type(model).__name__}.init_plan() is out of step with its parameters: "
                         f"missing {missing}, not parameters {unknown}, repeated {dup}")


@torch.no_grad()
def run_plan(model: nn.Module, plan: Plan) -> None:
    """Run every step of the plan on `model`'s own parameters, in order."""
    params = dict(model.named_parameters())
    for name, fn in plan:
        fn(params[name])
