"""Incremental decoding (ressformer/cache.py): the logits of new tokens given a ModelCache of the earlier ones equal
the full forward's, for every ASAM implementation, both SOES graphs, MoE, R2MU memory, prelude / coda, the r2mu
ablation and K changed at inference; generation through the transformers wrapper gives the same tokens with and
without the cache. Tiny configs (d_model 32, 2 heads, vocab 64: repeated tokens, so equal keys and score ties)."""

from __future__ import annotations

import pytest
import torch

from ressformer import build_model
from ressformer.cache import ModelCache
from ressformer.config import ModelConfig

# chunks of 8 queries, blocks of 4 keys, segments of 5 tokens, a 6-token cache window: T = 45 crosses all of them
TINY = {"d_model": 32, "n_heads": 2, "ffn_hidden": 32, "vocab_size": 64, "max_seq_len": 64, "asam.topk": 4,
        "asam.chunk_size": 8, "asam.block_size": 4, "asam.blocks_per_query": 1, "r2mu.steps": 3,
        "r2mu.cache_window": 6, "r2mu.segment_len": 5, "r2mu.summary_slots": 3, "soes.degree": 3}
IMPLS = [("reference", "query"), ("chunked", "query"), ("block", "query"), ("block", "chunk")]
T = 45
# prefill, single tokens across chunk / block / segment boundaries, then chunks of several tokens
SCHEDULES = {"prefill_then_tokens": [(0, 13)] + [(i, i + 1) for i in range(13, 30)] + [(30, 37), (37, 45)],
             "chunks": [(0, 1), (1, 4), (4, 11), (11, 12), (12, 21), (21, 22), (22, 40), (40, 45)]}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("debug", **{**TINY, **overrides})


def seeded(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def ids(cfg: ModelConfig, B: int = 2, n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(model, x: torch.Tensor, schedule, num_steps=None) -> tuple[torch.Tensor, ModelCache]:
    cache = ModelCache()
    logits = [model(x[:, a:b], num_steps=num_steps, cache=cache).logits for a, b in schedule]
    return torch.cat(logits, 1), cache


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("graph", ["attention", "bilinear"])
@pytest.mark.parametrize("impl,select", IMPLS)
def test_incremental_logits_equal_full_forward(impl, select, graph):
    cfg = tiny(**{"asam.impl": impl, "asam.block_select": select, "soes.graph": graph})
    assert cfg.moe.num_experts > 1 and cfg.soes.enabled and cfg.r2mu.memory
    model, x = seeded(cfg), ids(cfg)
    for K in (None, 5):  # the training K and another one at inference
        with torch.no_grad():
            full = model(x, num_steps=K).logits
        for name, schedule in SCHEDULES.items():
            got, cache = decode(model, x, schedule, num_steps=K)
            assert max_diff(got, full) < 1e-5, (K, name)
        assert cache.length == T and len(cache.units) == (K or cfg.r2mu.steps)


@pytest.mark.parametrize("overrides", [
    {"r2mu.n_prelude": 1, "r2mu.n_coda": 1, "asam.impl": "block", "asam.block_select": "chunk",
     "soes.graph": "bilinear"},
    {"r2mu.n_prelude": 1, "r2mu.n_coda": 1, "asam.activation": "softmax", "asam.topk": 0},
    {"r2mu.enabled": False, "asam.impl": "block"},  # K distinct blocks, no memory
    {"r2mu.memory": False, "soes.enabled": False, "moe.num_experts": 1, "asam.activation": "entmax15"},
    {"r2mu.steps": 1, "asam.impl": "chunked"},
    {"r2mu.summary_slots": 1, "r2mu.segment_len": 1, "r2mu.cache_window": 1, "asam.impl": "block",
     "asam.blocks_per_query": 2, "asam.block_size": 3},
], ids=["prelude_coda_block_chunk_bilinear", "prelude_coda_softmax_dense", "r2mu_off", "no_memory_no_soes_dense_ffn",
        "one_step", "one_token_segments"])
def test_incremental_logits_other_variants(overrides):
    cfg = tiny(**overrides)
    model, x = seeded(cfg), ids(cfg)
    with torch.no_grad():
        full = model(x).logits
    got, cache = decode(model, x, SCHEDULES["prefill_then_tokens"])
    assert max_diff(got, full) < 1e-5
    r = cfg.r2mu
    assert len(cache.units) == r.n_prelude + r.steps + r.n_coda
    kv = cache.units[0].k.view
    assert kv.shape == (2, cfg.n_heads, T, cfg.head_dim)  # every unit keeps every token's keys


@pytest.mark.parametrize("impl,select", IMPLS)
def test_full_forward_logits_do_not_depend_on_the_sequence_length(impl, select):
    """What makes the cache exact: position t's logits are the same whatever follows t. Needs top-k ties (equal
    keys of repeated tokens) broken by index, and block-aligned memory keys under block ASAM."""
    cfg = tiny(**{"asam.impl": impl, "asam.block_select": select})
    model, x = seeded(cfg), ids(cfg)
    with torch.no_grad():
        full = model(x).logits
        for t in (1, 6, 13, 21, 32, 44):
            assert max_diff(model(x[:, :t]).logits, full[:, :t]) < 1e-5, t


def test_topk_ties_break_by_index_whatever_follows():
    """Equal (or equal up to rounding) scores at the k-th place: the lower index wins, whatever the row length."""
    from ressformer.selection import topk_first

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (64, 40), generator=g).float()  # many equal values
    x[:, ::7] = float("-inf")
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices  # equal values: lower index first
    for k in (1, 5, 13):
        got = topk_first(x, k).sort(-1).values
        assert torch.equal(got, order[:, :k].sort(-1).values)
        longer = torch.cat([x, torch.full((64, 100), -5.0), x.flip(-1) - 10], -1)  # more, smaller entries after
        assert torch.equal(topk_first(longer, k).sort(-1).values, got)
        rounded = x * (1 + 1e-7 * torch.randn(x.shape, generator=g))  # equal up to rounding: still ties
        assert torch.equal(topk_first(rounded, k).sort(-1).values, got)


def test_block_selection_ignores_summaries_of_blocks_overlapping_the_query_chunk():
    """Blocks overlapping a query's chunk (its position's chunk of chunk_size) are local, kept by position and
    never scored, so their summaries (partial blocks, or blocks holding later keys) cannot matter; and a query
    keeps the same blocks whether it comes with its whole chunk or alone (incremental decoding)."""
    from ressformer.selection import block_candidates, block_summaries

    g = torch.Generator().manual_seed(0)
    B, H, D, Tk, bs, cs = 2, 2, 8, 37, 4, 8  # 37 keys: the last block holds one key
    k, pos = torch.randn(B, H, Tk, D, generator=g), torch.arange(Tk)
    blocks = block_summaries(k, pos, None, bs)
    kbar, bmax = blocks.mean, blocks.pos_max
    qp = torch.arange(24, 32)  # the chunk [24, 32)
    q = torch.randn(B, H, len(qp), D, generator=g)

    def kept(q_c, qp_c, kb, select, chunk_size=cs):  # per query: the set of kept key indices
        cand, valid, _ = block_candidates(q_c, qp_c, blocks._replace(mean=kb), causal=True, blocks_per_query=1,
                                          select=select, chunk_size=chunk_size)
        return [[[set(cand[b, h][valid[b, h, i]].tolist()) for i in range(len(qp_c))] for h in range(H)]
                for b in range(B)]

    overlap = bmax >= qp[0]  # blocks overlapping the chunk or after it (the last, partial one included)
    noisy = torch.where(overlap[:, None], 100 * torch.randn(kbar.shape, generator=g), kbar)
    for select in ("query", "chunk"):
        whole = kept(q, qp, kbar, select)
        assert kept(q, qp, noisy, select) == whole
        assert kept(q, qp, kbar, select, chunk_size=None) == whole  # the span rule, for a whole aligned chunk
        if select == "query":  # one query at a time (block_select=chunk needs the chunk's first query: ghost)
            for i in range(len(qp)):
                alone = kept(q[:, :, i:i + 1], qp[i:i + 1], kbar, select)
                assert all(alone[b][h][0] == whole[b][h][i] for b in range(B) for h in range(H))
        else:
            for i in range(1, len(qp)):
                two = kept(q[:, :, [0, i]], qp[[0, i]], noisy, select)
                assert all(two[b][h][1] == whole[b][h][i] for b in range(B) for h in range(H))
        assert any(len(s) < int(qp[i]) + 1 for i, s in enumerate(whole[0][0]))  # some visible keys dropped


def test_cache_contract_and_errors():
    cfg = tiny()
    model, x = seeded(cfg), ids(cfg, n=12)
    cache = ModelCache()
    with torch.no_grad():
        model(x[:, :5], cache=cache)
        assert cache.get_seq_length() == 5 and cache.num_steps == cfg.r2mu.steps
        with pytest.raises(ValueError, match="num_steps=3.*num_steps=5.*new ModelCache"):
            model(x[:, 5:6], num_steps=5, cache=cache)
        with pytest.raises(ValueError, match="holds 2 sequences"):
            model(x[:1, 5:6], cache=cache)
        ptr = cache.units[0].k.data.data_ptr()
        model(x[:, 5:6], cache=cache)
        assert cache.length == 6 and cache.units[0].k.data.data_ptr() == ptr  # buffers grow by doubling
        # beam search reorders rows: row 0 twice gives sequence 0's logits in both rows
        cache.reorder_cache(torch.tensor([0, 0]))
        nxt = model(x[:1, 6:7].expand(2, 1), cache=cache).logits
        full = model(x[:1, :7]).logits[:, -1]
        assert max_diff(nxt[0, -1], full[0]) < 1e-5 and max_diff(nxt[1, -1], full[0]) < 1e-5
        with pytest.raises(ValueError, match="causal=True"):
            seeded(tiny(causal=False))(x, cache=ModelCache())


@pytest.mark.parametrize("position", ["rope", "none"])
def test_baseline_kv_cache_equals_full_forward(position):
    cfg = ModelConfig.from_preset("debug-transformer", d_model=32, n_heads=2, ffn_hidden=32, n_layers=2,
                                  max_seq_len=16, position=position, **{"moe.num_experts": 4})  # RoPE extended
    model, x = seeded(cfg), ids(cfg)
    with torch.no_grad():
        full = model(x).logits
    for schedule in SCHEDULES.values():
        got, _ = decode(model, x, schedule)
        assert max_diff(got, full) < 1e-5


# --- through the transformers wrapper --------------------------------------------------------------------------
HF_MODELS = {
    "chunked_attention_graph": tiny(**{"vocab_size": 512, "asam.impl": "chunked"}),
    "block_chunk_bilinear": tiny(**{"vocab_size": 512, "asam.impl": "block", "asam.block_select": "chunk",
                                    "soes.graph": "bilinear", "r2mu.n_prelude": 1}),
    "transformer": ModelConfig.from_preset("debug-transformer", d_model=32, n_heads=2, ffn_hidden=32, n_layers=2),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from pretrain.convert import export_hf

    out = {}
    for name, cfg in HF_MODELS.items():
        model = seeded(cfg)
        d = export_hf(model.state_dict(), cfg, tmp_path_factory.mktemp(name) / "hf")
        out[name] = (model, AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval())
    return out


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_generate_gives_the_same_tokens_with_and_without_the_cache(hf_models, name):
    model, hf = hf_models[name]
    assert hf.generation_config.use_cache and hf.config.use_cache
    x = ids(model.config, B=2, n=11, seed=3)  # a batch of equal-length prompts
    steps = (None, 5) if model.config.arch == "ressformer" else (None,)
    with torch.no_grad():
        for K in steps:
            kw = {} if K is None else {"num_steps": K}
            cached = hf.generate(x, max_new_tokens=24, do_sample=False, **kw)
            assert torch.equal(cached, hf.generate(x, max_new_tokens=24, do_sample=False, use_cache=False, **kw))
            ids_ = x
            for _ in range(24):  # greedy with the training model, full forward each step
                ids_ = torch.cat([ids_, model(ids_, num_steps=K).logits[:, -1].argmax(-1, keepdim=True)], 1)
            assert torch.equal(cached, ids_)
            runs = []
            for use_cache in (True, False):
                torch.manual_seed(7)
                runs.append(hf.generate(x, max_new_tokens=24, do_sample=True, top_k=0, use_cache=use_cache, **kw))
            assert torch.equal(runs[0], runs[1])
        out = hf.generate(x, max_new_tokens=3, return_dict_in_generate=True)
        assert type(out.past_key_values).__name__ == "ModelCache" and out.past_key_values.get_seq_length() == 13
        # forward: a cache only when asked; use_cache=False / None is the plain full forward
        full = hf(x).logits
        step = hf(x[:, :7], use_cache=True)
        nxt = hf(x[:, 7:], past_key_values=step.past_key_values)
        assert max_diff(torch.cat([step.logits, nxt.logits], 1), full) < 1e-5
        assert hf(x, use_cache=False).past_key_values is None
        with pytest.raises(ValueError, match="equal length"):
            hf(x, attention_mask=torch.ones_like(x).index_fill(1, torch.tensor([10]), 0), use_cache=True)


def test_remote_code_defines_its_ops_beside_the_package_s(hf_models):
    """The exported model's remote code (a copy of every ressformer module, loaded above in this process) and a
    module executed a second time define their custom ops under namespaces of their own: redefining an op under
    the package's name would destroy the package's registration, and a model built before would then call a
    dangling operator handle (a segmentation fault, seen under pytest-xdist)."""
    import importlib.util
    import sys

    from torch._library.custom_ops import OPDEFS

    import ressformer.attention as attention
    import ressformer.moe as moe

    package = {"ressformer::edge_bias": attention._edge_bias, "ressformer::experts_loop": moe._experts_loop,
               "ressformer::experts_loop_backward": moe._experts_loop_backward}
    remote = [m for name, m in sys.modules.items() if name.startswith("transformers_modules.")
              and name.endswith(("ressformer_attention", "ressformer_moe"))]  # this file's exports, and any
    assert len(remote) >= 2  # other test's run earlier in this process
    spec = importlib.util.spec_from_file_location("moe_again", moe.__file__)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)
    copies = [getattr(m, op) for m in remote + [again] for op in ("_edge_bias", "_experts_loop") if hasattr(m, op)]
    assert len(copies) == len(remote) + 1
    for qualname, op in package.items():
        assert op._qualname == qualname and OPDEFS[qualname] is op
    for op in copies:
        assert op._qualname.split("::")[0].startswith("ressformer_") and OPDEFS[op._qualname] is op
    # the package's model and the export still run and agree
    model, hf = hf_models["block_chunk_bilinear"]
    x = ids(model.config, B=2, n=13, seed=5)
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x).logits) < 1e-5
