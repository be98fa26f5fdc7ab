"""ASAM, the Adaptive Sparse Attention Module (paper sec. 3.2): top-k keys per query + a sparse activation.

    s_ij  = q_i . k_j / sqrt(D) + gamma_h * A_ij       A: the SOES graph (sec. 3.3), optional
    K_i   = the topk largest s_ij over the keys visible to i (selection.visible; all of them if topk == 0)
    out_i = sum_{j in K_i} p_ij v_j,   p_i. = activation(s_i. on K_i)      softmax | sparsemax | entmax15

No positional encoding (sec. 3.3): positions only decide visibility (causality, the R2MU memory keys' windows;
the model appends the memory keys after the T token keys). A query with no visible key outputs zeros.

Code paths of `sparse_attention`, by the config fields ASAMAttention passes (`asam_options`):
    asam.impl=reference   _reference: the (B, H, Tq, Tk) scores materialised; plain, the tests' yardstick
    asam.impl=chunked     query chunks of chunk_size over every key                    memory linear in T
                          (the model's full forward: `key_runs`, over the tokens before the chunk's end, the
                          token cache entries within cache_window of its queries and the summaries only)
    asam.impl=block       query chunks over the key blocks they keep (selection.block_candidates; under
                          document masking selection.document_block_candidates, blocks cut per document)
  and per chunk: asam.topk == 0 or >= its keys: `_dense_chunk` (recomputed in backward under grad); else, with
  at most topk * D candidates (with key_runs: in the widest chunk, for all chunks), `_dense_topk_chunk` (one
  score matmul selects and attends, the probabilities zero off the kept keys); else `_select_topk` (no grad), then
  `_gathered_attend` over the kept keys (with grad: all chunks in one call, so autograd keeps O(T * topk * D)); in
  Triton on CUDA (ressformer.kernels.use_asam_kernel).
The graph bias is matched to the kept keys by index. Outside `reference` a (chunk, n) block of scores exists one
chunk at a time; what autograd keeps is O(T * topk * D) (the dense top-k path's (chunk, n) probabilities only while
n <= topk * D).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ressformer.config import ModelConfig
from ressformer.kernels import custom_op, use_asam_kernel
from ressformer.recurrence import block_aligned, memory_fillers
from ressformer.selection import (UNBOUNDED_WINDOW, DocumentCandidates, block_candidates, block_summaries,
                                  chunk_first_index, document_block_candidates, document_key_blocks, run_local_blocks,
                                  topk_first, visible)
from ressformer.sequence_parallel import memory_order
from ressformer.sparse import ACTIVATIONS, at_least_fp32 as f32, normalize

IMPLS = ("reference", "chunked", "block")
ATTEND = ("auto", "dense", "gather")


class Attended(NamedTuple):
    """The attention of Q queries."""

    out: torch.Tensor  # (B, H, Q, D)
    nnz: torch.Tensor | None  # () nonzero probabilities, detached float; None: counted with the batched pass
    pattern: tuple[torch.Tensor, torch.Tensor] | None = None  # their SOES graph rows (idx, val) (B, Q, m), if asked


class Selection(NamedTuple):
    """The top-k keys of Q queries, chosen without grad (`_select_topk`)."""

    key_idx: torch.Tensor  # (B, H, Q, topk) key index of each slot
    mask: torch.Tensor  # (B, H, Q, topk) bool: the slot's key is visible
    edge_slot: torch.Tensor | None  # (B, H, Q, m) the slot each graph edge lands on, -1 if not kept; None: no graph


def asam_options(cfg: ModelConfig) -> dict:
    """The keyword arguments of `sparse_attention` that the model config decides."""
    a = cfg.asam
    return dict(causal=cfg.causal, activation=a.activation, topk=a.topk, impl=a.impl, chunk_size=a.chunk_size,
                block_size=a.block_size, blocks_per_query=a.blocks_per_query, block_select=a.block_select)


def local_block_bound(cfg: ModelConfig, memory: bool, span: int) -> int | None:
    """An upper bound on the key blocks overlapping the positions of one query chunk (selection.KeyBlocks
    .local_blocks) for the keys the model gives ASAM under asam.impl=block; None (any layout) for memory keys in
    encoder mode, which model.py does not block-align.

    The keys are runs (selection.run_local_blocks) of non-decreasing positions, each starting at a block boundary:
    the tokens with the filler keys after them (one key per position), and with R2MU memory model.py's
    block-aligned token cache with its fillers (one key per position) and the summaries with theirs (summary_slots
    keys at each segment end, segment_len positions apart). `span` consecutive positions (a chunk's: chunk_size;
    queries that may straddle two chunks: 2 * chunk_size) hold at most span keys of the first two runs and
    summary_slots * (floor((span - 1) / segment_len) + 1) summaries.
    """
    if memory and not cfg.causal:
        return None
    bs, r = cfg.asam.block_size, cfg.r2mu
    n = run_local_blocks(span, bs)
    if memory:
        n += run_local_blocks(span, bs) + run_local_blocks(r.summary_slots * ((span - 1) // r.segment_len + 1), bs)
    return n


def document_runs(cfg: ModelConfig, T: int, n_memory: int) -> tuple[tuple[int, int], ...]:
    """The runs of keys the model gives ASAM under document masking with asam.impl=block (`sparse_attention`'s
    doc_runs): the T tokens, then R2MU memory of n_memory keys = [token cache (T) | summaries], as
    (keys, span): a query chunk's later documents hold at most chunk_size tokens (and token-cache entries) and the
    summaries of the segments ending among them, summary_slots * ceil(chunk_size / segment_len)."""
    c, r = cfg.asam.chunk_size, cfg.r2mu
    runs = [(T, c)]
    if n_memory:
        runs.append((T, c))
        if n_memory > T:
            runs.append((n_memory - T, r.summary_slots * -(-c // r.segment_len)))
    return tuple(runs)


def _check_inputs(q, k, v, *, q_pos, k_pos, k_window, activation, topk, graph, graph_scale, impl):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"sparse_attention expects q (B,H,Tq,D), k = v (B,H,Tk,D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    if q_pos.shape not in ((Tq,), (B, Tq)) or k_pos.shape not in ((Tk,), (B, Tk)):
        raise ValueError(f"q_pos must be ({Tq},) or ({B}, {Tq}) and k_pos ({Tk},) or ({B}, {Tk}); got "
                         f"{tuple(q_pos.shape)}, {tuple(k_pos.shape)}")
    if k_window is not None and k_window.shape != k_pos.shape:
        raise ValueError(f"k_window must match k_pos {tuple(k_pos.shape)}, got {tuple(k_window.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: choose one of {ACTIVATIONS}")
    if topk < 0:
        raise ValueError(f"topk={topk} must be >= 0 (0 = every visible key)")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {IMPLS}")
    if graph is not None:
        idx, val = graph
        B, _, Tq, _ = q.shape
        if idx.dim() != 3 or idx.shape[:2] != (B, Tq) or val.shape != idx.shape:
            raise ValueError(f"graph must be (idx, val) of shape (B={B}, Tq={Tq}, m); got {tuple(idx.shape)}, "
                             f"{tuple(val.shape)}")
        if graph_scale is None or graph_scale.shape != (q.shape[1],):
            raise ValueError(f"a graph needs graph_scale of shape (H={q.shape[1]},), got "
                             f"{None if graph_scale is None else tuple(graph_scale.shape)}")


# --- the SOES attention-pattern graph --------------------------------------------------------------------------
def _pad_edges(idx: torch.Tensor, val: torch.Tensor, m: int, own: torch.Tensor):
    """Keep the m largest positive entries of each row as a Graph row; spare slots get val 0 and idx = own.

    idx (B, Q, n) key indices with distinct valid entries per row, val (B, Q, n) >= 0, own (Q,) -> (B, Q, m) x 2.
    """
    if idx.shape[-1] < m:
        short = m - idx.shape[-1]
        idx = torch.nn.functional.pad(idx, (0, short))
        val = torch.nn.functional.pad(val, (0, short))
    slot = topk_first(val, m, floor=0.0)  # (B, Q, m) only positive entries are kept
    top = val.gather(-1, slot)
    valid = top > 0
    idx = torch.where(valid, idx.gather(-1, slot), own.view(1, -1, 1).to(idx.dtype))
    return idx, torch.where(valid, top, torch.zeros((), dtype=top.dtype, device=top.device))


def pattern_edges(key_idx: torch.Tensor, prob: torch.Tensor, *, n_tokens: int, m: int, own: torch.Tensor):
    """The SOES graph rows of an attention pattern: A_ij = mean_h p_hij over token keys, its m largest entries.

    key_idx (B, H, Q, n) key index of each probability, prob (B, H, Q, n) (exact zeros allowed); keys at index
    >= n_tokens (R2MU memory) are dropped; own (Q,) the queries' own token index. Equal key indices of different
    heads are summed (sort, then a segment sum), so valid slots hold distinct indices.
    Returns (idx (B, Q, m) int64, val (B, Q, m)), differentiable in prob.
    """
    B, H, Q, n = key_idx.shape
    idx = key_idx.permute(0, 2, 1, 3).reshape(B, Q, H * n)  # (B, Q, H*n)
    val = prob.permute(0, 2, 1, 3).reshape(B, Q, H * n) / H
    val = torch.where(idx < n_tokens, val, torch.zeros((), dtype=val.dtype, device=val.device))
    s_idx, order = idx.sort(dim=-1)
    s_val = val.gather(-1, order)
    start = torch.ones_like(s_idx, dtype=torch.bool)
    start[..., 1:] = s_idx[..., 1:] != s_idx[..., :-1]
    group = start.long().cumsum(-1) - 1  # (B, Q, H*n) run of equal indices each entry belongs to
    summed = torch.zeros_like(s_val).scatter_add(-1, group, s_val)  # per run (runs 0..G-1, the rest 0)
    g_idx = torch.zeros_like(s_idx).scatter(-1, group, s_idx)  # the run's key index
    return _pad_edges(g_idx, summed, m, own)


class Pattern(NamedTuple):
    """What `sparse_attention` returns of its attention pattern."""

    n_tokens: int  # keys at index >= n_tokens (R2MU memory) are not graph nodes
    m: int  # soes.degree: edges kept per query
    rows: bool = False  # True: each head's rows (key index, probability) instead of edges (sequence parallelism
    #                     averages the heads of every rank; `pattern_edges` of the rows is the edges)


def _pattern_rows(key_idx: torch.Tensor, prob: torch.Tensor, pattern: Pattern, own: torch.Tensor):
    """The edges of rows key_idx / prob (B, H, Q, n) (`pattern_edges`), or the rows themselves (pattern.rows)."""
    if pattern.rows:
        return key_idx, prob
    return pattern_edges(key_idx, prob, n_tokens=pattern.n_tokens, m=pattern.m, own=own)


def _pattern(p: torch.Tensor, keys: torch.Tensor | None, pattern: Pattern, own: torch.Tensor):
    """pattern_edges of probabilities p (B, H, Q, n) over `keys` (B, H, n) or, None, all keys in key order."""
    n_tokens, m, rows = pattern
    if rows:
        B, H, c, n = p.shape
        idx = torch.arange(n, device=p.device).expand(B, H, c, n) if keys is None else keys[:, :, None, :].expand(
            B, H, c, n)
        return idx, p
    if keys is None:
        pm = p[..., :n_tokens].mean(1)  # (B, Q, n_tokens)
        idx = torch.arange(pm.shape[-1], device=p.device).expand_as(pm)
        return _pad_edges(idx, pm, m, own)
    B, H, c, n = p.shape
    return pattern_edges(keys[:, :, None, :].expand(B, H, c, n), p, n_tokens=n_tokens, m=m, own=own)


def _concat_patterns(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The patterns of consecutive query chunks along the query axis (-2): edges (B, Q, m), or rows (B, H, Q, n)
    whose widths n may differ (padded with key index -1, probability 0: no key)."""
    n = max(x.shape[-1] for x, _ in parts)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, n - t.shape[-1]), value=v)  # noqa: E731
    return torch.cat([pad(i, -1) for i, _ in parts], dim=-2), torch.cat([pad(p, 0.0) for _, p in parts], dim=-2)


# --- impl=reference ---------------------------------------------------------------------------------------------
def _graph_bias_dense(graph, graph_scale: torch.Tensor, Tk: int, dtype) -> torch.Tensor:
    """(B, H, Tq, Tk): gamma_h * sum_r val[b,i,r] [idx[b,i,r] == j]."""
    idx, val = graph
    B, Tq, _ = idx.shape
    a = torch.zeros(B, Tq, Tk, dtype=dtype, device=val.device).scatter_add(-1, idx, val.to(dtype))  # (B, Tq, Tk)
    return graph_scale.to(dtype)[None, :, None, None] * a[:, None]


def _batched_mask(vis: torch.Tensor) -> torch.Tensor:
    """A visibility mask (c, n) (positions shared by the batch) or (B, c, n) (per-sample) -> (B|1, 1, c, n)."""
    return vis[None, None] if vis.dim() == 2 else vis[:, None]


def _reference(q, k, v, *, q_pos, k_pos, k_window, causal, activation, topk, graph, graph_scale, pattern, q_index):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", f32(q), f32(k)) / math.sqrt(D)  # (B, H, Tq, Tk) float32
    if graph is not None:
        s = s + _graph_bias_dense(graph, graph_scale, Tk, s.dtype)
    vis = _batched_mask(visible(q_pos, k_pos, k_window, causal))  # (B|1, 1, Tq, Tk)
    neg = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    s = torch.where(vis, s, neg)
    keep = vis.expand(B, H, Tq, Tk)
    if 0 < topk < Tk:
        sel = topk_first(s.detach(), topk, ordered=False)  # (B, H, Tq, topk)
        keep = torch.zeros_like(keep).scatter(-1, sel, True) & vis
        s = torch.where(keep, s, neg)
    p = normalize(s, activation)  # (B, H, Tq, Tk)
    out = torch.einsum("bhij,bhjd->bhid", p, f32(v)).to(v.dtype)
    stats = _stats((p.detach() > 0).sum().float(), vis.sum().float() * (B // vis.shape[0]) * H, float(B * H * Tq))
    if pattern is not None:
        stats["pattern"] = _pattern(p, None, pattern, q_index)
    return out, stats


# --- impl=chunked / block ---------------------------------------------------------------------------------------
@custom_op("edge_bias", __name__, mutates_args=())
def _edge_bias(epos: torch.Tensor, gval: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter graph edge values onto slots. epos (B, H, c, m) slot of each edge (-1: not present),
    gval (B, H, c, m) gamma_h * val -> (B, H, c, n).

    An opaque op to torch.compile: inductor (torch 2.13, CPU) turns a scatter_add into zeros + an in-place scatter
    and, fused with the score's consumers, ran that scatter after ASAM's top-k had read the scores (wrong keys
    kept under block ASAM; tests/ressformer/test_compile.py)."""
    out = gval.new_zeros(*epos.shape[:-1], n)
    return out.scatter_add_(-1, epos.clamp(min=0), gval.masked_fill(epos < 0, 0))  # absent: 0 added to slot 0


@_edge_bias.register_fake
def _(epos: torch.Tensor, gval: torch.Tensor, n: int) -> torch.Tensor:
    return gval.new_empty(*epos.shape[:-1], n)


def _edge_bias_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _edge_bias_backward(ctx, grad: torch.Tensor):
    (epos,) = ctx.saved_tensors
    g = grad.gather(-1, epos.clamp(min=0))  # (B, H, c, m) the gradient at each edge's slot
    return None, torch.where(epos >= 0, g, torch.zeros((), dtype=g.dtype, device=g.device)), None


_edge_bias.register_autograd(_edge_bias_backward, setup_context=_edge_bias_setup)


def _edge_slots(e: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Candidate position of each graph edge's key, -1 if its block was not kept.

    e (B, H, c, m) key index of each edge; blocks (B, H, n_sel) the kept block ids (selection.Candidates).
    Matching the edge's block costs O(c * m * n_sel) per chunk, independent of the number of keys.
    """
    hit = (e // block_size)[..., None] == blocks[:, :, None, None, :]  # (B, H, c, m, n_sel)
    slot = hit.to(torch.uint8).argmax(-1) * block_size + e % block_size
    return torch.where(hit.any(-1), slot, torch.full_like(slot, -1))


def _document_edge_slots(e: torch.Tensor, cand: DocumentCandidates, block_size: int) -> torch.Tensor:
    """`_edge_slots` for document candidates (selection.document_block_candidates): the candidate position of each
    edge's key in the chunk's blocks of its first document or in a later documents' span, -1 if in neither."""
    rel = e[..., None] - cand.starts[:, :, None, None, :]  # (B, H, c, m, n_sel)
    hit = (rel >= 0) & (rel < cand.lens[:, :, None, None, :])
    j = hit.to(torch.uint8).argmax(-1, keepdim=True)
    slot = torch.where(hit.any(-1), j[..., 0] * block_size + rel.gather(-1, j)[..., 0], -1)
    off = cand.starts.shape[-1] * block_size
    for first, span in cand.spans:  # first (B, 1)
        r = e - first[:, :, None, None]
        slot = torch.where((slot < 0) & (r >= 0) & (r < span), off + r, slot)
        off += span
    return slot


def _span_grad(like: torch.Tensor, spans, parts) -> torch.Tensor:
    """A gradient of `like`'s shape (B, H, Tk, D) holding parts[i] in like[:, :, a:b] of spans[i], zeros elsewhere:
    written once (autograd's own backward of each slice zero-fills a whole Tk-sized gradient per slice)."""
    g = like.new_empty(like.shape)
    at = 0
    for (a, b), part in zip(spans, parts):
        g[:, :, at:a].zero_()
        g[:, :, a:b].copy_(part)
        at = b
    g[:, :, at:].zero_()
    return g


class _SpanScores(torch.autograd.Function):
    """q (B, H, c, D) float32 @ the spans [a, b) of k (B, H, Tk, D) along Tk, transposed and concatenated ->
    (B, H, c, n) float32, n the spans' total length. Keeps q and k (no copy of the spans)."""

    @staticmethod
    def forward(ctx, q, k, spans):
        ctx.spans = spans
        ctx.save_for_backward(q, k)
        return torch.cat([q @ f32(k[:, :, a:b]).transpose(-1, -2) for a, b in spans], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        gq, parts, o = None, [], 0
        for a, b in ctx.spans:
            g = grad[..., o:o + b - a]  # (B, H, c, L)
            if ctx.needs_input_grad[0]:
                part = g @ f32(k[:, :, a:b])
                gq = part if gq is None else gq + part
            if ctx.needs_input_grad[1]:
                parts.append((g.transpose(-1, -2) @ q).to(k.dtype))
            o += b - a
        return gq, _span_grad(k, ctx.spans, parts) if ctx.needs_input_grad[1] else None, None


class _SpanValues(torch.autograd.Function):
    """p (B, H, c, n) float32 @ the spans [a, b) of v (B, H, Tk, D) along Tk, stacked -> (B, H, c, D) float32.
    Keeps p and v (no copy of the spans)."""

    @staticmethod
    def forward(ctx, p, v, spans):
        ctx.spans = spans
        ctx.save_for_backward(p, v)
        out, o = None, 0
        for a, b in spans:
            part = p[..., o:o + b - a] @ f32(v[:, :, a:b])
            out, o = part if out is None else out + part, o + b - a
        return out

    @staticmethod
    def backward(ctx, grad):
        p, v = ctx.saved_tensors
        gp, parts, o = [], [], 0
        for a, b in ctx.spans:
            if ctx.needs_input_grad[0]:
                gp.append(grad @ f32(v[:, :, a:b]).transpose(-1, -2))
            if ctx.needs_input_grad[1]:
                parts.append((p[..., o:o + b - a].transpose(-1, -2) @ grad).to(v.dtype))
            o += b - a
        return (torch.cat(gp, dim=-1) if ctx.needs_input_grad[0] else None,
                _span_grad(v, ctx.spans, parts) if ctx.needs_input_grad[1] else None, None)


def _chunk_scores(q_c, k_c, mask, edge_slot, edge_val, spans=None) -> torch.Tensor:
    """Scores (B, H, c, n) float32 of queries q_c (B, H, c, D) over candidates k_c (B, H, n, D), plus the graph bias
    of edges at edge_slot (B, H, c, m; -1: absent) / edge_val, -inf where mask (B|1, H|1, c, n) is False.
    spans ((a, b), ...): the candidates are k_c[:, :, a:b] for each span in turn (slices, no copy); None: all of k_c."""
    q32 = f32(q_c)
    if spans is None:
        s = torch.einsum("bhid,bhjd->bhij", q32, f32(k_c))
    else:
        s = _SpanScores.apply(q32.contiguous(), k_c, tuple(spans))  # (q_c: a slice of (B, T, H, D) heads)
    s = s / math.sqrt(q_c.shape[-1])  # (B, H, c, n) f32
    if edge_slot is not None:
        s = s + _edge_bias(edge_slot, edge_val.to(s.dtype), s.shape[-1])
    return torch.where(mask, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))


def _weighted_values(p: torch.Tensor, v_c: torch.Tensor, spans) -> torch.Tensor:
    """p (B, H, c, n) float32 @ the candidates' values (v_c, or its spans in turn as `_chunk_scores`) -> float32."""
    if spans is None:
        return torch.einsum("bhij,bhjd->bhid", p, f32(v_c))
    return _SpanValues.apply(p, v_c, tuple(spans))


def _dense_chunk(q_c, k_c, v_c, mask, edge_slot, edge_val, keys, q_pos, *, activation, pattern,
                 spans=None, token_prefix=None) -> Attended:
    """Attention of a query chunk q_c (B, H, c, D) over all its candidate keys k_c, v_c (B, H, n, D).

    mask (B|1, H|1, c, n) bool; edge_slot / edge_val (B, H, c, m) or None; keys (B, H, n) key index of each
    candidate, None: all keys in order (for the pattern); pattern (n_tokens, degree) or None; spans: the candidates
    are these slices of k_c / v_c (`_chunk_scores`); token_prefix: the first token_prefix candidates are the tokens
    0.. in order and no other candidate is a token (the pattern is then the head mean over those columns, as for
    keys None). The tensors are positional: torch.utils.checkpoint keeps
    positional inputs through the saved-tensor hooks (the memory accounting of bench/act_memory.py sees them),
    keyword ones only by reference.
    """
    p = normalize(_chunk_scores(q_c, k_c, mask, edge_slot, edge_val, spans), activation)
    pat = None
    if pattern is not None:
        pat = _pattern(p, keys, pattern, q_pos) if token_prefix is None else _pattern(
            p[..., :token_prefix], None, pattern, q_pos)
    out = _weighted_values(p, v_c, spans).to(v_c.dtype)
    return Attended(out, (p.detach() > 0).sum().float(), pat)


class _KeptSlots(torch.autograd.Function):
    """s.gather(-1, idx) for idx distinct along the last dim, whose backward scatters into zeros of s's shape: it
    keeps the index only (torch.gather's own backward keeps s, a (c, n) float32 block per chunk)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.n = s.shape[-1]
        return s.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(*grad.shape[:-1], ctx.n).scatter(-1, idx, grad), None


def _dense_topk_chunk(q_c, k_c, v_c, mask, edge_slot, edge_val, keys, q_pos, *, topk, activation,
                      pattern, spans=None, token_prefix=None) -> Attended:
    """`_gathered_attend` of a query chunk's top-k selection computed with dense matmuls over its n candidates.

    The chunk's scores (B, H, c, n) come from one matmul and feed both the selection (`topk_first`, as
    `_select_topk`) and the attention: the kept scores are gathered as scalars (B, H, c, topk), normalised exactly
    as `_gathered_attend` normalises them, scattered back into a (c, n) row of probabilities (zeros elsewhere) and
    multiplied with v_c. No (c, topk, D) copy of the keys and values is made; the price is O(c n D) arithmetic and
    a (c, n) float32 row kept for backward instead of O(c topk D). `dense_topk_pays` says when that is cheaper.
    Arguments as `_dense_chunk`'s; with token_prefix the pattern (edges) is the head mean of the (c, n) probabilities
    over the token columns, as `_dense_chunk`'s, which is `pattern_edges` of the kept keys without its sort.
    """
    B, H, c, _ = q_c.shape
    s = _chunk_scores(q_c, k_c, mask, edge_slot, edge_val, spans)  # (B, H, c, n)
    n = s.shape[-1]
    with torch.no_grad():
        sel = topk_first(s.detach(), topk, ordered=False)  # (B, H, c, topk) candidate positions
    p_sel = normalize(_KeptSlots.apply(s, sel), activation)  # (B, H, c, topk); invisible kept slots: -inf, p = 0
    p = torch.zeros_like(s).scatter(-1, sel, p_sel)  # (B, H, c, n)
    out = _weighted_values(p, v_c, spans).to(q_c.dtype)  # k_c / v_c may be float32 copies
    pat = None
    if pattern is not None and token_prefix is not None and not pattern.rows:
        pat = _pattern(p[..., :token_prefix], None, pattern, q_pos)
    elif pattern is not None:
        key_idx = sel if keys is None else keys[:, :, None, :].expand(B, H, c, n).gather(-1, sel)
        pat = _pattern_rows(key_idx, p_sel, pattern, q_pos)
    return Attended(out, (p_sel.detach() > 0).sum().float(), pat)


def _check_key_runs(key_runs, Tq: int, Tk: int, impl: str, causal: bool) -> None:
    """`sparse_attention`'s key_runs: causal chunked attention, runs inside the keys, ascending, not overlapping, at
    most Tq keys each (entry j is query index j's token)."""
    if impl != "chunked" or not causal:
        raise ValueError(f"key_runs need impl='chunked' and causal attention, got impl={impl!r}, causal={causal}: "
                         "pass key_runs=None")
    end = 0
    for start, length, window in key_runs:
        if start < end or length < 0 or length > Tq or start + length > Tk or (window is not None and window < 1):
            raise ValueError(f"key_runs {key_runs}: each run (start, length, window) must lie in the {Tk} keys after "
                             f"the previous one, hold at most Tq={Tq} keys, window None or >= 1")
        end = start + length


def _run_spans(key_runs, s0: int, s1: int, Tk: int) -> tuple[tuple[int, int], ...]:
    """The keys a causal query chunk [s0, s1) may see under `key_runs`, as ascending non-empty spans [a, b): each
    run's entries j in [s0 - window + 1, s1), and every key outside the runs. Integers only: no host read, constants
    to torch.compile."""
    parts, at = [], 0
    for start, length, window in key_runs:
        lo = 0 if window is None else max(0, s0 - window + 1)
        parts += [(at, start), (start + min(lo, length), start + min(s1, length))]
        at = start + length
    parts.append((at, Tk))
    spans = []
    for a, b in parts:  # merge touching spans: fewer, larger matmuls
        if b <= a:
            continue
        if spans and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return tuple(spans)


def dense_topk_pays(n: int, topk: int, head_dim: int, attend: str) -> bool:
    """Whether a top-k chunk over n candidates runs `_dense_topk_chunk` rather than select + gather.

    attend: "dense" | "gather" force a path; "auto": dense when n <= topk * head_dim. Per query and head the dense
    path multiplies over n keys where the gathered path copies topk * head_dim floats of keys and of values; on
    CPU (bench/RESULTS.md: chunked, fp32, forward + backward, 2 threads) dense took 0.25x the gathered time at
    n = 8 topk and 0.87x at n = 64 topk for head_dim 64, 0.90x at n = 16 topk for head_dim 16 (and, forced beyond
    the rule, 1.09x at 32 topk, 1.56x at 64 topk). Its (c, n) float32 probabilities kept for backward are then at
    most half the gathered (c, topk, head_dim) keys and values, so the saved memory stays O(T * topk * head_dim)
    however long the sequence."""
    if attend == "dense":
        return True
    if attend == "gather":
        return False
    return n <= topk * head_dim


@torch.no_grad()
def _select_topk(q_c, k, *, keys, mask, edge_slot, edge_val, topk) -> Selection:
    """The topk best candidates of each query of the chunk q_c (B, H, c, D); keys (B, H, n) or None (all of k);
    mask (B|1, H|1, c, n). The chunk x n scores exist only here, without an autograd graph."""
    B, H, c, D = q_c.shape
    n = mask.shape[-1]
    k_c = k if keys is None else k.gather(2, keys[..., None].expand(B, H, n, D))
    s = _chunk_scores(q_c, k_c, mask, edge_slot, edge_val)  # (B, H, c, n) float32
    sel = topk_first(s, topk, ordered=False)  # (B, H, c, topk) candidate positions
    del s, k_c
    sel_mask = mask.expand(B, H, c, n).gather(-1, sel)  # (B, H, c, topk)
    slot = None
    if edge_slot is not None:  # slot (0..topk-1) each graph edge lands on, -1 if its key was not selected
        hit = (sel[..., :, None] == edge_slot[..., None, :]) & (edge_slot[..., None, :] >= 0)  # (B, H, c, topk, m)
        slot = torch.where(hit.any(-2), hit.to(torch.uint8).argmax(-2), torch.full_like(edge_slot, -1))
    key_idx = sel if keys is None else keys[:, :, None, :].expand(B, H, c, n).gather(-1, sel)  # (B, H, c, topk)
    return Selection(key_idx, sel_mask, slot)


def _gathered_attend(q_s, k, v, sel: Selection, *, edge_val, activation, q_pos=None, pattern=None) -> Attended:
    """Attention of the queries q_s (B, H, Q, D) over their selected keys; edge_val (B, H, Q, m) or None.

    One gather of k and v for all Q queries: its backward is one scatter into a (B, H, Tk, D) gradient, where a
    gather per chunk would zero-fill a full-size gradient per chunk (O(T^2 D / chunk) time). Where
    `use_asam_kernel` says so (CUDA tensors, triton installed) the Triton kernel (kernels/asam_triton.py) computes
    the same, reading keys / values by index without gathering them.
    """
    key_idx, sel_mask, edge_slot = sel
    B, H, Q, topk = key_idx.shape
    D = q_s.shape[-1]
    if use_asam_kernel(q_s):
        from ressformer.kernels.asam_triton import topk_attention

        bias = None if edge_slot is None else _edge_bias(edge_slot, f32(edge_val), topk)  # (B, H, Q, topk)
        out, p = topk_attention(q_s, k, v, key_idx, sel_mask, bias, activation)
    else:
        gi = key_idx.reshape(B, H, Q * topk, 1).expand(B, H, Q * topk, D)
        k_g = k.gather(2, gi).view(B, H, Q, topk, D)
        v_g = v.gather(2, gi).view(B, H, Q, topk, D)
        s = torch.einsum("bhid,bhikd->bhik", f32(q_s), f32(k_g)) / math.sqrt(D)  # (B, H, Q, topk) float32
        if edge_slot is not None:
            s = s + _edge_bias(edge_slot, edge_val.to(s.dtype), topk)
        s = torch.where(sel_mask, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
        p = normalize(s, activation)
        out = torch.einsum("bhik,bhikd->bhid", p, f32(v_g)).to(v_g.dtype)
    pat = None if pattern is None else _pattern_rows(key_idx, p, pattern, q_pos)
    return Attended(out, (p.detach() > 0).sum().float(), pat)


def _gathered_attend_all(q, k, v, pending: list, *, q_index, activation, pattern) -> tuple[list[Attended], torch.Tensor]:
    """The gradient pass of the top-k chunks pending = [(s0, s1, Selection, edge_val)] in one `_gathered_attend`
    (autograd keeps every chunk's gathered keys anyway). -> (one Attended per chunk with nnz None, their nnz)."""
    sizes = [s1 - s0 for s0, s1, _, _ in pending]
    rows = torch.cat([torch.arange(s0, s1, device=q.device) for s0, s1, _, _ in pending])
    q_s = q if sum(sizes) == q.shape[2] else q[:, :, rows]
    sel = Selection(*(torch.cat(t, dim=2) if t[0] is not None else None for t in zip(*(p[2] for p in pending))))
    edge_val = None if sel.edge_slot is None else torch.cat([p[3] for p in pending], dim=2)
    res = _gathered_attend(q_s, k, v, sel, edge_val=edge_val, activation=activation, q_pos=q_index[rows],
                           pattern=pattern)
    outs = res.out.split(sizes, dim=2)
    pats = [None] * len(sizes) if res.pattern is None else list(zip(*(x.split(sizes, dim=-2) for x in res.pattern)))
    return [Attended(o, None, pat) for o, pat in zip(outs, pats)], res.nnz


def _stats(nnz, n_visible, rows: float) -> dict:
    """density, keys_per_query, and the counts they come from (nnz, visible, rows: a sequence-parallel group sums
    them)."""
    nnz = torch.as_tensor(nnz, dtype=torch.float32).detach()
    n_visible = torch.as_tensor(n_visible, dtype=torch.float32).detach()
    return {"density": nnz / n_visible.clamp(min=1.0), "keys_per_query": nnz / max(rows, 1.0), "nnz": nnz,
            "visible": n_visible, "rows": rows}


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pos: torch.Tensor,
                     k_pos: torch.Tensor, k_window: torch.Tensor | None = None, causal: bool = True,
                     activation: str = "softmax", topk: int = 0, graph=None, graph_scale: torch.Tensor | None = None,
                     impl: str = "chunked", chunk_size: int = 128, block_size: int = 64,
                     blocks_per_query: int = 8, block_select: str = "query", local_blocks: int | None = None,
                     pattern_degree: int = 0, pattern_keys: int | None = None, pattern_rows: bool = False,
                     q_index: torch.Tensor | None = None, attend: str = "auto",
                     doc_runs: tuple[tuple[int, int], ...] | None = None,
                     q_first: torch.Tensor | None = None,
                     key_runs: tuple[tuple[int, int, int | None], ...] | None = None) -> tuple[torch.Tensor, dict]:
    """ASAM attention. q (B, H, Tq, D), k / v (B, H, Tk, D), q_pos (Tq,), k_pos (Tk,), k_window (Tk,) | None,
    graph (idx (B, Tq, m) into the key axis, val (B, Tq, m)) | None, graph_scale (H,).

    Per-sample positions (document masking, selection.document_positions): q_pos (B, Tq), k_pos and k_window
    (B, Tk); q_index (Tq,) is then the queries' token indices (their own graph slot), default 0..Tq-1 (1-D q_pos:
    q_pos itself). impl=block (causal) then cuts each document's key blocks from its own first key in each run of
    keys (selection.document_key_blocks): doc_runs = ((n_keys, span), ...) in key order, default one run of every
    key, span chunk_size (the tokens alone); block_select=chunk: q_first (B, H, Tq, D) the q of each query's chunk's
    first query (selection.chunk_first_index), default gathered from q (the queries then are tokens q_index).

    local_blocks (impl=block): a bound on the key blocks overlapping one query chunk's positions when the keys come
    in block-aligned runs (`local_block_bound`); it sizes each chunk's candidates (selection.max_kept_blocks).
    None: any key layout, each chunk's candidates padded to every block.

    Returns (out (B, H, Tq, D), stats). stats (detached): density = nonzero probabilities / visible keys (block:
    visible keys of the kept blocks), keys_per_query = mean nonzero probabilities per query and head; with
    pattern_degree > 0 also "pattern": the SOES graph of this attention (`pattern_edges` over the first
    pattern_keys keys, default Tq: the tokens), with gradient; pattern_rows=True: instead each head's rows
    (key index (B, H, Tq, n), probability (B, H, Tq, n); index -1 with probability 0 pads), whose `pattern_edges`
    are the graph (sequence parallelism takes them to the ranks that hold every head of a query).

    attend: how a top-k chunk computes its attention on the PyTorch path (the Triton kernel, where it runs, reads the
    kept keys by index): "auto" (`dense_topk_pays`), "dense" (`_dense_topk_chunk`: dense matmuls over the chunk's
    candidates, probabilities zero off the kept keys) or "gather" (`_select_topk` + `_gathered_attend`: copies of
    the kept keys). Both compute the same function; the choice is speed and memory.

    key_runs (impl=chunked, causal): runs (start, length, window) of keys whose entry j is the key of the token at
    query index j, visible to query i only if j <= i (and i - j < window; None: no window): the tokens
    (start 0, window None) and R2MU's token cache (window cache_window) of a full forward, per-sample positions
    included. A query chunk [s0, s1) then computes over each run's keys j in [s0 - window + 1, s1) only (and every
    key outside the runs): the keys it leaves out are invisible to the whole chunk, so the result is the same (to
    the rounding of shorter sums) at about half the score, selection and value work of a causal sequence. The
    caller vouches for the layout; None: every chunk computes over every key.
    """
    _check_inputs(q, k, v, q_pos=q_pos, k_pos=k_pos, k_window=k_window, activation=activation, topk=topk,
                  graph=graph, graph_scale=graph_scale, impl=impl)
    if attend not in ATTEND:
        raise ValueError(f"attend={attend!r}: choose one of {ATTEND}")
    B, H, Tq, D = q.shape
    pattern = None
    if pattern_degree > 0:
        pattern = Pattern(Tq if pattern_keys is None else pattern_keys, pattern_degree, pattern_rows)
    if q_index is None:
        q_index = q_pos if q_pos.dim() == 1 else torch.arange(Tq, device=q.device)
    if impl == "reference":
        return _reference(q, k, v, q_pos=q_pos, k_pos=k_pos, k_window=k_window, causal=causal,
                          activation=activation, topk=topk, graph=graph, graph_scale=graph_scale, pattern=pattern,
                          q_index=q_index)
    key_blocks = doc_blocks = None
    if impl == "block":
        if chunk_size < 1 or block_size < 1 or blocks_per_query < 1:
            raise ValueError(f"block attention needs chunk_size, block_size, blocks_per_query >= 1; got "
                             f"{chunk_size}, {block_size}, {blocks_per_query}")
        if q_pos.dim() == 2 or k_pos.dim() == 2:
            if not causal:
                raise ValueError("per-sample positions (document masking) with impl=block need causal=True")
            B_ = q.shape[0]
            q_pos, k_pos = q_pos.expand(B_, Tq), k_pos.expand(B_, k.shape[2])
            k_window = None if k_window is None else k_window.expand(B_, k.shape[2])
            runs = ((k.shape[2], chunk_size),) if doc_runs is None else tuple(doc_runs)
            with torch.no_grad():
                doc_blocks = document_key_blocks(k, k_pos, k_window, block_size, runs, local_blocks)
        else:
            with torch.no_grad():
                key_blocks = block_summaries(k, k_pos, k_window, block_size, local_blocks)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if key_runs is not None:
        _check_key_runs(key_runs, Tq, k.shape[2], impl, causal)

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if graph is not None:
        g_idx, g_val = graph
        gval_all = f32(graph_scale)[None, :, None, None] * f32(g_val)[:, None]  # (B, H, Tq, m) float32
    results: list[Attended | None] = []  # per query chunk; None: a top-k chunk whose gradient pass comes after
    pending = []  # (s0, s1, Selection, edge_val) of those chunks
    n_visible = q.new_zeros((), dtype=torch.float32)
    k32 = v32 = None  # float32 k and v, made once for the dense top-k chunks over every key
    kernel = use_asam_kernel(q)  # the Triton kernel takes the top-k chunks (`_gathered_attend`)
    widest = None  # key_runs: the most candidates of a chunk, which decides the top-k pass of every chunk
    if key_runs is not None:
        widest = max(sum(b - a for a, b in _run_spans(key_runs, s0, min(Tq, s0 + chunk_size), k.shape[2]))
                     for s0 in range(0, Tq, chunk_size))
    for s0 in range(0, Tq, chunk_size):
        s1 = min(Tq, s0 + chunk_size)
        q_c, qp_c, qi_c = q[:, :, s0:s1], q_pos[..., s0:s1], q_index[s0:s1]
        c = s1 - s0
        cand = None  # the chunk's keys: every key, or the union of its queries' kept blocks
        if key_blocks is not None:
            with torch.no_grad():
                cand = block_candidates(q_c, qp_c, key_blocks, causal=causal, blocks_per_query=blocks_per_query,
                                        select=block_select, chunk_size=chunk_size)
        elif doc_blocks is not None:
            with torch.no_grad():
                qf = None
                if block_select == "chunk":  # each query's chunk's first query, in this call or given
                    qf = q_first[:, :, s0:s1] if q_first is not None else q.gather(2, chunk_first_index(
                        qp_c, qi_c, chunk_size)[:, None, :, None].expand(B, H, c, D))
                cand = document_block_candidates(q_c, qp_c, doc_blocks, blocks_per_query=blocks_per_query,
                                                 select=block_select, chunk_size=chunk_size, q_first=qf)
        keys = None if cand is None else cand.keys
        spans = run_keys = None  # key_runs: the chunk's candidates as slices of k / v, and their key index (n,)
        if key_runs is not None:
            spans = _run_spans(key_runs, s0, s1, k.shape[2])
            run_keys = torch.cat([torch.arange(a, b, device=q.device) for a, b in spans])
            keys = run_keys.expand(B, H, run_keys.shape[0])
        edge_slot = edge_val = None
        if graph is not None:
            edge_val = gval_all[:, :, s0:s1]  # (B, H, c, m)
            e = g_idx[:, None, s0:s1].expand(B, H, c, g_idx.shape[-1])  # (B, H, c, m) key index of each edge
            if cand is not None:
                with torch.no_grad():
                    edge_slot = _edge_slots(e, cand.blocks, block_size) if key_blocks is not None \
                        else _document_edge_slots(e, cand, block_size)
            elif run_keys is not None:  # each edge's slot among the chunk's keys; -1: a key left out (invisible)
                slot_of = torch.full((k.shape[2],), -1, dtype=e.dtype, device=e.device)
                slot_of[run_keys] = torch.arange(run_keys.shape[0], dtype=e.dtype, device=e.device)
                edge_slot = slot_of[g_idx[:, None, s0:s1]].expand_as(e)  # one (B, c, m) copy for all heads
            else:
                edge_slot = e
        if run_keys is not None:
            kw = None if k_window is None else k_window[..., run_keys]
            mask = _batched_mask(visible(qp_c, k_pos[..., run_keys], kw, causal))  # (B|1, 1, c, n)
        elif keys is None:
            mask = _batched_mask(visible(qp_c, k_pos, k_window, causal))  # (B|1, 1, c, Tk)
        elif doc_blocks is not None:
            flat = keys.flatten(1)  # (B, H * n)
            kw = None if k_window is None else k_window.gather(1, flat).view(keys.shape)
            mask = visible(qp_c[:, None], k_pos.gather(1, flat).view(keys.shape), kw, causal) & cand.valid
        else:
            kw = None if k_window is None else k_window[keys]
            mask = visible(qp_c, k_pos[keys], kw, causal) & cand.valid  # (B, H, c, n)
        n = mask.shape[-1]
        n_visible = n_visible + mask.sum().float() * (B // mask.shape[0]) * (H // mask.shape[1])

        if widest is None:
            dense_topk = 0 < topk < n and not kernel and dense_topk_pays(n, topk, D, attend)
        else:  # one pass for the whole call (chunks with at most topk candidates keep them all)
            dense_topk = 0 < topk < widest and not kernel and dense_topk_pays(widest, topk, D, attend)
        if topk == 0 or topk >= n or dense_topk:  # dense over the candidates
            if (keys is None or spans is not None) and dense_topk:  # one contiguous float32 k and v that every
                if k32 is None:  # chunk's matmuls share (a strided k would be copied by each chunk's matmul, and
                    k32, v32 = f32(k.contiguous()), f32(v.contiguous())  # kept for backward)
                k_c, v_c = k32, v32
            elif keys is None or spans is not None:
                k_c, v_c = k, v  # (B, H, Tk, D): all the candidates, or their spans
            else:
                gi = keys[..., None].expand(B, H, n, D)
                k_c, v_c = k.gather(2, gi), v.gather(2, gi)  # (B, H, n, D)
            args = (q_c, k_c, v_c, mask, edge_slot, edge_val, keys, qi_c)
            prefix = None  # key_runs' tokens first: the pattern over the chunk's token columns
            if spans is not None and key_runs[0][0] == 0 and key_runs[0][2] is None and pattern is not None \
                    and pattern.n_tokens == key_runs[0][1]:
                prefix = min(s1, key_runs[0][1])
            if dense_topk:  # keeps (c, n) probabilities for backward, no recomputation
                results.append(_dense_topk_chunk(*args, topk=min(topk, n), activation=activation,
                                                 pattern=pattern, spans=spans, token_prefix=prefix))
                continue
            if grad:  # keep the chunk's inputs only: its scores are recomputed in backward
                res = torch.utils.checkpoint.checkpoint(_dense_chunk, *args, use_reentrant=False,
                                                        activation=activation, pattern=pattern, spans=spans,
                                                        token_prefix=prefix)
            else:
                res = _dense_chunk(*args, activation=activation, pattern=pattern, spans=spans, token_prefix=prefix)
            results.append(res)
            continue
        sel = _select_topk(q_c, k, keys=keys, mask=mask, edge_slot=edge_slot, edge_val=edge_val, topk=topk)
        if grad:
            results.append(None)
            pending.append((s0, s1, sel, edge_val))
        else:  # gathered per chunk: peak memory O(chunk * topk * D)
            results.append(_gathered_attend(q_c, k, v, sel, edge_val=edge_val, activation=activation, q_pos=qi_c,
                                            pattern=pattern))

    nnz = q.new_zeros((), dtype=torch.float32)
    if pending:
        gathered, nz = _gathered_attend_all(q, k, v, pending, q_index=q_index, activation=activation, pattern=pattern)
        nnz = nnz + nz
        parts = iter(gathered)
        results = [r if r is not None else next(parts) for r in results]
    out = torch.cat([r.out for r in results], dim=2)
    nnz = nnz + sum(r.nnz for r in results if r.nnz is not None)
    stats = _stats(nnz, n_visible, float(B * H * Tq))
    if pattern is not None:
        stats["pattern"] = _concat_patterns([r.pattern for r in results])
    return out, stats


class ASAMAttention(nn.Module):
    """Multi-head ASAM self-attention over the tokens (+ appended R2MU memory keys), no positional encoding.

    forward(x (B, T, D), pos (T,), memory=None | (states (B, Tm, D), pos (Tm,), window (Tm,)),
            graph=None | (idx (B, T, m), val (B, T, m)), pattern=False) -> (y (B, T, D), stats dict)
    Document masking: pos (B, T) and the memory's pos / window (B, Tm) (selection.document_positions).
    """

    def __init__(self, cfg: ModelConfig, graph: bool | None = None):
        """graph: whether a SOES graph biases this attention (default: soes.enabled)."""
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        if cfg.soes.enabled if graph is None else graph:
            self.graph_scale = nn.Parameter(torch.empty(cfg.n_heads))
        else:
            self.register_parameter("graph_scale", None)
        self.sp = None  # a ressformer.sequence_parallel.SequenceShards: x is a shard of the sequence (`_forward_sp`)
        self.init_weights()

    @torch.no_grad()
    def init_graph_scale(self) -> None:
        if self.graph_scale is not None:
            self.graph_scale.fill_(1.0)

    @torch.no_grad()
    def init_weights(self) -> None:
        """In place (meta-device safe): N(0, init_std) projections, gamma = 1. The model re-initialises every
        parameter from its plan (ressformer.initialization; o_proj scaled by depth there)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=self.cfg.init_std)
        self.init_graph_scale()

    def forward(self, x: torch.Tensor, pos: torch.Tensor, *, memory=None, graph=None, pattern: bool = False,
                in_order: bool = False):
        """pattern=True: stats["pattern"] is this call's attention pattern as a SOES graph over the T tokens.
        in_order: pos grows with the token index and memory, if any, is [token cache | summaries] (`key_runs`)."""
        B, T, D = x.shape
        H, hd = self.n_heads, self.head_dim
        kv_in, k_pos, k_window = x, pos, None
        if memory is not None:
            m_states, m_pos, m_win = memory
            kv_in = torch.cat([x, m_states.to(x.dtype)], dim=1)  # (B, T + Tm, D)
            k_pos = torch.cat([pos, m_pos.to(pos.dtype)], dim=-1)
            k_window = torch.cat([torch.full_like(pos, UNBOUNDED_WINDOW), m_win.to(pos.dtype)], dim=-1)
        if graph is not None and self.graph_scale is None:
            raise ValueError("ASAMAttention got a graph but has no graph_scale: build it with soes.enabled=True "
                             "(and graph=True) or pass graph=None")
        if self.sp is not None:
            return self._forward_sp(x, pos, memory=memory, graph=graph, pattern=pattern)
        Tk = kv_in.shape[1]
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(kv_in).view(B, Tk, H, hd).transpose(1, 2)  # (B, H, Tk, hd)
        v = self.v_proj(kv_in).view(B, Tk, H, hd).transpose(1, 2)
        g = None if graph is None else (graph[0], graph[1])
        a = self.cfg.asam
        runs = None
        if pos.dim() == 2 and a.impl == "block":  # document masking: the key runs (selection.document_key_blocks)
            runs = document_runs(self.cfg, T, Tk - T)
        # the query chunks of a full forward (pos = 0..T-1) start at multiples of chunk_size; under document masking
        # a chunk of queries may straddle two chunks of a document's positions
        local = local_block_bound(self.cfg, memory is not None, a.chunk_size * (1 if runs is None else 2))
        out, stats = sparse_attention(q, k, v, q_pos=pos, k_pos=k_pos, k_window=k_window, graph=g,
                                      graph_scale=self.graph_scale, **asam_options(self.cfg), local_blocks=local,
                                      pattern_degree=self.cfg.soes.degree if pattern else 0, pattern_keys=T,
                                      doc_runs=runs,
                                      key_runs=self.key_runs(T, memory is not None) if in_order else None)
        y = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.o_proj(y), stats

    def key_runs(self, T: int, memory: bool):
        """`sparse_attention`'s key_runs for the model's full forward (forward's in_order): keys [tokens (T) | R2MU
        memory: token cache (T, window cache_window, the tokens' positions: recurrence.SegmentMemory.memory_keys) |
        summaries], positions growing with the token index (0..T-1, or per document), so a causal query chunk never
        sees a later token or cache entry. None where that layout does not hold: impl=block (block-aligned memory),
        encoder mode."""
        cfg = self.cfg
        if cfg.asam.impl != "chunked" or not cfg.causal:
            return None
        runs = ((0, T, None),)
        if memory:
            runs += ((T, T, cfg.r2mu.cache_window),)
        return runs

    def _forward_sp(self, x: torch.Tensor, pos: torch.Tensor, *, memory, graph, pattern: bool):
        """forward on a shard of the sequence (ressformer.sequence_parallel): x (B, T/P, D) at positions pos (T/P,);
        memory: the shard's (states [token cache (T/P) | summaries (S/P * m)], positions, windows), not
        block-aligned; graph: the shard's rows. The heads of this rank attend over the whole sequence as one process
        would; the stats are the group's."""
        sp, cfg = self.sp, self.cfg
        B, Tl, D = x.shape
        H, hd = self.n_heads, self.head_dim
        T, h = Tl * sp.size, H // sp.size

        def heads(lin: nn.Linear, inp: torch.Tensor) -> torch.Tensor:  # (B, n, D) shard -> (B, h, P * n, hd)
            return sp.to_heads(lin(inp).view(B, inp.shape[1], H, hd)).transpose(1, 2)

        q, k, v = heads(self.q_proj, x), heads(self.k_proj, x), heads(self.v_proj, x)
        k_pos = q_pos = sp.gather(pos, 0)  # (T,)
        k_window = None
        if memory is not None:
            m_states, m_pos, m_win = memory
            m_states = m_states.to(x.dtype)
            order = memory_order(sp.size, Tl, m_states.shape[1] - Tl, x.device)
            mk, mv = heads(self.k_proj, m_states)[:, :, order], heads(self.v_proj, m_states)[:, :, order]
            mp, mw = sp.gather(m_pos.to(pos.dtype), 0)[order], sp.gather(m_win.to(pos.dtype), 0)[order]
            if cfg.asam.impl == "block":  # filler keys (ressformer.model's docstring), as one process places them
                f_tok, f_sum = memory_fillers(T, len(order) - T, cfg, x.device)
                zeros = tuple(mk.new_zeros(B, h, len(f), hd) for f in (f_tok, f_sum))
                mk, mv = (block_aligned(t[:, :, :T], t[:, :, T:], zeros, 2) for t in (mk, mv))
                mp = block_aligned(mp[:T], mp[T:], (f_tok.to(mp.dtype), f_sum.to(mp.dtype)), 0)
                mw = block_aligned(mw[:T], mw[T:], tuple(mw.new_zeros(len(f)) for f in (f_tok, f_sum)), 0)
            k, v = torch.cat([k, mk], 2), torch.cat([v, mv], 2)
            k_pos = torch.cat([q_pos, mp])
            k_window = torch.cat([torch.full_like(q_pos, UNBOUNDED_WINDOW), mw])
        g = None if graph is None else (sp.gather(graph[0], 1), sp.gather(graph[1], 1))
        scale = None if self.graph_scale is None else self.graph_scale[sp.rank * h:(sp.rank + 1) * h]
        local = local_block_bound(cfg, memory is not None, cfg.asam.chunk_size)
        out, stats = sparse_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, k_window=k_window, graph=g,
                                      graph_scale=scale, **asam_options(cfg), local_blocks=local,
                                      pattern_degree=cfg.soes.degree if pattern else 0, pattern_keys=T,
                                      pattern_rows=True)
        y = sp.to_tokens(out.transpose(1, 2)).reshape(B, Tl, D)
        nnz, n_visible = sp.sum(stats["nnz"]), sp.sum(stats["visible"])
        group = _stats(nnz, n_visible, stats["rows"] * sp.size)
        if pattern:
            idx, prob = (sp.to_tokens(t.transpose(1, 2)).transpose(1, 2) for t in stats["pattern"])  # (B, H, Tl, n)
            group["pattern"] = pattern_edges(idx, prob, n_tokens=T, m=cfg.soes.degree, own=pos)
        return self.o_proj(y), group
