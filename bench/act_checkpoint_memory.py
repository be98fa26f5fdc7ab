"""Print activation bytes kept for backward vs K recurrent steps, checkpointing off / on (debug preset).

    python bench/act_checkpoint_memory.py [--preset debug] [--batch 4] [--seq 128]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from act_memory import saved_bytes  # noqa: E402  (bench/ is on sys.path when run as a script)
from ressformer import ModelConfig, build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(a.preset)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    print(f"{'K':>3} {'off MiB':>10} {'on MiB':>10}")
    for k in (1, 2, 4, 8):
        off, on = (saved_bytes(model, ids, k, c) / 2**20 for c in (False, True))
        print(f"{k:>3} {off:10.2f} {on:10.2f}")


if __name__ == "__main__":
    main()
