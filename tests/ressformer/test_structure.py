"""SOES latent graph (ressformer/structure.py): dense reference, sparsity, equivariance, smoothness."""

import math

import pytest
import torch

from ressformer.config import ModelConfig
from ressformer.structure import Graph, LatentGraph, smoothness_penalty


def _cfg(causal=True, degree=4, chunk=5):
    return ModelConfig.from_preset("debug", **{"causal": causal, "soes.degree": degree, "soes.rank": 8,
                                               "asam.chunk_size": chunk})


def _dense(g: Graph, T: int) -> torch.Tensor:
    B = g.idx.shape[0]
    return torch.zeros(B, T, T, dtype=g.val.dtype).scatter_add(-1, g.idx, g.val)  # (B, T, T)


def _dense_reference(lg: LatentGraph, h: torch.Tensor, causal: bool) -> torch.Tensor:
    T = h.shape[1]
    s = lg.src_proj(h) @ lg.dst_proj(h).transpose(1, 2) / math.sqrt(lg.rank)  # (B, T, T)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    kth = s.topk(min(lg.degree, T), -1).values[..., -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    return torch.softmax(s, -1)


@pytest.mark.parametrize("causal", [True, False])
def test_graph_matches_dense_reference(causal):
    torch.manual_seed(0)
    lg = LatentGraph(_cfg(causal)).double()
    h = torch.randn(2, 13, 64, dtype=torch.float64, requires_grad=True)
    g = lg(h)
    assert g.idx.shape == (2, 13, 4) and g.val.shape == (2, 13, 4) and g.idx.dtype == torch.int64
    want = _dense_reference(lg, h, causal)
    got = _dense(g, 13)
    torch.testing.assert_close(got, want)
    # gradients of the sparse construction equal those of the dense one
    w = torch.randn(2, 13, 13, dtype=torch.float64)
    g1 = torch.autograd.grad((got * w).sum(), [h, lg.src_proj.weight, lg.dst_proj.weight])
    g2 = torch.autograd.grad((want * w).sum(), [h, lg.src_proj.weight, lg.dst_proj.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert g1[1].abs().sum() > 0 and g1[2].abs().sum() > 0
    torch.testing.assert_close(g.val.sum(-1), torch.ones(2, 13, dtype=torch.float64))


def _block_cfg(causal=True, degree=4, chunk=5, block=3, bpq=100, select="query"):
    return _cfg(causal, degree, chunk).replace(**{"asam.impl": "block", "asam.block_size": block,
                                                  "asam.blocks_per_query": bpq, "asam.block_select": select})


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("select", ["query", "chunk"])
def test_block_graph_equals_exact_when_blocks_cover_everything(causal, select):
    torch.manual_seed(4)
    exact = LatentGraph(_cfg(causal)).double()
    block = LatentGraph(_block_cfg(causal, select=select)).double()
    block.load_state_dict(exact.state_dict())
    h = torch.randn(2, 13, 64, dtype=torch.float64, requires_grad=True)
    a, b = _dense(exact(h), 13), _dense(block(h), 13)
    torch.testing.assert_close(b, a)
    w = torch.randn(2, 13, 13, dtype=torch.float64)
    for ga, gb in zip(torch.autograd.grad((a * w).sum(), [h, exact.src_proj.weight]),
                      torch.autograd.grad((b * w).sum(), [h, block.src_proj.weight])):
        torch.testing.assert_close(gb, ga)


@pytest.mark.parametrize("select", ["query", "chunk"])
def test_block_graph_with_few_blocks_is_sparse_causal_and_well_formed(select):
    torch.manual_seed(5)
    T = 40
    exact = LatentGraph(_cfg(True, chunk=8))
    block = LatentGraph(_block_cfg(True, chunk=8, block=4, bpq=1, select=select))
    block.load_state_dict(exact.state_dict())
    h = torch.randn(2, T, 64)
    g = block(h)
    assert not torch.equal(_dense(g, T), _dense(exact(h), T))  # some best neighbours lie in dropped blocks
    i = torch.arange(T).view(1, T, 1)
    assert (g.idx <= i).all() and (g.idx >= 0).all()
    torch.testing.assert_close(g.val.sum(-1), torch.ones(2, T))
    assert ((g.val > 0).sum(-1) == torch.tensor([1, 2, 3] + [4] * (T - 3))).all()  # own block has >= 4 visible
    for b in range(2):
        for row in range(T):
            kept = g.idx[b, row][g.val[b, row] > 0]
            assert kept.unique().numel() == kept.numel()
    for t in (6, 13, 29):  # tokens after t change: rows <= t keep their edges and values
        h2 = h.clone()
        h2[:, t + 1:] = torch.randn(2, T - t - 1, 64)
        g2 = block(h2)
        assert torch.equal(g2.idx[:, :t + 1], g.idx[:, :t + 1])
        torch.testing.assert_close(g2.val[:, :t + 1], g.val[:, :t + 1], rtol=0, atol=0)


def test_causal_spare_slots_and_visibility():
    torch.manual_seed(1)
    lg = LatentGraph(_cfg(True, degree=4))
    g = lg(torch.randn(3, 10, 64))
    i = torch.arange(10).view(1, 10, 1)
    assert (g.idx <= i).all() and (g.idx >= 0).all()
    # token i sees i + 1 tokens: the first 3 tokens have 3 - i spare slots with val exactly 0
    nnz = (g.val > 0).sum(-1)
    assert torch.equal(nnz, torch.tensor([1, 2, 3] + [4] * 7).expand(3, 10))
    for row in range(10):  # valid slots hold distinct indices
        for b in range(3):
            kept = g.idx[b, row][g.val[b, row] > 0]
            assert kept.unique().numel() == kept.numel()
    assert (g.val[:, 0, 0] == 1).all() and (g.idx[:, 0] == 0).all()


def test_permutation_equivariance_encoder():
    torch.manual_seed(2)
    lg = LatentGraph(_cfg(False, degree=5, chunk=4))
    h = torch.randn(2, 11, 64)
    perm = torch.randperm(11)
    a = _dense(lg(h), 11)
    ap = _dense(lg(h[:, perm]), 11)
    torch.testing.assert_close(ap, a[:, perm][:, :, perm])


def test_content_dependence():
    torch.manual_seed(3)
    lg = LatentGraph(_cfg(True))
    h = torch.randn(1, 16, 64)
    h2 = h.clone()
    h2[:, 3] = torch.randn(64) * 3
    a, b = _dense(lg(h), 16), _dense(lg(h2), 16)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a[:, :3], b[:, :3])  # causal: rows before the change are untouched


def test_smoothness_penalty_matches_dense_frobenius():
    torch.manual_seed(4)
    lg = LatentGraph(_cfg(True, degree=4)).double()
    h0 = torch.randn(2, 9, 64, dtype=torch.float64, requires_grad=True)
    h1 = (h0 + 0.7 * torch.randn_like(h0)).detach().requires_grad_(True)
    g0, g1 = lg(h0), lg(h1)
    pen = smoothness_penalty(g0, g1)
    dense = ((_dense(g1, 9) - _dense(g0, 9)) ** 2).sum(-1).mean()  # mean over (b, i) of row norms
    torch.testing.assert_close(pen, dense)
    assert pen > 1e-3
    ga = torch.autograd.grad(pen, [h0, h1], retain_graph=True)
    gb = torch.autograd.grad(dense, [h0, h1])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(smoothness_penalty(g0, g0), torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="same"):
        smoothness_penalty(g0, Graph(g1.idx[:, :5], g1.val[:, :5]))


# --- the attention-pattern graph (soes.graph = attention) ------------------------------------------
def test_pattern_edges_equal_dense_head_mean_top_m():
    """Equal keys of different heads are summed; memory keys dropped; the m largest positive entries kept."""
    from ressformer.attention import pattern_edges

    g = torch.Generator().manual_seed(0)
    B, H, Q, n, Tk, n_tok, m = 2, 3, 5, 6, 12, 9, 4
    key_idx = torch.stack([torch.randperm(Tk, generator=g)[:n] for _ in range(B * H * Q)]).view(B, H, Q, n)
    prob = torch.rand(B, H, Q, n, generator=g, dtype=torch.float64)
    prob[prob < 0.3] = 0.0  # exact zeros, as sparsemax gives
    prob.requires_grad_(True)
    own = torch.arange(Q)
    idx, val = pattern_edges(key_idx, prob, n_tokens=n_tok, m=m, own=own)
    dense = torch.zeros(B, Q, Tk, dtype=torch.float64).scatter_add(
        -1, key_idx.permute(0, 2, 1, 3).reshape(B, Q, H * n), prob.detach().permute(0, 2, 1, 3).reshape(B, Q, H * n) / H)
    dense[..., n_tok:] = 0
    top = dense.topk(m, -1).values
    torch.testing.assert_close(val.detach().sort(-1, descending=True).values, top.clamp(min=0))
    got = torch.zeros(B, Q, Tk, dtype=torch.float64).scatter_add(-1, idx, val.detach())
    kept = dense >= top[..., -1:]  # ties at the m-th value cannot happen with random values
    torch.testing.assert_close(got, torch.where(kept & (dense > 0), dense, torch.zeros(())))
    spare = val == 0
    assert (idx[spare] == own.view(1, -1, 1).expand_as(idx)[spare]).all()  # spare slots point at the query
    val.sum().backward()
    assert prob.grad is not None and prob.grad.abs().sum() > 0


@pytest.mark.parametrize("impl,topk", [("chunked", 0), ("chunked", 5), ("block", 0), ("block", 5)])
@pytest.mark.parametrize("activation", ["sparsemax", "softmax"])
def test_attention_pattern_of_every_impl_equals_reference(impl, topk, activation):
    from ressformer.attention import sparse_attention

    torch.manual_seed(0)
    B, H, T, D, Tm = 2, 3, 17, 8, 4
    q, k, v = (torch.randn(B, H, T + (Tm if i else 0), D, dtype=torch.float64, requires_grad=True) for i in range(3))
    q = q.detach().requires_grad_(True)
    pos = torch.arange(T)
    k_pos = torch.cat([pos, torch.tensor([3, 7, 11, 15])])  # memory keys after the tokens
    kw = dict(q_pos=pos, k_pos=k_pos, activation=activation, topk=topk, chunk_size=4, block_size=4,
              blocks_per_query=8, pattern_degree=3, pattern_keys=T)  # the kept blocks cover every key
    _, ref = sparse_attention(q, k, v, impl="reference", **kw)
    _, got = sparse_attention(q, k, v, impl=impl, **kw)
    for st in (ref, got):
        assert st["pattern"][0].shape == (B, T, 3) and (st["pattern"][0] < T).all()
        assert (st["pattern"][0] <= pos.view(1, -1, 1)).all()  # causal: edges only to earlier tokens
    dense = [torch.zeros(B, T, T, dtype=torch.float64).scatter_add(-1, *st["pattern"]) for st in (ref, got)]
    torch.testing.assert_close(dense[1], dense[0])
    gq = [torch.autograd.grad(st["pattern"][1].pow(2).sum(), q, retain_graph=True)[0] for st in (ref, got)]
    torch.testing.assert_close(gq[1], gq[0])
    assert gq[0].abs().sum() > 0  # the smoothness loss reaches the attention scores


def test_attention_graph_feeds_the_next_step_and_smoothness():
    """Step t's attention reads step t-1's pattern: with the graph scale at 0 the graph has no effect."""
    from ressformer import build_model

    cfg = ModelConfig.from_preset("debug", **{"soes.graph": "attention", "soes.degree": 4})
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    out = model(x, labels=x)
    assert out.aux_losses["soes_smooth"] > 0
    assert not hasattr(model.model.layers[0], "graph") or model.model.layers[0].graph is None  # no scorer
    with torch.no_grad():
        model.model.layers[0].self_attn.graph_scale.zero_()
        off = model(x).logits
        no_soes = build_model(cfg.replace(**{"soes.enabled": False}))
        no_soes.load_state_dict({k: v for k, v in model.state_dict().items() if "graph_scale" not in k})
        torch.testing.assert_close(off, no_soes(x).logits)
