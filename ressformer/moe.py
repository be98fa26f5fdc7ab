"""Feed-forward layers: dense SwiGLU and the dropless top-k routed MoE (paper sec. 3.2, expert-level sparsity).

    DenseMLP   y = down_proj(silu(g) * u),  [g, u] = split(gate_up_proj(x))         forward -> (y, None)
    MoEBlock   p = softmax(gate(x)); (w, e) = top-k(p); w <- w / sum(w)
               y = sum_j w_j * SwiGLU_{e_j}(x) (+ shared_experts(x))                forward -> (y, router_logits)

* Layout and routing are DeepSpeed AutoEP's "mixtral" preset (module_inject/auto_ep_presets/mixtral.py,
  moe/ep_router.py): router `gate`, fused experts gate_up_proj [E, 2F, D] (gate rows first) and down_proj
  [E, D, F], softmax in float32, top-k renormalised. One process computes what a ZeRO-3 + AutoEP run computes.
* Dropless: assignments sorted by expert, then one of (`ressformer.kernels.moe_experts`): one matmul per expert on
  counts read on the host (the loop, the reference; under torch.compile one custom op, `_experts_loop`); one
  torch._grouped_mm per projection over all experts with device-side offsets (bfloat16 on CUDA sm90 / sm100; on
  CPU as ops of ours, `_grouped_linear`, the default under torch.compile); batched matmuls over tiles of
  expert-sorted rows with static shapes (`MoEExperts.padded`: no host read anywhere). The loop adds each expert's
  rows back with index_add_; the grouped and padded paths move the rows by gathers both ways (`_Dispatch`,
  `_Combine`). Empty experts get zero gradient.
* The recurrent unit calls the shared block's experts K times a step. On the CPU's grouped ops their K weight
  gradients can sum as one grouped matmul per weight after the K steps' backward (`ExpertWeightTaps`,
  `ressformer.kernels.expert_weight_grad`), instead of one per step summed by autograd.
* Aux losses come from the returned router logits (`moe_aux`), so they hold under any expert-parallel backend
  that keeps the (y, router_logits) contract.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressformer.config import ModelConfig, MoEConfig
from ressformer.kernels import custom_op, experts_path, stack_expert_weight_grads

# AutoEP mixtral preset: route_norm=True adds this to the denominator (deepspeed/moe/ep_router.py).
_ROUTE_NORM_EPS = 1e-20


class DenseMLP(nn.Module):
    """SwiGLU FFN. forward(x (..., D)) -> (y (..., D), None)."""

    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02):
        super().__init__()
        if d_model < 1 or hidden < 1:
            raise ValueError(f"DenseMLP needs d_model >= 1 and hidden >= 1, got d_model={d_model}, hidden={hidden}")
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.init_weights(init_std)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.gate_up_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.down_proj.weight, mean=0.0, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor):
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., F) each
        return self.down_proj(F.silu(g) * u), None


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: x (n, D), gate_up (2F, D), down (D, F) -> (n, D)."""
    g, u = (x @ gate_up.t()).chunk(2, dim=-1)  # (n, F) each
    return (F.silu(g) * u) @ down.t()


def expert_tile(rows: int, num_experts: int) -> int:
    """Rows per tile of `MoEExperts.padded` for `rows` expert-sorted rows: the largest power of two <= rows / (2E),
    within [1, 128]. Each expert pads its rows to a multiple of the tile, so the padding is at most E * (tile - 1)
    < rows / 2 rows; smaller tiles mean more tiles, each with its own copy of its expert's weights."""
    per = max(1, rows // (2 * num_experts))
    return min(128, 1 << (per.bit_length() - 1))


class _TileMatmul(torch.autograd.Function):
    """y (n, t, O) = x (n, t, I) @ w[e]^T, w (E, O, I), e (n,) the expert of each tile. Saves x and w (no per-tile
    copy of the weights: backward gathers them again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, e)
        return torch.bmm(x, w[e].transpose(1, 2))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, e = ctx.saved_tensors
        gx = torch.bmm(g, w[e]) if ctx.needs_input_grad[0] else None  # (n, t, I)
        gw = None
        if ctx.needs_input_grad[1]:  # per tile (n, O, I), summed into its expert's in at least float32
            acc = torch.promote_types(w.dtype, torch.float32)
            per_tile = torch.bmm(g.transpose(1, 2), x).to(acc)
            gw = torch.zeros(w.shape, dtype=acc, device=w.device).index_add_(0, e, per_tile).to(w.dtype)
        return gx, gw, None


def _token_sum(y: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """Rows y (N*k, D) sorted by expert -> (N, D): put back in token order by inv and summed over each token's k
    rows (`_Combine`'s forward, `_Dispatch`'s backward)."""
    return y.index_select(0, inv).view(-1, k, y.shape[-1]).sum(1)


class _Dispatch(torch.autograd.Function):
    """x (N, D) -> x[token] (N*k, D), the rows of the assignments sorted by expert (token = order // k, inv the
    inverse permutation of order), whose backward is a gather too: the gradient's rows put back in token order by inv
    and summed over each token's k assignments. Autograd's own backward of x[token] is a scatter-add, which inductor
    compiles on CPU as atomic adds, one per element: in the compiled debug step that kernel and index_add_'s
    (`_Combine`) took about 0.5 ms a call each, and replacing both made the step 0.945x (paired, bench/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return _token_sum(g, inv, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    """y (N*k, D), the assignments' outputs sorted by expert -> (N, D), each token's k outputs summed: a gather by
    inv (`_Dispatch`) and a sum over k, where index_add_ into zeros is a scatter (atomic adds under inductor on CPU).
    For k <= 2 eager gives the same bits as index_add_ (one addition, commutative); compiled in bfloat16, inductor
    multiplies by the routing weights and sums in float32 before the one rounding (closer to float32 than the
    products rounded first). Backward: the gradient gathered by token."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, token: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(token)
        return _token_sum(y, inv, k)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (token,) = ctx.saved_tensors
        return g.index_select(0, token), None, None, None


@custom_op("experts_loop", __name__, mutates_args=())
def _experts_loop(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, token: torch.Tensor,
                  weight: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MoEExperts.loop` as one op that torch.compile does not trace into: its host read of the counts (E,) stays
    inside, so the compiled graph neither breaks nor specialises on them (on CPU a host read stalls nothing).
    x (N, D), gate_up (E, 2F, D), down (E, D, F), token (R,) / weight (R, 1) of the assignments sorted by expert
    -> (out (N, D), h (R, 2F) the gate / up pre-activations, y (R, D) the experts' outputs): h and y are kept for
    `_experts_loop_backward`. The same operations as the loop, so the same bits."""
    out = x.new_zeros(x.shape)  # contiguous, as the fake says
    h = x.new_empty(token.shape[0], gate_up.shape[1])
    y = x.new_empty(token.shape[0], x.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        sl = slice(start, start + n)
        torch.mm(x[token[sl]], gate_up[e].t(), out=h[sl])  # written in place: no copy of an (n, 2F) result
        g, u = h[sl].chunk(2, dim=-1)
        torch.mm(F.silu(g) * u, down[e].t(), out=y[sl])
        out.index_add_(0, token[sl], y[sl] * weight[sl])
        start += n
    return out, h, y


@_experts_loop.register_fake
def _(x, gate_up, down, token, weight, counts):
    R = token.shape[0]
    return x.new_empty(x.shape), x.new_empty(R, gate_up.shape[1]), x.new_empty(R, x.shape[1])


@custom_op("experts_loop_backward", __name__, mutates_args=())
def _experts_loop_backward(grad: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                           token: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, h: torch.Tensor,
                           y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (x, gate_up, down, weight) of `_experts_loop`'s out given grad (N, D), one expert at a time:
    SwiGLU's backward written out (silu'(g) = s (1 + g (1 - s)), s = sigmoid(g), as autograd computes it).
    The weights' gradients are written expert by expert (zeros for an empty one), not zero-filled first: at 125m
    they are 300 MB per call, and the recurrent unit calls this K times per step."""
    gx = x.new_zeros(x.shape)  # contiguous, as the fake says; rows are summed into (a token has k experts)
    g_gate_up, g_down, g_weight = (t.new_empty(t.shape) for t in (gate_up, down, weight))  # every row written
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            g_gate_up[e].zero_()
            g_down[e].zero_()
            continue
        sl = slice(start, start + n)
        tok = token[sl]
        go = grad[tok]  # (n, D)
        g_weight[sl] = (go * y[sl]).sum(-1, keepdim=True)
        dy = go * weight[sl]
        g, u = h[sl].chunk(2, dim=-1)
        sg = torch.sigmoid(g)
        act = g * sg  # silu(g)
        torch.mm(dy.t(), act * u, out=g_down[e])
        da = dy @ down[e]  # (n, F)
        dh = torch.cat([da * u * (sg * (1 + g * (1 - sg))), da * act], dim=-1)  # (n, 2F)
        xe = x[tok]
        torch.mm(dh.t(), xe, out=g_gate_up[e])
        gx.index_add_(0, tok, dh @ gate_up[e])
        start += n
    return gx, g_gate_up, g_down, g_weight


@_experts_loop_backward.register_fake
def _(grad, x, gate_up, down, token, weight, counts, h, y):
    return x.new_empty(x.shape), gate_up.new_empty(gate_up.shape), down.new_empty(down.shape), weight.new_empty(
        weight.shape)


def _experts_loop_setup(ctx, inputs, output) -> None:
    x, gate_up, down, token, weight, counts = inputs
    ctx.save_for_backward(x, gate_up, down, token, weight, counts, output[1], output[2])


def _experts_loop_grad(ctx, grad, _grad_h, _grad_y):
    x, gate_up, down, token, weight, counts, h, y = ctx.saved_tensors
    gx, g_gate_up, g_down, g_weight = _experts_loop_backward(grad, x, gate_up, down, token, weight, counts, h, y)
    return gx, g_gate_up, g_down, None, g_weight, None


_experts_loop.register_autograd(_experts_loop_grad, setup_context=_experts_loop_setup)


def _grouped_mm_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (R, I) rows sorted by group, group e the rows offs[e - 1]:offs[e] (offs (E,) int32, cumulative), w (E, O, I)
    -> (R, O), each group's rows times w[e]^T (torch._grouped_mm)."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


@custom_op("grouped_linear", __name__, mutates_args=())
def _grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, tap: torch.Tensor | None) -> torch.Tensor:
    """`_grouped_mm_linear` as one op, for CPU tensors. torch._grouped_mm's fake (meta) tensor rule takes bfloat16
    only, so torch.compile cannot trace it in float32, where the CPU kernel runs float32 and bfloat16 alike (one
    matmul per group, offsets read inside, where a read stalls nothing). An op, its inside untraced: the graph
    around it (gathers, SwiGLU, weighted sum) compiles and fuses; the backward (`_grouped_linear_grad`) writes the
    weight gradient in w's layout (torch's own derivative of a transposed weight gives it transposed, and the copy
    back into the parameter's layout took half as long as the matmuls themselves at 125m's widths, 68 ms per 200 MB
    gradient).

    tap: None, or one of `ExpertWeightTaps`' tensors (its values unread): the backward then leaves w's gradient to
    the taps and gives the tap, as its gradient, what w's gradient is made of (`_tap_grad`)."""
    return _grouped_mm_linear(x, w, offs)


@_grouped_linear.register_fake
def _(x, w, offs, tap):
    return x.new_empty(x.shape[0], w.shape[1])


@custom_op("grouped_matmul", __name__, mutates_args=())
def _grouped_matmul(g: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """g (R, O) rows sorted by group as `_grouped_linear`'s, w (E, O, I) -> (R, I), each group's rows times w[e]."""
    return torch._grouped_mm(g, w, offs=offs)


@_grouped_matmul.register_fake
def _(g, w, offs):
    return g.new_empty(g.shape[0], w.shape[2])


@custom_op("grouped_weight_grad", __name__, mutates_args=())
def _grouped_weight_grad(g: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """g (R, O), x (R, I) rows sorted by group as `_grouped_linear`'s -> (E, O, I): g_e^T x_e per group (zeros for an
    empty group), the gradient of `_grouped_linear`'s w."""
    return torch._grouped_mm(g.t(), x, offs=offs)


@_grouped_weight_grad.register_fake
def _(g, x, offs):
    return g.new_empty(offs.shape[0], g.shape[1], x.shape[1])


def _grouped_linear_setup(ctx, inputs, output) -> None:
    x, w, offs, tap = inputs
    ctx.tapped = tap is not None
    ctx.save_for_backward(x, w, offs)


def _grouped_linear_grad(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()  # torch._grouped_mm refuses strides that are not 16-byte multiples (an expanded grad)
    gx = _grouped_matmul(grad, w, offs) if ctx.needs_input_grad[0] else None
    if ctx.tapped:
        return gx, None, None, _tap_grad(grad, x, offs)
    gw = _grouped_weight_grad(grad, x, offs) if ctx.needs_input_grad[1] else None
    return gx, gw, None, None


_grouped_linear.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_setup)


_OFFS_SHIFTS = (0, 8, 16, 24)  # an int32 offset as four bytes, each exact in every float dtype


def _tap_size(rows: int, w: torch.Tensor) -> int:
    """Elements of `_grouped_linear`'s tap for `rows` rows and weight w (E, O, I): the output gradient (rows, O),
    the input (rows, I) and the E offsets as bytes."""
    return rows * (w.shape[1] + w.shape[2]) + len(_OFFS_SHIFTS) * w.shape[0]


def _tap_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """What `_grouped_linear`'s weight gradient is made of, flat in one tensor (a tap's gradient): grad (R, O), x
    (R, I) and offs (E,) int32, each offset as its four bytes, in grad's dtype (integers to 255 are exact in
    every float dtype; `_tap_parts` reads them back)."""
    b = torch.stack([(offs >> s) & 255 for s in _OFFS_SHIFTS], dim=-1)  # (E, 4)
    return torch.cat([grad.reshape(-1), x.reshape(-1).to(grad.dtype), b.reshape(-1).to(grad.dtype)])


def _tap_parts(t: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tap's gradient (`_tap_grad`) for a weight of shape (E, O, I) -> (grad (R, O), x (R, I), offs (E,) int64):
    views, but for offs."""
    n_groups, n_out, n_in = shape
    end = t.numel() - len(_OFFS_SHIFTS) * n_groups
    R = end // (n_out + n_in)
    b = t[end:].view(n_groups, len(_OFFS_SHIFTS)).to(torch.int64)
    offs = (b << torch.tensor(_OFFS_SHIFTS, device=t.device)).sum(-1)
    return t[:R * n_out].view(R, n_out), t[R * n_out:end].view(R, n_in), offs


@custom_op("stacked_weight_grad", __name__, mutates_args=())
def _stacked_weight_grad(gs: list[torch.Tensor], xs: list[torch.Tensor], offs: list[torch.Tensor]) -> torch.Tensor:
    """sum over the calls s of `_grouped_linear`'s weight gradient (`_grouped_weight_grad`), the calls' gs[s]
    (R, O), xs[s] (R, I) and offs[s] (E,) -> (E, O, I): every call's rows of group e copied next to each other
    (group by group, calls in order), then one grouped matmul, group e's over all the calls' rows of e at once. The
    recurrent unit calls the shared experts K times a step; at 125m's widths (CPU, fp32, bench/RESULTS.md) K
    grouped matmuls of about R / E rows each, their results summed, took 1.04x-1.34x this op's time with glibc
    keeping freed memory and 2.3x-2.5x without (each result is a weight-sized fresh buffer). An op: the row count
    it reads on the host stays inside."""
    counts = torch.stack([torch.diff(o, prepend=o.new_zeros(1)) for o in offs])  # (S, E)
    total = counts.sum(0)  # (E,)
    # first destination row of call s's group e: group e's block, then the rows of e from calls before s
    dest0 = (total.cumsum(0) - total) + (counts.cumsum(0) - counts)  # (S, E)
    src0 = torch.stack(offs) - counts  # (S, E) first row of group e in call s
    n = int(total.sum())
    g_all, x_all = gs[0].new_empty(n, gs[0].shape[1]), xs[0].new_empty(n, xs[0].shape[1])
    for g, x, c, d, s in zip(gs, xs, counts, dest0, src0):
        dest = torch.repeat_interleave(d - s, c, output_size=g.shape[0]) + torch.arange(g.shape[0], device=g.device)
        g_all.index_copy_(0, dest, g)
        x_all.index_copy_(0, dest, x)
    return _grouped_weight_grad(g_all, x_all, total.cumsum(0).to(torch.int32))


@_stacked_weight_grad.register_fake
def _(gs, xs, offs):
    return gs[0].new_empty(offs[0].shape[0], gs[0].shape[1], xs[0].shape[1])


class ExpertWeightTaps(torch.autograd.Function):
    """The routed experts' weight gradients of a recurrent forward, computed once for all its K steps.

    apply(gate_up (E, 2F, D), down (E, D, F), rows, steps) -> 2 * steps tensors, (gate_up tap, down tap) of each
    step, whose values nobody reads: a step passes its pair to `MoEExperts.forward` (taps=), whose `_grouped_linear`
    ops give w no gradient and their tap, as its gradient, the parts of w's (`_tap_grad`). Autograd calls this
    backward once, when every step's backward has run, with all the parts: it returns each weight's gradient summed
    over the steps as one grouped matmul (`_stacked_weight_grad`); AccumulateGrad (and ZeRO's hooks on it) fire once.
    rows: the experts' rows a step (tokens x experts_per_token). The parts of all K steps are held until then, K rows
    (2F + D + D + F) elements (0.72 GB at 125m, B=1, T=1024, fp32), where each step's backward no longer makes a
    weight-sized gradient (0.3 GB there): that compiled step's peak resident memory was 4.32 GB, against 4.37 GB
    per step."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, down: torch.Tensor, rows: int, steps: int):
        ctx.set_materialize_grads(False)
        ctx.shapes = (gate_up.shape, down.shape)
        z = gate_up.new_zeros(1)
        sizes = (_tap_size(rows, gate_up), _tap_size(rows, down))
        return tuple(z.expand(sizes[i % 2]) for i in range(2 * steps))

    @staticmethod
    def backward(ctx, *grads):
        out = []
        for shape, gs in zip(ctx.shapes, (grads[0::2], grads[1::2])):
            parts = [_tap_parts(g, shape) for g in gs if g is not None]
            out.append(_stacked_weight_grad(*map(list, zip(*parts))) if parts else None)
        return out[0], out[1], None, None


class MoEExperts(nn.Module):
    """E SwiGLU experts as fused 3-D parameters: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, init_std: float = 0.02):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MoEExperts needs num_experts >= 1, got {num_experts}")
        self.num_experts, self.hidden = num_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.init_weights(init_std)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std if out_std is None else out_std)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x (n, D) -> (n, D)."""
        return _swiglu(x, self.gate_up_proj[e], self.down_proj[e])

    def grouped(self, x: torch.Tensor, counts: torch.Tensor, taps=None) -> torch.Tensor:
        """Every expert on its rows of x (n, D), sorted by expert with counts (E,) rows each -> (n, D): one
        torch._grouped_mm per projection (the loop's math, DeepSpeed AutoEP's and torchtitan's grouped experts).
        taps: None, or this call's (gate_up, down) pair of `ExpertWeightTaps` (CPU only)."""
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,) end row of each expert
        if x.device.type == "cpu":  # our op (`_grouped_linear`, traceable in float32 too)
            t_up, t_down = (None, None) if taps is None else taps
            g, u = _grouped_linear(x, self.gate_up_proj, offs, t_up).chunk(2, dim=-1)  # (n, F) each
            return _grouped_linear(F.silu(g) * u, self.down_proj, offs, t_down)
        if taps is not None:
            raise ValueError("MoEExperts.grouped: weight taps are for the CPU's grouped ops; CUDA runs torch's")
        g, u = _grouped_mm_linear(x, self.gate_up_proj, offs).chunk(2, dim=-1)  # torch's op and derivative
        return _grouped_mm_linear(F.silu(g) * u, self.down_proj, offs)

    def weight_taps(self, x: torch.Tensor, rows: int, steps: int, *, compiled: bool) -> tuple | None:
        """`ExpertWeightTaps` for a forward that calls these experts `steps` times on `rows` rows each (tokens x
        experts_per_token) with hidden states like x, each call's weight gradient then summed over the calls in
        one grouped matmul per weight: a tuple of `steps` (gate_up, down) tap pairs, to pass one pair per call.
        None where the calls run anything but `_grouped_linear` (`experts_path` with compiled: whether the calls
        run under torch.compile), where `ressformer.kernels.expert_weight_grad` is "per_step", with no gradient,
        one call, autocast, or parameters ZeRO-3 partitions (their shape is not the gradient's); under "auto",
        also where a call's rows hold as many elements as the weights (`ressformer.kernels` says why)."""
        w = (self.gate_up_proj, self.down_proj)
        if (steps < 2 or not torch.is_grad_enabled() or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or x.dtype != w[0].dtype or not all(p.requires_grad and not hasattr(p, "ds_id") for p in w)
                or not stack_expert_weight_grads(rows, tuple(w[0].shape))
                or experts_path(x, (x.shape[-1], self.hidden), compiling=compiled) != "grouped_mm"):
            return None
        taps = ExpertWeightTaps.apply(*w, rows, steps)
        return tuple(taps[i:i + 2] for i in range(0, 2 * steps, 2))

    def padded(self, x: torch.Tensor, counts: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """`grouped` with static shapes on any device and dtype: every expert on its rows of x (R, D), sorted by
        expert (counts (E,), expert (R,) of each row) -> (R, D), no host read.

        Each expert's rows are padded to a multiple of t = expert_tile(R, E) rows; the sum of ceil(count_e / t) is
        at most (R + E (t - 1)) // t, so that many tiles of t rows hold every row (dropless) whatever the routing:
        zero rows fill the rest. One batched matmul per projection over the tiles, each tile with its expert's
        weights (`_TileMatmul`); zero rows contribute nothing to outputs or gradients.
        """
        R, D = x.shape
        E = self.num_experts
        t = expert_tile(R, E)
        n_tiles = (R + E * (t - 1)) // t
        tiles = (counts + t - 1) // t  # (E,) tiles of each expert
        tile_end = tiles.cumsum(0)  # (E,)
        row_start = counts.cumsum(0) - counts  # (E,) first sorted row of each expert
        slot = (tile_end - tiles)[expert] * t + torch.arange(R, device=x.device) - row_start[expert]  # (R,)
        tile_expert = torch.searchsorted(tile_end, torch.arange(n_tiles, device=x.device), right=True)
        tile_expert = tile_expert.clamp(max=E - 1)  # (n_tiles,) unused tiles (zero rows): any expert
        xt = x.new_zeros(n_tiles * t, D).index_copy(0, slot, x).view(n_tiles, t, D)
        g, u = _TileMatmul.apply(xt, self.gate_up_proj, tile_expert).chunk(2, dim=-1)  # (n_tiles, t, F) each
        y = _TileMatmul.apply(F.silu(g) * u, self.down_proj, tile_expert)  # (n_tiles, t, D)
        return y.view(n_tiles * t, D).index_select(0, slot)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, taps=None) -> torch.Tensor:
        """x (N, D), topk_idx (N, k) long, topk_weight (N, k) -> (N, D), dropless. taps: None, or this call's pair
        of `weight_taps` (made for this call's path)."""
        N, k = topk_idx.shape
        flat_idx = topk_idx.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_idx, stable=True)  # assignments grouped by expert
        token = order // k  # (N*k,) source token of each sorted assignment
        # the inverse permutation of order: tokens to sorted rows and back by gathers, forward and backward
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        weight = _Dispatch.apply(topk_weight.reshape(-1, 1), order, inv, 1).to(x.dtype)  # (N*k, 1) sorted
        path = experts_path(x, (x.shape[-1], self.hidden))
        if path == "loop" and not torch.compiler.is_compiling():
            return self.loop(x, flat_idx, token, weight)
        # counts on the device by scatter_add (bincount's output shape depends on the data): torch.compile traces
        # these paths whole
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
        if path == "loop":  # compiled: the loop as one opaque op, its host read inside
            return _experts_loop(x, self.gate_up_proj, self.down_proj, token, weight, counts)[0]
        xs = _Dispatch.apply(x, token, inv, k)  # (N*k, D) sorted by expert
        y = self.grouped(xs, counts, taps) if path == "grouped_mm" else self.padded(xs, counts, flat_idx[order])
        return _Combine.apply(y * weight, token, inv, k)

    def loop(self, x: torch.Tensor, flat_idx: torch.Tensor, token: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The reference: one matmul per expert on counts read on the host, over the assignments sorted by expert
        (token (N*k,) and weight (N*k, 1) in that order; flat_idx (N*k,) unsorted) -> (N, D)."""
        counts = torch.bincount(flat_idx, minlength=self.num_experts).tolist()  # host sync, one per call
        # unbind: one gradient buffer per weight in backward (indexing gate_up_proj[e] would zero-fill a full
        # [E, 2F, D] buffer for each expert)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        out = torch.zeros_like(x)  # (N, D)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue  # empty expert: no work, zero gradient
            sl = slice(start, start + n)
            out.index_add_(0, token[sl], _swiglu(x[token[sl]], gate_up[e], down[e]) * weight[sl])  # (n, D)
            start += n
        return out


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / AutoEP routing: (topk_weight (N, k) float32, topk_idx (N, k)) from router_logits (N, E).

    Same math as deepspeed/moe/ep_router.py TokenChoiceTopKRouter.forward with the mixtral preset
    (score_func="softmax", route_norm=True, route_scale=1.0).
    """
    probs = F.softmax(router_logits.float(), dim=-1)  # (N, E), float32 like AutoEP
    _, idx = torch.topk(probs, k=k, dim=-1)  # (N, k)
    w = probs.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + _ROUTE_NORM_EPS)
    return w, idx


class MoEBlock(nn.Module):
    """Top-k routed SwiGLU MoE. forward(x (B, T, D)) -> (y (B, T, D), router_logits (B*T, E))."""

    # AutoEP (deepspeed/module_inject/auto_ep.py `_detect_forward_contract`): a truthy value on the MoE block makes
    # its replacement layer return (output, router_logits); index 1 is where our forward returns the logits.
    _can_record_outputs = {"router_logits": 1}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        if m.num_experts < 2:
            raise ValueError(f"MoEBlock needs moe.num_experts >= 2, got {m.num_experts}; use make_mlp(cfg), "
                             "which builds a DenseMLP for num_experts == 1")
        self.num_experts, self.top_k = m.num_experts, m.experts_per_token
        # Attribute names the HF Mixtral config uses; AutoEP reads these as num_experts_attr / top_k_attr.
        self.num_local_experts, self.num_experts_per_tok = m.num_experts, m.experts_per_token
        self.gate = nn.Linear(cfg.d_model, m.num_experts, bias=False)
        self.experts = MoEExperts(m.num_experts, cfg.d_model, cfg.ffn_hidden)
        self.shared_experts = DenseMLP(cfg.d_model, cfg.ffn_hidden * m.shared_experts) if m.shared_experts > 0 else None
        self.init_weights(cfg.init_std)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.gate.weight, mean=0.0, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)

    def forward(self, x: torch.Tensor, taps=None):
        """x (B, T, D) -> (y (B, T, D), router_logits (B*T, E)); taps: None, or a pair of `MoEExperts.weight_taps`."""
        B, T, D = x.shape
        h = x.reshape(B * T, D)  # (N, D)
        router_logits = self.gate(h)  # (N, E)
        w, idx = route(router_logits, self.top_k)  # (N, k) each
        y = self.experts(h, idx, w, taps=taps)  # (N, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)[0]
        return y.reshape(B, T, D), router_logits


def moe_aux_losses(router_logits: torch.Tensor, experts_per_token: int, num_experts: int,
                   sp=None) -> dict[str, torch.Tensor]:
    """Unweighted MoE auxiliary losses of one MoE call from its router logits (N, E); sp: a
    ressformer.sequence_parallel.SequenceShards whose ranks hold the rest of the tokens (the means are the group's).

    balance = E * sum_e f_e * P_e   (Switch / GShard; f_e = fraction of the N*k assignments routed to e,
                                     P_e = mean router probability of e; 1 for perfectly uniform routing)
    z       = mean_n logsumexp(logits_n)^2   (ST-MoE router z-loss)
    load    = f (E,), detached, for logging.
    """
    if router_logits.dim() != 2 or router_logits.shape[1] != num_experts:
        raise ValueError(f"router_logits must be (N, num_experts={num_experts}), got {tuple(router_logits.shape)}")
    if not 1 <= experts_per_token <= num_experts:
        raise ValueError(f"experts_per_token={experts_per_token} must be in [1, num_experts={num_experts}]")
    logits = router_logits.float()
    probs = F.softmax(logits, dim=-1)  # (N, E)
    idx = torch.topk(probs, k=experts_per_token, dim=-1).indices  # (N, k), same selection as route()
    counts = torch.zeros(num_experts, device=logits.device, dtype=torch.float32)
    counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=logits.device))
    p_sum, z_sum = probs.sum(dim=0), torch.logsumexp(logits, dim=-1).pow(2).sum()  # (E,), ()
    n = float(logits.shape[0])
    if sp is not None:
        counts, p_sum, z_sum, n = sp.sum(counts), sp.sum(p_sum), sp.sum(z_sum), n * sp.size  # equal shards
    f = counts / max(n * experts_per_token, 1.0)  # (E,), no gradient (argmax)
    P = p_sum / max(n, 1.0)  # (E,) mean router probability
    balance = num_experts * (f * P).sum()
    z = z_sum / max(n, 1.0)
    return {"balance": balance, "z": z, "load": f.detach()}


def moe_aux(cfg: MoEConfig, router_logits: list[torch.Tensor], sp=None,
            parts: list[dict | None] | None = None) -> tuple[dict, dict]:
    """The weighted aux losses and load diagnostics of one forward, from the router logits of its MoE calls (sp:
    `moe_aux_losses`). parts: per call, its `moe_aux_losses` already computed (a compiled recurrent step computes
    its own inside its graph) or None (computed here from its router logits).

    losses: moe_balance = aux_loss_coef * mean balance, moe_z = z_loss_coef * mean z (over the calls);
    diagnostics: moe_load (E,) the mean fraction of assignments per expert, its max and min. ({}, {}) when dense.
    """
    if not router_logits:
        return {}, {}
    parts = [p if p is not None else moe_aux_losses(rl, cfg.experts_per_token, cfg.num_experts, sp)
             for rl, p in zip(router_logits, parts or [None] * len(router_logits), strict=True)]
    losses = {"moe_balance": cfg.aux_loss_coef * torch.stack([p["balance"] for p in parts]).mean(),
              "moe_z": cfg.z_loss_coef * torch.stack([p["z"] for p in parts]).mean()}
    load = torch.stack([p["load"] for p in parts]).mean(0)  # (E,)
    return losses, {"moe_load": load, "moe_load_max": load.max(), "moe_load_min": load.min()}


def make_mlp(cfg: ModelConfig) -> DenseMLP | MoEBlock:
    """The FFN of one block: DenseMLP(D, ffn_hidden) when moe.num_experts == 1, else MoEBlock(cfg)."""
    if cfg.moe.num_experts == 1:
        return DenseMLP(cfg.d_model, cfg.ffn_hidden, cfg.init_std)
    return MoEBlock(cfg)


__all__ = ["DenseMLP", "MoEExperts", "MoEBlock", "route", "moe_aux_losses", "moe_aux", "make_mlp"]
