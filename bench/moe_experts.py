"""Forward+backward time of the routed MoE layer: one matmul per expert (the loop) vs torch._grouped_mm.

    python bench/moe_experts.py [--presets debug 125m] [--tokens 2048] [--device cpu|cuda] [--dtype float32|bfloat16]

Each row is one preset's MoE block (its width, experts and top-k; router, experts, combine) on `--tokens` random
tokens, timed with both implementations of `ressformer.kernels.moe_experts` in this run: loop ms, grouped_mm ms,
speedup loop / grouped_mm, and the largest output difference between the two (a check that both computed the same
thing). The minimum over repeats is reported. On CPU (torch 2.13) the two agree bit for bit and differ little in
time; the GPU rows are the ones that decide `moe_experts: auto`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ressformer import ModelConfig, kernels  # noqa: E402
from ressformer.moe import MoEBlock  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_block(block: MoEBlock, x: torch.Tensor, g: torch.Tensor, mode: str,
               repeats: int) -> tuple[float, torch.Tensor]:
    """(min fwd+bwd seconds over `repeats` after one warm-up, the output) of `block` on x with experts mode `mode`."""
    before = kernels.moe_experts
    kernels.set_moe_experts(mode)
    try:
        times, y = [], None
        for i in range(repeats + 1):
            block.zero_grad(set_to_none=True)
            _sync(x.device.type)
            t0 = time.perf_counter()
            y, _ = block(x)
            y.backward(g)
            _sync(x.device.type)
            if i:
                times.append(time.perf_counter() - t0)
        return min(times), y.detach()
    finally:
        kernels.set_moe_experts(before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["debug", "125m"])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per call (batch x sequence)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if not hasattr(torch, "_grouped_mm"):
        print(f"torch {torch.__version__} has no torch._grouped_mm: nothing to compare")
        return 1
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, {args.dtype}, "
          f"{args.tokens} tokens, min of {args.repeats}")
    print(f"{'preset':<10} {'E':>3} {'k':>2} {'D':>5} {'F':>5} {'loop ms':>9} {'grouped ms':>11} {'speedup':>8} "
          f"{'max|diff|':>10}")
    rows = []
    for name in args.presets:
        cfg = ModelConfig.from_preset(name)
        if not cfg.moe.enabled:
            print(f"{name:<10} dense FFN (moe.num_experts=1): skipped")
            continue
        torch.manual_seed(0)
        block = MoEBlock(cfg).to(args.device, dtype)
        x = torch.randn(1, args.tokens, cfg.d_model, device=args.device, dtype=dtype)
        g = torch.randn_like(x)
        loop_s, y_loop = time_block(block, x, g, "loop", args.repeats)
        grouped_s, y_grouped = time_block(block, x, g, "grouped_mm", args.repeats)
        row = {"preset": name, "experts": cfg.moe.num_experts, "top_k": cfg.moe.experts_per_token,
               "d_model": cfg.d_model, "ffn_hidden": cfg.ffn_hidden, "tokens": args.tokens, "device": args.device,
               "dtype": args.dtype, "loop_ms": loop_s * 1e3, "grouped_mm_ms": grouped_s * 1e3,
               "speedup": loop_s / grouped_s, "max_abs_diff": (y_loop - y_grouped).abs().max().item()}
        rows.append(row)
        print(f"{name:<10} {row['experts']:>3} {row['top_k']:>2} {row['d_model']:>5} {row['ffn_hidden']:>5} "
              f"{row['loop_ms']:>9.2f} {row['grouped_mm_ms']:>11.2f} {row['speedup']:>7.2f}x "
              f"{row['max_abs_diff']:>10.2e}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
