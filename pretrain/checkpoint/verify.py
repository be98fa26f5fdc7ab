"""Is a tag loadable, and with which layout? Checked before anything of it is read.

- A tag with a manifest: every listed file exists with its size and sha256 (collective: ranks hash disjoint
  files; `quick` checks sizes only).
- A tag of the format before manifests (run_config.json, no run_state.json): its DeepSpeed files open with the
  safe loader of `pretrain.checkpoint.ds_recovery` (each rank its share). A tag with run_state.json was written
  with a manifest, so one without it is damaged.
- Layout (world size, ZeRO stage, expert-parallel backend and size): the manifest's record, or read from the
  DeepSpeed files of an older tag.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain import distributed as D
from pretrain.checkpoint.ds_recovery import legacy_check, legacy_layout
from pretrain.checkpoint.tags import COMPLETE, MANIFEST, RUN_STATE, file_digest, has_run_state, read_manifest


def verify_tag(tag: Path, *, quick: bool = False, skip: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> str | None:
    """Check `tag` against its manifest (collective: ranks hash disjoint files). -> None if good, else one line
    naming the first bad file. Files whose names start with one of `skip` are not checked (MODEL_FILES: a
    reader of the DeepSpeed shards only); with `only`, just the files whose names start with one of them (MODEL_FILES:
    a reader of the model folder). A tag of the format before manifests (no run_state.json) is checked
    for completeness and readable DeepSpeed files only; a tag with run_state.json but no manifest is damaged."""
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
            names = sorted(n for n in files if not n.startswith(skip) and (not only or n.startswith(only)))
            for i, name in enumerate(names):
                p, want = tag / name, files[name]
                if not p.is_file():
                    problem = problem or f"{p} is missing (listed in {MANIFEST})"
                elif p.stat().st_size != want["size"]:
                    problem = problem or (f"{p} has {p.stat().st_size} bytes, {MANIFEST} says {want['size']} "
                                          f"(truncated or overwritten)")
                elif not quick and i % D.world_size() == D.rank() and file_digest(p)["sha256"] != want["sha256"]:
                    problem = problem or f"{p} does not match its sha256 in {MANIFEST} (corrupted)"
    elif has_run_state(tag):  # written with a manifest: without it, nothing vouches for the other files
        problem = (f"{mpath} is missing from a tag written with one ({RUN_STATE} is there): the tag is damaged or "
                   f"was altered")
    else:
        problem = legacy_check(tag, D.rank(), D.world_size())
    found = [x for x in D.all_gather_object(problem) if x]
    return found[0] if found else None


def tag_layout(tag: Path) -> dict | None:
    """{"world_size", "zero_stage", "ep_backend", "ep_size"} the tag was written with (None: unknown)."""
    man = read_manifest(tag)
    return man["layout"] if man and "layout" in man else legacy_layout(tag)
