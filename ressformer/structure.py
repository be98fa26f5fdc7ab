"""SOES, the Self-Organizing Encoder Structure (paper sec. 3.3): a content-induced latent token graph.

There is no positional encoding; token topology comes from content. The paper's edge formula (its Eq. 7, "edges
are induced by learned attention patterns") was not recovered; soes.graph picks one of two readings:
* attention (the presets): A^(t) = step t's head-averaged sparse attention probabilities, the `degree` largest per
  token (attention.pattern_edges); it biases step t+1's attention.
* bilinear (`LatentGraph`): s_ij = (W_s h_i)^T (W_d h_j) / sqrt(r), A_i. = softmax of the top-m visible s_ij.
Either way ASAM adds gamma_h * A_ij to its logits, and L_smooth = sum_t mean_i ||A^(t)_i - A^(t-1)_i||^2.

Design choices:
* Sparse `Graph` rows (idx, val) (B, T, m): spare slots have val 0 and idx = i (a visible index, no mask needed);
  valid slots hold distinct indices into ASAM's key axis (the tokens first, memory keys after).
* Neighbours are chosen without grad, a query chunk at a time (memory linear in T); the kept edges' scores are then
  recomputed with grad. Under asam.impl=block the choice is restricted to key blocks as in ASAM (selection.py):
  O(T (T / block_size + kept keys) r), exact when the kept blocks cover every visible token.
* smoothness_penalty works on the sparse rows: ||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b>, no T x T tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from ressformer.config import ModelConfig
from ressformer.selection import (DocumentKeyBlocks, block_candidates, block_summaries, chunk_first_index,
                                  document_block_candidates, document_key_blocks, run_local_blocks, topk_first,
                                  visible)
from ressformer.sparse import at_least_fp32, masked_softmax


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

    def forward(self, h: torch.Tensor, doc_pos: torch.Tensor | None = None) -> Graph:
        """doc_pos: the tokens' positions (T,) (ignored: 0..T-1) or, under document masking, (B, T)
        (selection.document_positions): a token's neighbours are then tokens of its own document."""
        if h.dim() != 3:
            raise ValueError(f"LatentGraph expects token states (B, T, D), got shape {tuple(h.shape)}")
        B, T, _ = h.shape
        src = self.src_proj(h)  # (B, T, r)
        dst = self.dst_proj(h)  # (B, T, r)
        pos = torch.arange(T, device=h.device)
        docs = doc_pos is not None and doc_pos.dim() == 2
        # neighbour selection, no autograd graph, chunk x T (block: chunk x kept keys) scores at a time
        with torch.no_grad():
            blocks = self.key_blocks(dst, pos, doc_pos if docs else None)
            c = self.chunk_size
            parts = [self.neighbours(src[:, s0:s0 + c], pos[s0:s0 + c], dst, blocks,
                                     doc_pos=(doc_pos[:, s0:s0 + c], doc_pos, self._first_src(src, doc_pos, s0))
                                     if docs else None)
                     for s0 in range(0, T, c)]
        idx, valid = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)  # (B, T, m)
        return self.edges(src, dst, idx, valid)

    def _first_src(self, src: torch.Tensor, doc_pos: torch.Tensor, s0: int) -> torch.Tensor | None:
        """Document masking under block_select=chunk: the src vector (B, c, r) of the first query of each query's
        chunk of tokens s0 .. s0 + c - 1 (selection.chunk_first_index), which chooses its blocks; else None."""
        a = self.cfg.asam
        if a.impl != "block" or a.block_select != "chunk":
            return None
        p = doc_pos[:, s0:s0 + self.chunk_size]
        i = chunk_first_index(p, torch.arange(s0, s0 + p.shape[1], device=src.device), a.chunk_size)  # (B, c)
        return src.gather(1, i[..., None].expand(*i.shape, src.shape[-1]))

    def key_blocks(self, dst: torch.Tensor, pos: torch.Tensor, doc_pos: torch.Tensor | None = None):
        """asam.impl=block: the KeyBlocks of the destination vectors dst (B, Tk, r) at positions pos (Tk,) = 0..Tk-1
        (one run of keys: a query chunk overlaps at most run_local_blocks(chunk_size) blocks); else None.
        doc_pos (B, Tk): document masking's positions -> DocumentKeyBlocks, each document's blocks cut from its first
        token (a chunk of queries may straddle two chunks of a document's positions)."""
        a = self.cfg.asam
        if a.impl != "block":
            return None
        if doc_pos is not None:
            return document_key_blocks(dst[:, None], doc_pos, None, a.block_size, ((dst.shape[1], a.chunk_size),),
                                       run_local_blocks(2 * a.chunk_size, a.block_size))
        return block_summaries(dst[:, None], pos, None, a.block_size, run_local_blocks(a.chunk_size, a.block_size))

    def neighbours(self, src_c: torch.Tensor, p_c: torch.Tensor, dst: torch.Tensor, blocks, ghost=None,
                   doc_pos: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The top-m candidate neighbours of one query chunk: src_c (B, c, r) at positions p_c (c,) within one chunk
        of asam.chunk_size positions, over the destination vectors dst (B, Tk, r) of tokens 0..Tk-1 (`key_blocks`:
        blocks or None). ghost (B, 1, r): the src vector of the chunk's first query when it is not in src_c
        (block_select=chunk picks the chunk's blocks by it; incremental decoding). -> (idx (B, c, m) token indices,
        spare slots = the token itself, valid (B, c, m)), m = min(degree, Tk). No grad needed.
        doc_pos: document masking's per-sample positions (queries (B, c), keys (B, Tk)), which decide visibility; with
        DocumentKeyBlocks also the src vector of each query's chunk's first query (B, c, r), which chooses its blocks
        under block_select=chunk (else None)."""
        a = self.cfg.asam
        B, c, _ = src_c.shape
        m = min(self.degree, dst.shape[1])
        if isinstance(blocks, DocumentKeyBlocks):  # document masking
            first = None if doc_pos[2] is None else doc_pos[2][:, None]
            kept = document_block_candidates(src_c[:, None], doc_pos[0], blocks, blocks_per_query=a.blocks_per_query,
                                             select=a.block_select, chunk_size=a.chunk_size, q_first=first)
            cand = kept.keys[:, 0]  # (B, n) token indices
            d_c = dst.gather(1, cand[..., None].expand(*cand.shape, self.rank))  # (B, n, r)
            vis = kept.valid[:, 0] & visible(doc_pos[0], doc_pos[1].gather(1, cand), None, causal=True)
        elif blocks is not None:
            q_in, p_in = src_c, p_c
            if ghost is not None:
                c_lo = torch.div(p_c[:1], a.chunk_size, rounding_mode="floor") * a.chunk_size  # (1,) the chunk's start
                q_in, p_in = torch.cat([ghost, src_c], 1), torch.cat([c_lo, p_c])
            kept = block_candidates(q_in[:, None], p_in, blocks, causal=self.causal,
                                    blocks_per_query=a.blocks_per_query, select=a.block_select,
                                    chunk_size=a.chunk_size)
            cand = kept.keys[:, 0]  # (B, n) token indices
            vis = kept.valid[:, 0, 1:] if ghost is not None else kept.valid[:, 0]  # (B, c, n) per-query blocks
            d_c = dst.gather(1, cand[..., None].expand(*cand.shape, self.rank))  # (B, n, r)
            if self.causal:
                vis = vis & (cand[:, None, :] <= p_c[:, None])  # (B, c, n)
        elif doc_pos is not None:
            cand, d_c = None, dst
            vis = visible(doc_pos[0], doc_pos[1], None, causal=True)  # (B, c, Tk)
        else:
            cand, d_c = None, dst
            vis = (torch.arange(dst.shape[1], device=dst.device)[None, :] <= p_c[:, None])[None] if self.causal \
                else None  # (1, c, Tk)
        s = torch.einsum("bir,bjr->bij", src_c, d_c) * (1.0 / math.sqrt(self.rank))  # (B, c, n)
        if vis is not None:
            s = s.masked_fill(~vis, float("-inf"))
        # equal scores (repeated tokens; or rounded differently in a full forward than in incremental decoding)
        # break by the lower candidate index = the earlier position (block candidates are in key order), as ASAM's
        # top-k does, whatever the row length or layout
        indices = topk_first(s, min(m, s.shape[-1]))  # (B, c, <= m)
        values = s.gather(-1, indices)
        if cand is not None:
            indices = cand[:, None, :].expand(-1, c, -1).gather(-1, indices)  # token indices
        if values.shape[-1] < m:  # fewer candidates than m: pad with spare slots
            short = m - values.shape[-1]
            values = torch.nn.functional.pad(values, (0, short), value=float("-inf"))
            indices = torch.nn.functional.pad(indices, (0, short))
        valid = values > float("-inf")
        return torch.where(valid, indices, p_c.view(1, -1, 1).expand_as(indices)), valid

    def edges(self, src: torch.Tensor, dst: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> Graph:
        """The graph rows of queries src (B, Q, r) with neighbours idx / valid (B, Q, m) among dst (B, Tk, r): edge
        scores recomputed with grad from the gathered destination vectors only (B, Q, m, r), softmax over the
        valid slots."""
        B, Q, m = idx.shape
        d_g = dst.gather(1, idx.reshape(B, Q * m, 1).expand(B, Q * m, self.rank)).view(B, Q, m, self.rank)
        s = torch.einsum("bir,bimr->bim", at_least_fp32(src), at_least_fp32(d_g)) * (1.0 / math.sqrt(self.rank))
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
