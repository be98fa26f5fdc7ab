"""Key selection shared by ASAM (attention.py) and the SOES graph (structure.py): visibility, top-k, key blocks.

* Visibility: key j is visible to query i iff causal: k_pos[j] <= q_pos[i] and q_pos[i] - k_pos[j] < k_window[j];
  non-causal: |q_pos[i] - k_pos[j]| < k_window[j]; no window = UNBOUNDED_WINDOW.
* Document masking: per-sample positions (B, T) from `document_positions` put documents DOCUMENT_STRIDE apart, so the
  same visibility rule keeps every read inside a document.
* Top-k ties break by the lower index (`topk_first`): repeated tokens have equal keys (no positional encoding), so
  the choice depends on the visible keys alone, not on the row's length or the rounding of the call that made the
  scores; incremental decoding (cache.py) then equals the full forward.
* Key blocks (asam.impl=block): blocks of block_size keys summarised by their mean (`block_summaries`); a query
  keeps its blocks_per_query best by q . mean among the blocks it may see, plus the blocks overlapping its chunk's
  positions (local, kept by position alone). A kept non-local block lies wholly before the chunk, so the choice is
  causal. block_select=chunk: the chunk's earliest query chooses for all its queries (a bounded union of blocks,
  at the price of blocks chosen up to chunk_size - 1 positions earlier).
* Key blocks under document masking (`document_key_blocks`, `document_block_candidates`): a document's blocks are
  cut from its own first key in each run of keys (tokens, token cache, summaries), as they are when it runs alone,
  and its queries choose among them by the same rule; so a packed document's selection is the one it has alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ressformer.kernels import custom_op
from ressformer.sparse import at_least_fp32 as f32
from ressformer.sparse import order_key

# Window meaning "no window": larger than any position difference within a document (kept in int64 arithmetic).
UNBOUNDED_WINDOW = 1 << 40
# Document masking: document d's tokens sit at positions d * DOCUMENT_STRIDE + (0, 1, ...) (`document_positions`).
# Every key's window is at most UNBOUNDED_WINDOW, far below the gap between two documents, so a key of another
# document is never visible, whatever reads it (ASAM, R2MU memory, SOES), with no mask of its own.
DOCUMENT_STRIDE = 1 << 44
# A spare R2MU summary slot's position under document masking: after every position, so each run of memory keys
# stays sorted by position; its window is 0, so nothing reads it.
SPARE_POSITION = 1 << 62
# Top-k choices: values within TIE_RTOL * max(|largest|, |(k+1)-th|) of the k-th value count as equal to it.
TIE_RTOL = 1e-5


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, k_window: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Visibility of keys to queries. q_pos (..., c), k_pos (..., n), k_window like k_pos or None (broadcasting
    leading dims: per-sample positions (B, .) under document masking) -> bool (..., c, n)."""
    d = q_pos[..., :, None] - k_pos[..., None, :]  # (..., c, n) query pos - key pos
    if causal:  # no window = UNBOUNDED_WINDOW: keys of another document (DOCUMENT_STRIDE apart) stay invisible
        vis = (d >= 0) & (d < (UNBOUNDED_WINDOW if k_window is None else k_window[..., None, :]))
    else:
        vis = torch.ones_like(d, dtype=torch.bool) if k_window is None else d.abs() < k_window[..., None, :]
    return vis


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """Document masking: documents (B, T) integer id of each token's document (a new document starts wherever the id
    changes along T) -> positions (B, T) int64: d * DOCUMENT_STRIDE + the token's index within its document, d the
    document's rank in its row (0, 1, ...).

    Positions only build masks (no positional encoding), so a document's tokens see exactly what they would see run
    alone, shifted by a constant: the same keys (others are DOCUMENT_STRIDE away), the same windows, and the same
    segments (R2MU summaries are cut by `position % DOCUMENT_STRIDE`)."""
    if documents.dim() != 2:
        raise ValueError(f"documents must be (B, T) document indices, got shape {tuple(documents.shape)}")
    T = documents.shape[1]
    ar = torch.arange(T, device=documents.device)
    first = torch.ones_like(documents, dtype=torch.bool)
    first[:, 1:] = documents[:, 1:] != documents[:, :-1]
    start = torch.where(first, ar, torch.zeros_like(ar)).cummax(dim=1).values  # (B, T) index of the doc's first token
    rank = first.long().cumsum(dim=1) - 1  # (B, T)
    return rank * DOCUMENT_STRIDE + (ar - start)


def document_ids(input_ids: torch.Tensor, eos_token_id: int, pad_token_id: int | None = None) -> torch.Tensor:
    """(..., T) document id of each token of packed windows whose documents end with eos_token_id (the EOS is its
    document's last token): a new document starts after every EOS and, given pad_token_id, at a token that follows
    a pad and is none (a run of pads between documents is a document of its own). On the device, no host read."""
    start = torch.zeros_like(input_ids, dtype=torch.long)
    start[..., 1:] = (input_ids[..., :-1] == eos_token_id).long()
    if pad_token_id is not None:
        start[..., 1:] |= ((input_ids[..., :-1] == pad_token_id) & (input_ids[..., 1:] != pad_token_id)).long()
    return start.cumsum(dim=-1)


def topk_first(x: torch.Tensor, k: int, floor: float = float("-inf"), ordered: bool = True) -> torch.Tensor:
    """Indices (..., k) of the k largest entries of x along the last dim; entries equal to the k-th value within
    TIE_RTOL break ties by the lower index (entries <= floor are unused: their ties do not matter).

    torch.topk orders equal entries arbitrarily. A row with an entry near its k-th value left out ("tied") takes
    the tie-broken choice (`_tie_broken`): the entries clearly above the k-th value (fewer than k) by index, then
    those within tol of it (and > floor) by index. Untied rows keep torch.topk's choice.
    * CUDA (and any device but the CPU): every row's tie-broken choice is computed (one more top-k, over an int key
      of the row's length) and picked per row on the device: no host read, one static shape, so a compiled caller
      neither breaks its graph nor recompiles per pattern of ties, and a CUDA graph can capture it.
    * CPU: `_redo_tied_rows`, an op with the same static output, finds the tied rows inside and redoes those alone
      (the CPU runs every op in order on the calling thread, so reading the tie flags there waits for nothing).
      Both top-k run over integers: the scores' `order_key` (the same choice and order as over the floats) and the
      int key.

    ordered=True: the indices come in descending order of x (tied rows: the clearly larger entries first). False:
    the same set in an unspecified order, for callers that use it as a set (ASAM's kept keys: the attention sums
    over them); torch.topk then skips sorting its result (on CPU, 3072 rows of 1300 keys, k = 128: 0.81x the
    time).
    """
    if k < 1:  # nothing kept (torch.topk would return the same empty indices)
        return torch.empty(*x.shape[:-1], 0, dtype=torch.long, device=x.device)
    n = x.shape[-1]
    if k >= n:
        return order_key(x).topk(k, dim=-1, sorted=ordered).indices
    idx = order_key(x).topk(k + 1, dim=-1, sorted=ordered).indices  # (..., k + 1); ordered: descending
    vals = x.gather(-1, idx)
    if ordered:
        thr, nxt, top = vals[..., k - 1:k], vals[..., k:k + 1], vals[..., :1]
        keep = idx[..., :k]
    else:  # the (k+1)-th value is the smallest of the k + 1 and the k-th the smallest of the rest; drop the slot
        # of the (k+1)-th (reductions a compiled caller fuses, where a second top-k would be one more library call)
        nxt, at = vals.min(dim=-1, keepdim=True)  # (..., 1)
        thr = vals.scatter(-1, at, float("inf")).amin(dim=-1, keepdim=True)
        top = vals.amax(dim=-1, keepdim=True)
        j = torch.arange(k, device=x.device)
        keep = idx.gather(-1, j + (j >= at).to(j.dtype))
    tol = TIE_RTOL * torch.maximum(top.abs(), nxt.abs())  # (..., 1)
    tie = (nxt > floor) & (thr - nxt <= tol)  # (..., 1) an entry within tol of the k-th value is left out
    lo, hi = thr - tol, thr + tol  # (..., 1) the values tied with the k-th
    if redo_tied_rows_only(x):
        return _redo_tied_rows(x.detach(), keep, torch.cat([lo, hi], -1).detach(), tie, float(floor), ordered)
    return torch.where(tie, _tie_broken(x, lo, hi, floor, k, ordered), keep)  # (..., k) contiguous


def redo_tied_rows_only(x: torch.Tensor) -> bool:
    """Whether `topk_first` redoes the tied rows alone (`_redo_tied_rows`: CPU tensors) rather than every row."""
    return x.device.type == "cpu"


def _tie_broken(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, floor: float, k: int,
                ordered: bool) -> torch.Tensor:
    """The tie-broken choice (..., k) of rows x (..., n) whose k-th value is thr, with lo = thr - tol and
    hi = thr + tol (..., 1): the entries above hi by index, then those from lo up (and > floor) by index; one top-k
    over an int key distinct for every entry above floor: 2n - i above, n - i near, -1 else (int32 when it fits).
    A tied row's thr is finite, so -inf entries are never near."""
    n = x.shape[-1]
    first = torch.arange(n, 0, -1, device=x.device, dtype=torch.int32 if 2 * n < 2**31 else torch.int64)  # n - i
    near = x >= lo
    if floor != float("-inf"):
        near = near & (x > floor)
    key = torch.where(x > hi, first + n, torch.where(near, first, -1))  # (..., n)
    return key.topk(k, dim=-1, sorted=ordered).indices


@custom_op("redo_tied_rows", __name__, mutates_args=())
def _redo_tied_rows(x: torch.Tensor, keep: torch.Tensor, band: torch.Tensor, tie: torch.Tensor, floor: float,
                    ordered: bool) -> torch.Tensor:
    """keep (..., k), contiguous, with the rows where tie (..., 1) holds replaced by `_tie_broken`'s choice, band
    (..., 2) holding each row's (lo, hi): the tied rows are found here (nonzero) and redone alone, where the static
    path redoes every row. An op of its own: to torch.compile its output is (..., k) whatever the ties, so the
    caller's graph neither breaks nor recompiles. For CPU tensors (`topk_first`): the CPU runs ops in order on the
    calling thread, so the read of the tie flags waits for nothing. Eager, at debug's chunk (8, 4, 32, 191),
    k = 16: 0.012 ms with no row tied, 0.09 ms with 2 % tied, where the static pass over every row takes 1.1 ms;
    a debug training step ties 1.6 % of its rows."""
    out = keep.clone(memory_format=torch.contiguous_format)
    rows = tie.reshape(-1).nonzero().squeeze(1)  # flat row indices: index_select / index_copy_ over dim 0 cost
    if rows.numel():  # less than advanced indexing with a tuple of per-dim indices
        k, n = keep.shape[-1], x.shape[-1]
        b = band.reshape(-1, 2).index_select(0, rows)  # (r, 2)
        redo = _tie_broken(x.reshape(-1, n).index_select(0, rows), b[:, :1], b[:, 1:], floor, k, ordered)
        out.view(-1, k).index_copy_(0, rows, redo)
    return out


@_redo_tied_rows.register_fake
def _(x, keep, band, tie, floor, ordered):
    return keep.new_empty(keep.shape)


def run_local_blocks(entries: int, block_size: int) -> int:
    """The most blocks of one run of keys that overlap an interval of positions holding `entries` of the run's keys.

    A run: consecutive keys starting at a block boundary, positions non-decreasing (the tokens; model.py's block-
    aligned token cache and summaries). Its blocks overlapping an interval form a contiguous range: the blocks
    holding the `entries` keys inside it, at most floor((entries + block_size - 2) / block_size) + 1 of them (the
    first at the worst offset), or, with no key inside, the one block that may straddle it (counted by the same
    formula for block_size >= 2; a block of one key cannot straddle).
    """
    return (entries + block_size - 2) // block_size + 1


class KeyBlocks(NamedTuple):
    """Keys cut into blocks of `size` consecutive keys (`block_summaries`); nb blocks, the last may be partial."""

    mean: torch.Tensor  # (B, H, nb, D) mean key, at least float32
    reach_lo: torch.Tensor  # (nb,) min k_pos - window over the block's keys
    reach_hi: torch.Tensor  # (nb,) max k_pos + window
    pos_min: torch.Tensor  # (nb,) lowest key position
    pos_max: torch.Tensor  # (nb,) highest key position
    size: int
    n_keys: int
    local_blocks: int | None = None  # the most blocks overlapping one query chunk's positions; None: nb


class Candidates(NamedTuple):
    """The keys a query chunk computes over (`block_candidates`): the union of its queries' kept blocks."""

    keys: torch.Tensor  # (B, H, n) key index of each candidate, n = n_sel * size (padding clamped to the last key)
    valid: torch.Tensor  # (B, H, c, n) bool: the key exists and lies in a block query i kept
    blocks: torch.Tensor  # (B, H, n_sel) ascending block ids: keys[..., j * size + o] = blocks[..., j] * size + o;
    #                       n_sel = max_kept_blocks(...), a static bound: blocks no query kept pad the union


def block_summaries(k: torch.Tensor, k_pos: torch.Tensor, k_window: torch.Tensor | None,
                    block_size: int, local_blocks: int | None = None) -> KeyBlocks:
    """k (B, H, Tk, D), k_pos (Tk,), k_window (Tk,) | None -> KeyBlocks (a partial last block: mean of its keys).

    local_blocks: an upper bound on the blocks overlapping one query chunk's positions, when the caller knows the
    key layout (`run_local_blocks` per run of keys); None: any layout (every block may be local)."""
    B, H, Tk, D = k.shape
    nb = -(-Tk // block_size)
    pad = nb * block_size - Tk
    kpad = torch.nn.functional.pad(f32(k), (0, 0, 0, pad))  # (B, H, nb * bs, D) at least float32 (selection)
    cnt = torch.full((nb,), float(block_size), dtype=kpad.dtype, device=k.device)
    cnt[-1] = block_size - pad
    kbar = kpad.view(B, H, nb, block_size, D).sum(3) / cnt[:, None]  # (B, H, nb, D) mean key
    w = k_window if k_window is not None else torch.full_like(k_pos, UNBOUNDED_WINDOW)

    def per_block(x: torch.Tensor, largest: bool) -> torch.Tensor:  # (Tk,) -> (nb,) max or min
        info = torch.iinfo(x.dtype) if not x.dtype.is_floating_point else torch.finfo(x.dtype)
        fill = info.min if largest else info.max  # padding never wins the reduction (a block holds >= 1 key)
        xb = torch.cat([x, x.new_full((pad,), fill)]).view(nb, block_size)  # new_full: the int64 fill exactly
        return xb.amax(1) if largest else xb.amin(1)

    return KeyBlocks(mean=kbar, reach_lo=per_block(k_pos - w, False), reach_hi=per_block(k_pos + w, True),
                     pos_min=per_block(k_pos, False), pos_max=per_block(k_pos, True), size=block_size, n_keys=Tk,
                     local_blocks=local_blocks)


def max_kept_blocks(kb: KeyBlocks, n_queries: int, blocks_per_query: int, select: str) -> int:
    """The static number of candidate blocks of a chunk of n_queries queries (`block_candidates`): an upper bound
    on the union of the blocks its queries keep, so every chunk has one shape and nothing is read on the host.

    Each query keeps local blocks (overlapping its chunk's positions: at most kb.local_blocks for the whole chunk)
    plus n_top = min(nb, blocks_per_query) others. select=chunk: the chunk's earliest query picks the n_top for all
    of them, so the union is at most local_blocks + n_top; select=query: each query picks its own, at most
    local_blocks + n_queries * n_top. Never more than the nb blocks there are.
    """
    nb = -(-kb.n_keys // kb.size)
    if kb.local_blocks is None:
        return nb
    n_top = min(nb, blocks_per_query)
    return min(nb, kb.local_blocks + (n_top if select == "chunk" else n_queries * n_top))


def block_candidates(q_c: torch.Tensor, q_pos: torch.Tensor, kb: KeyBlocks, *, causal: bool, blocks_per_query: int,
                     select: str = "query", chunk_size: int | None = None) -> Candidates:
    """The key blocks of one query chunk q_c (B, H, c, D) at positions q_pos (c,), chosen per query (module
    docstring), so that causality holds.

    The chunk of a query at position p is [floor(p / chunk_size) * chunk_size, + chunk_size) (chunk_size None: the
    span of q_pos), so the rule is the same whether a chunk's queries come in one call (the full forward) or a few
    at a time (incremental decoding). select="chunk": the non-local blocks are chosen once, by the chunk's earliest
    query (which every query of the chunk may see), and shared by all its queries. No host read: the union is
    padded to `max_kept_blocks` (asserted on the device when kb.local_blocks bounds it).
    """
    if select not in ("query", "chunk"):
        raise ValueError(f"block_select={select!r}: choose 'query' or 'chunk'")
    B, H, c, D = q_c.shape
    nb = kb.mean.shape[2]
    qp = q_pos[:, None]  # (c, 1)
    if causal:
        bvis = (kb.pos_min[None] <= qp) & (qp < kb.reach_hi[None])  # (c, nb) some key of the block may be visible
    else:
        bvis = (kb.reach_lo[None] < qp) & (qp < kb.reach_hi[None])
    if chunk_size is None:
        c_lo, c_hi = q_pos.min().view(1, 1), q_pos.max().view(1, 1)
    else:
        c_lo = torch.div(qp, chunk_size, rounding_mode="floor") * chunk_size  # (c, 1) first position of i's chunk
        c_hi = c_lo + chunk_size - 1
    local = bvis & (kb.pos_min[None] <= c_hi) & (kb.pos_max[None] >= c_lo)  # (c, nb)
    neg_inf = torch.full((), float("-inf"), dtype=torch.float32, device=q_c.device)
    n_top = min(nb, blocks_per_query)
    if select == "query":
        sb = torch.einsum("bhid,bhnd->bhin", f32(q_c), f32(kb.mean))  # (B, H, c, nb)
        sb = torch.where(bvis & ~local, sb, neg_inf)
        top = topk_first(sb, n_top)  # (B, H, c, n_top) query i's best non-local blocks
        kept = torch.zeros(B, H, c, nb, dtype=torch.bool, device=q_c.device)
        kept.scatter_(-1, top, sb.gather(-1, top) > float("-inf"))
        kept |= local  # (B, H, c, nb) query i's own local blocks + blocks_per_query more
    else:
        i0 = q_pos.argmin().view(1)  # (1,) the earliest query, as a device index
        any_local = local.any(0)  # (nb,) kept by position, for the queries that may see them
        q0 = q_c.index_select(2, i0)[:, :, 0]  # (B, H, D)
        sb = torch.einsum("bhd,bhnd->bhn", f32(q0), f32(kb.mean))  # (B, H, nb) the earliest query's
        sb = torch.where(bvis.index_select(0, i0)[0] & ~any_local, sb, neg_inf)
        top = topk_first(sb, n_top)  # (B, H, blocks_per_query)
        shared = torch.zeros(B, H, nb, dtype=torch.bool, device=q_c.device)
        shared.scatter_(-1, top, sb.gather(-1, top) > float("-inf"))
        kept = (shared | any_local)[:, :, None, :] & bvis  # (B, H, c, nb)
    union = kept.any(2)  # (B, H, nb)
    n_sel = max_kept_blocks(kb, c, blocks_per_query, select)
    if n_sel < nb:  # a layout the bound does not cover would drop kept blocks: fail instead (on the device)
        torch._assert_async(union.sum(-1).max() <= n_sel,
                            "block_candidates: a query chunk keeps more key blocks than KeyBlocks.local_blocks allows "
                            "for: the keys are not laid out in block-aligned runs; pass local_blocks=None")
    # the union's blocks, then the lowest unkept ones as padding, in ascending id order, so candidates are in key order
    # whatever else the union holds (ties then break alike)
    ar = torch.arange(nb, device=q_c.device)
    rank = torch.where(union, 2 * nb - ar, nb - ar)  # (B, H, nb) distinct
    blocks = rank.topk(n_sel, dim=-1).indices.sort(-1).values  # (B, H, n_sel)
    keep = kept.gather(-1, blocks[:, :, None, :].expand(B, H, c, n_sel))  # (B, H, c, n_sel)
    offs = torch.arange(kb.size, device=q_c.device)
    cand = (blocks[..., None] * kb.size + offs).flatten(2)  # (B, H, n)
    valid = keep.repeat_interleave(kb.size, dim=-1) & (cand < kb.n_keys)[:, :, None, :]  # (B, H, c, n)
    return Candidates(keys=cand.clamp(max=kb.n_keys - 1), valid=valid, blocks=blocks)


class DocumentKeyBlocks(NamedTuple):
    """Keys under document masking, for block selection (`document_key_blocks`): every key may start a block."""

    k: torch.Tensor  # (B, H, Tk, D) the keys
    pos: torch.Tensor  # (B, Tk) key positions (selection.document_positions), ascending within each run per sample
    reach: torch.Tensor  # (B, Tk) k_pos + window
    runs: tuple[tuple[int, int], ...]  # (keys, span) per run in key order (`document_key_blocks`)
    size: int
    local_blocks: int | None = None  # the most blocks overlapping two query chunks' positions; None: no bound


class DocumentCandidates(NamedTuple):
    """The keys a query chunk computes over under document masking (`document_block_candidates`)."""

    keys: torch.Tensor  # (B, H, n) key index of each candidate (clamped in range; invalid ones are masked)
    valid: torch.Tensor  # (B, H, c, n) bool: query i may read the candidate
    starts: torch.Tensor  # (B, H, n_sel) first key of each candidate block of the chunk's first document
    lens: torch.Tensor  # (B, H, n_sel) its keys in that document (0..size): candidates j * size + o, o < len
    spans: tuple[tuple[torch.Tensor, int], ...]  # per run: (first key (B, 1), keys) of the later documents' span


def document_key_blocks(k: torch.Tensor, k_pos: torch.Tensor, k_window: torch.Tensor | None, block_size: int,
                        runs: tuple[tuple[int, int], ...], local_blocks: int | None = None) -> DocumentKeyBlocks:
    """k (B, H, Tk, D), per-sample k_pos (B, Tk) and k_window (B, Tk) | None, under document masking.

    runs: the key axis as runs (n_keys, span), in order, summing to Tk: the tokens, and with R2MU memory the token
    cache and the summaries. In each run a document's keys are consecutive, from its first one (its first token,
    token-cache entry or summary), positions ascending, so its blocks are cut from there as in the document alone.
    span: the most keys of one run that documents starting inside one query chunk hold (the tokens: chunk_size).
    local_blocks: a bound on one document's blocks overlapping two query chunks' positions (a chunk of queries
    may straddle two of the document's chunks); None: no bound.
    """
    if sum(n for n, _ in runs) != k.shape[2]:
        raise ValueError(f"runs {runs} must cover the {k.shape[2]} keys")
    w = k_window if k_window is not None else torch.full_like(k_pos, UNBOUNDED_WINDOW)
    return DocumentKeyBlocks(k=k, pos=k_pos, reach=k_pos + w, runs=tuple(runs), size=block_size,
                             local_blocks=local_blocks)


def chunk_first_index(q_pos: torch.Tensor, q_index: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Under document masking: the token index (B, c) of the first query of each query's chunk (its document's token
    at the last multiple of chunk_size within the document), which chooses the chunk's blocks under
    block_select=chunk. q_pos (B, c) per-sample positions of tokens q_index (c,)."""
    return q_index - q_pos % DOCUMENT_STRIDE % chunk_size


def document_block_candidates(q_c: torch.Tensor, q_pos: torch.Tensor, kb: DocumentKeyBlocks, *, blocks_per_query: int,
                              select: str, chunk_size: int, q_first: torch.Tensor | None = None) -> DocumentCandidates:
    """`block_candidates` under document masking (causal): the key blocks of a chunk of at most chunk_size
    consecutive queries q_c (B, H, c, D) at per-sample positions q_pos (B, c). select=chunk: q_first (B, H, c, D)
    the q of each query's chunk's first query (`chunk_first_index`), which chooses for it.

    The chunk's first query's document (per sample) may have begun earlier: its queries choose among its blocks
    (each run cut from the document's first key there) by `block_candidates`' rule, local blocks by the positions of
    their own chunk within the document, the chooser of block_select=chunk its first query. Every later document
    began inside the chunk, so alone its queries keep every block they may see: they read its span of each run (the
    keys after the first document's; visibility keeps them in their document). No host read; one static shape.
    """
    if select not in ("query", "chunk"):
        raise ValueError(f"block_select={select!r}: choose 'query' or 'chunk'")
    if select == "chunk" and q_first is None:
        raise ValueError("document_block_candidates with select='chunk' needs q_first (each chunk's first query)")
    B, H, c, D = q_c.shape
    Tk, bs, dev = kb.pos.shape[1], kb.size, q_c.device
    huge = torch.full((), SPARE_POSITION, dtype=kb.pos.dtype, device=dev)
    base0 = q_pos[:, :1] - q_pos[:, :1] % DOCUMENT_STRIDE  # (B, 1) the first query's document
    within = q_pos % DOCUMENT_STRIDE  # (B, c) position within the document
    old = q_pos - within == base0  # (B, c) a query of that document
    starts, lens, spans, a = [], [], [], 0
    for n_r, span in kb.runs:
        rp = kb.pos[:, a:a + n_r].contiguous()
        f = a + torch.searchsorted(rp, base0)  # (B, 1) the document's first key in the run
        e = a + torch.searchsorted(rp, base0 + DOCUMENT_STRIDE)  # (B, 1) the first key after it
        st = f + torch.arange(-(-n_r // bs), device=dev) * bs  # (B, nb_r)
        starts.append(st)
        lens.append((e - st).clamp(0, bs))
        spans.append((e, span, a + n_r))
        a += n_r
    st, ln = torch.cat(starts, 1), torch.cat(lens, 1)  # (B, nb) the document's blocks, in key order
    nb = st.shape[1]
    full = ln == bs
    first, last = st.clamp(max=Tk - 1), (st + bs - 1).clamp(max=Tk - 1)
    # a partial block (the document's last in a run) overlaps every later position, as the filler keys after it
    # make it do alone (ressformer.model's docstring): local or invisible, never scored
    pos_min = torch.where(ln > 0, kb.pos.gather(1, first), huge)[:, None]  # (B, 1, nb)
    pos_max = torch.where(full, kb.pos.gather(1, last), huge)[:, None]
    reach_hi = torch.where(full, kb.reach.gather(1, last), huge)[:, None]
    # each block's mean key, summed as `block_summaries` sums (keys past the document's end only reach partial
    # blocks, whose mean is never scored): O(Tk D) per chunk
    members = (st[..., None] + torch.arange(bs, device=dev)).clamp(max=Tk - 1).flatten(1)  # (B, nb * bs)
    kg = kb.k.gather(2, members[:, None, :, None].expand(B, H, nb * bs, D))
    mean = f32(kg).view(B, H, nb, bs, D).sum(3) / bs  # (B, H, nb, D)
    c_lo = (q_pos - within + within // chunk_size * chunk_size)[..., None]  # (B, c, 1) the query's chunk
    c_hi = c_lo + chunk_size - 1
    overlap = (pos_min <= c_hi) & (pos_max >= c_lo)  # (B, c, nb)

    def seen(qp: torch.Tensor) -> torch.Tensor:  # (B, c, 1) -> (B, c, nb) some key of the block may be visible
        return (pos_min <= qp) & (qp < reach_hi) & old[..., None]

    bvis = seen(q_pos[..., None])
    local = bvis & overlap
    neg_inf = torch.full((), float("-inf"), dtype=torch.float32, device=dev)
    n_top = min(nb, blocks_per_query)
    if select == "query":
        q_sel, s_vis = q_c, bvis & ~local
    else:  # each query's chunk's first query (the document's token at c_lo) chooses, perhaps from an earlier chunk
        q_sel = q_first
        s_vis = seen(c_lo) & ~overlap  # visible to the chooser and not local
    sb = torch.einsum("bhid,bhnd->bhin", f32(q_sel), mean)  # (B, H, c, nb)
    sb = torch.where(s_vis[:, None], sb, neg_inf)
    top = topk_first(sb, n_top)
    kept = torch.zeros(B, H, c, nb, dtype=torch.bool, device=dev)
    kept.scatter_(-1, top, sb.gather(-1, top) > float("-inf"))
    if select == "chunk":
        kept &= bvis[:, None]
    kept |= local[:, None]  # (B, H, c, nb)
    union = kept.any(2)  # (B, H, nb)
    n_sel = nb if kb.local_blocks is None else min(nb, kb.local_blocks + (c if select == "query" else 2) * n_top)
    if n_sel < nb:
        torch._assert_async(union.sum(-1).max() <= n_sel,
                            "document_block_candidates: a query chunk keeps more key blocks than "
                            "DocumentKeyBlocks.local_blocks allows for; pass local_blocks=None")
    ar = torch.arange(nb, device=dev)
    blocks = torch.where(union, 2 * nb - ar, nb - ar).topk(n_sel, dim=-1).indices.sort(-1).values  # (B, H, n_sel)
    keep = kept.gather(-1, blocks[:, :, None, :].expand(B, H, c, n_sel))
    b_st = st[:, None].expand(B, H, nb).gather(-1, blocks)  # (B, H, n_sel)
    b_ln = ln[:, None].expand(B, H, nb).gather(-1, blocks)
    offs = torch.arange(bs, device=dev)
    keys = [(b_st[..., None] + offs).flatten(2)]  # (B, H, n_sel * bs)
    valid = [keep.repeat_interleave(bs, -1) & (offs < b_ln[..., None]).flatten(2)[:, :, None, :]]
    young = ~old[:, None, :, None]  # (B, 1, c, 1)
    out_spans = []
    for e, span, end in spans:  # the later documents: every key of the span, visibility decides
        if span == 0:
            continue
        idx = e + torch.arange(span, device=dev)  # (B, span)
        keys.append(idx[:, None].expand(B, H, span))
        valid.append((young & (idx < end)[:, None, None, :]).expand(B, H, c, span))
        out_spans.append((e, span))
    return DocumentCandidates(keys=torch.cat(keys, -1).clamp(max=Tk - 1), valid=torch.cat(valid, -1),
                              starts=b_st, lens=b_ln, spans=tuple(out_spans))
