"""ASAM attention vs dense causal attention: forward+backward time and peak memory of one attention call vs T.

    python bench/attention.py [--device cpu|cuda] [--dtype float32|bfloat16] [--seq-lens 1024 2048 ...]
                              [--preset 1b] [--heads H] [--repeats 3] [--fit-from 4096] [--json OUT]

One attention call (B, H, T, D) -> (B, H, T, D), causal, then a backward from a fixed random output gradient, for
these methods (same B, H, D and inputs for all):
    sdpa             torch.nn.functional.scaled_dot_product_attention(is_causal=True): dense softmax, FlashAttention
                     on a GPU; every ratio column is relative to this row at the same T, in the same run
    flex             torch.nn.attention.flex_attention with a causal block mask (dense softmax; compiled on CUDA)
    adasplash        AdaSplash (PyPI `adasplash`, Triton, CUDA only): dense alpha-entmax attention with block
                     skipping; alpha = 2 for sparsemax, 1.5 otherwise
    reference        ressformer.attention.sparse_attention(impl="reference"): (T x T) scores, up to --reference-max
    chunked          impl="chunked": exact per-query top-k, memory linear in T, selection O(T^2) without grad
    block            impl="block": block pre-selection, then top-k inside the kept blocks
    chunked+gather, block+gather   the same with the kept keys gathered per query (sparse_attention's
                     attend="gather"); the rows above take attend="auto", which runs a chunk with few candidates
                     per kept key as dense matmuls masked to the kept keys (attention._dense_topk_pays)
    chunked+triton, block+triton   the same with ASAM's Triton top-k kernel (ressformer.kernels, CUDA only)
The ASAM rows use the preset's asam settings (topk, activation, chunk / block sizes; `--set asam.X=V` overrides)
and the torch path unless named +triton. H and D come from the preset (D = d_model / n_heads), --heads overrides H.

Each (method, T) runs one untimed warm-up call (compilation, autotuning), then --repeats timed calls; `ms` is the
minimum. Peak memory is measured over the timed calls, above what was allocated before them (the inputs):
CUDA: torch.cuda.max_memory_allocated. CPU: torch exposes no allocator statistics for CPU tensors (tracemalloc does
not see them), so the peak is the process RSS sampled every millisecond by a thread, minus the RSS before the call,
with glibc's mmap threshold set to 1 MiB (mallopt) so freed tensors leave the RSS; short calls can miss their peak.
That threshold maps and zeroes every large allocation afresh, which slows allocation-heavy methods: --time-only
times with the allocator as training runs it and measures no memory on CPU.
A method is `skipped` at T when it cannot run there (with the reason), when its time at the previous T scaled by
(T / T_prev)^2 exceeds --budget-s, or when --max-total-s is spent; `oom` when it runs out of memory. The fitted
exponent is the least-squares slope of log(ms) vs log(T) over the measured T >= --fit-from (2 points at least).
The memory ratio is left out when sdpa's peak is under 1 MiB (on CPU that is below what RSS sampling resolves).
Results are printed as they come and, with --json, rewritten after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ressformer import ModelConfig  # noqa: E402
from ressformer.config import parse_sets  # noqa: E402


# --- fit ------------------------------------------------------------------------------------------
def fit_exponent(xs, ys) -> tuple[float, float] | None:
    """Least squares on log-log: y ~ c * x^p -> (p, c); None with fewer than 2 distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    p = sum((a - mx) * (b - my) for a, b in pts) / sxx
    return p, math.exp(my - p * mx)


# --- memory ---------------------------------------------------------------------------------------
class _RssPeak:
    """Process RSS (bytes) at entry (`base`) and its peak while the block runs, sampled every `interval` seconds
    by a thread."""

    def __init__(self, interval: float = 1e-3):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@contextlib.contextmanager
def _cpu_mmap_threshold(enabled: bool, nbytes: int = 1 << 20):
    """glibc: serve allocations >= nbytes by mmap inside the block, so a freed tensor leaves the RSS at once
    (mallopt M_MMAP_THRESHOLD); afterwards the threshold goes back to glibc's initial 128 KiB (fixed from then on)."""
    try:
        libc = ctypes.CDLL("libc.so.6") if enabled else None
    except OSError:
        libc = None
    if libc is not None:
        libc.mallopt(-3, nbytes)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 128 * 1024)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the call"
    return ("CPU process RSS delta (peak RSS sampled every 1 ms minus RSS before the call; torch has no CPU "
            "allocator stats, tracemalloc does not see tensors)")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def measure(fn, device: torch.device, repeats: int, memory: bool = True) -> dict:
    """Time and peak memory of fn() (one forward+backward): a warm-up call, then `repeats` timed calls.

    Returns {"status": "ok", "ms", "warmup_ms", "peak_mib"} or {"status": "oom"|"error", "reason"}; memory=False:
    no memory measured on CPU (peak_mib None)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        t0 = time.perf_counter()
        fn()
        sync()
        warm = time.perf_counter() - t0
        times, peak = [], 0
        for _ in range(repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                mon = contextlib.nullcontext()
            else:
                mon = _RssPeak() if memory else None
            with mon or contextlib.nullcontext():
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            if cuda or mon is not None:
                peak = max(peak, torch.cuda.max_memory_allocated() - base if cuda else mon.peak - mon.base)
        peak_mib = peak / 2**20 if cuda or memory else None
        return {"status": "ok", "ms": min(times) * 1e3, "warmup_ms": warm * 1e3, "peak_mib": peak_mib}
    except Exception as e:  # noqa: BLE001 (a method that fails is reported, the others still run)
        if cuda:
            torch.cuda.empty_cache()
        return {"status": "oom" if _is_oom(e) else "error", "reason": _reason(e)}


# --- methods --------------------------------------------------------------------------------------
class Skip(Exception):
    """A method that cannot run at this size (the message says why)."""


def _set_asam_kernel(mode: str):
    from ressformer import kernels

    prev = kernels.asam_kernel
    kernels.set_asam_kernel(mode)
    return prev


def method_table(device: torch.device, asam_cfg, reference_max: int) -> list[tuple[str, object]]:
    """(name, builder or skip reason). A builder takes (q, k, v) and returns fn() -> out (B, H, T, D) or raises
    `Skip(reason)`."""
    from ressformer.attention import sparse_attention

    cuda = device.type == "cuda"
    a = asam_cfg

    def sdpa(q, k, v):
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def flex(q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        T = q.shape[2]
        bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=str(device))
        f = torch.compile(flex_attention) if cuda else flex_attention
        return lambda: f(q, k, v, block_mask=bm)

    def adasplash(q, k, v):
        import adasplash as ada

        alpha = 2.0 if a.activation == "sparsemax" else 1.5
        return lambda: ada.adasplash(q, k, v, alpha=alpha, is_causal=True)

    def asam(impl, kernel, attend="auto"):
        def build(q, k, v):
            T = q.shape[2]
            if impl == "reference" and T > reference_max:
                raise Skip(f"materialises (B, H, T, T) scores: T > --reference-max {reference_max}")
            pos = torch.arange(T, device=device)

            def fn():
                prev = _set_asam_kernel(kernel)
                try:
                    out, _ = sparse_attention(q, k, v, q_pos=pos, k_pos=pos, causal=True, activation=a.activation,
                                              topk=a.topk, impl=impl, chunk_size=a.chunk_size,
                                              block_size=a.block_size, blocks_per_query=a.blocks_per_query,
                                              block_select=a.block_select, attend=attend)
                finally:
                    _set_asam_kernel(prev)
                return out

            return fn

        return build

    rows: list[tuple[str, object]] = [("sdpa", sdpa)]
    if not _importable("torch.nn.attention.flex_attention"):
        rows.append(("flex", "torch.nn.attention.flex_attention is not in this torch"))
    elif not cuda:
        rows.append(("flex", "FlexAttention has no backward on CPU (torch raises NotImplementedError)"))
    else:
        rows.append(("flex", flex))
    alpha = 2.0 if a.activation == "sparsemax" else 1.5
    ada_name = f"adasplash(a={alpha:g})"
    if not cuda:
        rows.append((ada_name, "AdaSplash is a CUDA Triton kernel"))
    elif not _importable("adasplash"):
        rows.append((ada_name, "adasplash is not installed (pip install adasplash)"))
    else:
        rows.append((ada_name, adasplash))
    rows += [("reference", asam("reference", "torch")), ("chunked", asam("chunked", "torch")),
             ("chunked+gather", asam("chunked", "torch", "gather")), ("block", asam("block", "torch")),
             ("block+gather", asam("block", "torch", "gather"))]
    from ressformer.kernels import triton_available

    try:
        no_triton = None if triton_available() else "triton is not installed"
    except Exception as e:  # noqa: BLE001 (the kernel module fails to import with this triton: say so)
        no_triton = f"ressformer.kernels.asam_triton does not import: {_reason(e)}"
    for impl in ("chunked", "block"):
        name = f"{impl}+triton"
        if not cuda:
            rows.append((name, "ASAM's Triton kernel runs on CUDA (on CPU only in the interpreter, for parity tests)"))
        elif no_triton:
            rows.append((name, no_triton))
        elif a.topk == 0:
            rows.append((name, "asam.topk = 0: no top-k pass for the kernel"))
        else:
            rows.append((name, asam(impl, "triton")))
    return rows


def _importable(mod: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


# --- main -----------------------------------------------------------------------------------------
def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None,
                    help="default: 1024 .. 65536 (powers of 2) on CUDA, 1024 .. 16384 on CPU")
    ap.add_argument("--preset", default=None,
                    help="model preset for H, D and the asam settings (default: 1b on CUDA, 125m on CPU)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="preset override, e.g. --set asam.block_select=chunk (repeatable)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the preset's on CUDA, 4 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-max", type=int, default=None,
                    help="largest T of the reference impl (default 4096 on CUDA, 2048 on CPU)")
    ap.add_argument("--fit-from", type=int, default=None,
                    help="smallest T in the exponent fit (default 4096 on CUDA, 1024 on CPU)")
    ap.add_argument("--budget-s", type=float, default=None, help="per-call time budget (default 20 on CUDA, 60 on CPU)")
    ap.add_argument("--max-total-s", type=float, default=None,
                    help="stop measuring after this long (default: no limit)")
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods (names as in the table)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-only", action="store_true",
                    help="CPU: time with glibc's allocator as training runs it (no mmap threshold, no RSS sampling; "
                         "peak MiB not measured). The memory measurement's 1 MiB mmap threshold maps and zeroes every "
                         "large allocation afresh, which slows allocation-heavy methods")
    ap.add_argument("--json", default=None, metavar="OUT")
    a = ap.parse_args(argv)
    a.device = torch.device(a.device)
    cuda = a.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if a.repeats < 1:
        ap.error(f"--repeats {a.repeats}: need >= 1 (the timed calls)")
    a.dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    a.seq_lens = a.seq_lens or [2**i for i in range(10, 17 if cuda else 15)]
    a.preset = a.preset or ("1b" if cuda else "125m")
    try:
        a.cfg = ModelConfig.from_preset(a.preset, **parse_sets(a.set))
    except ValueError as e:
        ap.error(str(e))
    a.heads = a.heads or (a.cfg.n_heads if cuda else 4)
    a.reference_max = a.reference_max or (4096 if cuda else 2048)
    a.fit_from = a.fit_from or (4096 if cuda else 1024)
    a.budget_s = a.budget_s or (20.0 if cuda else 60.0)
    a.methods_table = method_table(a.device, a.cfg.asam, a.reference_max)
    if a.methods:
        names = [n for n, _ in a.methods_table]
        if sorted(set(a.methods) - set(names)):
            ap.error(f"--methods {sorted(set(a.methods) - set(names))}: choose from {names}")
        a.methods_table = [(n, b) for n, b in a.methods_table if n == "sdpa" or n in a.methods]  # ratios need sdpa
    return a


def _header(a) -> dict:
    cuda, s = a.device.type == "cuda", a.cfg.asam
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(a.device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "triton": triton_version, "dtype": str(a.dtype).replace("torch.", ""),
        "batch": a.batch, "heads": a.heads, "head_dim": a.cfg.head_dim, "preset": a.preset, "overrides": a.set,
        "asam": {"activation": s.activation, "topk": s.topk, "chunk_size": s.chunk_size, "block_size": s.block_size,
                 "blocks_per_query": s.blocks_per_query, "block_select": s.block_select},
        "repeats": a.repeats, "budget_s": a.budget_s, "fit_from": a.fit_from, "reference_max": a.reference_max,
        "memory": ("not measured (--time-only)" if a.time_only and a.device.type != "cuda" else
                   memory_method(a.device)), "seq_lens": a.seq_lens,
    }


def _run_one(build, q, k, v, gout, a, gate: str | None) -> dict:
    """Measure one method at one T: {"status", ...} as `measure` returns, or skipped / oom / error. A method that
    cannot run at this T says so first; otherwise a `gate` reason (budget, memory) skips it."""
    try:
        fwd = build(q, k, v)
        if gate is not None:
            return {"status": "skipped", "reason": gate}

        def fn():
            for t in (q, k, v):
                t.grad = None
            fwd().backward(gout)

        return measure(fn, a.device, a.repeats, memory=not a.time_only)
    except Skip as e:
        return {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 (building the method failed: report it, keep going)
        return {"status": "oom" if _is_oom(e) else "error", "reason": _reason(e)}
    finally:
        for t in (q, k, v):
            t.grad = None
        if a.device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    a = _parse(argv)
    cuda = a.device.type == "cuda"
    H, D = a.heads, a.cfg.head_dim
    result = {"config": _header(a), "rows": [], "exponents": {}}
    h = result["config"]
    print(f"torch {h['torch']}, triton {h['triton']}, {h['device']}, {h['dtype']}, B={a.batch} H={H} D={D}, "
          f"preset {a.preset} asam {h['asam']}{' ' + str(a.set) if a.set else ''}")
    print(f"fwd+bwd of one causal attention call, min of {a.repeats} after a warm-up; peak MiB = {h['memory']}")
    print(f"{'T':>6} {'method':16} {'ms':>10} {'peak MiB':>10} {'x sdpa ms':>10} {'x sdpa MiB':>10}  note",
          flush=True)

    def save():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(result, indent=1))

    last: dict[str, tuple[int, float]] = {}  # method -> (T, ms) of its last measured T
    oom_at: dict[str, int] = {}  # method -> the T it ran out of memory at (larger T are skipped)
    t_start = time.perf_counter()
    torch.manual_seed(a.seed)
    with _cpu_mmap_threshold(enabled=not cuda and not a.time_only):
        for T in a.seq_lens:
            g = torch.Generator().manual_seed(a.seed + T)
            q, k, v, gout = (torch.randn(a.batch, H, T, D, generator=g).to(a.device, a.dtype) for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            sdpa_row = None
            for name, build in a.methods_table:
                row = {"T": T, "method": name}
                pred = last[name][1] / 1e3 * (T / last[name][0]) ** 2 if name in last else 0.0
                gate = None
                if a.max_total_s is not None and time.perf_counter() - t_start > a.max_total_s:
                    gate = f"--max-total-s {a.max_total_s:g} spent"
                elif name in oom_at:
                    gate = f"out of memory at T={oom_at[name]}"
                elif pred > a.budget_s:
                    gate = f"predicted {pred:.3g} s per call > --budget-s {a.budget_s:g}"
                if isinstance(build, str):
                    row.update(status="skipped", reason=build)
                else:
                    row.update(_run_one(build, q, k, v, gout, a, gate))
                if row["status"] == "ok":
                    last[name] = (T, row["ms"])
                elif row["status"] == "oom":
                    oom_at[name] = T
                sdpa_row = row if name == "sdpa" else sdpa_row
                ok = row["status"] == "ok" and sdpa_row is not None and sdpa_row["status"] == "ok"
                row["x_sdpa_ms"] = row["ms"] / sdpa_row["ms"] if ok and sdpa_row["ms"] > 0 else None
                row["x_sdpa_mib"] = (row["peak_mib"] / sdpa_row["peak_mib"]  # below 1 MiB: sampling noise on CPU
                                     if ok and row["peak_mib"] is not None and sdpa_row["peak_mib"] >= 1.0 else None)
                result["rows"].append(row)
                if row["status"] == "ok":
                    print(f"{T:>6} {name:16} {row['ms']:>10.2f} {_fmt(row['peak_mib'], '>10.1f')} "
                          f"{_fmt(row['x_sdpa_ms'], '>10.2f')} {_fmt(row['x_sdpa_mib'], '>10.2f')}", flush=True)
                else:
                    print(f"{T:>6} {name:16} {row['status']:>10} {'':>32}  {row.get('reason', '')}", flush=True)
                save()
            del q, k, v, gout

    print(f"fitted exponent of time vs T (ms ~ c T^p, least squares on log-log over T >= {a.fit_from}):")
    for name, _ in a.methods_table:
        pts = [(r["T"], r["ms"]) for r in result["rows"]
               if r["method"] == name and r["status"] == "ok" and r["T"] >= a.fit_from]
        fit = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
        result["exponents"][name] = None if fit is None else {"exponent": fit[0], "points": len(pts)}
        print(f"  {name:16} " + (f"p = {fit[0]:.2f} ({len(pts)} points)" if fit
                                 else f"n/a ({len(pts)} measured T >= {a.fit_from})"))
    save()
    return result


if __name__ == "__main__":
    main()
