"""Triton kernel for ASAM's per-query top-k attention with a sparse activation (paper sec. 3.2), forward + backward.

The function of attention.py `_gathered_attend`, for batch b, head h, query i and slot j < kk holding key
index n_ij = key_idx[b, h, i, j] (slots with sel_mask False are masked):

    s_ij   = q_i . k_{n_ij} / sqrt(D) + bias_ij                    bias: the graph bias per slot (or none)
    p_i.   = activation(s_i. over the unmasked slots)              softmax | sparsemax | entmax15
    out_i  = sum_j p_ij v_{n_ij}

Backward, with g_ij = dout_i . v_{n_ij} + dp_ij (p is an output too: SOES reads it with gradient):

    softmax:   dz = p * (g - <g, p>)
    sparsemax: dz = s * (g - <g, s> / |s|),           s = 1[p > 0]
    entmax15:  dz = r * g - r * <r, g> / sum(r),     r = sqrt(p)
    dbias = dz,   dq_i = sum_j dz_ij k_{n_ij} / sqrt(D),
    dk_n += dz_ij q_i / sqrt(D),   dv_n += p_ij dout_i          over the (i, j) with n_ij = n

Design choices:
* One program per (block of BLOCK_Q queries, batch * head): grid (cdiv(Q, BLOCK_Q), B * H). The program holds
  the (BLOCK_Q, BLOCK_K) scores of its queries in float32 registers (BLOCK_K = kk padded to a power of two)
  and reads keys / values by index, BLOCK_DC features at a time, as (BLOCK_Q, BLOCK_K, BLOCK_DC) tiles: the
  gathered (Q, kk, D) keys / values never exist in memory. Loads of values (forward) and of keys / values
  (backward) are masked to the slots with p > 0, so a sparse activation also skips their memory traffic.
* Tiles (`_blocks`): up to 16 queries and 1024 (query, slot) pairs per program (kk = 128: 8 queries x 128 slots,
  kk = 256: 4 x 256), 128 pairs per warp from kk = 8 on (8 warps from kk = 64 on; kk < 8: one warp, 16 queries
  x kk slots), i.e. 4 pairs per thread. Gathers step through
  the features 8 at a time (BLOCK_DC: one 16-byte vector of bf16 per pair, a 32-element tile per thread), the
  backward's float32 atomic scatters 4 at a time (BLOCK_DA: 16 elements per thread, one 16-byte vector). Each loop
  over the features has one such tile live: the forward's score and value loops, and the backward's four loops
  (gather v for g, gather k for dq, scatter dk, scatter dv). Features are read at unit stride (the launcher copies
  a tensor whose last stride is not 1), so their loads are vectors. Every launch sets ptxas's register cap to 255
  (MAX_REGISTERS) explicitly. Compiled for sm_80 / sm_90 on CPU (bench/kernel_resources.py) with Triton 3.6 and
  3.9, no kernel of the debug / 125m / 1b presets spills (0 bytes of stack and local memory, 71-150 registers);
  a backward with 16-feature steps and the scatters inside its gather loops used all 255 registers and spilled
  720-856 bytes per thread on sm_80 (Triton 3.9).
* Thresholds without sorting: p = [z - tau]_+ (sparsemax) or [z/2 - tau]_+^2 (entmax15) with z the scores
  minus the row max, so tau lies in [-1, -1/n] (sparsemax) or [-1, -1/sqrt(n)] (entmax15), n the unmasked
  slots. BISECT_ITERS bisection steps on f(tau) = sum_j p_j(tau) - 1 keep f(lo) >= 0, then NEWTON_ITERS
  Newton steps start at lo: f is convex and decreasing, so Newton from the left never passes the root and
  converges quadratically (for sparsemax one step from inside the right support is exact). Rows sum to 1
  within float32 rounding (about 1e-6 at kk = 512).
* Masked slots get p = 0 exactly and a row with no unmasked slot gives p = 0, out = 0 and zero gradients.
* Backward reads the saved p (no score recomputation). dq is written once per query; dk and dv are scattered
  with float32 atomic adds into (B, H, Tk, D) buffers because several queries select the same key, then cast
  to k's dtype. The order of the atomic adds varies between runs, so dk / dv are not bitwise reproducible.
* Scores, thresholds and probabilities are float32 whatever the input dtype (as ressformer.sparse.normalize);
  out is cast to q's dtype, p stays float32.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before this module is imported;
the kernels are decorated at import). The launches are built by `_fwd_launches` / `_bwd_launches`, which
bench/kernel_resources.py reuses to compile the same kernels for GPU targets without a GPU. ressformer imports
without triton: `triton` is None here then and topk_attention raises.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path runs instead (ressformer.kernels.use_asam_kernel)
    triton = tl = None

ACTIVATION_IDS = {"softmax": 0, "sparsemax": 1, "entmax15": 2}
MAX_SLOTS = 1024  # kk above this would not fit one row of scores per program in registers
BISECT_ITERS = 24  # bracket width 2**-24 on [-1, 0]: inside float32 resolution of the threshold
NEWTON_ITERS = 2
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)
# ptxas register cap (PTX .maxnreg) of every launch: the hardware's 255, stated so that ptxas works to it. Without a
# cap ptxas (CUDA 12.8 and 13) lowers its own register target on some of these kernels for occupancy and spills
# 8-16 bytes (sm_90 forward: 64 registers + 8 bytes of stack instead of 96 registers).
MAX_REGISTERS = 255

if triton is not None:

    @triton.jit
    def _probabilities(z, valid, ACT: tl.constexpr, BISECT_ITERS: tl.constexpr, NEWTON_ITERS: tl.constexpr):
        """z (BQ, BK) float32 scores, -inf where not valid -> p (BQ, BK) float32, 0 where not valid."""
        m = tl.max(z, axis=1)  # (BQ,) -inf for a row with no valid slot
        m = tl.where(m > float("-inf"), m, 0.0)
        z = z - m[:, None]  # max 0 on valid rows
        if ACT == 0:
            e = tl.exp(z)
            p = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
        else:
            n = tl.maximum(tl.sum(valid.to(tl.float32), axis=1), 1.0)  # (BQ,) unmasked slots
            lo = tl.zeros_like(n) - 1.0  # f(lo) >= 0: the max slot alone has mass 1
            if ACT == 1:
                hi = -1.0 / n  # f(hi) <= 0: n slots of mass <= 1/n
            else:
                z = z * 0.5
                hi = -1.0 / tl.sqrt(n)  # n slots of mass <= 1/n
            for _ in range(BISECT_ITERS):
                mid = 0.5 * (lo + hi)
                t = tl.maximum(z - mid[:, None], 0.0)
                if ACT == 2:
                    t = t * t
                up = tl.sum(t, axis=1) >= 1.0
                lo = tl.where(up, mid, lo)
                hi = tl.where(up, hi, mid)
            tau = lo
            for _ in range(NEWTON_ITERS):
                t = tl.maximum(z - tau[:, None], 0.0)
                if ACT == 1:  # f = sum t - 1, f' = -|support|
                    cnt = tl.sum((t > 0).to(tl.float32), axis=1)
                    tau = tau + (tl.sum(t, axis=1) - 1.0) / tl.maximum(cnt, 1.0)
                else:  # f = sum t^2 - 1, f' = -2 sum t
                    st = tl.sum(t, axis=1)
                    tau = tl.where(st > 0, tau + (tl.sum(t * t, axis=1) - 1.0) / tl.maximum(2.0 * st, 1e-30), tau)
            p = tl.maximum(z - tau[:, None], 0.0)
            if ACT == 2:
                p = p * p
        return tl.where(valid, p, 0.0)

    @triton.jit
    def _score_grad(p, g, ACT: tl.constexpr):
        """dL/dz (BQ, BK) of p = activation(z) given g = dL/dp; zero wherever p is zero."""
        if ACT == 0:
            dz = p * (g - tl.sum(g * p, axis=1)[:, None])
        elif ACT == 1:
            s = (p > 0).to(tl.float32)
            dz = s * (g - (tl.sum(g * s, axis=1) / tl.maximum(tl.sum(s, axis=1), 1.0))[:, None])
        else:
            r = tl.sqrt(p)
            dz = r * g - r * (tl.sum(r * g, axis=1) / tl.maximum(tl.sum(r, axis=1), 1e-30))[:, None]
        return dz

    @triton.jit
    def _asam_fwd_kernel(Q, K, V, IDX, SEL, BIAS, OUT, P,
                         s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, H, NQ, KK, D, scale,
                         ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_DC: tl.constexpr, BISECT_ITERS: tl.constexpr, NEWTON_ITERS: tl.constexpr):
        """Q, K, V, OUT with unit stride along the features (the launcher ensures it)."""
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BQ,) query rows
        rj = tl.arange(0, BLOCK_K)  # (BK,) slots
        q_ok = rq < NQ
        in_row = q_ok[:, None] & (rj[None, :] < KK)  # (BQ, BK)
        slot = (bh * NQ + rq)[:, None] * KK + rj[None, :]  # (BQ, BK) into the (B, H, Q, kk) inputs
        idx = tl.load(IDX + slot, mask=in_row, other=0)  # (BQ, BK) key index
        valid = (tl.load(SEL + slot, mask=in_row, other=0) != 0) & in_row
        q_row = Q + b * s_qb + h * s_qh + rq.to(tl.int64)[:, None] * s_qt  # (BQ, 1)
        k_row = K + b * s_kb + h * s_kh + idx * s_kt  # (BQ, BK)

        s = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_DC):
            rd = d0 + tl.arange(0, BLOCK_DC)
            d_ok = rd < D
            qd = tl.load(q_row + rd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            kd = tl.load(k_row[:, :, None] + rd[None, None, :], mask=valid[:, :, None] & d_ok[None, None, :],
                         other=0.0)  # (BQ, BK, BDC) selected keys
            s += tl.sum(qd.to(tl.float32)[:, None, :] * kd.to(tl.float32), axis=2)
        s = s * scale
        if HAS_BIAS:
            s += tl.load(BIAS + slot, mask=in_row, other=0.0).to(tl.float32)
        p = _probabilities(tl.where(valid, s, float("-inf")), valid, ACT, BISECT_ITERS, NEWTON_ITERS)
        tl.store(P + slot, p, mask=in_row)

        live = p > 0
        v_row = V + b * s_vb + h * s_vh + idx * s_vt  # (BQ, BK)
        o_row = OUT + b * s_ob + h * s_oh + rq.to(tl.int64)[:, None] * s_ot  # (BQ, 1)
        for d0 in range(0, D, BLOCK_DC):
            rd = d0 + tl.arange(0, BLOCK_DC)
            d_ok = rd < D
            vd = tl.load(v_row[:, :, None] + rd[None, None, :], mask=live[:, :, None] & d_ok[None, None, :],
                         other=0.0)  # (BQ, BK, BDC) values of the support
            o = tl.sum(p[:, :, None] * vd.to(tl.float32), axis=1)  # (BQ, BDC)
            tl.store(o_row + rd[None, :], o.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _asam_bwd_kernel(Q, K, V, IDX, P, DOUT, DP, DQ, DK, DV, DS,
                         s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt, H, NQ, TK, KK, D,
                         scale, ACT: tl.constexpr, HAS_DOUT: tl.constexpr, HAS_DP: tl.constexpr,
                         HAS_DS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DC: tl.constexpr,
                         BLOCK_DA: tl.constexpr):
        """DQ contiguous (B, H, Q, D) in q's dtype; DK, DV contiguous (B, H, Tk, D) float32, zero-filled; Q, K, V,
        DOUT with unit stride along the features. Four loops over the features, each with one
        (BQ, BK, BLOCK_DC | BLOCK_DA) tile live: gather v (g), gather k (dq), scatter dk, scatter dv."""
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BQ,)
        rj = tl.arange(0, BLOCK_K)  # (BK,)
        q_ok = rq < NQ
        in_row = q_ok[:, None] & (rj[None, :] < KK)
        slot = (bh * NQ + rq)[:, None] * KK + rj[None, :]  # (BQ, BK)
        p = tl.load(P + slot, mask=in_row, other=0.0)  # (BQ, BK) float32
        live = p > 0  # every gradient below vanishes off the support
        idx = tl.load(IDX + slot, mask=live, other=0)
        q_row = Q + b * s_qb + h * s_qh + rq.to(tl.int64)[:, None] * s_qt  # (BQ, 1)
        g_row = DOUT + b * s_gb + h * s_gh + rq.to(tl.int64)[:, None] * s_gt  # (BQ, 1)
        if HAS_DP:
            g = tl.load(DP + slot, mask=in_row, other=0.0).to(tl.float32)
        else:
            g = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
        if HAS_DOUT:  # g_ij += dout_i . v_{n_ij}
            v_row = V + b * s_vb + h * s_vh + idx * s_vt  # (BQ, BK)
            for d0 in range(0, D, BLOCK_DC):
                rd = d0 + tl.arange(0, BLOCK_DC)
                d_ok = rd < D
                do = tl.load(g_row + rd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # (BQ, BDC)
                vd = tl.load(v_row[:, :, None] + rd[None, None, :], mask=live[:, :, None] & d_ok[None, None, :],
                             other=0.0)  # (BQ, BK, BDC)
                g += tl.sum(do.to(tl.float32)[:, None, :] * vd.to(tl.float32), axis=2)
        dz = _score_grad(p, g, ACT)  # (BQ, BK)
        if HAS_DS:
            tl.store(DS + slot, dz, mask=in_row)
        dz = dz * scale
        k_row = K + b * s_kb + h * s_kh + idx * s_kt  # (BQ, BK)
        dq_row = DQ + (bh * NQ + rq)[:, None] * D  # (BQ, 1)
        for d0 in range(0, D, BLOCK_DC):  # dq_i = sum_j dz_ij k_{n_ij}
            rd = d0 + tl.arange(0, BLOCK_DC)
            d_ok = rd < D
            kd = tl.load(k_row[:, :, None] + rd[None, None, :], mask=live[:, :, None] & d_ok[None, None, :],
                         other=0.0)  # (BQ, BK, BDC)
            dq = tl.sum(dz[:, :, None] * kd.to(tl.float32), axis=1)  # (BQ, BDC)
            tl.store(dq_row + rd[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
        acc = (bh * TK + idx) * D  # (BQ, BK) key rows of the DK / DV buffers
        for d0 in range(0, D, BLOCK_DA):  # dk_n += dz_ij q_i
            rd = d0 + tl.arange(0, BLOCK_DA)
            d_ok = rd < D
            qd = tl.load(q_row + rd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # (BQ, BDA)
            tl.atomic_add(DK + acc[:, :, None] + rd[None, None, :], dz[:, :, None] * qd.to(tl.float32)[:, None, :],
                          mask=live[:, :, None] & d_ok[None, None, :], sem="relaxed")
        if HAS_DOUT:
            for d0 in range(0, D, BLOCK_DA):  # dv_n += p_ij dout_i
                rd = d0 + tl.arange(0, BLOCK_DA)
                d_ok = rd < D
                do = tl.load(g_row + rd[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # (BQ, BDA)
                tl.atomic_add(DV + acc[:, :, None] + rd[None, None, :], p[:, :, None] * do.to(tl.float32)[:, None, :],
                              mask=live[:, :, None] & d_ok[None, None, :], sem="relaxed")


PAIRS_PER_WARP = 128  # (query, slot) pairs of a program per warp: 4 per thread
GATHER_DC = 8  # features per (query, slot) pair and step of a gather loop: one 16-byte vector of bf16 / fp16
SCATTER_DA = 4  # features per pair and step of a scatter loop: one 16-byte vector of float32 atomics


def _blocks(kk: int, D: int, backward: bool = False) -> dict:
    """Tiles of one program: BLOCK_Q queries x BLOCK_K slots (kk padded to a power of two), at most 16 queries and
    1024 pairs (kk = 128: 8 x 128, kk = 256: 4 x 256), one warp per PAIRS_PER_WARP pairs (8 warps from kk = 64 on),
    features in steps of BLOCK_DC (gathers) / BLOCK_DA (the backward's scatters). Per thread that is 4 pairs, a
    gathered (BQ, BK, BLOCK_DC) tile of 32 elements and a scattered (BQ, BK, BLOCK_DA) float32 tile of 16: every
    kernel then fits the registers without spilling (bench/kernel_resources.py checks sm_80 / sm_90)."""
    block_k = triton.next_power_of_2(kk)
    block_q = max(1, min(16, 1024 // block_k))
    warps = max(1, min(8, block_q * block_k // PAIRS_PER_WARP))
    d_pow = triton.next_power_of_2(D)
    cfg = dict(BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_DC=min(d_pow, GATHER_DC), num_warps=warps,
               maxnreg=MAX_REGISTERS)
    if backward:
        cfg["BLOCK_DA"] = min(d_pow, SCATTER_DA)
    return cfg

def _unit_feature_stride(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its last (feature) stride is not 1: the kernels read features at unit stride,
    which lets them load a tile's features as vectors."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, rows, D) tensor with unit feature stride."""
    return t.stride(0), t.stride(1), t.stride(2)


def _fwd_launches(q, k, v, key_idx, sel_mask, bias, out, p, activation: str) -> list:
    """The forward's kernel launches [(kernel, grid, args, keyword args)]: key_idx contiguous, out / p the
    outputs. bench/kernel_resources.py compiles these same launches (with meta tensors) for GPU targets."""
    B, H, NQ, D = q.shape
    kk = key_idx.shape[-1]
    cfg = _blocks(kk, D)
    grid = (triton.cdiv(NQ, cfg["BLOCK_Q"]), B * H)
    q, k, v = (_unit_feature_stride(t) for t in (q, k, v))
    sel = sel_mask.contiguous().view(torch.uint8)
    bias_c = bias.contiguous() if bias is not None else p  # p: a placeholder pointer, never read
    args = (q, k, v, key_idx, sel, bias_c, out, p, *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, NQ, kk,
            D, 1.0 / math.sqrt(D))
    kw = dict(ACT=ACTIVATION_IDS[activation], HAS_BIAS=bias is not None, BISECT_ITERS=BISECT_ITERS,
              NEWTON_ITERS=NEWTON_ITERS, **cfg)
    return [(_asam_fwd_kernel, grid, args, kw)]


def _bwd_launches(q, k, v, key_idx, p, dout, dp, dq, dk, dv, ds, activation: str) -> list:
    """The backward's kernel launches [(kernel, grid, args, keyword args)]; dout / dp / ds None when absent, dq
    (B, H, Q, D) in q's dtype, dk / dv (B, H, Tk, D) float32 zero-filled, ds (B, H, Q, kk) float32 or None."""
    B, H, NQ, D = q.shape
    Tk, kk = k.shape[2], key_idx.shape[-1]
    cfg = _blocks(kk, D, backward=True)
    grid = (triton.cdiv(NQ, cfg["BLOCK_Q"]), B * H)
    q, k, v = (_unit_feature_stride(t) for t in (q, k, v))
    g = _unit_feature_stride(dout) if dout is not None else dq  # placeholders for absent pointers are never read
    dp_c = dp.contiguous() if dp is not None else p
    args = (q, k, v, key_idx, p, g, dp_c, dq, dk, dv, ds if ds is not None else p, *_strides(q), *_strides(k),
            *_strides(v), *_strides(g), H, NQ, Tk, kk, D, 1.0 / math.sqrt(D))
    kw = dict(ACT=ACTIVATION_IDS[activation], HAS_DOUT=dout is not None, HAS_DP=dp is not None, HAS_DS=ds is not None,
              **cfg)
    return [(_asam_bwd_kernel, grid, args, kw)]


def _check(q, k, v, key_idx, sel_mask, bias, activation) -> None:
    if triton is None:
        raise RuntimeError("topk_attention needs triton: pip install -e '.[gpu]', or run ASAM's PyTorch path "
                           "(ressformer.kernels.set_asam_kernel('torch'))")
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"activation={activation!r}: choose one of {tuple(ACTIVATION_IDS)}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"topk_attention expects q (B,H,Q,D), k = v (B,H,Tk,D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    slots = (*q.shape[:3], key_idx.shape[-1])
    if key_idx.shape != slots or sel_mask.shape != slots or (bias is not None and bias.shape != slots):
        raise ValueError(f"key_idx, sel_mask and bias must be (B,H,Q,kk) = {slots}; got {tuple(key_idx.shape)}, "
                         f"{tuple(sel_mask.shape)}, {None if bias is None else tuple(bias.shape)}")
    if key_idx.dtype != torch.int64 or sel_mask.dtype != torch.bool:
        raise ValueError(f"key_idx must be int64 and sel_mask bool; got {key_idx.dtype}, {sel_mask.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype of float32 / bfloat16 / float16 (the kernel computes in "
                         f"float32); got {q.dtype}, {k.dtype}, {v.dtype}: use the PyTorch path for others")
    if slots[-1] > MAX_SLOTS:
        raise ValueError(f"kk={slots[-1]} selected keys per query exceeds the kernel's {MAX_SLOTS}: lower asam.topk "
                         f"or run the PyTorch path (ressformer.kernels.set_asam_kernel('torch'))")
    devices = {t.device for t in (q, k, v, key_idx, sel_mask) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"topk_attention inputs must be on one device; got {sorted(map(str, devices))}")
    if q.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("topk_attention on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before ressformer.kernels.asam_triton is imported, or use CUDA tensors")


class _TopkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_idx, sel_mask, bias, activation):
        B, H, NQ, D = q.shape
        Tk, kk = k.shape[2], key_idx.shape[-1]
        key_idx = key_idx.contiguous()
        out = torch.empty(B, H, NQ, D, dtype=q.dtype, device=q.device)  # every element written by the kernel
        p = torch.empty(B, H, NQ, kk, dtype=torch.float32, device=q.device)
        ctx.set_materialize_grads(False)
        ctx.activation, ctx.shape = activation, (B, H, NQ, Tk, kk, D)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(q, k, v, key_idx, p)
        if out.numel() == 0 or kk == 0:
            return out.zero_(), p
        for fn, grid, args, kw in _fwd_launches(q, k, v, key_idx, sel_mask, bias, out, p, activation):
            fn[grid](*args, **kw)
        return out, p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dp):
        q, k, v, key_idx, p = ctx.saved_tensors
        B, H, NQ, Tk, kk, D = ctx.shape
        dq = torch.zeros(B, H, NQ, D, dtype=q.dtype, device=q.device)
        dk = torch.zeros(B, H, Tk, D, dtype=torch.float32, device=q.device)  # atomic-add targets
        dv = torch.zeros(B, H, Tk, D, dtype=torch.float32, device=q.device)
        want_ds = ctx.bias_dtype is not None and ctx.needs_input_grad[5]
        ds = torch.zeros(B, H, NQ, kk, dtype=torch.float32, device=q.device) if want_ds else None
        if (dout is not None or dp is not None) and dq.numel() > 0 and kk > 0:
            for fn, grid, args, kw in _bwd_launches(q, k, v, key_idx, p, dout, dp, dq, dk, dv, ds, ctx.activation):
                fn[grid](*args, **kw)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, ds if ds is None else ds.to(ctx.bias_dtype), None


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_idx: torch.Tensor,
                   sel_mask: torch.Tensor, bias: torch.Tensor | None = None,
                   activation: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k attention over keys read by index. q (B, H, Q, D), k / v (B, H, Tk, D), key_idx (B, H, Q, kk) int64
    (indices of unmasked slots must lie in [0, Tk)), sel_mask (B, H, Q, kk) bool, bias (B, H, Q, kk) or None.

    Returns (out (B, H, Q, D) in q's dtype, p (B, H, Q, kk) float32), both differentiable (in q, k, v, bias).
    """
    _check(q, k, v, key_idx, sel_mask, bias, activation)
    return _TopkAttention.apply(q, k, v, key_idx, sel_mask, bias, activation)
