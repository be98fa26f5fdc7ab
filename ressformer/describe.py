"""Print a resolved model preset with its parameter and FLOP counts.

    python -m ressformer.describe 1b [--set asam.topk=64] [--seq-len 32768]

The config as YAML, then `#` lines: total and active-per-token parameters (ressformer.flops.count_params),
training FLOPs per token, and for a ReSSFormer the depth of the dense Transformer of the same width with the
same FLOPs per token (ressformer.flops.matched_dense).
"""

from __future__ import annotations

import argparse
import sys

from ressformer.config import PRESETS, ModelConfig, parse_sets
from ressformer.flops import count_params, flops_per_token, matched_dense


def describe(cfg: ModelConfig, seq_len: int | None = None) -> str:
    seq = seq_len or cfg.max_seq_len
    p = count_params(cfg)
    fl, fl_torch = flops_per_token(cfg, seq, attend="gather"), flops_per_token(cfg, seq)
    lines = [cfg.to_yaml().rstrip("\n"),
             f"# params total:  {p['total']:,} ({p['total'] / 1e9:.3f} B)",
             f"# params active: {p['active']:,} ({p['active'] / 1e9:.3f} B) per token",
             f"# FLOPs/token (fwd+bwd) at T={seq}: {fl:.4g}"]
    if fl_torch != fl:
        lines.append(f"#   {fl_torch:.4g} on ASAM's PyTorch path (CPU): top-k chunks as dense matmuls over their "
                     f"candidates (attention.dense_topk_pays)")
    if cfg.arch == "ressformer":
        dense = matched_dense(cfg, seq)
        lines.append(f"# matched compute: a dense {dense.n_layers}-layer Transformer of this width "
                     f"({count_params(dense)['total']:,} params) has the same "
                     f"FLOPs/token (its causal attention counted at (T+1)/2 keys per query)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ressformer.describe", description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field, e.g. --set asam.topk=64 (repeatable)")
    ap.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: max_seq_len)")
    args = ap.parse_args(argv)
    try:
        cfg = ModelConfig.from_preset(args.preset, **parse_sets(args.set))
    except ValueError as e:
        ap.error(str(e))
    sys.stdout.write(describe(cfg, args.seq_len))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
