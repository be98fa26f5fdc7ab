"""Document masking (`documents=`): in a packed window no token reads a key, R2MU memory entry (token cache,
segment summary) or SOES edge of another document, so a document's logits equal those of the document run alone
(no positional encoding: to fp32 rounding), for each ASAM path (block ASAM: each document's key blocks cut from its
own first key), both SOES graphs, routed experts, prelude / coda, the dense baseline (same-document mask, RoPE
restarting per document), the generation cache and a compiled step. Tiny configs (test_generate_cache.TINY: chunks
of 8, blocks of 4, segments of 5, a 6-token cache window, vocab 64: repeated tokens, so equal keys and score ties)."""

from __future__ import annotations

import pytest
import torch

from ressformer import build_model
from ressformer.cache import ModelCache
from ressformer.config import ModelConfig
from ressformer.selection import DOCUMENT_STRIDE, document_ids, document_positions
from tests.ressformer.test_generate_cache import SCHEDULES, TINY

EOS, PAD = 1, 0
LENS = (13, 4, 17, 11)  # T = 45: documents cross chunk, segment and window boundaries; one shorter than a segment
CONFIGS = {
    "chunked": {},
    "chunked_bilinear": {"soes.graph": "bilinear"},
    "reference": {"asam.impl": "reference"},
    "block": {"asam.impl": "block"},
    "block_chunk_bilinear": {"asam.impl": "block", "asam.block_select": "chunk", "soes.graph": "bilinear"},
    "dense_softmax": {"asam.topk": 0, "asam.activation": "softmax"},
    "prelude_coda_entmax": {"r2mu.n_prelude": 1, "r2mu.n_coda": 1, "asam.activation": "entmax15"},
    "no_r2mu": {"r2mu.enabled": False},
    "transformer": {"arch": "transformer"},
    "transformer_nope": {"arch": "transformer", "position": "none"},
}


def tiny(name: str) -> ModelConfig:
    return ModelConfig.from_preset("debug", **{**TINY, **CONFIGS[name]})


def packed(cfg: ModelConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows packing the LENS documents (each ends with EOS) in two orders. -> (input_ids, documents) (2, 45)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, cfg.vocab_size, (n,), generator=g) for n in LENS]
    for d in docs:
        d[-1] = EOS
    rows = torch.stack([torch.cat(docs), torch.cat(docs[::-1])])
    return rows, document_ids(rows, EOS)


def model_of(cfg: ModelConfig):
    torch.manual_seed(0)
    return build_model(cfg).eval()


@torch.no_grad()
def worst_vs_alone(model, x: torch.Tensor, docs: torch.Tensor | None, doc_ids: torch.Tensor, **kw) -> float:
    """max |logits of each document in the packed forward - the document's logits alone| over every document."""
    full = model(x, documents=docs, **kw).logits
    worst = 0.0
    for b in range(x.shape[0]):
        for d in doc_ids[b].unique():
            cols = (doc_ids[b] == d).nonzero().flatten()
            alone = model(x[b:b + 1, cols], **kw).logits[0]
            worst = max(worst, (full[b, cols] - alone).abs().max().item())
    return worst


def test_document_ids_and_positions():
    x = torch.tensor([[5, 6, EOS, 7, EOS, PAD, PAD, 8, 9, EOS]])
    assert document_ids(x, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 2]]
    ids = document_ids(x, EOS, PAD)  # the pad run is a document of its own
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3]]
    pos = document_positions(ids)
    assert (pos // DOCUMENT_STRIDE).tolist() == ids.tolist()
    assert (pos % DOCUMENT_STRIDE).tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2]]
    # any ids work: a new document wherever the id changes
    assert torch.equal(document_positions(ids * 7 + 100), pos)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_document_logits_equal_the_document_alone(name):
    cfg = tiny(name)
    model = model_of(cfg)
    x, docs = packed(cfg)
    assert worst_vs_alone(model, x, docs, docs) < 2e-5
    if name != "no_r2mu":  # K = steps recurrent steps of the shared block, another K at inference
        assert worst_vs_alone(model, x, docs, docs, num_steps=5) < 2e-5
    # the check can fail: without the mask the later documents read the earlier ones
    assert worst_vs_alone(model, x, None, docs) > 1e-2


def test_training_forward_backward_with_documents_and_checkpointing():
    """Loss and gradients with documents are those without checkpointing; the gradient of a document's loss
    reaches no other document's embeddings (but the previous one's: its EOS's output predicts the document's first
    token, as in any packed training)."""
    cfg = tiny("chunked")
    model = model_of(cfg).train()
    x, docs = packed(cfg)
    labels = x.clone()
    cols = docs[0] == 2  # a middle document of row 0
    labels[0, ~cols] = -100
    labels[1] = -100
    emb = model.model.embed_tokens
    grads = []
    for ckpt in (None, lambda fn, *a: torch.utils.checkpoint.checkpoint(fn, *a, use_reentrant=False)):
        model.zero_grad()
        model.set_checkpointing(ckpt)
        captured = {}

        def keep(module, inputs, out):
            out.retain_grad()
            captured["h"] = out

        handle = emb.register_forward_hook(keep)
        out = model(x, labels=labels, documents=docs)
        out.lm_loss.backward()
        handle.remove()
        g = captured["h"].grad  # (B, T, D)
        assert g[0, cols].abs().sum() > 0
        # the document's tokens, and the previous document, whose EOS's output predicts the first of them
        reads = cols | (docs[0] == 1)
        assert g[0, ~reads].abs().max() == 0 and g[1].abs().max() == 0
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["chunked", "chunked_bilinear", "prelude_coda_entmax", "transformer", "block",
                                  "block_chunk_bilinear"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_cached_decoding_with_documents_equals_the_full_forward(name, schedule):
    cfg = tiny(name)
    model = model_of(cfg)
    x, docs = packed(cfg)
    with torch.no_grad():
        full = model(x, documents=docs).logits
        cache = ModelCache()
        got = torch.cat([model(x[:, a:b], cache=cache, documents=docs[:, a:b]).logits
                         for a, b in SCHEDULES[schedule]], 1)
    assert (got - full).abs().max() < 2e-5
    if cfg.arch == "ressformer" and cfg.r2mu.memory:
        n_seg = sum(n // cfg.r2mu.segment_len for n in LENS)
        unit = cache.units[model.n_prelude + 1]  # step 1 reads the summaries: one per complete segment of a document, spare slots 0
        assert int((unit.sum_win.view > 0).sum()) == 2 * n_seg * cfg.r2mu.summary_slots


def test_refusals_name_the_fix():
    cfg = tiny("chunked")
    model = model_of(cfg)
    x, docs = packed(cfg)
    with pytest.raises(ValueError, match="shaped like input_ids"):
        model(x, documents=docs[:, :-1])
    cache = ModelCache()
    model(x[:, :5], cache=cache, documents=docs[:, :5])
    with pytest.raises(ValueError, match="to every call of a cache or to none"):
        model(x[:, 5:6], cache=cache)
    enc = model_of(ModelConfig.from_preset("debug", **{**TINY, "causal": False}))
    with pytest.raises(ValueError, match="causal=True"):
        enc(x, documents=docs)


@pytest.mark.parametrize("name", ["chunked", "block_chunk_bilinear"])
def test_step_with_documents_reads_nothing_on_the_host_and_compiles_whole(name, monkeypatch):
    """The document path adds no host read (sort, cummax, searchsorted and gathers of static shape) and no graph
    break: the recurrent step compiles with fullgraph=True and equals eager. The host-read check runs the experts
    and the top-k tie pass as a GPU does (static tiles, every row's tie-broken choice)."""
    from torch._dynamo.testing import CompileCounter

    from ressformer import kernels, selection
    from ressformer.host_reads import HostReads

    cfg = tiny(name)
    x, docs = packed(cfg)
    kernels.set_moe_experts("padded")
    try:
        model = model_of(cfg).train()
        with monkeypatch.context() as mp, HostReads() as reads:
            mp.setattr(selection, "redo_tied_rows_only", lambda x: False)
            model(x, labels=x, documents=docs).loss.backward()
        assert dict(reads.seen) == {}
        eager = model(x, labels=x, documents=docs).loss
        torch._dynamo.reset()
        counter = CompileCounter()
        model.compile_units(backend=counter, fullgraph=True)
        compiled = model(x, labels=x, documents=docs).loss
        assert counter.frame_count == 2 and (compiled - eager).abs() < 1e-5  # step 0, steps >= 1
    finally:
        kernels.set_moe_experts("auto")
        torch._dynamo.reset()


def test_gate_diagnostic_counts_real_segments_only():
    """The logged mean R2MU gate under document masking averages the documents' segments, not the spare slots:
    a batch of one document equals its unmasked value."""
    cfg = tiny("chunked")
    model = model_of(cfg)
    x, _ = packed(cfg)
    one = torch.zeros_like(x)  # every row is one document: the same segments as without documents
    with torch.no_grad():
        a = model(x).diagnostics
        b = model(x, documents=one).diagnostics
        c = model(x, documents=document_ids(x, EOS)).diagnostics
    for t in range(1, cfg.r2mu.steps):
        key = f"r2mu_gate_step{t}"
        assert abs(float(a[key]) - float(b[key])) < 1e-6 and 0 < float(c[key]) < 1


@pytest.mark.parametrize("select", ["query", "chunk"])
@pytest.mark.parametrize("topk", [0, 3])
def test_block_attention_with_documents_equals_each_document_alone(select, topk):
    """sparse_attention(impl=block) over packed documents (per-sample positions) equals the call on each document
    alone, on fp64, with SOES edges and the candidate bound of two query chunks: documents longer than a chunk,
    shorter than a block, starting off the block and chunk grids; and the blocks prune (block != every key)."""
    from ressformer.attention import sparse_attention
    from ressformer.selection import run_local_blocks

    lens, H, D, cs, bs, m = (40, 9, 30, 3, 20), 2, 8, 16, 4, 3
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(order)]) for order in (lens, lens[::-1])]
    docs = torch.stack(rows)
    pos = document_positions(docs)
    B, T = docs.shape
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    within = pos % DOCUMENT_STRIDE
    back = (torch.rand(B, T, m, generator=g) * (within[..., None] + 1)).long()  # an earlier token of the document
    g_idx, g_val = torch.arange(T)[None, :, None] - back, torch.rand(B, T, m, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.7, -0.4], dtype=torch.float64)
    kw = dict(causal=True, activation="sparsemax", topk=topk, impl="block", chunk_size=cs, block_size=bs,
              blocks_per_query=2, block_select=select, graph_scale=scale)
    out, _ = sparse_attention(q, k, v, q_pos=pos, k_pos=pos, graph=(g_idx, g_val),
                              local_blocks=run_local_blocks(2 * cs, bs), **kw)
    pruned = 0.0
    for b in range(B):
        for d in docs[b].unique():
            cols = (docs[b] == d).nonzero().flatten()
            p, sub = torch.arange(len(cols)), (lambda t: t[b:b + 1, :, cols])  # noqa: E731
            graph = (g_idx[b:b + 1, cols] - cols[0], g_val[b:b + 1, cols])
            alone, _ = sparse_attention(sub(q), sub(k), sub(v), q_pos=p, k_pos=p, graph=graph,
                                        local_blocks=run_local_blocks(cs, bs), **kw)
            assert (sub(out) - alone).abs().max() < 1e-12
            every, _ = sparse_attention(sub(q), sub(k), sub(v), q_pos=p, k_pos=p, graph=graph,
                                        **{**kw, "impl": "chunked"})
            pruned = max(pruned, (alone - every).abs().max().item())
    assert pruned > 1e-2
