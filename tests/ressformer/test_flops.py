"""Analytic parameter / FLOP counts (ressformer.flops) against the built models and FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ressformer import build_model
from ressformer.config import ModelConfig
from ressformer.flops import count_params, flops_per_token

SMALL = {
    "vocab_size": 96, "d_model": 32, "n_heads": 2, "ffn_hidden": 64, "max_seq_len": 64,
    "r2mu.steps": 3, "r2mu.cache_window": 8, "r2mu.segment_len": 8, "r2mu.summary_slots": 2,
    "asam.topk": 8, "asam.chunk_size": 16, "asam.block_size": 8, "asam.blocks_per_query": 2,
    "moe.num_experts": 4, "moe.experts_per_token": 2, "soes.rank": 8, "soes.degree": 4,
}


def small(**over) -> ModelConfig:
    return ModelConfig.from_preset("debug", **{**SMALL, **over})


PARAM_CASES = {
    "debug": ModelConfig.from_preset("debug"),
    "moe+shared": small(**{"moe.shared_experts": 2}),
    "moe k=1": small(**{"moe.experts_per_token": 1, "moe.num_experts": 8}),
    "dense ffn": small(**{"moe.num_experts": 1}),
    "r2mu off": small(**{"r2mu.enabled": False}),
    "memory off": small(**{"r2mu.memory": False}),
    "soes off": small(**{"soes.enabled": False}),
    "tied": small(tie_embeddings=True),
    "deep prelude/coda": small(**{"r2mu.n_prelude": 2, "r2mu.n_coda": 0}),
    "baseline": ModelConfig.from_preset("debug-transformer"),
    "baseline moe": ModelConfig.from_preset("debug-transformer", **{"moe.num_experts": 4, "moe.shared_experts": 1}),
    "baseline tied": ModelConfig.from_preset("debug-transformer", tie_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(PARAM_CASES))
def test_count_params_matches_built_model(name):
    cfg = PARAM_CASES[name]
    with torch.device("meta"):  # only shapes are needed
        model = build_model(cfg)
    counts = count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters()), name
    assert counts["embedding"] == model.model.embed_tokens.weight.numel()
    assert model.num_params() == counts["total"]
    if cfg.moe.num_experts > 1:
        m = cfg.moe
        # active = total minus the experts a token does not use, once per MoE layer
        n_moe = sum(1 for n, _ in model.named_modules() if n.endswith(".mlp"))
        unused = n_moe * (m.num_experts - m.experts_per_token) * 3 * cfg.d_model * cfg.ffn_hidden
        assert counts["active"] == counts["total"] - unused
    else:
        assert counts["active"] == counts["total"]


def measured_flops_per_token(cfg: ModelConfig, B: int = 1, T: int = 64, documents: bool = False) -> float:
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    kw = {"documents": (torch.arange(T) * 3 // T).expand(B, T)} if documents else {}  # three documents
    # FlopCounterMode does not see inside CPU fused SDPA kernels: force the math backend so the
    # baseline's attention matmuls are counted like ours.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, labels=x, **kw).loss.backward()
    return fc.get_total_flops() / (B * T)


@pytest.mark.parametrize("over", [
    {"asam.impl": "reference", "asam.topk": 8},
    {"asam.impl": "reference", "asam.topk": 0},
    {"asam.impl": "chunked", "asam.topk": 8},  # dense top-k pass at K step 0 (64 keys), gathered after (144 keys)
    {"asam.impl": "chunked", "asam.topk": 2},  # the gathered pass throughout (> topk * head_dim = 32 keys)
    {"asam.impl": "chunked", "asam.topk": 0},
    {"asam.impl": "block", "asam.topk": 8},
    {"asam.impl": "block", "asam.topk": 8, "asam.block_select": "chunk"},
    {"asam.impl": "block", "asam.topk": 0, "asam.block_select": "chunk"},
    {"asam.impl": "block", "asam.topk": 8, "documents": True},  # per-document blocks + the later documents' spans
    {"asam.impl": "chunked", "asam.topk": 8, "moe.num_experts": 1, "soes.enabled": False},
    {"asam.impl": "chunked", "asam.topk": 8, "r2mu.memory": False},
    {"asam.impl": "chunked", "asam.topk": 8, "r2mu.enabled": False},
    {"asam.impl": "chunked", "asam.topk": 8, "causal": False},
], ids=lambda o: ",".join(f"{k.split('.')[-1]}={v}" for k, v in o.items()))
def test_flops_per_token_matches_flop_counter(over):
    over = dict(over)
    docs = over.pop("documents", False)
    cfg = small(**over)
    T = 64
    want = measured_flops_per_token(cfg, T=T, documents=docs)
    got = flops_per_token(cfg, T, documents=docs)
    print(f"{over}: analytic {got:.4g} measured {want:.4g} ratio {got / want:.3f}")
    assert abs(got / want - 1) < 0.10


@pytest.mark.parametrize("over", [{}, {"moe.num_experts": 4}])
def test_flops_per_token_baseline(over):
    cfg = ModelConfig.from_preset("debug-transformer", **over)
    want = measured_flops_per_token(cfg, T=64)
    got = flops_per_token(cfg, 64)
    print(f"baseline {over}: analytic {got:.4g} measured {want:.4g} ratio {got / want:.3f}")
    assert abs(got / want - 1) < 0.10


def test_flops_scale_with_steps_and_length():
    cfg = small()
    assert flops_per_token(cfg, 64, num_steps=8) > flops_per_token(cfg, 64, num_steps=2)
    base = ModelConfig.from_preset("debug-transformer")
    # dense attention is quadratic, so its per-token cost grows linearly in T
    assert flops_per_token(base, 4096) - flops_per_token(base, 2048) == pytest.approx(6 * 2 * base.n_layers * 2048 * base.d_model)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)
