"""MoE expert parallelism for the DeepSpeed trainer (the expert-level sparsity of ASAM, paper sec. 3.2).

The model package stays single-device: `prepare_expert_parallel` applies one of three backends right before
`deepspeed.initialize`, chosen by the DeepSpeed JSON, and `param_groups_for` gives the optimizer its groups.
- `autoep` (`"expert_parallel": {"enabled": true}`, ZeRO-3): DeepSpeed AutoEP replaces each `model.layers.N.mlp`
  MoE block (mixtral preset: same softmax -> top-k -> renormalise routing). It returns no router logits, so a
  forward pre-hook sets the attributes its `_finalize_output` reads to return `(output, raw router logits)`; the
  model's own balance / z losses use them (AutoEP's `load_balance_coeff` is refused).
- `native` (`"native_moe": {"enabled": true, "ep_size": N}`, ZeRO-1/2; our key): each block becomes a
  `NativeMoEBlock` around `deepspeed.moe.layer.MoE`, dropless, no random token selection; top-1 is refused
  (DeepSpeed weights one expert by p, ours by 1); DeepSpeed's `l_aux` is discarded for the model's losses.
- `none`: the experts are replicated and ZeRO-partitioned like any weight.
Our experts are fused 3-D parameters gathered whole on every call, so a rank whose tokens skip an expert still
joins its gathers (the upstream MoE + ZeRO-3 hang); `set_z3_leaf_modules` is not used (a leaf called K times
per forward trips a ZeRO-3 bucket assertion in deepspeed 0.19.8). Impossible combinations fail in
`resolve_plan`, before any collective, naming the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.ds_config import zero_stage

NATIVE_KEY = "native_moe"  # our DeepSpeed-JSON block for the native backend
AUTOEP_KEY = "expert_parallel"  # DeepSpeed's AutoEP block
_NATIVE_PREFIX = "moe.deepspeed_moe."  # NativeMoEBlock -> deepspeed.moe.layer.MoE -> MOELayer


# --- plan and validation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertParallelPlan:
    backend: str  # none | autoep | native
    ep_size: int
    zero_stage: int


def resolve_plan(model_cfg, ds: dict, world_size: int) -> ExpertParallelPlan:
    """Backend and EP size from the DeepSpeed JSON; every impossible combination raises ValueError here."""
    stage = zero_stage(ds)
    ep_block = ds.get(AUTOEP_KEY) or {}
    nat_block = ds.get(NATIVE_KEY) or {}
    autoep, native = bool(ep_block.get("enabled", False)), bool(nat_block.get("enabled", False))
    E, k = model_cfg.moe.num_experts, model_cfg.moe.experts_per_token
    if autoep and native:
        raise ValueError(f"DeepSpeed JSON enables both '{AUTOEP_KEY}' (AutoEP) and '{NATIVE_KEY}' (native MoE): "
                         f"keep one (ds_configs/zero3_autoep.json or ds_configs/zero2_moe.json)")
    if not (autoep or native):
        return ExpertParallelPlan("none", 1, stage)
    backend = "autoep" if autoep else "native"
    if E == 1:
        raise ValueError(f"expert parallelism ({backend}) requested but the model is dense (moe.num_experts=1): "
                         f"use a dense DeepSpeed JSON (ds_configs/zero3.json or zero1.json) or set "
                         f"model_overrides moe.num_experts > 1")
    ep = int(ep_block.get("autoep_size", 1) if autoep else nat_block.get("ep_size", 1))
    key = f"{AUTOEP_KEY}.autoep_size" if autoep else f"{NATIVE_KEY}.ep_size"
    if ep < 1 or E % ep:
        raise ValueError(f"{key}={ep} does not divide moe.num_experts={E}: choose an ep size that divides the "
                         f"number of experts")
    if world_size % ep:
        raise ValueError(f"{key}={ep} does not divide the world size {world_size}: launch a multiple of {ep} "
                         f"ranks or lower {key}")
    if native:
        if stage >= 3:
            raise ValueError("native DeepSpeed MoE cannot run under ZeRO-3: use ds_configs/zero3_autoep.json "
                             "(AutoEP) or a zero stage <= 2")
        if k == 1:
            raise ValueError("native DeepSpeed MoE with moe.experts_per_token=1 would weight each token's expert "
                             "by its softmax probability (DeepSpeed top1gating) where ReSSFormer renormalises to 1: "
                             "use experts_per_token >= 2 or the AutoEP backend (ds_configs/zero3_autoep.json)")
        return ExpertParallelPlan("native", ep, stage)
    # AutoEP
    if ep_block.get("load_balance_coeff") is not None:
        raise ValueError(f"{AUTOEP_KEY}.load_balance_coeff={ep_block['load_balance_coeff']!r}: AutoEP refuses its "
                         f"own balance loss; remove the key, ReSSFormer adds moe.aux_loss_coef * balance from the "
                         f"router logits")
    if stage != 3:
        raise ValueError(f"AutoEP is set up here for ZeRO-3 (zero stage {stage} given): use "
                         f"ds_configs/zero3_autoep.json, or ds_configs/zero2_moe.json (native MoE) for stage <= 2")
    zo = ds.get("zero_optimization", {})
    forbidden = {"zero_hpz_partition_size": int(zo.get("zero_hpz_partition_size", 1)) > 1,
                 "zero_quantized_gradients": bool(zo.get("zero_quantized_gradients", False)),
                 "expert_tensor_parallel_size": int(ep_block.get("expert_tensor_parallel_size", 1)) > 1,
                 "sequence_parallel_size": int(ds.get("sequence_parallel_size", 1)) > 1}
    bad = [n for n, on in forbidden.items() if on]
    if bad:
        raise ValueError(f"AutoEP under ZeRO-3 forbids {bad} (hpZ, quantized gradients, expert tensor parallelism, "
                         f"sequence parallelism): remove them from the DeepSpeed JSON")
    top_k = ep_block.get("top_k", "auto")
    if top_k not in ("auto", None) and int(top_k) != k:
        raise ValueError(f"{AUTOEP_KEY}.top_k={top_k} differs from moe.experts_per_token={k}: set \"top_k\": "
                         f"\"auto\" (filled from the model) or {k}")
    if model_cfg.moe.shared_experts:
        raise ValueError(f"AutoEP with moe.shared_experts={model_cfg.moe.shared_experts} is not supported (the "
                         f"replaced layer calls shared experts expecting a tensor, ours return (y, None)): set "
                         f"moe.shared_experts: 0 or use native MoE (ds_configs/zero2_moe.json)")
    widths = {"d_model": model_cfg.d_model, "ffn_hidden": model_cfg.ffn_hidden}
    if ep_block.get("use_grouped_mm", True) and any(w % 8 for w in widths.values()):
        raise ValueError(f"{AUTOEP_KEY}.use_grouped_mm (DeepSpeed's default) runs torch._grouped_mm, which needs "
                         f"16-byte rows: {widths} must be multiples of 8 (bfloat16); change them or set "
                         f"\"use_grouped_mm\": false (one matmul per expert)")
    return ExpertParallelPlan("autoep", ep, stage)


# --- helpers -------------------------------------------------------------------------------------------------
def _is_moe_block(m: nn.Module) -> bool:
    w = getattr(getattr(m, "experts", None), "gate_up_proj", None)
    return (isinstance(getattr(m, "gate", None), nn.Linear) and isinstance(w, nn.Parameter)
            and len(getattr(w, "ds_shape", w.shape)) == 3)  # ZeRO-3 partitions hold a 1-D shard; ds_shape is full


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every routed MoE block: a `gate` nn.Linear router and fused 3-D `experts` weights."""
    return [(n, m) for n, m in model.named_modules() if _is_moe_block(m)]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --- native DeepSpeed-MoE -------------------------------------------------------------------------------------
class _SwiGLUExpert(nn.Module):
    """One expert in DeepSpeed-MoE's per-expert layout: gate_up_proj.weight [2F, D], down_proj.weight [D, F]."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., F) each: first F rows = gate, as in ressformer.moe
        return self.down_proj(F.silu(gate) * up)


class NativeMoEBlock(nn.Module):
    """Our MoE block on `deepspeed.moe.layer.MoE` (dropless, routing equal to ours for k >= 2).

    forward(x (B, T, D)) -> (y (B, T, D), router_logits (B*T, E)), the same contract as `ressformer.moe`.
    Keys: `moe.deepspeed_moe.gate.wg.weight` [E, D], `moe.deepspeed_moe.experts.deepspeed_experts.{l}.
    {gate_up_proj,down_proj}.weight` for the local experts l (global id ep_rank * E_local + l), and our
    `shared_experts.*` unchanged.
    """

    def __init__(self, src: nn.Module, num_experts: int, top_k: int, ep_size: int, ep_rank: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        E, two_f, d = tuple(src.experts.gate_up_proj.shape)
        f = two_f // 2
        if E != num_experts:
            raise ValueError(f"MoE block has {E} experts but moe.num_experts={num_experts}")
        self.num_experts, self.ep_size, self.ep_rank = E, ep_size, ep_rank
        self.moe = MoE(hidden_size=d, expert=_SwiGLUExpert(d, f), num_experts=E, ep_size=ep_size, k=top_k,
                       capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                       use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False)
        self.shared_experts = getattr(src, "shared_experts", None)
        local = to_native_layout({"gate.weight": src.gate.weight.detach(),
                                  "experts.gate_up_proj": src.experts.gate_up_proj.detach(),
                                  "experts.down_proj": src.experts.down_proj.detach()}, E, ep_size, ep_rank)
        own = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in local.items():
                own[k].copy_(v)

    def forward(self, x: torch.Tensor):
        B, T, D = x.shape
        y, _l_aux, _counts = self.moe(x)  # (B, T, D); DeepSpeed's l_aux is not used (ours from the logits)
        logits = F.linear(x.reshape(-1, D), self.moe.deepspeed_moe.gate.wg.weight)  # (B*T, E), with grad to wg
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)[0]
        return y, logits


def _native_keys(prefix: str, l: int) -> tuple[str, str]:
    e = f"{prefix}{_NATIVE_PREFIX}experts.deepspeed_experts.{l}."
    return e + "gate_up_proj.weight", e + "down_proj.weight"


def to_native_layout(state_dict: dict, num_experts: int, ep_size: int = 1, ep_rank: int = 0) -> dict:
    """Fused ressformer MoE keys -> NativeMoEBlock keys of EP rank `ep_rank` (other keys pass unchanged).

    For every block prefix P (ending in "." or empty):
      P gate.weight [E, D]               -> P moe.deepspeed_moe.gate.wg.weight [E, D]
      P experts.gate_up_proj [E, 2F, D]  -> P moe.deepspeed_moe.experts.deepspeed_experts.{l}.gate_up_proj.weight
                                            = gate_up_proj[ep_rank * E_local + l]  ([2F, D]), l < E_local = E / ep
      P experts.down_proj [E, D, F]      -> ... .{l}.down_proj.weight = down_proj[ep_rank * E_local + l]  ([D, F])
    """
    if num_experts % ep_size or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_size={ep_size}, ep_rank={ep_rank} invalid for num_experts={num_experts}")
    n_local = num_experts // ep_size
    out = {}
    for k, v in state_dict.items():
        m = re.fullmatch(r"(.*?)(gate\.weight|experts\.gate_up_proj|experts\.down_proj)", k)
        if m is None or f"{m.group(1)}experts.gate_up_proj" not in state_dict:
            out[k] = v
            continue
        p, what = m.groups()
        if what == "gate.weight":
            out[f"{p}{_NATIVE_PREFIX}gate.wg.weight"] = v
            continue
        for l in range(n_local):
            gu_key, dn_key = _native_keys(p, l)
            out[gu_key if what == "experts.gate_up_proj" else dn_key] = v[ep_rank * n_local + l]
    return out


def from_native_layout(state_dicts: list[dict] | dict) -> dict:
    """Inverse of `to_native_layout`: NativeMoEBlock keys of every EP rank (a list ordered by EP rank, or one
    dict when ep_size = 1) -> fused keys `gate.weight`, `experts.gate_up_proj` [E, 2F, D], `experts.down_proj`
    [E, D, F]. Non-expert tensors are taken from the first dict (they are replicated)."""
    sds = [state_dicts] if isinstance(state_dicts, dict) else list(state_dicts)
    pat = re.compile(r"(.*?)" + re.escape(_NATIVE_PREFIX) + r"experts\.deepspeed_experts\.(\d+)\.(gate_up_proj|down_proj)\.weight")
    out, experts = {}, {}  # experts[(prefix, which)][global id] = tensor
    for r, sd in enumerate(sds):
        n_local = 1 + max((int(m.group(2)) for k in sd if (m := pat.fullmatch(k))), default=-1)
        for k, v in sd.items():
            m = pat.fullmatch(k)
            if m:
                p, l, which = m.group(1), int(m.group(2)), m.group(3)
                experts.setdefault((p, which), {})[r * n_local + l] = v
            elif r == 0:
                g = re.fullmatch(r"(.*?)" + re.escape(_NATIVE_PREFIX) + r"gate\.wg\.weight", k)
                out[f"{g.group(1)}gate.weight" if g else k] = v
    for (p, which), by_id in experts.items():
        ids, n_gate = sorted(by_id), out[f"{p}gate.weight"].shape[0]  # the router has one row per expert
        if ids != list(range(n_gate)):
            raise ValueError(f"{p}: expert ids {ids} are not 0..E-1 (E={n_gate} router rows); pass the state dicts "
                             f"of every EP rank, in EP-rank order")
        out[f"{p}experts.{which}"] = torch.stack([by_id[i] for i in ids])  # (E, 2F, D) or (E, D, F)
    return out


def from_autoep_layout(state_dicts: list[dict] | dict) -> dict:
    """AutoEP-replaced model state dicts (one per EP rank, in EP-rank order) -> fused ressformer keys.

    deepspeed 0.19.8 AutoEPMoELayer keys for a block P: `P router.gate.weight` [E, D] (+ the alias
    `P gate.gate.weight`, the same tensor, dropped), `P experts.w1` [E_local, F, D] (gate half), `P experts.w3`
    [E_local, F, D] (up half), `P experts.w2` [E_local, D, F]; rank r holds experts r * E_local + l. Fused:
    gate_up_proj = cat(w1, w3, dim=1) over all ranks (gate rows first), down_proj = w2.
    """
    sds = [state_dicts] if isinstance(state_dicts, dict) else list(state_dicts)
    pat = re.compile(r"(.*?)experts\.(w1|w2|w3)")
    out, parts = {}, {}
    for r, sd in enumerate(sds):
        for k, v in sd.items():
            m = pat.fullmatch(k)
            if m:
                parts.setdefault((m.group(1), m.group(2)), [None] * len(sds))[r] = v
            elif r == 0 and not k.endswith("gate.gate.weight"):
                out[k[: -len("router.gate.weight")] + "gate.weight" if k.endswith("router.gate.weight") else k] = v
    for (p, which), per in list(parts.items()):
        if which == "w3":
            continue
        full = torch.cat(per)  # (E, F, D) / (E, D, F); (E, 2F, D) when AutoEP keeps gate_up fused in w1
        if which == "w1":
            w3 = parts.get((p, "w3"))
            out[f"{p}experts.gate_up_proj"] = full if w3 is None else torch.cat([full, torch.cat(w3)], dim=1)
        else:
            out[f"{p}experts.down_proj"] = full
    return out


# --- AutoEP ---------------------------------------------------------------------------------------------------
def _autoep_layers(model: nn.Module):
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]


def _autoep_return_router_logits(model: nn.Module, block_cls: type, n_blocks: int):
    """Forward pre-hook: make every AutoEPMoELayer return (output, raw router logits) -- see module docstring."""
    state = {"done": False}

    def hook(module, args):
        if state["done"]:
            return None
        leftover = [n for n, m in module.named_modules() if type(m) is block_cls]
        layers = _autoep_layers(module)
        if leftover or len(layers) != n_blocks:
            raise RuntimeError(f"AutoEP replaced {len(layers)} of {n_blocks} MoE blocks (left: {leftover}): the block "
                               f"paths must match expert_parallel.moe_layer_pattern (mixtral preset: "
                               f"model\\.layers\\.\\d+\\.mlp) with router 'gate' and experts 'experts'")
        for layer in layers:
            layer.return_router_logits = True
            layer.router_logits_capture_target = "router"
            layer.router_logits_capture_mode = "raw"
        state["done"] = True
        return None

    return model.register_forward_pre_hook(hook)


# --- entry points ---------------------------------------------------------------------------------------------
def prepare_expert_parallel(model: nn.Module, ds_config: dict) -> nn.Module:
    """Apply the backend named by `ds_config` to `model` (call right before `deepspeed.initialize`).

    Fills `expert_parallel.top_k` from the model when "auto"/absent. Returns the (possibly modified) model.
    torch.distributed must be initialised (the world size and EP rank are read from it).
    """
    import torch.distributed as dist

    cfg = model.config
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    plan = resolve_plan(cfg, ds_config, world)
    blocks = moe_blocks(model)
    if cfg.moe.num_experts > 1 and not blocks:
        raise RuntimeError("moe.num_experts > 1 but no MoE block (router 'gate', fused 'experts') was found in the model")
    if plan.backend == "autoep":
        ds_config[AUTOEP_KEY]["top_k"] = cfg.moe.experts_per_token
        _autoep_return_router_logits(model, type(blocks[0][1]), len(blocks))
    elif plan.backend == "native":
        ep_rank = rank % plan.ep_size  # DeepSpeed's EP groups: consecutive ranks form one EP group
        for name, blk in blocks:
            _set(model, name, NativeMoEBlock(blk, cfg.moe.num_experts, cfg.moe.experts_per_token, plan.ep_size, ep_rank))
    model._expert_parallel_plan = plan
    return model


def expert_parallel_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers expert parallelism put in (DeepSpeed's AutoEP layers, NativeMoEBlock): they exchange tokens
    between ranks."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [m for m in model.modules() if isinstance(m, (NativeMoEBlock, AutoEPMoELayer))]


def param_groups_for(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Optimizer groups for `model`: native-MoE expert params get their own `moe: True` groups (DeepSpeed
    requires them for ZeRO-1/2 with MoE); other backends return `groups` unchanged."""
    if not any(getattr(p, "allreduce", True) is False for p in model.parameters()):  # deepspeed's is_moe_param
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


__all__ = ["ExpertParallelPlan", "resolve_plan", "prepare_expert_parallel", "param_groups_for", "NativeMoEBlock",
           "expert_parallel_layers",
           "from_autoep_layout",
           "to_native_layout", "from_native_layout", "moe_blocks", "NATIVE_KEY", "AUTOEP_KEY"]
