"""ReSSFormerForCausalLM: the whole ReSSFormer network (You & Liu 2025, sec. 3.1-3.4).

    embed_tokens -> [prelude blocks] -> R2MU loop: one shared block, K steps, memory -> [coda blocks]
                 -> norm -> lm_head
    block:  x = x + self_attn(input_layernorm(x), memory=norm(M^(t)), graph=A^(t-1))
            x = x + mlp(post_attention_layernorm(x))

The paper has the loop alone (prelude / coda, r2mu.n_prelude / n_coda, are an extension). Attention is ASAM
(attention.py), the FFN a SwiGLU or a routed MoE (moe.py), the memory R2MU's (recurrence.py).
* No positional encoding (sec. 3.3): positions only build masks. In encoder mode (causal=False) with unbounded
  windows the network is permutation equivariant.
* SOES (structure.py): soes.graph=attention, A^(t) is step t's attention pattern and biases step t+1's attention;
  bilinear, each block's LatentGraph induces A from its input states. Aux loss
  soes_smooth = smooth_coef * sum_{t=1}^{K-1} smoothness_penalty(A^(t-1), A^(t)), next to the MoE ones.
* r2mu.enabled=False (ablation): the core is `steps` distinct blocks, no memory, no sharing.
* The forward keeps no tensors on `self`, so the shared block may run K times under ZeRO-3 / recomputation.
* Block ASAM with memory: the memory keys are block-aligned, [tokens | fillers | token cache | fillers | summaries |
  fillers] (fillers: zero keys, window 0), so key blocks hold the same positions whatever the sequence length and
  a query's output never depends on how many tokens follow it. Under document masking the memory stays [token cache
  | summaries] and ASAM cuts each document's blocks from its first key in each run (selection.document_key_blocks).
* Incremental decoding (cache.py): each unit keeps its keys / values and what its memory and graph read.
* Document masking (`documents=`): per-sample positions (selection.document_positions) keep every read - ASAM keys,
  token cache, summaries (segments restart per document), SOES edges - inside the token's document.
* Sequence parallelism (`set_sequence_parallel`, ressformer.sequence_parallel): the forward takes a shard of each
  sequence at positions rank * T/P ..; memory keys carry those positions and are block-aligned after the exchange,
  in ASAMAttention; the smoothness penalty and gate means are the group's.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn

from ressformer.attention import ASAMAttention
from ressformer.cache import attend, latent_graph
from ressformer.causal_lm import CausalLM
from ressformer.config import ModelConfig
from ressformer.initialization import Plan
from ressformer.moe import MoEBlock, MoEExperts, make_mlp, moe_aux_losses
from ressformer.output import ModelOutput
from ressformer.recurrence import SegmentMemory, block_aligned, memory_fillers, summary_positions
from ressformer.selection import SPARE_POSITION, UNBOUNDED_WINDOW, document_positions
from ressformer.sequence_parallel import shard_error
from ressformer.structure import Graph, LatentGraph, smoothness_penalty


class ReSSFormerBlock(nn.Module):
    """Pre-norm block: ASAM attention (+ SOES graph bias, + R2MU memory keys) and a SwiGLU / MoE FFN."""

    def __init__(self, cfg: ModelConfig, recurrent: bool = True):
        """recurrent: a block of the R2MU loop (False: a prelude / coda block, which an attention-pattern graph,
        made and read only inside the loop, never reaches)."""
        super().__init__()
        d = cfg.d_model
        self.input_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.graph_from_attention = cfg.soes.enabled and cfg.soes.graph == "attention"
        self.self_attn = ASAMAttention(cfg, graph=cfg.soes.enabled and (recurrent or not self.graph_from_attention))
        self.post_attention_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.mlp = make_mlp(cfg)
        self.graph = LatentGraph(cfg) if cfg.soes.enabled and cfg.soes.graph == "bilinear" else None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, *, memory=None, graph=None, recurrent: bool = False,
                in_order: bool = False, expert_taps=None):
        """x (B, T, D), pos (T,), memory None | (states (B, Tm, D), pos (Tm,), window (Tm,)), graph None |
        (idx, val) the previous recurrent step's graph (soes.graph=attention: it biases this call's attention).
        in_order: the model's full forward lays the keys out as ASAMAttention.key_runs says (ASAM then skips, per
        query chunk, the tokens and cache entries it cannot see).

        Returns (x (B, T, D), graph | None, router_logits (B*T, E) | None, attention stats dict). The graph is
        this call's: bilinear, induced from its input states; attention, its attention pattern, made only inside
        the recurrence (recurrent=True), where the next step reads it. expert_taps: None, or this call's pair of
        the routed experts' `MoEExperts.weight_taps`.
        """
        xn = self.input_layernorm(x)
        if self.graph is not None:
            graph = self.graph(xn, pos)
        if memory is not None:
            m_states, m_pos, m_win = memory
            memory = (self.input_layernorm(m_states), m_pos, m_win)
        pattern = self.graph_from_attention and recurrent
        a, stats = self.self_attn(xn, pos, memory=memory, graph=graph, pattern=pattern, in_order=in_order)
        if pattern:
            graph = stats.pop("pattern")
        elif self.graph is None:
            graph = None
        x = x + a
        xn = self.post_attention_layernorm(x)
        y, router_logits = self.mlp(xn) if expert_taps is None else self.mlp(xn, taps=expert_taps)
        return x + y, graph, router_logits, stats

    def forward_cached(self, x: torch.Tensor, pos: torch.Tensor, unit, *, memory=None, graph=None,
                       recurrent: bool = False, doc_pos=None):
        """forward for new tokens only: x (B, n, D) at positions pos (n,), the earlier tokens in `unit`
        (cache.UnitCache, updated); memory None | projected (k, v, pos, window) (cache.attend); doc_pos: document
        masking's positions (new (B, n), all (B, Ti)) or None.
        Returns (x (B, n, D), graph rows of the new tokens | None)."""
        xn = self.input_layernorm(x)
        if self.graph is not None:
            graph = latent_graph(self.graph, xn, pos, unit, doc_pos=doc_pos)
        pattern = self.graph_from_attention and recurrent
        a, pat = attend(self.self_attn, xn, pos, unit, memory=memory, graph=graph, pattern=pattern, doc_pos=doc_pos)
        if pattern:
            graph = pat
        elif self.graph is None:
            graph = None
        x = x + a
        y, _ = self.mlp(self.post_attention_layernorm(x))
        return x + y, graph


class ReSSFormerModel(nn.Module):
    """Embeddings, blocks, memory and final norm (HF-like naming: the `model.` prefix of the LM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = cfg.r2mu
        n_core = 1 if r.enabled else r.steps
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # [prelude..., core (1 shared, or `steps` distinct), coda...]
        self.layers = nn.ModuleList(ReSSFormerBlock(cfg, recurrent=r.n_prelude <= i < r.n_prelude + n_core)
                                    for i in range(r.n_prelude + n_core + r.n_coda))
        self.memory = SegmentMemory(cfg) if (r.enabled and r.memory) else None
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class UnitOut(NamedTuple):
    """What one checkpoint unit (a prelude / coda block, or a recurrent step) returns."""

    h: torch.Tensor  # (B, T, D) the unit's output states
    router_logits: torch.Tensor | None = None  # (B*T, E) of its MoE call
    density: torch.Tensor | None = None  # attention density (detached)
    summary: torch.Tensor | None = None  # recurrent step: S^(t) (B, n_seg, m, D)
    graph: Graph | None = None  # recurrent step: its SOES graph A^(t) (B, T, m)
    gate: torch.Tensor | None = None  # recurrent step: the mean R2MU overwrite gate of S^(t)
    moe_parts: dict | None = None  # recurrent step, no sequence parallelism: moe_aux_losses of its router logits
    smooth: torch.Tensor | None = None  # recurrent step t >= 1, no sequence parallelism: the SOES smoothness penalty
    #                                     between A^(t-1) (its graph input) and A^(t)


class ReSSFormerForCausalLM(CausalLM):
    """ReSSFormer language model (ressformer.causal_lm.CausalLM). A checkpoint unit is one prelude block, one whole
    recurrent step (memory pooling + gate + graph + block) or one coda block."""

    arch = "ressformer"

    def __init__(self, config: ModelConfig):
        super().__init__(config, ReSSFormerModel(config))
        self._compiled_step = None  # `compile_units`: torch.compile(self._recurrent_step)
        self.init_weights()

    # --- structure ----------------------------------------------------------------------------
    @property
    def n_prelude(self) -> int:
        return self.config.r2mu.n_prelude

    @property
    def n_core(self) -> int:
        return 1 if self.config.r2mu.enabled else self.config.r2mu.steps

    @property
    def depth(self) -> int:
        r = self.config.r2mu
        return r.n_prelude + r.steps + r.n_coda

    def core_block(self, t: int) -> ReSSFormerBlock:
        """The block applied at recurrent step t (the shared one, or the t-th distinct one in the ablation)."""
        return self.model.layers[self.n_prelude + (0 if self.config.r2mu.enabled else t)]

    def _compile_targets(self) -> list[nn.Module]:
        """The prelude and coda blocks; the recurrent step (its block and the R2MU memory) compiles as one function
        (`_compile_functions`)."""
        layers = self.model.layers
        return [layers[i] for i in range(len(layers)) if not self.n_prelude <= i < self.n_prelude + self.n_core]

    def _compile_functions(self, **compile_kwargs) -> None:
        self._compiled_step = torch.compile(self._recurrent_step, **compile_kwargs)

    def extra_init_plan(self, std: float) -> Plan:
        if self.model.memory is None:
            return []
        return [("model.memory." + n, fn) for n, fn in self.model.memory.init_plan(std)]

    def _num_steps(self, num_steps: int | None) -> int:
        cfg = self.config
        K = cfg.r2mu.steps if num_steps is None else int(num_steps)
        if K < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        if not cfg.r2mu.enabled and K != cfg.r2mu.steps:
            raise ValueError(f"num_steps={K} with r2mu.enabled=False: the ablation has exactly r2mu.steps="
                             f"{cfg.r2mu.steps} distinct core blocks; pass num_steps=None")
        return K

    # --- forward ------------------------------------------------------------------------------
    def _plain_block(self, block: ReSSFormerBlock, h: torch.Tensor, pos: torch.Tensor) -> UnitOut:
        h, _, router_logits, stats = block(h, pos, in_order=True)
        return UnitOut(h, router_logits, stats.get("density"))

    def _step(self, h: torch.Tensor, h_prev: torch.Tensor | None, s_prev: torch.Tensor | None,
              g_idx: torch.Tensor | None, g_val: torch.Tensor | None, pos: torch.Tensor,
              seg_end: torch.Tensor | None, seg_valid: torch.Tensor | None, tap_up: torch.Tensor | None,
              tap_down: torch.Tensor | None, *, t: int, need_summary: bool) -> UnitOut:
        """One recurrent step t: `_recurrent_step` with step t's block, compiled when `compile_units` compiled it.

        g_idx / g_val: step t-1's attention-pattern graph (soes.graph=attention), None otherwise. The tensors are
        positional, as the checkpointing hook's fn(function, *args) passes them. seg_end / seg_valid: the R2MU
        segments under document masking (SegmentMemory.document_segments), None otherwise. tap_up / tap_down: step
        t's pair of the routed experts' `MoEExperts.weight_taps`, None without them."""
        step = self._compiled_step if self._compiled_step is not None else self._recurrent_step
        taps = None if tap_up is None else (tap_up, tap_down)
        return step(self.core_block(t), h, h_prev, s_prev, g_idx, g_val, pos, seg_end, seg_valid, taps, need_summary)

    def _recurrent_step(self, block: ReSSFormerBlock, h: torch.Tensor, h_prev: torch.Tensor | None,
                        s_prev: torch.Tensor | None, g_idx: torch.Tensor | None, g_val: torch.Tensor | None,
                        pos: torch.Tensor, seg_end: torch.Tensor | None, seg_valid: torch.Tensor | None,
                        expert_taps: tuple | None, need_summary: bool) -> UnitOut:
        """S^(t) from H^(t), M^(t) = [H^(t-1); S^(t)], H^(t+1) = block(H^(t), M^(t)): the unit torch.compile makes
        one graph of (memory pooling and gate, memory keys, ASAM, experts, SOES graph). need_summary: whether S^(t)
        is read (False only at step 0 of K = 1: computing it there would give the memory's parameters zero
        gradients instead of none)."""
        mem = self.model.memory
        summary, gate, memory = None, None, None
        if mem is not None:
            if need_summary:
                summary, gate = mem(h, s_prev, seg_end, seg_valid)
            if h_prev is not None:
                docs = pos.dim() == 2
                offset = 0 if self.sp is None else self.sp.rank * h.shape[1]
                memory = mem.memory_keys(h_prev, summary, pos if docs else None, (seg_end, seg_valid) if docs else None,
                                         offset=offset)
                if self.config.causal and self.config.asam.impl == "block" and self.sp is None and not docs:
                    memory = self._block_align(memory, h.shape[1])  # (sp: aligned after the exchange, in ASAMAttention;
                    #                                                  documents: blocks cut per document there)
        g_in = None if g_idx is None else (g_idx, g_val)
        h_new, graph, router_logits, stats = block(h, pos, memory=memory, graph=g_in, recurrent=True,
                                                   in_order=self.config.asam.impl != "block", expert_taps=expert_taps)
        graph = None if graph is None else Graph(*graph)
        # the step's aux terms inside its graph, where the compiler fuses them (the forward's tail, eager, would run
        # each op alone); with sequence parallelism they are sums over the group, taken in the tail
        moe_parts = smooth = None
        if self.sp is None and router_logits is not None:
            moe_parts = moe_aux_losses(router_logits, self.config.moe.experts_per_token, self.config.moe.num_experts)
        if self.sp is None and graph is not None and g_idx is not None:
            smooth = smoothness_penalty(Graph(g_idx, g_val), graph)
        return UnitOut(h_new, router_logits, stats.get("density"), summary=summary, graph=graph, gate=gate,
                       moe_parts=moe_parts, smooth=smooth)

    def _expert_taps(self, h: torch.Tensor, K: int) -> tuple | None:
        """The shared block's routed experts' `MoEExperts.weight_taps` for K recurrent steps on hidden states h
        (B, T, D): each step's expert weight gradients then sum in one grouped matmul per weight after the K
        steps' backward (None where they do not apply: no MoE, expert parallelism, the ablation's distinct blocks,
        the path or settings that method names)."""
        mlp = self.core_block(0).mlp
        if not self.config.r2mu.enabled or not isinstance(mlp, MoEBlock) or not isinstance(mlp.experts, MoEExperts):
            return None
        rows = h.shape[0] * h.shape[1] * mlp.top_k
        return mlp.experts.weight_taps(h, rows, K, compiled=self._compiled_step is not None)

    def _block_align(self, memory, T: int):
        """Memory (states (B, T + S, D), pos, window) = [token cache; S summary entries] -> with the filler keys
        of block-aligned memory (model docstring): zero states, window 0."""
        states, pos, win = memory
        B, _, D = states.shape
        f_tok, f_sum = memory_fillers(T, states.shape[1] - T, self.config, states.device)
        n = (len(f_tok), len(f_sum))
        return (block_aligned(states[:, :T], states[:, T:], tuple(states.new_zeros(B, f, D) for f in n), 1),
                block_aligned(pos[:T], pos[T:], (f_tok.to(pos.dtype), f_sum.to(pos.dtype)), 0),
                block_aligned(win[:T], win[T:], tuple(win.new_zeros(f) for f in n), 0))

    def _forward(self, input_ids: torch.Tensor, *, labels, num_steps, return_logits, documents) -> ModelOutput:
        cfg = self.config
        K = self._num_steps(num_steps)
        need_summary = self.model.memory is not None and K > 1
        seg_end = seg_valid = None
        sp = self.sp
        if sp is not None:
            if documents is not None:
                raise ValueError("documents (document masking) with sequence parallelism: not supported; train with "
                                 "data.document_mask=false or sequence_parallel_size=1")
            Tl = input_ids.shape[1]
            err = shard_error(cfg, Tl * sp.size, sp.size)
            if err:
                raise ValueError(err)
            pos = torch.arange(sp.rank * Tl, (sp.rank + 1) * Tl, device=input_ids.device)  # this shard's positions
        elif documents is None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # masks only, never embedded
        else:
            pos = document_positions(documents)  # (B, T)
            if need_summary:
                seg_end, seg_valid = self.model.memory.document_segments(pos)
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        router_logits: list[torch.Tensor] = []
        moe_parts: list[dict | None] = []  # per MoE call: its aux losses when its unit computed them
        densities: list[torch.Tensor] = []
        diagnostics: dict[str, torch.Tensor] = {}

        def collect(out: UnitOut) -> torch.Tensor:
            if out.router_logits is not None:
                router_logits.append(out.router_logits)
                moe_parts.append(out.moe_parts)
            if out.density is not None:
                densities.append(torch.as_tensor(out.density).detach().float())
            return out.h

        layers, unit = self.model.layers, 0
        for i in range(self.n_prelude):
            h = collect(self._checkpointed(unit, self._plain_block, layers[i], h, pos))
            unit += 1

        # R2MU recurrence: H^(0) = prelude output. S^(t) is needed at step t >= 1 (read by the block) and at t = 0
        # only to seed S^(1).
        h_prev, summary, graph = None, None, None
        smooth = []
        taps = self._expert_taps(h, K)
        for t in range(K):
            g_idx, g_val = (None, None) if graph is None else graph
            tap_up, tap_down = (None, None) if taps is None else taps[t]
            out = self._checkpointed(unit, partial(self._step, t=t, need_summary=need_summary),
                                     h, h_prev, summary, g_idx, g_val, pos, seg_end, seg_valid, tap_up, tap_down)
            unit += 1
            h_prev, h = h, collect(out)
            summary = out.summary
            if out.gate is not None:
                gate = out.gate.detach().float()
                diagnostics[f"r2mu_gate_step{t}"] = gate if sp is None else sp.sum(gate) / sp.size  # equal shards
            if out.graph is not None:
                if out.smooth is not None:
                    smooth.append(out.smooth)
                elif graph is not None:
                    pen = smoothness_penalty(graph, out.graph)  # a mean over the (equal) shards' rows
                    smooth.append(pen if sp is None else sp.sum(pen) / sp.size)
                graph = out.graph

        for i in range(self.n_prelude + self.n_core, len(layers)):
            h = collect(self._checkpointed(unit, self._plain_block, layers[i], h, pos))
            unit += 1

        aux_losses = {}
        if cfg.soes.enabled:
            s = torch.stack(smooth).sum() if smooth else h.new_zeros(())
            aux_losses["soes_smooth"] = cfg.soes.smooth_coef * s
            diagnostics["soes_smooth_raw"] = s.detach().float()
        if densities:
            diagnostics["attn_density"] = torch.stack(densities).mean()
        diagnostics["num_steps"] = torch.tensor(float(K))
        return self._output(h, labels=labels, return_logits=return_logits, router_logits=router_logits,
                            aux_losses=aux_losses, diagnostics=diagnostics, moe_parts=moe_parts)

    # --- incremental decoding (ressformer/cache.py) ----------------------------------------------
    def _cached_summaries(self, h: torch.Tensor, unit, s_prev: torch.Tensor | None) -> torch.Tensor | None:
        """S^(t) of the segments the new tokens complete, from h^(t) (B, n, D) and their S^(t-1) (this pass's
        previous step; None at t = 0). The incomplete segment's states stay in unit.seg_h. (B, n_done, m, D) | None"""
        L = self.config.r2mu.segment_len
        seg = h if unit.seg_h is None else torch.cat([unit.seg_h, h], 1)  # (B, P + n, D) from a segment start
        n_done = seg.shape[1] // L
        unit.seg_h = seg[:, n_done * L:].clone()
        if n_done == 0:
            return None
        summary, _ = self.model.memory(seg[:, :n_done * L], s_prev)
        return summary

    def _cached_document_summaries(self, h: torch.Tensor, unit, s_prev, new_pos: torch.Tensor):
        """`_cached_summaries` under document masking: S^(t) of the segments the new tokens complete, segments
        restarting at each document's first token, from h^(t) (B, n, D), the last segment_len - 1 states kept in
        unit.hist_h and this pass's S^(t-1) of the same segments. new_pos (B, n) the new tokens' positions.
        -> None, or (S^(t) (B, S, m, D), their positions (B, S*m), windows (B, S*m): 0 for a row's spare slots)."""
        L = self.config.r2mu.segment_len
        n = h.shape[1]
        seq = h if unit.hist_h is None else torch.cat([unit.hist_h, h], 1)  # (B, P + n, D)
        P = seq.shape[1] - n
        unit.hist_h = seq[:, max(0, seq.shape[1] - (L - 1)):].clone()
        # decoding reads the host for the count (as block ASAM's chunks do); training never does
        end, valid = self.model.memory.document_segments(new_pos, tight=True)  # (B, S) among the new tokens
        if end.shape[1] == 0:
            return None
        summary, _ = self.model.memory(seq, s_prev, P + end)
        m = summary.shape[2]
        s_pos = torch.where(valid, new_pos.gather(1, end), SPARE_POSITION).repeat_interleave(m, dim=1)
        s_win = torch.where(valid, UNBOUNDED_WINDOW, 0).repeat_interleave(m, dim=1)
        return summary, s_pos, s_win

    def _cached_memory(self, block: ReSSFormerBlock, *, prev, unit, summary: torch.Tensor | None, T0: int, Ti: int,
                       doc_pos=None):
        """Projected memory keys of recurrent step t for queries at T0..Ti-1: step t-1's token keys (prev) within
        cache_window, the summaries of every complete segment (this call's new ones projected and appended to
        unit), block-aligned under block ASAM. -> (k (B, H, Tm, hd), v, pos (Tm,), window (Tm,)). Document masking
        (doc_pos: the positions of every token (B, Ti); summary: `_cached_document_summaries`' triple): pos and
        window (B, Tm)."""
        if doc_pos is not None:
            return self._cached_document_memory(block, prev=prev, unit=unit, summary=summary, T0=T0, Ti=Ti,
                                                doc_pos=doc_pos)
        cfg = self.config
        r, a = cfg.r2mu, cfg.asam
        attn = block.self_attn
        aligned = a.impl == "block"
        lo = T0 // a.chunk_size * a.chunk_size if aligned else T0  # block_select=chunk: the chunk's first query
        c0 = max(0, lo - r.cache_window + 1)  # earlier entries are out of every query's window
        if aligned:
            c0 = c0 // a.block_size * a.block_size
        dev = prev.k.view.device
        if summary is not None:
            B, n_seg, m, D = summary.shape
            sn = block.input_layernorm(summary.reshape(B, n_seg * m, D))
            unit.sum_k.append(attn.k_proj(sn).view(B, n_seg * m, attn.n_heads, attn.head_dim).transpose(1, 2))
            unit.sum_v.append(attn.v_proj(sn).view(B, n_seg * m, attn.n_heads, attn.head_dim).transpose(1, 2))
        k, v = prev.k.view[:, :, c0:Ti], prev.v.view[:, :, c0:Ti]  # (B, H, Ti - c0, hd) the token cache
        pos = torch.arange(c0, Ti, device=dev)
        win = torch.full((Ti - c0,), r.cache_window, dtype=torch.long, device=dev)
        n_sum = 0 if unit.sum_k.view is None else unit.sum_k.view.shape[2]
        sk = sv = s_pos = s_win = None  # the summaries of every complete segment
        if n_sum:
            sk, sv = unit.sum_k.view, unit.sum_v.view
            s_pos = summary_positions(n_sum, r.summary_slots, r.segment_len, dev)
            s_win = torch.full((n_sum,), UNBOUNDED_WINDOW, dtype=torch.long, device=dev)
        if aligned:
            f_tok, f_sum = memory_fillers(Ti, n_sum, cfg, dev)
            zk = tuple(k.new_zeros(*k.shape[:2], len(f), k.shape[3]) for f in (f_tok, f_sum))
            zw = tuple(torch.zeros(len(f), dtype=torch.long, device=dev) for f in (f_tok, f_sum))
            return (block_aligned(k, sk, zk, 2), block_aligned(v, sv, zk, 2),
                    block_aligned(pos, s_pos, (f_tok, f_sum), 0), block_aligned(win, s_win, zw, 0))
        if not n_sum:
            return k, v, pos, win
        return torch.cat([k, sk], 2), torch.cat([v, sv], 2), torch.cat([pos, s_pos]), torch.cat([win, s_win])

    def _cached_document_memory(self, block: ReSSFormerBlock, *, prev, unit, summary, T0: int, Ti: int, doc_pos):
        """`_cached_memory` under document masking: positions and windows per sample. Block ASAM (each document's
        blocks cut from its first key in each run, selection.document_key_blocks): the whole token cache, and the
        summaries in position order (a call's spare slots, at SPARE_POSITION, after every document's)."""
        r = self.config.r2mu
        block_asam = self.config.asam.impl == "block"
        attn = block.self_attn
        if summary is not None:
            s, s_pos, s_win = summary
            B, n_seg, m, D = s.shape
            sn = block.input_layernorm(s.reshape(B, n_seg * m, D))
            unit.sum_k.append(attn.k_proj(sn).view(B, n_seg * m, attn.n_heads, attn.head_dim).transpose(1, 2))
            unit.sum_v.append(attn.v_proj(sn).view(B, n_seg * m, attn.n_heads, attn.head_dim).transpose(1, 2))
            unit.sum_pos.append(s_pos)
            unit.sum_win.append(s_win)
        # earlier tokens are out of every query's window (index = position within a document; other documents are
        # invisible anyway)
        c0 = 0 if block_asam else max(0, T0 - r.cache_window + 1)
        k, v = prev.k.view[:, :, c0:Ti], prev.v.view[:, :, c0:Ti]
        pos = doc_pos[:, c0:Ti]
        win = torch.full_like(pos, r.cache_window)
        if unit.sum_k.view is None:
            return k, v, pos, win
        sk, sv, sp, sw = unit.sum_k.view, unit.sum_v.view, unit.sum_pos.view, unit.sum_win.view
        if block_asam:
            order = sp.sort(dim=1, stable=True).indices  # (B, S) a sample's summaries, then its spare slots
            sk, sv = (t.gather(2, order[:, None, :, None].expand_as(t)) for t in (sk, sv))
            sp, sw = sp.gather(1, order), sw.gather(1, order)
        return torch.cat([k, sk], 2), torch.cat([v, sv], 2), torch.cat([pos, sp], 1), torch.cat([win, sw], 1)

    def _forward_cached(self, input_ids: torch.Tensor, *, labels, num_steps, cache, documents) -> ModelOutput:
        K = self._num_steps(num_steps)
        B, n = input_ids.shape
        units = self.n_prelude + K + self.config.r2mu.n_coda  # [prelude..., step 0..K-1, coda...]
        cache.begin(units, B, K, n)
        T0 = cache.length
        Ti = T0 + n
        pos = torch.arange(T0, Ti, device=input_ids.device)
        dpos = cache.positions_of(documents, n, input_ids.device)  # (n,) = pos, or (B, n) per sample
        doc_pos = None if documents is None else (dpos, cache.positions.view)
        h = self.model.embed_tokens(input_ids)  # (B, n, D)
        layers, u = self.model.layers, cache.units
        for i in range(self.n_prelude):
            h, _ = layers[i].forward_cached(h, pos, u[i], doc_pos=doc_pos)
        mem = self.model.memory
        summary = graph = None
        for t in range(K):
            unit = u[self.n_prelude + t]
            if mem is not None and K > 1:
                if doc_pos is None:
                    summary = self._cached_summaries(h, unit, summary)
                else:
                    summary = self._cached_document_summaries(h, unit, None if summary is None else summary[0], dpos)
            memory = None
            if mem is not None and t >= 1:
                memory = self._cached_memory(self.core_block(t), prev=u[self.n_prelude + t - 1], unit=unit,
                                             summary=summary, T0=T0, Ti=Ti,
                                             doc_pos=None if doc_pos is None else doc_pos[1])
            h, graph = self.core_block(t).forward_cached(h, pos, unit, memory=memory, graph=graph, recurrent=True,
                                                         doc_pos=doc_pos)
        for j in range(self.config.r2mu.n_coda):
            h, _ = layers[self.n_prelude + self.n_core + j].forward_cached(h, pos, u[self.n_prelude + K + j],
                                                                          doc_pos=doc_pos)
        cache.length = Ti
        return self._cached_output(h, labels, diagnostics={"num_steps": torch.tensor(float(K))})
