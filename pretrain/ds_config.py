"""The DeepSpeed JSON: completed from the run config, and read in one place.

- `build_ds_config`: the batch fields (train_batch_size = micro_batch * grad_accum * world_size,
  train_micro_batch_size_per_gpu, gradient_accumulation_steps), gradient clipping and precision come from the run
  config, never from the JSON (a JSON that sets a batch field to another value is an error naming the fix).
- `zero_stage`, `ds_settings`: what the rest of the code reads from a JSON (the ZeRO stage, stage-3 live
  parameters, the AutoEP size), so a key's default is decided once.
"""

from __future__ import annotations

import json

import torch


def zero_stage(ds: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization block)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def ds_settings(ds: dict) -> dict:
    """ZeRO stage, stage3_max_live_parameters and the AutoEP size of a DeepSpeed config (memory estimate)."""
    zo = ds.get("zero_optimization") or {}
    ep = ds.get("expert_parallel") or {}
    return {"zero_stage": zero_stage(ds),
            "max_live_parameters": float(zo.get("stage3_max_live_parameters", 1e9)),
            "ep_size": int(ep.get("autoep_size", 1)) if ep.get("enabled", False) else 1}


def load_ds_json(path: str) -> dict:
    """Read a DeepSpeed JSON; a missing file or bad JSON raises ValueError naming the file."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--ds_config {path}: no such file (the shipped ones are in ds_configs/)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--ds_config {path} is not readable JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"--ds_config {path}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    return ds


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on a GPU with bf16, else fp32; fp32 / bf16 as given."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def build_ds_config(ds_json: dict, run, world_size: int) -> dict:
    """The DeepSpeed config of `run` (a RunConfig) on `world_size` ranks: the JSON with the derived fields set."""
    ds = json.loads(json.dumps(ds_json))
    for k, v in run.ds_batch_fields(world_size).items():
        if k in ds and ds[k] not in (v, "auto"):
            raise ValueError(f"DeepSpeed JSON sets {k}={ds[k]} but the run config gives {v} (micro_batch="
                             f"{run.micro_batch}, grad_accum={run.grad_accum}, world_size={world_size}): "
                             f"remove {k} from the JSON, the engine derives it")
        ds[k] = v
    ds["gradient_clipping"] = run.grad_clip
    prec = resolve_precision(run.precision)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": prec == "bf16"}
    ds.pop("fp16", None)
    return ds
