"""One rank of the expert-parallel checks (tests/pretrain/test_expert_parallel.py), launched as real gloo CPU ranks.

The model is a tiny causal LM whose FFNs are `ressformer.moe` MoE blocks at the paths AutoEP detects
(`model.layers.N.mlp`), with the R2MU pattern of reuse: layer 1 (the "core") runs twice per forward. Its loss
is CE + aux_coef * balance + z_coef * z, the balance/z losses computed from the router logits every mlp call
returns (`ressformer.moe.moe_aux_losses`), as in `ressformer.model`. For each case this rank runs one
DeepSpeed step on its slice of the global batch (through `pretrain.expert_parallel`), and rank 0 writes
{case: {loss, grad_norm, state (full, fused layout), aux, load, n_router_logits}} to OUT.

argv: IN.pt OUT.pt; IN holds {"input_ids", "cfg", "cases": [{name, ds, aux_coef, state}]}; a case with
"engine": True instead runs the real model through `pretrain.engine.build_engine` ({name, run, ds, num_steps,
state}).
"""

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.append(_REPO)  # after PYTHONPATH, so the launcher's PYTHONPATH decides

from ressformer import kernels  # noqa: E402
from ressformer.config import ModelConfig  # noqa: E402

LR, EPS, WD, CLIP, Z_COEF = 1e-2, 1e-3, 0.1, 1.0, 1e-3


class _Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from ressformer.moe import make_mlp

        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model)
        self.mlp = make_mlp(cfg)

    def forward(self, x):  # (B, T, D)
        y, logits = self.mlp(self.post_attention_layernorm(x))
        return x + y, logits


class _Inner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([_Block(cfg) for _ in range(2)])
        self.norm = nn.RMSNorm(cfg.d_model)


class TinyMoELM(nn.Module):
    """embed -> layer 0 -> layer 1 (twice, the shared core) -> norm -> lm_head."""

    def __init__(self, cfg: ModelConfig, aux_coef: float = 0.01):
        super().__init__()
        self.config, self.aux_coef = cfg, aux_coef
        self.model = _Inner(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.last = {}

    def forward(self, ids):  # (B, T)
        from ressformer.moe import moe_aux_losses

        x = self.model.embed_tokens(ids)  # (B, T, D)
        logits_all = []
        for layer in (self.model.layers[0], self.model.layers[1], self.model.layers[1]):
            x, rl = layer(x)
            logits_all.append(rl)
        if any(rl is None for rl in logits_all):
            raise RuntimeError("an MoE layer returned no router logits")
        out = self.lm_head(self.model.norm(x))  # (B, T, V)
        ce = F.cross_entropy(out[:, :-1].reshape(-1, out.size(-1)), ids[:, 1:].reshape(-1))
        k, E = self.config.moe.experts_per_token, self.config.moe.num_experts
        aux = [moe_aux_losses(rl, k, E) for rl in logits_all]
        bal = torch.stack([a["balance"] for a in aux]).mean()
        z = torch.stack([a["z"] for a in aux]).mean()
        self.last = {"balance": bal.detach(), "load": torch.stack([a["load"] for a in aux]).detach(),
                     "n_router_logits": [tuple(rl.shape) for rl in logits_all]}
        return ce + self.aux_coef * bal + Z_COEF * z


def param_groups(model):
    decay = [p for n, p in model.named_parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (len(getattr(p, "ds_shape", p.shape)) >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]


def reference_step(cfg, state, ids, world, aux_coef):
    """Plain torch, one process: mean of the per-rank losses (the balance loss is a per-batch statistic, as on
    every data-parallel rank), clip, AdamW."""
    model = TinyMoELM(cfg, aux_coef)
    model.load_state_dict(state)
    opt = torch.optim.AdamW(param_groups(model), lr=LR, eps=EPS)
    loss = torch.stack([model(x) for x in ids.chunk(world)]).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss.item(), norm.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(inp: str, outp: str) -> None:
    import deepspeed

    from pretrain import expert_parallel as xp

    from pretrain.distributed import skip_deepspeed_shm_allreduce

    spec = torch.load(inp, weights_only=False)
    skip_deepspeed_shm_allreduce()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig.from_dict(spec["cfg"])
    results = {}
    for case in spec["cases"]:
        kernels.set_moe_experts(case.get("moe_experts", "auto"))
        if case.get("engine"):
            results[case["name"]] = _engine_case(case, spec["input_ids"], rank, world)
            continue
        ds = dict(case["ds"], train_micro_batch_size_per_gpu=spec["input_ids"].shape[0] // world,
                  gradient_accumulation_steps=1, train_batch_size=spec["input_ids"].shape[0],
                  gradient_clipping=CLIP)
        state = case["state"]
        stage = ds["zero_optimization"]["stage"]
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds):
                model = TinyMoELM(cfg, case["aux_coef"])
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                if rank == 0:
                    model.load_state_dict(state)
        else:
            model = TinyMoELM(cfg, case["aux_coef"])
            model.load_state_dict(state)
        model = xp.prepare_expert_parallel(model, ds)
        plan = model._expert_parallel_plan
        opt = torch.optim.AdamW(xp.param_groups_for(model, param_groups(model)), lr=LR, eps=EPS)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        ids = spec["input_ids"].chunk(world)[rank]
        loss = engine(ids)
        engine.backward(loss)
        engine.step()
        gnorm = float(engine.get_global_grad_norm())
        lt = torch.tensor([loss.item()])
        dist.all_reduce(lt)
        m = engine.module
        with deepspeed.zero.GatheredParameters(list(m.parameters())) if stage == 3 else contextlib.nullcontext():
            sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
        if plan.backend == "native":
            per = [None] * world
            dist.all_gather_object(per, sd)
            sd = xp.from_native_layout(per[:plan.ep_size])
        elif plan.backend == "autoep":
            per = [None] * world
            dist.all_gather_object(per, sd)
            sd = xp.from_autoep_layout(per[:plan.ep_size])
        load = m.last["load"].clone()
        dist.all_reduce(load)
        results[case["name"]] = {"loss": lt.item() / world, "grad_norm": gnorm, "state": sd,
                                 "balance": m.last["balance"].item(), "load": (load / world).tolist(),
                                 "n_router_logits": m.last["n_router_logits"], "backend": plan.backend,
                                 "module_types": sorted({type(x).__name__ for x in m.modules()}),
                                 "grouped_mm": sorted({bool(x.use_grouped_mm) for x in m.modules()
                                                       if hasattr(x, "use_grouped_mm")})}
        if rank == 0:
            print(f"[ep_worker] {case['name']}: loss {results[case['name']]['loss']:.6f} grad_norm {gnorm:.6f}",
                  flush=True)
        engine.destroy()
        del engine, model, opt
    if rank == 0:
        torch.save(results, outp)
    dist.barrier()
    dist.destroy_process_group()  # every rank together (a rank exiting under a live gloo group can abort)


def _engine_case(case, input_ids, rank, world) -> dict:
    """The product path: `pretrain.engine.build_engine` (zero.Init, prepare_expert_parallel, param_groups_for,
    deepspeed.initialize) on the real ReSSFormer, one step on this rank's slice; full fused state back."""
    import deepspeed

    from pretrain import expert_parallel as xp
    from pretrain import engine as engines
    from pretrain.ds_config import zero_stage
    from pretrain.config import RunConfig

    run = RunConfig.from_dict(case["run"])
    engine, _, _, ds = engines.build_engine(run, case["ds"], init_state=case["state"])
    ids = input_ids.chunk(world)[rank]
    o = engine(ids, labels=ids, num_steps=case["num_steps"])
    engine.backward(o.loss)
    engine.step()
    lt = torch.tensor([o.loss.item()])
    dist.all_reduce(lt)
    m, plan = engine.module, engine.module._expert_parallel_plan
    gather = zero_stage(ds) == 3
    with deepspeed.zero.GatheredParameters(list(m.parameters())) if gather else contextlib.nullcontext():
        sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    if plan.backend != "none":
        per = [None] * world
        dist.all_gather_object(per, sd)
        conv = xp.from_native_layout if plan.backend == "native" else xp.from_autoep_layout
        sd = conv(per[:plan.ep_size])
    out = {"loss": lt.item() / world, "grad_norm": float(engine.get_global_grad_norm()), "state": sd,
           "aux": {k: float(v) for k, v in o.aux_losses.items()}, "backend": plan.backend,
           "module_types": sorted({type(x).__name__ for x in m.modules()})}
    if rank == 0:
        print(f"[ep_worker] {case['name']}: loss {out['loss']:.6f} aux {out['aux']}", flush=True)
    engine.destroy()
    return out


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests.helpers.dist dumps stacks of a hung rank
    main(sys.argv[1], sys.argv[2])
