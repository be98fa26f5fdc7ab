"""What a run reports: metrics.jsonl, wandb, the progress bar, run_info.json's content, throughput and MFU.

- Rank 0 writes; every rank joins the reductions (`MetricsLog.training` is collective: the mean over ranks of
  every summed value).
- wandb is never fatal by itself: an error in init / log / finish (its service killed by a signal) is printed once
  and wandb is switched off; metrics.jsonl keeps every record. A full disk under it stops the run like any other
  failed write of the run's files (`pretrain.run_files.WriteGuard`).
- Throughput over the steps since the last record; TFLOP/s from `ressformer.flops` (FLOPs counted as computed);
  MFU against the device's dense bf16 peak (`PEAK_TFLOPS`) on known GPUs.
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import RunConfig
from pretrain.distributed import all_means
from pretrain.ds_config import resolve_precision
from pretrain.run_files import LOW_SPACE, WriteGuard, write_atomic, writing
from ressformer.flops import flops_per_token
from ressformer.kernels import use_asam_kernel

REPO = Path(__file__).resolve().parent.parent
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 peak per GPU


def run_info(run: RunConfig, ds: dict) -> dict:
    import deepspeed

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
    except Exception:
        sha = None
    return {"run_config": run.to_dict(), "model_config": run.model_config().to_dict(), "ds_config": ds,
            "git_sha": sha, "precision": resolve_precision(run.precision), "world_size": dist.get_world_size(),
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


def wandb_mode(run: RunConfig) -> str:
    """wandb's mode: WANDB_MODE from the environment wins (the Slurm scripts set it), else run.wandb.mode."""
    mode = os.environ.get("WANDB_MODE") or run.wandb.mode
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"WANDB_MODE={mode!r}: choose offline, online or disabled")
    return mode


class WandbLog:
    """wandb on rank 0: an error in init/log/finish (its service killed by a signal) is printed once and wandb is
    switched off; metrics.jsonl keeps every record. An error from a full disk also goes to `guard`."""

    def __init__(self, run: RunConfig, rundir: Path, info: dict, signals, guard: WriteGuard | None = None) -> None:
        self.wb, self.dir, self.guard = None, rundir / "wandb", guard
        self.step = 0  # the highest step logged
        mode = wandb_mode(run)
        if mode == "disabled":
            return
        import wandb

        try:
            with signals.children_ignore_sigint():
                self.wb = wandb.init(mode=mode, project=run.wandb.project, name=run.wandb.name,
                                     dir=str(rundir), config=info, resume="allow")
        except Exception as e:  # noqa: BLE001 - logging must not stop training
            self._off("init", e)

    def _off(self, what: str, e: BaseException) -> None:
        if self.guard is not None and _disk_full(e, self.dir):  # not wandb's problem alone: the run stops
            self.guard.record(e, self.dir)
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
            # wandb drops a record whose step is below one already logged: a tag completed in the background (its
            # save timings, its eval_tasks) is logged at the current step, its own step kept in the record
            self.step = max(self.step, int(rec["step"]))
            try:
                self.wb.log(rec, step=self.step)
            except Exception as e:  # noqa: BLE001
                self._off("log", e)

    def finish(self) -> None:
        if self.wb is not None:
            try:
                self.wb.finish()
            except Exception as e:  # noqa: BLE001
                self._off("finish", e)


def _disk_full(e: BaseException, path: Path) -> bool:
    """Whether an error of wandb's is the run folder's filesystem running out of space."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free < LOW_SPACE
    except (OSError, StopIteration):
        return False


class MetricsLog:
    """metrics.jsonl, wandb and the progress bar on rank 0 (other ranks only join the reductions); throughput
    over the steps since the last record. A failed write goes to `guard` (the loop stops every rank with it)."""

    def __init__(self, run: RunConfig, rundir: Path, info: dict, signals, step: int, tokens: int,
                 guard: WriteGuard | None = None) -> None:
        self.run, self.rank = run, dist.get_rank()
        self.mcfg = run.model_config()
        # the top-k pass whose FLOPs the step computes: the Triton kernel's kept keys, or the PyTorch path's choice
        probe = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")
        self.attend = "gather" if use_asam_kernel(probe) else "auto"
        self.t0, self.tok0 = time.time(), tokens
        self.guard = guard or WriteGuard()
        self.path = rundir / "metrics.jsonl"
        self.wb = self.bar = self.file = None
        if self.rank == 0:
            from tqdm import tqdm

            self.wb = WandbLog(run, rundir, info, signals, self.guard)
            self.bar = tqdm(total=run.steps, initial=step, desc="pretrain", file=sys.stdout, dynamic_ncols=True)
            self.file = self.guard.run(lambda: open(self.path, "a"), self.path)

    def _append(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def write(self, rec: dict) -> None:
        if self.rank == 0 and self.guard.error is None:
            self.guard.run(lambda: self._append(rec), self.path)
            if self.guard.error is None:
                self.wb.log(rec)
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "val_ppl", "lr")})

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def validation(self, step: int, loss: float) -> None:
        self.write({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})

    def training(self, step: int, sums: dict, *, engine, sched, num_steps: int, tokens: int, skipped: int,
                 extra: dict | None = None) -> None:
        """Collective: the mean over ranks of every summed value, with lr, grad norm and throughput."""
        world = dist.get_world_size()
        tps = (tokens - self.tok0) / max(time.time() - self.t0, 1e-9)
        gn = engine.get_global_grad_norm()
        names = list(sums)
        means = all_means([sums[n][0] / sums[n][1] for n in names])  # one read of the device, one all-reduce
        rec = {"step": step, **dict(zip(names, means)),
               "lr": sched.get_last_lr()[0], "grad_norm": float(gn) if gn is not None else None,
               "num_steps": num_steps, "tokens_seen": tokens, "tokens_per_s": tps,
               "tflops": tps * flops_per_token(self.mcfg, self.run.seq_len, num_steps, attend=self.attend,
                                                 documents=self.run.data.document_mask,
                                                 key_runs=self.run.sequence_parallel_size == 1) / 1e12,
               "skipped_micro_batches": skipped, "peak_mem_gib": peak_memory_gib()}
        peak = peak_tflops()
        if peak:
            rec["mfu"] = rec["tflops"] / world / peak
        self.write({**rec, **(extra or {})})
        self.t0, self.tok0 = time.time(), tokens

    def close(self) -> None:
        if self.rank == 0:
            self.bar.close()
            if self.file is not None:
                self.guard.run(self.file.close, self.path)
            self.wb.finish()


def announce(run: RunConfig, rundir: Path, info: dict, ds: dict) -> None:
    """Rank 0: write run_info.json and print the resolved configs, so a run is reproducible from its log."""
    from pretrain.checkpoint.run_folder import RUN_INFO

    with writing(rundir / RUN_INFO):
        write_atomic(rundir / RUN_INFO, json.dumps(info, indent=1, default=str))
    print(f"[pretrain] precision={info['precision']} world={info['world_size']} git={info['git_sha']} "
          f"versions={info['versions']}\n[pretrain] run config: {json.dumps(run.to_dict())}\n"
          f"[pretrain] model config: {json.dumps(info['model_config'])}\n[pretrain] ds config: {json.dumps(ds)}",
          flush=True)
