"""DeepSpeed pretraining engine: build, train, evaluate, checkpoint, resume (issue 4).

Design choices
- The model package stays single-device; this file applies DeepSpeed from outside. ZeRO-3 builds the
  model under `deepspeed.zero.Init`, then `initialise_parameters` runs the model's `init_plan()` one
  parameter at a time, each gathered alone and set on rank 0 (no rank ever holds the whole model; the
  constructors' own initialisation ran on partitions). Every stage initialises this way, so a seed gives
  the same weights under ZeRO-1/2/3 and any world size. Expert parallelism: `pretrain.expert_parallel.
  prepare_expert_parallel` (engineer E2) is called right before `deepspeed.initialize`.
- Optimizer = torch AdamW (decay on >= 2-D weights except embeddings) + LambdaLR (linear warmup, cosine
  or linear decay to min_lr), handed to `deepspeed.initialize`: a plain torch run with the same objects
  is the parity reference.
- Activation checkpointing: `model.set_checkpointing(torch.utils.checkpoint non-reentrant, every)`; every
  `every`-th R2MU step is a recompute boundary (ZeRO-3 + reentrant checkpointing has known bugs).
- Precision from the accelerator: bf16 on a CUDA device that supports it, fp32 on CPU (logged).
- Checkpoints: `engine.save_checkpoint(run_dir, tag="step_%08d", save_latest=False)`, then per-rank RNG
  files, a barrier, then rank 0 writes `TAG/COMPLETE` and only then `run_dir/latest`; `--resume auto`
  loads the newest tag holding COMPLETE, so a run killed while saving resumes from the previous one.
  Client state: run config, model config, consumed_samples (data position), step, tokens seen.
- wandb: offline by default (files under run_dir/wandb, never network); `online` only when the run config
  or WANDB_MODE (which wins) says so.
- Signals: SIGTERM/SIGUSR1 set a flag; after the current step every rank agrees (all-reduce), saves and
  returns. `run_dir/FINISHED` is written only when all steps are done (Slurm requeue reads it).
- Non-finite loss: a flag all-reduced over ranks; the micro batch is skipped (no backward, no step) on all
  ranks and counted; `nan_max_consecutive` in a row stops the run with an error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
TAG_FMT = "step_{:08d}"
COMPLETE = "COMPLETE"
FINISHED = "FINISHED"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 peak per GPU


# --- optimizer / schedule -------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions hold a 1-D shard
        (decay if ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(run: RunConfig, step: int) -> float:
    """Multiplier of run.lr at optimizer step `step` (0-based): linear warmup, then decay to min_lr."""
    if run.warmup_steps and step < run.warmup_steps:
        return (step + 1) / run.warmup_steps
    frac = min(1.0, (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if run.decay == "cosine" else 1 - frac
    floor = run.min_lr / run.lr
    return floor + (1 - floor) * shape


def build_optimizer(model, run: RunConfig):
    from pretrain.expert_parallel import param_groups_for  # native MoE experts need their own `moe` groups

    groups = param_groups_for(model, param_groups(model, run.weight_decay))
    opt = torch.optim.AdamW(groups, lr=run.lr, betas=tuple(run.betas), eps=run.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_lambda, run))
    return opt, sched


def checkpoint_fn(function, *args):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


# --- DeepSpeed config -----------------------------------------------------------------------------
def resolve_precision(run: RunConfig) -> str:
    if run.precision != "auto":
        return run.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def build_ds_config(ds_json: dict, run: RunConfig, world_size: int) -> dict:
    ds = json.loads(json.dumps(ds_json))
    for k, v in run.ds_batch_fields(world_size).items():
        if k in ds and ds[k] not in (v, "auto"):
            raise ValueError(f"DeepSpeed JSON sets {k}={ds[k]} but the run config gives {v} (micro_batch="
                             f"{run.micro_batch}, grad_accum={run.grad_accum}, world_size={world_size}): "
                             f"remove {k} from the JSON, the engine derives it")
        ds[k] = v
    ds["gradient_clipping"] = run.grad_clip
    prec = resolve_precision(run)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": prec == "bf16"}
    ds.pop("fp16", None)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_model_for(run: RunConfig, ds: dict, init_state: dict | None = None):
    """Build the model (under zero.Init for ZeRO-3), initialise it from the seed (or `init_state`)."""
    from ressformer import build_model

    cfg = run.model_config()
    zero3 = zero_stage(ds) == 3
    if zero3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = build_model(cfg)
    else:
        model = build_model(cfg)
    initialise_parameters(model, run.seed, init_state, partitioned=zero3)
    if run.activation_checkpointing["enabled"]:
        model.set_checkpointing(checkpoint_fn, every=run.activation_checkpointing["every"])
    return model


@torch.no_grad()
def initialise_parameters(model: torch.nn.Module, seed: int, init_state: dict | None = None,
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
    """The state_dict named by `run.init_from` (continued pretraining), checked against the run's model config."""
    if not run.init_from:
        return None
    from pretrain.convert import load_init_state

    d = Path(run.init_from)
    if not d.is_dir():
        raise FileNotFoundError(f"init_from={run.init_from!r} is not a folder: write one with `python -m "
                                f"pretrain.convert --to-ressformer --checkpoint HF_DIR --out {run.init_from}`")
    cfg, sd = load_init_state(d)
    want, got = run.model_config().to_dict(), cfg.to_dict()
    if want != got:
        diff = {k: (got.get(k), want.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}
        raise ValueError(f"init_from={run.init_from}: its model_config.yaml differs from this run's model config in "
                         f"{diff} (init value, run value); set `model: {d / 'model_config.yaml'}` and no model overrides")
    return sd


def initialize(run: RunConfig, ds_json: dict, init_state: dict | None = None):
    """-> (engine, optimizer, scheduler, ds_config). torch.distributed must be initialised."""
    import deepspeed

    world = dist.get_world_size()
    ds = build_ds_config(ds_json, run, world)
    model = build_model_for(run, ds, init_state)
    from pretrain.expert_parallel import prepare_expert_parallel

    model = prepare_expert_parallel(model, run, ds)
    opt, sched = build_optimizer(model, run)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine, opt, sched, ds


# --- distributed helpers --------------------------------------------------------------------------
def skip_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed from JIT-building and mapping its CPU shared-memory all-reduce op at init.

    On the CPU accelerator `deepspeed.comm.TorchBackend.__init__` compiles `deepspeed_shm_comm` (about 50 s with
    gcc on 2 cores, again for every venv path) and each rank then writes a 66 MiB file to /dev/shm that is never
    unlinked. The op serves only `inference_all_reduce`, which training never calls (gradients go through
    torch.distributed), and it costs three ways: a build killed midway leaves a `lock` file in
    ~/.cache/torch_extensions on which every later run waits forever; the leaked files fill /dev/shm run after
    run; and where /dev/shm is small (containers default to 64 MiB) a rank's segment cannot be created while its
    peer spins on `shm_open` waiting for it, a silent hang. Marking the op incompatible in DeepSpeed's cached
    compatibility table (`deepspeed.ops.__compatible_ops__`, which it documents as editable) makes
    `build_shm_op()` return None and the backend use plain torch.distributed for everything.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_distributed() -> None:
    """Single process without a launcher: world size 1 on a free local port. srun/deepspeed set the env."""
    import deepspeed

    skip_deepspeed_shm_allreduce()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")


def all_mean(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --- checkpoints ----------------------------------------------------------------------------------
def complete_tags(run_dir: str | Path) -> list[Path]:
    d = Path(run_dir)
    tags = [p for p in d.glob("step_*") if (p / COMPLETE).is_file()] if d.is_dir() else []
    return sorted(tags, key=lambda p: int(p.name.split("_")[1]))


def save(engine, run: RunConfig, step: int, data_state: dict, tokens: int) -> None:
    tag = TAG_FMT.format(step)
    rank = dist.get_rank()
    client = {"run_config": run.to_dict(), "model_config": run.model_config().to_dict(), "step": step,
              "tokens_seen": tokens, **data_state}
    engine.save_checkpoint(run.run_dir, tag=tag, client_state=client, save_latest=False)
    tdir = Path(run.run_dir) / tag
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tdir / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tdir / "run_config.json").write_text(json.dumps(client, indent=1, default=str))
        (tdir / COMPLETE).write_text(f"{time.time()}\n")
        (Path(run.run_dir) / "latest").write_text(tag)
        for old in complete_tags(run.run_dir)[:-run.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(engine, run: RunConfig) -> dict | None:
    tags = complete_tags(run.run_dir)
    if not tags:
        return None
    tag = tags[-1]
    _, client = engine.load_checkpoint(run.run_dir, tag=tag.name)
    if client is None:
        raise RuntimeError(f"could not load checkpoint {tag}: delete it (and its COMPLETE marker) to fall back")
    rng = tag / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        s = torch.load(rng, weights_only=False)
        torch.set_rng_state(s["torch"])
        np.random.set_state(s["numpy"])
        random.setstate(s["python"])
        if s["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
    return client


# --- run info / logging ---------------------------------------------------------------------------
def run_info(run: RunConfig, ds: dict) -> dict:
    import deepspeed

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
    except Exception:
        sha = None
    return {"run_config": run.to_dict(), "model_config": run.model_config().to_dict(), "ds_config": ds,
            "git_sha": sha, "precision": resolve_precision(run), "world_size": dist.get_world_size(),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "deepspeed": deepspeed.__version__, "numpy": np.__version__}}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


class _Signals:
    def __init__(self) -> None:
        self.stop = False
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.stop = True


class NanGuard:
    """Counts skipped non-finite micro batches; raises after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive, self.skipped, self.in_a_row = max_consecutive, 0, 0


def micro_step(engine, batch: dict, num_steps: int, guard: NanGuard):
    """Forward, then backward + engine.step unless any rank's loss is non-finite (-> None, counted)."""
    out = engine(batch["input_ids"].to(engine.device), labels=batch["labels"].to(engine.device), num_steps=num_steps)
    if any_rank(not bool(torch.isfinite(out.loss).item())):  # every rank takes the same branch
        guard.skipped += 1
        guard.in_a_row += 1
        if guard.in_a_row >= guard.max_consecutive:
            raise RuntimeError(f"non-finite loss in {guard.in_a_row} consecutive micro batches "
                               f"(nan_max_consecutive={guard.max_consecutive}, {guard.skipped} skipped in all): "
                               f"lower lr, raise warmup_steps or resume from an earlier checkpoint")
        return None
    guard.in_a_row = 0
    engine.backward(out.loss)
    engine.step()
    return out


# --- the loop -------------------------------------------------------------------------------------
def evaluate(engine, valid, run: RunConfig) -> float:
    from pretrain.data import eval_batches

    engine.eval()
    tot = 0.0
    with torch.no_grad():
        for b in eval_batches(valid, run.micro_batch, dist.get_rank(), dist.get_world_size(), run.eval_iters):
            tot += engine(b["input_ids"].to(engine.device), labels=b["labels"].to(engine.device)).lm_loss.item()
    engine.train()
    return all_mean(tot / run.eval_iters)


def train(run: RunConfig, ds_json: dict, resume: bool = False) -> dict:
    """Train per `run`; returns {"step", "finished", "interrupted"}. torch.distributed must be initialised."""
    from pretrain.data import TrainBatches, build_datasets
    from ressformer.flops import flops_per_token
    from ressformer.recurrence import sample_num_steps

    rank, world = dist.get_rank(), dist.get_world_size()
    rundir = Path(run.run_dir)
    if rank == 0:
        rundir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sig = _Signals()
    dcfg = run.data_config()  # fail on a missing data prefix / tokenizer before building anything
    engine, opt, sched, ds = initialize(run, ds_json, init_state=load_init_from(run))
    mcfg = run.model_config()
    info = run_info(run, ds)
    if rank == 0:
        (rundir / "run_info.json").write_text(json.dumps(info, indent=1, default=str))
        print(f"[pretrain] precision={info['precision']} world={world} git={info['git_sha']} "
              f"versions={info['versions']}\n[pretrain] run config: {json.dumps(run.to_dict())}\n"
              f"[pretrain] model config: {json.dumps(info['model_config'])}\n"
              f"[pretrain] ds config: {json.dumps(ds)}", flush=True)

    step, tokens, consumed = 0, 0, 0
    if resume:
        client = load(engine, run)
        if client is not None:
            step, tokens, consumed = client["step"], client["tokens_seen"], client["consumed_samples"]
            if rank == 0:
                print(f"[pretrain] resumed from step {step} ({tokens} tokens, {consumed} samples)", flush=True)
    if rank == 0 and (rundir / FINISHED).exists() and step < run.steps:
        (rundir / FINISHED).unlink()

    gb = run.global_batch(world)
    train_ds, valid_ds, _ = build_datasets(
        dcfg, seq_len=run.seq_len, seed=run.seed, rank0=rank == 0, barrier=dist.barrier,
        num_samples=(run.steps * gb, max(1, run.eval_iters) * run.micro_batch * world, 0))
    batches = TrainBatches(train_ds, micro_batch=run.micro_batch, global_batch=gb, dp_rank=rank, dp_size=world,
                           consumed_samples=consumed, num_workers=dcfg.num_workers)

    wb = None
    wandb_mode = os.environ.get("WANDB_MODE") or run.wandb["mode"]  # the environment wins (Slurm scripts set it)
    if wandb_mode not in ("offline", "online", "disabled", "dryrun"):
        raise ValueError(f"WANDB_MODE={wandb_mode!r}: choose offline, online or disabled")
    if rank == 0 and wandb_mode != "disabled":
        import wandb

        wb = wandb.init(mode=wandb_mode, project=run.wandb["project"], name=run.wandb["name"],
                        dir=str(rundir), config=info, resume="allow")
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=run.steps, initial=step, desc="pretrain", file=sys.stdout, dynamic_ncols=True)
    metrics_f = open(rundir / "metrics.jsonl", "a") if rank == 0 else None

    def log(rec: dict) -> None:
        if rank == 0:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if wb is not None:
                wb.log(rec, step=rec["step"])
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "val_ppl", "lr")})

    if run.eval_iters and valid_ds is not None and step == 0:
        vl = evaluate(engine, valid_ds, run)
        log({"step": 0, "val_loss": vl, "val_ppl": math.exp(min(vl, 50))})

    acc: dict[str, float] = {}
    n_acc, t0, tok0 = 0, time.time(), tokens
    guard = NanGuard(run.nan_max_consecutive)
    interrupted = False
    while step < run.steps:
        k = sample_num_steps(mcfg, step, run.seed)
        done_micro = 0
        while done_micro < run.grad_accum:
            out = micro_step(engine, next(batches), k, guard)
            if out is None:
                continue  # skipped on every rank: the next micro batch takes its place
            done_micro += 1
            for name, v in [("loss", out.loss), ("lm_loss", out.lm_loss), *out.aux_losses.items(),
                            *[(f"diag/{n}", d) for n, d in out.diagnostics.items() if d.numel() == 1]]:
                acc[name] = acc.get(name, 0.0) + float(v.detach().float())
            n_acc += 1
        step += 1
        tokens += gb * run.seq_len
        if bar is not None:
            bar.update(1)
        if step % run.log_every == 0 or step == run.steps:
            dt = time.time() - t0
            rec = {"step": step, **{n: all_mean(v / n_acc) for n, v in acc.items()}}
            tps = (tokens - tok0) / max(dt, 1e-9)
            gn = engine.get_global_grad_norm()
            rec.update({"lr": sched.get_last_lr()[0], "grad_norm": float(gn) if gn is not None else None,
                        "num_steps": k, "tokens_seen": tokens, "tokens_per_s": tps,
                        "tflops": tps * flops_per_token(mcfg, run.seq_len, k) / 1e12,
                        "skipped_micro_batches": guard.skipped, "peak_mem_gib": peak_memory_gib()})
            peak = peak_tflops()
            if peak:
                rec["mfu"] = rec["tflops"] / world / peak
            log(rec)
            acc, n_acc, t0, tok0 = {}, 0, time.time(), tokens
        if run.eval_iters and valid_ds is not None and (step % run.eval_every == 0 or step == run.steps):
            vl = evaluate(engine, valid_ds, run)
            log({"step": step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50))})
        stop = any_rank(sig.stop)
        if step % run.save_every == 0 or step == run.steps or stop:
            save(engine, run, step, batches.state_dict(), tokens)
        if stop and step < run.steps:
            interrupted = True
            if rank == 0:
                print(f"[pretrain] signal received: saved step {step}, exiting (no {FINISHED} marker)", flush=True)
            break
    finished = step >= run.steps
    if rank == 0:
        if bar is not None:
            bar.close()
        metrics_f.close()
        if wb is not None:
            wb.finish()
        if finished:
            (rundir / FINISHED).write_text(f"step {step}\n")
    dist.barrier()
    return {"step": step, "finished": finished, "interrupted": interrupted}
