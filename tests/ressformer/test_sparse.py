"""Sparse probability mappings (ressformer/sparse.py): exact values, simplex, masking, gradients."""

import math

import pytest
import torch

from ressformer.sparse import (SORT_NETWORK_MAX, entmax15, masked_softmax, normalize, order_key, sorted_descending,
                               sparsemax)

NEG = float("-inf")


def test_sparsemax_hand_values():
    # [1, .5, -1]: support {1, .5}, tau = (1.5 - 1) / 2 = .25 -> [.75, .25, 0]
    torch.testing.assert_close(sparsemax(torch.tensor([1.0, 0.5, -1.0])), torch.tensor([0.75, 0.25, 0.0]))
    # [3, 0, 0]: 1 + 2 * 0 = 1 < 3, support {3}, tau = 2 -> one-hot
    torch.testing.assert_close(sparsemax(torch.tensor([3.0, 0.0, 0.0])), torch.tensor([1.0, 0.0, 0.0]))
    # equal scores -> uniform
    torch.testing.assert_close(sparsemax(torch.zeros(4)), torch.full((4,), 0.25))
    # [.2, .1, 0]: all in support, tau = (.3 - 1) / 3 -> z - tau
    z = torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sparsemax(z), z + 0.7 / 3)


def test_entmax15_hand_values():
    # [1, .5, -1] -> z/2 = [.5, .25, -.5]; support {0, 1}: (.5 - tau)^2 + (.25 - tau)^2 = 1,
    # u = .5 - tau solves 2u^2 - .5u - .9375 = 0 -> u = (.5 + sqrt(7.75)) / 4; third: -.5 < tau -> 0
    u = (0.5 + math.sqrt(7.75)) / 4
    want = torch.tensor([u * u, (u - 0.25) ** 2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(entmax15(torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)), want)
    torch.testing.assert_close(entmax15(torch.zeros(2)), torch.full((2,), 0.5))
    # a gap of 2 * 2 = 4 in z/2 units: z/2 = [2, 0]: one-hot since (2 - tau)^2 = 1 gives tau = 1 > 0
    torch.testing.assert_close(entmax15(torch.tensor([4.0, 0.0])), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("fn", [sparsemax, entmax15, masked_softmax])
def test_simplex_and_masking(fn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 9, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(6, 5, 9, generator=g) < 0.3
    mask[0, 0] = True  # all masked
    mask[0, 1] = True
    mask[0, 1, 4] = False  # all masked but one
    x = x.masked_fill(mask, NEG)
    for dim in (-1, 1):
        xd = x if dim == -1 else x.transpose(1, 2)
        p = fn(xd, dim=dim)
        p = p if dim == -1 else p.transpose(1, 2)
        assert torch.isfinite(p).all()
        assert (p >= 0).all()
        assert (p[mask] == 0).all()
        sums = p.sum(-1)
        torch.testing.assert_close(sums[0, 0], torch.tensor(0.0, dtype=torch.float64))
        torch.testing.assert_close(p[0, 1], torch.nn.functional.one_hot(torch.tensor(4), 9).double())
        torch.testing.assert_close(sums.flatten()[1:], torch.ones(6 * 5 - 1, dtype=torch.float64))


def test_softmax_matches_torch_and_shift_invariance():
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(masked_softmax(x), torch.softmax(x, -1))
    for fn in (sparsemax, entmax15):
        torch.testing.assert_close(fn(x + 100.0), fn(x))


def test_sparsemax_is_euclidean_projection():
    # p = argmin ||p - z||^2 on the simplex: KKT -> z_j - p_j equals tau on the support and z_j <= tau off it
    x = torch.randn(50, 12, dtype=torch.float64)
    p = sparsemax(x)
    supp = p > 0
    tau = torch.where(supp, x - p, torch.tensor(NEG, dtype=x.dtype)).amax(-1, keepdim=True)  # (50, 1)
    torch.testing.assert_close((x - p)[supp], tau.expand_as(x)[supp])
    torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64))
    assert (x[~supp] <= tau.expand_as(x)[~supp] + 1e-12).all()


@pytest.mark.parametrize("fn", [sparsemax, entmax15, masked_softmax])
def test_gradcheck(fn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    x[0, 0, :2] = NEG
    x[1, 2, :5] = NEG  # one visible
    x[2, 3, :] = NEG  # none visible
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=-1), (x,), eps=1e-6, atol=1e-6)
    xt = x.detach().transpose(1, 2).contiguous().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=1), (xt,), eps=1e-6, atol=1e-6)
    y = fn(x)
    (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert torch.isfinite(gx).all() and (gx[2, 3] == 0).all() and (gx[0, 0, :2] == 0).all()


def test_sparsity_ordering():
    x = torch.randn(200, 16, dtype=torch.float64) * 2
    nnz = {n: (normalize(x, n) > 0).sum(-1) for n in ("softmax", "sparsemax", "entmax15")}
    assert (nnz["softmax"] == 16).all()
    assert (nnz["entmax15"] >= nnz["sparsemax"]).all() and (nnz["entmax15"] <= 16).all()
    assert nnz["entmax15"].float().mean() > nnz["sparsemax"].float().mean()
    assert nnz["entmax15"].float().mean() < 16
    with pytest.raises(ValueError, match="sparsemx"):
        normalize(x, "sparsemx")


@pytest.mark.parametrize("fn", [sparsemax, entmax15, masked_softmax])
def test_bf16_input_is_normalised_in_float32(fn):
    """A bf16 (or fp16) input is mapped in float32 and the result cast back once, as torch.softmax does: the bf16
    result is the float32 one rounded, so its rows sum to 1 within bf16's unit roundoff 2^-8 (each entry rounded
    once; before, thresholds and sums in bf16 missed 1 by up to 0.015, and torch.softmax's bf16 rows miss by up to
    0.0024 on these scores), and the float32 rows within 1e-5. The gradient is the float32 one, rounded."""
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(64, 200, generator=g)).bfloat16()
    s[:, 150:] = NEG
    s[0] = NEG  # a row with nothing visible: zeros
    p = fn(s)
    want = fn(s.float())
    assert p.dtype == torch.bfloat16
    assert torch.equal(p, want.bfloat16())
    assert (want[1:].sum(-1) - 1).abs().max() < 1e-5
    assert (p[1:].float().sum(-1) - 1).abs().max() <= 2 ** -8
    assert (p[0] == 0).all()
    x = s.clone().requires_grad_(True)
    xf = s.float().requires_grad_(True)
    w = torch.randn(64, 200, generator=g)
    (fn(x).float() * w).sum().backward()
    (fn(xf) * w.bfloat16().float()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), xf.grad.bfloat16().float(), rtol=0, atol=0)


def _ties_zeros_and_inf(n: int, dt: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """64 rows of n entries in steps of 0.5 (exact ties), zeros of both signs and 20 % -inf."""
    x = (torch.randint(-3, 4, (64, n), generator=g) * 0.5).to(dt)
    x = torch.where((x == 0) & (torch.rand(x.shape, generator=g) < 0.5), -0.0, x)
    x[torch.rand(x.shape, generator=g) < 0.2] = float("-inf")
    return x


def test_order_key_orders_as_the_floats_do_and_topk_over_it_picks_as_over_them():
    """sparse.order_key for every float dtype: the integers compare as the values do, pair by pair (-0.0 == +0.0,
    infinities and subnormals included), and torch.topk over them returns the float top-k's indices in the same
    order, sorted or not, on rows of exact ties, signed zeros and -inf; sparse.sorted_descending, the sort over
    them mapped back, returns the values torch.sort returns."""
    special = [float("-inf"), -3.5, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 2.0, float("inf")]
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        v = torch.cat([torch.tensor(special, dtype=dt), (10 * torch.randn(300, generator=g)).to(dt)])
        kv = order_key(v)
        assert not kv.dtype.is_floating_point and kv.element_size() == v.element_size(), dt
        assert torch.equal(kv[:, None] < kv[None, :], v[:, None] < v[None, :]), dt
        assert torch.equal(kv[:, None] == kv[None, :], v[:, None] == v[None, :]), dt
        x = _ties_zeros_and_inf(50, dt, g)
        assert (torch.signbit(x) & (x == 0)).any()
        for k in (1, 7, 50):
            for ordered in (True, False):
                want = x.topk(k, sorted=ordered).indices
                assert torch.equal(order_key(x).topk(k, sorted=ordered).indices, want), (dt, k, ordered)
        assert torch.equal(sorted_descending(x), x.sort(-1, descending=True).values), dt  # -0.0 == +0.0


def test_compiled_cpu_sort_of_short_rows_is_a_network_with_the_sorts_values():
    """Under torch.compile on the CPU, sparse.sorted_descending sorts rows of 2..SORT_NETWORK_MAX entries by its
    compare-exchange network (the traced graph holds no sort; wider rows keep torch.sort) and returns torch.sort's
    values for every width, power of two or not, on rows of exact ties, signed zeros and -inf; inductor's fused
    kernel of the network too."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    g = torch.Generator().manual_seed(0)

    def rows(n, dt):
        x = _ties_zeros_and_inf(n, dt, g)
        x[:8] = torch.randn(8, n, generator=g).to(dt)
        return x

    for dt, widths in ((torch.float32, (2, 3, 16, 17, SORT_NETWORK_MAX, SORT_NETWORK_MAX + 1)), (torch.bfloat16, (5,))):
        for n in widths:
            x = rows(n, dt)
            torch._dynamo.reset()
            graphs.clear()
            got = torch.compile(sorted_descending, backend=capture, fullgraph=True)(x)
            assert torch.equal(got, x.sort(-1, descending=True).values), (dt, n)
            sorts = [nd for nd in graphs[0].nodes if "sort" in str(nd.target)]
            assert bool(sorts) == (n > SORT_NETWORK_MAX), (dt, n, sorts)
    x = rows(12, torch.float32)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(sorted_descending, fullgraph=True)(x), x.sort(-1, descending=True).values)
