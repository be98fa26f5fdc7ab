"""ReSSFormer model acceptance tests: causality, parity, equivariance, gradients, K, ablations, init."""

import itertools
import time

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ressformer import build_model
from ressformer.config import ModelConfig
from ressformer.recurrence import sample_num_steps

TINY = {
    "vocab_size": 64, "d_model": 32, "n_heads": 2, "ffn_hidden": 64, "max_seq_len": 32,
    "r2mu.steps": 3, "r2mu.n_prelude": 1, "r2mu.n_coda": 1, "r2mu.cache_window": 4, "r2mu.segment_len": 4,
    "r2mu.summary_slots": 2,
    "asam.topk": 4, "asam.impl": "chunked", "asam.chunk_size": 4, "asam.block_size": 4, "asam.blocks_per_query": 2,
    "moe.num_experts": 4, "moe.experts_per_token": 2, "moe.shared_experts": 1,
    "soes.rank": 4, "soes.degree": 3,
}


def tiny(**over) -> ModelConfig:
    return ModelConfig.from_preset("debug", **{**TINY, **over})


def build(cfg: ModelConfig, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype)


def tokens(B: int, T: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


# --- causality ----------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,topk,impl", list(itertools.product(
    ["softmax", "sparsemax", "entmax15"], [0, 4], ["reference", "chunked", "block"])))
def test_causality_every_attention_variant(activation, topk, impl):
    cfg = tiny(**{"asam.activation": activation, "asam.topk": topk, "asam.impl": impl})
    model = build(cfg, dtype=torch.float64).eval()  # float64: expert batching may reorder float32 sums
    x = tokens(2, 14)
    t = 8
    y = x.clone()
    y[:, t + 1] = (y[:, t + 1] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # the change is seen downstream


@pytest.mark.parametrize("topk", [0, 4])
@pytest.mark.parametrize("select", ["query", "chunk"])
def test_causality_block_selection_over_a_long_context(topk, select):
    """Block ASAM and the block-restricted SOES graph with few kept blocks: token t+1 must not reach t through
    which blocks the query chunk of t selects (T = 40, chunks of 8 queries, blocks of 4 keys, 1 block kept)."""
    cfg = tiny(**{"max_seq_len": 48, "asam.impl": "block", "asam.topk": topk, "asam.chunk_size": 8,
                  "asam.block_size": 4, "asam.blocks_per_query": 1, "asam.block_select": select})
    model = build(cfg, dtype=torch.float64).eval()
    x = tokens(2, 40)
    with torch.no_grad():
        a = model(x).logits
        for t in (5, 12, 26):
            y = x.clone()
            y[:, t + 1:] = (y[:, t + 1:] + 7) % cfg.vocab_size
            b = model(y).logits
            torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
            assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


# --- efficient == reference ---------------------------------------------------------------------
@pytest.mark.parametrize("activation,topk", [("softmax", 4), ("softmax", 0), ("sparsemax", 4), ("entmax15", 0)])
def test_chunked_equals_reference_logits_and_grads(activation, topk):
    ref_cfg = tiny(**{"asam.impl": "reference", "asam.activation": activation, "asam.topk": topk})
    ref = build(ref_cfg, dtype=torch.float64)
    fast = build(ref_cfg.replace(**{"asam.impl": "chunked"}), seed=5, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    x = tokens(2, 13)
    outs = []
    for m in (ref, fast):
        out = m(x, labels=x)
        out.loss.backward()
        outs.append((out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-9)
    for n, g in outs[0][2].items():
        torch.testing.assert_close(g, outs[1][2][n], rtol=1e-7, atol=1e-9, msg=lambda s: f"{n}: {s}")


# --- no positional encoding; permutation equivariance in encoder mode -----------------------------
def test_no_positional_parameters():
    model = build(tiny())
    names = [n for n, _ in itertools.chain(model.named_parameters(), model.named_buffers())]
    bad = {"pos", "rope", "position", "positional", "wpe", "freqs", "inv_freq"}
    offending = [n for n in names if bad & set(n.replace(".", "_").split("_"))]
    assert not offending, offending


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_permutation_equivariance_encoder_mode(impl):
    cfg = tiny(causal=False, **{"asam.impl": impl})
    assert cfg.r2mu.memory and cfg.soes.enabled and cfg.moe.num_experts > 1
    model = build(cfg, dtype=torch.float64).eval()
    x = tokens(2, 11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, out_p = model(x), model(x[:, perm])
    torch.testing.assert_close(out.logits[:, perm], out_p.logits, rtol=1e-9, atol=1e-9)
    # the causal model is not equivariant (the check above is not vacuous)
    causal = build(tiny(**{"asam.impl": impl}), dtype=torch.float64).eval()
    with torch.no_grad():
        assert not torch.allclose(causal(x).logits[:, perm], causal(x[:, perm]).logits)


# --- gradients ----------------------------------------------------------------------------------
def test_gradients_reach_every_parameter():
    cfg = tiny()
    model = build(cfg)
    x = tokens(4, 16)
    out = model(x, labels=x)
    assert set(out.aux_losses) == {"moe_balance", "moe_z", "soes_smooth"}
    assert all(torch.isfinite(v) for v in out.aux_losses.values())
    assert "r2mu_gate_step1" in out.diagnostics and "attn_density" in out.diagnostics
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_labels_minus_100_ignored():
    model = build(tiny())
    x = tokens(2, 12)
    lab = x.clone()
    lab[:, 5:] = -100
    lm = model(x, labels=lab).lm_loss
    logits = model(x).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 64), x[:, 1:5].reshape(-1))
    torch.testing.assert_close(lm, ref)


# --- recurrent depth K --------------------------------------------------------------------------
def test_num_steps_at_inference_and_param_count():
    model = build(tiny()).eval()
    x = tokens(2, 12)
    with torch.no_grad():
        outs = {k: model(x, num_steps=k).logits for k in (1, 3, 8)}
    assert all(torch.isfinite(o).all() for o in outs.values())
    assert not torch.allclose(outs[1], outs[3]) and not torch.allclose(outs[3], outs[8])
    assert "r2mu_gate_step7" in model(x, num_steps=8).diagnostics
    assert build(tiny(**{"r2mu.steps": 2})).num_params() == build(tiny(**{"r2mu.steps": 8})).num_params()


def test_sample_num_steps_deterministic():
    fixed = tiny()
    assert all(sample_num_steps(fixed, s, 0) == 3 for s in range(20))
    uni = tiny(**{"r2mu.step_sampling": "uniform", "r2mu.min_steps": 2, "r2mu.max_steps": 6})
    a = [sample_num_steps(uni, s, seed=7) for s in range(200)]
    assert a == [sample_num_steps(uni, s, seed=7) for s in range(200)]
    assert a != [sample_num_steps(uni, s, seed=8) for s in range(200)]
    assert set(a) == {2, 3, 4, 5, 6}
    poi = tiny(**{"r2mu.step_sampling": "poisson", "r2mu.steps": 4, "r2mu.min_steps": 1, "r2mu.max_steps": 12})
    b = [sample_num_steps(poi, s, seed=1) for s in range(2000)]
    assert b == [sample_num_steps(poi, s, seed=1) for s in range(2000)]
    assert min(b) >= 1 and max(b) <= 12 and abs(sum(b) / len(b) - 4.0) < 0.25
    off = tiny(**{"r2mu.enabled": False, "r2mu.step_sampling": "uniform"})
    assert sample_num_steps(off, 5, 0) == off.r2mu.steps


# --- ablations ----------------------------------------------------------------------------------
def _transfer(src, dst):
    """Copy every tensor whose key and shape exist in dst; returns the number of keys not copied."""
    sd, own = src.state_dict(), dst.state_dict()
    common = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    dst.load_state_dict(common, strict=False)
    return len(own) - len(common)


@pytest.mark.parametrize("switch", [
    {"r2mu.enabled": False}, {"r2mu.memory": False}, {"asam.topk": 0}, {"asam.activation": "softmax"},
    {"moe.num_experts": 1}, {"soes.enabled": False}, {"soes.graph": "bilinear"}])
def test_each_ablation_switch_changes_the_computation(switch):
    full = build(tiny()).eval()
    abl = build(tiny(**switch), seed=0).eval()
    _transfer(full, abl)
    x = tokens(2, 16)
    with torch.no_grad():
        a, b = full(x).logits, abl(x).logits
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-4, switch


def test_r2mu_off_with_copied_core_equals_shared_block_without_memory():
    """The ablation unrolls exactly the shared loop: copying the core into each distinct block reproduces it."""
    shared = build(tiny(**{"r2mu.memory": False})).eval()
    unrolled = build(tiny(**{"r2mu.enabled": False}), seed=1).eval()
    sd = shared.state_dict()
    new = {}
    K, P = 3, 1
    for k, v in sd.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            rest = k.split(".", 3)[3]
            if i < P:
                new[k] = v
            elif i == P:
                for t in range(K):
                    new[f"model.layers.{P + t}.{rest}"] = v
            else:
                new[f"model.layers.{i + K - 1}.{rest}"] = v
        else:
            new[k] = v
    unrolled.load_state_dict(new, strict=True)
    x = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(shared(x).logits, unrolled(x).logits)
    assert unrolled.num_params() > shared.num_params()


# --- training behaviour -------------------------------------------------------------------------
def test_debug_model_overfits_a_fixed_batch():
    cfg = ModelConfig.from_preset("debug")
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(4, 64, cfg.vocab_size)
    losses = []
    t0 = time.perf_counter()
    for _ in range(40):
        out = model(x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    print(f"overfit: lm loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - t0:.1f}s")
    assert losses[-1] < 0.5 * losses[0]


def test_checkpointing_gives_identical_loss_and_grads():
    cfg = tiny()
    model = build(cfg)
    x = tokens(2, 12)

    def run():
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    l0, g0 = run()
    calls = []

    def ckpt(fn, *args):
        calls.append(1)
        return checkpoint(fn, *args, use_reentrant=False)

    for every in (1, 2):
        calls.clear()
        model.set_checkpointing(ckpt, every=every)
        l1, g1 = run()
        assert len(calls) == (5 if every == 1 else 3)  # prelude + 3 steps + coda units
        assert torch.equal(l0, l1)
        for n in g0:
            torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0, msg=lambda s: f"{n}: {s}")
    model.set_checkpointing(None)
    assert torch.equal(run()[0], l0)


def test_meta_device_build_then_init():
    for over in ({}, {"tie_embeddings": True}):
        cfg = tiny(**over)
        with torch.device("meta"):
            model = build_model(cfg)
        assert all(p.is_meta for p in model.parameters())
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        ref = build(cfg, seed=0)
        assert model.num_params() == ref.num_params()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.isfinite(p).all(), n
            # same distribution family: norms are ones, stds comparable
            if p.numel() > 16:
                assert abs(p.float().std().item() - q.float().std().item()) < 0.5 * q.float().std().item() + 1e-6, n
        out = model(tokens(2, 12), labels=tokens(2, 12))
        assert torch.isfinite(out.loss)
    tied = build(tiny(tie_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("impl", ["reference", "chunked", "block"])
def test_bf16_model_is_close_to_fp32(impl):
    """Weights and activations in bf16, attention scores / probabilities / router / loss in float32: the logits
    stay within bf16 rounding of the fp32 model's, and the loss is finite."""
    cfg = tiny(**{"asam.impl": impl, "asam.activation": "entmax15"})
    m32, m16 = build(cfg), build(cfg, dtype=torch.bfloat16)
    x = tokens(2, 16)
    with torch.no_grad():
        o32, o16 = m32(x, labels=x), m16(x, labels=x)
    assert o16.logits.dtype == torch.bfloat16 and torch.isfinite(o16.loss)
    rel = (o16.logits.float() - o32.logits).norm() / o32.logits.norm()
    assert rel < 3e-2, rel
    assert abs(o16.lm_loss.item() - o32.lm_loss.item()) < 2e-2
