"""Checkpoint tags: names, markers, manifests and listing (no DeepSpeed here).

    RUN_DIR/step_XXXXXXXX/   one tag: DeepSpeed's files, rng_rank{r}.pt, the consolidated model (model.safetensors,
                             model_config.yaml, tokenizer/: pretrain.model_dir), run_state.json (our client state),
                             manifest.json (size + sha256 of every other file, layout), then COMPLETE, written last

A tag is *complete* when it holds COMPLETE. Every tag written with run_state.json also has a manifest; tags of the
format before manifests (run_config.json, no manifest) are checked by `pretrain.checkpoint.verify` instead.

Readers (pretrain.convert, pretrain.evaluate, init_from) hold a shared flock on TAG/.readers while they read
(`reading`); the job's keep_last removes a tag only after taking that lock exclusively without waiting
(`try_remove_tag`), so a tag being read stays until a later save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

TAG_FMT = "step_{:08d}"
TAG_RX = re.compile(r"step_(\d{8,})")
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"
LEGACY_RUN_STATE = "run_config.json"  # the client state of tags written before run_state.json
MODEL_FILES = ("model.safetensors", "model_config.yaml", "tokenizer/")  # the consolidated model folder's files
READERS = ".readers"  # the readers' lock file (hidden: no manifest lists it)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, holds another run, no usable checkpoint)."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the partial tag was removed and the previous checkpoint is intact."""


class TagGone(FileNotFoundError):
    """A tag was removed (or lost COMPLETE) while it was chosen or read: a running job's keep_last."""

    def __init__(self, tag: Path) -> None:
        super().__init__(f"{tag} was removed while it was being read: the job writing {Path(tag).parent} keeps only "
                         f"its keep_last newest checkpoints. Retry (a run folder picks its newest complete tag), or "
                         f"name a tag the job keeps")
        self.tag = tag


def tag_name(step: int) -> str:
    return TAG_FMT.format(step)


def tag_step(path: str | Path) -> int | None:
    """The step of a tag folder (step_00000100 -> 100), None for any other name."""
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


def is_complete(tag: Path) -> bool:
    return (Path(tag) / COMPLETE).is_file()


def remove_tag(tag: Path) -> None:
    """Markers first, so a tag half deleted by a kill is never taken for a complete one."""
    for name in (COMPLETE, MANIFEST):
        (tag / name).unlink(missing_ok=True)
    shutil.rmtree(tag, ignore_errors=True)


def try_remove_tag(tag: Path) -> bool:
    """Remove `tag` unless a reader holds it (`reading`); -> whether it was removed. Without file locks on this
    filesystem it is removed (readers then say that the tag went away, `TagGone`)."""
    import fcntl

    try:
        fd = os.open(tag / READERS, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return True  # already gone
    except OSError:
        remove_tag(tag)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:
        pass  # no flock here
    try:
        remove_tag(tag)  # under the exclusive lock: a reader waiting for it finds COMPLETE gone
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def reading(tag: Path):
    """Hold `tag` against removal by a running job's keep_last while the block reads it (a shared flock on
    TAG/.readers). Raises TagGone when the tag is no longer complete once the lock is held. Where the folder
    cannot be written or has no file locks, the block runs unprotected."""
    import fcntl

    tag = Path(tag)
    if not (tag / COMPLETE).is_file():  # being removed (markers go first): creating the lock file in it would
        raise TagGone(tag)              # leave the folder behind
    try:
        fd = os.open(tag / READERS, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise TagGone(tag) from None
    except OSError:
        fd = None  # a read-only copy of a run: nothing can remove it under us
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while the job removes it
        except OSError:
            pass
    try:
        if not (tag / COMPLETE).is_file():
            raise TagGone(tag)
        yield tag
    finally:
        if fd is not None:
            os.close(fd)


# --- manifests --------------------------------------------------------------------------------------------
def file_digest(path: Path) -> dict:
    """{"size", "sha256"} of a file, fsynced first: its data is on stable storage before a manifest vouches for it."""
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "sha256")
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def checkpoint_files(tag: Path) -> list[str]:
    """The files a manifest lists: every file of the tag but the markers and hidden (temporary, lock) files."""
    skip = {COMPLETE, MANIFEST}
    return sorted(str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file() and p.name not in skip
                  and not p.name.startswith("."))


def read_manifest(tag: Path) -> dict | None:
    try:
        return json.loads((tag / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def has_run_state(tag: Path) -> bool:
    """Whether the tag was written in the manifest format (run_state.json): such a tag must have a manifest."""
    return (tag / RUN_STATE).is_file()


def tag_state(tag: Path) -> dict:
    """Our client state of a tag: step, tokens_seen, consumed_samples, skipped_micro_batches, configs."""
    for name in (RUN_STATE, LEGACY_RUN_STATE):
        p = tag / name
        if p.is_file():
            return json.loads(p.read_text())
    raise RunFolderError(f"{tag} has neither {RUN_STATE} nor {LEGACY_RUN_STATE}: not a checkpoint written by "
                         f"pretrain/main.py")
