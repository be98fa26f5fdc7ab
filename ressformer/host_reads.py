"""Which operators of a forward / backward read device data on the host: on a GPU each is a wait of the host on the
stream (the GPU idles until the host has launched the next kernels) and a step CUDA graphs cannot capture.

    with HostReads() as reads:            # counts them: reads.seen, {operator: calls}
        model(ids, labels=ids).loss.backward()

It watches every operator that reaches PyTorch's dispatcher (a TorchDispatchMode), on any device, CPU included,
where nothing waits but the same code would on a GPU: `.item()` / `bool()` / `int()` of a tensor
(_local_scalar_dense, is_nonzero), `torch.equal`, nonzero, masked_select, unique, bincount, indexing with a boolean
mask, repeat_interleave with tensor repeats, custom ops that read inside (HOST_READING_OPS), and Tensor.tolist
(which bypasses the dispatcher on CPU tensors: patched for the duration). Not seen: reads in code that bypasses the
dispatcher (the fused kernels of a compiled graph, C++ extensions reading a data pointer): on CUDA,
torch.cuda.set_sync_debug_mode ("warn" or "error") is the check that sees those; bench/train_throughput.py --sync-check
runs it.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that read device data on the host, or whose output shape depends on it
READING_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2",
                         "unique_dim", "unique_consecutive", "bincount"})
# custom ops of ours that read device data inside (on CPU tensors only; their callers take a static path on CUDA)
HOST_READING_OPS = frozenset({"redo_tied_rows", "experts_loop", "stacked_weight_grad"})


class HostReads(TorchDispatchMode):
    """Counts the operators that read device data on the host (`seen`: {operator: calls}); see the module."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        tensor_repeats = name == "repeat_interleave" and func._overloadname.startswith("Tensor")
        if name in READING_OPS or name in HOST_READING_OPS or bool_index or tensor_repeats:
            self.seen[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        real = self._tolist = torch.Tensor.tolist

        def tolist(t):
            self.seen["Tensor.tolist"] += 1
            return real(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
