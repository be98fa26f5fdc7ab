"""Hand-made checkpoint tags for the checkpoint unit tests (no DeepSpeed): files, a manifest, markers."""

from __future__ import annotations

import json

from pretrain.checkpoint.tags import COMPLETE, MANIFEST, RUN_STATE, checkpoint_files, file_digest, tag_name


def make_tag(d, step, complete=True, files=None, state=None):
    """RUN_DIR/step_N with `files` ({name: bytes}); complete: a manifest of them, COMPLETE and run_state.json."""
    t = d / tag_name(step)
    t.mkdir(parents=True)
    for name, data in (files or {"a.pt": b"x" * 10}).items():
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(data)
    if complete:
        (t / RUN_STATE).write_text(json.dumps(state or {"step": step}))
        man = {"files": {n: file_digest(t / n) for n in checkpoint_files(t)},
               "layout": {"world_size": 1, "zero_stage": 3, "ep_backend": "none", "ep_size": 1}}
        (t / MANIFEST).write_text(json.dumps(man))
        (t / COMPLETE).write_text("x")
    return t
