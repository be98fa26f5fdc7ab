"""Forward+backward time of one training micro-batch: ReSSFormer and its ablations vs the dense baseline.

    python bench/step_time.py [--preset debug] [--batch 8] [--seq 128] [--repeats 5] [--compile]

Every row is timed in this run and printed as a ratio to the `baseline` row (the dense Transformer of the
same width, `<preset>-transformer` or arch=transformer with n_layers = n_prelude + steps + n_coda), so
the numbers compare across machines. The minimum over repeats is reported (robust to shared cores).
--compile also times each row with its units compiled (`model.compile_units()`, inductor; the run config's
`compile: true`) on the same input after two warm-up steps, and prints compiled ms, compiled x baseline (compiled),
the speedup eager / compiled and the first step's time (compilation; Dynamo is reset before each row, inductor
caches in a fresh temporary folder unless TORCHINDUCTOR_CACHE_DIR is set, shared by the rows of the run).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ressformer import ModelConfig, build_model  # noqa: E402
from ressformer.flops import count_params, flops_per_token  # noqa: E402

ABLATIONS = {
    "ressformer": {},
    "asam.topk=0 (all keys)": {"asam.topk": 0},
    "asam.activation=softmax": {"asam.activation": "softmax"},
    "moe.num_experts=1 (dense FFN)": {"moe.num_experts": 1},
    "soes.enabled=false": {"soes.enabled": False},
    "r2mu.memory=false": {"r2mu.memory": False},
}


def step_seconds(cfg: ModelConfig, batch: int, seq: int, repeats: int, compiled: bool = False) -> tuple[float, float]:
    """(min fwd+bwd seconds over `repeats`, seconds of the first step: the warm-up, which compiles)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if compiled:
        torch._dynamo.reset()  # each row compiles afresh: rows of other configs must not use up the recompile limit
        model.compile_units()
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    t0 = time.perf_counter()
    model(x, labels=x).loss.backward()  # warm-up
    first = time.perf_counter() - t0
    if compiled:
        model(x, labels=x).loss.backward()  # the variants a first backward may still compile
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x, labels=x).loss.backward()
        times.append(time.perf_counter() - t0)
    return min(times), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time every row with compile_units() (inductor)")
    a = ap.parse_args()
    if a.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold compile times, no cache left behind
        cache = tempfile.TemporaryDirectory(prefix="step_time_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    base = ModelConfig.from_preset(a.preset)
    r = base.r2mu
    dense = ModelConfig(arch="transformer", vocab_size=base.vocab_size, d_model=base.d_model, n_heads=base.n_heads,
                        ffn_hidden=base.ffn_hidden, n_layers=r.n_prelude + r.steps + r.n_coda,
                        max_seq_len=base.max_seq_len, moe={"num_experts": 1})
    rows = [("baseline (dense transformer)", dense)] + [(n, base.replace(**o)) for n, o in ABLATIONS.items()]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {a.preset}, "
          f"B={a.batch} T={a.seq}, fwd+bwd, min of {a.repeats}")
    head = f"{'model':32} {'params':>10} {'GFLOP/step':>11} {'ms':>9} {'x baseline':>11}"
    if a.compile:
        head += f" {'compiled ms':>12} {'x baseline':>11} {'speedup':>8} {'compile s':>10}"
    print(head)
    t_base = c_base = None
    for name, cfg in rows:
        t, _ = step_seconds(cfg, a.batch, a.seq, a.repeats)
        t_base = t_base or t
        gflop = flops_per_token(cfg, a.seq) * a.batch * a.seq / 1e9
        line = f"{name:32} {count_params(cfg)['total']:>10,} {gflop:>11.3f} {t * 1e3:>9.1f} {t / t_base:>11.2f}"
        if a.compile:
            c, first = step_seconds(cfg, a.batch, a.seq, a.repeats, compiled=True)
            c_base = c_base or c
            line += f" {c * 1e3:>12.1f} {c / c_base:>11.2f} {t / c:>8.2f} {first:>10.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
