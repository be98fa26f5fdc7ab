"""AdaSplash (PyPI `adasplash`, the bench/attention.py row) computes ressformer's dense causal sparse attention.

`adasplash.adasplash(q, k, v, alpha, is_causal=True)` as the bench calls it, against
`sparse_attention(impl="reference", topk=0)` (scores q k^T / sqrt(D), causal mask, ressformer.sparse's exact
sort-based sparsemax / entmax15, times v): forward and backward (dq, dk, dv), float32. alpha=2 dispatches to
AdaSplash's v1 kernel (Halley / bisection threshold, niter=10), alpha=1.5 to its v2 kernel (histogram, niter=1).

Without CUDA the kernels run in the Triton interpreter (numpy underneath, slow): sizes stay small, but T >= 128 and a
power of two (v2: N_CTX >= 64 and a power of two; both backward passes read / write PRE_BLOCK=128 rows per program
without a mask, so T < 128 overruns the buffers in the interpreter). AdaSplash 0.2.2 targets CUDA only; on CPU these
test-local patches (none on CUDA) make it run without changing its arithmetic:
  * v1 `compute_bidxs_and_cubcounts` allocates on device="cuda" by default: given q's device;
  * v2 `_get_tau` takes BLOCK_M / BLOCK_N from its autotuner, which AdaSplash skips under TRITON_INTERPRET:
    given (64, 64), one of its autotune configs (the pass only finds the row max, any block size is exact);
  * v2 calls `libdevice.popc` / `libdevice.float2int_rd` (stubs in the interpreter) and PTX `fns.b32` through
    inline asm (`get_next_block`, unsupported there): replaced by exact Triton-language equivalents below.

Measured on CPU (T=128, D=16 / 32, unit-normal inputs as in the bench): max abs diff <= 3.4e-6 in out / dq / dk /
dv for both alphas; the tolerance 1e-4 keeps a > 25x margin.

Known disagreement (the xfail below; ressformer's side equals a float64 sort-based sparsemax to 7e-6 there): v1's
Halley step is rejected when the threshold lands exactly on its lower bound max(s) - 1 (a one-hot sparsemax row) and
|s| is large enough (~30) that its EPS=1e-6 is below float32 resolution; the row then bisects, and after niter=10
its threshold, hence out and dv, is off by ~1e-3 (dq / dk depend on the support only and still agree).
"""

import pytest
import torch

from tests.helpers.triton_interpreter import for_this_module

_interpreter_for_this_module_only = for_this_module()  # before triton (and adasplash's kernel modules) are imported
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' or '.[gpu]')")
pytest.importorskip("adasplash", reason="adasplash is not installed (pip install -e '.[dev]' or '.[gpu]')")


import adasplash  # noqa: E402
import adasplash.adasplash_block_mask as ada_v1  # noqa: E402  (kernels defined now, under the interpreter)
import adasplash.adasplash_v2 as ada_v2  # noqa: E402
import triton.language as tl  # noqa: E402

from ressformer.attention import sparse_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
ACTIVATION = {2.0: "sparsemax", 1.5: "entmax15"}
TOL = 1e-4
# v1 takes log2(s - tau) of every score and discards the entries outside the support with tl.where afterwards
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in log2:RuntimeWarning")


@triton.jit
def _popc(x):
    """libdevice.popc: set bits of a 32-bit integer."""
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _float2int_rd(x):
    """libdevice.float2int_rd: float to int32 rounding towards -inf."""
    return tl.floor(x).to(tl.int32)


@triton.jit
def _get_next_block(bmask, n_blk):
    """PTX `fns.b32 d, bmask, 0, n_blk + 1`: position of the (n_blk + 1)-th set bit of bmask from bit 0 (-1: none)."""
    x = bmask.to(tl.uint32, bitcast=True)
    seen = n_blk * 0
    pos = n_blk * 0 - 1
    for i in range(32):
        bit = ((x >> i) & 1).to(tl.int32)
        seen += bit
        pos = tl.where((pos < 0) & (bit == 1) & (seen == n_blk + 1), i, pos)
    return pos


class _WithMeta:
    """A kernel launched as kernel[grid](...) with constexprs its (skipped) autotuner would have passed."""

    def __init__(self, kernel, **meta):
        self.kernel, self.meta = kernel, meta

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **self.meta, **kwargs)


@pytest.fixture(autouse=True)
def _adasplash_on_cpu(monkeypatch):
    if CUDA:
        return
    orig = ada_v1.compute_bidxs_and_cubcounts
    monkeypatch.setattr(ada_v1, "compute_bidxs_and_cubcounts",
                        lambda bmask, *args, **kwargs: orig(bmask, *args, device=bmask.device, **kwargs))
    monkeypatch.setattr(ada_v2, "_get_tau", _WithMeta(ada_v2._get_tau, BLOCK_M=64, BLOCK_N=64))
    monkeypatch.setattr(ada_v2, "popc", _popc)
    monkeypatch.setattr(ada_v2, "float2int_rd", _float2int_rd)
    monkeypatch.setattr(ada_v2, "get_next_block", _get_next_block)


def _run(alpha, *, B=1, H=2, T=128, D=16, score_scale=1.0, seed=0):
    """Both sides on the same (q, k, v, output gradient); returns ({name: max abs diff}, reference density)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (score_scale * torch.randn(B, H, T, D, generator=g) for _ in range(2))
    v, gout = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    gout = gout.to(DEV)
    ada = [t.to(DEV).clone().requires_grad_() for t in (q, k, v)]  # separate leaves: separate .grad
    ref = [t.to(DEV).clone().requires_grad_() for t in (q, k, v)]

    out_a = adasplash.adasplash(*ada, alpha=alpha, is_causal=True)
    out_a.backward(gout)
    pos = torch.arange(T, device=DEV)
    out_r, stats = sparse_attention(*ref, q_pos=pos, k_pos=pos, causal=True, activation=ACTIVATION[alpha],
                                    topk=0, impl="reference")
    out_r.backward(gout)
    diffs = {"out": (out_a - out_r).abs().max().item()}
    for name, a, r in zip(("dq", "dk", "dv"), ada, ref):
        diffs[name] = (a.grad - r.grad).abs().max().item()
    return diffs, stats["density"].item()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("D", [16, 32])
@pytest.mark.parametrize("alpha", [2.0, 1.5], ids=["sparsemax", "entmax15"])
def test_adasplash_matches_reference(alpha, D):
    diffs, density = _run(alpha, D=D)
    # the rows are really sparse (fraction of visible keys with a nonzero probability), so parity is not trivial
    assert density < 0.5, density
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.timeout(120)
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="adasplash 0.2.2 v1 (alpha=2): one-hot sparsemax rows at |scores| ~ 30 stop at bisection "
                          "precision (~1e-3 after niter=10); see the module docstring")
def test_adasplash_sparsemax_one_hot_rows_large_scores():
    diffs, _ = _run(2.0, score_scale=3.0)
    assert max(diffs.values()) < TOL, diffs
