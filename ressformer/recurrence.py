"""R2MU, the Recurrent Reasoning & Memory Unit (paper sec. 3.1): memory, gate and iteration count.

    H^(t+1)      = Block(H^(t), M^(t)),  t = 0 .. K-1       one shared block (model.py)
    M^(t)        = [H^(t-1); S^(t)]                         t >= 1 (step 0 attends to its own tokens only)
    S_hat^(t)_sr = sum_l softmax_l(q_r . RMSNorm(h_sl) / sqrt(D)) h_sl     m = summary_slots per segment s
    a^(t)        = sigmoid(W_a [S^(t-1); S_hat^(t)] + b_a)                  (B, n_seg, m, 1)
    S^(t)        = a^(t) * S^(t-1) + (1 - a^(t)) * S_hat^(t),   S^(0) = S_hat^(0)

Design choices (the paper leaves them open; the simplest faithful reading is taken):
* No input re-injection: the update has none, and the memory already reaches earlier states.
* Memory states are extra keys after the block's token keys, each with a position and a window, so one mask
  enforces causality: H^(t-1)_j is read by query i iff j <= i and i - j < cache_window (encoder mode: all of it);
  a summary sits at its segment's last position, window unbounded. Only complete segments are summarised, so a
  query's output never depends on the sequence after it.
* The gate is a per-slot scalar (the paper's a in [0,1]^m, 2D+1 parameters); b_a = 0 at init: an equal blend.
* K is the same for every token (no halting); training may sample it per step (`sample_num_steps`).
* Document masking (per-sample positions, selection.document_positions): segments restart at every document's
  first token (`document_segments`), so a packed document's summaries are those of the document run alone.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn as nn

from ressformer.config import ModelConfig
from ressformer.initialization import Plan, normal, ones, run_plan, zeros
from ressformer.selection import DOCUMENT_STRIDE, SPARE_POSITION, UNBOUNDED_WINDOW
from ressformer.sparse import at_least_fp32


def sample_num_steps(cfg: ModelConfig, step: int, seed: int) -> int:
    """Deterministic recurrent iteration count K for training step `step` (same on every rank).

    fixed:   K = r2mu.steps
    uniform: K ~ U{min_steps, ..., max_steps}
    poisson: K ~ Poisson(r2mu.steps) clipped to [min_steps, max_steps]
    With r2mu.enabled=False the stack has exactly `steps` distinct blocks, so K = steps always.
    """
    r = cfg.r2mu
    if step < 0:
        raise ValueError(f"sample_num_steps: step={step} must be >= 0")
    if r.step_sampling == "fixed" or not r.enabled:
        return r.steps
    # A private generator seeded from (seed, step) only: no global RNG state, identical on every rank.
    rng = random.Random((int(seed) & 0xFFFFFFFF) * 1_000_003 + int(step))
    if r.step_sampling == "uniform":
        return rng.randint(r.min_steps, r.max_steps)
    if r.step_sampling == "poisson":
        # Knuth's multiplicative method (means are small, ~1-32).
        k, p, limit = 0, 1.0, math.exp(-float(r.steps))
        while True:
            p *= rng.random()
            if p <= limit:
                break
            k += 1
        return min(max(k, r.min_steps), r.max_steps)
    raise ValueError(f"r2mu.step_sampling={r.step_sampling!r}: choose fixed, uniform or poisson")


class SegmentMemory(nn.Module):
    """Segment-level compressive summary with a gated partial overwrite (R2MU memory, level (b)).

    Parameters (state_dict keys under `model.memory.`):
      slot_queries (m, D)   learned pooling queries, one per summary slot
      pool_norm.weight (D,) RMSNorm applied to the states before scoring them
      gate.weight (1, 2D), gate.bias (1,)   per-slot overwrite gate a = sigmoid(W_a [S_prev; S_hat] + b_a)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal = cfg.causal
        self.segment_len = cfg.r2mu.segment_len
        self.cache_window = cfg.r2mu.cache_window
        self.slots = cfg.r2mu.summary_slots
        d = cfg.d_model
        self.slot_queries = nn.Parameter(torch.empty(self.slots, d))
        self.pool_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.gate = nn.Linear(2 * d, 1, bias=True)

    def init_plan(self, std: float) -> Plan:
        return [("slot_queries", normal(std)), ("pool_norm.weight", ones), ("gate.weight", normal(std)),
                ("gate.bias", zeros)]  # zero bias: a = 1/2 at init, an equal blend of old and new summary

    def init_weights(self, std: float) -> None:
        run_plan(self, self.init_plan(std))

    def num_segments(self, T: int) -> int:
        """Complete segments of a length-T sequence (encoder mode: the whole sequence is one)."""
        return 1 if not self.causal else T // self.segment_len

    def document_segments(self, pos: torch.Tensor, *, tight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The segments that end among per-sample positions pos (B, T) (selection.document_positions): segment_len
        tokens of one document from a multiple of segment_len within it. -> (end (B, S) index of each segment's last
        token, ascending; valid (B, S) bool). S = T // segment_len, a static bound (no row has more: a document of
        n tokens holds n // segment_len); tight=True: S = the most any row has, read on the host (the generation
        cache's new tokens, which may end a segment that began in an earlier call). Spare slots are invalid (their
        summaries are never visible) and point at an in-range token."""
        B, T = pos.shape
        L = self.segment_len
        ar = torch.arange(T, device=pos.device)
        is_end = (pos % DOCUMENT_STRIDE + 1) % L == 0  # (B, T)
        S = int(is_end.sum(1).max()) if tight else T // L
        end = torch.where(is_end, ar, ar + T).sort(dim=1).values[:, :S]  # the ends first, in token order
        valid = end < T
        return torch.where(valid, end, torch.full_like(end, min(L, T) - 1)), valid

    def pool(self, h: torch.Tensor, seg_end: torch.Tensor | None = None) -> torch.Tensor | None:
        """S_hat: attention-weighted pooling of each complete segment into m slots. (B, n_seg, m, D) or None.
        seg_end (B, S): the segments' last tokens (`document_segments`); None: segments at multiples of
        segment_len."""
        B, T, D = h.shape
        n_seg = self.num_segments(T) if seg_end is None else seg_end.shape[1]
        if n_seg == 0:
            return None
        L = T if not self.causal else self.segment_len
        if seg_end is None:
            hs = h[:, : n_seg * L].reshape(B, n_seg, L, D)  # (B, S, L, D)
        else:  # (spare slots: any in-range tokens, never read)
            idx = (seg_end[:, :, None] - L + 1 + torch.arange(L, device=h.device)).reshape(B, n_seg * L).clamp(0, T - 1)
            hs = h.gather(1, idx[..., None].expand(B, n_seg * L, D)).view(B, n_seg, L, D)
        hs32 = at_least_fp32(hs)
        scores = torch.einsum("bsld,md->bsml", at_least_fp32(self.pool_norm(hs)), at_least_fp32(self.slot_queries))
        w = torch.softmax(scores / math.sqrt(D), dim=-1)  # (B, S, m, L), at least float32
        return torch.einsum("bsml,bsld->bsmd", w, hs32).to(h.dtype)  # (B, S, m, D)

    def update(self, s_prev: torch.Tensor | None, s_hat: torch.Tensor | None, valid: torch.Tensor | None = None):
        """S^(t) = a * S^(t-1) + (1 - a) * S_hat^(t). Returns (S, mean gate or None); valid (B, S): the segments
        the mean counts (document masking's spare slots are not), None: all."""
        if s_hat is None:
            return None, None
        if s_prev is None:
            return s_hat, None  # S^(0) = S_hat^(0)
        a = torch.sigmoid(self.gate(torch.cat([s_prev, s_hat], dim=-1)))  # (B, S, m, 1)
        ad = a.detach()
        if valid is None:
            mean = ad.mean()
        else:
            w = valid[:, :, None, None].to(ad.dtype).expand_as(ad)
            mean = (ad * w).sum() / w.sum().clamp(min=1.0)
        return a * s_prev + (1.0 - a) * s_hat, mean

    def forward(self, h: torch.Tensor, s_prev: torch.Tensor | None, seg_end: torch.Tensor | None = None,
                seg_valid: torch.Tensor | None = None):
        """S^(t) from H^(t) and S^(t-1): pool, then gate. Returns (S^(t) or None, mean gate or None).
        seg_end / seg_valid: the segments under document masking (`document_segments`), None otherwise.

        Pooling and gating run inside this module's forward (not as bare method calls from the
        model) so that ZeRO-3's pre-forward hook gathers `slot_queries` before it is read.
        """
        return self.update(s_prev, self.pool(h, seg_end), seg_valid)

    def memory_keys(self, h_prev: torch.Tensor, summary: torch.Tensor | None, pos: torch.Tensor | None = None,
                    segments: tuple[torch.Tensor, torch.Tensor] | None = None, offset: int = 0):
        """Memory for ASAM: (states (B, Tm, D), positions (Tm,), windows (Tm,)) = [cache H^(t-1); S^(t)].
        Document masking: the tokens' positions pos (B, T) and their `document_segments` -> positions and windows
        (B, Tm), a summary at its segment's last token (a spare slot: window 0, never visible, at SPARE_POSITION, after
        every position, so the summaries' positions ascend). offset: the position of h_prev's first token (a shard of
        the sequence under sequence parallelism starts at rank * T/P)."""
        B, T, D = h_prev.shape
        dev = h_prev.device
        if pos is not None:
            states, k_pos, win = [h_prev], [pos], [torch.full_like(pos, self.cache_window)]
            if summary is not None:
                m = summary.shape[2]
                seg_end, valid = segments
                s_pos = torch.where(valid, pos.gather(1, seg_end), SPARE_POSITION)  # after every position
                k_pos.append(s_pos.repeat_interleave(m, dim=1))  # (B, S * m)
                win.append(torch.where(valid, UNBOUNDED_WINDOW, 0).repeat_interleave(m, dim=1))
                states.append(summary.reshape(B, -1, D))
            return torch.cat(states, dim=1), torch.cat(k_pos, dim=1), torch.cat(win, dim=1)
        pos = [torch.arange(offset, offset + T, device=dev)]
        win = [torch.full((T,), self.cache_window if self.causal else UNBOUNDED_WINDOW, dtype=torch.long, device=dev)]
        states = [h_prev]
        if summary is not None:
            n_seg, m = summary.shape[1], summary.shape[2]
            if self.causal:  # readable from the segment's last token on
                seg_end = offset + (torch.arange(n_seg, device=dev) + 1) * self.segment_len - 1  # (S,)
            else:  # encoder: visible to every token
                seg_end = torch.zeros(n_seg, dtype=torch.long, device=dev)
            pos.append(seg_end.repeat_interleave(m))
            win.append(torch.full((n_seg * m,), UNBOUNDED_WINDOW, dtype=torch.long, device=dev))
            states.append(summary.reshape(B, n_seg * m, D))
        return torch.cat(states, dim=1), torch.cat(pos), torch.cat(win)


def summary_positions(n: int, slots: int, segment_len: int, device) -> torch.Tensor:
    """Key position of summary entry j (slot j % m of segment j // m): the segment's last token. (n,)"""
    return (torch.arange(n, device=device) // slots + 1) * segment_len - 1


def memory_fillers(n_tok: int, n_sum: int, cfg: ModelConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the filler keys that block-align R2MU memory (ressformer.model's docstring): after n_tok tokens
    (and after the token cache, which ends at the same position) up to the next multiple of block_size, and after
    n_sum summary entries (the following segments' ends). -> (token fillers (f,), summary fillers (g,))."""
    bs, r = cfg.asam.block_size, cfg.r2mu
    tok = torch.arange(n_tok, n_tok + (-n_tok) % bs, device=device)
    summ = summary_positions(n_sum + (-n_sum) % bs, r.summary_slots, r.segment_len, device)[n_sum:]
    return tok, summ


def block_aligned(cache: torch.Tensor, summaries: torch.Tensor | None, fillers: tuple[torch.Tensor, torch.Tensor],
                  dim: int) -> torch.Tensor:
    """One field of block-aligned memory (ressformer.model's docstring) along `dim`: [token fillers | cache | token
    fillers | summaries | summary fillers]; fillers = (token fillers, summary fillers) of this field
    (`memory_fillers`: zero states or keys, the filler positions, zero windows)."""
    f_tok, f_sum = fillers
    return torch.cat([f_tok, cache, f_tok, *([] if summaries is None else [summaries]), f_sum], dim)


__all__ = ["sample_num_steps", "SegmentMemory", "summary_positions", "memory_fillers", "block_aligned"]
