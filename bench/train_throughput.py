"""Training throughput of a plain loop: tokens/s, achieved TFLOP/s and MFU, ReSSFormer vs its dense baseline.

    python bench/train_throughput.py [--presets 125m dense:125m 1b dense:1b 1b-transformer] [--seq-len T]
                                     [--batch B] [--steps 10] [--warmup 3] [--device cuda|cpu] [--json OUT]

Each preset trains on one device with no DeepSpeed: random tokens (B, T), forward with labels (LM loss + the
model's auxiliary losses), backward, torch AdamW step (fused on CUDA), under bf16 autocast on CUDA (fp32 weights
and optimizer state) and in fp32 on CPU. --warmup untimed steps, then --steps timed ones (fewer when
--max-seconds runs out first; the row says how many). tokens/s is over all timed steps (what MFU uses); `best step`
is the fastest single step, robust to other jobs on shared cores (each step ends with a device sync).

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
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pretrain.engine import checkpoint_fn  # noqa: E402
from pretrain.metrics import PEAK_TFLOPS, peak_tflops  # noqa: E402
from ressformer import ModelConfig, build_model  # noqa: E402
from ressformer.config import PRESETS  # noqa: E402
from ressformer.flops import count_params, flops_per_token, matched_dense  # noqa: E402

DENSE_PREFIX = "dense:"


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


def train_rate(cfg: ModelConfig, T: int, batch: int, steps: int, warmup: int, device: torch.device,
               autocast: bool, checkpoint: bool, max_seconds: float | None, seed: int = 0) -> dict:
    """Run warmup + steps AdamW steps; returns {"steps", "seconds", "tokens_per_s" (over all timed steps),
    "tokens_per_s_best_step" (of the fastest step: robust to other jobs on shared cores), "loss", "peak_mib"}."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()  # what an earlier preset (or a failed attempt) left behind
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(cfg)
    model.train()
    if checkpoint:
        model.set_checkpointing(checkpoint_fn, every=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    g = torch.Generator(device=device).manual_seed(seed)

    def step() -> torch.Tensor:
        x = torch.randint(0, cfg.vocab_size, (batch, T), device=device, generator=g)
        with ctx():
            out = model(x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    for _ in range(warmup):
        step()
    sync()
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
    return {"steps": done, "seconds": seconds, "tokens_per_s": done * batch * T / seconds,
            "tokens_per_s_best_step": batch * T / min(times), "loss": float(loss), "peak_mib": _peak_mib(device)}


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
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a preset's timed steps after this long")
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

    probe = torch.empty(0, device=device, dtype=torch.bfloat16 if autocast else torch.float32)

    def kernel_runs(use) -> bool | str:
        try:
            return use(probe)
        except Exception as e:  # noqa: BLE001 (a kernel module that fails to import: recorded, the rows say more)
            return f"{type(e).__name__}: {e}"

    dev_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    header = {"device": dev_name, "torch": torch.__version__, "peak_tflops": peak, "peak_table": PEAK_TFLOPS,
              "autocast": "bf16" if autocast else "none", "batch": batch, "steps": steps, "warmup": a.warmup,
              "checkpoint": a.checkpoint, "causal_skip": cuda,
              "kernels": {"asam_triton": kernel_runs(kernels.use_asam_kernel),  # whether they run for this dtype
                          "lm_loss_liger": kernel_runs(kernels.use_lm_loss_kernel)}}
    print(f"torch {header['torch']}, {dev_name}, peak {peak if peak else 'unknown'} TFLOP/s, "
          f"{'bf16 autocast' if autocast else 'fp32'}, batch {batch}, {steps} timed steps after {a.warmup}, "
          f"kernels {header['kernels']}")
    print(f"{'preset':18} {'arch':11} {'params':>13} {'active':>13} {'T':>6} {'GFLOP/tok':>10} {'tokens/s':>11} "
          f"{'best step':>11} {'TFLOP/s':>9} {'MFU':>6} {'peak MiB':>10}  note", flush=True)
    result = {"config": header, "rows": []}
    for name, cfg, T in resolved:
        p = count_params(cfg)
        fpt = flops_per_token(cfg, T, cfg.r2mu.steps, causal_skip=cuda)
        row = {"preset": name, "arch": cfg.arch, "params": p["total"], "active_params": p["active"], "seq_len": T,
               "n_layers": cfg.n_layers if cfg.arch == "transformer" else None,
               "k_steps": cfg.r2mu.steps if cfg.arch == "ressformer" else None, "flops_per_token": fpt}
        modes = {"on": [True], "off": [False], "auto": [False, True]}[a.checkpoint]
        for ckpt in modes:
            try:
                r = train_rate(cfg, T, batch, steps, a.warmup, device, autocast, ckpt, a.max_seconds)
                row.update(status="ok", checkpoint=ckpt, **r)
                break
            except Exception as e:  # noqa: BLE001 (a preset that fails is reported, the others still run)
                oom = _is_oom(e)
                row.update(status="oom" if oom else "error", checkpoint=ckpt,
                           reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                if not oom:
                    break
        if row["status"] == "ok":
            row["tflops"] = fpt * row["tokens_per_s"] / 1e12
            row["mfu"] = row["tflops"] / peak if peak else None
            note = f"{row['steps']} steps, loss {row['loss']:.3f}"
            note += ", act. checkpointing" if row["checkpoint"] else ""
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            print(f"{name:18} {cfg.arch:11} {p['total']:>13,} {p['active']:>13,} {T:>6} {fpt / 1e9:>10.4f} "
                  f"{row['tokens_per_s']:>11,.0f} {row['tokens_per_s_best_step']:>11,.0f} {row['tflops']:>9.4f} "
                  f"{mfu:>6} {row['peak_mib']:>10.0f}  {note}", flush=True)
        else:
            print(f"{name:18} {cfg.arch:11} {p['total']:>13,} {p['active']:>13,} {T:>6} {fpt / 1e9:>10.4f} "
                  f"{row['status']:>11}  {row['reason']}", flush=True)
        result["rows"].append(row)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
