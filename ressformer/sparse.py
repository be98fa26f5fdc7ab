"""Sparse probability mappings for ASAM (paper sec. 3.2, activation-level sparsity).

The paper replaces softmax by a sparse activation (sparsemax is named). Three mappings from a score
vector z to the probability simplex are provided, all exact and with closed-form backward passes:

    softmax:   p_j = exp(z_j) / sum_l exp(z_l)                              (dense)
    sparsemax: p = argmin_{p in simplex} ||p - z||^2 = [z - tau]_+          (Martins & Astudillo 2016)
    entmax15:  p = [z/2 - tau]_+^2, the 1.5-entmax of Peters et al. 2019   (between the two in sparsity)

Design choices:
* Thresholds tau are found by the exact sort-based algorithms (O(n log n) per row); no bisection.
* Masked entries are -inf. They are placed last by the descending sort and excluded from the support
  explicitly (their arithmetic is replaced by zeros), so they get probability exactly 0 and no NaN ever
  appears, even in rows whose entries are all -inf (those rows map to all zeros, gradient zero) or
  all -inf but one (a one-hot row).
* Backward passes (torch.autograd.Function, only the output is saved):
    sparsemax: dz = s * (g - <g, s> / |s|),                s = 1[p > 0]
    entmax15:  dz = r * g - r * <r, g> / sum(r),          r = sqrt(p)
  softmax uses a masked exp/sum written out (all -inf rows give zeros, not NaN).
"""

from __future__ import annotations

import torch

ACTIVATIONS = ("softmax", "sparsemax", "entmax15")


# float dtype -> the signed int of its width: `order_key` views the bits as it
_ORDER_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
              torch.float64: torch.int64}
# Rows up to this many entries sort by a compare-exchange network in compiled code (`sorted_descending`): the
# network has (n/4) log2(n) (log2(n) + 1) steps, 240 at 32, and every step is one max and one min per row.
SORT_NETWORK_MAX = 32


def order_key(x: torch.Tensor) -> torch.Tensor:
    """Integers of x's width that order as x's values do, for top-k and sorts on the CPU: x + 0 (-0.0 becomes
    +0.0) viewed as signed integers, a negative value's magnitude bits flipped. Equal values give equal integers and
    larger ones larger, so torch.topk over them compares as over x and returns the same indices in the same order
    (NaN aside: above +inf or below -inf by its sign bit, where float top-k takes any NaN as the largest). PyTorch's
    CPU top-k checks every float comparison for NaN; over integers it takes about 0.65x the time (2 threads: 1024
    rows of 191, k = 17; 3072 rows of 1300, k = 129). Another device, or a non-float x: x itself (CUDA's radix
    top-k makes such a key inside)."""
    it = _ORDER_INT.get(x.dtype)
    if it is None or x.device.type != "cpu":
        return x
    return _flip_negatives((x + 0.0).view(it))


def _flip_negatives(b: torch.Tensor) -> torch.Tensor:
    """Flip the magnitude bits of the negative integers of b (its own inverse: order_key's map and its undoing)."""
    return b ^ ((b >> (torch.iinfo(b.dtype).bits - 1)) & torch.iinfo(b.dtype).max)


def sorted_descending(z: torch.Tensor) -> torch.Tensor:
    """torch.sort(z, dim=-1, descending=True).values; on the CPU a sort of `order_key(z)` mapped back (the same
    values, -0.0 as +0.0: 0.72x the time on 3072 rows of 128, 2 threads). On the CPU under torch.compile, rows of
    2 to SORT_NETWORK_MAX entries go through `_network_sorted`, which inductor fuses into one kernel: the same
    values (NaN aside), at (8, 4, 32, 16) 0.36x the time of the compiled sort and 0.35x at 32 entries. The network
    fixes the row length: a dynamic length of at most 32 compiles one graph per length (longer rows share one)."""
    key = order_key(z)
    if key is z:
        return torch.sort(z, dim=-1, descending=True).values
    if 2 <= z.shape[-1] <= SORT_NETWORK_MAX and torch.compiler.is_compiling():
        return _network_sorted(z)
    return _flip_negatives(torch.sort(key, dim=-1, descending=True).values).view(z.dtype)


def _bitonic_steps(m: int) -> tuple[tuple[int, int, bool], ...]:
    """The compare-exchange steps (i, j, i takes the larger) of a bitonic network sorting m = 2^p entries into
    descending order (Batcher 1968): runs of 2, 4, ... are merged, each run of 2s entries descending where bit s
    of its first index is 0 and ascending where it is 1, so every merge sees one bitonic sequence. Plain Python, run
    while torch.compile traces (no functools cache: dynamo warns on one and traces through it anyway)."""
    steps, size = [], 2
    while size <= m:
        half = size // 2
        while half >= 1:
            steps += [(i, i ^ half, (i & size) == 0) for i in range(m) if i ^ half > i]
            half //= 2
        size *= 2
    return tuple(steps)


def _network_sorted(z: torch.Tensor) -> torch.Tensor:
    """z (..., n) sorted descending along the last dim by `_bitonic_steps`, padded with -inf to a power of two:
    maximum and minimum of columns, so the values are exactly the sort's (z + 0.0 makes -0.0 +0.0, as
    `order_key` does). Eager each step is two small ops of its own: for compiled callers."""
    n = z.shape[-1]
    m = 1 << (n - 1).bit_length()
    cols = list((z + 0.0).unbind(-1)) + [torch.full_like(z[..., 0], float("-inf"))] * (m - n)
    for i, j, larger_first in _bitonic_steps(m):
        hi, lo = torch.maximum(cols[i], cols[j]), torch.minimum(cols[i], cols[j])
        cols[i], cols[j] = (hi, lo) if larger_first else (lo, hi)
    return torch.stack(cols[:n], -1)


def _prepare(x: torch.Tensor, dim: int):
    """Move `dim` last, subtract the finite row max; returns (z (..., n), valid (..., n), any_valid (..., 1))."""
    z = x.movedim(dim, -1)
    valid = z > float("-inf")  # (..., n)
    any_valid = valid.any(-1, keepdim=True)  # (..., 1)
    zmax = z.amax(-1, keepdim=True)  # max over valid entries (-inf if none)
    zmax = torch.where(any_valid, zmax, torch.zeros((), dtype=z.dtype, device=z.device))
    z = torch.where(valid, z - zmax, torch.full((), float("-inf"), dtype=z.dtype, device=z.device))
    return z, valid, any_valid


def _sorted_valid(z: torch.Tensor, valid: torch.Tensor):
    """Descending sort; invalid (-inf) entries land last and are replaced by 0 for the arithmetic."""
    zs = sorted_descending(z)  # (..., n)
    n_valid = valid.sum(-1, keepdim=True)  # (..., 1)
    rho = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)  # (n,)
    vs = rho <= n_valid  # (..., n) valid in sorted order (a prefix)
    zs = torch.where(vs, zs, torch.zeros((), dtype=z.dtype, device=z.device))
    return zs, vs, rho


def _save_output(ctx, p: torch.Tensor, any_valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Forward's end: rows with no valid entry -> zeros; p (dim last) kept for backward; `dim` moved back."""
    p = torch.where(any_valid, p, torch.zeros((), dtype=p.dtype, device=p.device))
    ctx.dim = dim
    ctx.save_for_backward(p)
    return p.movedim(-1, dim)


def _saved_output(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward's start: (p, g), both with `dim` last."""
    (p,) = ctx.saved_tensors
    return p, g.movedim(ctx.dim, -1)


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        z, valid, any_valid = _prepare(x, dim)
        zs, vs, rho = _sorted_valid(z, valid)
        cs = zs.cumsum(-1)  # (..., n)
        support = (1 + rho * zs > cs) & vs  # a prefix of the sorted row
        k = support.sum(-1, keepdim=True).clamp(min=1)  # (..., 1)
        tau = (cs.gather(-1, k - 1) - 1) / k.to(z.dtype)  # (..., 1)
        p = torch.clamp(z - tau, min=0)  # -inf - tau -> -inf -> 0
        return _save_output(ctx, p, any_valid, dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, g = _saved_output(ctx, g)  # (..., n), dim last
        s = (p > 0).to(g.dtype)
        v = (g * s).sum(-1, keepdim=True) / s.sum(-1, keepdim=True).clamp(min=1)
        return (s * (g - v)).movedim(-1, ctx.dim), None


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        z, valid, any_valid = _prepare(x, dim)
        z = z / 2  # entmax15(z) = [z/2 - tau]_+^2
        zs, vs, rho = _sorted_valid(z, valid)
        mean = zs.cumsum(-1) / rho  # (..., n) mean of the top-k sorted values, k = rho
        mean_sq = (zs * zs).cumsum(-1) / rho
        ss = rho * (mean_sq - mean * mean)  # sum of squared deviations of the top-k
        delta = (1 - ss) / rho
        tau = mean - torch.sqrt(torch.clamp(delta, min=0))  # threshold if the support had size k
        support = (tau <= zs) & vs
        k = support.sum(-1, keepdim=True).clamp(min=1)
        tau_star = tau.gather(-1, k - 1)  # (..., 1)
        p = torch.clamp(z - tau_star, min=0) ** 2
        return _save_output(ctx, p, any_valid, dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, g = _saved_output(ctx, g)
        r = p.sqrt()
        dz = g * r
        q = dz.sum(-1, keepdim=True) / r.sum(-1, keepdim=True).clamp(min=torch.finfo(r.dtype).tiny)
        return (dz - q * r).movedim(-1, ctx.dim), None


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact sparsemax along `dim` (-inf entries masked; all -inf rows give zeros). bf16 / fp16 input is computed
    in float32 and the result cast back, as torch.softmax does (thresholds and sums in bf16 miss 1 by up to 0.015)."""
    return _Sparsemax.apply(at_least_fp32(x), dim).to(x.dtype)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact 1.5-entmax along `dim` (-inf entries masked; all -inf rows give zeros); bf16 / fp16 in float32 inside,
    as `sparsemax`."""
    return _Entmax15.apply(at_least_fp32(x), dim).to(x.dtype)


def masked_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along `dim` where -inf entries get 0 and all -inf rows give zeros (not NaN); bf16 / fp16 in float32
    inside, as `sparsemax`."""
    z = at_least_fp32(x)
    valid = z > float("-inf")
    m = z.detach().amax(dim, keepdim=True)  # max over valid entries (-inf if none)
    m = torch.where(m > float("-inf"), m, torch.zeros((), dtype=z.dtype, device=z.device))
    e = torch.exp(torch.where(valid, z - m, torch.full((), float("-inf"), dtype=z.dtype, device=z.device)))
    return (e / e.sum(dim, keepdim=True).clamp(min=torch.finfo(z.dtype).tiny)).to(x.dtype)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x upcast to float32 when it is bf16 / fp16 (float32 and float64 stay): scores and probabilities."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def normalize(scores: torch.Tensor, activation: str, dim: int = -1) -> torch.Tensor:
    """Map scores to probabilities with `activation` (softmax | sparsemax | entmax15) along `dim`.

    Always in float32 (scores of a lower precision are upcast; float64 stays): thresholds and sums in bf16 would
    leave rows summing to 0.93-1.10. The probabilities come back in float32 (float64 for float64 scores).
    """
    scores = at_least_fp32(scores)
    if activation == "softmax":
        return masked_softmax(scores, dim)
    if activation == "sparsemax":
        return sparsemax(scores, dim)
    if activation == "entmax15":
        return entmax15(scores, dim)
    raise ValueError(f"unknown attention activation {activation!r}: choose one of {ACTIVATIONS}")
