"""The run folder: one writer, checkpoints that prove themselves complete, resume with fallback.

    RUN_DIR/LOCK                 host and pid of the job writing here (an flock held for the job's life)
    RUN_DIR/step_XXXXXXXX/       one checkpoint: DeepSpeed's files, rng_rank{r}.pt, the consolidated model
                                 (model.safetensors, model_config.yaml, tokenizer/: pretrain.model_dir),
                                 run_state.json, manifest.json (size + sha256 of every file, ZeRO stage,
                                 world size, expert-parallel layout), then COMPLETE, written last
    RUN_DIR/latest               name of the newest complete tag
    RUN_DIR/superseded/          tags newer than the one a run was resumed from, moved aside
    RUN_DIR/metrics.jsonl, run_info.json, FINISHED, wandb/   (pretrain.trainer)

- Saving: every rank writes its DeepSpeed files; errors of any rank (a full disk, EIO) are held back until
  DeepSpeed's own collectives are done, so no rank waits forever on a rank that failed; then the partial tag is
  removed, the previous checkpoint stays, and every rank raises `CheckpointSaveError` naming the cause and path.
- Loading: the manifest is verified (ranks hash disjoint subsets of the files) before anything is read. With
  `--resume auto` a damaged or unusable newest tag is skipped for the previous complete one with a warning
  naming the bad file; a tag asked for by name (`--resume TAG|PATH`) is never replaced.
- A tag written with another world size, ZeRO stage or expert-parallel size is resharded: DeepSpeed's
  `ds_to_universal` writes every parameter's fp32 value and Adam moments whole, the engine is built from those
  weights and the moments are set with `deepspeed.utils.safe_set_full_optimizer_state`. Expert-parallel
  layouts are not resharded (`check_reshardable` says so and how to continue).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG_FMT = "step_{:08d}"
TAG_RX = re.compile(r"step_(\d{8,})")
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"
LATEST = "latest"
LOCK = "LOCK"
FINISHED = "FINISHED"
SUPERSEDED = "superseded"
RESHARD_DIR = ".reshard"
# Files and folders a run writes in its run folder; --overwrite removes exactly these.
RUN_FILES = ("metrics.jsonl", "run_info.json", FINISHED, LATEST, "wandb", SUPERSEDED, RESHARD_DIR)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, holds another run, no usable checkpoint)."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the partial tag was removed and the previous checkpoint is intact."""


# --- small helpers ----------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _bcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tag_step(path: Path) -> int | None:
    m = TAG_RX.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def all_tags(run_dir: str | Path) -> list[Path]:
    """Every step_* folder of the run folder (complete or not), oldest first."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and tag_step(p) is not None), key=tag_step)


def complete_tags(run_dir: str | Path) -> list[Path]:
    return [p for p in all_tags(run_dir) if (p / COMPLETE).is_file()]


def describe_os_error(exc: BaseException, path: str | Path) -> str:
    """One line naming the cause of a failed write: ENOSPC / EDQUOT / EROFS / EACCES, or torch's opaque
    stream errors (`basic_ios::clear`, `file write failed`) diagnosed from the free space left."""
    p = Path(path)
    err = exc.errno if isinstance(exc, OSError) else None
    probe = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    free_s = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    if err in (errno.ENOSPC, errno.EDQUOT) or (err is None and free is not None and free < 64 * 2**20):
        quota = ", quota exceeded" if err == errno.EDQUOT else ""
        return (f"no space left on device writing {p} ({free_s} on its filesystem{quota}): "
                f"free space or lower keep_last, then resume with --resume auto")
    if err == errno.EROFS:
        return f"read-only filesystem: cannot write {p}; point run_dir at a writable folder"
    if err in (errno.EACCES, errno.EPERM):
        return f"permission denied writing {p}; fix the folder's permissions or choose another run_dir"
    return f"cannot write {p}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} ({free_s})"


# --- the lock ---------------------------------------------------------------------------------------------
class RunLock:
    """One writer per run folder: an exclusive flock on RUN_DIR/LOCK held by global rank 0 for the job's life.

    The kernel drops the flock when the process dies (even by SIGKILL), so a lock left by a dead job is taken
    over with a note; the file's content (host, pid, start, Slurm job) names a live holder in the error. Where
    the filesystem has no flock (ENOLCK/ENOSYS/EOPNOTSUPP), the content alone decides: a holder on this host
    that no longer runs is stale; a holder on another host must be removed by hand (the error says how).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.note: str | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict) -> RunFolderError:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
               + (f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else "")) if holder else "another job"
        return RunFolderError(f"run folder {self.path.parent} is in use by {who} (lock {self.path}): two jobs writing "
                              f"one run folder overwrite each other's checkpoints. Wait for that job to end or stop "
                              f"it, or give this run another run_dir")

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self._read()) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            holder = self._read()  # no flock here: decide from the content
            if holder and not holder.get("released"):
                if holder.get("host") != socket.gethostname():
                    os.close(fd)
                    raise RunFolderError(
                        f"{self.path} names pid {holder.get('pid')} on host {holder.get('host')} and this filesystem "
                        f"has no file locks to tell whether it still runs: if that job has ended, delete "
                        f"{self.path}; otherwise give this run another run_dir") from None
                if _pid_alive(int(holder.get("pid", -1))):
                    os.close(fd)
                    raise self._busy(holder) from None
        prev = holder if holder is not None else self._read()
        if prev and not prev.get("released") and prev.get("pid") != os.getpid():
            self.note = (f"[checkpoint] took over the lock of pid {prev.get('pid')} on {prev.get('host')} (started "
                         f"{prev.get('started')}): that job ended without releasing it")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            rec = {**self._read(), "released": True}
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(rec).encode(), 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_run_folder(run_dir: str | Path) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises the same RunFolderError when it is held elsewhere."""
    lock, err = None, None
    if _rank() == 0:
        try:
            lock = RunLock(run_dir).acquire()
            if lock.note:
                print(lock.note, flush=True)
        except (RunFolderError, OSError) as e:
            err = str(e) if isinstance(e, RunFolderError) else describe_os_error(e, Path(run_dir) / LOCK)
    err = _bcast(err)
    if err:
        raise RunFolderError(err)
    return lock


def prepare_fresh(run_dir: str | Path, overwrite: bool) -> None:
    """Rank 0, holding the lock, before a run without --resume: refuse a folder that holds checkpoints of
    another run unless `overwrite`, which removes them and the run's own files (other files stay)."""
    d = Path(run_dir)
    tags = all_tags(d)
    finished = (d / FINISHED).exists()
    if not (tags or finished):
        for name in ("metrics.jsonl", LATEST):  # a run killed before its first save left only these
            (d / name).unlink(missing_ok=True)
        return
    if not overwrite:
        what = f"{len(tags)} checkpoint folder(s) ({tags[-1].name} the newest)" if tags else f"a {FINISHED} marker"
        raise RunFolderError(f"run folder {d} already holds {what} of an earlier run: continue it with --resume auto, "
                             f"or start fresh in a new run_dir, or pass --overwrite to delete that run's checkpoints "
                             f"and logs")
    for t in tags:
        remove_tag(t)
    for name in RUN_FILES:
        p = d / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    print(f"[checkpoint] --overwrite: removed {len(tags)} checkpoint(s) and the logs of the earlier run in {d}",
          flush=True)


def remove_tag(tag: Path) -> None:
    """Markers first, so a tag half deleted by a kill is never taken for a complete one."""
    for name in (COMPLETE, MANIFEST):
        (tag / name).unlink(missing_ok=True)
    shutil.rmtree(tag, ignore_errors=True)


# --- manifests --------------------------------------------------------------------------------------------
def file_digest(path: Path) -> dict:
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "sha256")
        os.fsync(f.fileno())  # data on stable storage before the manifest vouches for it
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _checkpoint_files(tag: Path) -> list[str]:
    skip = {COMPLETE, MANIFEST}
    return sorted(str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file() and p.name not in skip
                  and not p.name.startswith("."))


MODEL_FILES = ("model.safetensors", "model_config.yaml", "tokenizer/")


def verify_tag(tag: Path, *, quick: bool = False, skip: tuple[str, ...] = ()) -> str | None:
    """Check `tag` against its manifest (collective: ranks hash disjoint files). -> None if good, else one line
    naming the first bad file. Files whose names start with one of `skip` are not checked (MODEL_FILES: a
    reader of the DeepSpeed shards only). A tag without a manifest (written before manifests existed) is checked
    for completeness and readable DeepSpeed files only."""
    problem = None
    mpath = tag / MANIFEST
    if not (tag / COMPLETE).is_file():
        problem = f"{tag} has no {COMPLETE} marker (its save did not finish)"
    elif mpath.is_file():
        try:
            man = json.loads(mpath.read_text())
            files = man["files"]
        except (OSError, ValueError, KeyError) as e:
            problem = f"{mpath} is unreadable ({type(e).__name__}: {e})"
        else:
            names = sorted(n for n in files if not n.startswith(skip))
            for i, name in enumerate(names):
                p, want = tag / name, files[name]
                if not p.is_file():
                    problem = problem or f"{p} is missing (listed in {MANIFEST})"
                elif p.stat().st_size != want["size"]:
                    problem = problem or (f"{p} has {p.stat().st_size} bytes, {MANIFEST} says {want['size']} "
                                          f"(truncated or overwritten)")
                elif not quick and i % _world() == _rank() and file_digest(p)["sha256"] != want["sha256"]:
                    problem = problem or f"{p} does not match its sha256 in {MANIFEST} (corrupted)"
    else:
        problem = _legacy_check(tag)
    found = [x for x in _gather(problem) if x]
    return found[0] if found else None


def _legacy_check(tag: Path) -> str | None:
    """A tag from before manifests: each rank opens its share of the DeepSpeed files with a safe loader."""
    from pretrain.ds_recovery import CheckpointError, load_ds_file

    files = sorted(f for f in tag.glob("*.pt") if f.name.endswith(("model_states.pt", "optim_states.pt")))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return f"{tag} holds no DeepSpeed model-state file"
    for i, f in enumerate(files):
        if i % _world() == _rank():
            try:
                load_ds_file(f)
            except CheckpointError as e:
                return str(e)
    return None


def read_manifest(tag: Path) -> dict | None:
    try:
        return json.loads((tag / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


# --- layout -----------------------------------------------------------------------------------------------
def _legacy_layout(tag: Path) -> dict | None:
    from pretrain.ds_recovery import load_ds_file

    f = next(iter(sorted(tag.glob("zero_pp_rank_0_mp_rank_00_model_states.pt"))), tag / "mp_rank_00_model_states.pt")
    if not f.is_file():
        return None
    m = load_ds_file(f)
    ds = m.get("ds_config") or {}
    ep = ds.get("expert_parallel") or {}
    nat = ds.get("native_moe") or {}
    backend = "autoep" if ep.get("enabled") else "native" if nat.get("enabled") else "none"
    return {"world_size": int(m.get("dp_world_size", 1)),
            "zero_stage": int((ds.get("zero_optimization") or {}).get("stage", 0)), "ep_backend": backend,
            "ep_size": int({"autoep": ep.get("autoep_size", 1), "native": nat.get("ep_size", 1)}.get(backend, 1))}


def tag_layout(tag: Path) -> dict | None:
    man = read_manifest(tag)
    return man["layout"] if man and "layout" in man else _legacy_layout(tag)


def tag_state(tag: Path) -> dict:
    """Our client state of a tag: step, tokens_seen, consumed_samples, skipped_micro_batches, configs."""
    p = tag / RUN_STATE
    if p.is_file():
        return json.loads(p.read_text())
    legacy = tag / "run_config.json"  # tags written before run_state.json
    if legacy.is_file():
        return json.loads(legacy.read_text())
    raise RunFolderError(f"{tag} has neither {RUN_STATE} nor run_config.json: not a checkpoint written by "
                         f"pretrain/main.py")


# --- choosing what to resume ------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    tag: Path
    state: dict
    layout: dict | None
    skipped: list[str] = field(default_factory=list)  # warnings about newer tags that were not usable


def find_resume(run_dir: str | Path, resume: str) -> ResumePoint | None:
    """Collective. `resume`: "none" -> None; "auto" -> the newest complete tag that verifies (newer damaged
    ones named in `.skipped`), None when the folder has no complete tag; a tag name or a tag folder path ->
    exactly that one, or RunFolderError."""
    if resume == "none":
        return None
    d = Path(run_dir)
    if resume != "auto":
        tag = d / resume if (d / resume).is_dir() else Path(resume)
        if not tag.is_dir() or tag_step(tag) is None:
            raise RunFolderError(f"--resume {resume}: no checkpoint folder {tag} (give auto, a tag name in {d} such "
                                 f"as {TAG_FMT.format(100)}, or a tag folder path)")
        bad = verify_tag(tag)
        if bad:
            raise RunFolderError(f"--resume {resume}: {bad}. Choose another tag (--resume auto takes the newest "
                                 f"usable one)")
        return ResumePoint(tag, tag_state(tag), tag_layout(tag))
    skipped = []
    for tag in reversed(all_tags(d)):
        if not (tag / COMPLETE).is_file():
            continue
        bad = verify_tag(tag)
        if bad is None:
            try:
                return ResumePoint(tag, tag_state(tag), tag_layout(tag), skipped)
            except (RunFolderError, ValueError, OSError) as e:
                bad = str(e)
        skipped.append(f"skipping {tag.name}: {bad}")
    if skipped:
        raise RunFolderError(f"no usable checkpoint in {d}: " + "; ".join(skipped) + ". Repair or remove them, or "
                             "start fresh with --resume none --overwrite")
    return None


def set_aside_newer(run_dir: str | Path, point: ResumePoint) -> list[str]:
    """Rank 0: tags of this run folder newer than the resume point (an abandoned continuation, or incomplete
    saves) are moved to RUN_DIR/superseded/, so saves of the resumed run are never mistaken for older ones."""
    d = Path(run_dir)
    step = tag_step(point.tag)
    moved = []
    for t in all_tags(d):
        if tag_step(t) > step:
            if not (t / COMPLETE).is_file():
                remove_tag(t)  # nothing loadable: an interrupted save
                moved.append(f"removed the incomplete save {t.name}")
                continue
            dest = d / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S")
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(t, dest / t.name)
            moved.append(f"moved {t.name} to {dest.relative_to(d)}/ (newer than the resume point)")
    return moved


def trim_metrics(path: Path, step: int) -> None:
    """Rank 0: drop metrics.jsonl records after `step` (they belong to the lost part of an interrupted run)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by a kill
    _write_atomic(path, "".join(k + "\n" for k in keep))


# --- saving -----------------------------------------------------------------------------------------------
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
            self.errors.append(f"rank {_rank()}: {describe_os_error(e, path)}")
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
    rank = _rank()
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
        from ressformer import build_model

        with torch.device("meta"):
            ours = set(build_model(model_cfg).state_dict())
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
    parts = _gather((ep_rank, experts))  # ranks of one EP rank hold the same (whole) local experts
    if rank != 0:
        return None
    by_ep = {}
    for item in parts:
        if item is not None and item[0] not in by_ep:
            by_ep[item[0]] = item[1]
    sds = [{**shared, **by_ep[e]} if e == 0 else by_ep[e] for e in range(plan.ep_size)]
    sd = from_native_layout(sds) if backend == "native" else from_autoep_layout(sds)
    return sd


def save(engine, *, run_dir: str | Path, step: int, state: dict, layout: dict, model_cfg, tokenizer_dir,
         keep_last: int, write_model: bool = True) -> Path:
    """Collective. Write tag `step` completely or not at all; keep the `keep_last` newest complete tags."""
    from pretrain.model_dir import save_model_dir

    d = Path(run_dir)
    tag = TAG_FMT.format(step)
    tdir = d / tag
    rank = _rank()
    if rank == 0 and tdir.exists():  # an earlier interrupted save of the same step
        remove_tag(tdir)
    _barrier()
    held = _HeldErrors(engine)
    try:
        engine.save_checkpoint(str(d), tag=tag, client_state=dict(state), save_latest=False)
    finally:
        held.restore()
    held.run(lambda: torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                 "python": random.getstate(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                                tdir / f"rng_rank{rank}.pt"), tdir / f"rng_rank{rank}.pt")
    sd = gather_model_state(engine, model_cfg) if write_model else None
    if rank == 0:
        if sd is not None:
            held.run(lambda: save_model_dir(tdir, sd, model_cfg, tokenizer_dir), tdir)
        held.run(lambda: _write_atomic(tdir / RUN_STATE, json.dumps(state, indent=1, default=str)), tdir / RUN_STATE)
    sd = None  # free the gathered copy before hashing
    _barrier()
    # manifest: ranks hash disjoint files, rank 0 writes it, then the COMPLETE marker
    names = _bcast(_checkpoint_files(tdir) if rank == 0 and tdir.is_dir() else [])
    mine = {}
    for i, n in enumerate(names):
        if i % _world() == rank:
            got = held.run(lambda n=n: file_digest(tdir / n), tdir / n)
            if got is not None:
                mine[n] = got
    digests = {}
    for part in _gather(mine):
        digests.update(part)
    errors = [e for part in _gather(held.errors) for e in part]
    if not errors and rank == 0:
        man = {"tag": tag, "step": step, "layout": layout, "files": digests, "written": time.time(),
               "deepspeed": __import__("deepspeed").__version__, "torch": torch.__version__}
        try:
            _write_atomic(tdir / MANIFEST, json.dumps(man, indent=1))
            _write_atomic(tdir / COMPLETE, f"{time.time()}\n")
            _write_atomic(d / LATEST, tag)
        except OSError as e:
            errors.append(f"rank 0: {describe_os_error(e, tdir)}")
    errors = _bcast(errors)
    if errors:
        if rank == 0:
            remove_tag(tdir)
        _barrier()
        prev = complete_tags(d)
        raise CheckpointSaveError(f"saving checkpoint {tdir} failed: {errors[0]}"
                                  + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                                  + ". The partial save was removed; "
                                  + (prev[-1].name if prev else "no earlier checkpoint")
                                  + (" is intact and --resume auto continues from it" if prev else " exists"))
    if rank == 0:
        for old in complete_tags(d)[:-keep_last]:
            remove_tag(old)
    _barrier()
    return tdir


# --- loading ----------------------------------------------------------------------------------------------
def load_rng(tag: Path) -> bool:
    f = tag / f"rng_rank{_rank()}.pt"
    if not f.is_file():
        return False
    s = torch.load(f, weights_only=False)
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    return True


def load_same_layout(engine, tag: Path) -> None:
    """engine.load_checkpoint of a tag written with this run's layout (bit-exact continuation)."""
    path, client = engine.load_checkpoint(str(tag.parent), tag=tag.name)
    if path is None or client is None:
        raise RunFolderError(f"DeepSpeed could not load {tag} (no model-state file for this rank)")
    load_rng(tag)


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


def universal_from(tag: Path, out: Path) -> Path:
    """Rank 0: DeepSpeed's ds_to_universal of `tag` into `out` (each parameter's fp32 value and moments whole)."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
           "--output_folder", str(out), "--num_extract_workers", "2", "--num_merge_workers", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not (out / "zero").is_dir():
        raise RunFolderError(f"ds_to_universal could not convert {tag} for resharding (rc {p.returncode}): "
                             f"{(p.stderr or p.stdout)[-1500:]}")
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
