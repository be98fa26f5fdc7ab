"""Dense Transformer baseline (ressformer/baseline.py): causality, gradients, overfitting, checkpointing parity,
RoPE relative-position property, meta-device build, MoE baseline, HF label convention."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ressformer import build_model
from ressformer.baseline import TransformerForCausalLM, apply_rope, rope_cos_sin
from ressformer.config import ModelConfig
from ressformer.output import lm_loss


def _cfg(**over):
    return ModelConfig.from_preset("debug-transformer", **over)


def test_build_and_names():
    m = build_model(_cfg())
    assert isinstance(m, TransformerForCausalLM)
    keys = set(m.state_dict())
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert k in keys, k
    assert len(m.model.layers) == m.config.n_layers
    assert not any("rope" in k for k in keys)  # non-persistent
    assert m.num_params() == sum(p.numel() for p in m.parameters())


def test_causality():
    torch.manual_seed(0)
    m = build_model(_cfg()).eval()
    ids = torch.randint(0, 512, (2, 24))
    t = 10
    ids2 = ids.clone()
    ids2[:, t + 1] = (ids2[:, t + 1] + 7) % 512
    a, b = m(ids).logits, m(ids2).logits
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4
    # encoder mode: a later token does change earlier logits
    e = build_model(_cfg(causal=False)).eval()
    assert (e(ids).logits[:, :t + 1] - e(ids2).logits[:, :t + 1]).abs().max() > 1e-4


def test_labels_hf_convention_and_ignore_index():
    torch.manual_seed(0)
    m = build_model(_cfg())
    ids = torch.randint(0, 512, (2, 16))
    out = m(ids, labels=ids)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    assert out.lm_loss is out.loss and out.aux_losses == {}
    lab = ids.clone()
    lab[:, 8:] = -100
    want = F.cross_entropy(out.logits[:, :7].reshape(-1, 512), ids[:, 1:8].reshape(-1))
    torch.testing.assert_close(lm_loss(out.logits, lab), want)
    assert m(ids, num_steps=3).logits.shape == (2, 16, 512)  # accepted and ignored


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for cfg in (_cfg(), _cfg(**{"moe.num_experts": 4, "moe.experts_per_token": 2, "moe.shared_experts": 1})):
        m = build_model(cfg)
        ids = torch.randint(0, 512, (4, 32))
        m(ids, labels=ids).loss.backward()
        for n, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_moe_baseline_aux_losses():
    torch.manual_seed(0)
    cfg = _cfg(**{"moe.num_experts": 4, "moe.experts_per_token": 2})
    m = build_model(cfg)
    assert tuple(m.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 2 * cfg.ffn_hidden, cfg.d_model)
    ids = torch.randint(0, 512, (2, 16))
    out = m(ids, labels=ids)
    assert set(out.aux_losses) == {"moe_balance", "moe_z"}
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_losses["moe_balance"] + out.aux_losses["moe_z"])
    assert 0.9 * cfg.moe.aux_loss_coef < out.aux_losses["moe_balance"].item() < 2 * cfg.moe.aux_loss_coef
    load = out.diagnostics["moe_load"]
    assert load.shape == (4,) and abs(load.sum().item() - 1) < 1e-6


@pytest.mark.timeout(60)
def test_debug_preset_overfits_fixed_batch():
    torch.manual_seed(0)
    m = build_model(_cfg())
    ids = torch.randint(0, 512, (2, 32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):  # speed is bench/step_time.py's business, not a test's (timeout above is a hang guard)
        loss = m(ids, labels=ids).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = m(ids, labels=ids).loss.item()
    print(f"overfit: {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_identical_loss_and_grads(every):
    torch.manual_seed(0)
    cfg = _cfg(**{"moe.num_experts": 4})
    m = build_model(cfg)
    ids = torch.randint(0, 512, (2, 32))

    def run():
        m.zero_grad()
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    l0, g0 = run()
    calls = []

    def fn(f, *args):
        calls.append(1)
        return checkpoint(f, *args, use_reentrant=False)

    m.set_checkpointing(fn, every=every)
    l1, g1 = run()
    assert len(calls) == len(range(0, cfg.n_layers, every))
    m.set_checkpointing(None)
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0, msg=n)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    hd, T = 16, 40
    cos, sin = rope_cos_sin(T, hd, 10000.0)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    Q = apply_rope(q.expand(1, 1, T, hd).clone(), cos.double(), sin.double())[0, 0]  # same q at every position
    K = apply_rope(k.expand(1, 1, T, hd).clone(), cos.double(), sin.double())[0, 0]
    S = Q @ K.t()  # (T, T)
    for off in (0, 1, 5, 17):
        d = torch.diagonal(S, offset=-off)  # query pos i, key pos i - off
        torch.testing.assert_close(d, d[0].expand_as(d), rtol=1e-5, atol=1e-5)  # float32 cos/sin
    assert (S.diagonal(0)[0] - S.diagonal(-5)[0]).abs() > 1e-3  # different offsets do differ
    torch.testing.assert_close(apply_rope(q.view(1, 1, 1, hd), cos[:1].double(), sin[:1].double()).flatten(), q)


def test_rope_cache_extends_beyond_max_seq_len():
    torch.manual_seed(0)
    m = build_model(_cfg(max_seq_len=16)).eval()
    ids = torch.randint(0, 512, (1, 40))
    out = m(ids).logits
    assert out.shape == (1, 40, 512) and torch.isfinite(out).all()
    assert m.rope_cos.shape[0] == 40
    cos, _ = rope_cos_sin(40, m.config.head_dim, m.config.rope_theta)
    torch.testing.assert_close(m.rope_cos, cos)
    torch.testing.assert_close(m(ids[:, :16]).logits, out[:, :16], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_device_build_then_init(tie):
    cfg = _cfg(tie_embeddings=tie, **{"moe.num_experts": 4, "moe.shared_experts": 1})
    with torch.device("meta"):
        m = TransformerForCausalLM(cfg)
    assert m.lm_head.weight.is_meta
    m = m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie
    for n, p in m.named_parameters():
        assert torch.isfinite(p).all(), n
    assert torch.equal(m.model.norm.weight, torch.ones(cfg.d_model))
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    assert abs(m.model.layers[0].self_attn.o_proj.weight.std().item() - out_std) < 0.3 * out_std
    assert abs(m.model.layers[0].mlp.experts.down_proj.std().item() - out_std) < 0.3 * out_std
    cos, _ = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    torch.testing.assert_close(m.rope_cos, cos)
    # same seed, eager build -> identical model
    torch.manual_seed(0)
    ref = TransformerForCausalLM(cfg)
    torch.manual_seed(0)
    ref.init_weights()
    ids = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(m(ids).logits, ref(ids).logits)


def test_wrong_arch_rejected():
    with pytest.raises(ValueError, match="arch"):
        TransformerForCausalLM(ModelConfig())


def test_nope_baseline_is_the_same_network_without_rope():
    """position=none drops RoPE and nothing else: with RoPE at angle 0 (position 0 only) both agree."""
    cfg = ModelConfig.from_preset("debug-transformer")
    torch.manual_seed(0)
    rope = build_model(cfg).eval()
    nope = build_model(cfg.replace(position="none")).eval()
    nope.load_state_dict(rope.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(nope(x[:, :1]).logits, rope(x[:, :1]).logits)  # one token: RoPE is the identity
        assert (nope(x).logits - rope(x).logits).abs().max() > 1e-4
        # NoPE is permutation-equivariant in encoder mode: the only position signal is the causal mask
        enc = build_model(cfg.replace(position="none", causal=False)).eval()
        perm = torch.randperm(10)
        torch.testing.assert_close(enc(x[:, perm]).logits, enc(x).logits[:, perm], atol=1e-5, rtol=1e-5)
