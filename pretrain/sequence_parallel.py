"""DeepSpeed-Ulysses sequence parallelism: the collectives behind ressformer's `SequenceShards` protocol.

A sequence-parallel (SP) group of P ranks holds one sample, T/P consecutive tokens per rank, outside attention.
ressformer's model (ressformer.sequence_parallel) says where the sequence has to be whole and calls these:

- `to_heads` / `to_tokens`: DeepSpeed-Ulysses' all-to-all (`deepspeed.sequence.layer._SeqAllToAll`, the exchange
  `DistributedAttention` runs around its local attention): (B, T/P, H, d) -> (B, T, H/P, d) and back, differentiable
  (the backward is the opposite exchange).
- `gather(x, dim)`: every rank's shard concatenated along `dim`, differentiable. Built from the same all-to-all on P
  copies of the shard, so its backward (the gradients of the copies routed back and summed) needs no reduce-scatter,
  which gloo lacks.
- `sum(x)`: the group's sum, differentiable (the backward sums the gradients too). A loss made as
  sum(local part) / global count is the same scalar on every rank of the group, and each rank's backward then yields
  P times its own share of the gradient: the data-parallel mean over all ranks (P per sample) is the exact gradient.

DeepSpeed's `DistributedAttention` itself takes (q, k, v) and returns one tensor; ReSSFormer's attention also
exchanges R2MU memory keys, the SOES graph rows and the attention pattern, so the model calls the exchange directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class UlyssesShards:
    """The SP group `group` as ressformer's `SequenceShards`: `size` ranks, this one `rank` (its tokens
    rank * T/P .. (rank + 1) * T/P - 1)."""

    def __init__(self, group=None):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def __repr__(self) -> str:
        return f"UlyssesShards(size={self.size}, rank={self.rank})"

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T/P, H, d) sequence shard -> (B, T, H/P, d): every token, this rank's heads."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x.contiguous(), 2, 1, 0)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H/P, d) -> (B, T/P, H, d): this rank's tokens, every head."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x.contiguous(), 1, 2, 0)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's x concatenated along `dim` in rank order (the shapes must agree), differentiable."""
        moved = x.movedim(dim, 0)  # (n, ...)
        n, rest = moved.shape[0], moved.shape[1:]
        copies = moved.reshape(1, n, 1, -1).expand(1, n, self.size, moved[0].numel())  # P "heads", one per rank
        out = self.to_heads(copies)  # (1, P * n, 1, f)
        return out.reshape(self.size * n, *rest).movedim(0, dim)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The group's sum of x, differentiable (a gradient reaching the result reaches every rank's x)."""
        return _GroupSum.apply(x, self.group)


class _GroupSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients (each rank's x reaches every rank's sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sequence_group(size: int):
    """The SP groups of a job of world_size ranks: consecutive ranks, `size` to a group (rank r is in group
    r // size); data parallelism runs across groups. -> this rank's group (a new process group; every rank must call
    this, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"sequence_parallel_size={size} must divide the world size {world}")
    mine = None
    for g in range(world // size):
        ranks = list(range(g * size, (g + 1) * size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


__all__ = ["UlyssesShards", "sequence_group"]
