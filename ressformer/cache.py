"""Inference cache for incremental decoding: `model(new_ids, cache=cache)` gives the logits of the new tokens, equal
to the full forward's, without re-running the prefix (both architectures).

Everything is causal and position-free, so token i's state at step t depends on tokens <= i only: it is computed
once. One `UnitCache` per unit (model.py: prelude block, recurrent step t, coda block; baseline: layer) holds

    k, v          (B, H, T, hd)     keys / values of the T earlier tokens
    dst           (B, T, r)         soes.graph=bilinear: the LatentGraph dst vectors
    seg_h         (B, P, D)         R2MU: h^(t) of the P < segment_len tokens of the incomplete segment
    sum_k, sum_v  (B, H, S*m, hd)   R2MU (t >= 1): keys / values of the S complete segments' summaries
    chunk_q       (B, H, 1, hd)     asam.block_select=chunk: q (and the graph's src vector) of the current
    chunk_src     (B, 1, r)         query chunk's first query, which picks the chunk's key blocks
    hist_h        (B, <L, D)        R2MU under document masking: h^(t) of the last segment_len - 1 tokens
    sum_pos, sum_win (B, S*m)       R2MU under document masking: the summaries' positions and windows

Step t's token memory is step t-1's keys (same block, same projections), read from step t-1's unit. What selection
depends on is independent of the call (index tie-breaking, position chunks, the chunk's first query back as a ghost),
so the logits equal the full forward's to rounding. K is fixed per cache; buffers grow by doubling. `reorder_cache`,
`is_compileable` and `get_seq_length` are what transformers' generate reads.

Document masking (`model(ids, cache=cache, documents=ids_of_their_documents)`, every call of the cache alike): the
cache keeps each token's per-sample position (selection.document_positions, continued across calls by
`ModelCache.positions_of`), so reads stay inside the token's document as in the full forward; R2MU then keeps the
last segment_len - 1 states (`hist_h`) and the summaries' positions and windows (`sum_pos`, `sum_win`), segments
restarting at each document's first token. Block ASAM cuts each document's key blocks from its first key in each run
(selection.document_key_blocks): the memory then holds the whole token cache and the summaries in position order,
and under block_select=chunk `chunk_q` / `chunk_src` are per sample: the last token that started a chunk of its
document, which chooses for the queries of that chunk in later calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ressformer.attention import asam_options, document_runs, local_block_bound, sparse_attention
from ressformer.selection import DOCUMENT_STRIDE, UNBOUNDED_WINDOW, chunk_first_index, document_positions


class _Seq:
    """A tensor grown along `dim` with capacity doubling: amortised O(1) appends. `view` is the filled part."""

    def __init__(self, dim: int):
        self.dim, self.data, self.n = dim, None, 0

    @property
    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data.narrow(self.dim, 0, self.n)

    def append(self, x: torch.Tensor) -> torch.Tensor:
        add = x.shape[self.dim]
        if x.requires_grad:  # keep autograd intact (no in-place writes into a buffer an earlier graph reads)
            self.data = x if self.data is None else torch.cat([self.view, x], self.dim)
            self.n += add
            return self.data
        if self.data is None or self.data.shape[self.dim] < self.n + add:
            shape = list(x.shape)
            shape[self.dim] = max(self.n + add, 2 * self.n, 16)
            data = x.new_empty(shape)
            if self.n:
                data.narrow(self.dim, 0, self.n).copy_(self.view)
            self.data = data
        self.data.narrow(self.dim, self.n, add).copy_(x)
        self.n += add
        return self.view


@dataclass
class UnitCache:
    """What one unit (block, or recurrent step) keeps for later tokens; see the module docstring for shapes."""

    k: _Seq = field(default_factory=lambda: _Seq(2))
    v: _Seq = field(default_factory=lambda: _Seq(2))
    dst: _Seq = field(default_factory=lambda: _Seq(1))
    sum_k: _Seq = field(default_factory=lambda: _Seq(2))
    sum_v: _Seq = field(default_factory=lambda: _Seq(2))
    sum_pos: _Seq = field(default_factory=lambda: _Seq(1))
    sum_win: _Seq = field(default_factory=lambda: _Seq(1))
    seg_h: torch.Tensor | None = None
    hist_h: torch.Tensor | None = None
    chunk_q: torch.Tensor | None = None
    chunk_src: torch.Tensor | None = None

    def tensors(self):
        for f in fields(self):
            x = getattr(self, f.name)
            yield f.name, (x.data if isinstance(x, _Seq) else x)


class ModelCache:
    """Inference state of a batch of sequences: `length` tokens seen, `num_steps` K, one UnitCache per unit."""

    is_compileable = False  # transformers' GenerationMixin: not a static-shape cache, never torch.compile'd

    def __init__(self):
        self.length = 0
        self.batch_size: int | None = None
        self.num_steps: int | None = None
        self.units: list[UnitCache] = []
        self.documents: bool | None = None  # whether the calls pass documents (fixed by the first call)
        self.positions = _Seq(1)  # (B, T) per-sample positions of the tokens, under document masking
        self.last_document: torch.Tensor | None = None  # (B, 1) document id of the last token

    def positions_of(self, documents: torch.Tensor | None, n: int, device) -> torch.Tensor:
        """Positions of the n new tokens: T0..T0+n-1 (n,), or under document masking (B, n), continuing the
        cached tokens' (a new document wherever the id changes, the previous call's last token included), appended
        to `positions`. Call after `begin`."""
        if self.documents is None:
            self.documents = documents is not None
        elif self.documents != (documents is not None):
            raise ValueError("this cache was filled " + ("with" if self.documents else "without") + " documents and "
                             "this call " + ("has none" if self.documents else "passes some") + ": pass documents "
                             "to every call of a cache or to none")
        if documents is None:
            return torch.arange(self.length, self.length + n, device=device)
        if self.last_document is None:
            pos = document_positions(documents)
        else:
            q = document_positions(torch.cat([self.last_document, documents], 1))[:, 1:]  # relative to the last token
            last = self.positions.view[:, -1:]  # (B, 1)
            pos = torch.where(q < DOCUMENT_STRIDE, last + q, last // DOCUMENT_STRIDE * DOCUMENT_STRIDE + q)
        self.last_document = documents[:, -1:].clone()
        self.positions.append(pos)
        return pos

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def begin(self, n_units: int, batch_size: int, num_steps: int | None, new_tokens: int) -> None:
        """Check a call against the cache (and set it up on the first call)."""
        if new_tokens < 1:
            raise ValueError("a cached forward needs at least one new token (input_ids of shape (B, n >= 1))")
        if not self.units:
            self.units = [UnitCache() for _ in range(n_units)]
            self.batch_size, self.num_steps = batch_size, num_steps
            return
        if batch_size != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, input_ids has {batch_size}: use one cache "
                             "per batch (a new ModelCache for a new batch)")
        if num_steps != self.num_steps:
            raise ValueError(f"the cache was filled with num_steps={self.num_steps}, this call asks for "
                             f"num_steps={num_steps}: every recurrent step keeps its own keys, so K is fixed per "
                             "cache; start a new ModelCache (past_key_values=None) to decode with another K")
        if len(self.units) != n_units:
            raise ValueError(f"the cache has {len(self.units)} units, this model needs {n_units}: a cache belongs to "
                             "the model that filled it")

    @torch.no_grad()
    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep / repeat batch rows (beam search): row b becomes row beam_idx[b]."""
        for obj, names in [(u, [f.name for f in fields(u)]) for u in self.units] + \
                [(self, ["positions", "last_document"])]:
            for name in names:
                x = getattr(obj, name)
                if isinstance(x, _Seq):
                    if x.data is not None:
                        x.data = x.data.index_select(0, beam_idx.to(x.data.device))
                elif x is not None:
                    setattr(obj, name, x.index_select(0, beam_idx.to(x.device)))
        self.batch_size = int(beam_idx.numel())

    def nbytes(self) -> int:
        """Bytes held (buffer capacity included)."""
        return sum(x.numel() * x.element_size() for u in self.units for _, x in u.tensors() if x is not None)


def _position_chunks(pos: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """[a, b) index ranges of consecutive positions `pos` cut at multiples of chunk_size (the full forward's
    query chunks)."""
    p0, n = int(pos[0]), pos.shape[0]
    out, a = [], 0
    while a < n:
        b = min(n, (p0 + a) // chunk_size * chunk_size + chunk_size - p0)
        out.append((a, b))
        a = b
    return out


def _next_chunk_start(pos: torch.Tensor, Ti: int, chunk_size: int) -> int | None:
    """Index in pos of the first query of the chunk the next token (position Ti) falls in, when that query came in
    this call; None when the next token starts a chunk or its chunk began earlier (the kept one stays valid)."""
    c = Ti // chunk_size * chunk_size
    return c - int(pos[0]) if Ti % chunk_size and c >= int(pos[0]) else None


def _chunk_firsts(new: torch.Tensor, ghost: torch.Tensor | None, doc_pos: torch.Tensor, pos: torch.Tensor,
                  chunk_size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document masking under block_select=chunk: each new query's chunk's first query (selection.chunk_first_index)
    from new (the new tokens' q (B, H, n, hd), dim 2, or src (B, n, r), dim 1) or, when it came in an earlier call,
    ghost (that query's, kept per sample: size 1 along dim). -> (per new query (like new), the next call's ghost: the
    last new token that starts a chunk, else the kept one). On the device: no host read."""
    n = new.shape[dim]

    def along(x: torch.Tensor) -> torch.Tensor:  # (B, j) -> broadcastable against new, j along dim
        shape = [x.shape[0]] + [1] * (new.dim() - 1)
        shape[dim] = x.shape[1]
        return x.view(shape)

    def take(idx: torch.Tensor) -> torch.Tensor:  # (B, j) indices among the new tokens -> their entries
        full = list(new.shape)
        full[dim] = idx.shape[1]
        return new.gather(dim, along(idx.clamp(min=0)).expand(full))

    i_first = chunk_first_index(doc_pos, pos, chunk_size) - pos[0]  # (B, n) among the new tokens; < 0: earlier
    firsts = take(i_first)
    starts = doc_pos % DOCUMENT_STRIDE % chunk_size == 0  # (B, n) the tokens that start a chunk
    last = torch.where(starts, torch.arange(n, device=new.device), -1).amax(1, keepdim=True)  # (B, 1)
    nxt = take(last)
    if ghost is not None:
        firsts = torch.where(along(i_first < 0), ghost, firsts)
        nxt = torch.where(along(last >= 0), nxt, ghost)
    return firsts, nxt


def attend(attn, xn: torch.Tensor, pos: torch.Tensor, unit: UnitCache, *, memory=None, graph=None,
           pattern: bool = False, doc_pos: tuple[torch.Tensor, torch.Tensor] | None = None):
    """ASAMAttention over the cached + new tokens (+ memory keys), for the new queries only.

    attn: an ASAMAttention; xn (B, n, D) input_layernorm'd states of the new tokens at positions pos (n,);
    memory None | (k (B, H, Tm, hd), v, pos (Tm,), window (Tm,)) already projected, appended after the tokens;
    graph None | (idx (B, n, m), val (B, n, m)). The new tokens' keys / values are appended to `unit`.
    doc_pos: document masking, the per-sample positions of the new tokens (B, n) and of every token (B, Ti) (pos
    stays the token indices), with the memory's positions and windows (B, Tm).
    Returns (y (B, n, D), the new queries' attention-pattern graph rows (idx, val) when pattern else None).
    """
    cfg = attn.cfg
    a = cfg.asam
    B, n, D = xn.shape
    H, hd = attn.n_heads, attn.head_dim
    q = attn.q_proj(xn).view(B, n, H, hd).transpose(1, 2)  # (B, H, n, hd)
    k = unit.k.append(attn.k_proj(xn).view(B, n, H, hd).transpose(1, 2))  # (B, H, Ti, hd) every token so far
    v = unit.v.append(attn.v_proj(xn).view(B, n, H, hd).transpose(1, 2))
    Ti = k.shape[2]
    k_pos, k_win = (torch.arange(Ti, device=xn.device) if doc_pos is None else doc_pos[1]), None
    if memory is not None:
        mk, mv, mpos, mwin = memory
        k, v = torch.cat([k, mk.to(k.dtype)], 2), torch.cat([v, mv.to(v.dtype)], 2)
        k_win = torch.cat([torch.full_like(k_pos, UNBOUNDED_WINDOW), mwin.to(k_pos.dtype)], -1)
        k_pos = torch.cat([k_pos, mpos.to(k_pos.dtype)], -1)
    # a call's query chunks may straddle two chunks of chunk_size positions
    kw = dict(k_pos=k_pos, k_window=k_win, graph_scale=attn.graph_scale, **asam_options(cfg),
              local_blocks=local_block_bound(cfg, memory is not None, 2 * a.chunk_size),
              pattern_degree=cfg.soes.degree if pattern else 0, pattern_keys=Ti)
    if doc_pos is not None and a.impl == "block":  # each document's blocks cut from its first key in each run
        kw["doc_runs"] = document_runs(cfg, Ti, k.shape[2] - Ti)
        if a.block_select == "chunk":
            kw["q_first"], unit.chunk_q = _chunk_firsts(q, unit.chunk_q, doc_pos[0], pos, a.chunk_size, 2)
        o, stats = sparse_attention(q, k, v, graph=graph, q_pos=doc_pos[0], q_index=pos, **kw)
        y = attn.o_proj(o.transpose(1, 2).reshape(B, n, D))
        return y, stats["pattern"] if pattern else None
    chunk_pick = a.impl == "block" and a.block_select == "chunk"
    # block_select=chunk: a chunk whose first query came in an earlier call gets that query back as a leading
    # ghost (its own output dropped), so it picks the chunk's blocks as in the full forward
    groups, off = [(0, n)], int(pos[0]) % a.chunk_size
    if chunk_pick and off:  # the rest starts at a chunk boundary: sparse_attention's own chunks line up
        cut = min(n, a.chunk_size - off)
        groups = [(0, cut)] + ([(cut, n)] if cut < n else [])
    outs, pats = [], []
    for gi, (s0, s1) in enumerate(groups):
        q_g, p_g = q[:, :, s0:s1], pos[s0:s1]
        extra = {} if doc_pos is None else dict(q_pos=doc_pos[0][:, s0:s1], q_index=p_g)
        g_g = None if graph is None else (graph[0][:, s0:s1], graph[1][:, s0:s1])
        ghost = chunk_pick and gi == 0 and off != 0
        if ghost:
            c_lo = int(p_g[0]) // a.chunk_size * a.chunk_size
            q_g = torch.cat([unit.chunk_q, q_g], 2)
            p_g = torch.cat([p_g.new_tensor([c_lo]), p_g])
            if g_g is not None:  # the ghost's graph row is never used for an output: spare slots
                gi0 = torch.full_like(g_g[0][:, :1], c_lo)
                g_g = (torch.cat([gi0, g_g[0]], 1), torch.cat([torch.zeros_like(g_g[1][:, :1]), g_g[1]], 1))
        o, stats = sparse_attention(q_g, k, v, graph=g_g, **{"q_pos": p_g, **kw, **extra})
        if ghost:
            o = o[:, :, 1:]
        outs.append(o)
        if pattern:
            pi, pv = stats["pattern"]
            pats.append((pi[:, 1:], pv[:, 1:]) if ghost else (pi, pv))
    if chunk_pick and (i := _next_chunk_start(pos, Ti, a.chunk_size)) is not None:
        unit.chunk_q = q[:, :, i:i + 1].clone()  # (B, H, 1, hd), not a view of the whole q
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    y = attn.o_proj(out.transpose(1, 2).reshape(B, n, D))  # (B, n, D)
    pat = None
    if pattern:
        pat = (torch.cat([p[0] for p in pats], 1), torch.cat([p[1] for p in pats], 1)) if len(pats) > 1 else pats[0]
    return y, pat


def latent_graph(lg, xn: torch.Tensor, pos: torch.Tensor, unit: UnitCache,
                 doc_pos: tuple[torch.Tensor, torch.Tensor] | None = None):
    """LatentGraph (structure.py) rows of the new tokens over the cached + new tokens: a Graph (idx, val) of shape
    (B, n, m). The same selection as LatentGraph.forward (LatentGraph.neighbours), query chunk by query chunk of
    positions (block_select=chunk with the chunk's first query as a ghost, as in `attend`). doc_pos: as `attend`'s."""
    a = lg.cfg.asam
    src = lg.src_proj(xn)  # (B, n, r)
    dst = unit.dst.append(lg.dst_proj(xn))  # (B, Ti, r)
    Ti = dst.shape[1]
    chunk_pick = a.impl == "block" and a.block_select == "chunk"
    doc_block = doc_pos is not None and a.impl == "block"  # each document's blocks cut from its first token
    parts = []
    with torch.no_grad():
        blocks = lg.key_blocks(dst, torch.arange(Ti, device=xn.device), doc_pos[1] if doc_block else None)
        firsts = None
        if doc_block and chunk_pick:
            firsts, unit.chunk_src = _chunk_firsts(src, unit.chunk_src, doc_pos[0], pos, a.chunk_size, 1)
        for s0, s1 in _position_chunks(pos, a.chunk_size):
            ghost = unit.chunk_src if chunk_pick and not doc_block and int(pos[s0]) % a.chunk_size != 0 else None
            dp = None
            if doc_pos is not None:
                dp = (doc_pos[0][:, s0:s1], doc_pos[1]) + ((None if firsts is None else firsts[:, s0:s1],)
                                                           if doc_block else ())
            parts.append(lg.neighbours(src[:, s0:s1], pos[s0:s1], dst, blocks, ghost=ghost, doc_pos=dp))
    if chunk_pick and not doc_block and (i := _next_chunk_start(pos, Ti, chunk_size=a.chunk_size)) is not None:
        unit.chunk_src = src[:, i:i + 1].clone()  # (B, 1, r)
    idx, valid = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)  # (B, n, m)
    return lg.edges(src, dst, idx, valid)


__all__ = ["ModelCache", "UnitCache", "attend", "latent_graph"]
