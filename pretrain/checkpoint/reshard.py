"""Resuming a tag written with another world size or ZeRO stage.

DeepSpeed's `ds_to_universal` writes every parameter's fp32 value and Adam moments whole into RUN_DIR/.reshard/TAG;
the engine is built from those weights, then the moments, the step count and the schedule are set
(`deepspeed.utils.safe_set_full_optimizer_state`, any ZeRO stage). torch AdamW creates its state on its first step,
so one step at learning rate 0 with zero gradients materialises it first (weights unchanged). Expert-parallel
layouts are not resharded (`check_reshardable` says so and how to continue).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain import distributed as D
from pretrain.checkpoint.resume import ResumePoint, load_rng
from pretrain.checkpoint.run_folder import RESHARD_DIR
from pretrain.checkpoint.tags import RunFolderError
from pretrain.signals import Interrupted


def reshard(run, ds_json: dict, point: ResumePoint, run_dir: Path, layout: dict, should_stop=lambda: False):
    """Collective: the engine of this run's layout with the state of `point` (written with another layout).
    -> (engine, scheduler, DeepSpeed config). A stop signal during the conversion (`should_stop`) ends it and
    raises `pretrain.signals.Interrupted` on every rank; the partial conversion is removed."""
    from pretrain.engine import build_engine
    from pretrain.model_dir import check_state, model_keys

    old = point.layout
    check_reshardable(old, layout, point.tag)
    udir = run_dir / RESHARD_DIR / point.tag.name
    if D.rank() == 0:
        print(f"[pretrain] {point.tag.name} was written with world size {old['world_size']}, ZeRO-{old['zero_stage']}; "
              f"this run has {layout['world_size']}, ZeRO-{layout['zero_stage']}: resharding through ds_to_universal",
              flush=True)
    D.on_rank0(universal_from, point.tag, udir, should_stop, errors=(RunFolderError, Interrupted))
    D.barrier()
    cfg = run.model_config()
    init_state = check_state(universal_tensors(udir, "fp32", model_keys(cfg).params), cfg, str(udir))
    engine, _, sched, ds = build_engine(run, ds_json, init_state=init_state)
    dummy = torch.zeros(run.micro_batch, run.seq_len, dtype=torch.long)
    load_resharded(engine, udir, optimizer_steps=int(point.state.get("optimizer_steps", point.state["step"])),
                   batch={"input_ids": dummy, "labels": dummy}, grad_accum=run.grad_accum)
    if not load_rng(point.tag):
        torch.manual_seed(run.seed + 1000 * D.rank())  # ranks the checkpoint did not have
    D.barrier()
    if D.rank() == 0:
        shutil.rmtree(udir, ignore_errors=True)
    return engine, sched, ds


def check_reshardable(tag_layout_: dict, layout: dict, tag: Path) -> None:
    if tag_layout_["ep_backend"] != "none" or layout["ep_backend"] != "none":
        if (tag_layout_["ep_backend"], tag_layout_["ep_size"]) != (layout["ep_backend"], layout["ep_size"]) or \
                tag_layout_["world_size"] != layout["world_size"] or tag_layout_["zero_stage"] != layout["zero_stage"]:
            raise RunFolderError(
                f"{tag} was written with world size {tag_layout_['world_size']}, ZeRO-{tag_layout_['zero_stage']}, "
                f"expert parallelism {tag_layout_['ep_backend']} (size {tag_layout_['ep_size']}); this run has world "
                f"size {layout['world_size']}, ZeRO-{layout['zero_stage']}, {layout['ep_backend']} (size "
                f"{layout['ep_size']}). Optimizer state of expert-parallel runs is not resharded: resume with the "
                f"same world size and DeepSpeed JSON, or start a new run from its weights with "
                f"--set init_from={tag} (the Adam moments restart)")


def universal_from(tag: Path, out: Path, should_stop=lambda: False) -> Path:
    """Rank 0: DeepSpeed's ds_to_universal of `tag` into `out` (each parameter's fp32 value and moments whole). A
    stop signal (`should_stop`, or the conversion killed by the job's own SIGTERM) removes `out` and raises
    Interrupted; any other failure is a RunFolderError with the converter's last output."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
           "--output_folder", str(out), "--num_extract_workers", "2", "--num_merge_workers", "2"]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while p.poll() is None and not should_stop():
            time.sleep(0.2)
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if should_stop():
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)
        raise Interrupted(f"resharding {tag.name} (ds_to_universal)")
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if p.returncode != 0 or not (out / "zero").is_dir():
        raise RunFolderError(f"ds_to_universal could not convert {tag} for resharding (rc {p.returncode}): "
                             f"{text[-1500:]}")
    return out


def universal_tensors(udir: Path, key: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        f = udir / "zero" / name / f"{key}.pt"
        if not f.is_file():
            raise RunFolderError(f"{f} missing in the universal checkpoint: cannot reshard parameter {name}")
        t = torch.load(f, map_location="cpu", weights_only=False)
        t = t["param"] if isinstance(t, dict) else t
        out[name] = t.detach().float().reshape(shape).clone()
    return out


def _materialise_optimizer_state(engine, batch: dict, grad_accum: int) -> None:
    """torch AdamW creates its state on the first step: take one optimizer step at learning rate 0 with zero
    gradients (weights unchanged: AdamW's decay is lr * wd = 0 and its update is scaled by lr)."""
    groups = engine.optimizer.param_groups
    for g in groups:
        g["lr"] = 0.0
    for _ in range(grad_accum):
        out = engine(batch["input_ids"].to(engine.device), labels=batch["labels"].to(engine.device))
        engine.backward(out.loss * 0.0)
        engine.step()
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter to its optimizer state once, right after the first param group's step, when
        # the other groups have no state yet (deepspeed 0.19.8); link again now that every group has one.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _set_zero3_state(p, value: torch.Tensor, key: str) -> None:
    """This rank's slice of a ZeRO-3 parameter's optimizer state. DeepSpeed's set_full_hp_param reads the slice
    past the end of `value` on the last rank when the parameter is padded to a multiple of the world size
    (a 1-element parameter on 2 ranks, deepspeed 0.19.8); the padding is zero here."""
    opt = p._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n, r = part.numel(), opt._get_param_partition_rank(p)
    chunk = value.flatten()[n * r: n * (r + 1)].to(part.dtype)
    part.data.zero_()
    part.data[: chunk.numel()].copy_(chunk)


def load_resharded(engine, udir: Path, *, optimizer_steps: int, batch: dict, grad_accum: int) -> None:
    """After building the engine from the universal checkpoint's fp32 weights: Adam moments of every parameter
    (`safe_set_full_optimizer_state`, any ZeRO stage), the step count, the schedule and the engine's counters."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _materialise_optimizer_state(engine, batch, grad_accum)
    named = list(engine.module.named_parameters())
    shapes = {n: torch.Size(getattr(p, "ds_shape", p.shape)) for n, p in named}
    for key in ("exp_avg", "exp_avg_sq"):
        values = universal_tensors(udir, key, shapes)
        for name, p in named:
            if hasattr(p, "ds_id"):
                _set_zero3_state(p, values[name], key)
            else:
                safe_set_full_optimizer_state(p, values[name], key)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for st in inner.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], float(optimizer_steps)) if torch.is_tensor(st["step"]) \
                else optimizer_steps
    engine.global_steps = optimizer_steps
    sched = engine.lr_scheduler
    sched.last_epoch = optimizer_steps - 1
    sched._step_count = optimizer_steps
    sched.step()  # LambdaLR: every group's lr for step `optimizer_steps`
