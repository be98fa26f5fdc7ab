"""Choosing the checkpoint to continue from, and loading a tag written with this run's layout.

- `--resume auto`: the newest complete tag that verifies (`pretrain.checkpoint.verify`); a damaged newer one is
  skipped with a warning naming the bad file. `--resume TAG|PATH`: exactly that tag, or an error (it is never
  replaced by another). `--resume none`: a fresh run.
- A tag of this run's layout loads through `engine.load_checkpoint` (bit-exact continuation) plus each rank's RNG
  state; another layout goes through `pretrain.checkpoint.reshard`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pretrain import distributed as D
from pretrain.checkpoint.tags import COMPLETE, TAG_FMT, RunFolderError, all_tags, tag_state, tag_step
from pretrain.checkpoint.verify import tag_layout, verify_tag


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


def load_rng(tag: Path) -> bool:
    f = tag / f"rng_rank{D.rank()}.pt"
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
