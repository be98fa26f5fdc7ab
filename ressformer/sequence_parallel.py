"""Sequence parallelism as the model sees it (DeepSpeed-Ulysses): P ranks hold one sample, T/P tokens each.

Rank r of the group holds tokens r*T/P .. (r+1)*T/P - 1 (`shard`). Everything per token runs on the shard: the
embedding, norms, projections, routed experts, R2MU pooling and gate, the LM head. Where the model reads across
tokens, it calls a `SequenceShards` (the collectives: pretrain.sequence_parallel.UlyssesShards on torch.distributed):

- ASAM: queries, keys and values (of the tokens and of the R2MU memory) go to H/P heads over the whole sequence
  (`to_heads`), `sparse_attention` runs unchanged on the rank's heads, so each ASAM path (chunked, block, block
  selection per chunk) chooses what one process chooses; the output comes back (`to_tokens`).
- R2MU memory: the token cache (the previous step's states of the shard) is projected on the shard and exchanged
  with the keys; segment summaries are pooled on the shard - exact because shard boundaries are segment boundaries
  (T/P a multiple of segment_len) - and exchanged likewise, then laid out as one process lays them
  ([every cache | every summary], `memory_order`; block-aligned after the exchange under block ASAM).
- SOES: the per-head rows of the attention pattern return with the output, so each rank averages all H heads for
  its own queries (attention.pattern_edges); the next step's graph rows are gathered (`gather`).
- Losses and diagnostics: sums over the shard summed over the group (`sum`), over global counts - the LM loss
  (labels shifted before sharding, `shift_labels`), MoE balance and z-loss, the SOES smoothness penalty, attention
  density and gate means. The loss is then the same scalar on every rank of the group; each rank's backward yields
  P times its share of the gradient, so the mean over all data-parallel ranks (P of them per sample) is exact.

Not supported (`sequence_parallel_error` says so): encoder mode, the bilinear SOES graph (it induces edges from
every token's state), the dense baseline, document masking and generation caches (training layout only).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ressformer.config import ModelConfig


class SequenceShards(Protocol):
    """The collectives of one sequence-parallel group of `size` ranks, this one `rank`."""

    size: int
    rank: int

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T/P, H, d) -> (B, T, H/P, d), differentiable."""

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H/P, d) -> (B, T/P, H, d), differentiable."""

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's x concatenated along dim in rank order, differentiable."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The group's sum of x, differentiable."""


def sequence_parallel_error(cfg: ModelConfig, size: int) -> str | None:
    """Why the model of `cfg` cannot train with sequence parallelism over `size` ranks, with the fix; None: it can."""
    if size < 1:
        return f"sequence_parallel_size={size} must be >= 1"
    if cfg.arch != "ressformer":
        return (f"sequence parallelism is built for ReSSFormer (arch=ressformer), not arch={cfg.arch!r}: train the "
                "dense baseline with sequence_parallel_size=1")
    if cfg.n_heads % size:
        return (f"model.n_heads={cfg.n_heads} is not divisible by sequence_parallel_size={size}: each rank attends "
                f"with n_heads / P heads; choose P among the divisors of {cfg.n_heads}")
    if not cfg.causal:
        return "sequence parallelism needs causal=True (encoder mode summarises the whole sequence as one segment)"
    if cfg.soes.enabled and cfg.soes.graph == "bilinear":
        return ("soes.graph=bilinear induces edges from every token's state, which no rank holds under sequence "
                "parallelism: use soes.graph=attention (the paper's) or sequence_parallel_size=1")
    return None


def shard_error(cfg: ModelConfig, T: int, size: int) -> str | None:
    """Why a sequence of T tokens cannot be split over `size` ranks for the model of `cfg`; None: it can."""
    if T % size:
        return f"seq_len={T} is not divisible by sequence_parallel_size={size}: choose T a multiple of {size}"
    r = cfg.r2mu
    if r.enabled and r.memory and (T // size) % r.segment_len:
        return (f"seq_len / sequence_parallel_size = {T // size} is not a multiple of r2mu.segment_len="
                f"{r.segment_len}: R2MU summaries are pooled per shard, so shards must end on segment boundaries; "
                f"choose seq_len a multiple of {size * r.segment_len}")
    return None


def shard(x: torch.Tensor, size: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s slice of x along dim (its length divisible by size)."""
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) labels in the HF convention (== input_ids) -> the target of each position: labels[:, t + 1], the last
    one ignore_index. Shifted before sharding, so the last token of a shard scores the next shard's first."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def memory_order(size: int, n_cache: int, n_sum: int, device) -> torch.Tensor:
    """Indices that turn the exchanged memory keys [cache_0 | sums_0 | cache_1 | sums_1 | ...] (rank order, each
    rank's n_cache token-cache keys then its n_sum summary keys) into one process's [cache_0 | cache_1 | ... |
    sums_0 | sums_1 | ...]."""
    per = n_cache + n_sum
    base = torch.arange(size, device=device)[:, None] * per
    cache = (base + torch.arange(n_cache, device=device)).reshape(-1)
    sums = (base + n_cache + torch.arange(n_sum, device=device)).reshape(-1)
    return torch.cat([cache, sums])


__all__ = ["SequenceShards", "sequence_parallel_error", "shard_error", "shard", "shift_labels", "memory_order"]
