"""SOES, the Self-Organizing Encoder Structure (paper sec. 3.3): a content-induced latent token graph.

ReSSFormer has no positional encoding; token topology comes from content instead. At every block call
(inside every recurrent step, sec. 3.4) a directed sparse graph is induced from the current token
states H^(t) (B, T, D). The paper's edge formula (its Eq. 7) was not recovered; the chosen equations:

    s_ij      = (W_s h_i)^T (W_d h_j) / sqrt(r)                    W_s = src_proj, W_d = dst_proj: D -> r
    N_i       = top-m_i { s_ij : j visible to i }                  causal: j <= i (itself included);
                                                                   encoder (causal=False): every j
    A^(t)_ij  = softmax_{j in N_i}( s_ij ),  0 for j not in N_i    row-stochastic, m = soes.degree
    attention logits (ASAM, attention.py):  s^attn_hij += gamma_h * A_ij
    L_smooth  = sum_{t=1}^{K-1} mean_i || A^(t)_i - A^(t-1)_i ||^2      (model.py weights it by smooth_coef)

Design choices:
* Sparse storage: a `Graph` (idx (B, T, m) int64 key indices, val (B, T, m)). When fewer than m tokens
  are visible (the first tokens of a causal sequence) the spare slots get val exactly 0 and idx = i
  (a valid, visible index, so consumers never need a validity mask). Valid slots hold distinct indices.
* Neighbour selection runs under torch.no_grad in query chunks (chunk x T scores at a time, memory linear
  in T); the kept edges' scores are then recomputed with gradient from the gathered (B, T, m, r) dst
  vectors, so the projections learn through A (the top-m choice itself is not differentiable).
* Graph indices address the key axis of ASAM, whose first T keys are the tokens, so they apply unchanged
  when R2MU memory keys are appended after the tokens.
* smoothness_penalty works on the sparse rows: ||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b>, the overlap
  <a, b> from the (m x m) index equality of the two rows; no T x T tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from ressformer.config import ModelConfig
from ressformer.sparse import masked_softmax


class Graph(NamedTuple):
    """Sparse row-stochastic latent graph: idx (B, T, m) int64 target token of each edge, val (B, T, m)."""

    idx: torch.Tensor
    val: torch.Tensor


class LatentGraph(nn.Module):
    """forward(h (B, T, D)) -> Graph: top-`degree` content edges per token, softmax-weighted."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rank = cfg.soes.rank
        self.degree = cfg.soes.degree
        self.causal = cfg.causal
        self.chunk_size = cfg.asam.chunk_size
        self.src_proj = nn.Linear(cfg.d_model, self.rank, bias=False)
        self.dst_proj = nn.Linear(cfg.d_model, self.rank, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """In place (meta-device safe): N(0, std) projections."""
        std = self.cfg.init_std if std is None else std
        nn.init.normal_(self.src_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.dst_proj.weight, mean=0.0, std=std)

    def forward(self, h: torch.Tensor) -> Graph:
        if h.dim() != 3:
            raise ValueError(f"LatentGraph expects token states (B, T, D), got shape {tuple(h.shape)}")
        B, T, _ = h.shape
        m = min(self.degree, T)
        scale = 1.0 / math.sqrt(self.rank)
        src = self.src_proj(h)  # (B, T, r)
        dst = self.dst_proj(h)  # (B, T, r)
        pos = torch.arange(T, device=h.device)

        # Neighbour selection, no autograd graph, chunk x T scores at a time.
        idx_parts, valid_parts = [], []
        with torch.no_grad():
            for s0 in range(0, T, self.chunk_size):
                s1 = min(T, s0 + self.chunk_size)
                s = torch.einsum("bir,bjr->bij", src[:, s0:s1], dst) * scale  # (B, c, T)
                if self.causal:
                    vis = pos[None, :] <= pos[s0:s1, None]  # (c, T)
                    s = s.masked_fill(~vis, float("-inf"))
                sel = s.topk(m, dim=-1)  # (B, c, m)
                valid = sel.values > float("-inf")
                own = pos[s0:s1].view(1, -1, 1).expand_as(sel.indices)
                idx_parts.append(torch.where(valid, sel.indices, own))  # spare slots point at the token itself
                valid_parts.append(valid)
        idx = torch.cat(idx_parts, dim=1)  # (B, T, m)
        valid = torch.cat(valid_parts, dim=1)

        # Edge values with gradient, from the gathered destination vectors only: (B, T, m, r).
        d_g = dst.gather(1, idx.reshape(B, T * m, 1).expand(B, T * m, self.rank)).view(B, T, m, self.rank)
        s = torch.einsum("bir,bimr->bim", src, d_g) * scale  # (B, T, m)
        s = torch.where(valid, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
        return Graph(idx, masked_softmax(s, dim=-1))


def smoothness_penalty(prev: Graph, cur: Graph) -> torch.Tensor:
    """mean over (b, i) of ||A_cur[i] - A_prev[i]||^2, from the sparse rows (valid slots hold distinct indices).

    ||a - b||^2 = sum_r a_r^2 + sum_s b_s^2 - 2 sum_{r,s} a_r b_s [idx_a_r == idx_b_s]    (B, T, m, m') equality
    """
    if prev.idx.shape[:2] != cur.idx.shape[:2]:
        raise ValueError(f"smoothness_penalty needs graphs over the same (B, T): prev {tuple(prev.idx.shape)}, "
                         f"cur {tuple(cur.idx.shape)}")
    a, b = cur.val, prev.val.to(cur.val.dtype)
    same = (cur.idx[..., :, None] == prev.idx[..., None, :]).to(a.dtype)  # (B, T, m, m')
    overlap = torch.einsum("bir,bis,birs->bi", a, b, same)  # (B, T)
    sq = (a * a).sum(-1) + (b * b).sum(-1) - 2 * overlap
    return sq.clamp(min=0).mean()
