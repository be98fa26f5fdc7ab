"""DeepSpeed pretraining: build the engine, run the step loop, log, save and resume through pretrain.checkpoint.

- The model package stays single-device; DeepSpeed is applied here. ZeRO-3 builds the model under
  `deepspeed.zero.Init`; `set_initial_weights` then sets every parameter from the seed (the model's `init_plan()`)
  or from a state dict, one gathered parameter at a time, so a seed gives the same weights under any ZeRO stage
  and world size. Expert parallelism is applied by `pretrain.expert_parallel` right before `deepspeed.initialize`.
- Optimizer: torch AdamW (decay on >= 2-D weights except embeddings) + LambdaLR (warmup, cosine or linear decay
  to min_lr), the same objects a plain torch run uses as the parity reference. Activation checkpointing: torch's
  non-reentrant checkpoint at every `every`-th recurrent step. Precision: bf16 on a bf16 GPU, fp32 on CPU.
- The run folder (lock, checkpoints, manifests, resume, resharding) is pretrain/checkpoint.py's.
- Stops: SIGTERM / SIGUSR1 / SIGINT or the launcher's death set a flag; after the step every rank agrees, saves
  and returns. A non-finite loss on any rank skips that micro batch on all ranks; `nan_max_consecutive` in a
  row stops the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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
from ressformer.flops import flops_per_token

REPO = Path(__file__).resolve().parent.parent
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
    """Build the model (under zero.Init for ZeRO-3), initialise it from the seed (or `init_state`), set activation
    checkpointing and, with `compile: true`, compile its units (`CausalLM.compile_units`; ZeRO-1/2/3, with or
    without checkpointing). Expert parallelism with compile is refused: its MoE layer replaces the compiled blocks'
    `mlp` after compilation and runs all-to-alls inside them."""
    from ressformer import build_model

    cfg = run.model_config()
    zero3 = zero_stage(ds) == 3
    if run.compile:
        from pretrain.expert_parallel import AUTOEP_KEY, NATIVE_KEY

        ep = [k for k in (AUTOEP_KEY, NATIVE_KEY) if (ds.get(k) or {}).get("enabled")]
        if ep:
            raise ValueError(f"compile: true with expert parallelism ('{ep[0]}' in the DeepSpeed JSON) is not "
                             "supported: set compile: false, or use a DeepSpeed JSON without it (ds_configs/zero1.json "
                             "or zero3.json: the experts are then ZeRO-partitioned like any weight)")
    if zero3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = build_model(cfg)
    else:
        model = build_model(cfg)
    set_initial_weights(model, run.seed, init_state, partitioned=zero3)
    if run.activation_checkpointing["enabled"]:
        model.set_checkpointing(checkpoint_fn, every=run.activation_checkpointing["every"])
    if run.compile:
        model.compile_units()
    return model


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
    from pretrain.model_dir import is_model_dir, load_model_dir

    d = Path(run.init_from)
    if not is_model_dir(d):
        raise FileNotFoundError(f"init_from={run.init_from!r} holds no model.safetensors + model_config.yaml: give a "
                                f"checkpoint tag folder (runs/x/step_00000100) or write one with `python -m "
                                f"pretrain.convert --to-ressformer --checkpoint HF_DIR --out {run.init_from}`")
    cfg, sd = load_model_dir(d)
    diff = config_diff(cfg.to_dict(), run.model_config().to_dict())
    if diff:
        raise ValueError(f"init_from={run.init_from}: its model_config.yaml differs from this run's model config in "
                         f"{diff} (init value, run value); set `model: {d / 'model_config.yaml'}` and no model overrides")
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

    world = dist.get_world_size()
    ds = build_ds_config(ds_json, run, world)
    model = build_model_for(run, ds, init_state)
    from pretrain.expert_parallel import prepare_expert_parallel

    model = prepare_expert_parallel(model, run, ds)
    # ds_to_universal (resharding on resume, pretrain.checkpoint) requires this record in ZeRO-1/2 checkpoints;
    # the model has no tensor or pipeline parallelism, so no parameter patterns are needed.
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    opt, sched = build_optimizer(model, run)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine, opt, sched, ds


# --- distributed --------------------------------------------------------------------------
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


def free_port() -> int:
    """A free TCP port on localhost (for a rendezvous without a launcher)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> None:
    """torch.distributed through DeepSpeed: the launcher's (srun, deepspeed) environment, or world size 1 on a
    free local port for a single process without one."""
    import deepspeed

    skip_deepspeed_shm_allreduce()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")


def all_mean(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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


class StopSignals:
    """SIGTERM / SIGUSR1 / SIGINT ask for a save and a clean exit after the current step (`stop`); a second
    SIGINT interrupts at once (KeyboardInterrupt). Under the `deepspeed` launcher, the death of the launcher
    (SIGTERM to the `deepspeed` process alone kills it and leaves the ranks running) counts as a signal: a
    thread watches the launcher processes this rank descends from."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.stop = False
        self.received: str | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        self._watch_launcher()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.stop = True
        self.received = signal.Signals(signum).name

    def _watch_launcher(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        try:
            ancestors = [p for p in psutil.Process().parents() if _is_deepspeed_launcher(p.cmdline())]
        except (psutil.Error, OSError):
            return
        if not ancestors:
            return
        import threading

        def watch():
            while not self.stop:
                if any(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in ancestors):
                    self.received = self.received or "launcher exit"
                    self.stop = True
                    return
                time.sleep(1.0)

        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()

    @contextlib.contextmanager
    def children_ignore_sigint(self):
        """Children started inside (wandb's service) inherit SIGINT ignored, so Ctrl-C to the process group leaves
        them alive to flush their files (Go programs keep an inherited ignored SIGINT; they do not keep SIGTERM,
        which is why wandb failures are made non-fatal). Only SIGINT: a SIGTERM in this window is not lost."""
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


def _is_deepspeed_launcher(cmdline: list[str]) -> bool:
    """The `deepspeed` runner script or its `python -m deepspeed.launcher.launch` child."""
    head = cmdline[:4]
    return "deepspeed.launcher.launch" in head or any(Path(c).name == "deepspeed" for c in head[:2])


class WandbLog:
    """wandb on rank 0, never fatal: an error in init/log/finish (its service killed by a signal, a full disk)
    is printed once and wandb is switched off; metrics.jsonl keeps every record."""

    def __init__(self, run: RunConfig, rundir: Path, info: dict, signals: StopSignals) -> None:
        self.wb = None
        mode = os.environ.get("WANDB_MODE") or run.wandb["mode"]  # the environment wins (Slurm scripts set it)
        if mode not in ("offline", "online", "disabled", "dryrun"):
            raise ValueError(f"WANDB_MODE={mode!r}: choose offline, online or disabled")
        if mode == "disabled":
            return
        import wandb

        try:
            with signals.children_ignore_sigint():
                self.wb = wandb.init(mode=mode, project=run.wandb["project"], name=run.wandb["name"],
                                     dir=str(rundir), config=info, resume="allow")
        except Exception as e:  # noqa: BLE001 - logging must not stop training
            self._off("init", e)

    def _off(self, what: str, e: BaseException) -> None:
        print(f"[pretrain] wandb {what} failed ({type(e).__name__}: {str(e)[:200]}); wandb is off for the rest "
              f"of this run, metrics.jsonl has every record", file=sys.stderr, flush=True)
        self.wb = None
        try:  # unregisters wandb's exit hook, which would fail the same way at interpreter exit
            import wandb

            wandb.teardown()
        except Exception:  # noqa: BLE001
            pass

    def log(self, rec: dict) -> None:
        if self.wb is not None:
            try:
                self.wb.log(rec, step=rec["step"])
            except Exception as e:  # noqa: BLE001
                self._off("log", e)

    def finish(self) -> None:
        if self.wb is not None:
            try:
                self.wb.finish()
            except Exception as e:  # noqa: BLE001
                self._off("finish", e)


class NanGuard:
    """Counts skipped non-finite micro batches; raises after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int, skipped: int = 0) -> None:
        self.max_consecutive, self.skipped, self.in_a_row = max_consecutive, skipped, 0


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


def optimizer_step(engine, batches, num_steps: int, grad_accum: int, guard: NanGuard, sums: dict) -> None:
    """`grad_accum` micro batches (a skipped one is replaced by the next) = one optimizer step; the losses and
    scalar diagnostics of each are added to `sums` (name -> [sum, count])."""
    done = 0
    while done < grad_accum:
        out = micro_step(engine, next(batches), num_steps, guard)
        if out is None:
            continue
        done += 1
        for name, v in [("loss", out.loss), ("lm_loss", out.lm_loss), *out.aux_losses.items(),
                        *[(f"diag/{n}", d) for n, d in out.diagnostics.items() if d.numel() == 1]]:
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] += float(v.detach().float())
            acc[1] += 1


def evaluate(engine, valid, run: RunConfig) -> float:
    from pretrain.data import eval_batches

    engine.eval()
    tot = 0.0
    with torch.no_grad():
        for b in eval_batches(valid, run.micro_batch, dist.get_rank(), dist.get_world_size(), run.eval_iters):
            tot += engine(b["input_ids"].to(engine.device), labels=b["labels"].to(engine.device)).lm_loss.item()
    engine.train()
    return all_mean(tot / run.eval_iters)


class MetricsLog:
    """metrics.jsonl, wandb and the progress bar on rank 0 (other ranks only join the reductions); throughput
    over the steps since the last record."""

    def __init__(self, run: RunConfig, rundir: Path, info: dict, signals: StopSignals, step: int, tokens: int) -> None:
        self.run, self.rank = run, dist.get_rank()
        self.mcfg = run.model_config()
        self.t0, self.tok0 = time.time(), tokens
        self.wb = self.bar = self.file = None
        if self.rank == 0:
            from tqdm import tqdm

            self.wb = WandbLog(run, rundir, info, signals)
            self.bar = tqdm(total=run.steps, initial=step, desc="pretrain", file=sys.stdout, dynamic_ncols=True)
            self.file = open(rundir / "metrics.jsonl", "a")

    def write(self, rec: dict) -> None:
        if self.rank == 0:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            self.wb.log(rec)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "val_ppl", "lr")})

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def validation(self, step: int, loss: float) -> None:
        self.write({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})

    def training(self, step: int, sums: dict, *, engine, sched, num_steps: int, tokens: int, skipped: int) -> None:
        """Collective: the mean over ranks of every summed value, with lr, grad norm and throughput."""
        world = dist.get_world_size()
        tps = (tokens - self.tok0) / max(time.time() - self.t0, 1e-9)
        gn = engine.get_global_grad_norm()
        rec = {"step": step, **{n: all_mean(v / k) for n, (v, k) in sums.items()},
               "lr": sched.get_last_lr()[0], "grad_norm": float(gn) if gn is not None else None,
               "num_steps": num_steps, "tokens_seen": tokens, "tokens_per_s": tps,
               "tflops": tps * flops_per_token(self.mcfg, self.run.seq_len, num_steps) / 1e12,
               "skipped_micro_batches": skipped, "peak_mem_gib": peak_memory_gib()}
        peak = peak_tflops()
        if peak:
            rec["mfu"] = rec["tflops"] / world / peak
        self.write(rec)
        self.t0, self.tok0 = time.time(), tokens

    def close(self) -> None:
        if self.rank == 0:
            self.bar.close()
            self.file.close()
            self.wb.finish()


def _collective(fn, *args):
    """Run `fn` on rank 0; its RunFolderError is raised on every rank."""
    from pretrain.checkpoint import RunFolderError, _bcast

    err = None
    if dist.get_rank() == 0:
        try:
            fn(*args)
        except RunFolderError as e:
            err = str(e)
    err = _bcast(err)
    if err:
        raise RunFolderError(err)


def train(run: RunConfig, ds_json: dict, resume: str = "none", overwrite: bool = False) -> dict:
    """Train per `run`; returns {"step", "finished", "interrupted"}. torch.distributed must be initialised.

    `resume`: none (a fresh run; a folder holding checkpoints is refused unless `overwrite`), auto (the newest
    usable checkpoint, else fresh), or a tag name / tag folder."""
    from pretrain import checkpoint as ckpt

    rank = dist.get_rank()
    rundir = Path(run.run_dir)
    if rank == 0:
        try:
            rundir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ckpt.RunFolderError(ckpt.describe_os_error(e, rundir)) from None
    dist.barrier()
    signals = StopSignals()
    lock = ckpt.acquire_run_folder(rundir)
    try:
        return _train(run, ds_json, resume, overwrite, signals)
    finally:
        if lock is not None:
            lock.release()


def _layout(run: RunConfig, ds: dict, world: int) -> dict:
    from pretrain.expert_parallel import resolve_plan

    plan = resolve_plan(run.model_config(), ds, world)
    return {"world_size": world, "zero_stage": zero_stage(ds), "ep_backend": plan.backend, "ep_size": plan.ep_size}


def _restore(run: RunConfig, ds_json: dict, point, rundir: Path):
    """Build the engine; continue from `point` (a ResumePoint or None). -> (engine, sched, ds, state, layout)."""
    from pretrain import checkpoint as ckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    ds = build_ds_config(ds_json, run, world)
    layout = _layout(run, ds, world)
    if point is None:
        engine, _, sched, ds = build_engine(run, ds_json, init_state=load_init_from(run))
        return engine, sched, ds, {}, layout
    diff = config_diff(point.state.get("model_config") or {}, run.model_config().to_dict())
    if diff:
        raise ckpt.RunFolderError(f"{point.tag} was written for another model config: {diff} (checkpoint value, "
                                  f"this run's value). Resume with the checkpoint's model settings, or start a new "
                                  f"run from its weights with --set init_from={point.tag}")
    old = point.layout or layout
    if old == layout:
        engine, _, sched, ds = build_engine(run, ds_json)
        ckpt.load_same_layout(engine, point.tag)
        return engine, sched, ds, point.state, layout
    ckpt.check_reshardable(old, layout, point.tag)
    udir = rundir / ckpt.RESHARD_DIR / point.tag.name
    if rank == 0:
        print(f"[pretrain] {point.tag.name} was written with world size {old['world_size']}, ZeRO-{old['zero_stage']}; "
              f"this run has {world}, ZeRO-{layout['zero_stage']}: resharding through ds_to_universal", flush=True)
    _collective(ckpt.universal_from, point.tag, udir)
    dist.barrier()
    from pretrain.model_dir import check_state
    from ressformer import build_model

    cfg = run.model_config()
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in build_model(cfg).named_parameters()}
    init_state = check_state(ckpt.universal_tensors(udir, "fp32", shapes), cfg, str(udir))
    engine, _, sched, ds = build_engine(run, ds_json, init_state=init_state)
    dummy = torch.zeros(run.micro_batch, run.seq_len, dtype=torch.long)
    ckpt.load_resharded(engine, udir, optimizer_steps=int(point.state.get("optimizer_steps", point.state["step"])),
                        batch={"input_ids": dummy, "labels": dummy}, grad_accum=run.grad_accum)
    if not ckpt.load_rng(point.tag):
        torch.manual_seed(run.seed + 1000 * rank)  # ranks the checkpoint did not have
    dist.barrier()
    if rank == 0:
        shutil.rmtree(udir, ignore_errors=True)
    return engine, sched, ds, point.state, layout


def _train(run: RunConfig, ds_json: dict, resume: str, overwrite: bool, signals: StopSignals) -> dict:
    from pretrain import checkpoint as ckpt
    from pretrain.data import TrainBatches, build_datasets
    from ressformer.recurrence import sample_num_steps

    rank, world = dist.get_rank(), dist.get_world_size()
    rundir = Path(run.run_dir)
    if resume == "none":
        _collective(ckpt.prepare_fresh, rundir, overwrite)
    dcfg = run.data_config()  # fail on a missing data prefix / tokenizer before building anything
    point = _resume_point(rundir, resume)
    engine, sched, ds, state, layout = _restore(run, ds_json, point, rundir)
    mcfg = run.model_config()
    info = run_info(run, ds)
    step, tokens = int(state.get("step", 0)), int(state.get("tokens_seen", 0))
    gb = run.global_batch(world)
    if rank == 0:
        _announce(run, rundir, point, state, info, ds, gb, step)

    train_ds, valid_ds, _ = build_datasets(
        dcfg, seq_len=run.seq_len, seed=run.seed,
        num_samples=(run.steps * gb + spare_samples(run, gb), max(1, run.eval_iters) * run.micro_batch * world, 0))
    batches = TrainBatches(train_ds, micro_batch=run.micro_batch, global_batch=gb, dp_rank=rank, dp_size=world,
                           consumed_samples=int(state.get("consumed_samples", 0)), num_workers=dcfg.num_workers)
    guard = NanGuard(run.nan_max_consecutive, skipped=int(state.get("skipped_micro_batches", 0)))
    log = MetricsLog(run, rundir, info, signals, step, tokens)
    evaluating = bool(run.eval_iters and valid_ds is not None)

    def save(at: int) -> None:
        every = run.save_model_every
        write_model = at == run.steps or (every > 0 and (at // run.save_every) % every == 0)
        st = {"run_config": run.to_dict(), "model_config": mcfg.to_dict(), "step": at, "tokens_seen": tokens,
              "optimizer_steps": int(engine.global_steps), "skipped_micro_batches": guard.skipped,
              "global_batch": gb, "world_size": world, **batches.state_dict()}
        ckpt.save(engine, run_dir=rundir, step=at, state=st, layout=layout, model_cfg=mcfg,
                  tokenizer_dir=dcfg.tokenizer, keep_last=run.keep_last, write_model=write_model)

    if evaluating and step == 0:
        log.validation(0, evaluate(engine, valid_ds, run))
    sums: dict[str, list] = {}
    interrupted, wrapped_warned = False, False
    while step < run.steps:
        k = sample_num_steps(mcfg, step, run.seed)
        optimizer_step(engine, batches, k, run.grad_accum, guard, sums)
        step += 1
        tokens += gb * run.seq_len
        log.advance()
        if batches.epochs_completed and not wrapped_warned and rank == 0:
            wrapped_warned = True
            print("[pretrain] warning: skipped micro batches used up the spare training samples; the data "
                  "continues from the start of the training split", file=sys.stderr, flush=True)
        if step % run.log_every == 0 or step == run.steps:
            log.training(step, sums, engine=engine, sched=sched, num_steps=k, tokens=tokens, skipped=guard.skipped)
            sums = {}
        if evaluating and (step % run.eval_every == 0 or step == run.steps):
            log.validation(step, evaluate(engine, valid_ds, run))
        stop = any_rank(signals.stop)
        if step % run.save_every == 0 or step == run.steps or stop:
            save(step)
        if stop and step < run.steps:
            interrupted = True
            if rank == 0:
                print(f"[pretrain] {signals.received or 'signal on another rank'}: saved step {step}, exiting (no "
                      f"{ckpt.FINISHED} marker; --resume auto continues)", flush=True)
            break
    finished = step >= run.steps
    log.close()
    if rank == 0 and finished:
        (rundir / ckpt.FINISHED).write_text(f"step {step}\n")
    dist.barrier()
    return {"step": step, "finished": finished, "interrupted": interrupted}


def _resume_point(rundir: Path, resume: str):
    """Collective: the checkpoint to continue from (None: a fresh start); rank 0 tidies the folder for it."""
    from pretrain import checkpoint as ckpt

    point = ckpt.find_resume(rundir, resume)
    if dist.get_rank() == 0:
        for w in (point.skipped if point else []):
            print(f"[checkpoint] warning: {w}", file=sys.stderr, flush=True)
        if point is not None:
            for m in ckpt.set_aside_newer(rundir, point):
                print(f"[checkpoint] {m}", flush=True)
        else:
            for t in ckpt.all_tags(rundir):  # only interrupted saves can be left here
                ckpt.remove_tag(t)
    dist.barrier()
    return point


def _announce(run: RunConfig, rundir: Path, point, state: dict, info: dict, ds: dict, gb: int, step: int) -> None:
    """Rank 0: print what runs, write run_info.json, drop metrics after the resumed step and a stale FINISHED."""
    from pretrain import checkpoint as ckpt

    if point is not None:
        print(f"[pretrain] resumed from {point.tag} (step {step}, {state.get('tokens_seen')} tokens, "
              f"{state.get('consumed_samples')} samples)", flush=True)
        if state.get("global_batch", gb) != gb:
            print(f"[pretrain] warning: the checkpoint trained with global batch {state['global_batch']}, this run "
                  f"uses {gb} (micro_batch x grad_accum x world size): the data order continues by samples, the "
                  f"schedule by steps", file=sys.stderr, flush=True)
    ckpt.trim_metrics(rundir / "metrics.jsonl", step)
    if (rundir / ckpt.FINISHED).exists() and step < run.steps:
        (rundir / ckpt.FINISHED).unlink()
    (rundir / "run_info.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"[pretrain] precision={info['precision']} world={info['world_size']} git={info['git_sha']} "
          f"versions={info['versions']}\n[pretrain] run config: {json.dumps(run.to_dict())}\n"
          f"[pretrain] model config: {json.dumps(info['model_config'])}\n[pretrain] ds config: {json.dumps(ds)}",
          flush=True)


def spare_samples(run: RunConfig, global_batch: int) -> int:
    """Training samples beyond steps x global batch, for micro batches skipped as non-finite: 1 % of the run,
    at least one global batch (past them the data wraps to the start of the split)."""
    return global_batch * max(1, math.ceil(run.steps / 100))
