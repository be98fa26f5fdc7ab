"""Preprocessing throughput and memory: `tokenizer.preprocess` with num_proc 1 and 2, in memory and streamed.

`python bench/preprocess.py [--tokenizer DIR] [--input FILE] [--num-proc 1 2] [--repeat 2]`
`python bench/preprocess.py --streaming-gb 0.25 0.5 1 [--num-proc 1 2] [--proc1-max-gb 0.25] [--default-gb 0.25]
[--trace]`

Design choices
- Default mode: tokens/s of `preprocess` on the default corpus (tinyshakespeare), in process. Measures what
  `preprocess` reports: tokenizing (`datasets.map`, never from its cache) plus writing the megatron `.bin/.idx`,
  not reading the corpus or importing megatron. Best of `--repeat` runs per setting.
- `--streaming-gb`: a corpus of tinyshakespeare paragraphs (documents of 1-40 of them, drawn with a fixed seed)
  is generated into a temporary folder as parquet shards of `--shard-mb` MB of text; the sizes are prefixes of
  the same shard list, so a larger corpus is a smaller one plus more shards. Each run is
  `python -m tokenizer.preprocess --streaming` in a subprocess; its peak memory is reported three ways: the
  kernel's ru_maxrss (wait4: the largest single process, itself or a worker), the sampled peak RSS of the main
  process, and the sampled peak of the PSS summed over the process and its workers (psutil, every 50 ms; PSS
  counts a page shared by n processes 1/n times, so forked workers are not counted twice). tokens/s is the
  one `preprocess` reports (streaming: reading + tokenizing + writing). `--default-gb` adds a run without
  `--streaming` at that size, its datasets cache (the Arrow copies it writes: `cache MiB`) in the temporary
  folder. num_proc 1 runs only up to `--proc1-max-gb` to bound the time. `--trace` prints the memory peak in
  each tenth of every run: growth with the documents written shows there, a single late spike does not look
  like it. A first run that only imports what preprocess imports gives the fixed part of the memory.
  Everything generated is deleted at the end.
- Prints tables and ratios, never asserts: on a shared 2-core machine the worker start-up and the other jobs
  move the numbers.
- Without `--tokenizer` a 512-piece tokenizer is trained on tinyshakespeare first (about 2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenizer.preprocess import preprocess  # noqa: E402
from tokenizer.train import train_tokenizer  # noqa: E402

DEFAULT_CORPUS = REPO / "data" / "tinyshakespeare" / "input.txt"
MB = 1 << 20


def throughput(a, tmp: Path) -> dict:
    tok = a.tokenizer or str(train_tokenizer([a.input], tmp / "tok", vocab_size=512).path)
    rows = []
    for n in a.num_proc:
        runs = [preprocess(tok, [a.input], tmp / f"p{n}", num_proc=n, force=True, progress=False)
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
    return {"input": a.input, "results": rows}


def make_corpus(folder: Path, total_bytes: int, shard_bytes: int, seed: int = 0) -> list[tuple[Path, int, int]]:
    """Parquet shards of generated documents until `total_bytes` of text; [(shard, text bytes, documents)]."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = [p for p in DEFAULT_CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards, done = [], 0
    while done < total_bytes:
        path, size, n, writer = folder / f"shard-{len(shards):05d}.parquet", 0, 0, None
        while size < shard_bytes:
            group = ["\n\n".join(paras[i] for i in rng.integers(0, len(paras), int(k)))
                     for k in rng.integers(1, 41, 1000)]  # 1,000 documents per row group
            table = pa.table({"id": pa.array(np.arange(n, n + len(group))), "text": group})
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            size, n = size + sum(len(g.encode()) for g in group), n + len(group)
        writer.close()
        shards.append((path, size, n))
        done += size
    return shards


def run_measured(cmd: list[str], env: dict, trace: bool = False) -> dict:
    """Run `cmd`; its wall time, the kernel's max RSS of it (wait4), its sampled peak RSS and the sampled peak PSS
    summed over it and its children."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"tree": 0, "main": 0}  # PSS summed over the processes (shared pages counted once), RSS of the main one
    samples: list[tuple[float, int, int]] = []  # (seconds, main RSS, summed PSS)
    stop = threading.Event()

    def sample():
        try:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    main = p.memory_full_info()
                    kids = sum(c.memory_full_info().pss for c in p.children(recursive=True))
                except psutil.Error:  # a worker that just ended
                    continue
                peak["main"], peak["tree"] = max(peak["main"], main.rss), max(peak["tree"], main.pss + kids)
                samples.append((time.time() - t0, main.rss, main.pss + kids))
                stop.wait(0.05)
        except psutil.Error:
            pass

    t0 = time.time()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    out = {"wall_s": round(wall, 2), "maxrss_mib": round(usage.ru_maxrss / 1024, 1),
           "peak_main_rss_mib": round(peak["main"] / MB, 1), "peak_all_pss_mib": round(peak["tree"] / MB, 1)}
    if trace:  # the peak in each tenth of the run's wall time
        for name, i in (("trace_main_rss_mib", 1), ("trace_all_pss_mib", 2)):
            out[name] = [round(max((s[i] for s in samples if k * wall / 10 <= s[0] < (k + 1) * wall / 10), default=0)
                               / MB) for k in range(10)]
    return out


def streaming(a, tmp: Path) -> dict:
    tok = a.tokenizer or str(train_tokenizer([DEFAULT_CORPUS], tmp / "tok", vocab_size=512).path)
    sizes = sorted(a.streaming_gb)
    t0 = time.time()
    shards = make_corpus(tmp / "corpus", int(max(sizes) * 1024 * MB), a.shard_mb * MB)
    gen_s = time.time() - t0
    print(f"generated {len(shards)} parquet shards, {sum(s for _, s, _ in shards) / MB:.0f} MiB of text, "
          f"{sum(n for _, _, n in shards)} documents in {gen_s:.0f}s", file=sys.stderr)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf_cache"), "PYTHONPATH": str(REPO)}
    imports = run_measured([sys.executable, "-W", "ignore", "-c", "import datasets, sentencepiece; "
                            "from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder"], env)
    print(f"baseline: a process that only imports datasets, sentencepiece and megatron-core's builder: "
          f"maxrss {imports['maxrss_mib']:.0f} MiB, PSS {imports['peak_all_pss_mib']:.0f} MiB, "
          f"{imports['wall_s']:.1f} s")
    plan = [(gb, n, True) for gb in sizes for n in a.num_proc if n > 1 or gb <= a.proc1_max_gb]
    plan += [(gb, max(a.num_proc), False) for gb in a.default_gb]
    rows = []
    for gb, n, stream in plan:
        use, text = [], 0
        for path, size, _ in shards:  # the shards that make `gb`
            if text >= gb * 1024 * MB - size / 2:
                break
            use.append(path)
            text += size
        out = tmp / "out" / "p"
        cmd = [sys.executable, "-m", "tokenizer.preprocess", "--tokenizer", tok, "--input", *map(str, use),
               "--out", str(out), "--num-proc", str(n), "--force"] + (["--streaming"] if stream else [])
        m = run_measured(cmd, env, a.trace)
        side = json.loads(Path(f"{out}.json").read_text())
        row = {"text_mib": round(text / MB), "shards": len(use), "mode": "streaming" if stream else "default",
               "num_proc": n, "documents": side["documents"], "tokens": side["tokens"], **m,
               "tokens_per_s": side["tokens_per_s"], "text_mib_per_s": round(text / MB / side["seconds"], 2)}
        for p in (tmp / "out").iterdir():
            p.unlink()
        cache = tmp / "hf_cache"
        row["cache_mib"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / MB)  # (none: 0)
        shutil.rmtree(cache, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(f"{'text MiB':>8} {'mode':>9} {'num_proc':>8} {'documents':>9} {'tokens':>11} {'wall s':>7} "
          f"{'tokens/s':>10} {'MiB/s':>6} {'maxrss MiB':>10} {'main RSS MiB':>12} {'all PSS MiB':>11} {'cache MiB':>9}")
    for r in rows:
        print(f"{r['text_mib']:>8} {r['mode']:>9} {r['num_proc']:>8} {r['documents']:>9} {r['tokens']:>11} "
              f"{r['wall_s']:>7.1f} {r['tokens_per_s']:>10.0f} {r['text_mib_per_s']:>6.2f} {r['maxrss_mib']:>10.1f} "
              f"{r['peak_main_rss_mib']:>12.1f} {r['peak_all_pss_mib']:>11.1f} {r['cache_mib']:>9}")
    for r in rows if a.trace else ():
        print(f"{r['text_mib']} MiB {r['mode']} num_proc {r['num_proc']}, peak per tenth of the run: main RSS "
              f"{r['trace_main_rss_mib']} MiB, all PSS {r['trace_all_pss_mib']} MiB")
    return {"generated_s": round(gen_s, 1), "shard_mb": a.shard_mb, "imports_only": imports, "results": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a 512-piece one)")
    ap.add_argument("--input", default=str(DEFAULT_CORPUS), help="corpus of the default (in-process) mode")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting in the default mode (best kept)")
    ap.add_argument("--streaming-gb", type=float, nargs="+", help="generate a parquet corpus and measure "
                                                                   "--streaming memory and tokens/s at these GiB")
    ap.add_argument("--shard-mb", type=int, default=64, help="MiB of text per generated parquet shard")
    ap.add_argument("--proc1-max-gb", type=float, default=float("inf"), help="num_proc 1 only up to this size")
    ap.add_argument("--default-gb", type=float, nargs="*", default=[], help="also run without --streaming here")
    ap.add_argument("--trace", action="store_true", help="also print the memory peak in each tenth of every run")
    ap.add_argument("--tmp", default=None, help="folder for the generated corpus (default: the system temp)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_", dir=a.tmp) as tmp:
        out = streaming(a, Path(tmp)) if a.streaming_gb else throughput(a, Path(tmp))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
