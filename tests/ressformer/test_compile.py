"""torch.compile of the repeated units (CausalLM.compile_units, run config `compile: true`) against eager, and the
step's freedom from host reads.

- No host read (quick): the forward + backward of the debug model on every ASAM path (chunked, block with
  block_select query and chunk, dense chunks, the reference), both SOES graphs, fp32 and bf16, with checkpointing,
  under the experts' sync-free paths, runs no operator that reads device data on the host
  (ressformer.host_reads.HostReads: item / bool / int, equal, nonzero, masked_select, unique, bincount, boolean
  indexing, repeat_interleave with tensor repeats, Tensor.tolist and our ops that read inside).
- Graph structure (Dynamo only: fast): the baseline's blocks and ReSSFormer's recurrent step (R2MU memory + block
  as one function) compile with fullgraph=True on every ASAM path and SOES graph, fp32 and bf16; once the two step
  variants (step 0, steps >= 1) are compiled, K = 1..5 with and without checkpointing recompiles nothing. The
  whole forward + loss is one graph too; the one break left is the explicitly chosen host-read experts loop. The
  125m preset's step (T = 256, 4 experts) traces whole on each ASAM path (torch._dynamo.explain, forward).
- Parity: logits, loss and every gradient of the compiled model equal eager within 1e-5 relative in fp32 (inductor
  fuses and reorders, so not bitwise), checkpointing on and off, K fixed and sampled; the baseline with inductor
  (quick), the debug preset with aot_eager (quick: chunked and block_select=chunk; bf16 within 1e-2) and inductor
  (slow: block_select=chunk, the path where inductor once ran a scatter after its reader).
- Trainer (slow): `pretrain/main.py --set compile=true` gives the eager run's losses, K sampled per step, on 2 gloo
  ranks with ZeRO-3 (the shared block called K times under ZeRO-3 hooks) and AutoEP:
  tests/e2e/test_compile_expert_parallel.py.
Inductor caches go to a temporary folder of this session.
"""

import pytest
import torch
import torch._dynamo
from torch.utils.checkpoint import checkpoint

from pretrain.config import RunConfig, load_run_config
from ressformer import ModelConfig, build_model, kernels, selection
from ressformer.host_reads import HostReads
from ressformer.recurrence import sample_num_steps

B, T = 2, 64
# every ASAM path and SOES graph of the debug preset (chunked sparse top-k, attention-pattern graph by default)
PATHS = {"chunked": {}, "block_query": {"asam.impl": "block"},
         "block_chunk": {"asam.impl": "block", "asam.block_select": "chunk"},
         "bilinear_block": {"asam.impl": "block", "soes.graph": "bilinear"},
         "bilinear_chunked": {"soes.graph": "bilinear"}, "dense_chunks": {"asam.topk": 0},
         "reference": {"asam.impl": "reference"}}


def ckpt(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """Inductor's caches in this session's temporary folder; compiled code released afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield
    torch._dynamo.reset()


def _pair(cfg: ModelConfig, **compile_kwargs):
    """(eager model, compiled model) with the same weights. Dynamo starts afresh: the compiled step's code object is
    shared by every model, so the graphs of earlier tests' models would count against its recompile limit."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_units(**compile_kwargs)
    return eager, compiled


def _fwd_bwd(model, ids, k, ac):
    model.set_checkpointing(ckpt if ac else None)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, num_steps=k, return_logits=True)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                                     if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_parity(eager, compiled, cases, tol=1e-5):
    ids = torch.randint(0, eager.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    for k, ac in cases:
        logits, loss, grads = _fwd_bwd(eager, ids, k, ac)
        c_logits, c_loss, c_grads = _fwd_bwd(compiled, ids, k, ac)
        where = f"K={k} checkpointing={ac}"
        assert _rel(c_logits, logits) < tol, (where, _rel(c_logits, logits))
        assert abs(c_loss - loss).item() <= tol * abs(loss).item(), (where, c_loss.item(), loss.item())
        assert c_grads.keys() == grads.keys(), where
        worst = max(grads, key=lambda n: _rel(c_grads[n], grads[n]))
        assert _rel(c_grads[worst], grads[worst]) < tol, (where, worst, _rel(c_grads[worst], grads[worst]))


def _sampled_ks(cfg: ModelConfig, n: int) -> list[int]:
    """K as the trainer draws it (r2mu.step_sampling=uniform) for steps 0..n-1."""
    cfg = cfg.replace(**{"r2mu.step_sampling": "uniform", "r2mu.min_steps": 1, "r2mu.max_steps": 6})
    return [sample_num_steps(cfg, step, seed=3) for step in range(n)]


# --- no host read ----------------------------------------------------------------------------------------------
def _host_reads(cfg: ModelConfig, dtype) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)
    model.set_checkpointing(ckpt)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with HostReads() as reads:
        model(ids, labels=ids).loss.backward()
    return dict(reads.seen)


@pytest.mark.parametrize("path,dtype", [(p, torch.float32) for p in PATHS] + [
    ("chunked", torch.bfloat16), ("block_chunk", torch.bfloat16)])
def test_forward_and_backward_read_nothing_on_the_host(path, dtype):
    """The training step of every ASAM path, with the experts and the top-k tie pass on the paths a GPU takes (the
    static tiles, grouped GEMM on sm90 / sm100 bf16 reading nothing either; every row's tie-broken choice), reads
    no device value on the host: no stall of a GPU's stream, nothing that stops a CUDA graph."""
    kernels.set_moe_experts("padded")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(selection, "redo_tied_rows_only", lambda x: False)
            assert _host_reads(ModelConfig.from_preset("debug", **PATHS[path]), dtype) == {}
    finally:
        kernels.set_moe_experts("auto")


def test_the_host_read_check_sees_the_experts_loop():
    """The check above is not blind: the experts' loop (the reference; "auto" on eager CPU tensors) reads the token
    counts on the host, topk_first's CPU tie pass the tie flags, and the check reports both."""
    kernels.set_moe_experts("loop")
    try:
        assert set(_host_reads(ModelConfig.from_preset("debug"), torch.float32)) == {
            "aten.bincount.default", "Tensor.tolist", "ressformer.redo_tied_rows.default"}
    finally:
        kernels.set_moe_experts("auto")


# --- the hook ---------------------------------------------------------------------------------------------------
def test_compile_units_keeps_keys_and_leaves_cached_path_eager():
    cfg = ModelConfig.from_preset("debug", **{"r2mu.n_prelude": 1, "r2mu.n_coda": 1})
    eager, compiled = _pair(cfg, backend="eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are unchanged
    layers = compiled.model.layers
    assert layers[0]._compiled_call_impl is not None and layers[2]._compiled_call_impl is not None  # prelude, coda
    assert layers[1]._compiled_call_impl is None and compiled._compiled_step is not None  # the step as one function
    compiled.load_state_dict(eager.state_dict())  # a checkpoint of the eager model loads as is
    # generation (the cached path) calls forward_cached, which stays eager, and agrees with the full forward
    from ressformer.cache import ModelCache

    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    compiled.eval()
    with torch.no_grad():
        full = compiled(ids).logits
        cache = ModelCache()
        step = compiled(ids, cache=cache).logits
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def _compiles_whole(preset: str, overrides: dict, dtype, graphs: int):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cfg = ModelConfig.from_preset(preset, **overrides)
    counter = CompileCounter()
    _, model = _pair(cfg, backend=counter, fullgraph=True)
    model.to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    for k in (2, 1):
        _fwd_bwd(model, ids, k, ac=False)
    assert counter.frame_count == graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in (1, 3, 5, 2):
            for ac in (False, True):
                _fwd_bwd(model, ids, k, ac)
    assert counter.frame_count == graphs


@pytest.mark.parametrize("preset,path,dtype,graphs,weight_grad", [
    ("debug-transformer", None, torch.float32, 1, "auto"), ("debug", "chunked", torch.float32, 3, "stacked"),
    ("debug", "chunked", torch.bfloat16, 3, "auto"), ("debug", "block_query", torch.float32, 3, "auto"),
    ("debug", "block_chunk", torch.bfloat16, 3, "auto"), ("debug", "bilinear_block", torch.float32, 3, "auto")],
    ids=["baseline", "chunked_stacked", "chunked_bf16", "block_query", "block_chunk_bf16", "bilinear_block"])
def test_units_compile_whole_and_the_k_loop_never_recompiles(preset, path, dtype, graphs, weight_grad, monkeypatch):
    """fullgraph=True: no graph break anywhere in a unit (the routed experts on the static tiles: CPU under
    torch.compile). The baseline's 4 layers share one graph; ReSSFormer's step has 3 variants (step 0: no memory
    keys, no graph, S^(0) pooled for K > 1 or not for K = 1; steps >= 1). After a K=2 and a K=1 forward+backward,
    other K, with checkpointing on or off, reuse them: error_on_recompile stays silent (with the experts' weight
    taps of expert_weight_grad "stacked" too: one pair a step for K >= 2, none for K = 1)."""
    monkeypatch.setattr(kernels, "expert_weight_grad", weight_grad)
    _compiles_whole(preset, PATHS.get(path, {}), dtype, graphs)


QUICK = {("chunked", torch.float32), ("chunked", torch.bfloat16), ("block_query", torch.float32),
         ("block_chunk", torch.bfloat16), ("bilinear_block", torch.float32)}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path,dtype", [(p, d) for p in PATHS for d in (torch.float32, torch.bfloat16)
                                        if (p, d) not in QUICK])
def test_every_path_and_dtype_compiles_whole(path, dtype):
    """The rest of the path x dtype matrix of the test above."""
    _compiles_whole("debug", PATHS[path], dtype, 3)


@pytest.mark.parametrize("path", ["chunked", "block_query", "block_chunk"])
def test_125m_step_traces_whole(path):
    """The 125m preset's recurrent step at a step >= 1 (memory keys, the previous step's graph) on T = 256 tokens,
    its sparse top-k (top-128) path: one graph, no break (forward; 4 experts instead of 16 to keep it small)."""
    torch._dynamo.reset()
    cfg = ModelConfig.from_preset("125m", **{**PATHS[path], "moe.num_experts": 4})
    torch.manual_seed(0)
    model = build_model(cfg)
    n = 256
    ids, pos = torch.randint(0, cfg.vocab_size, (1, n)), torch.arange(n)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        s0 = model._recurrent_step(model.core_block(0), h, None, None, None, None, pos, None, None, None, True)
        explained = torch._dynamo.explain(model._recurrent_step)(model.core_block(1), s0.h, h, s0.summary,
                                                                 s0.graph.idx, s0.graph.val, pos, None, None, None,
                                                                 True)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("tied_rows_only", [True, False], ids=["tied-rows-op", "every-row"])
def test_topk_first_traces_whole_and_keeps_one_graph_across_ties(tied_rows_only, monkeypatch):
    """topk_first breaks ties without a graph break: compiled (fullgraph) it gives eager's indices on rows with and
    without ties, with one graph for both, with either tie pass (the CPU's op that redoes the tied rows, the static
    one of other devices)."""
    from torch._dynamo.testing import CompileCounter

    from ressformer.selection import topk_first

    monkeypatch.setattr(selection, "redo_tied_rows_only", lambda x: tied_rows_only)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(topk_first, backend=counter, fullgraph=True, dynamic=False)
    untied = torch.arange(24.0).repeat(3, 1)  # distinct values
    tied = untied.clone()
    tied[1, 21:] = 100.0
    tied[1, [16, 9, 2]] = 50.0  # row 1: three clear winners, then a three-way tie for the 4th place
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in (untied, tied, untied):
            assert torch.equal(compiled(x, 4), topk_first(x, 4))
    assert compiled(tied, 4)[1].sort().values.tolist() == [2, 21, 22, 23]  # the tie broke by index
    assert counter.frame_count == 1


@pytest.mark.parametrize("path", ["block_chunk"])
def test_whole_forward_and_loss_is_one_graph(path):
    """torch.compile of the whole model (embedding, K steps, tail, LM and aux losses, diagnostics): one graph, with
    the experts' host-read loop too (moe_experts="loop"): one opaque op (ressformer::experts_loop) per MoE call
    inside the graph; CPU "auto": the grouped GEMM, one op per projection (ressformer::grouped_linear)."""
    cfg = ModelConfig.from_preset("debug", **PATHS[path])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.compile_units(backend="eager")
    model._compiled_step = None  # explain traces the eager forward
    ids = torch.randint(0, cfg.vocab_size, (B, T))

    def loss(ids):
        out = model(ids, labels=ids)
        return out.loss, out.diagnostics

    ops = {"auto": ("grouped_linear", 2), "padded": (None, 0), "loop": ("experts_loop", 1)}
    for mode, (experts, per_call) in ops.items():
        kernels.set_moe_experts(mode)
        try:
            torch._dynamo.reset()
            explained = torch._dynamo.explain(loss)(ids)
        finally:
            kernels.set_moe_experts("auto")
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (mode, explained.break_reasons)
        code = explained.graphs[0].code
        for op in ("experts_loop", "grouped_linear"):
            assert code.count(f"ressformer.{op}.default(") == (per_call * cfg.r2mu.steps if op == experts else 0), mode


# --- parity -----------------------------------------------------------------------------------------------------
def test_baseline_compiled_equals_eager():
    eager, compiled = _pair(ModelConfig.from_preset("debug-transformer"), fullgraph=True)
    _assert_parity(eager, compiled, [(None, False), (None, True)])


def _stacked_calls(monkeypatch, weight_grad: str) -> list:
    """expert_weight_grad set to `weight_grad` for the test; the list that gets one entry per call of the op
    that sums the K steps' expert weight gradients (moe._stacked_weight_grad)."""
    from ressformer import moe

    calls, op = [], moe._stacked_weight_grad
    monkeypatch.setattr(moe, "_stacked_weight_grad", lambda *a: calls.append(len(a[0])) or op(*a))
    monkeypatch.setattr(kernels, "expert_weight_grad", weight_grad)
    return calls


@pytest.mark.parametrize("path,weight_grad", [("chunked", "stacked"), ("block_chunk", "per_step")])
def test_ressformer_compiled_equals_eager_aot_eager(path, weight_grad, monkeypatch):
    """AOTAutograd's joint graphs, without inductor's codegen (the experts: the loop eagerly, the grouped ops
    compiled), the K steps' expert weight gradients summed in one grouped matmul after the backward (chunked:
    expert_weight_grad "stacked") or per step."""
    calls = _stacked_calls(monkeypatch, weight_grad)
    cfg = ModelConfig.from_preset("debug", **PATHS[path])
    eager, compiled = _pair(cfg, backend="aot_eager", fullgraph=True)
    ks = [4, 4, _sampled_ks(cfg, 1)[0]]
    _assert_parity(eager, compiled, list(zip(ks, [True, False, True])))
    assert calls == ([k for k in ks if k > 1 for _ in "wd"] if weight_grad == "stacked" else [])  # compiled only


def test_ressformer_bf16_compiled_equals_eager_aot_eager(monkeypatch):
    """bf16 parameters and activations: the logits and loss equal eager's, the gradients within 1e-2 relative (the
    experts' weight gradients of the K steps summed in one grouped matmul, in bf16, against the loop's per step)."""
    calls = _stacked_calls(monkeypatch, "stacked")
    cfg = ModelConfig.from_preset("debug", **PATHS["block_query"])
    eager, compiled = _pair(cfg, backend="aot_eager", fullgraph=True)
    _assert_parity(eager.bfloat16(), compiled.bfloat16(), [(4, False), (2, True)], tol=1e-2)
    assert calls == [4, 4, 2, 2]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path,wrapper", [("block_chunk", "python"), ("chunked", "cpp")])
def test_ressformer_compiled_equals_eager_inductor(path, wrapper, monkeypatch):
    """Inductor (2 min a path on CPU; chunked's other graphs: aot_eager above) with its Python wrapper on one path, K
    fixed and sampled, and with its C++ wrapper (run config compile_cpp_wrapper) on the other, there with the K
    steps' expert weight gradients summed in one grouped matmul (expert_weight_grad "stacked")."""
    cfg = ModelConfig.from_preset("debug", **PATHS[path])
    eager, compiled = _pair(cfg, fullgraph=True, **({"options": {"cpp_wrapper": True}} if wrapper == "cpp" else {}))
    if wrapper == "cpp":
        calls = _stacked_calls(monkeypatch, "stacked")
        _assert_parity(eager, compiled, [(4, True), (2, False)])
        assert calls == [4, 4, 2, 2]
        return
    ks = _sampled_ks(cfg, 4)
    assert len(set(ks)) > 1, ks
    _assert_parity(eager, compiled, [(4, False), (4, True)] + [(k, i % 2 == 0) for i, k in enumerate(ks)])


# --- run config and trainer -------------------------------------------------------------------------------------
def test_run_config_compile_field():
    assert RunConfig().compile is False
    assert load_run_config(None, ["compile=true"]).compile is True
    with pytest.raises(ValueError, match="compile='yes'"):
        RunConfig(compile="yes")
    # compile_mode and compile_cpp_wrapper as torch.compile's arguments (it takes a mode or options, not both)
    from pretrain.engine import compile_kwargs

    assert compile_kwargs(RunConfig()) == {}
    assert compile_kwargs(load_run_config(None, ["compile_mode=max-autotune"])) == {"mode": "max-autotune"}
    assert compile_kwargs(load_run_config(None, ["compile=true", "compile_cpp_wrapper=true"])) == {
        "options": {"cpp_wrapper": True}}
    with pytest.raises(ValueError, match="compile_mode='reduce-overhead'.*compile_cpp_wrapper=false"):
        load_run_config(None, ["compile_cpp_wrapper=true", "compile_mode=reduce-overhead"])
