"""The Triton top-k attention kernel (ressformer/kernels/asam_triton.py) equals ASAM's PyTorch gathered path.

Without CUDA the kernels run in the Triton interpreter (numpy underneath, slow): sizes stay tiny here.
"""

import pytest
import torch

from tests.helpers.triton_interpreter import for_this_module

_interpreter_for_this_module_only = for_this_module()  # before triton (and the kernel module) is imported
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' or '.[gpu]')")

import ressformer.kernels as kernels  # noqa: E402
from ressformer.attention import Pattern, Selection, _edge_bias, _gathered_attend, sparse_attention  # noqa: E402
from ressformer.kernels.asam_triton import topk_attention  # noqa: E402
from ressformer.sparse import ACTIVATIONS, normalize  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _problem(seed, B, H, Q, Tk, D, kk, bias, dtype=torch.float32, device=DEV):
    """Random inputs: q / k non-contiguous views, distinct keys per row (shared across queries), ~20% slots
    masked, row (0, 0, 0) fully masked and row (0, 0, 1) with one unmasked slot."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Q, H, D, generator=g).transpose(1, 2)  # (B, H, Q, D) non-contiguous
    k = torch.randn(B, Tk, H, D, generator=g).transpose(1, 2)
    v = torch.randn(B, H, Tk, D, generator=g)
    key_idx = torch.stack([torch.randperm(Tk, generator=g)[:kk] for _ in range(B * H * Q)]).view(B, H, Q, kk)
    sel_mask = torch.rand(B, H, Q, kk, generator=g) > 0.2
    sel_mask[0, 0, 0] = False
    sel_mask[0, 0, 1] = False
    sel_mask[0, 0, 1, 3] = True
    b = 0.5 * torch.randn(B, H, Q, kk, generator=g) if bias else None
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    if b is not None:
        leaves.append(b.to(device).requires_grad_())
    return leaves, key_idx.to(device), sel_mask.to(device)


def _torch_topk(q, k, v, key_idx, sel_mask, bias, activation):
    """`_gathered_attend`'s computation with p returned: gather, scores (+ bias), mask, normalise, weighted sum."""
    B, H, Q, kk = key_idx.shape
    D = q.shape[-1]
    # the graph bias enters _gathered_attend through _edge_bias: one edge per slot, in slot order, is the bias itself
    epos = None if bias is None else torch.arange(kk, device=q.device).expand(B, H, Q, kk)
    out = _gathered_attend(q, k, v, Selection(key_idx, sel_mask, epos), edge_val=bias, activation=activation).out
    gi = key_idx.reshape(B, H, Q * kk, 1).expand(B, H, Q * kk, D)
    k_g = k.gather(2, gi).view(B, H, Q, kk, D).float()
    s = torch.einsum("bhid,bhikd->bhik", q.float(), k_g) / D ** 0.5
    if bias is not None:
        s = s + _edge_bias(epos, bias.float(), kk)
    p = normalize(torch.where(sel_mask, s, torch.full((), float("-inf"), device=s.device)), activation)
    return out, p


def _loss(out, p):
    """Uses both outputs, with weights that differ per element."""
    wo = torch.cos(torch.arange(out.numel(), device=out.device, dtype=torch.float32)).view(out.shape)
    wp = torch.sin(torch.arange(p.numel(), device=p.device, dtype=torch.float32)).view(p.shape)
    return (out.float() * wo).sum() + (p * wp).sum()


SHAPES = {"pow2": dict(B=2, H=2, Q=16, Tk=40, D=16, kk=8),  # one program per (batch, head), feature chunks 8+8
          "padded": dict(B=1, H=2, Q=9, Tk=80, D=40, kk=40)}  # padded queries / slots, five feature chunks of 8


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_matches_torch_path_forward_and_backward(activation, bias, shape):
    leaves, key_idx, sel_mask = _problem(1, **SHAPES[shape], bias=bias)
    q, k, v = leaves[:3]
    b = leaves[3] if bias else None
    out, p = topk_attention(q, k, v, key_idx, sel_mask, b, activation)
    ref_out, ref_p = _torch_topk(q, k, v, key_idx, sel_mask, b, activation)
    assert out.dtype == q.dtype and p.dtype == torch.float32
    assert (out - ref_out).abs().max() < 1e-4 and (p - ref_p).abs().max() < 1e-4
    rows = p.sum(-1)
    assert (rows[sel_mask.any(-1)] - 1).abs().max() < 1e-4
    assert rows[0, 0, 0] == 0 and out[0, 0, 0].abs().max() == 0  # fully masked row
    assert p[0, 0, 1, 3] == 1  # one unmasked slot: one-hot
    assert (p[~sel_mask] == 0).all()
    if activation != "softmax":
        assert (p[sel_mask] == 0).any()  # the sparse activation leaves slots out
    grads = torch.autograd.grad(_loss(out, p), leaves)
    ref_grads = torch.autograd.grad(_loss(ref_out, ref_p), leaves)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert (g - r).abs().max() < 1e-4, (name, (g - r).abs().max().item())
    assert all(g[0, 0, 0].abs().max() == 0 for g in (grads[0], *grads[3:]))  # nothing flows from a masked row


FORCED_TILES = {"one_query": dict(BLOCK_Q=1),  # kk = 1024's query block
                "wide": dict(BLOCK_Q=4, BLOCK_DC=16, BLOCK_DA=8),  # gather chunks 16+2, scatter chunks 8+8+2
                "narrow": dict(BLOCK_DC=2, BLOCK_DA=1)}


@pytest.mark.parametrize("tiles", list(FORCED_TILES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_with_forced_tiles_and_strided_features(activation, tiles, monkeypatch):
    """Tiles other than those _blocks picks at this size (ragged feature chunks: D = 18) and q / k / v whose features
    are not contiguous (the launcher copies them to unit stride) give the PyTorch path's outputs and gradients."""
    from ressformer.kernels import asam_triton

    blocks = asam_triton._blocks
    monkeypatch.setattr(asam_triton, "_blocks", lambda *a, **kw: {**blocks(*a, **kw), **FORCED_TILES[tiles]})
    leaves, key_idx, sel_mask = _problem(9, B=1, H=2, Q=6, Tk=30, D=18, kk=12, bias=True)
    strided = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in leaves[:3]]  # feature stride Q or Tk
    assert all(x.stride(-1) != 1 for x in strided)
    out, p = topk_attention(*strided, key_idx, sel_mask, leaves[3], activation)
    ref_out, ref_p = _torch_topk(*leaves[:3], key_idx, sel_mask, leaves[3], activation)
    assert (out - ref_out).abs().max() < 1e-4 and (p - ref_p).abs().max() < 1e-4
    grads = torch.autograd.grad(_loss(out, p), leaves)
    ref_grads = torch.autograd.grad(_loss(ref_out, ref_p), leaves)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert (g - r).abs().max() < 1e-4, (name, (g - r).abs().max().item())


@pytest.mark.parametrize("activation", ["sparsemax", "entmax15"])
def test_thresholds_of_long_rows_sum_to_one(activation):
    """kk = 512 slots (a 2-query block per program): bisection + Newton rows sum to 1 within 1e-5, with flat
    scores (supports of tens to hundreds of slots) and peaked ones (a few slots)."""
    leaves, key_idx, sel_mask = _problem(2, B=1, H=1, Q=4, Tk=600, D=16, kk=512, bias=True)
    q, k, v, b = (t.detach() for t in leaves)
    for scale in (0.05, 4.0):
        out, p = topk_attention(scale * q, k, v, key_idx, sel_mask, scale * b, activation)
        ref_out, ref_p = _torch_topk(scale * q, k, v, key_idx, sel_mask, scale * b, activation)
        assert (p.sum(-1)[0, 0, 1:] - 1).abs().max() < 1e-5
        assert (p - ref_p).abs().max() < 1e-5 and (out - ref_out).abs().max() < 1e-4
    assert (p > 0).sum(-1)[0, 0, 2:].max() < 10 and (ref_p > 0).sum() == (p > 0).sum()


@pytest.mark.parametrize("which", ["out", "p"])
def test_gradient_through_one_output(which):
    """Only out or only p in the loss (the other's gradient is None inside the backward)."""
    leaves, key_idx, sel_mask = _problem(8, B=1, H=2, Q=8, Tk=24, D=16, kk=8, bias=True)
    res = [topk_attention(*leaves[:3], key_idx, sel_mask, leaves[3], "entmax15"),
           _torch_topk(*leaves[:3], key_idx, sel_mask, leaves[3], "entmax15")]
    w = torch.cos(torch.arange(16, dtype=torch.float32, device=DEV))  # (D,)
    grads = [torch.autograd.grad((out * w).sum() if which == "out" else (p * p).sum(), leaves, allow_unused=True)
             for out, p in res]
    for a, r, x in zip(*grads, leaves):
        r = torch.zeros_like(x) if r is None else r  # v does not reach p
        assert (a - r).abs().max() < 1e-4


def test_gathered_attend_dispatch_with_graph_and_pattern(monkeypatch):
    """_gathered_attend under asam_kernel='triton' (graph edges on some slots, SOES pattern from the kernel's p)
    equals the PyTorch path: out, nnz, pattern and the gradients of q, k, v and the edge values."""
    (q, k, v), key_idx, sel_mask = _problem(3, B=1, H=2, Q=10, Tk=16, D=16, kk=6, bias=False)
    g = torch.Generator().manual_seed(4)
    epos = torch.randint(-1, 6, (1, 2, 10, 3), generator=g).to(DEV)  # slot of each edge, -1: absent
    gval = torch.rand(1, 2, 10, 3, generator=g).to(DEV).requires_grad_()
    qp = torch.arange(6, 16, device=DEV)
    res = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(kernels, "asam_kernel", mode)
        out, nnz, (p_idx, p_val) = _gathered_attend(q, k, v, Selection(key_idx, sel_mask, epos), edge_val=gval,
                                                    activation="entmax15", q_pos=qp, pattern=Pattern(16, 4))
        loss = _loss(out, p_val)
        res[mode] = (out, nnz, p_idx, p_val, torch.autograd.grad(loss, (q, k, v, gval)))
    (o0, n0, i0, v0, g0), (o1, n1, i1, v1, g1) = res["torch"], res["triton"]
    assert (o0 - o1).abs().max() < 1e-4 and n0 == n1 and torch.equal(i0, i1) and (v0 - v1).abs().max() < 1e-5
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("impl", ["chunked", "block"])
def test_sparse_attention_with_kernel_equals_torch(impl, monkeypatch):
    """The whole top-k ASAM call (selection, graph bias, pattern) with the kernel forced equals the PyTorch path."""
    g = torch.Generator().manual_seed(5)
    B, H, T, D = 1, 2, 12, 16
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEV).requires_grad_() for _ in range(3))
    graph = (torch.randint(0, T, (B, T, 3), generator=g).to(DEV), torch.rand(B, T, 3, generator=g).to(DEV))
    scale = torch.ones(H, device=DEV, requires_grad=True)
    pos = torch.arange(T, device=DEV)
    kw = dict(q_pos=pos, k_pos=pos, activation="sparsemax", topk=4, graph=graph, graph_scale=scale, impl=impl,
              chunk_size=4, block_size=2, blocks_per_query=2, pattern_degree=3)
    res = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(kernels, "asam_kernel", mode)
        out, stats = sparse_attention(q, k, v, **kw)
        loss = _loss(out, stats["pattern"][1])
        res[mode] = (out, stats, torch.autograd.grad(loss, (q, k, v, scale)))
    (o0, s0, g0), (o1, s1, g1) = res["torch"], res["triton"]
    assert (o0 - o1).abs().max() < 1e-4 and s0["density"] == s1["density"]
    assert torch.equal(s0["pattern"][0], s1["pattern"][0])
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() < 1e-4


def test_kernel_modes(monkeypatch):
    with pytest.raises(ValueError, match="choose one of"):
        kernels.set_asam_kernel("cuda")
    monkeypatch.setattr(kernels, "asam_kernel", "auto")
    assert kernels.use_asam_kernel(torch.zeros(1, device=DEV)) == CUDA
    assert not kernels.use_asam_kernel(torch.zeros(1, dtype=torch.float64, device=DEV))
    monkeypatch.setattr(kernels, "asam_kernel", "torch")
    assert not kernels.use_asam_kernel(torch.zeros(1, device=DEV))
    (q, k, v), key_idx, sel_mask = _problem(0, B=1, H=1, Q=2, Tk=6, D=4, kk=4, bias=False)
    with pytest.raises(ValueError, match="float32 / bfloat16 / float16"):
        topk_attention(q.double(), k.double(), v.double(), key_idx, sel_mask, None, "softmax")
    with pytest.raises(ValueError, match="choose one of"):
        topk_attention(q, k, v, key_idx, sel_mask, None, "relu")


@pytest.mark.skipif(not CUDA, reason="bf16 kernel check needs CUDA (the interpreter run above is fp32)")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_bf16_close_to_fp32_torch_path(activation):
    leaves, key_idx, sel_mask = _problem(6, B=2, H=4, Q=256, Tk=512, D=64, kk=64, bias=True, dtype=torch.bfloat16)
    out, p = topk_attention(*leaves[:3], key_idx, sel_mask, leaves[3], activation)
    ref_out, ref_p = _torch_topk(*leaves[:3], key_idx, sel_mask, leaves[3], activation)
    grads = torch.autograd.grad(_loss(out, p), leaves)
    ref_grads = torch.autograd.grad(_loss(ref_out, ref_p), leaves)
    for name, a, r in zip(("out", "p", "dq", "dk", "dv", "dbias"), (out, p, *grads), (ref_out, ref_p, *ref_grads)):
        rel = (a.float() - r.float()).norm() / r.float().norm().clamp(min=1e-12)
        assert rel < 1e-2, (name, rel.item())


@pytest.mark.skipif(not CUDA, reason="large sizes need CUDA (the Triton interpreter is numpy underneath)")
@pytest.mark.parametrize("kk", [16, 128, 512])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_large_fp32(activation, kk):
    leaves, key_idx, sel_mask = _problem(7, B=2, H=8, Q=1024, Tk=2048, D=128, kk=kk, bias=True)
    out, p = topk_attention(*leaves[:3], key_idx, sel_mask, leaves[3], activation)
    ref_out, ref_p = _torch_topk(*leaves[:3], key_idx, sel_mask, leaves[3], activation)
    assert (p.sum(-1)[sel_mask.any(-1)] - 1).abs().max() < 1e-5
    assert (out - ref_out).abs().max() < 1e-4 and (p - ref_p).abs().max() < 1e-4
    grads = torch.autograd.grad(_loss(out, p), leaves)
    ref_grads = torch.autograd.grad(_loss(ref_out, ref_p), leaves)
    for name, a, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert (a - r).abs().max() < 1e-3 * max(1.0, r.abs().max().item()), name


@pytest.mark.parametrize("name", ["chunked", "block"])
def test_document_masked_model_with_kernel_equals_each_document_alone(monkeypatch, name):
    """Document masking through the kernel: the model's packed forward with the kernel forced (selection with
    per-sample positions, block ASAM's per-document blocks, R2MU memory and SOES edges feeding it) gives each
    document the logits the PyTorch path gives it alone (the kernel's packed loss gradients equal the PyTorch
    path's)."""
    from tests.ressformer.test_document_mask import model_of, packed, tiny, worst_vs_alone

    cfg = tiny(name)
    model = model_of(cfg).to(DEV)
    x, docs = (t.to(DEV) for t in packed(cfg))
    res = {}
    for mode in ("torch", "triton"):
        monkeypatch.setattr(kernels, "asam_kernel", mode)
        model.zero_grad()
        out = model(x, labels=x, documents=docs, return_logits=True)
        out.loss.backward()
        res[mode] = out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    monkeypatch.setattr(kernels, "asam_kernel", "torch")
    assert worst_vs_alone(model, x, docs, docs) < 2e-5  # the PyTorch path: each document as alone
    assert (res["triton"][0] - res["torch"][0]).abs().max() < 1e-5  # so the kernel's too
    for a, b in zip(res["torch"][1], res["triton"][1]):
        assert (a - b).abs().max() < 1e-4
