"""Registers, stack, local and shared memory of every Triton kernel a training step can run, compiled for NVIDIA
GPUs on a machine without one (no GPU, no Triton interpreter).

    python bench/kernel_resources.py --arch sm_80 sm_90 [--presets 125m 1b 1b-long debug] [--kernels asam liger]
        [--activations sparsemax entmax15 softmax] [--variants all|preset] [--shapes 1024x128 ...] [--dtype bf16]
        [--jobs N] [--json FILE]

What is compiled, at each preset's shapes (ressformer.config.ModelConfig.from_preset: kk = asam.topk selected keys,
D = head dim, T = max_seq_len queries, Tk = T + the R2MU memory keys of pretrain.memory_estimate.units):
* ASAM top-k attention (ressformer/kernels/asam_triton.py): the launches `_fwd_launches` / `_bwd_launches` build
  (the kernels, grids, arguments and tiles of `_blocks`, not copies) from meta tensors laid out as
  ASAMAttention makes them: q / k / v (B, H, T, D) views of (B, T, H, D), key_idx / sel_mask / p (B, H, T, kk)
  contiguous, the graph bias float32. Every activation, the forward with and without the graph bias (HAS_BIAS)
  and the backward with every combination of a gradient of p (HAS_DP: SOES reads p, soes.graph=attention) and of
  the bias (HAS_DS); `--variants preset` keeps the combinations the preset's own R2MU steps call. The tiles are
  those `_blocks(kk, D)` picks per direction (the launcher has no other choice: no autotuning); `--shapes KKxD`
  adds made-up (kk, D) pairs to check other tiles (e.g. kk = 1024: one query per program).
* liger-kernel's cross-entropy kernel as ressformer/kernels/fused_loss.py calls it: that function runs on small
  CPU tensors (B=1, T=32 tokens, the preset's d_model and vocab_size, the --dtype) with Triton's launcher replaced
  by a recorder, so the kernel, constexprs (BLOCK_SIZE, HAS_GRADIENTS, ...) and num_warps are the ones it picks for
  those sizes; its backward runs with an upstream gradient != 1 (as under gradient accumulation), which launches
  no Triton kernel (a PyTorch multiply on the device). Only the integer arguments that depend on the token count
  (row counts) differ from a full-size run.

How: the same binder the JIT launcher uses (triton.runtime.jit.create_function_from_signature + _pack_args) turns
the arguments into the signature, constexprs (an integer argument equal to 1, e.g. a unit stride, becomes a
constant) and attributes (pointers and integers divisible by 16), then
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs Triton's passes, LLVM and the wheel's ptxas.
Registers, STACK (bytes of stack frame per thread: register spills land there) and LOCAL (bytes of local memory per
thread) come from the cubin via the wheel's `cuobjdump --dump-resource-usage` (CompiledKernel.n_regs / n_spills
stay None until a device loads the kernel). Shared memory is Triton's dynamic allocation plus the cubin's static
SHARED (sm_90 reserves 1 KiB), checked against the usable shared memory per block of the architecture.
A compilation whose inputs equal an earlier one's (1b and 1b-long share kk and D) is reported once and marked
`same as` there. Compile seconds are wall seconds of triton.compile with a fresh cache directory, N jobs at once.

Exit status: 0 when every kernel compiled with a 0-byte stack frame, 0 bytes of local memory and shared memory
within the limit; 1 when one spills or exceeds the shared memory limit; 2 when one fails to compile, for bad
arguments, or when TRITON_INTERPRET is set in a process where triton was already imported in interpreter mode.
No GPU timing here: these are compiler resource counts, not speed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if "triton" not in sys.modules:  # the interpreter decorates kernels at import: compile the real ones
    os.environ.pop("TRITON_INTERPRET", None)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
SHARED_LIMIT_KIB = {80: 163, 86: 99, 89: 99, 90: 227}  # usable shared memory per block (opt-in maximum)
PRESETS = ("125m", "1b", "1b-long")
ACTIVATIONS = ("sparsemax", "entmax15", "softmax")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LIGER_TOKENS = 32  # tokens of the recorded fused-loss call (B=1)


def triton_modules():
    """(triton, asam_triton) in compile mode; a RuntimeError naming the fix when the kernels are interpreted."""
    try:
        import triton
    except ImportError as e:
        raise RuntimeError(f"triton does not import ({e}): pip install -e '.[gpu]' (or '.[dev]')") from e
    from ressformer.kernels import asam_triton

    if triton.knobs.runtime.interpret or asam_triton.INTERPRETED:
        raise RuntimeError("the Triton interpreter is on in this process (TRITON_INTERPRET was set before triton was "
                           "imported), so the kernels are decorated for the interpreter and cannot be compiled: run "
                           "bench/kernel_resources.py in a fresh process without TRITON_INTERPRET")
    return triton, asam_triton


def cuobjdump_path() -> Path:
    """The cuobjdump shipped in triton's NVIDIA backend; a RuntimeError naming the fix when it is missing."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is missing: this triton wheel ({triton.__version__}) lacks the NVIDIA backend's "
                           "tools; install the Linux x86-64 / aarch64 wheel from PyPI (pip install triton)")
    return path


# ----------------------------------------------------------------------------------------------------------- shapes
SHAPE_RX = re.compile(r"kk(\d+)xD(\d+)$")


@functools.lru_cache(maxsize=None)
def preset_shapes(name: str) -> dict:
    """The sizes of a preset the kernels see: kk, D, heads, T, Tk (T + memory keys), d_model, vocab and the
    (HAS_BIAS, HAS_DP) of each R2MU step whose attention takes the top-k path. A name kk<K>xD<D> (--shapes) is
    a made-up ASAM shape: 16 heads, T = 4096 queries over 2T keys, every (HAS_BIAS, HAS_DP)."""
    from pretrain.memory_estimate import asam_path, units
    from ressformer.config import ModelConfig

    m = SHAPE_RX.match(name)
    if m:
        kk, D = int(m[1]), int(m[2])
        return dict(preset=name, kk=kk, D=D, H=16, T=4096, Tk=8192, d_model=16 * D, vocab=0, activation=None,
                    calls=list(itertools.product([False, True], repeat=2)))
    cfg = ModelConfig.from_preset(name)
    T = cfg.max_seq_len
    us = units(cfg, T)
    calls = sorted({(u.graph_in, u.pattern) for u in us if asam_path(cfg, T, u.n_mem)[0] == "gathered"})
    return dict(preset=name, kk=cfg.asam.topk, D=cfg.head_dim, H=cfg.n_heads, T=T,
                Tk=T + max((u.n_mem for u in us), default=0), d_model=cfg.d_model, vocab=cfg.vocab_size,
                activation=cfg.asam.activation, calls=calls)


def asam_launches(shape: dict, activation: str, direction: str, has_bias: bool, has_dp: bool, dtype) -> list:
    """[(kernel, args, kwargs)] of one topk_attention forward ("fwd", has_dp unused) or backward ("bwd"; has_bias:
    the bias needs a gradient, HAS_DS), built by asam_triton's own launch functions from meta tensors."""
    _, A = triton_modules()
    B, H, T, Tk, kk, D = 1, shape["H"], shape["T"], shape["Tk"], shape["kk"], shape["D"]
    meta = dict(device="meta")
    q = torch.empty(B, T, H, D, dtype=dtype, **meta).transpose(1, 2)  # (B, H, T, D) as ASAMAttention's projections
    k = torch.empty(B, Tk, H, D, dtype=dtype, **meta).transpose(1, 2)
    v = torch.empty(B, Tk, H, D, dtype=dtype, **meta).transpose(1, 2)
    key_idx = torch.empty(B, H, T, kk, dtype=torch.int64, **meta)
    p = torch.empty(B, H, T, kk, dtype=torch.float32, **meta)
    if direction == "fwd":
        sel_mask = torch.empty(B, H, T, kk, dtype=torch.bool, **meta)
        bias = torch.empty(B, H, T, kk, dtype=torch.float32, **meta) if has_bias else None
        out = torch.empty(B, H, T, D, dtype=dtype, **meta)
        launches = A._fwd_launches(q, k, v, key_idx, sel_mask, bias, out, p, activation)
    else:
        dout = torch.empty(B, H, T, D, dtype=dtype, **meta)
        dp = torch.empty(B, H, T, kk, dtype=torch.float32, **meta) if has_dp else None
        dq = torch.empty(B, H, T, D, dtype=dtype, **meta)
        dk = torch.empty(B, H, Tk, D, dtype=torch.float32, **meta)
        dv = torch.empty(B, H, Tk, D, dtype=torch.float32, **meta)
        ds = torch.empty(B, H, T, kk, dtype=torch.float32, **meta) if has_bias else None
        launches = A._bwd_launches(q, k, v, key_idx, p, dout, dp, dq, dk, dv, ds, activation)
    return [(fn, args, kw) for fn, _grid, args, kw in launches]


def liger_launches(shape: dict, dtype) -> list:
    return _liger_launches(shape["d_model"], shape["vocab"], dtype)


@functools.lru_cache(maxsize=None)
def _liger_launches(d_model: int, vocab: int, dtype) -> list:
    """[(kernel, args, kwargs)] of the Triton launches of ressformer.kernels.fused_loss.linear_cross_entropy
    (forward, then backward with an upstream gradient of 0.5), recorded instead of run."""
    triton, _ = triton_modules()
    from triton.runtime.jit import JITFunction

    from ressformer.kernels import fused_loss

    if fused_loss.liger_cross_entropy_kernel is None:
        raise RuntimeError("liger_kernel does not import: pip install -e '.[gpu]'")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))  # the NVIDIA backend's specialization: the same for every cc
    recorded = {}  # launches that specialise alike (chunks of the same size) compile to one kernel: kept once

    def record(self, *args, grid, warmup, **kwargs):
        _, specialization, options = create_function_from_signature(self.signature, self.params, backend)(*args,
                                                                                                            **kwargs)
        recorded.setdefault((self.cache_key, str(specialization), str(sorted(options.items()))), (self, args, kwargs))

    g = torch.Generator().manual_seed(0)
    h = (0.02 * torch.randn(1, LIGER_TOKENS, d_model, generator=g)).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(vocab, d_model, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, LIGER_TOKENS), generator=g)
    run = JITFunction.run
    JITFunction.run = record
    try:
        loss = fused_loss.linear_cross_entropy(h, w, labels)
        (0.5 * loss).backward()
    finally:
        JITFunction.run = run
    return list(recorded.values())


# ------------------------------------------------------------------------------------------------------------- jobs
def jobs_for(presets, kernels, activations, variants, dtype_name) -> list[dict]:
    """One dict per compilation: what to build (kernel family, preset, direction, flags, launch index)."""
    dtype = DTYPES[dtype_name]
    jobs = []
    for name in presets:
        shape = preset_shapes(name)
        if "asam" in kernels:
            for act in activations:
                fwd = [False, True] if variants == "all" else sorted({b for b, _ in shape["calls"]})
                bwd = (list(itertools.product([False, True], repeat=2)) if variants == "all"
                       else sorted(set(shape["calls"])))
                for direction, flags in [("fwd", (b, False)) for b in fwd] + [("bwd", f) for f in bwd]:
                    n = len(asam_launches(shape, act, direction, *flags, dtype))
                    for i in range(n):
                        jobs.append(dict(family="asam", preset=name, activation=act, direction=direction,
                                         has_bias=flags[0], has_dp=flags[1], index=i, dtype=dtype_name))
        if "liger" in kernels and not SHAPE_RX.match(name):
            for i in range(len(liger_launches(shape, dtype))):
                jobs.append(dict(family="liger", preset=name, index=i, dtype=dtype_name))
    return jobs


def launch_of(job: dict):
    shape = preset_shapes(job["preset"])
    dtype = DTYPES[job["dtype"]]
    if job["family"] == "asam":
        launches = asam_launches(shape, job["activation"], job["direction"], job["has_bias"], job["has_dp"], dtype)
    else:
        launches = liger_launches(shape, dtype)
    return shape, launches[job["index"]]


def describe(job: dict, shape: dict, fn, args, kwargs: dict) -> tuple[str, str, str]:
    """(shape, variant, tiles) columns."""
    consts = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("BLOCK")}
    tiles = " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK"))
    tiles += f" w={kwargs.get('num_warps', 4)} st={kwargs.get('num_stages', 3)}"
    if kwargs.get("maxnreg") is not None:
        tiles += f" maxnreg={kwargs['maxnreg']}"
    if job["family"] == "asam":
        flags = [f for f, on in (("bias", job["has_bias"]),) if on] if job["direction"] == "fwd" else \
            [f for f, on in (("dp", job["has_dp"]), ("ds", job["has_bias"])) if on]
        variant = job["activation"] + ("+" + "+".join(flags) if flags else "")
        return f"kk={shape['kk']} D={shape['D']}", variant, tiles
    flags = [k for k, v in consts.items() if not k.startswith("BLOCK") and v is True]  # the constexprs switched on
    x = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))  # liger passes keywords
    variant = "+".join([f"x={str(x.dtype).removeprefix('torch.')}"] + flags)
    return f"V={shape['vocab']} H={shape['d_model']}", variant, tiles


def compile_launch(fn, args, kwargs, cc: int):
    """triton.compile of one launch for sm_<cc>, with the JIT launcher's binder. Returns (CompiledKernel, seconds,
    key) where key identifies the compilation's inputs."""
    triton, _ = triton_modules()
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    # as JITFunction.run fills them in before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    key = (fn.cache_key, cc, src.hash(), str(sorted(options.__dict__.items())))
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    return compiled, time.perf_counter() - t0, key


USAGE_RX = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """{"regs", "stack", "shared_static", "local"} of the cubin's kernel, from cuobjdump --dump-resource-usage."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", str(path)], capture_output=True,
                             text=True, timeout=120)
    found = USAGE_RX.findall(res.stdout)
    if res.returncode != 0 or len(found) != 1:
        raise RuntimeError(f"cuobjdump --dump-resource-usage gave no single kernel's usage (exit {res.returncode}): "
                           f"{res.stdout[-500:]} {res.stderr[-500:]}")
    _, regs, stack, shared, local = found[0]
    return dict(regs=int(regs), stack=int(stack), shared_static=int(shared), local=int(local))


def run_job(job: dict, arch: str) -> dict:
    """Compile one job for one architecture -> a table row (dict); failures are rows with an "error"."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    row = dict(job, arch=arch)
    try:
        shape, (fn, args, kwargs) = launch_of(job)
        row.update(kernel=fn.__name__)
        row["shape"], row["variant"], row["tiles"] = describe(job, shape, fn, args, kwargs)
        compiled, seconds, key = compile_launch(fn, args, kwargs, ARCHS[arch])
        usage = resource_usage(compiled.asm["cubin"])
        dyn = compiled.metadata.shared
        row.update(usage, shared=dyn + usage["shared_static"], shared_dynamic=dyn, compile_s=round(seconds, 2),
                   key=repr(key))
    except Exception as e:  # a kernel that fails to compile is a finding, reported in its row
        row.update(error=f"{type(e).__name__}: {e}".strip()[:2000], trace=traceback.format_exc()[-4000:])
    return row


def verdict(row: dict) -> str:
    if "error" in row:
        return "FAILED"
    limit = SHARED_LIMIT_KIB[ARCHS[row["arch"]]] * 1024
    bad = [what for what, over in (("stack", row["stack"] > 0), ("local", row["local"] > 0),
                                   (f"shared>{limit // 1024}KiB", row["shared"] > limit)) if over]
    return "SPILLS " + ",".join(bad) if bad else "ok"


def _init_worker(cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")


def _run_job_star(a):
    return run_job(*a)


def compile_all(jobs: list[dict], archs: list[str], n_jobs: int = 1) -> list[dict]:
    """Rows of every job x arch, in job order; compilations with equal inputs are done once (`same_as`)."""
    work = [(job, arch) for job in jobs for arch in archs]
    with tempfile.TemporaryDirectory(prefix="kernel_resources_cache_") as cache:
        if n_jobs <= 1:
            _init_worker(cache)
            rows = [run_job(*w) for w in work]
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(cache,)) as ex:
                rows = list(ex.map(_run_job_star, work))
        shutil.rmtree(cache, ignore_errors=True)
    first = {}
    for row in rows:
        if "key" in row:
            if row["key"] in first:
                row["same_as"] = first[row["key"]]["preset"]
            else:
                first[row["key"]] = row
    return rows


# ------------------------------------------------------------------------------------------------------------ table
COLUMNS = ("kernel", "arch", "preset", "shape", "variant", "tiles", "regs", "stack", "local", "shared", "compile_s",
           "status")


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        st = verdict(r)
        if "error" in r:
            cells = [r.get("kernel", "?"), r["arch"], r["preset"], r.get("shape", "?"), r.get("variant", "?"),
                     r.get("tiles", "?"), "-", "-", "-", "-", "-", st + ": " + r["error"].splitlines()[0][:200]]
        else:
            comp = f"{r['compile_s']:.1f}" if "same_as" not in r else f"same as {r['same_as']}"
            cells = [r["kernel"], r["arch"], r["preset"], r["shape"], r["variant"], r["tiles"], r["regs"],
                     r["stack"], r["local"], r["shared"], comp, st]
        lines.append([str(c) for c in cells])
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def header(archs, dtype: str) -> str:
    import triton

    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:  # noqa: BLE001 (reported as absent)
        liger = "absent"
    return (f"# Triton {triton.__version__} ({Path(triton.__file__).parent}), torch {torch.__version__}, "
            f"liger-kernel {liger}; targets {' '.join(archs)} (GPUTarget cuda, warp 32), compiled on CPU; "
            f"inputs {dtype}; regs / stack / local per thread (bytes), shared per block (bytes, dynamic + static)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=sorted(ARCHS))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--shapes", nargs="+", default=[], metavar="KxD",
                    help="ASAM shapes besides the presets', e.g. 1024x128: kk = 1024 selected keys, head dim 128")
    ap.add_argument("--kernels", nargs="+", default=["asam", "liger"], choices=["asam", "liger"])
    ap.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS)
    ap.add_argument("--variants", default="all", choices=["all", "preset"],
                    help="all: every HAS_BIAS / HAS_DP / HAS_DS combination; preset: those the preset's steps call")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="q / k / v and hidden-state dtype")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compilations")
    ap.add_argument("--json", default=None, help="write the rows (and the header) to this file")
    args = ap.parse_args(argv)
    try:
        triton_modules()
        cuobjdump_path()
        from ressformer.config import PRESETS as KNOWN
    except (RuntimeError, ImportError) as e:
        print(f"kernel_resources: {e}", file=sys.stderr)
        return 2
    unknown = [p for p in args.presets if p not in KNOWN]
    if unknown:
        print(f"kernel_resources: unknown preset(s) {unknown}: choose from {sorted(KNOWN)}", file=sys.stderr)
        return 2
    shapes = [re.fullmatch(r"(\d+)x(\d+)", x) for x in args.shapes]
    if not all(shapes) or any(not 1 <= int(m[1]) <= 1024 or int(m[2]) < 1 for m in shapes):
        print(f"kernel_resources: --shapes {args.shapes}: write each as KKxD with 1 <= KK <= 1024 (the kernel's "
              "MAX_SLOTS) and D >= 1, e.g. 512x128", file=sys.stderr)
        return 2
    args.presets += [f"kk{m[1]}xD{m[2]}" for m in shapes]
    t0 = time.perf_counter()
    jobs = jobs_for(args.presets, args.kernels, args.activations, args.variants, args.dtype)
    rows = compile_all(jobs, args.arch, args.jobs)
    head = header(args.arch, args.dtype)
    print(head)
    print(table(rows))
    verdicts = [verdict(r) for r in rows]
    failed, spilled = sum(v == "FAILED" for v in verdicts), sum(v.startswith("SPILLS") for v in verdicts)
    print(f"# {len(rows)} compilations in {time.perf_counter() - t0:.0f} s ({args.jobs} jobs): {failed} failed, "
          f"{spilled} spill or exceed the shared memory limit")
    for r in rows:
        if "error" in r:
            print(f"\n## {r.get('kernel', r['family'])} {r['arch']} {r['preset']} failed:\n{r['trace']}",
                  file=sys.stderr)
    if args.json:
        for r in rows:
            r["status"] = verdict(r)
        Path(args.json).write_text(json.dumps(dict(header=head, rows=rows), indent=1, default=str))
    return 2 if failed else 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
