"""Activation memory kept for backward, measured (not estimated), with and without activation checkpointing.

Counts the unique tensor storages autograd saves during one forward (`torch.autograd.graph.
saved_tensors_hooks`) plus, with checkpointing on, the inputs each checkpointed unit keeps for its
recompute. Non-reentrant `torch.utils.checkpoint` packs the tensors saved inside a unit with its own inner
hooks (recomputed in backward), so they do not reach the outer hook: what is counted is what stays alive.
Used by bench/act_checkpoint_memory.py and tests/pretrain/test_act_memory.py.
"""

from __future__ import annotations

import torch

from pretrain.engine import checkpoint_fn


def saved_bytes(model, input_ids: torch.Tensor, num_steps: int, checkpointing: bool,
                labels: torch.Tensor | None = None) -> int:
    """labels: default input_ids (a sequence-parallel model takes its shard's shifted labels)."""
    seen: dict[int, int] = {}

    def count(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    def pack(t):
        count(t)
        return t

    def ckpt(function, *args):
        for a in args:
            count(a)
        return checkpoint_fn(function, *args)

    model.set_checkpointing(ckpt if checkpointing else None, every=1)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids, labels=input_ids if labels is None else labels, num_steps=num_steps)
        del out
    finally:
        model.set_checkpointing(None)
    return sum(seen.values())
