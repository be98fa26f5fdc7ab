"""MoE feed-forward (ressformer/moe.py): dropless routed experts vs a per-token loop, AutoEP routing parity,
aux losses, gradients, edge cases (one expert gets everything, empty experts)."""

from __future__ import annotations

import math

import pytest
import torch

from ressformer.config import ModelConfig
from ressformer.moe import DenseMLP, MoEBlock, make_mlp, moe_aux_losses, route
from tests.helpers.reference_moe import reference_moe


def _cfg(E=4, k=2, shared=0, d=16, f=24):
    return ModelConfig(d_model=d, n_heads=2, ffn_hidden=f,
                       moe={"num_experts": E, "experts_per_token": k, "shared_experts": shared})


def _block(E=4, k=2, shared=0, seed=0):
    torch.manual_seed(seed)
    b = MoEBlock(_cfg(E, k, shared)).double()
    b.init_weights(0.3)  # large std so routing is far from ties
    return b


@pytest.mark.parametrize("E,k,shared", [(4, 1, 0), (4, 2, 0), (8, 1, 1), (8, 2, 1), (8, 2, 0), (4, 2, 2)])
def test_dropless_matches_per_token_loop(E, k, shared):
    b = _block(E, k, shared)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    y, logits = b(x)
    assert y.shape == x.shape and logits.shape == (21, E)
    ref = reference_moe(b, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)  # routing weights are float32 (AutoEP)
    if shared:
        assert b.shared_experts.hidden == 24 * shared


def test_gradients_reach_gate_every_expert_and_shared():
    b = _block(E=4, k=2, shared=1)
    x = torch.randn(4, 16, 16, dtype=torch.float64)
    y, logits = b(x)
    assert torch.bincount(route(logits, 2)[1].reshape(-1), minlength=4).min() > 0  # every expert used
    (y ** 2).sum().backward()
    assert b.gate.weight.grad.abs().min() > 0
    gu, dn = b.experts.gate_up_proj.grad, b.experts.down_proj.grad
    for e in range(4):
        assert gu[e].abs().sum() > 0 and dn[e].abs().sum() > 0, f"expert {e} got no gradient"
    assert b.shared_experts.gate_up_proj.weight.grad.abs().sum() > 0
    assert b.shared_experts.down_proj.weight.grad.abs().sum() > 0


def test_routing_matches_deepspeed_autoep_router():
    """Our route() == deepspeed/moe/ep_router.py TokenChoiceTopKRouter with the mixtral preset settings
    (deepspeed/module_inject/auto_ep_presets/mixtral.py: softmax, route_norm=True, no gate bias)."""
    ep_router = pytest.importorskip("deepspeed.moe.ep_router")
    torch.manual_seed(1)
    E, k, D = 8, 2, 16
    r = ep_router.TokenChoiceTopKRouter(dim=D, num_experts=E, num_expert_groups=None, num_limited_groups=None,
                                        top_k=k, score_func="softmax", route_norm=True, route_scale=1.0,
                                        gate_bias=False)
    x = torch.randn(50, D)
    ds_w, ds_idx, ds_counts = r(x)
    w, idx = route(r.gate(x), k)
    # deepspeed's topk is unsorted: compare per token as sets of (expert, weight)
    o1, o2 = ds_idx.sort(-1), idx.sort(-1)
    assert torch.equal(o1.values, o2.values)
    torch.testing.assert_close(ds_w.gather(1, o1.indices), w.gather(1, o2.indices))
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    assert torch.equal(ds_counts.long(), torch.bincount(idx.reshape(-1), minlength=E))
    # and the whole block built around that gate weight gives the router's combination
    b = MoEBlock(_cfg(E, k, 0, d=D))
    b.gate.weight.data.copy_(r.gate.weight.data)
    y, _ = b(x.unsqueeze(0))
    manual = torch.zeros_like(x)
    for n in range(50):
        for j in range(k):
            e = int(ds_idx[n, j])
            manual[n] += ds_w[n, j] * b.experts.expert(e, x[n:n + 1])[0]
    torch.testing.assert_close(y[0], manual, rtol=1e-5, atol=1e-6)


def test_autoep_reads_the_router_logits_where_forward_returns_them():
    """MoEBlock._can_record_outputs tells AutoEP (deepspeed/module_inject/auto_ep.py `_detect_forward_contract`) that
    the block returns (output, router_logits) and where the logits are: the contract it detects points at index 1
    of our forward's output, which holds the gate's logits of every token."""
    auto_ep = pytest.importorskip("deepspeed.module_inject.auto_ep")
    b = _block(E=4, k=2)
    contract = auto_ep._detect_forward_contract(b, b.gate)
    assert contract.return_router_logits and contract.capture_target == "moe_block", contract
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = b(x)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[contract.capture_index], b.gate(x.reshape(10, 16)), rtol=0, atol=0)


def test_balance_loss_uniform_and_skewed():
    E, k, N = 4, 1, 8
    # each token prefers a different expert in turn, with equal mean probabilities -> f = P = 1/E
    logits = torch.full((N, E), 0.0)
    logits[torch.arange(N), torch.arange(N) % E] = 2.0
    a = moe_aux_losses(logits, k, E)
    torch.testing.assert_close(a["balance"], torch.tensor(1.0))
    torch.testing.assert_close(a["load"], torch.full((E,), 0.25))
    # all exactly uniform logits also give 1 whatever expert topk picks (P_e = 1/E, sum f = 1)
    torch.testing.assert_close(moe_aux_losses(torch.zeros(N, E), 2, E)["balance"], torch.tensor(1.0))
    # skewed: every token to expert 0
    sk = torch.zeros(N, E)
    sk[:, 0] = 3.0
    a = moe_aux_losses(sk, k, E)
    p0 = math.exp(3) / (math.exp(3) + 3)
    assert abs(a["balance"].item() - E * p0) < 1e-5 and a["balance"].item() > 1.0
    torch.testing.assert_close(a["load"], torch.tensor([1.0, 0, 0, 0]))


def test_z_loss_hand_checked():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [math.log(3.0), 0.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2 + math.log(4.0) ** 2) / 3
    assert abs(moe_aux_losses(logits, 1, 2)["z"].item() - want) < 1e-6


def test_balance_gradient_reaches_router():
    logits = torch.randn(16, 4, requires_grad=True)
    moe_aux_losses(logits, 2, 4)["balance"].backward()
    assert logits.grad.abs().sum() > 0


def test_make_mlp_dense_for_one_expert():
    cfg = ModelConfig(d_model=16, n_heads=2, ffn_hidden=24, moe={"num_experts": 1})
    m = make_mlp(cfg)
    assert isinstance(m, DenseMLP)
    assert m.gate_up_proj.weight.shape == (48, 16) and m.down_proj.weight.shape == (16, 24)
    x = torch.randn(2, 3, 16)
    y, rl = m(x)
    assert rl is None and y.shape == x.shape
    g, u = (x @ m.gate_up_proj.weight.t()).chunk(2, -1)
    torch.testing.assert_close(y, (torch.nn.functional.silu(g) * u) @ m.down_proj.weight.t())
    assert isinstance(make_mlp(_cfg(4, 2)), MoEBlock)
    with pytest.raises(ValueError, match="num_experts"):
        MoEBlock(cfg)


def test_all_tokens_same_experts_and_empty_experts():
    b = _block(E=8, k=2)
    with torch.no_grad():  # gate that sends every token to experts 3 and 5 (others empty)
        b.gate.weight.zero_()
        b.gate.weight[3, 0] = 10.0
        b.gate.weight[5, 0] = 9.0
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1.0
    y, logits = b(x)
    idx = route(logits, 2)[1]
    assert set(idx.reshape(-1).tolist()) == {3, 5}
    torch.testing.assert_close(y, reference_moe(b, x), rtol=1e-5, atol=1e-6)  # routing weights are float32 (AutoEP)
    y.sum().backward()
    g = b.experts.gate_up_proj.grad
    assert g[3].abs().sum() > 0 and g[5].abs().sum() > 0
    assert all(g[e].abs().sum() == 0 for e in (0, 1, 2, 4, 6, 7))


def test_experts_forward_with_duplicate_expert_per_token():
    """MoEExperts itself accepts a token listing the same expert twice (weights add)."""
    b = _block(E=4, k=2)
    x = torch.randn(5, 16, dtype=torch.float64)
    idx = torch.full((5, 2), 2, dtype=torch.long)
    w = torch.full((5, 2), 0.5, dtype=torch.float64)
    torch.testing.assert_close(b.experts(x, idx, w), b.experts.expert(2, x))


def test_meta_device_init():
    with torch.device("meta"):
        b = MoEBlock(_cfg(4, 2, 1))
        b.init_weights(0.02, 0.01)
    b = b.to_empty(device="cpu")
    b.init_weights(0.02, 0.01)
    assert torch.isfinite(b.experts.down_proj).all()
    assert abs(b.experts.down_proj.std().item() - 0.01) < 0.003
    y, _ = b(torch.randn(1, 3, 16))
    assert torch.isfinite(y).all()


# --- grouped GEMM (torch._grouped_mm) and static-shape tiles vs the per-expert loop -----------------------------
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
SYNC_FREE = [pytest.param("grouped_mm", marks=needs_grouped_mm), "padded"]


@pytest.fixture
def moe_mode():
    from ressformer import kernels

    yield kernels.set_moe_experts
    kernels.set_moe_experts("auto")


def _fwd_bwd(b, x, g):
    b.zero_grad()
    x = x.clone().requires_grad_()
    y, logits = b(x)
    y.backward(g)
    return [y.detach(), x.grad, b.gate.weight.grad, b.experts.gate_up_proj.grad, b.experts.down_proj.grad]


@pytest.mark.parametrize("mode", SYNC_FREE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k,n,empty", [(4, 1, 40, False), (8, 2, 40, False), (8, 2, 40, True), (8, 2, 3, False)])
def test_sync_free_experts_match_loop(moe_mode, mode, dtype, E, k, n, empty):
    """One torch._grouped_mm per projection, or batched matmuls over static tiles of expert-sorted rows, == one
    matmul per expert: output and every gradient, an expert that gets no token included (zero gradient either way);
    n = 3 tokens: tiles of one row."""
    torch.manual_seed(0)
    b = MoEBlock(_cfg(E, k, 0, d=32, f=64)).to(DEV, dtype)
    b.init_weights(0.3)
    x = torch.randn(2, n, 32, device=DEV, dtype=dtype)
    if empty:  # no token routes to the last expert: a constant feature 0 and its router row -20 along it
        x[..., 0] = 1.0
        with torch.no_grad():
            b.gate.weight[-1] = 0.0
            b.gate.weight[-1, 0] = -20.0
    g = torch.randn(2, n, 32, device=DEV, dtype=dtype)
    loop_counts = torch.bincount(route(b.gate(x.reshape(-1, 32)), k)[1].reshape(-1), minlength=E)
    assert not empty or loop_counts[-1] == 0
    moe_mode("loop")
    ref = _fwd_bwd(b, x, g)
    moe_mode(mode)
    out = _fwd_bwd(b, x, g)
    # fp32: other summation orders for the weight gradients (per tile, then per expert); bf16: the same, each
    # tile's partial gradient rounded to bf16 (a 1-ulp difference on an entry of a gradient)
    for name, r, o in zip(("y", "dx", "gate", "gate_up_proj", "down_proj"), ref, out):
        if dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert ((o - r).float().norm() / r.float().norm()).item() < 1e-2, name
    if empty:
        assert out[3][-1].abs().sum() == 0 and out[4][-1].abs().sum() == 0


@pytest.mark.parametrize("mode", ["loop", pytest.param("auto", marks=needs_grouped_mm)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k,n,empty", [(8, 2, 40, True), (4, 1, 3, False)])
def test_compiled_experts_equal_the_loop(moe_mode, mode, dtype, E, k, n, empty):
    """Under torch.compile on CPU the loop runs as one custom op (ressformer::experts_loop, its backward written
    out), and "auto" runs torch._grouped_mm as ops of ours (ressformer::grouped_linear, float32 too, where torch's
    own op traces in bfloat16 only) between gathers that move the tokens to expert-sorted rows and back (forward and
    backward): fullgraph compiles, and output and every gradient equal the eager loop's (an expert without tokens
    included: zero gradient)."""
    torch.manual_seed(0)
    b = MoEBlock(_cfg(E, k, 0, d=32, f=64)).to(DEV, dtype)
    b.init_weights(0.3)
    x = torch.randn(2, n, 32, device=DEV, dtype=dtype)
    if empty:
        x[..., 0] = 1.0
        with torch.no_grad():
            b.gate.weight[-1] = 0.0
            b.gate.weight[-1, 0] = -20.0
    g = torch.randn(2, n, 32, device=DEV, dtype=dtype)
    moe_mode("loop")
    ref = _fwd_bwd(b, x, g)
    moe_mode(mode)
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    out = _fwd_bwd(torch.compile(b, backend=backend, fullgraph=True), x, g)
    for name, r, o in zip(("y", "dx", "gate", "gate_up_proj", "down_proj"), ref, out):
        if dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert (o - r).float().norm() <= 1e-2 * r.float().norm(), name  # k = 1: the router's gradient is 0
    if mode == "loop":
        assert torch.equal(out[0], ref[0])  # the forward runs the loop's own operations
    fw, bw = (graph.code for graph in backend.fw_graphs + backend.bw_graphs)
    if DEV == "cpu":
        ops = ("experts_loop.",) if mode == "loop" else ("grouped_linear.", "grouped_linear.")
        assert [op for op in ("experts_loop.", "grouped_linear.") for _ in range(fw.count(op))] == list(ops)
        assert bw.count("grouped_weight_grad.") == (0 if mode == "loop" else 2)
    if mode == "auto":  # tokens to sorted rows and back by gathers: no scatter-add (atomic adds under inductor)
        assert "index_add" not in fw + bw and "index_put" not in fw + bw
        assert fw.count("aten.index_select.") == 3 and bw.count("aten.index_select.") == 3  # x, weight, output
    if empty:
        assert out[3][-1].abs().sum() == 0 and out[4][-1].abs().sum() == 0


def test_padded_tiles_hold_every_row_whatever_the_routing():
    """The static tile count (R + E (t - 1)) // t holds every expert's rows padded to whole tiles for any counts
    (all rows to one expert, an even spread, E - 1 experts one row past a whole tile), and the padding stays under
    half the rows (tiles of one row when there are fewer rows than 4 E)."""
    from ressformer.moe import expert_tile

    for R, E in ((2048, 16), (2048, 4), (80, 8), (6, 8), (1, 4), (1000, 3)):
        t = expert_tile(R, E)
        assert t & (t - 1) == 0 and 1 <= t <= 128 and (t == 1 or E * (t - 1) < R / 2), (R, E, t)
        n_tiles = (R + E * (t - 1)) // t
        spread = [R // E] * (E - 1) + [R - R // E * (E - 1)]
        routings = [[R] + [0] * (E - 1), spread]
        if R >= (E - 1) * (t + 1):
            routings.append([t + 1] * (E - 1) + [R - (E - 1) * (t + 1)])
        for counts in routings:
            assert sum(-(-c // t) for c in counts) <= n_tiles, (R, E, t, counts)


@pytest.mark.parametrize("mode,weight_grad", [pytest.param("grouped_mm", "stacked", marks=needs_grouped_mm),
                                               pytest.param("grouped_mm", "per_step", marks=needs_grouped_mm),
                                               ("padded", "stacked")])
def test_sync_free_experts_model_matches_loop(moe_mode, mode, weight_grad, monkeypatch):
    """The debug ReSSFormer (4 experts top-2 in the shared block, K = 4) trains the same either way: loss and every
    gradient. On CPU the grouped ops sum the K steps' expert weight gradients in one grouped matmul per weight
    (`ExpertWeightTaps`), once per backward, under expert_weight_grad "stacked"; "per_step" as before."""
    from ressformer import build_model
    from tests.ressformer.test_compile import _stacked_calls

    cfg = ModelConfig.from_preset("debug")
    assert cfg.moe.enabled
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    stacked = _stacked_calls(monkeypatch, weight_grad)
    res = {}
    for m in ("loop", mode):
        moe_mode(m)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        res[m] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert stacked == ([4, 4] if (mode, weight_grad) == ("grouped_mm", "stacked") else [])  # gate_up, down: K calls
    torch.testing.assert_close(res[mode][0], res["loop"][0], rtol=1e-6, atol=0)
    assert res[mode][1].keys() == res["loop"][1].keys()
    for n, g in res["loop"][1].items():
        torch.testing.assert_close(res[mode][1][n], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_weight_grad_is_the_sum_of_the_calls_weight_grads(dtype):
    """The taps' parts round-trip exactly (offsets past 2^8, 2^16 and 2^24 as bytes, in bfloat16 too), and one
    grouped matmul over every call's rows, group by group, gives the sum of the calls' weight gradients: calls with
    an empty group, with every row in one group, and a group no call uses (zero gradient)."""
    from ressformer.moe import _grouped_weight_grad, _stacked_weight_grad, _tap_grad, _tap_parts

    torch.manual_seed(0)
    E, n_out, n_in, R = 5, 16, 8, 40
    offs = torch.tensor([0, 255, 256, 65537, (1 << 24) + 3], dtype=torch.int32)
    g, x = torch.randn(R, n_out, dtype=dtype), torch.randn(R, n_in, dtype=dtype)
    g2, x2, o2 = _tap_parts(_tap_grad(g, x, offs), torch.Size((E, n_out, n_in)))
    assert torch.equal(g2, g) and torch.equal(x2, x) and torch.equal(o2, offs.long())
    counts = [[10, 0, 20, 10, 0], [0, 0, 40, 0, 0], [5, 15, 5, 15, 0]]  # the last group: no rows in any call
    parts = [(torch.randn(R, n_out, dtype=dtype), torch.randn(R, n_in, dtype=dtype), torch.tensor(c).cumsum(0))
             for c in counts]
    got = _stacked_weight_grad(*map(list, zip(*parts)))
    want = sum(_grouped_weight_grad(g, x, o.to(torch.int32)).float() for g, x, o in parts)
    assert got.dtype == dtype and got.shape == (E, n_out, n_in) and got[-1].abs().sum() == 0
    torch.testing.assert_close(got.float(), want, rtol=1e-5 if dtype == torch.float32 else 2e-2,
                               atol=1e-5 if dtype == torch.float32 else 5e-2)


def test_weight_taps_only_where_the_grouped_ops_run_with_gradients(moe_mode):
    """`MoEExperts.weight_taps` makes taps for CPU grouped ops (compiled under "auto", always under "grouped_mm")
    with gradients and K >= 2 calls, and None for the loop, the tiles, one call, no gradient, autocast, another
    dtype than the weights', ZeRO-3 partitioned weights, expert_weight_grad "per_step", and under "auto" rows as
    large as the weights."""
    from ressformer import kernels
    from ressformer.moe import MoEExperts

    ex = MoEExperts(4, 16, 32)  # gate_up (4, 64, 16): 4096 elements; 12 rows x (64 + 16) = 960
    x = torch.zeros(6, 16)
    grouped = hasattr(torch, "_grouped_mm")
    moe_mode("auto")
    assert (ex.weight_taps(x, 51, 3, compiled=True) is None) != grouped  # 4080 < 4096: auto stacks
    assert ex.weight_taps(x, 52, 3, compiled=True) is None  # 4160 >= 4096: per step
    assert ex.weight_taps(x, 12, 3, compiled=False) is None  # eager CPU: the loop
    taps = ex.weight_taps(x, 12, 3, compiled=True)
    assert (taps is not None) == grouped
    if grouped:
        assert len(taps) == 3 and all(len(t) == 2 and t[0].requires_grad for t in taps)
        assert taps[0][0].shape == (12 * (64 + 16) + 16,) and taps[0][1].shape == (12 * (16 + 32) + 16,)
    assert ex.weight_taps(x, 12, 1, compiled=True) is None
    assert ex.weight_taps(x.bfloat16(), 12, 3, compiled=True) is None
    with torch.no_grad():
        assert ex.weight_taps(x, 12, 3, compiled=True) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ex.weight_taps(x, 12, 3, compiled=True) is None
    ex.down_proj.ds_id = 7  # as ZeRO-3 marks a partitioned parameter (its shape is then not its gradient's)
    assert ex.weight_taps(x, 12, 3, compiled=True) is None
    del ex.down_proj.ds_id
    moe_mode("padded")
    assert ex.weight_taps(x, 12, 3, compiled=True) is None
    moe_mode("grouped_mm")
    assert (ex.weight_taps(x, 12, 3, compiled=False) is not None) == grouped
    kernels.set_expert_weight_grad("stacked")
    try:
        assert (ex.weight_taps(x, 52, 3, compiled=True) is None) != grouped
        kernels.set_expert_weight_grad("per_step")
        assert ex.weight_taps(x, 12, 3, compiled=True) is None
        with pytest.raises(ValueError, match="choose one of"):
            kernels.set_expert_weight_grad("fused")
    finally:
        kernels.set_expert_weight_grad("auto")


def test_experts_path_decision(moe_mode, monkeypatch):
    from ressformer import kernels

    x32 = torch.zeros(3, 8)
    moe_mode("auto")  # CPU: the loop; under torch.compile grouped GEMM for aligned fp32 / bf16, else the loop (one op)
    assert kernels.experts_path(x32, (8, 16)) == "loop" and kernels.experts_path(x32.bfloat16(), (8, 16)) == "loop"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    has_grouped = hasattr(torch, "_grouped_mm")
    assert kernels.experts_path(x32, (8, 16)) == ("grouped_mm" if has_grouped else "loop")
    assert kernels.experts_path(x32.bfloat16(), (8, 16)) == ("grouped_mm" if has_grouped else "loop")
    assert kernels.experts_path(x32, (8, 6)) == "loop"  # 24 bytes: not 16-byte aligned
    assert kernels.experts_path(x32.bfloat16(), (8, 12)) == "loop"
    assert kernels.experts_path(x32.half(), (8, 16)) == "loop"
    monkeypatch.undo()
    if CUDA:  # bf16 on sm90 / sm100 with aligned widths: torch's grouped GEMM; anything else: the tiles
        xc = x32.cuda()
        native = torch.cuda.get_device_capability()[0] in (9, 10) and hasattr(torch, "_grouped_mm")
        assert kernels.experts_path(xc.bfloat16(), (8, 16)) == ("grouped_mm" if native else "padded")
        assert kernels.experts_path(xc, (8, 16)) == "padded"
        assert kernels.experts_path(xc.bfloat16(), (8, 12)) == "padded"  # 24 bytes: not 16-byte aligned
    moe_mode("loop")
    assert kernels.experts_path(x32.bfloat16(), (8, 16)) == "loop"
    moe_mode("padded")
    assert kernels.experts_path(x32, (8, 6)) == "padded"
    moe_mode("grouped_mm")
    if hasattr(torch, "_grouped_mm"):
        assert kernels.experts_path(x32, (8, 16)) == "grouped_mm"
        with pytest.raises(ValueError, match=r"widths \(8, 6\).*multiples of 4"):
            kernels.experts_path(x32, (8, 6))
    with pytest.raises(ValueError, match="choose one of"):
        kernels.set_moe_experts("cuda")
