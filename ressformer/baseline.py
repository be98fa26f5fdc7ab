"""TransformerForCausalLM: the dense pre-norm RoPE decoder every ReSSFormer result is compared with (paper sec. 4).

    embed_tokens -> n_layers x [x += self_attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))]
                 -> norm -> lm_head

Design choices:
* cfg.position="none": the same network without RoPE (NoPE: causal masking is its only position signal), the
  baseline that separates "no positional encoding" from the rest of ReSSFormer.
* Llama-style: RMSNorm (torch.nn.RMSNorm, eps cfg.norm_eps), rotary position embedding (RoPE, theta
  cfg.rope_theta, rotate-half convention) on q and k, F.scaled_dot_product_attention (causal unless
  cfg.causal is False), no biases. The FFN comes from moe.make_mlp(cfg), so an MoE baseline is one config field
  (moe.num_experts) and uses the same routed layer as ReSSFormer.
* cfg.n_layers distinct layers; the R2MU / ASAM / SOES fields of the config are ignored; `num_steps` is
  accepted and ignored so the trainer can call both architectures the same way.
* HF-like names (state_dict keys are a public API): model.embed_tokens, model.layers.N.{input_layernorm,
  self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}, model.norm, lm_head.
* RoPE cos/sin are non-persistent buffers for cfg.max_seq_len positions, (re)computed in init_weights (so a
  meta-device build followed by to_empty + init_weights is correct) and extended when a longer input arrives.
* Initialisation in one place (`init_plan`, run by `init_weights`), in-place only: N(0, init_std) for linears /
  embeddings / expert weights, output projections (o_proj, down_proj) scaled by 1/sqrt(2 * n_layers), norms ones.
* Activation checkpointing from outside: `set_checkpointing(fn, every)` routes every `every`-th layer call
  through fn(layer, *args) (torch.utils.checkpoint.checkpoint's calling convention).
* Incremental decoding: `forward(new_ids, cache=ModelCache())` (ressformer/cache.py), a plain per-layer cache of
  the (rotated) keys and values; new queries attend to the cached and new keys under an explicit causal mask.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressformer.config import ModelConfig
from ressformer.initialization import Plan, layer_rules, normal, ones, run_plan
from ressformer.moe import make_mlp, moe_aux_losses
from ressformer.output import ModelOutput, lm_loss, logits_and_loss


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, hd)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, T, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unit) -> torch.Tensor:
        """x (B, n, D) new tokens after the unit's cached ones, cos / sin (n, hd) of their positions."""
        B, n, D = x.shape
        q, k, v = (p(x).view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, n, hd)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = unit.k.append(k), unit.v.append(v)  # (B, H, Ti, hd)
        Ti = k.shape[2]
        mask = None
        if n > 1:  # query i (position Ti - n + i) sees keys <= its position
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, router_logits = self.mlp(self.post_attention_layernorm(x))
        return x + y, router_logits

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unit) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, unit)
        y, _ = self.mlp(self.post_attention_layernorm(x))
        return x + y


class TransformerModel(nn.Module):
    """Embeddings, layers and final norm (the `model.` prefix of the LM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class TransformerForCausalLM(nn.Module):
    """Dense baseline LM. forward(input_ids (B, T), labels=None, num_steps=None, cache=None,
    return_logits=None) -> ModelOutput.

    Logits: a training-mode forward with labels returns logits=None when the fused LM-head kernel computed its loss
    (CUDA + liger-kernel by default, ressformer.kernels.lm_loss_kernel); without labels or in eval mode they come back
    as before. return_logits=True always returns them, False never (ressformer.output.logits_and_loss); a forward
    with a cache always returns them.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "transformer":
            raise ValueError(f"TransformerForCausalLM needs arch='transformer', got arch={config.arch!r}; "
                             "use ressformer.build_model(cfg) to pick the class from the config")
        self.config = config
        self.model = TransformerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self._ckpt_fn: Callable | None = None
        self._ckpt_every = 1
        self.init_weights()

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights
        if exclude_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def set_checkpointing(self, fn: Callable | None, every: int = 1) -> None:
        """Run every `every`-th layer through fn(layer, *args); fn=None turns checkpointing off."""
        if every < 1:
            raise ValueError(f"set_checkpointing: every={every} must be >= 1")
        self._ckpt_fn, self._ckpt_every = fn, every

    def init_plan(self) -> Plan:
        """Ordered (parameter name, in-place init) steps covering every parameter (ressformer.initialization)."""
        cfg = self.config
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        plan = [("model.embed_tokens.weight", normal(std))]
        if not cfg.tie_embeddings:
            plan.append(("lm_head.weight", normal(std)))
        plan.append(("model.norm.weight", ones))
        for i, layer in enumerate(self.model.layers):
            plan += layer_rules(f"model.layers.{i}.", layer, std, out_std)
        return plan

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        if cfg.tie_embeddings:  # re-tie: `to_empty` after a meta-device build gives each module its own tensor
            self.lm_head.weight = self.model.embed_tokens.weight
        run_plan(self, self.init_plan())
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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, num_steps: int | None = None,
                cache=None, return_logits: bool | None = None) -> ModelOutput:
        """cache: None, or a ressformer.cache.ModelCache of the earlier tokens (empty at first): input_ids are then
        the new tokens only, their logits come back and the cache is updated (no aux losses)."""
        del num_steps  # no recurrence in the baseline
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if cache is not None:
            return self._forward_cached(input_ids, labels, cache)
        T = input_ids.shape[1]
        cos, sin = self._rope(T, input_ids.device)  # (T, hd)
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        router_logits_all = []
        for i, layer in enumerate(self.model.layers):
            if self._ckpt_fn is not None and i % self._ckpt_every == 0:
                h, rl = self._ckpt_fn(layer, h, cos, sin)
            else:
                h, rl = layer(h, cos, sin)
            if rl is not None:
                router_logits_all.append(rl)
        hn = self.model.norm(h)  # (B, T, D)
        logits, lm = logits_and_loss(self.lm_head, hn, labels, self.training, return_logits)  # (B, T, V) | None

        aux_losses: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, torch.Tensor] = {}
        if router_logits_all:
            m = cfg.moe
            parts = [moe_aux_losses(rl, m.experts_per_token, m.num_experts) for rl in router_logits_all]
            aux_losses["moe_balance"] = m.aux_loss_coef * torch.stack([p["balance"] for p in parts]).mean()
            aux_losses["moe_z"] = m.z_loss_coef * torch.stack([p["z"] for p in parts]).mean()
            load = torch.stack([p["load"] for p in parts]).mean(0)  # (E,) mean over layers
            diagnostics["moe_load"] = load
            diagnostics["moe_load_max"] = load.max()
            diagnostics["moe_load_min"] = load.min()

        loss = None
        if labels is not None:
            loss = lm + sum(aux_losses.values()) if aux_losses else lm
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm, aux_losses=aux_losses, diagnostics=diagnostics)

    def _forward_cached(self, input_ids: torch.Tensor, labels: torch.Tensor | None, cache) -> ModelOutput:
        if not self.config.causal:
            raise ValueError("a cache needs causal=True: in encoder mode every token attends to later ones")
        B, n = input_ids.shape
        cache.begin(len(self.model.layers), B, None, n)
        T0 = cache.length
        cos, sin = self._rope(T0 + n, input_ids.device)
        cos, sin = cos[T0:], sin[T0:]  # (n, hd) the new positions
        h = self.model.embed_tokens(input_ids)  # (B, n, D)
        for layer, unit in zip(self.model.layers, cache.units):
            h = layer.forward_cached(h, cos, sin, unit)
        cache.length = T0 + n
        logits = self.lm_head(self.model.norm(h))  # (B, n, V)
        lm = lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=lm, lm_loss=lm)


__all__ = ["TransformerForCausalLM", "TransformerModel", "TransformerBlock", "Attention", "rope_cos_sin",
           "apply_rope"]
