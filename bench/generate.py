"""Generation on CPU with and without the inference cache (ressformer/cache.py): tokens/s and peak memory.

    python bench/generate.py [--prompt-lengths 128 512 1024 2048 4096] [--new-tokens 16] [--set asam.impl=block]

For each prompt length, greedy generation of --new-tokens tokens from a random prompt with the debug preset
(max_seq_len = prompt + new tokens, batch 1), twice, each in a fresh subprocess: `uncached` runs the full
forward over the whole sequence for every new token; `cached` runs the prompt once into a ModelCache and then
one token per forward. tokens/s counts new tokens over the whole generation (the prompt pass included);
`ms/token` is the time per new token after the first (cached: one incremental forward). Peak memory is the
child's peak resident memory (ru_maxrss: model, allocator and Python included) and its rise during generation;
`cache MiB` is what the cache holds at the end (buffers grow by doubling). The ratio column is cached / uncached
tokens/s of the same length in this run; both modes must generate the same tokens (checked).
Children run with MALLOC_MMAP_THRESHOLD_=1048576 so freed temporaries leave the RSS (see bench/long_context.py).
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
sys.path.insert(0, sys.argv[1])
from ressformer import ModelConfig, build_model
from ressformer.cache import ModelCache
L, n_new, mode, over = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
torch.manual_seed(0)
cfg = ModelConfig.from_preset("debug", max_seq_len=L + n_new, **over)
model = build_model(cfg).eval()
x = torch.randint(0, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss()
times, cache = [], ModelCache() if mode == "cached" else None
with torch.no_grad():
    ids, new = x, x
    for _ in range(n_new):
        t0 = time.perf_counter()
        logits = model(new if cache is not None else ids, cache=cache).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
        ids = torch.cat([ids, nxt], 1)
        new = nxt
print(json.dumps({"seconds": sum(times), "first": times[0], "rest": times[1:], "peak_mib": rss(),
                  "rise_mib": rss() - before, "cache_mib": cache.nbytes() / 2**20 if cache is not None else 0.0,
                  "tokens": ids[0, L:].tolist()}))
"""


def run(L: int, n_new: int, mode: str, over: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(L), str(n_new), mode, json.dumps(over)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override on the debug preset, e.g. --set asam.impl=block (repeatable)")
    a = ap.parse_args()
    if a.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (ms/token is measured after the first)")
    import torch

    from ressformer.config import parse_sets

    try:
        over = parse_sets(a.set)
    except ValueError as e:
        ap.error(str(e))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, debug preset{' ' + str(over) if over else ''}"
          f", batch 1, greedy, {a.new_tokens} new tokens")
    print(f"{'prompt':>6} {'mode':9} {'tok/s':>8} {'first s':>8} {'ms/token':>9} {'peak MiB':>9} {'rise MiB':>9} "
          f"{'cache MiB':>9} {'cached/uncached tok/s':>22}")
    for L in a.prompt_lengths:
        res = {}
        for mode in ("uncached", "cached"):
            r = res[mode] = run(L, a.new_tokens, mode, over)
            if "error" in r:
                print(f"{L:>6} {mode:9} error: {r['error']}")
                continue
            tps = a.new_tokens / r["seconds"]
            per = 1000 * sum(r["rest"]) / len(r["rest"])
            ratio = ""
            if mode == "cached" and "error" not in res["uncached"]:
                ratio = f"{res['uncached']['seconds'] / r['seconds']:.2f}x"  # same new tokens: time ratio
                if r["tokens"] != res["uncached"]["tokens"]:
                    ratio += " (TOKENS DIFFER)"
            print(f"{L:>6} {mode:9} {tps:>8.2f} {r['first']:>8.3f} {per:>9.1f} {r['peak_mib']:>9.0f} "
                  f"{r['rise_mib']:>9.0f} {r['cache_mib']:>9.2f} {ratio:>22}", flush=True)


if __name__ == "__main__":
    main()
