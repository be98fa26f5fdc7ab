"""Building the DeepSpeed engine of a run: model, initial weights, optimizer, schedule, expert parallelism.

- The model package stays single-device; DeepSpeed is applied here. ZeRO-3 builds the model under
  `deepspeed.zero.Init`; `set_initial_weights` then sets every parameter from the seed (the model's `init_plan()`)
  or from a state dict, one gathered parameter at a time, so a seed gives the same weights under any ZeRO stage
  and world size. Expert parallelism is applied by `pretrain.expert_parallel` right before `deepspeed.initialize`.
- Optimizer: torch AdamW (decay on >= 2-D weights except embeddings) + LambdaLR (warmup, cosine or linear decay
  to min_lr), the same objects a plain torch run uses as the parity reference. Activation checkpointing: torch's
  non-reentrant checkpoint at every `every`-th recurrent step.
- `layout`: world size, ZeRO stage and expert-parallel backend / size, recorded in every checkpoint's manifest
  and compared on resume.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import ConfigError, RunConfig
from pretrain.ds_config import build_ds_config, zero_stage


# --- optimizer / schedule -------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions hold a 1-D shard
        (decay if ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


DECAY_SHAPES = {"linear": lambda f: 1 - f, "cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f)),
                "1-sqrt": lambda f: 1 - math.sqrt(f)}  # fraction f of the decay done -> fraction of (lr - min_lr) left


def decay_steps(run: RunConfig) -> int:
    """Steps of the decay at the end of a warmup-stable-decay (wsd) run: decay_steps, else decay_fraction x steps."""
    return run.decay_steps or max(1, round(run.decay_fraction * run.steps))


def lr_lambda(run: RunConfig, step: int) -> float:
    """Multiplier of run.lr at optimizer step `step` (0-based): linear warmup, then
    cosine / linear: decay from lr to min_lr between warmup_steps and steps;
    wsd: lr until the last `decay_steps(run)` steps, then decay to min_lr with `decay_shape` (linear, cosine or
    1-sqrt). A pure function of the step: exact across resume, and a cool-down branch from any stable-phase
    checkpoint (a run resumed from it with a later decay) follows the same curve up to its branch point."""
    if run.warmup_steps and step < run.warmup_steps:
        return (step + 1) / run.warmup_steps
    floor = run.min_lr / run.lr
    if run.decay == "wsd":
        start = run.steps - decay_steps(run)
        if step < start:
            return 1.0
        frac, shape = min(1.0, (step - start) / max(1, run.steps - start)), DECAY_SHAPES[run.decay_shape]
    else:
        frac = min(1.0, (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps))
        shape = DECAY_SHAPES[run.decay]
    return floor + (1 - floor) * shape(frac)


def build_optimizer(model, run: RunConfig):
    from pretrain.expert_parallel import param_groups_for  # native MoE experts need their own `moe` groups

    groups = param_groups_for(model, param_groups(model, run.weight_decay))
    opt = torch.optim.AdamW(groups, lr=run.lr, betas=tuple(run.betas), eps=run.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_lambda, run))
    return opt, sched


def checkpoint_fn(function, *args):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


# --- model and engine ------------------------------------------------------------------------------
def build_model_for(run: RunConfig, ds: dict, init_state: dict | None = None, *, compile_now: bool = True):
    """Build the model (under zero.Init for ZeRO-3), initialise it from the seed (or `init_state`), set activation
    checkpointing and, with `compile: true` and `compile_now`, compile its units (`compile_model`; ZeRO-1/2/3, with
    or without checkpointing). `build_engine` compiles expert-parallel models itself, after DeepSpeed has put its
    MoE layers in."""
    from ressformer import build_model

    cfg = run.model_config()
    zero3 = zero_stage(ds) == 3
    if zero3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = build_model(cfg)
    else:
        model = build_model(cfg)
    set_initial_weights(model, run.seed, init_state, partitioned=zero3)
    if run.activation_checkpointing.enabled:
        model.set_checkpointing(checkpoint_fn, every=run.activation_checkpointing.every)
    if run.compile and compile_now:
        compile_model(model, run)
    return model


def compile_model(model, run: RunConfig) -> None:
    """torch.compile the model's repeated units (`CausalLM.compile_units`) with `compile_mode` and
    `compile_cpp_wrapper` (`compile_kwargs`). Expert-parallel MoE layers (DeepSpeed's AutoEP layer, our
    NativeMoEBlock) stay eager: they move tokens between ranks with all-to-alls that Dynamo would have to trace, and
    DeepSpeed's own compile of AutoEP (`compile.autoep_non_moe`) refuses ZeRO-3; so a recurrent step is two graphs
    around its MoE layer there, one graph without expert parallelism."""
    from pretrain.expert_parallel import expert_parallel_layers

    for layer in expert_parallel_layers(model):
        layer.forward = torch.compiler.disable(layer.forward)
    model.compile_units(**compile_kwargs(run))


def compile_kwargs(run: RunConfig) -> dict:
    """torch.compile's keyword arguments for `compile_mode` and `compile_cpp_wrapper` (RunConfig refuses both set)."""
    if run.compile_cpp_wrapper:
        return {"options": {"cpp_wrapper": True}}
    return {} if run.compile_mode == "default" else {"mode": run.compile_mode}


@torch.no_grad()
def set_initial_weights(model: torch.nn.Module, seed: int, init_state: dict | None = None,
                          partitioned: bool = False) -> None:
    """Set every parameter from the seed (`model.init_plan()`, drawn in plan order) or from `init_state`.

    The same seed gives the same weights whatever the ZeRO stage or world size. `partitioned` (ZeRO-3, the
    model built under zero.Init): each parameter is gathered alone (`GatheredParameters([p], modifier_rank=0)`),
    set on rank 0 and re-partitioned on leaving, so no rank holds more than one full parameter at a time
    (the constructor's own initialisation ran on partitions and is overwritten here).
    """
    from ressformer.initialization import check_plan

    params = dict(model.named_parameters())
    if init_state is None:
        steps = model.init_plan()
        check_plan(model, steps)
    else:
        keys = set(model.state_dict().keys())  # names of tied parameters included, as load_state_dict expects
        missing, unexpected = sorted(keys - set(init_state)), sorted(set(init_state) - keys)
        if missing or unexpected:
            raise ValueError(f"init state does not fit the model: missing {missing}, unexpected {unexpected}; "
                             "it was written for another model config (check init_from and the model overrides)")
        for name, p in params.items():
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(init_state[name].shape) != shape:
                raise ValueError(f"init state: {name} has shape {tuple(init_state[name].shape)}, the model's is "
                                 f"{shape}; it was written for another model config")
        for name, buf in model.named_buffers():  # buffers are never partitioned: every rank sets its own
            if name in init_state:
                buf.copy_(init_state[name])
        steps = [(name, lambda p, name=name: p.copy_(init_state[name])) for name in params]
    writer = not partitioned or dist.get_rank() == 0
    if partitioned:
        import deepspeed
    torch.manual_seed(seed)
    for name, fn in steps:
        p = params[name]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0) if partitioned else contextlib.nullcontext():
            if writer:
                fn(p)


def load_init_from(run: RunConfig) -> dict | None:
    """The state_dict of the model folder `run.init_from` (a checkpoint tag, or a `pretrain.convert
    --to-ressformer` folder), checked against the run's model config."""
    if not run.init_from:
        return None
    from pretrain.checkpoint.tags import MODEL_FILES, TagGone, is_complete, reading
    from pretrain.checkpoint.verify import verify_tag
    from pretrain.model_dir import ModelDirError, is_model_dir, load_model_dir

    d = Path(run.init_from)
    if not is_model_dir(d):
        raise ConfigError(f"init_from={run.init_from!r} holds no model.safetensors + model_config.yaml: give a "
                          f"checkpoint tag folder (runs/x/step_00000100) or write one with `python -m "
                          f"pretrain.convert --to-ressformer --checkpoint HF_DIR --out {run.init_from}`")
    try:
        with reading(d) if is_complete(d) else contextlib.nullcontext():  # another job's keep_last waits
            bad = verify_tag(d, only=MODEL_FILES) if is_complete(d) else None  # collective
            if bad:
                raise ConfigError(f"init_from={run.init_from}: {bad}; give another checkpoint tag")
            cfg, sd = load_model_dir(d)
    except (TagGone, ModelDirError) as e:
        raise ConfigError(f"init_from={run.init_from}: {e}") from None
    diff = config_diff(cfg.to_dict(), run.model_config().to_dict())
    if diff:
        raise ConfigError(f"init_from={run.init_from}: its model_config.yaml differs from this run's model config in "
                          f"{diff} (init value, run value); set `model: {d / 'model_config.yaml'}` and no model "
                          f"overrides")
    return sd


def config_diff(got: dict, want: dict, prefix: str = "") -> dict:
    """{dotted key: (got, want)} for every leaf that differs."""
    out = {}
    for k in sorted(set(got) | set(want)):
        g, w = got.get(k), want.get(k)
        if isinstance(g, dict) and isinstance(w, dict):
            out.update(config_diff(g, w, f"{prefix}{k}."))
        elif g != w:
            out[f"{prefix}{k}"] = (g, w)
    return out


def build_engine(run: RunConfig, ds_json: dict, init_state: dict | None = None):
    """-> (engine, optimizer, scheduler, ds_config). torch.distributed must be initialised."""
    import deepspeed

    from pretrain.expert_parallel import prepare_expert_parallel, resolve_plan

    world = dist.get_world_size()
    ds = build_ds_config(ds_json, run, world)
    ep = resolve_plan(run.model_config(), ds, world).backend != "none"
    check_sequence_parallel(run, ds, world)
    model = build_model_for(run, ds, init_state, compile_now=not ep)
    if run.sequence_parallel_size > 1:
        from pretrain.sequence_parallel import UlyssesShards, sequence_group

        model.set_sequence_parallel(UlyssesShards(sequence_group(run.sequence_parallel_size)))
    model = prepare_expert_parallel(model, ds)
    # ds_to_universal (resharding on resume, pretrain.checkpoint) requires this record in ZeRO-1/2 checkpoints;
    # the model has no tensor or pipeline parallelism, so no parameter patterns are needed.
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    opt, sched = build_optimizer(model, run)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    if run.compile and ep:  # after initialize: AutoEP puts its MoE layers in there
        compile_model(engine.module, run)
    return engine, opt, sched, ds


def check_sequence_parallel(run: RunConfig, ds: dict, world: int) -> None:
    """The layout side of `sequence_parallel_size` on `world` ranks with DeepSpeed config `ds` (the run config
    checked the model side): a ValueError naming the fix (the trainer asks before its preflight allocates)."""
    from pretrain.expert_parallel import resolve_plan

    P = run.sequence_parallel_size
    if P == 1:
        return
    run.data_parallel_size(world)  # P divides the world size
    if resolve_plan(run.model_config(), ds, world).backend != "none":
        raise ValueError("expert parallelism (AutoEP, native MoE) with sequence_parallel_size > 1: not supported "
                         "(DeepSpeed refuses AutoEP with ZeRO-3 under sequence parallelism); the combination that "
                         "works is the routed experts without expert parallelism, sharded by ZeRO-3: "
                         "--ds_config ds_configs/zero3.json")


def layout(run: RunConfig, ds: dict, world: int) -> dict:
    """{"world_size", "zero_stage", "ep_backend", "ep_size"} of a run on `world` ranks with DeepSpeed config `ds`."""
    from pretrain.expert_parallel import resolve_plan

    plan = resolve_plan(run.model_config(), ds, world)
    return {"world_size": world, "zero_stage": zero_stage(ds), "ep_backend": plan.backend, "ep_size": plan.ep_size}
