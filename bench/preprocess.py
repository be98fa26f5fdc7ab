"""Preprocessing throughput: tokens/s of `tokenizer.preprocess` with num_proc 1 and 2 on the default corpus.

`python bench/preprocess.py [--tokenizer DIR] [--input FILE] [--num-proc 1 2] [--repeat 2]`

Design choices
- Measures what `preprocess` reports: tokenizing (`datasets.map`, never from its cache) plus writing the
  megatron `.bin/.idx`, not reading the corpus or importing megatron. Best of `--repeat` runs per setting.
- Prints a ratio (speed-up of each num_proc over num_proc 1), not an assertion: on a small corpus and a
  shared 2-core machine the worker start-up cost can outweigh the parallel gain.
- Without `--tokenizer` a 512-piece tokenizer is trained on the input first (about 2 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizer.preprocess import preprocess  # noqa: E402
from tokenizer.train import train_tokenizer  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "input.txt"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a 512-piece one on --input)")
    ap.add_argument("--input", default=str(DEFAULT_CORPUS))
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tok = a.tokenizer or str(train_tokenizer([a.input], Path(tmp) / "tok", vocab_size=512).path)
        rows = []
        for n in a.num_proc:
            runs = [preprocess(tok, [a.input], Path(tmp) / f"p{n}", num_proc=n, force=True, progress=False)
                    for _ in range(a.repeat)]
            best = max(runs, key=lambda r: r["tokens_per_s"])
            rows.append({"num_proc": n, "documents": best["documents"], "tokens": best["tokens"],
                         "seconds": best["seconds"], "tokens_per_s": best["tokens_per_s"]})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_first"] = round(r["tokens_per_s"] / base, 3)
    print(f"{'num_proc':>8} {'documents':>10} {'tokens':>10} {'seconds':>8} {'tokens/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['num_proc']:>8} {r['documents']:>10} {r['tokens']:>10} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>12.0f} {r['speedup_vs_first']:>6.2f}")
    out = {"input": a.input, "results": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
