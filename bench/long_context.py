"""Long context on CPU: peak memory and time of one forward+backward of the debug model vs sequence length.

    python bench/long_context.py [--lengths 1024 2048 4096 8192 16384] [--impls reference chunked block block-chunk]

`block-chunk` is impl block with asam.block_select chunk (the chunk's earliest query picks its blocks).

Each (impl, T) runs in a fresh subprocess (batch 1, the debug preset with max_seq_len = T) and reports the
process's peak resident memory (ru_maxrss, so the model, the allocator and Python are included) and its
fwd+bwd time. Ratios are against the row of the same impl at the shortest length of this run: linear
memory gives mem x ~= T ratio, quadratic gives its square. `reference` materialises the (B, H, T, Tk)
scores and is skipped above --reference-max (default 4096) to stay within the machine's memory.

glibc's malloc keeps freed heap memory of the many per-chunk temporaries (its mmap threshold adapts upward
to 32 MiB), so the *process* RSS of the chunked paths grows ~quadratically with T although the live tensors
grow linearly (measured: debug model, chunked, T=8192: 8.3 GiB RSS with the default malloc, 0.9 GiB with
MALLOC_MMAP_THRESHOLD_=1048576). Children therefore run with MALLOC_MMAP_THRESHOLD_=1048576 unless
--system-malloc is given; on CPU, pretraining at long context wants the same (or jemalloc/tcmalloc).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[3])
from ressformer import ModelConfig, build_model
T, impl = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
over = {"asam.impl": "block", "asam.block_select": "chunk"} if impl == "block-chunk" else {"asam.impl": impl}
cfg = ModelConfig.from_preset("debug", max_seq_len=T, **over)
model = build_model(cfg)
x = torch.randint(0, cfg.vocab_size, (1, T))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = model(x, labels=x)
out.loss.backward()
dt = time.perf_counter() - t0
assert torch.isfinite(out.loss)
print(json.dumps({"T": T, "impl": impl, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_mib": before / 1024, "seconds": dt, "loss": out.loss.item()}))
"""


def measure(T: int, impl: str, system_malloc: bool) -> dict:
    env = dict(os.environ) if system_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(T), impl, str(REPO)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"T": T, "impl": impl, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--impls", nargs="+", default=["reference", "chunked", "block", "block-chunk"])
    ap.add_argument("--reference-max", type=int, default=4096)
    ap.add_argument("--chunked-max", type=int, default=8192, help="chunked is exact top-k: O(T^2) time")
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's adaptive mmap threshold")
    a = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, debug preset, batch 1, fwd+bwd, "
          f"{'system malloc' if a.system_malloc else 'MALLOC_MMAP_THRESHOLD_=1048576'}")
    print(f"{'impl':11} {'T':>6} {'peak MiB':>9} {'above start':>11} {'s':>7} {'T x':>5} {'mem x':>6} {'time x':>7}")
    for impl in a.impls:
        first = None
        for T in a.lengths:
            if impl == "reference" and T > a.reference_max:
                print(f"{impl:11} {T:>6}   skipped (quadratic scores; raise --reference-max to try)")
                continue
            if impl == "chunked" and T > a.chunked_max:
                print(f"{impl:11} {T:>6}   skipped (quadratic time; raise --chunked-max to try)")
                continue
            r = measure(T, impl, a.system_malloc)
            if "error" in r:
                print(f"{impl:11} {T:>6}   failed: {r['error']}")
                continue
            used = r["peak_mib"] - r["base_mib"]
            first = first or (T, used, r["seconds"])
            print(f"{impl:11} {T:>6} {r['peak_mib']:>9.0f} {used:>11.0f} {r['seconds']:>7.2f} {T / first[0]:>5.0f} "
                  f"{used / first[1]:>6.1f} {r['seconds'] / first[2]:>7.1f}")


if __name__ == "__main__":
    main()
