"""ASAM attention (ressformer/attention.py): every fast path equals the reference, causality, memory."""


import pytest
import torch
import torch.nn.functional as F

from ressformer.attention import ASAMAttention, sparse_attention
from ressformer.config import ModelConfig
from ressformer.selection import UNBOUNDED_WINDOW, block_candidates, max_kept_blocks, run_local_blocks

ACTS = ("softmax", "sparsemax", "entmax15")
FAST = {"chunked": dict(impl="chunked", chunk_size=7),
        "block": dict(impl="block", chunk_size=7, block_size=5, blocks_per_query=100)}


def _problem(seed, B=2, H=3, T=23, D=8, Tm=0, m=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Tk = T + Tm
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_(True)
    k = torch.randn(B, H, Tk, D, generator=g, dtype=dtype).requires_grad_(True)
    v = torch.randn(B, H, Tk, D, generator=g, dtype=dtype).requires_grad_(True)
    q_pos = torch.arange(T)
    k_pos = torch.cat([torch.arange(T), torch.randint(0, T, (Tm,), generator=g)])
    k_window = None
    if Tm:
        k_window = torch.cat([torch.full((T,), UNBOUNDED_WINDOW), torch.randint(1, 6, (Tm,), generator=g)])
    # graph edges: distinct visible token keys (j <= i), like LatentGraph's output
    idx = torch.stack([torch.stack([torch.randperm(i + 1, generator=g)[:1].expand(m) if i < m - 1 else
                                    torch.randperm(i + 1, generator=g)[:m] for i in range(T)]) for _ in range(B)])
    val = torch.rand(B, T, m, generator=g, dtype=dtype).requires_grad_(True)
    gs = (torch.rand(H, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    return dict(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, k_window=k_window, graph=(idx, val), graph_scale=gs)


def _run(p, with_graph=True, **kw):
    out, stats = sparse_attention(p["q"], p["k"], p["v"], q_pos=p["q_pos"], k_pos=p["k_pos"], k_window=p["k_window"],
                                  graph=p["graph"] if with_graph else None,
                                  graph_scale=p["graph_scale"] if with_graph else None, **kw)
    leaves = [p["q"], p["k"], p["v"]] + ([p["graph"][1], p["graph_scale"]] if with_graph else [])
    w = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)  # a fixed, non-uniform cotangent
    grads = torch.autograd.grad((out * w).sum(), leaves)
    return out.detach(), [g.detach() for g in grads], stats


def _run_nograd(p, **kw):
    return sparse_attention(p["q"], p["k"], p["v"], q_pos=p["q_pos"], k_pos=p["k_pos"], k_window=p["k_window"],
                            graph=p["graph"], graph_scale=p["graph_scale"], **kw)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("topk", [0, 5])
@pytest.mark.parametrize("Tm", [0, 9])
def test_fast_paths_equal_reference(activation, causal, topk, Tm):
    p = _problem(seed=ACTS.index(activation) * 8 + 4 * causal + 2 * bool(topk) + bool(Tm), Tm=Tm)
    kw = dict(causal=causal, activation=activation, topk=topk)
    ref_out, ref_grads, ref_stats = _run(p, impl="reference", **kw)
    fast_paths = {f"{name} {attend}": dict(fast, attend=attend) for name, fast in FAST.items()
                  for attend in (("dense", "gather") if topk else ("auto",))}
    if causal:  # chunks over the tokens they can see (the memory keys, outside the run, stay candidates)
        fast_paths.update({f"chunked key_runs {attend}": dict(FAST["chunked"], attend=attend, key_runs=((0, 23, None),))
                           for attend in (("dense", "gather") if topk else ("auto",))})
    for name, fast in fast_paths.items():
        out, grads, stats = _run(p, **fast, **kw)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10, msg=f"{name} forward")
        for i, (g, gr) in enumerate(zip(grads, ref_grads)):
            torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-10, msg=f"{name} grad {i}")
        torch.testing.assert_close(stats["density"], ref_stats["density"])
        with torch.no_grad():  # no gradient wanted: the top-k gather runs per chunk instead of once
            out_ng, stats_ng = _run_nograd(p, **fast, **kw)
        torch.testing.assert_close(out_ng, ref_out, rtol=1e-9, atol=1e-10, msg=f"{name} no-grad forward")
        torch.testing.assert_close(stats_ng["density"], ref_stats["density"])
    assert 0 < float(ref_stats["density"]) <= 1
    if topk or activation != "softmax":
        assert float(ref_stats["density"]) < 1


@pytest.mark.parametrize("documents", [False, True])
def test_key_runs_leave_out_only_keys_a_chunk_cannot_see(documents):
    """key_runs (ASAMAttention.key_runs: tokens, then R2MU's token cache with its window, then summaries): each
    chunk computes over the tokens before its end and the cache entries within the window of its queries. Against
    every key: outputs and gradients to fp64 rounding, the same density and SOES pattern, for each top-k pass and
    top-k from every key kept (0) through fewer candidates than top-k in the first chunks (24, 40), with per-sample
    document positions too."""
    from ressformer.selection import document_positions

    g = torch.Generator().manual_seed(11)
    B, H, T, D, W, m = 2, 2, 40, 8, 6, 3
    if documents:  # documents of 13, 15 and 12 tokens in row 0, one document in row 1
        pos = document_positions(torch.tensor([[0] * 13 + [1] * 15 + [2] * 12, [0] * T]))
        seg_end = pos.gather(1, torch.tensor([[9, 19, 29], [9, 19, 29]])).repeat_interleave(2, dim=1)
    else:
        pos = torch.arange(T)
        seg_end = torch.tensor([9, 9, 19, 19, 29, 29])
    cat = lambda *t: torch.cat([x.expand(B, -1) if documents and x.dim() == 1 else x for x in t], dim=-1)  # noqa
    k_pos = cat(pos, pos, seg_end)
    k_win = cat(torch.full((T,), UNBOUNDED_WINDOW), torch.full((T,), W), torch.full((6,), UNBOUNDED_WINDOW))
    Tk = 2 * T + 6
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (T, Tk, Tk))
    idx = torch.minimum(torch.randint(0, T, (B, T, m), generator=g), torch.arange(T)[None, :, None])
    graph = (idx, torch.rand(B, T, m, generator=g, dtype=torch.float64, requires_grad=True))
    gs = torch.rand(H, generator=g, dtype=torch.float64) + 0.5
    w = torch.cos(torch.arange(B * H * T * D, dtype=torch.float64)).view(B, H, T, D)
    for topk in (0, 4, 12, 24, 40):
        for attend in ("dense", "gather") if topk else ("auto",):
            for activation in ("sparsemax", "softmax"):
                runs = []
                for key_runs in (None, ((0, T, None), (T, T, W))):
                    out, st = sparse_attention(q, k, v, q_pos=pos, k_pos=k_pos, k_window=k_win, graph=graph,
                                               graph_scale=gs, activation=activation, topk=topk, chunk_size=8,
                                               attend=attend, pattern_degree=m, key_runs=key_runs,
                                               q_index=torch.arange(T) if documents else None)
                    loss = (out * w).sum() + st["pattern"][1].sum()
                    runs.append((out, torch.autograd.grad(loss, (q, k, v, graph[1])), st))
                (o1, g1, s1), (o2, g2, s2) = runs
                msg = f"topk {topk} {attend} {activation}"
                torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12, msg=msg)
                for a, b in zip(g2, g1):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=msg)
                assert torch.equal(s2["pattern"][0], s1["pattern"][0]), msg
                torch.testing.assert_close(s2["pattern"][1], s1["pattern"][1], rtol=1e-12, atol=1e-12)
                assert s2["nnz"] == s1["nnz"] and s2["visible"] == s1["visible"], msg
    from ressformer.attention import _run_spans  # what a chunk computes over: queries 8..15 see tokens 0..15, cache
    assert _run_spans(((0, T, None), (T, T, W)), 8, 16, Tk) == ((0, 16), (43, 56), (80, 86))  # 3..15, summaries
    assert _run_spans(((0, T, None), (T, T, W)), 0, 8, Tk) == ((0, 8), (40, 48), (80, 86))
    with pytest.raises(ValueError, match="key_runs need impl='chunked' and causal"):
        sparse_attention(q, k, v, q_pos=pos, k_pos=k_pos, k_window=k_win, causal=False, key_runs=((0, T, None),))
    with pytest.raises(ValueError, match="must lie in the 86 keys"):
        sparse_attention(q, k, v, q_pos=pos, k_pos=k_pos, k_window=k_win, key_runs=((0, T, None), (10, T, W)))


def test_edge_slots_match_brute_force_candidate_lookup():
    from ressformer.attention import _edge_slots

    g = torch.Generator().manual_seed(3)
    B, H, c, m, bs, nb, n_sel = 2, 3, 5, 4, 4, 9, 3
    Tk = nb * bs - 2  # a partial last block
    blocks = torch.stack([torch.stack([torch.randperm(nb, generator=g)[:n_sel] for _ in range(H)]) for _ in range(B)])
    e = torch.randint(0, Tk, (B, H, c, m), generator=g)
    cand = (blocks[..., None] * bs + torch.arange(bs)).flatten(2)  # (B, H, n_sel * bs)
    got = _edge_slots(e, blocks, bs)
    for b, h, i, j in torch.cartesian_prod(*(torch.arange(n) for n in (B, H, c, m))).tolist():
        where = (cand[b, h] == e[b, h, i, j]).nonzero().flatten().tolist()
        assert got[b, h, i, j].item() == (where[0] if where else -1)
    assert (got >= 0).any() and (got == -1).any()


@pytest.mark.parametrize("activation", ACTS)
def test_block_mixed_dense_and_topk_chunks_equal_per_chunk_calls(activation, monkeypatch):
    """Chunks whose (static) candidate set is <= topk run dense, the others' top-k gradient pass is batched after the
    loop: the assembled output and every gradient equal calling sparse_attention on one query chunk at a time."""
    import ressformer.attention as attn

    p = _problem(seed=21, T=23, Tm=0)
    idx, val = p["graph"]
    # the keys are one run: <= 2 local blocks per chunk of 3 positions; + 1 block per query: chunks of 3 queries
    # have 5 candidate blocks (20 keys, top-k), the last chunk of 2 queries 4 (16 keys, dense)
    kw = dict(k_pos=p["k_pos"], activation=activation, topk=16, impl="block", chunk_size=3, block_size=4,
              blocks_per_query=1, local_blocks=run_local_blocks(3, 4), graph_scale=p["graph_scale"], attend="gather")
    calls = {"dense": 0, "gathered": 0}
    for name, key in (("_dense_chunk", "dense"), ("_gathered_attend", "gathered")):
        f = getattr(attn, name)
        monkeypatch.setattr(attn, name, lambda *a, _f=f, _k=key, **kw: (calls.__setitem__(_k, calls[_k] + 1),
                                                                       _f(*a, **kw))[1])
    leaves = [p["q"], p["k"], p["v"], val, p["graph_scale"]]
    out, _ = sparse_attention(p["q"], p["k"], p["v"], q_pos=p["q_pos"], graph=(idx, val), **kw)
    assert calls["dense"] > 0 and calls["gathered"] == 1, calls
    w = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    parts = [sparse_attention(p["q"][:, :, s0:s0 + 3], p["k"], p["v"], q_pos=p["q_pos"][s0:s0 + 3],
                              graph=(idx[:, s0:s0 + 3], val[:, s0:s0 + 3]), **kw)[0] for s0 in range(0, 23, 3)]
    ref = torch.cat(parts, dim=2)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, gr in zip(grads, ref_grads):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)


def test_graph_bias_changes_output_and_gets_gradient():
    p = _problem(seed=3)
    a, grads, _ = _run(p, impl="chunked", chunk_size=4, topk=5)
    b, _, _ = _run(p, with_graph=False, impl="chunked", chunk_size=4, topk=5)
    assert (a - b).abs().max() > 1e-3
    assert grads[3].abs().sum() > 0 and grads[4].abs().sum() > 0


@pytest.mark.parametrize("impl", ["reference", "chunked", "block"])
def test_topk_geq_T_equals_sdpa_causal(impl):
    p = _problem(seed=5, T=19, dtype=torch.float32)
    out, _ = sparse_attention(p["q"], p["k"], p["v"], q_pos=p["q_pos"], k_pos=p["k_pos"], topk=19, impl=impl,
                              chunk_size=6, block_size=4, blocks_per_query=5)  # 5 blocks: all covered
    want = F.scaled_dot_product_attention(p["q"], p["k"], p["v"], is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("impl,extra", [("reference", {}), ("chunked", dict(chunk_size=5)),
                                        ("block", dict(chunk_size=5, block_size=4, blocks_per_query=1))])
@pytest.mark.parametrize("topk", [0, 4])
def test_causality(activation, impl, extra, topk):
    p = _problem(seed=7, T=17, Tm=0)
    kw = dict(q_pos=p["q_pos"], k_pos=p["k_pos"], causal=True, activation=activation, topk=topk, impl=impl,
              graph=p["graph"], graph_scale=p["graph_scale"], **extra)
    with torch.no_grad():
        base, _ = sparse_attention(p["q"], p["k"], p["v"], **kw)
        for t in (0, 6, 15):
            k2, v2 = p["k"].clone(), p["v"].clone()
            k2[:, :, t + 1:] += 10 * torch.randn_like(k2[:, :, t + 1:])
            v2[:, :, t + 1:] += 10 * torch.randn_like(v2[:, :, t + 1:])
            out, _ = sparse_attention(p["q"], k2, v2, **kw)
            torch.testing.assert_close(out[:, :, :t + 1], base[:, :, :t + 1], rtol=0, atol=1e-12)
            assert (out[:, :, t + 1:] - base[:, :, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("topk", [0, 3])
@pytest.mark.parametrize("select", ["query", "chunk"])
def test_block_selection_is_causal_in_queries_and_keys(activation, topk, select):
    """Few blocks over a long context: the blocks a query keeps depend on its own query (select=query) or the
    chunk's earliest query (select=chunk) and on past keys only, never on a later query of the same chunk (a
    choice by the max over the chunk's queries would leak the future)."""
    p = _problem(seed=17, T=40, Tm=0)
    kw = dict(q_pos=p["q_pos"], k_pos=p["k_pos"], activation=activation, topk=topk, impl="block", chunk_size=8,
              block_size=4, blocks_per_query=1, block_select=select, graph=p["graph"], graph_scale=p["graph_scale"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base, _ = sparse_attention(p["q"], p["k"], p["v"], **kw)
        full, _ = sparse_attention(p["q"], p["k"], p["v"], **{**kw, "impl": "reference"})
        assert (base - full).abs().max() > 1e-3  # the selection really drops blocks
        for t in (3, 9, 17, 30):
            q2, k2, v2 = (x.clone() for x in (p["q"], p["k"], p["v"]))
            for x in (q2, k2, v2):
                x[:, :, t + 1:] = 10 * torch.randn(x[:, :, t + 1:].shape, generator=g, dtype=x.dtype)
            out, _ = sparse_attention(q2, k2, v2, **kw)
            torch.testing.assert_close(out[:, :, :t + 1], base[:, :, :t + 1], rtol=0, atol=1e-12)


def _documented_blocks(q_c, kbar, bmin, bmax, qp_c, bpq, select):
    """block_candidates' rule, one query at a time (causal, no key windows): query i keeps the visible blocks that
    overlap its chunk's positions (local) and, of its other visible blocks, the bpq best by q . kbar (select=query:
    its own scores; select=chunk: the chunk's earliest query's, over blocks local to no query of the chunk)."""
    B, H, c, _ = q_c.shape
    nb = kbar.shape[2]
    lo_c, hi_c = int(qp_c.min()), int(qp_c.max())
    out = torch.zeros(B, H, c, nb, dtype=torch.bool)
    i0 = int(qp_c.argmin())
    any_local = {b for b in range(nb) if int(bmin[b]) <= hi_c and int(bmax[b]) >= lo_c}
    for b_ in range(B):
        for h in range(H):
            for i in range(c):
                qp = int(qp_c[i])
                vis = [b for b in range(nb) if int(bmin[b]) <= qp]
                local = [b for b in vis if b in any_local]
                if select == "query":
                    scores = {b: float(q_c[b_, h, i] @ kbar[b_, h, b]) for b in vis if b not in local}
                else:
                    vis0 = [b for b in range(nb) if int(bmin[b]) <= int(qp_c[i0])]
                    scores = {b: float(q_c[b_, h, i0] @ kbar[b_, h, b]) for b in vis0 if b not in any_local}
                best = sorted(scores, key=scores.get, reverse=True)[:bpq]
                for b in local + [b for b in best if b in vis]:
                    out[b_, h, i, b] = True
    return out


def test_block_select_chunk_bounds_the_union_and_equals_query_for_one_query_chunks():
    """select=chunk: one choice per chunk, so the union of the kept blocks is blocks_per_query + local blocks, where
    per-query choices over a long context spread over many more; with one-query chunks the two are the same. The
    candidates have the static size max_kept_blocks (the union padded with unkept blocks), with or without a bound
    on the local blocks."""
    from ressformer.selection import block_summaries

    p = _problem(seed=23, T=256, Tm=0)
    q, k, pos = p["q"], p["k"], p["q_pos"]
    bs, bpq, c = 4, 2, 16
    for local_blocks in (run_local_blocks(c, bs), None):  # the keys are one run (positions 0..255); any layout
        kb = block_summaries(k.detach(), pos, None, bs, local_blocks)
        kbar, bmin, bmax = kb.mean, kb.pos_min, kb.pos_max
        unions = {}
        for select in ("query", "chunk"):
            sizes = []
            for s0 in range(0, 256, c):
                _, valid, blocks = block_candidates(q.detach()[:, :, s0:s0 + c], pos[s0:s0 + c], kb, causal=True,
                                                    blocks_per_query=bpq, select=select)
                assert blocks.shape[-1] == max_kept_blocks(kb, c, bpq, select)
                # the blocks each query uses == the documented rule, by a plain loop over queries
                used = valid.view(*valid.shape[:3], -1, bs).any(-1)  # (B, H, c, n_sel)
                got = torch.zeros(*used.shape[:3], kbar.shape[2], dtype=torch.bool)
                got.scatter_(-1, blocks[:, :, None, :].expand_as(used), used)  # (B, H, c, nb)
                want = _documented_blocks(q.detach()[:, :, s0:s0 + c], kbar, bmin, bmax, pos[s0:s0 + c], bpq,
                                          select)
                assert torch.equal(got, want), (select, s0)
                sizes.append(int(got.any(2).sum(-1).max()))  # the union of the blocks the chunk's queries keep
            unions[select] = sizes
        local = c // bs  # chunk-aligned blocks: the chunk's own positions cover c / bs blocks
        assert max(unions["chunk"]) <= bpq + local
        assert max(unions["query"]) > bpq + local  # the queries of a chunk disagree on this random problem
    # the static sizes: the bound (5 local blocks for 16 positions in blocks of 4, at the worst offset) + the kept
    # ones, capped by the 64 blocks there are
    assert max_kept_blocks(kb._replace(local_blocks=5), c, bpq, "chunk") == 5 + bpq
    assert max_kept_blocks(kb._replace(local_blocks=5), c, bpq, "query") == 5 + c * bpq
    assert max_kept_blocks(kb, c, bpq, "chunk") == 64
    kw = dict(q_pos=pos, k_pos=pos, impl="block", chunk_size=1, block_size=bs, blocks_per_query=bpq, topk=3,
              graph=p["graph"], graph_scale=p["graph_scale"])
    with torch.no_grad():
        a, _ = sparse_attention(p["q"], p["k"], p["v"], block_select="query", **kw)
        b, _ = sparse_attention(p["q"], p["k"], p["v"], block_select="chunk", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("impl", ["reference", "chunked", "block"])
@pytest.mark.parametrize("topk", [0, 3])
def test_no_visible_key_gives_zeros_and_finite_grads(activation, impl, topk):
    p = _problem(seed=11, T=13)
    k_pos = p["k_pos"] + 2  # queries 0 and 1 see no key
    out, _ = sparse_attention(p["q"], p["k"], p["v"], q_pos=p["q_pos"], k_pos=k_pos, activation=activation,
                              topk=topk, impl=impl, chunk_size=4, block_size=4, blocks_per_query=2)
    assert torch.isfinite(out).all()
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:].abs().sum(-1) > 0).all()
    gq, gk, gv = torch.autograd.grad(out.sum(), [p["q"], p["k"], p["v"]])
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert (gq[:, :, :2] == 0).all()


@pytest.mark.parametrize("activation", ACTS)
def test_block_with_few_blocks_keeps_local_window_exact(activation):
    # sliding window of 4 < block_size: every visible key lies in a local block, so even with
    # blocks_per_query=1 the block path equals the reference exactly
    p = _problem(seed=13, T=41, Tm=0)
    win = torch.full((41,), 4)
    kw = dict(q_pos=p["q_pos"], k_pos=p["k_pos"], k_window=win, activation=activation, topk=0)
    ref, _ = sparse_attention(p["q"], p["k"], p["v"], impl="reference", **kw)
    blk, st = sparse_attention(p["q"], p["k"], p["v"], impl="block", chunk_size=8, block_size=8,
                               blocks_per_query=1, **kw)
    torch.testing.assert_close(blk, ref, rtol=1e-9, atol=1e-10)
    # and with few blocks over a full causal context it differs from exact attention (it really is sparse)
    far, _ = sparse_attention(p["q"], p["k"], p["v"], q_pos=p["q_pos"], k_pos=p["k_pos"], impl="block",
                              chunk_size=8, block_size=4, blocks_per_query=1, activation=activation)
    full, _ = sparse_attention(p["q"], p["k"], p["v"], q_pos=p["q_pos"], k_pos=p["k_pos"], impl="reference",
                               activation=activation)
    assert (far - full).abs().max() > 1e-6


def test_module_memory_keys_and_contract():
    cfg = ModelConfig.from_preset("debug", **{"asam.impl": "chunked", "asam.topk": 6, "asam.chunk_size": 5,
                                              "asam.activation": "entmax15"})
    torch.manual_seed(0)
    attn = ASAMAttention(cfg).double()
    assert set(n for n, _ in attn.named_parameters()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                          "o_proj.weight", "graph_scale"}
    assert torch.equal(attn.graph_scale.detach(), torch.ones(cfg.n_heads, dtype=torch.float64))
    B, T, Tm, D, m = 2, 12, 5, cfg.d_model, 3
    x = torch.randn(B, T, D, dtype=torch.float64)
    mem = (torch.randn(B, Tm, D, dtype=torch.float64), torch.tensor([0, 3, 5, 8, 11]), torch.tensor([2, 4, 1, 3, 100]))
    idx = torch.stack([torch.arange(T).clamp(max=T - 1 - r).minimum(torch.arange(T)) for r in range(m)], -1)
    graph = (idx.expand(B, T, m), torch.full((B, T, m), 1.0 / m, dtype=torch.float64))
    y, stats = attn(x, torch.arange(T), memory=mem, graph=graph)
    assert y.shape == (B, T, D) and 0 < float(stats["density"]) < 1
    # the same computation written out: memory keys come from the same k_proj / v_proj, appended after tokens
    H, hd = cfg.n_heads, cfg.head_dim
    kv = torch.cat([x, mem[0]], 1)
    q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attn.k_proj(kv).view(B, T + Tm, H, hd).transpose(1, 2)
    v = attn.v_proj(kv).view(B, T + Tm, H, hd).transpose(1, 2)
    out, _ = sparse_attention(q, k, v, q_pos=torch.arange(T), k_pos=torch.cat([torch.arange(T), mem[1]]),
                              k_window=torch.cat([torch.full((T,), 10**9), mem[2]]), activation="entmax15", topk=6,
                              graph=graph, graph_scale=attn.graph_scale, impl="reference")
    torch.testing.assert_close(y, attn.o_proj(out.transpose(1, 2).reshape(B, T, D)))
    no_soes = ASAMAttention(cfg.replace(**{"soes.enabled": False}))
    assert no_soes.graph_scale is None
    with pytest.raises(ValueError, match="graph_scale"):
        no_soes(x.float(), torch.arange(T), graph=(graph[0], graph[1].float()))


def _saved_bytes(impl: str, T: int) -> int:
    """Bytes autograd saves for backward (distinct storages) in one forward of ASAM at length T."""
    torch.manual_seed(0)
    B, H, D = 1, 2, 16
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, H, T, D, requires_grad=True)
    v = torch.randn(B, H, T, D, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = sparse_attention(q, k, v, q_pos=torch.arange(T), k_pos=torch.arange(T), topk=16, impl=impl,
                                  chunk_size=512, block_size=256, blocks_per_query=2)
    out.square().sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    return sum(seen.values())


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("impl", ["chunked", "block"])
def test_long_context_saved_memory_is_linear(impl):
    small, big = _saved_bytes(impl, 4096), _saved_bytes(impl, 16384)
    ratio = big / small
    print(f"{impl}: saved-for-backward bytes T=4096 {small:,}  T=16384 {big:,}  ratio {ratio:.2f}")
    quadratic = 2 * 16384 * 16384 * 4  # (H, T, T) float32 scores that a dense implementation would save
    assert big < quadratic / 20
    assert 3.0 < ratio < 5.0, ratio


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_debug_model_fwd_bwd_at_16k_tokens_in_bounded_memory():
    """The whole debug model (block ASAM with the chunk's shared block choice, the long-context setting; R2MU memory,
    SOES, MoE) at T=16384 on CPU: peak RSS stays ~linear.

    Measured by bench/long_context.py (bench/RESULTS.md): ~1.7 GiB above the start at T=16384; the reference
    path already needs ~1.8 GiB at T=2048. glibc's adaptive mmap threshold is pinned so the number is the
    model's, not the allocator's retention (see the bench's docstring). Per-query block choice takes longer (its
    candidates are padded to a static bound: 21.8 s at T=8192 on one thread against 13.5 s for this setting at
    T=16384); its saved-for-backward bytes are checked linear in T above.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import long_context

    r = subprocess.run([sys.executable, "-c", long_context.CHILD, "16384", "block-chunk", str(long_context.REPO)],
                       capture_output=True, text=True, timeout=380,
                       env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})  # threads: the worker's share
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    used_gib = (res["peak_mib"] - res["base_mib"]) / 1024
    print(f"debug model T=16384 block-chunk: peak RSS {res['peak_mib']:.0f} MiB ({used_gib:.2f} GiB above start), "
          f"{res['seconds']:.1f} s")
    # dense (T, T) float32 scores alone, one head, one layer call, would be 1 GiB; the model makes 5 such calls x 4 heads
    assert used_gib < 4.0, used_gib


# --- bf16: scores and their normalisation in float32, outputs cast back ---------------------------------------
@pytest.mark.parametrize("activation", ACTS)
def test_normalize_of_bf16_scores_sums_to_one(activation):
    from ressformer.sparse import normalize

    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(64, 200, generator=g)).bfloat16()
    s[:, 150:] = float("-inf")
    p = normalize(s, activation)
    assert p.dtype == torch.float32
    assert (p.sum(-1) - 1).abs().max() < 1e-3
    torch.testing.assert_close(p, normalize(s.float(), activation))  # the same function of the same scores


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("impl,topk", [("reference", 0), ("reference", 5), ("chunked", 0), ("chunked", 5),
                                       ("block", 0), ("block", 5)])
def test_bf16_attention_matches_fp32(activation, impl, topk):
    """bf16 inputs: the output is the fp32 computation on the same (bf16-rounded) inputs, rounded once to bf16."""
    p = _problem(seed=5, T=29, Tm=4, dtype=torch.float32)
    for attend in ("dense", "gather") if topk and impl != "reference" else ("auto",):
        kw = dict(q_pos=p["q_pos"], k_pos=p["k_pos"], k_window=p["k_window"], activation=activation, topk=topk,
                  impl=impl, chunk_size=8, block_size=4, blocks_per_query=3, pattern_degree=3, pattern_keys=29,
                  attend=attend)
        with torch.no_grad():
            qb, kb, vb = (p[n].detach().bfloat16() for n in "qkv")
            gb = (p["graph"][0], p["graph"][1].detach().bfloat16())
            out_b, st_b = sparse_attention(qb, kb, vb, graph=gb, graph_scale=p["graph_scale"].detach(), **kw)
            out_f, st_f = sparse_attention(qb.float(), kb.float(), vb.float(), graph=(gb[0], gb[1].float()),
                                           graph_scale=p["graph_scale"].detach(), **kw)
        assert out_b.dtype == torch.bfloat16
        torch.testing.assert_close(out_b.float(), out_f, rtol=1e-2, atol=1e-2, msg=attend)
        assert torch.equal(st_b["pattern"][0], st_f["pattern"][0])  # the same kept keys and edges
        torch.testing.assert_close(st_b["pattern"][1], st_f["pattern"][1])


# --- selection.topk_first: tie-breaking on the device ----------------------------------------------------------
def _topk_first_host(x: torch.Tensor, k: int, floor: float = float("-inf")) -> torch.Tensor:
    """The rule as it was written with a host read (the reference): torch.topk, then the rows whose k-th value is
    tied within TIE_RTOL with a left-out entry redone by index, found with bool(tie.any()) and nonzero."""
    from ressformer.selection import TIE_RTOL

    n = x.shape[-1]
    if k >= n:
        return x.topk(k, dim=-1).indices
    vals, idx = x.topk(k + 1, dim=-1)
    idx = idx[..., :k].contiguous()
    thr, nxt = vals[..., k - 1], vals[..., k]
    tol = TIE_RTOL * torch.maximum(vals[..., 0].abs(), nxt.abs())
    tie = (nxt > floor) & (thr - nxt <= tol)
    if bool(tie.any()):
        rows = tie.nonzero(as_tuple=True)
        xr, t, tl = x[rows], thr[rows][:, None], tol[rows][:, None]
        ar = torch.arange(n, device=x.device)
        near = (xr >= t - tl) & (xr > floor)
        key = torch.where(xr > t + tl, 2 * n - ar, torch.where(near, n - ar, torch.full_like(ar, -1)))
        idx[rows] = key.topk(k, dim=-1).indices
    return idx


def _chosen(x: torch.Tensor, idx: torch.Tensor, floor: float = float("-inf")) -> torch.Tensor:
    """The entries of x that idx chooses, as a mask over x's last dim, those <= floor left out (ties among them are
    arbitrary)."""
    return torch.zeros_like(x, dtype=torch.bool).scatter(-1, idx, True) & (x > floor)


@pytest.mark.parametrize("tied_rows_only", [True, False], ids=["tied-rows-op", "every-row"])
def test_topk_first_equals_the_host_rule_on_ties(tied_rows_only, monkeypatch):
    """topk_first returns the host rule's indices, in the same order, on rows full of exact and near ties (within
    TIE_RTOL), -inf entries, floors, every k (0 included), float32 and float64, and on a chunk of the attention's
    scores with repeated keys; ordered=False the same entries in any order. Both tie passes: the CPU's op that redoes
    the tied rows alone, and the static one (every row's tie-broken choice computed and picked per row on the
    device) that other devices run."""
    from ressformer import selection
    from ressformer.selection import topk_first

    monkeypatch.setattr(selection, "redo_tied_rows_only", lambda x: tied_rows_only)

    g = torch.Generator().manual_seed(0)
    tied_rows = 0
    for trial in range(120):
        n = int(torch.randint(2, 70, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        x = torch.randint(0, 4, (3, 5, n), generator=g).to(torch.float64 if trial % 4 == 0 else torch.float32)
        x = x * (1 + 3e-6 * torch.randn(x.shape, generator=g, dtype=x.dtype))  # equal up to rounding: still ties
        x[torch.rand(x.shape, generator=g) < 0.25] = float("-inf")
        floor = (float("-inf"), 0.0, 1.5)[trial % 3]
        want, got = _topk_first_host(x, k, floor), topk_first(x, k, floor)
        assert got.is_contiguous() and torch.equal(got, want), (trial, n, k, floor)
        loose = topk_first(x, k, floor, ordered=False)  # the same set of entries above floor, in any order
        assert loose.is_contiguous() and torch.equal(_chosen(x, loose, floor), _chosen(x, want, floor)), trial
        if k < n:
            v = x.topk(k + 1, dim=-1).values
            tied_rows += int(((v[..., k] > floor) & (v[..., k - 1] - v[..., k] <= 1e-5 * v[..., 0].abs())).sum())
    assert tied_rows > 500  # the redone branch really ran
    for ordered in (True, False):  # k = 0: nothing kept, as torch.topk
        assert torch.equal(topk_first(x, 0, ordered=ordered), x.topk(0, dim=-1).indices)
    # scores of a query chunk over repeated keys (exact ties) and distinct ones
    keys = torch.randn(6, 8, generator=g)[torch.randint(0, 6, (40,), generator=g)]
    s = torch.randn(2, 3, 16, 8, generator=g) @ keys.T  # (B, H, c, n)
    s[..., 30:] = float("-inf")
    for k in (1, 4, 16):
        assert torch.equal(topk_first(s, k), _topk_first_host(s, k))
        assert torch.equal(_chosen(s, topk_first(s, k, ordered=False)), _chosen(s, _topk_first_host(s, k)))
