"""Training throughput of a plain loop: tokens/s, achieved TFLOP/s and MFU, ReSSFormer vs its dense baseline.

    python bench/train_throughput.py [--presets 125m dense:125m 1b dense:1b 1b-transformer] [--seq-len T]
                                     [--batch B] [--steps 10] [--warmup 3] [--device cuda|cpu] [--json OUT]
                                     [--compile eager default reduce-overhead max-autotune] [--sync-check]
                                     [--autocast bf16|none] [--param-dtype fp32|bf16]

Each preset trains on one device with no DeepSpeed: random tokens (B, T), forward with labels (LM loss + the
model's auxiliary losses), backward, torch AdamW step (fused on CUDA), under bf16 autocast on CUDA (fp32 weights
and optimizer state) and in fp32 on CPU. --param-dtype bf16 --autocast none instead computes as the trainer's
DeepSpeed bf16 mode does (bf16 weights, no autocast; AdamW here steps the bf16 weights, where DeepSpeed keeps
float32 masters), which decides some paths: the routed experts take torch's grouped GEMM for bf16 inputs only, so
under autocast (float32 weights and activations) they run the padded tiles. --warmup untimed steps, then --steps
timed ones (fewer when --max-seconds runs out first; the row says how many). tokens/s is over all timed steps
(what MFU uses); `best step` is the fastest single step, robust to other jobs on shared cores (each step ends with
a device sync).

Presets: any name of ressformer.config.PRESETS, or `dense:NAME`: the dense Transformer of NAME's width whose
training FLOPs per token at the run's T match NAME's (ressformer.flops.matched_dense, the depth `python -m
ressformer.describe NAME` prints; at the presets' own lengths 125m -> 20 layers, 1b -> 25). `1b-transformer` is
the parameter-matched baseline.
T defaults to each preset's max_seq_len (--seq-len sets one T for all).

FLOPs are the ones the implementation computes (ressformer.flops.flops_per_token, K = r2mu.steps): the dense
baseline's causal attention counts (T + 1) / 2 keys per query on CUDA (FlashAttention skips the masked half)
and all T on CPU (SDPA's CPU kernel computes the full product). TFLOP/s = FLOPs/token x tokens/s;
MFU = TFLOP/s / the device's dense bf16 peak (pretrain.metrics.PEAK_TFLOPS: H100 / H200 989, A100 312), "n/a"
where the peak is unknown (CPU, other GPUs). Activation checkpointing (--checkpoint on) recomputes the forward,
which MFU does not count; --checkpoint auto runs without it and retries a preset that runs out of memory with it.
Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS (ru_maxrss, monotonic over the run)
on CPU.

--compile runs each preset once per mode: `eager`, or torch.compile of the model's repeated units
(`model.compile_units`, what the run config's `compile: true` does) with that `compile_mode` (`default`,
`reduce-overhead`: CUDA graphs, `max-autotune`); the warm-up steps compile (at least 2 for a compiled mode: step 0
and steps >= 1 are the step's two graphs; 3 for reduce-overhead, whose CUDA graph trees run a graph once before
recording it). Modes run in turn, each for every preset. A compiled row adds Dynamo's counters of its warm-up
(graphs compiled, graph breaks) and, for reduce-overhead, the graphs inductor ran without a CUDA graph
(`cudagraph skips`; TORCH_LOGS=perf_hints prints why). The rows are also printed as time per step against the same
preset's eager row, and a ReSSFormer preset's against its `dense:NAME` row of the same mode (time and time per
FLOP), all measured in this run.
--sync-check runs one more step after the warm-up with every read of device data on the host recorded: on CUDA
under torch.cuda.set_sync_debug_mode("warn") (each synchronizing CUDA call warns: a wait of the host on the
stream, the calls "error" mode refuses), its warnings collected with where they came from; on CPU its forward and
backward under ressformer.host_reads.HostReads (the operators that would be such a wait on a GPU; the CPU's
experts loop and tie pass read by design, see ressformer.kernels; torch's AdamW reads its step counts on CPU
tensors, fused on CUDA it does not). The row's `host_reads` lists them ({} when none). The command exits with
status 1 when any row has one or failed with an error (not out of memory), so a GPU check fails on any sync.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pretrain.engine import checkpoint_fn  # noqa: E402
from pretrain.metrics import PEAK_TFLOPS, peak_tflops  # noqa: E402
from ressformer import ModelConfig, build_model  # noqa: E402
from ressformer.config import PRESETS  # noqa: E402
from ressformer.flops import count_params, flops_per_token, matched_dense  # noqa: E402
from step_time import dynamo_counts  # noqa: E402  (bench/ is on sys.path when run as a script)

DENSE_PREFIX = "dense:"
COMPILE_MODES = ("eager", "default", "reduce-overhead", "max-autotune")


def resolve(name: str, seq_len: int | None) -> tuple[ModelConfig, int]:
    """Preset name (or dense:NAME) -> (config able to run seq_len tokens, seq_len)."""
    base_name = name[len(DENSE_PREFIX):] if name.startswith(DENSE_PREFIX) else name
    if base_name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {sorted(PRESETS)} or dense:NAME")
    cfg = ModelConfig.from_preset(base_name)
    T = seq_len or cfg.max_seq_len
    if name.startswith(DENSE_PREFIX):
        if cfg.arch != "ressformer":
            raise ValueError(f"{name}: dense: matches a ReSSFormer preset, {base_name} is already a {cfg.arch}")
        cfg = matched_dense(cfg, T)
    if T > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=T)
    return cfg, T


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def host_reads(step, device: torch.device) -> dict:
    """Run step() once with every read of device data on the host recorded (see the module's --sync-check):
    {where or operator: count}, {} when there was none. On CUDA the whole step; on CPU its forward and backward
    (step(watch)), not the optimizer: torch's AdamW on CPU tensors reads each step count on the host (fused on
    CUDA, it reads nothing)."""
    seen = collections.Counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        repo = Path(__file__).resolve().parent.parent
        for w in caught:  # where: the Python line whose operator synchronized (this file's: in backward)
            if "synchroniz" in str(w.message):
                where = Path(w.filename).resolve()
                where = where.relative_to(repo) if where.is_relative_to(repo) else where
                seen[f"{where}:{w.lineno}" + (" (backward)" if w.filename == __file__ else "")] += 1
        torch.cuda.synchronize(device)
    else:
        from ressformer.host_reads import HostReads

        reads = HostReads()
        step(lambda: reads)
        seen.update(reads.seen)
    return dict(seen)


def train_rate(cfg: ModelConfig, T: int, batch: int, steps: int, warmup: int, device: torch.device,
               autocast: bool, checkpoint: bool, max_seconds: float | None, seed: int = 0,
               compile_mode: str = "eager", sync_check: bool = False,
               param_dtype: torch.dtype = torch.float32) -> dict:
    """Run warmup + steps AdamW steps; returns {"steps", "seconds", "tokens_per_s" (over all timed steps),
    "tokens_per_s_best_step" (of the fastest step: robust to other jobs on shared cores), "step_ms_best", "loss",
    "peak_mib"}, with compile_mode other than eager {"warmup_s", "dynamo"} too, with sync_check {"host_reads"}."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()  # what an earlier preset (or a failed attempt) left behind
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(cfg).to(param_dtype)
    model.train()
    if checkpoint:
        model.set_checkpointing(checkpoint_fn, every=1)
    compiled = compile_mode != "eager"
    if compiled:
        torch._dynamo.reset()  # graphs (and CUDA graph trees) of an earlier row go
        before = dynamo_counts()
        model.compile_units(**({} if compile_mode == "default" else {"mode": compile_mode}))
        warmup = max(warmup, 3 if compile_mode == "reduce-overhead" else 2)  # + CUDA graph trees' warm-up, record
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    g = torch.Generator(device=device).manual_seed(seed)

    def step(watch=contextlib.nullcontext) -> torch.Tensor:
        x = torch.randint(0, cfg.vocab_size, (batch, T), device=device, generator=g)
        with watch():
            with ctx():
                out = model(x, labels=x)
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    extra = {}
    if compiled:
        extra["warmup_s"] = time.perf_counter() - t0
        after = dynamo_counts()
        extra["dynamo"] = {k: after[k] - before[k] for k in after}
    if sync_check:
        extra["host_reads"] = host_reads(step, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    done, t0, times = 0, time.perf_counter(), []
    while done < steps:
        t1 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t1)
        done += 1
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    seconds = time.perf_counter() - t0
    out = {"steps": done, "seconds": seconds, "tokens_per_s": done * batch * T / seconds,
           "tokens_per_s_best_step": batch * T / min(times), "step_ms_best": 1e3 * min(times), "loss": float(loss),
           "peak_mib": _peak_mib(device), **extra}
    if compiled:
        del model, opt
        torch._dynamo.reset()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", default=None,
                    help="default: 125m dense:125m 1b dense:1b 1b-transformer on CUDA, debug debug-transformer "
                         "dense:debug on CPU")
    ap.add_argument("--seq-len", type=int, default=None, help="default: each preset's max_seq_len")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 1 on CUDA, 8 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 20 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpoint", choices=["auto", "on", "off"], default="auto",
                    help="activation checkpointing of every recurrent step / layer (auto: only after an OOM)")
    ap.add_argument("--autocast", choices=["bf16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    ap.add_argument("--param-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the weights' dtype (bf16 with --autocast none: as the trainer's DeepSpeed bf16 mode "
                         "computes)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a preset's timed steps after this long")
    ap.add_argument("--compile", nargs="+", default=["eager"], choices=COMPILE_MODES, metavar="MODE",
                    help="run each preset once per mode: eager, or its repeated units compiled with this "
                         f"compile_mode ({', '.join(COMPILE_MODES[1:])}); default eager")
    ap.add_argument("--sync-check", action="store_true",
                    help="one more step after the warm-up with every host read of device data recorded (CUDA: "
                         "torch.cuda.set_sync_debug_mode; CPU: ressformer.host_reads); exit status 1 if any")
    ap.add_argument("--json", default=None, metavar="OUT")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    autocast = (a.autocast or ("bf16" if cuda else "none")) == "bf16"
    if autocast and not cuda:
        ap.error("--autocast bf16 is for CUDA here (CPU runs fp32)")
    presets = a.presets or (["125m", "dense:125m", "1b", "dense:1b", "1b-transformer"] if cuda
                            else ["debug", "debug-transformer", "dense:debug"])
    batch = a.batch or (1 if cuda else 8)
    steps = a.steps or (10 if cuda else 20)
    if steps < 1 or a.warmup < 0 or batch < 1:
        ap.error(f"need --steps >= 1, --warmup >= 0, --batch >= 1; got {steps}, {a.warmup}, {batch}")
    try:
        resolved = [(p, *resolve(p, a.seq_len)) for p in presets]
    except ValueError as e:
        ap.error(str(e))
    peak = peak_tflops() if cuda else None
    from ressformer import kernels

    param_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.param_dtype]
    probe = torch.empty(0, device=device, dtype=torch.bfloat16 if autocast else param_dtype)

    def kernel_runs(use) -> bool | str:
        try:
            return use(probe)
        except Exception as e:  # noqa: BLE001 (a kernel module that fails to import: recorded, the rows say more)
            return f"{type(e).__name__}: {e}"

    dev_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    header = {"device": dev_name, "torch": torch.__version__, "peak_tflops": peak, "peak_table": PEAK_TFLOPS,
              "autocast": "bf16" if autocast else "none", "param_dtype": a.param_dtype, "batch": batch,
              "steps": steps, "warmup": a.warmup,
              "checkpoint": a.checkpoint, "causal_skip": cuda, "compile": a.compile, "sync_check": a.sync_check,
              "kernels": {"asam_triton": kernel_runs(kernels.use_asam_kernel),  # whether they run for this dtype
                          "lm_loss_liger": kernel_runs(kernels.use_lm_loss_kernel)}}
    print(f"torch {header['torch']}, {dev_name}, peak {peak if peak else 'unknown'} TFLOP/s, "
          f"{'bf16 autocast' if autocast else 'no autocast'}, {a.param_dtype} weights, batch {batch}, "
          f"{steps} timed steps after {a.warmup}, "
          f"kernels {header['kernels']}" + (f", compile {' '.join(a.compile)}" if a.compile != ["eager"] else "")
          + (", host reads checked" if a.sync_check else ""))
    print(f"{'preset':18} {'compile':15} {'arch':11} {'params':>13} {'active':>13} {'T':>6} {'GFLOP/tok':>10} "
          f"{'tokens/s':>11} {'best step':>11} {'TFLOP/s':>9} {'MFU':>6} {'peak MiB':>10}  note", flush=True)
    result = {"config": header, "rows": []}
    sized = [(name, cfg, T, count_params(cfg), flops_per_token(cfg, T, cfg.r2mu.steps, causal_skip=cuda))
             for name, cfg, T in resolved]
    checkpointing = {"on": [True], "off": [False], "auto": [False, True]}[a.checkpoint]
    for mode in a.compile:  # each mode for every preset in turn: the ratios between presets come first
        for name, cfg, T, p, fpt in sized:
            row = {"preset": name, "compile": mode, "arch": cfg.arch, "params": p["total"],
                   "active_params": p["active"], "seq_len": T,
                   "n_layers": cfg.n_layers if cfg.arch == "transformer" else None,
                   "k_steps": cfg.r2mu.steps if cfg.arch == "ressformer" else None, "flops_per_token": fpt}
            for ckpt in checkpointing:
                try:
                    r = train_rate(cfg, T, batch, steps, a.warmup, device, autocast, ckpt, a.max_seconds,
                                   compile_mode=mode, sync_check=a.sync_check, param_dtype=param_dtype)
                    row.update(status="ok", checkpoint=ckpt, **r)
                    break
                except Exception as e:  # noqa: BLE001 (a preset that fails is reported, the others still run)
                    oom = _is_oom(e)
                    row.update(status="oom" if oom else "error", checkpoint=ckpt,
                               reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                    if not oom:
                        break
            lead = f"{name:18} {mode:15} {cfg.arch:11} {p['total']:>13,} {p['active']:>13,} {T:>6} {fpt / 1e9:>10.4f}"
            if row["status"] == "ok":
                row["tflops"] = fpt * row["tokens_per_s"] / 1e12
                row["mfu"] = row["tflops"] / peak if peak else None
                note = f"{row['steps']} steps, loss {row['loss']:.3f}"
                note += ", act. checkpointing" if row["checkpoint"] else ""
                if "dynamo" in row:
                    d = row["dynamo"]
                    note += (f", warm-up {row['warmup_s']:.1f} s: {d['graphs']} graphs, {d['graph_breaks']} breaks"
                             + (f", {d['cudagraph_skips']} cudagraph skips" if mode == "reduce-overhead" else ""))
                if "host_reads" in row:
                    reads = row["host_reads"]
                    note += ", host reads: " + (", ".join(f"{k} x{n}" for k, n in reads.items()) if reads else "none")
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                print(f"{lead} {row['tokens_per_s']:>11,.0f} {row['tokens_per_s_best_step']:>11,.0f} "
                      f"{row['tflops']:>9.4f} {mfu:>6} {row['peak_mib']:>10.0f}  {note}", flush=True)
            else:
                print(f"{lead} {row['status']:>11}  {row['reason']}", flush=True)
            result["rows"].append(row)
            if a.json:
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(result, indent=1))
    result["ratios"] = ratios(result["rows"])
    for r in result["ratios"]:
        print(r["text"])
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


def ratios(rows: list[dict]) -> list[dict]:
    """Best-step time ratios measured in this run: each compiled row against its preset's eager row ("x eager"), and
    each ReSSFormer preset against its dense:NAME row of the same compile mode, in time and time per FLOP."""
    ok = {(r["preset"], r["compile"]): r for r in rows if r["status"] == "ok"}
    out = []
    for (name, mode), r in ok.items():
        eager = ok.get((name, "eager"))
        if mode != "eager" and eager:
            x = r["step_ms_best"] / eager["step_ms_best"]
            out.append({"preset": name, "compile": mode, "against": f"{name} eager", "x_time": x,
                        "text": f"{name} {mode}: {r['step_ms_best']:.1f} ms per step, {x:.3f}x eager's "
                                f"{eager['step_ms_best']:.1f} ms"})
        dense = ok.get((DENSE_PREFIX + name, mode))
        if dense:
            x = r["step_ms_best"] / dense["step_ms_best"]
            per_flop = x * dense["flops_per_token"] / r["flops_per_token"]
            out.append({"preset": name, "compile": mode, "against": f"{DENSE_PREFIX}{name} {mode}", "x_time": x,
                        "x_per_flop": per_flop,
                        "text": f"{name} {mode}: {x:.3f}x the time of {DENSE_PREFIX}{name} {mode} "
                                f"({r['step_ms_best']:.1f} vs {dense['step_ms_best']:.1f} ms), {per_flop:.3f}x per "
                                f"FLOP"})
    return out


def exit_status(result: dict) -> int:
    """1 when a row read device data on the host (--sync-check) or failed with an error other than out of memory."""
    return int(any(r.get("host_reads") or r["status"] == "error" for r in result["rows"]))


if __name__ == "__main__":
    sys.exit(exit_status(main()))
