"""Writing one checkpoint tag, completely or not at all (collective).

Order: DeepSpeed's files (every rank), rng_rank{r}.pt (every rank), the consolidated fp32 model (gathered to rank
0: `pretrain.model_dir`), run_state.json, then the manifest (ranks hash disjoint files), COMPLETE and `latest`.
Training waits only for the first three (`begin_tag`): the model folder, run_state.json and the hashing can run in a
thread of each rank while training goes on (`background`), and `finish_tag` writes the manifest and COMPLETE once
every rank's share is on disk. A kill before that leaves a tag without COMPLETE, which resume skips.
An error of any rank (a full disk, EIO) is held back until DeepSpeed's own collectives are done (`_HeldErrors`), so
no rank waits forever on a rank that failed; then the partial tag is removed, the previous checkpoint stays, and
every rank raises `CheckpointSaveError` naming the cause and path.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pretrain import distributed as D
from pretrain.checkpoint.run_folder import mark_latest
from pretrain.checkpoint.tags import (COMPLETE, MANIFEST, RUN_STATE, CheckpointSaveError, checkpoint_files,
                                      complete_tags, file_digest, remove_tag, tag_name)
from pretrain.run_files import describe_os_error, write_atomic


class _HeldErrors:
    """Wraps the engine's checkpoint writer so an OS error on one rank is recorded, not raised, until every rank
    has passed DeepSpeed's collectives; `run(fn, path)` does the same for our own writes."""

    def __init__(self, engine) -> None:
        self.errors: list[str] = []
        self.engine = engine
        ce = engine.checkpoint_engine
        self._orig = ce.save, ce.makedirs
        ce.save = self._wrap(ce.save)
        ce.makedirs = self._wrap(ce.makedirs)

    def _wrap(self, fn):
        def call(*a, **k):
            if fn.__name__ == "makedirs":
                path = k.get("path", a[0] if a else "?")
            else:  # save(state_dict, path)
                path = k.get("path", a[1] if len(a) > 1 else "?")
            return self.run(lambda: fn(*a, **k), path)
        return call

    def run(self, fn, path):
        if self.errors:
            return None  # the save is lost already: write nothing more on this rank
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - torch, safetensors and OS errors alike; reported after the save
            self.errors.append(f"rank {D.rank()}: {describe_os_error(e, path)}")
            return None

    def restore(self) -> None:
        ce = self.engine.checkpoint_engine
        ce.save, ce.makedirs = self._orig


def gather_model_state(engine, model_cfg) -> dict[str, torch.Tensor] | None:
    """Collective. The full fp32 weights under the training model's keys on rank 0 (None elsewhere), from the
    optimizer's fp32 masters (`deepspeed.utils.safe_get_full_fp32_param`, any ZeRO stage); expert shards of
    every expert-parallel rank are mapped back by pretrain.expert_parallel's layout functions."""
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.expert_parallel import from_autoep_layout, from_native_layout

    module = engine.module
    plan = getattr(module, "_expert_parallel_plan", None)
    backend = plan.backend if plan else "none"
    rank = D.rank()
    shared, experts = {}, {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = p.detach()
        full = full.detach().float().cpu().reshape(tuple(getattr(p, "ds_shape", p.shape))).clone()
        is_expert = (backend == "native" and getattr(p, "allreduce", True) is False) or \
                    (backend == "autoep" and re.fullmatch(r".*\.experts\.w[123]", name) is not None)
        if is_expert:
            experts[name] = full
        elif rank == 0:
            shared[name] = full
    if rank == 0:
        from pretrain.model_dir import model_keys

        ours = model_keys(model_cfg).shapes
        for name, b in module.named_buffers():
            if name in ours:  # AutoEP layers add routing statistics (tokens_per_expert) that are not weights
                shared[name] = b.detach().cpu().clone()
    if backend == "none":
        return shared if rank == 0 else None
    if backend == "native":
        ep_rank = rank % plan.ep_size  # pretrain.expert_parallel: consecutive ranks form one EP group
    else:
        from pretrain.expert_parallel import _autoep_layers

        ep_rank = _autoep_layers(module)[0].ep_rank
    parts = D.all_gather_object((ep_rank, experts))  # ranks of one EP rank hold the same (whole) local experts
    if rank != 0:
        return None
    by_ep = {}
    for item in parts:
        if item is not None and item[0] not in by_ep:
            by_ep[item[0]] = item[1]
    sds = [{**shared, **by_ep[e]} if e == 0 else by_ep[e] for e in range(plan.ep_size)]
    sd = from_native_layout(sds) if backend == "native" else from_autoep_layout(sds)
    return sd


class PendingTag:
    """A tag whose DeepSpeed and RNG files are written; its model folder, run state and hashes are being written by
    a thread of each rank (`begin_tag(background=True)`), and `finish_tag` completes it (collective)."""

    def __init__(self, run_dir: Path, step: int, layout: dict, held: "_HeldErrors") -> None:
        self.dir, self.step, self.layout, self.held = run_dir, step, layout, held
        self.tdir = run_dir / tag_name(step)
        self.digests: dict = {}
        self.thread: threading.Thread | None = None
        self.timings: dict[str, float] = {}

    def busy(self) -> bool:
        """This rank's share is still being written (the loop agrees across ranks before `finish_tag`)."""
        return self.thread is not None and self.thread.is_alive()


def begin_tag(engine, *, run_dir: str | Path, step: int, state: dict, layout: dict, model_cfg, tokenizer_dir,
              write_model: bool = True, background: bool = False) -> PendingTag:
    """Collective. The part of a save that training waits for: DeepSpeed's files, each rank's RNG state and the
    gather of the consolidated model to rank 0. The rest (the model folder and run_state.json on rank 0, each rank's
    share of the hashes) runs in a thread when `background`, else here; `finish_tag` writes the manifest and
    COMPLETE."""
    from pretrain.model_dir import save_model_dir

    d = Path(run_dir)
    t0 = time.perf_counter()
    rank = D.rank()
    held = _HeldErrors(engine)
    pending = PendingTag(d, step, layout, held)
    tdir = pending.tdir
    if rank == 0 and tdir.exists():  # an earlier interrupted save of the same step
        remove_tag(tdir)
    D.barrier()
    try:
        engine.save_checkpoint(str(d), tag=tdir.name, client_state=dict(state), save_latest=False)
    finally:
        held.restore()
    held.run(lambda: torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                 "python": random.getstate(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                                tdir / f"rng_rank{rank}.pt"), tdir / f"rng_rank{rank}.pt")
    t1 = time.perf_counter()
    sd = gather_model_state(engine, model_cfg) if write_model else None
    t2 = time.perf_counter()
    D.barrier()
    # each rank hashes every world-th file of the DeepSpeed / RNG files; rank 0 also the files it writes below
    names = D.broadcast_object(checkpoint_files(tdir) if rank == 0 and tdir.is_dir() else [])
    share = [n for i, n in enumerate(names) if i % D.world_size() == rank]

    def rest() -> None:
        t = time.perf_counter()
        mine = share
        if rank == 0:
            if sd is not None:
                held.run(lambda: save_model_dir(tdir, sd, model_cfg, tokenizer_dir), tdir)
            held.run(lambda: write_atomic(tdir / RUN_STATE, json.dumps(state, indent=1, default=str)),
                     tdir / RUN_STATE)
            mine = share + [n for n in checkpoint_files(tdir) if n not in names] if tdir.is_dir() else share
        for n in mine:
            got = held.run(lambda n=n: file_digest(tdir / n), tdir / n)
            if got is not None:
                pending.digests[n] = got
        pending.timings["background_s"] = time.perf_counter() - t

    if background:
        pending.thread = threading.Thread(target=rest, name=f"save-{tdir.name}", daemon=True)
        pending.thread.start()
    else:
        rest()
    pending.timings.update(deepspeed_s=t1 - t0, gather_s=t2 - t1, blocked_s=time.perf_counter() - t0)
    return pending


def finish_tag(pending: PendingTag) -> Path:
    """Collective. Wait for this rank's background share, then write the manifest (every rank's hashes), COMPLETE
    and `latest`; on any rank's error remove the tag and raise CheckpointSaveError on every rank."""
    if pending.thread is not None:
        pending.thread.join()
    d, tdir, rank = pending.dir, pending.tdir, D.rank()
    digests = {}
    for part in D.all_gather_object(pending.digests):
        digests.update(part)
    errors = [e for part in D.all_gather_object(pending.held.errors) for e in part]
    if not errors and rank == 0:
        man = {"tag": tdir.name, "step": pending.step, "layout": pending.layout, "files": digests,
               "written": time.time(), "deepspeed": __import__("deepspeed").__version__, "torch": torch.__version__}
        try:
            write_atomic(tdir / MANIFEST, json.dumps(man, indent=1))
            write_atomic(tdir / COMPLETE, f"{time.time()}\n")
            mark_latest(d, tdir)
        except OSError as e:
            errors.append(f"rank 0: {describe_os_error(e, tdir)}")
    errors = D.broadcast_object(errors)
    if errors:
        if rank == 0:
            remove_tag(tdir)
        D.barrier()
        prev = complete_tags(d)
        raise CheckpointSaveError(f"saving checkpoint {tdir} failed: {errors[0]}"
                                  + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                                  + ". The partial save was removed; "
                                  + (prev[-1].name if prev else "no earlier checkpoint")
                                  + (" is intact and --resume auto continues from it" if prev else " exists"))
    return tdir


def write_tag(engine, **kw) -> Path:
    """Collective. Write a tag completely or not at all, in the calling thread (`begin_tag` + `finish_tag`)."""
    return finish_tag(begin_tag(engine, **kw, background=False))
