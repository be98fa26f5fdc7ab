"""TransformerForCausalLM: the dense pre-norm RoPE decoder every ReSSFormer result is compared with (paper sec. 4).

    embed_tokens -> n_layers x [x += self_attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))]
                 -> norm -> lm_head

* Llama-style: RMSNorm, rotate-half RoPE (theta cfg.rope_theta) on q and k, F.scaled_dot_product_attention, no
  biases; the FFN is moe.make_mlp(cfg), so an MoE baseline is one config field. cfg.position="none" drops RoPE
  (NoPE), separating "no positional encoding" from the rest of ReSSFormer.
* The R2MU / ASAM / SOES fields of the config and `num_steps` are ignored.
* RoPE cos / sin are non-persistent buffers, computed in init_weights (meta-device safe), extended on demand.
* Incremental decoding (cache.py): each layer keeps its rotated keys and values.
* Document masking (`documents=`): a (B, 1, T, T) causal same-document mask for SDPA, RoPE positions restarting at
  0 in every document (as a packed-sequence `position_ids` does), so each document's logits are its own alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressformer.causal_lm import CausalLM
from ressformer.config import ModelConfig
from ressformer.moe import make_mlp
from ressformer.output import ModelOutput
from ressformer.selection import DOCUMENT_STRIDE, document_positions, visible


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq_len, head_dim) float32 for rotate-half RoPE."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (hd/2,)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd), cos/sin (T, hd) -> rotated x: position t rotates pair (i, i + hd/2) by t * inv_freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim, self.causal = cfg.n_heads, cfg.head_dim, cfg.causal
        self.rope = cfg.position == "rope"
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """cos / sin (T, hd), or (B, 1, T, hd) with per-sample positions; mask None (causal or not, per config) or
        a bool (B, 1, T, T) (document masking)."""
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, hd)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, T, hd)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unit,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n, D) new tokens after the unit's cached ones, cos / sin (n, hd) of their positions (document
        masking: (B, 1, n, hd) and mask (B, 1, n, Ti))."""
        B, n, D = x.shape
        q, k, v = (p(x).view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, n, hd)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = unit.k.append(k), unit.v.append(v)  # (B, H, Ti, hd)
        Ti = k.shape[2]
        if mask is None and n > 1:  # query i (position Ti - n + i) sees keys <= its position
            kp = torch.arange(Ti, device=x.device)
            mask = kp[None, :] <= kp[Ti - n:, None]  # (n, Ti)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, n, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, n, D))


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer. forward(x (B, T, D), cos, sin) -> (x (B, T, D), router_logits (B*T, E) | None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = make_mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        y, router_logits = self.mlp(self.post_attention_layernorm(x))
        return x + y, router_logits

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unit,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, unit, mask)
        y, _ = self.mlp(self.post_attention_layernorm(x))
        return x + y


class TransformerModel(nn.Module):
    """Embeddings, layers and final norm (the `model.` prefix of the LM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class TransformerForCausalLM(CausalLM):
    """Dense baseline LM (ressformer.causal_lm.CausalLM): a checkpoint unit is one layer; num_steps is ignored."""

    arch = "transformer"

    def __init__(self, config: ModelConfig):
        super().__init__(config, TransformerModel(config))
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.init_weights()

    @property
    def depth(self) -> int:
        return self.config.n_layers

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        cfg = self.config
        if cfg.position != "rope":
            return
        cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.position != "rope":
            return self.rope_cos[:0], self.rope_sin[:0]  # NoPE: unused
        # longer than max_seq_len: extend; on another device (or never materialised: the transformers wrapper
        # keeps this module outside its module tree, so loading and .to() do not reach these buffers): recompute
        if T > self.rope_cos.shape[0] or self.rope_cos.device != torch.device(device):
            n = max(T, self.config.max_seq_len)
            cos, sin = rope_cos_sin(n, self.config.head_dim, self.config.rope_theta, device=device)
            self.rope_cos, self.rope_sin = cos, sin  # stays a non-persistent buffer
        return self.rope_cos[:T], self.rope_sin[:T]

    def _documents(self, q_pos: torch.Tensor, k_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Document masking from the queries' (B, n) and keys' (B, Ti) document positions
        (`selection.document_positions`): the (B, 1, n, Ti) causal same-document mask, and cos / sin (B, 1, n, hd)
        at the queries' positions within their documents (RoPE restarts in every document; unchanged for NoPE)."""
        mask = visible(q_pos, k_pos, None, causal=True)[:, None]
        if self.config.position == "rope":
            rel = q_pos % DOCUMENT_STRIDE
            cos, sin = cos[rel][:, None], sin[rel][:, None]
        return mask, cos, sin

    def _forward(self, input_ids: torch.Tensor, *, labels, num_steps, return_logits, documents) -> ModelOutput:
        cos, sin = self._rope(input_ids.shape[1], input_ids.device)  # (T, hd)
        mask = None
        if documents is not None:
            pos = document_positions(documents)  # (B, T)
            mask, cos, sin = self._documents(pos, pos, cos, sin)
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        router_logits = []
        for i, layer in enumerate(self.model.layers):
            h, rl = self._checkpointed(i, layer, h, cos, sin, mask)
            if rl is not None:
                router_logits.append(rl)
        return self._output(h, labels=labels, return_logits=return_logits, router_logits=router_logits)

    def _forward_cached(self, input_ids: torch.Tensor, *, labels, num_steps, cache, documents) -> ModelOutput:
        B, n = input_ids.shape
        cache.begin(len(self.model.layers), B, None, n)
        T0 = cache.length
        cos, sin = self._rope(T0 + n, input_ids.device)
        pos = cache.positions_of(documents, n, input_ids.device)  # (n,), or (B, n) per sample
        mask = None
        if documents is None:
            cos, sin = cos[T0:], sin[T0:]  # (n, hd) the new positions
        else:
            mask, cos, sin = self._documents(pos, cache.positions.view, cos, sin)
        h = self.model.embed_tokens(input_ids)  # (B, n, D)
        for layer, unit in zip(self.model.layers, cache.units):
            h = layer.forward_cached(h, cos, sin, unit, mask)
        cache.length = T0 + n
        return self._cached_output(h, labels)


__all__ = ["TransformerForCausalLM", "TransformerModel", "TransformerBlock", "Attention", "rope_cos_sin",
           "apply_rope"]
