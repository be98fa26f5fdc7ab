"""ASAM, the Adaptive Sparse Attention Module (paper sec. 3.2): top-k keys per query + sparse activation.

For query i and key j (per batch b and head h):

    s_ij   = q_i . k_j / sqrt(D)  +  gamma_h * A_ij               A: SOES latent graph (sec. 3.3), optional
    V_i    = { j visible to i }                                    causality, windows (below)
    K_i    = the topk indices of s_i. over V_i (all of V_i if topk == 0 or |V_i| <= topk)
    p_i.   = activation(s_i. restricted to K_i)                    softmax | sparsemax | entmax15
    out_i  = sum_{j in K_i} p_ij v_j

Visibility (positions are used only here; there is no positional encoding of any kind, sec. 3.3):
causal: k_pos[j] <= q_pos[i] and q_pos[i] - k_pos[j] < k_window[j]; non-causal: |q_pos[i] - k_pos[j]| <
k_window[j]; no k_window = unbounded. The model appends R2MU memory keys after the T token keys (a
previous-step cache with a finite window, segment summaries positioned at their segment's last token).
A query with no visible key outputs zeros (its gradients are zero, never NaN).

Three implementations of the same function (`impl`):
* reference: materialises the (B, H, Tq, Tk) scores. Plain and readable; used by the tests.
* chunked:   exact, memory linear in T. Queries are processed in chunks of chunk_size. With topk > 0 each
             chunk's top-k key indices are found on scores computed under torch.no_grad (chunk x Tk at a
             time), then only those keys / values are gathered and their scores recomputed WITH grad, so
             autograd saves O(T * topk * D) instead of O(T * Tk). With topk == 0 each chunk's dense
             attention runs inside a (non-reentrant) torch.utils.checkpoint, so only its inputs are kept.
* block:     block-sparse. Keys are cut into blocks of block_size summarised by their mean key; each
             query scores the summaries of the blocks that may be visible to it (no grad, q_i . kbar_b) and
             keeps its blocks_per_query best plus the visible blocks overlapping its chunk's positions (local
             blocks, kept by position alone). A kept non-local block lies wholly before the chunk, so the
             choice depends on q_i and past keys only: causal (a chunk-wide choice, max over the chunk's
             queries, would let a later query of the chunk steer an earlier one's keys). The chunk then runs
             the chunked computation over the union of its queries' blocks, each query masked to its own.
             Time O(T * (T / block_size + union * block_size)); the union is blocks_per_query + local when
             a chunk's queries agree and at most all blocks. block_select="chunk" bounds it: the chunk's
             earliest query (which every query of the chunk may see) chooses the non-local blocks for the
             whole chunk, still causal, union = blocks_per_query + local always, at the price of staleness
             (a later query uses blocks chosen up to chunk_size - 1 positions earlier). Equal to `chunked`
             when blocks_per_query covers all blocks. Block visibility is a superset test (min position,
             max position + window), the exact key-level mask is applied afterwards.

Top-k ties (repeated tokens have equal keys: no positional encoding; scores equal within TIE_RTOL, i.e. within
rounding) break by the lower key index, and the local blocks of a query follow from its position's chunk, so a
query's keys depend on the visible keys alone, not on how many keys or queries come with it nor on the rounding
of the call that computed them: incremental decoding (ressformer/cache.py) equals the full forward.

The graph bias is matched to the gathered keys by index (the selection pass records which of the kept
slots each graph edge lands on), so gradients reach the graph values and gamma without a T x T tensor.

`stats` (detached, cheap): density = nonzero probabilities / visible keys (for `block`: visible keys among
the kept blocks), summed over all queries and heads; keys_per_query = mean nonzero probabilities per
query and head.

ASAMAttention: q_proj, k_proj, v_proj, o_proj (no bias) and, when soes.enabled, graph_scale gamma (H,)
initialised to 1.0 (the graph rows are stochastic, so the bias adds at most gamma_h to a logit at init).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ressformer.config import ModelConfig
from ressformer.kernels import use_asam_kernel
from ressformer.sparse import ACTIVATIONS, at_least_fp32 as f32, normalize

IMPLS = ("reference", "chunked", "block")
# Window meaning "no window": larger than any position difference (kept in int64 arithmetic).
UNBOUNDED_WINDOW = 1 << 40


def _visible(qp: torch.Tensor, kp: torch.Tensor, kw: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Visibility of keys to queries. qp (c,), kp (..., n), kw like kp or None -> bool (..., c, n)."""
    d = qp[:, None] - kp[..., None, :]  # (..., c, n) query pos - key pos
    if causal:
        vis = d >= 0
        if kw is not None:
            vis = vis & (d < kw[..., None, :])
    else:
        vis = torch.ones_like(d, dtype=torch.bool) if kw is None else d.abs() < kw[..., None, :]
    return vis


def _check_inputs(q, k, v, q_pos, k_pos, k_window, activation, topk, graph, graph_scale, impl):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"sparse_attention expects q (B,H,Tq,D), k = v (B,H,Tk,D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q_pos.shape != (q.shape[2],) or k_pos.shape != (k.shape[2],):
        raise ValueError(f"q_pos must be ({q.shape[2]},) and k_pos ({k.shape[2]},); got {tuple(q_pos.shape)}, "
                         f"{tuple(k_pos.shape)}")
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


# Top-k choices: values within TIE_RTOL * max(|largest|, |(k+1)-th|) of the k-th value count as equal to it.
TIE_RTOL = 1e-5


def topk_first(x: torch.Tensor, k: int, floor: float = float("-inf")) -> torch.Tensor:
    """Indices (..., k) of the k largest entries of x along the last dim; entries equal to the k-th value within
    TIE_RTOL break ties by the lower index.

    Repeated tokens have equal keys (no positional encoding), and equal states give equal scores, so ties at the
    k-th place are common. torch.topk orders equal entries arbitrarily (it depends on the row's length), and
    states equal in exact arithmetic differ by rounding when computed in different calls (a full forward vs
    incremental decoding): breaking near-ties by index makes the choice depend on the visible keys alone. Only
    rows with an entry near the k-th value left out are redone (entries <= floor are unused: their ties do not
    matter); the cost is one topk of k + 1 and a host sync.
    """
    n = x.shape[-1]
    if k >= n:
        return x.topk(k, dim=-1).indices
    vals, idx = x.topk(k + 1, dim=-1)  # (..., k + 1) descending
    idx = idx[..., :k]
    thr, nxt = vals[..., k - 1], vals[..., k]  # the k-th and the (k+1)-th value
    tol = TIE_RTOL * torch.maximum(vals[..., 0].abs(), nxt.abs())
    tie = (nxt > floor) & (thr - nxt <= tol)  # (...,) an entry within tol of the k-th value is left out
    if bool(tie.any()):
        rows = tie.nonzero(as_tuple=True)
        xr, t, tl = x[rows], thr[rows][:, None], tol[rows][:, None]  # (R, n), (R, 1), (R, 1)
        ar = torch.arange(n, device=x.device)
        # the entries clearly above the k-th value (fewer than k), then those within tol of it (and > floor) by index
        near = (xr >= t - tl) & (xr > floor)
        key = torch.where(xr > t + tl, 2 * n - ar, torch.where(near, n - ar, torch.full_like(ar, -1)))  # (R, n)
        idx = idx.clone()
        idx[rows] = key.topk(k, dim=-1).indices
    return idx


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


def pattern_edges(key_idx: torch.Tensor, prob: torch.Tensor, n_tokens: int, m: int, own: torch.Tensor):
    """The SOES graph rows of an attention pattern: A_ij = mean_h p_hij over token keys, its m largest entries.

    key_idx (B, H, Q, n) key index of each probability, prob (B, H, Q, n) (exact zeros allowed); keys at index
    >= n_tokens (R2MU memory) are not tokens and are dropped; own (Q,) the queries' own token index. Equal key
    indices of different heads are summed (sort, then a segment sum), so valid slots hold distinct indices.
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


def _dense_pattern(p: torch.Tensor, n_tokens: int, m: int, own: torch.Tensor):
    """pattern_edges for probabilities over all keys in key order: p (B, H, Q, Tk) -> head mean, top-m."""
    pm = p[..., :n_tokens].mean(1)  # (B, Q, n_tokens)
    idx = torch.arange(pm.shape[-1], device=p.device).expand_as(pm)
    return _pad_edges(idx, pm, m, own)


def _graph_bias_dense(graph, graph_scale, Tk: int, H: int, dtype) -> torch.Tensor:
    """(B, H, Tq, Tk): gamma_h * sum_r val[b,i,r] [idx[b,i,r] == j] (reference path only)."""
    idx, val = graph
    B, Tq, _ = idx.shape
    a = torch.zeros(B, Tq, Tk, dtype=dtype, device=val.device).scatter_add(-1, idx, val.to(dtype))  # (B, Tq, Tk)
    return graph_scale.to(dtype)[None, :, None, None] * a[:, None]


def _reference(q, k, v, q_pos, k_pos, k_window, causal, activation, topk, graph, graph_scale, pattern):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", f32(q), f32(k)) / math.sqrt(D)  # (B, H, Tq, Tk) float32
    if graph is not None:
        s = s + _graph_bias_dense(graph, graph_scale, Tk, H, s.dtype)
    vis = _visible(q_pos, k_pos, k_window, causal)  # (Tq, Tk)
    neg = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    s = torch.where(vis, s, neg)
    keep = vis.expand(B, H, Tq, Tk)
    if 0 < topk < Tk:
        sel = topk_first(s.detach(), topk)  # (B, H, Tq, topk)
        keep = torch.zeros_like(keep).scatter(-1, sel, True) & vis
        s = torch.where(keep, s, neg)
    p = normalize(s, activation)  # (B, H, Tq, Tk)
    out = torch.einsum("bhij,bhjd->bhid", p, f32(v)).to(v.dtype)
    pd = p.detach()
    stats = {"nnz": (pd > 0).sum().float(), "visible": vis.sum().float() * B * H, "rows": float(B * H * Tq)}
    if pattern is not None:
        stats["pattern"] = _dense_pattern(p, pattern[0], pattern[1], q_pos)
    return out, stats


def _edge_bias(epos: torch.Tensor, gval: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter graph edge values onto slots. epos (B, H, c, m) slot of each edge (-1: not present),
    gval (B, H, c, m) gamma_h * val -> (B, H, c, n)."""
    present = epos >= 0
    src = torch.where(present, gval, torch.zeros((), dtype=gval.dtype, device=gval.device))
    out = torch.zeros(*epos.shape[:-1], n, dtype=gval.dtype, device=gval.device)
    return out.scatter_add(-1, epos.clamp(min=0), src)


def _dense_chunk(q_c, k_c, v_c, mask, epos, gval, activation, cand=None, qp_c=None, pattern=None):
    """Dense attention of a query chunk over candidate keys.

    q_c (B, H, c, D); k_c, v_c (B, H, n, D); mask (B|1, H|1, c, n) bool; epos/gval (B, H, c, m) or None;
    cand (B, H, n) key index of each candidate or None (candidates = all keys in order); pattern
    (n_tokens, degree) or None. Returns (out (B, H, c, D), nnz () float detached, pattern idx, pattern val).
    """
    s = torch.einsum("bhid,bhjd->bhij", f32(q_c), f32(k_c)) / math.sqrt(q_c.shape[-1])  # (B, H, c, n) f32
    if epos is not None:
        s = s + _edge_bias(epos, gval.to(s.dtype), s.shape[-1])
    s = torch.where(mask, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
    p = normalize(s, activation)
    p_idx = p_val = None
    if pattern is not None:
        if cand is None:
            p_idx, p_val = _dense_pattern(p, pattern[0], pattern[1], qp_c)
        else:
            B, H, c, n = p.shape
            p_idx, p_val = pattern_edges(cand[:, :, None, :].expand(B, H, c, n), p, pattern[0], pattern[1], qp_c)
    out = torch.einsum("bhij,bhjd->bhid", p, f32(v_c)).to(v_c.dtype)
    return out, (p.detach() > 0).sum().float(), p_idx, p_val


def _chunk_attend(q_c, k, v, cand, cand_valid, qp_c, k_pos, k_window, causal, activation, topk, epos, gval,
                  use_ckpt, pattern):
    """Attention of one query chunk over a candidate key set shared by the chunk's queries.

    q_c (B, H, c, D); k, v (B, H, Tk, D); cand None (all Tk keys) or (B, H, n) key indices with cand_valid
    (B, H, c, n) bool (per query: the candidates it may use); qp_c (c,); epos (B, H, c, m) candidate position
    of each graph edge (-1: absent) or None; gval (B, H, c, m) gamma_h * val or None.

    Dense over the candidates (topk == 0 or topk >= n): returns ("dense", (out (B, H, c, D), nnz, pattern idx,
    pattern val), visible).
    Otherwise only the no-grad selection runs here and ("topk", Selection, visible) comes back; the caller
    gathers the selected keys of all chunks at once (`_gathered_attend`). nnz / visible: detached floats.
    """
    B, H, c, D = q_c.shape
    if cand is None:
        n = k.shape[2]
        mask = _visible(qp_c, k_pos, k_window, causal)[None, None]  # (1, 1, c, n)
    else:
        n = cand.shape[-1]
        kw = None if k_window is None else k_window[cand]
        mask = _visible(qp_c, k_pos[cand], kw, causal) & cand_valid  # (B, H, c, n)
    visible = mask.sum().float() * (B * H if mask.shape[0] == 1 else 1)

    if topk == 0 or topk >= n:
        if cand is None:
            k_c, v_c = k, v  # (B, H, n=Tk, D)
        else:
            gi = cand[..., None].expand(B, H, n, D)
            k_c, v_c = k.gather(2, gi), v.gather(2, gi)  # (B, H, n, D)
        args = (q_c, k_c, v_c, mask, epos, gval, activation, cand, qp_c, pattern)
        if use_ckpt:
            res = torch.utils.checkpoint.checkpoint(_dense_chunk, *args, use_reentrant=False)
        else:
            res = _dense_chunk(*args)
        return "dense", res, visible

    # Selection pass: scores of every candidate, no autograd graph (chunk x n floats, freed at once).
    with torch.no_grad():
        k_c = k if cand is None else k.gather(2, cand[..., None].expand(B, H, n, D))
        s = torch.einsum("bhid,bhjd->bhij", f32(q_c), f32(k_c)) / math.sqrt(D)  # (B, H, c, n) float32
        if epos is not None:
            s = s + _edge_bias(epos, gval.to(s.dtype), n)
        s = torch.where(mask, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
        sel = topk_first(s, topk)  # (B, H, c, topk) candidate positions
        del s, k_c
        sel_mask = mask.expand(B, H, c, n).gather(-1, sel)  # (B, H, c, topk)
        epos_sel = None
        if epos is not None:
            # slot (0..topk-1) each graph edge lands on, -1 if its key was not selected
            hit = (sel[..., :, None] == epos[..., None, :]) & (epos[..., None, :] >= 0)  # (B, H, c, topk, m)
            epos_sel = torch.where(hit.any(-2), hit.to(torch.uint8).argmax(-2), torch.full_like(epos, -1))
        key_idx = sel if cand is None else cand[:, :, None, :].expand(B, H, c, n).gather(-1, sel)  # (B, H, c, topk)
    return "topk", (key_idx, sel_mask, epos_sel), visible


def _gathered_attend(q_s, k, v, key_idx, sel_mask, epos_sel, gval, activation, qp_s=None, pattern=None):
    """Gradient pass over the selected keys of many query chunks at once.

    q_s (B, H, Q, D); key_idx / sel_mask (B, H, Q, topk); epos_sel / gval (B, H, Q, m) or None.
    One gather of k and v for all Q queries: its backward is one scatter into a (B, H, Tk, D) gradient, where
    a gather per chunk would zero-fill a full-size gradient per chunk (O(T^2 D / chunk) time). Autograd keeps
    O(Q * topk * D), as the per-chunk form did. Where `use_asam_kernel` says so (CUDA tensors, triton installed),
    the Triton kernel of ressformer/kernels/asam_triton.py computes the same without the gathered keys / values.
    Returns (out (B, H, Q, D), nnz detached float, pattern idx, pattern val).
    """
    B, H, Q, topk = key_idx.shape
    D = q_s.shape[-1]
    if use_asam_kernel(q_s):  # Triton (ressformer/kernels): keys / values read by index, never gathered
        from ressformer.kernels.asam_triton import topk_attention

        bias = None if epos_sel is None else _edge_bias(epos_sel, f32(gval), topk)  # (B, H, Q, topk)
        out, p = topk_attention(q_s, k, v, key_idx, sel_mask, bias, activation)
    else:
        gi = key_idx.reshape(B, H, Q * topk, 1).expand(B, H, Q * topk, D)
        k_g = k.gather(2, gi).view(B, H, Q, topk, D)
        v_g = v.gather(2, gi).view(B, H, Q, topk, D)
        s = torch.einsum("bhid,bhikd->bhik", f32(q_s), f32(k_g)) / math.sqrt(D)  # (B, H, Q, topk) float32
        if epos_sel is not None:
            s = s + _edge_bias(epos_sel, gval.to(s.dtype), topk)
        s = torch.where(sel_mask, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
        p = normalize(s, activation)
        out = torch.einsum("bhik,bhikd->bhid", p, f32(v_g)).to(v_g.dtype)
    p_idx = p_val = None
    if pattern is not None:
        p_idx, p_val = pattern_edges(key_idx, p, pattern[0], pattern[1], qp_s)
    return out, (p.detach() > 0).sum().float(), p_idx, p_val


def block_summaries(k: torch.Tensor, k_pos: torch.Tensor, k_window: torch.Tensor | None, block_size: int):
    """Key blocks of block_size consecutive keys: k (B, H, Tk, D) -> kbar (B, H, nb, D) the mean key of each block,
    and per block (nb,): blk_lo / blk_hi the reach of its keys' windows (min k_pos - w, max k_pos + w),
    blk_min / blk_max its key position range. The last block may be partial (mean over its real keys)."""
    B, H, Tk, D = k.shape
    nb = -(-Tk // block_size)
    pad = nb * block_size - Tk
    kpad = torch.nn.functional.pad(f32(k), (0, 0, 0, pad))  # (B, H, nb * bs, D) at least float32 (selection)
    cnt = torch.full((nb,), float(block_size), dtype=kpad.dtype, device=k.device)
    cnt[-1] = block_size - pad
    kbar = kpad.view(B, H, nb, block_size, D).sum(3) / cnt[:, None]  # (B, H, nb, D) mean key
    w = k_window if k_window is not None else torch.full_like(k_pos, UNBOUNDED_WINDOW)

    def per_block(x: torch.Tensor, largest: bool) -> torch.Tensor:  # (Tk,) -> (nb,) max or min
        fill = int(x.min()) if largest else int(x.max())  # padding never wins the reduction
        xb = torch.nn.functional.pad(x, (0, pad), value=fill).view(nb, block_size)
        return xb.amax(1) if largest else xb.amin(1)

    blk_min, blk_max = per_block(k_pos, False), per_block(k_pos, True)  # key position range
    blk_hi, blk_lo = per_block(k_pos + w, True), per_block(k_pos - w, False)  # window reach
    return kbar, blk_lo, blk_hi, blk_min, blk_max


def _edge_slots(e: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Candidate position of each graph edge's key, -1 if its block was not kept.

    e (B, H, c, m) key index of each edge; blocks (B, H, n_sel) distinct kept block ids, the candidates being
    cand[..., j * block_size + o] = blocks[..., j] * block_size + o. Matching the edge's block costs
    O(c * m * n_sel) per chunk, independent of the number of keys.
    """
    hit = (e // block_size)[..., None] == blocks[:, :, None, None, :]  # (B, H, c, m, n_sel)
    slot = hit.to(torch.uint8).argmax(-1) * block_size + e % block_size
    return torch.where(hit.any(-1), slot, torch.full_like(slot, -1))


def block_candidates(q_c, kbar, blk_lo, blk_hi, blk_min, blk_max, qp_c, causal, blocks_per_query, block_size, Tk,
                     select: str = "query", chunk_size: int | None = None):
    """Key blocks of one query chunk, chosen per query so that causality holds.

    Query i keeps its blocks_per_query best blocks by q_i . kbar_b among the blocks that may be visible to it,
    plus every visible block overlapping its chunk's positions (local blocks, kept by position alone). A kept
    non-local block lies entirely before the chunk, so its summary holds past keys only; nothing query i keeps
    depends on a later query. The chunk of a query at position p is [floor(p / chunk_size) * chunk_size,
    + chunk_size) (chunk_size None: the span of qp_c), so the rule is the same whether a chunk's queries come in
    one call (the full forward) or a few at a time (incremental decoding). The chunk computes over the union of
    its queries' blocks and masks each query to its own. Returns cand (B, H, n) key indices of the union (n = union
    blocks x block_size), cand_valid (B, H, c, n) bool (the key exists and its block is one query i kept), blocks
    (B, H, n_sel) the union's distinct block ids, cand[..., j * block_size + o] = blocks[..., j] * block_size + o.

    select="chunk": the chunk's non-local blocks are chosen once, by its earliest query (the lowest position,
    which every query of the chunk may see), and shared by all its queries: still causal, and the union is
    bounded by blocks_per_query + local blocks however much the queries would disagree.
    """
    B, H, c, D = q_c.shape
    nb = kbar.shape[2]
    qp = qp_c[:, None]  # (c, 1)
    if causal:
        bvis = (blk_min[None] <= qp) & (qp < blk_hi[None])  # (c, nb) some key of the block may be visible
    else:
        bvis = (blk_lo[None] < qp) & (qp < blk_hi[None])
    if chunk_size is None:
        c_lo, c_hi = qp_c.min().view(1, 1), qp_c.max().view(1, 1)
    else:
        c_lo = torch.div(qp, chunk_size, rounding_mode="floor") * chunk_size  # (c, 1) first position of i's chunk
        c_hi = c_lo + chunk_size - 1
    local = bvis & (blk_min[None] <= c_hi) & (blk_max[None] >= c_lo)  # (c, nb)
    neg_inf = torch.full((), float("-inf"), dtype=torch.float32, device=q_c.device)
    n_top = min(nb, blocks_per_query)
    if select == "query":
        sb = torch.einsum("bhid,bhnd->bhin", f32(q_c), f32(kbar))  # (B, H, c, nb)
        sb = torch.where(bvis & ~local, sb, neg_inf)
        top = topk_first(sb, n_top)  # (B, H, c, n_top) query i's best non-local blocks
        kept = torch.zeros(B, H, c, nb, dtype=torch.bool, device=q_c.device)
        kept.scatter_(-1, top, sb.gather(-1, top) > float("-inf"))
        kept |= local  # (B, H, c, nb) query i's own local blocks + blocks_per_query more
    elif select == "chunk":
        i0 = int(qp_c.argmin())
        any_local = local.any(0)  # (nb,) kept by position, for the queries that may see them
        sb = torch.einsum("bhd,bhnd->bhn", f32(q_c[:, :, i0]), f32(kbar))  # (B, H, nb) the earliest query's
        sb = torch.where(bvis[i0] & ~any_local, sb, neg_inf)
        top = topk_first(sb, n_top)  # (B, H, blocks_per_query)
        shared = torch.zeros(B, H, nb, dtype=torch.bool, device=q_c.device)
        shared.scatter_(-1, top, sb.gather(-1, top) > float("-inf"))
        kept = (shared | any_local)[:, :, None, :] & bvis  # (B, H, c, nb)
    else:
        raise ValueError(f"block_select={select!r}: choose 'query' or 'chunk'")
    union = kept.any(2)  # (B, H, nb)
    n_sel = max(int(union.sum(-1).max()), 1)
    # ascending block ids, so candidates are in key order whatever else the union holds (ties then break alike)
    blocks = union.to(torch.uint8).topk(n_sel, dim=-1).indices.sort(-1).values  # (B, H, n_sel); pads: unkept
    keep = kept.gather(-1, blocks[:, :, None, :].expand(B, H, c, n_sel))  # (B, H, c, n_sel)
    offs = torch.arange(block_size, device=q_c.device)
    cand = (blocks[..., None] * block_size + offs).flatten(2)  # (B, H, n)
    cand_valid = keep.repeat_interleave(block_size, dim=-1) & (cand < Tk)[:, :, None, :]  # (B, H, c, n)
    return cand.clamp(max=Tk - 1), cand_valid, blocks


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pos: torch.Tensor,
                     k_pos: torch.Tensor, k_window: torch.Tensor | None = None, causal: bool = True,
                     activation: str = "softmax", topk: int = 0, graph=None, graph_scale: torch.Tensor | None = None,
                     impl: str = "chunked", chunk_size: int = 128, block_size: int = 64,
                     blocks_per_query: int = 8, block_select: str = "query",
                     pattern_degree: int = 0, pattern_keys: int | None = None) -> tuple[torch.Tensor, dict]:
    """ASAM attention. q (B, H, Tq, D), k / v (B, H, Tk, D), q_pos (Tq,), k_pos (Tk,), k_window (Tk,) | None,
    graph (idx (B, Tq, m) into the key axis, val (B, Tq, m)) | None, graph_scale (H,).

    Returns (out (B, H, Tq, D), stats {density, keys_per_query} detached float tensors). With pattern_degree > 0
    stats also holds "pattern": the SOES graph of this attention (`pattern_edges`: head-averaged probabilities
    over the first pattern_keys keys (default Tq: the tokens), their pattern_degree largest), with gradient.
    """
    _check_inputs(q, k, v, q_pos, k_pos, k_window, activation, topk, graph, graph_scale, impl)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    pattern = (Tq if pattern_keys is None else pattern_keys, pattern_degree) if pattern_degree > 0 else None
    if impl == "reference":
        out, st = _reference(q, k, v, q_pos, k_pos, k_window, causal, activation, topk, graph, graph_scale, pattern)
        stats = _finish_stats(st["nnz"], st["visible"], st["rows"])
        if pattern is not None:
            stats["pattern"] = st["pattern"]
        return out, stats

    if impl == "block":
        if chunk_size < 1 or block_size < 1 or blocks_per_query < 1:
            raise ValueError(f"block attention needs chunk_size, block_size, blocks_per_query >= 1; got "
                             f"{chunk_size}, {block_size}, {blocks_per_query}")
        with torch.no_grad():
            kbar, blk_lo, blk_hi, blk_min, blk_max = block_summaries(k, k_pos, k_window, block_size)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")

    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if graph is not None:
        g_idx, g_val = graph
        gval_all = f32(graph_scale)[None, :, None, None] * f32(g_val)[:, None]  # (B, H, Tq, m) float32
    # outs: per chunk (out, nnz, pattern idx, pattern val), None for a top-k chunk until its gradient pass;
    # sel_parts: (s0, s1, (key_idx, sel_mask, epos_sel), gval) of those chunks
    outs, sel_parts = [], []
    nnz, visible = q.new_zeros((), dtype=torch.float32), q.new_zeros((), dtype=torch.float32)
    for s0 in range(0, Tq, chunk_size):
        s1 = min(Tq, s0 + chunk_size)
        q_c, qp_c = q[:, :, s0:s1], q_pos[s0:s1]
        c = s1 - s0
        cand = cand_valid = None
        epos = gval = None
        if impl == "block":
            with torch.no_grad():
                cand, cand_valid, blocks = block_candidates(q_c, kbar, blk_lo, blk_hi, blk_min, blk_max, qp_c,
                                                             causal, blocks_per_query, block_size, Tk, block_select,
                                                             chunk_size)
        if graph is not None:
            gval = gval_all[:, :, s0:s1]  # (B, H, c, m)
            e = g_idx[:, None, s0:s1].expand(B, H, c, g_idx.shape[-1])  # (B, H, c, m) key index of each edge
            if cand is None:
                epos = e
            else:
                with torch.no_grad():
                    epos = _edge_slots(e, blocks, block_size)
        kind, res, vis_c = _chunk_attend(q_c, k, v, cand, cand_valid, qp_c, k_pos, k_window, causal, activation,
                                         topk, epos, gval, use_ckpt, pattern)
        visible = visible + vis_c
        if kind == "dense":
            outs.append(res)
        elif not use_ckpt:  # no gradient wanted: gather per chunk, peak memory O(chunk * topk * D)
            outs.append(_gathered_attend(q_c, k, v, *res, gval, activation, qp_c, pattern))
        else:  # with gradient: autograd keeps every chunk's gathered keys anyway; gather them all at once
            outs.append(None)
            sel_parts.append((s0, s1, res, gval))
    if sel_parts:  # the top-k chunks' gradient pass, all at once
        sizes = [s1 - s0 for s0, s1, _, _ in sel_parts]
        rows = torch.cat([torch.arange(s0, s1, device=q.device) for s0, s1, _, _ in sel_parts])
        q_s = q if sum(sizes) == Tq else q[:, :, rows]
        key_idx, sel_mask, epos_sel = (torch.cat(t, dim=2) if t[0] is not None else None
                                       for t in zip(*(sel for _, _, sel, _ in sel_parts)))
        gval_s = None if epos_sel is None else torch.cat([g for _, _, _, g in sel_parts], dim=2)
        o_s, nz, pi_s, pv_s = _gathered_attend(q_s, k, v, key_idx, sel_mask, epos_sel, gval_s, activation,
                                               q_pos[rows], pattern)
        nnz = nnz + nz
        split = [o_s.split(sizes, dim=2)] + [x.split(sizes, dim=1) if x is not None else [None] * len(sizes)
                                             for x in (pi_s, pv_s)]
        pieces = iter(zip(*split))
        for i, r in enumerate(outs):
            if r is None:
                o, pi, pv = next(pieces)
                outs[i] = (o, 0.0, pi, pv)  # this part's nnz is in nz
    out = torch.cat([r[0] for r in outs], dim=2)
    nnz = nnz + sum(r[1] for r in outs)
    stats = _finish_stats(nnz, visible, float(B * H * Tq))
    if pattern is not None:
        stats["pattern"] = (torch.cat([r[2] for r in outs], dim=1), torch.cat([r[3] for r in outs], dim=1))
    return out, stats


def _finish_stats(nnz, visible, rows) -> dict:
    nnz = torch.as_tensor(nnz, dtype=torch.float32).detach()
    visible = torch.as_tensor(visible, dtype=torch.float32).detach()
    return {"density": nnz / visible.clamp(min=1.0), "keys_per_query": nnz / max(rows, 1.0)}


class ASAMAttention(nn.Module):
    """Multi-head ASAM self-attention over the tokens (+ appended R2MU memory keys), no positional encoding.

    forward(x (B, T, D), pos (T,), memory=None | (states (B, Tm, D), pos (Tm,), window (Tm,)),
            graph=None | (idx (B, T, m), val (B, T, m)), pattern=False) -> (y (B, T, D), stats dict)
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
        self.init_weights()

    @torch.no_grad()
    def init_graph_scale(self) -> None:
        if self.graph_scale is not None:
            self.graph_scale.fill_(1.0)

    @torch.no_grad()
    def init_weights(self, std: float | None = None, out_std: float | None = None) -> None:
        """In place (meta-device safe): N(0, std) projections, N(0, out_std) o_proj, gamma = 1."""
        std = self.cfg.init_std if std is None else std
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=std if out_std is None else out_std)
        self.init_graph_scale()

    def forward(self, x: torch.Tensor, pos: torch.Tensor, memory=None, graph=None, pattern: bool = False):
        """pattern=True: stats["pattern"] is this call's attention pattern as a SOES graph over the T tokens."""
        B, T, D = x.shape
        H, hd = self.n_heads, self.head_dim
        a = self.cfg.asam
        kv_in, k_pos, k_window = x, pos, None
        if memory is not None:
            m_states, m_pos, m_win = memory
            kv_in = torch.cat([x, m_states.to(x.dtype)], dim=1)  # (B, T + Tm, D)
            k_pos = torch.cat([pos, m_pos.to(pos.dtype)])
            k_window = torch.cat([torch.full_like(pos, UNBOUNDED_WINDOW), m_win.to(pos.dtype)])
        if graph is not None and self.graph_scale is None:
            raise ValueError("ASAMAttention got a graph but has no graph_scale: build it with soes.enabled=True "
                             "(and graph=True) or pass graph=None")
        Tk = kv_in.shape[1]
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(kv_in).view(B, Tk, H, hd).transpose(1, 2)  # (B, H, Tk, hd)
        v = self.v_proj(kv_in).view(B, Tk, H, hd).transpose(1, 2)
        g = None if graph is None else (graph[0], graph[1])
        out, stats = sparse_attention(q, k, v, q_pos=pos, k_pos=k_pos, k_window=k_window, causal=self.cfg.causal,
                                      activation=a.activation, topk=a.topk, graph=g, graph_scale=self.graph_scale,
                                      impl=a.impl, chunk_size=a.chunk_size, block_size=a.block_size,
                                      blocks_per_query=a.blocks_per_query, block_select=a.block_select,
                                      pattern_degree=self.cfg.soes.degree if pattern else 0, pattern_keys=T)
        y = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.o_proj(y), stats
