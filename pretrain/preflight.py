"""Is this node, and this build, fit to train? Checks of every rank before the first step.

    python -m pretrain.preflight [--config RUN.yaml] [--ds_config DS.json] [--set key=value ...]   # one process
    deepspeed --num_gpus 8 --module pretrain.preflight ...     # or srun / torchrun: every rank of the job
    (and at the start of every run, on every rank, unless `preflight: false`)

Per rank:
- kernels: each fused kernel the run would use, against its PyTorch path on small random inputs, with the tolerances
  of the tests: the Triton ASAM kernel (forward, and backward through out and p), liger's fused linear
  cross-entropy (loss and both gradients), the routed experts' sync-free path (output and gradients) against the
  loop. A kernel that fails is switched off for the run on every rank (`ressformer.kernels` modes: the PyTorch path)
  with one loud warning, and the result goes to run_info.json and metrics.jsonl: never silently wrong. On CPU a run
  uses none of them; the command alone runs the Triton ones in the Triton interpreter (tiny sizes).
- matmul: TFLOP/s of a square matmul (bf16 on a GPU, fp32 on CPU) and its fraction of the device's dense peak
  (pretrain.metrics.PEAK_TFLOPS; unknown devices: no fraction).
- all-reduce: bus bandwidth of an all-reduce over every rank (bytes x 2 (n-1) / n / seconds).
- memory: free device memory (available RAM on CPU) against `pretrain.memory_estimate` for this run.

Rank 0 prints one table per node and names each rank that fails: a kernel switched off, memory below the estimate
(GPU), a matmul or all-reduce below `preflight.min_fraction` of the ranks' median (GPUs; CPU figures are reported
only: CPU ranks share cores). A run that cannot be trusted
(memory or throughput) stops with `PreflightError` (exit status 5); a switched-off kernel only warns.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from pretrain import distributed as D

PREFLIGHT_EXIT = 5


class PreflightError(RuntimeError):
    """The preflight found a rank the run cannot trust (raised on every rank alike)."""


@dataclass
class RankReport:
    rank: int
    host: str
    device: str
    kernels: dict = field(default_factory=dict)  # name -> "ok" | "failed: ..." | "not used: ..."
    matmul_tflops: float | None = None
    peak_fraction: float | None = None
    allreduce_gbps: float | None = None
    free_gib: float | None = None
    estimate_gib: float | None = None
    problems: list = field(default_factory=list)


# --- kernels ---------------------------------------------------------------------------------------------
def _close(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rel: float | None = None) -> str | None:
    got, ref = got.float(), ref.float()
    if rel is not None:
        r = ((got - ref).norm() / ref.norm().clamp(min=1e-12)).item()
        return None if r <= rel else f"{name} relative error {r:.2e} > {rel:.0e}"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    return None if err <= atol and math.isfinite(err) else f"{name} max error {err:.2e} > {atol:.0e}"


def check_asam(device: str, dtype: torch.dtype) -> str | None:
    """The Triton top-k kernel against the same computation in PyTorch (gather, scores + bias, sparsemax, weighted
    sum), out / p and the gradients of q, k, v, bias. -> None, or what differs."""
    from ressformer.kernels.asam_triton import topk_attention
    from ressformer.sparse import normalize

    g = torch.Generator().manual_seed(0)
    B, H, Q, Tk, D, kk = 1, 2, 16, 48, 32, 8
    leaves = [torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
              for shape in ((B, H, Q, D), (B, H, Tk, D), (B, H, Tk, D))]
    bias = (0.5 * torch.randn(B, H, Q, kk, generator=g)).to(device).requires_grad_()
    idx = torch.stack([torch.randperm(Tk, generator=g)[:kk] for _ in range(B * H * Q)]).view(B, H, Q, kk).to(device)
    mask = (torch.rand(B, H, Q, kk, generator=g) > 0.2).to(device)
    q, k, v = leaves
    out, p = topk_attention(q, k, v, idx, mask, bias, "sparsemax")
    gi = idx.reshape(B, H, Q * kk, 1).expand(B, H, Q * kk, D)
    kg = k.gather(2, gi).view(B, H, Q, kk, D).float()
    vg = v.gather(2, gi).view(B, H, Q, kk, D).float()
    s = torch.einsum("bhid,bhikd->bhik", q.float(), kg) / D ** 0.5 + bias.float()
    ref_p = normalize(torch.where(mask, s, torch.full((), float("-inf"), device=s.device)), "sparsemax")
    ref_out = torch.einsum("bhik,bhikd->bhid", ref_p, vg)
    w_o = torch.cos(torch.arange(out.numel(), device=device, dtype=torch.float32)).view(out.shape)
    w_p = torch.sin(torch.arange(p.numel(), device=device, dtype=torch.float32)).view(p.shape)
    grads = torch.autograd.grad((out.float() * w_o).sum() + (p * w_p).sum(), [*leaves, bias])
    refs = torch.autograd.grad((ref_out * w_o).sum() + (ref_p * w_p).sum(), [*leaves, bias])
    rel = None if dtype == torch.float32 else 1e-2  # bf16: the kernel tests' bound against the fp32 path
    for name, a, r in zip(("out", "p", "dq", "dk", "dv", "dbias"), (out, p, *grads), (ref_out, ref_p, *refs)):
        bad = _close(name, a, r, 1e-4, rel)
        if bad:
            return bad
    return None


def check_fused_loss(device: str, dtype: torch.dtype) -> str | None:
    """liger's fused linear cross-entropy against logits + lm_loss: the loss and the gradients of h and weight."""
    from ressformer.kernels.fused_loss import linear_cross_entropy
    from ressformer.output import lm_loss

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 16, 32, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (0.1 * torch.randn(128, 32, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 128, (2, 16), generator=g).to(device)
    labels[0, 5] = -100
    loss = linear_cross_entropy(h, w, labels)
    ref = lm_loss(h.float() @ w.float().T, labels)
    gh, gw = torch.autograd.grad(loss, [h, w])
    rh, rw = torch.autograd.grad(ref, [h, w])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    return _close("loss", loss, ref, tol) or _close("dh", gh, rh, 10 * tol) or _close("dweight", gw, rw, 10 * tol)


def check_experts(device: str, dtype: torch.dtype, mode: str | None = None) -> str | None:
    """The routed experts on `mode` (None: the path `ressformer.kernels.moe_experts` picks for these tensors)
    against the loop: output and gradients."""
    from ressformer import kernels
    from ressformer.moe import MoEExperts

    torch.manual_seed(2)
    m = MoEExperts(4, 32, 64).to(device=device, dtype=dtype)
    x = torch.randn(24, 32, device=device, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, 3, (24, 2), device=device)  # expert 3 gets no token
    idx[:, 1] = (idx[:, 0] + 1) % 3
    wgt = torch.rand(24, 2, device=device).softmax(-1)
    saved = kernels.moe_experts

    def run(m_: str):
        kernels.set_moe_experts(m_)
        y = m(x, idx, wgt)
        return y, torch.autograd.grad(y.float().square().sum(), [x, *m.parameters()])

    try:
        y, grads = run(mode or saved)
        ry, refs = run("loop")
    finally:
        kernels.set_moe_experts(saved)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, r in zip(("out", "dx", "dgate_up", "ddown"), (y, *grads), (ry, *refs)):
        bad = _close(name, a, r, tol, None if dtype == torch.float32 else 2e-2)
        if bad:
            return bad
    return None


def _sync_free_experts(device: str, dtype: torch.dtype) -> str | None:
    """Every sync-free experts path this torch has, against the loop (the command alone, where `auto` would take the
    loop)."""
    from ressformer import kernels

    for mode in kernels.MOE_EXPERTS_MODES:
        if mode in ("auto", "loop") or (mode == "grouped_mm" and not hasattr(torch, "_grouped_mm")):
            continue
        bad = check_experts(device, dtype, mode)
        if bad:
            return f"{mode}: {bad}"
    return None


KERNELS = {  # name -> (check, mode switch that turns it off, whether the run would use it on `device`)
    "asam_triton": (check_asam, lambda k: k.set_asam_kernel("torch")),
    "fused_loss": (check_fused_loss, lambda k: k.set_lm_loss_kernel("torch")),
    "moe_experts": (check_experts, lambda k: k.set_moe_experts("loop")),
}


def _would_use(name: str, x: torch.Tensor) -> bool:
    from ressformer import kernels

    if name == "asam_triton":
        return kernels.use_asam_kernel(x)
    if name == "fused_loss":
        return kernels.use_lm_loss_kernel(x)
    return kernels.experts_path(x, (x.shape[-1], 2 * x.shape[-1])) != "loop"


def check_kernels(device: str, dtype: torch.dtype, *, all_kernels: bool = False) -> dict[str, str]:
    """name -> "ok" | "failed: ..." | "not used: ..." for each fused kernel; `all_kernels`: check the Triton ones
    even where the run would not use them (the command alone on CPU, in the Triton interpreter)."""
    out = {}
    probe = torch.zeros(1, 64, device=device, dtype=dtype)
    for name, (check, _) in KERNELS.items():
        if name == "moe_experts" and all_kernels and not _would_use(name, probe):
            check = _sync_free_experts
        try:
            used = _would_use(name, probe)
        except (RuntimeError, ValueError) as e:
            out[name] = f"failed: {e}"
            continue
        if not (used or all_kernels):
            out[name] = f"not used on {device} {str(dtype).replace('torch.', '')}"
            continue
        try:
            bad = check(device, dtype)
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile or launch fails here, not in step 1
            bad = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        out[name] = "ok" if bad is None else f"failed: {bad}"
    return out


# --- throughput ------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(device: str, dtype: torch.dtype, n: int, reps: int = 5, trials: int = 3) -> float:
    """The best of `trials` timings of `reps` n x n matmuls (the best: a check of the device, not of a moment's
    contention)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * reps / best / 1e12


def allreduce_gbps(device: str, nbytes: int, reps: int = 5) -> float | None:
    """Bus bandwidth (GB/s) of an all-reduce of `nbytes` over the job's group; None for one rank."""
    import torch.distributed as dist

    world = D.world_size()
    if world == 1 or not dist.is_initialized():
        return None
    t = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dist.all_reduce(t)
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(t)
    _sync(device)
    dt = (time.perf_counter() - t0) / reps
    return nbytes * 2 * (world - 1) / world / dt / 1e9


def free_memory_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0] / 2**30
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except ImportError:
        return None


def estimate_gib(run, ds: dict) -> float | None:
    """pretrain.memory_estimate's per-GPU total for this run (None when it cannot say)."""
    from pretrain.ds_config import ds_settings
    from pretrain.memory_estimate import estimate_memory, resolve_kernels, run_settings

    try:
        st, dss = run_settings(run), ds_settings(ds)
        kernel, fused = resolve_kernels(st["cfg"], "auto", "auto", st["seq_len"])
        est = estimate_memory(st["cfg"], seq_len=st["seq_len"], micro_batch=st["micro_batch"],
                              world_size=D.world_size(), zero_stage=dss["zero_stage"], ckpt_every=st["ckpt_every"],
                              max_live_parameters=dss["max_live_parameters"], ep_size=dss["ep_size"],
                              asam_kernel=kernel and torch.cuda.is_available(),
                              fused_loss=fused and torch.cuda.is_available(), documents=st["documents"])
        return est.total / 2**30
    except (ValueError, KeyError, AttributeError):
        return None


# --- the whole check -------------------------------------------------------------------------------------
def check_rank(run=None, ds: dict | None = None, *, all_kernels: bool = False) -> RankReport:
    """This rank's report (every check but the comparison across ranks). Collective (the all-reduce)."""
    from pretrain.metrics import peak_tflops

    cuda = torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    rep = RankReport(D.rank(), socket.gethostname(), torch.cuda.get_device_name() if cuda else "cpu")
    rep.kernels = check_kernels(device, dtype, all_kernels=all_kernels)
    rep.matmul_tflops = matmul_tflops(device, dtype, 8192 if cuda else 512)
    peak = peak_tflops()
    rep.peak_fraction = rep.matmul_tflops / peak if peak else None
    rep.allreduce_gbps = allreduce_gbps(device, (256 if cuda else 8) * 2**20)
    rep.free_gib = free_memory_gib(device)
    rep.estimate_gib = estimate_gib(run, ds or {}) if run is not None else None
    if cuda and rep.free_gib is not None and rep.estimate_gib is not None and rep.free_gib < rep.estimate_gib:
        rep.problems.append(f"free memory {rep.free_gib:.1f} GiB < the run's estimate {rep.estimate_gib:.1f} GiB")
    return rep


def judge(reports: list[RankReport], min_fraction: float) -> None:
    """Add to each report the problems seen against the other ranks (below min_fraction of the median). GPUs only:
    CPU ranks share cores and caches with each other and whatever else runs, so their figures are reported, not
    judged."""
    if not any(r.device != "cpu" for r in reports):
        return
    for key, what in (("matmul_tflops", "matmul TFLOP/s"), ("allreduce_gbps", "all-reduce GB/s")):
        vals = [getattr(r, key) for r in reports if getattr(r, key) is not None]
        if len(vals) < 2:
            continue
        med = statistics.median(vals)
        for r in reports:
            v = getattr(r, key)
            if v is not None and v < min_fraction * med:
                r.problems.append(f"{what} {v:.3g} is {v / med:.0%} of the ranks' median {med:.3g} "
                                  f"(preflight.min_fraction={min_fraction})")


def table(reports: list[RankReport]) -> str:
    """One table per node."""
    lines = []
    for host in sorted({r.host for r in reports}):
        rows = [r for r in reports if r.host == host]
        lines.append(f"[preflight] node {host}: ranks {', '.join(str(r.rank) for r in rows)}")
        lines.append(f"  {'rank':>4}  {'device':<22} {'kernels':<28} {'matmul TFLOP/s':>16} {'all-reduce GB/s':>15} "
                     f"{'free / estimate GiB':>20}  verdict")
        for r in rows:
            kern = " ".join(f"{n}={'ok' if s == 'ok' else 'OFF' if s.startswith('failed') else '-'}"
                            for n, s in r.kernels.items())
            mm = f"{r.matmul_tflops:.3g}" + (f" ({r.peak_fraction:.0%})" if r.peak_fraction else "")
            ar = "n/a" if r.allreduce_gbps is None else f"{r.allreduce_gbps:.3g}"
            mem = ("n/a" if r.free_gib is None else f"{r.free_gib:.1f}") + " / " + \
                  ("n/a" if r.estimate_gib is None else f"{r.estimate_gib:.1f}")
            verdict = "ok" if not r.problems and not _failed(r) else "FAIL"
            lines.append(f"  {r.rank:>4}  {r.device[:22]:<22} {kern:<28} {mm:>16} {ar:>15} {mem:>20}  {verdict}")
    return "\n".join(lines)


def _failed(r: RankReport) -> list[str]:
    return [n for n, s in r.kernels.items() if s.startswith("failed")]


def preflight(run=None, ds: dict | None = None, *, all_kernels: bool = False, min_fraction: float = 0.7,
              verbose: bool = True) -> dict:
    """Collective. Check every rank, switch off on every rank a kernel that failed on one, print the tables (rank
    0), and raise PreflightError naming the ranks the run cannot trust. -> {"kernels_off", "ranks"} (for
    run_info.json)."""
    from ressformer import kernels

    mine = check_rank(run, ds, all_kernels=all_kernels)
    reports = [RankReport(**r) for r in D.all_gather_object(asdict(mine))]
    judge(reports, min_fraction)
    off = sorted({n for r in reports for n in _failed(r)})
    for name in off:
        KERNELS[name][1](kernels)
    if D.rank() == 0 and verbose:
        print(table(reports), flush=True)
        for r in reports:
            for n in _failed(r):
                print(f"[preflight] WARNING: kernel {n} failed its check on rank {r.rank} ({r.host}): "
                      f"{r.kernels[n][len('failed: '):]}; switched off for this run on every rank (PyTorch path)",
                      file=sys.stderr, flush=True)
    untrusted = [f"rank {r.rank} ({r.host}): {'; '.join(r.problems)}" for r in reports if r.problems]
    result = {"kernels_off": off, "ranks": [asdict(r) for r in reports]}
    if untrusted:
        raise PreflightError("the preflight found ranks this run cannot trust: " + " | ".join(untrusted) +
                             ". Exclude those nodes (sbatch --exclude) or set preflight.min_fraction / "
                             "preflight: false")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.preflight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="run config YAML (the memory estimate and thresholds use it)")
    ap.add_argument("--ds_config", default=None, help="DeepSpeed JSON of the run (ZeRO stage for the estimate)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU tensors
    from pretrain.config import load_run_config
    from pretrain.ds_config import load_ds_json

    try:
        run = load_run_config(a.config, a.set)
        ds = load_ds_json(a.ds_config) if a.ds_config else {}
    except ValueError as e:
        print(f"[preflight] config error: {e}", file=sys.stderr)
        return 2
    D.setup_distributed(run.faults.dist_timeout_s)
    try:
        preflight(run, ds, all_kernels=True, min_fraction=run.preflight.min_fraction)
    except PreflightError as e:
        if D.rank() == 0:
            print(f"[preflight] {e}", file=sys.stderr, flush=True)
        rc = PREFLIGHT_EXIT
    else:
        rc = 0
    D.teardown_distributed()
    return rc


if __name__ == "__main__":
    sys.exit(main())
