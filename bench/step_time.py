"""Forward+backward time of one training micro-batch: ReSSFormer and its ablations vs the dense baseline.

    python bench/step_time.py [--preset debug] [--batch 8] [--seq 128] [--repeats 5] [--compile]
                              [--rows ressformer ...] [--baseline depth|matched] [--profile N] [--one-at-a-time]
                              [--compiled-only] [--keep-freed-memory] [--cpp-wrapper]
                              [--expert-weight-grad auto|stacked|per_step]

Every row is timed in this run and printed as a ratio to the `baseline` row, so the numbers compare across
machines. The baseline is the dense Transformer of the same width: `--baseline depth` (default) with n_layers =
n_prelude + steps + n_coda, `--baseline matched` with the depth whose training FLOPs per token match the preset's at
--seq (ressformer.flops.matched_dense: `python -m ressformer.describe`, bench/train_throughput.py's dense:NAME).
Every model is built and warmed up first, then the rows are timed round robin, `--repeats` rounds. "ms" is a row's
fastest step; "x baseline" the median over the rounds of the row's step / the baseline's step of the same round, and
"iqr" those ratios' interquartile range. A shared VM's cores switch between slow and fast spells (here the dense
step took 26 or 37 ms, whole runs long or switching within one): rows timed side by side share the spell, so the
paired ratio holds where a ratio of minima would divide one spell's time by another's. (--one-at-a-time: ratios of
minima, iqr "-".)
--compile also times each row with its units compiled (`model.compile_units()`, inductor; the run config's
`compile: true`) on the same input after two warm-up steps, and prints compiled ms, compiled x baseline (compiled),
the speedup eager / compiled, the first step's time (compilation; inductor caches in a fresh temporary folder unless
TORCHINDUCTOR_CACHE_DIR is set, shared by the rows of the run, so rows after the first reuse graphs they have in
common), and Dynamo's counters (torch._dynamo.utils.counters): the graphs compiled and graph breaks met by the
row's warm-up steps, and the graphs its timed steps compiled per step (recompiles; 0 when nothing recompiles).
--rows keeps the named rows (the baseline always runs). --one-at-a-time builds, times and releases one model after
the other instead (no interleaving; for sizes where the models do not fit in memory together, e.g. 125m at T=1024).
--compiled-only (with --compile) builds no eager copies and interleaves the compiled rows' steps, for sizes where
those fit together (125m at T=1024: the ratio then comes from steps timed side by side, which this VM's drift of
10 % between runs spoils for --one-at-a-time). --profile N: torch.profiler over one more step of the first
ReSSFormer row (compiled with --compile), the N operators with the most self CPU time. --cpp-wrapper (with --compile)
compiles every row, the baseline included, with inductor's C++ wrapper (the run config's `compile_cpp_wrapper: true`):
the code that calls the kernels is C++, not Python; the header says which wrapper ran.
"x FLOP" is the time ratio per FLOP (GFLOP/step as run). The header names the CPU allocator setting: with
THP_MEM_ALLOC_ENABLE=1 in the environment PyTorch's CPU allocator asks for transparent huge pages for large tensors,
so a freshly allocated gradient costs fewer page faults (ReSSFormer allocates its shared block's gradients once per
recurrent step: at 125m the experts' are 300 MB per step); it applies to every row alike. --keep-freed-memory runs
the command again under glibc malloc settings that keep freed memory for reuse (MALLOC_MMAP_MAX_=0,
MALLOC_TRIM_THRESHOLD_=2^40; the header names them), which PyTorch's CPU allocator, unlike a GPU's caching allocator,
does not do by itself: the 300 MB of expert gradients per recurrent step are then faulted in once, not every step.
The process's memory then stays at its peak; every row runs under the same settings. --expert-weight-grad sets
`ressformer.kernels.expert_weight_grad` (how the K recurrent steps' expert weight gradients are summed; the header
names it).
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ressformer import ModelConfig, build_model, kernels  # noqa: E402
from ressformer.flops import count_params, flops_per_token, matched_dense  # noqa: E402

ABLATIONS = {
    "ressformer": {},
    "asam.topk=0 (all keys)": {"asam.topk": 0},
    "asam.activation=softmax": {"asam.activation": "softmax"},
    "moe.num_experts=1 (dense FFN)": {"moe.num_experts": 1},
    "soes.enabled=false": {"soes.enabled": False},
    "r2mu.memory=false": {"r2mu.memory": False},
    "document mask, 4 docs per row": {"<documents>": 4},  # documents= (data.document_mask), 4 equal documents
    "asam.impl=block": {"asam.impl": "block"},
    "asam.impl=block, document mask, 4 docs per row": {"asam.impl": "block", "<documents>": 4},
}


# glibc malloc (read at process start): never serve an allocation by mmap, never give the heap's free top back to the
# kernel. PyTorch's CPU allocator caches nothing, so by default every tensor of more than glibc's mmap threshold
# (at most 32 MiB) is fresh pages from the kernel, each page faulted in when first written, and freed memory goes
# back to the kernel. GPU caching allocators keep freed blocks; these settings are the CPU's nearest equivalent.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def paired_ratio(times: list[float], base: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of the ratios times[i] / base[i]: steps of one round divided pairwise."""
    r = [t / b for t, b in zip(times, base, strict=True)]
    if len(r) < 2:
        return r[0], 0.0
    q1, _, q3 = statistics.quantiles(r, n=4, method="inclusive")
    return statistics.median(r), q3 - q1


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; the platform's processor string elsewhere). With the vector ISA PyTorch
    picked, the header names the machine: one commit's ratios differ between CPUs (bench/RESULTS.md: 125m's compiled
    step, 1.47x per FLOP on one 2-core VM, 1.62x on an AVX2 AMD EPYC one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def dynamo_counts() -> dict[str, int]:
    """Dynamo's and inductor's counters so far in this process (torch._dynamo.utils.counters): graphs compiled,
    graph breaks met, graphs inductor ran without a CUDA graph under reduce-overhead (cudagraph skips)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


class Runner:
    """One row's model (eager or compiled) with its input: `step()` times one forward+backward."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, compiled: bool = False, documents: int = 0,
                 compile_kwargs: dict | None = None):
        torch.manual_seed(0)
        self.model = build_model(cfg)
        self.x = torch.randint(0, cfg.vocab_size, (batch, seq))
        # document masking: `documents` equal documents per row (0: none)
        self.docs = (torch.arange(seq) * documents // seq).expand(batch, seq) if documents else None
        self.times: list[float] = []
        self.compiled, self.recompiled = compiled, 0
        before = dynamo_counts() if compiled else None
        if compiled:
            self.model.compile_units(**(compile_kwargs or {}))
        self.first = self.step(record=False)  # warm-up (compiles)
        if compiled:
            self.step(record=False)  # the variants a first backward may still compile
            after = dynamo_counts()
            self.graphs, self.breaks = (after[k] - before[k] for k in ("graphs", "graph_breaks"))

    def step(self, record: bool = True) -> float:
        """Seconds of one forward+backward; recorded steps also count the graphs they compile (recompiles)."""
        graphs = dynamo_counts()["graphs"] if self.compiled else 0
        self.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        self.model(self.x, labels=self.x, documents=self.docs).loss.backward()
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
            if self.compiled:
                self.recompiled += dynamo_counts()["graphs"] - graphs
        return dt

    def profile(self, n: int) -> str:
        from torch.profiler import ProfilerActivity, profile

        self.model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.model(self.x, labels=self.x, documents=self.docs).loss.backward()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time every row with compile_units() (inductor)")
    ap.add_argument("--cpp-wrapper", action="store_true",
                    help="with --compile: every row compiled with inductor's C++ wrapper (the run config's "
                         "compile_cpp_wrapper: true)")
    ap.add_argument("--rows", nargs="+", choices=list(ABLATIONS), help="the rows to run (default: all)")
    ap.add_argument("--baseline", choices=("depth", "matched"), default="depth",
                    help="dense baseline: K-layer (depth) or FLOP-matched at --seq (matched)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile one step of the first ReSSFormer row: the N ops with the most self CPU time")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="build, time and release one model at a time (rows not interleaved): sizes where two "
                         "models do not fit in memory")
    ap.add_argument("--compiled-only", action="store_true",
                    help="with --compile: no eager copies, the compiled rows interleaved (sizes where every row's "
                         "eager and compiled copies do not fit in memory together but the compiled ones do)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="run under glibc malloc settings that keep freed memory for reuse (MALLOC_MMAP_MAX_=0, "
                         "MALLOC_TRIM_THRESHOLD_ very large): no page faults on memory freed and allocated again")
    ap.add_argument("--expert-weight-grad", choices=kernels.EXPERT_WEIGHT_GRAD_MODES, default="auto",
                    help="ressformer.kernels.expert_weight_grad: the K recurrent steps' expert weight gradients in "
                         "one grouped matmul (stacked), per step, or whichever the widths favour (auto)")
    a = ap.parse_args()
    kernels.set_expert_weight_grad(a.expert_weight_grad)
    if a.compiled_only and (not a.compile or a.one_at_a_time):
        ap.error("--compiled-only needs --compile and rows interleaved (not --one-at-a-time)")
    if a.cpp_wrapper and not a.compile:
        ap.error("--cpp-wrapper needs --compile")
    ckw = {"options": {"cpp_wrapper": True}} if a.cpp_wrapper else {}
    if a.keep_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        # glibc reads these when the process starts: run this command again with them set
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    if a.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold compile times, no cache left behind
        cache = tempfile.TemporaryDirectory(prefix="step_time_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    # every row's compiled model stays alive for the interleaved timing: the rows share code objects (one set of
    # graphs per row), so the recompile limit must hold them all
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    base = ModelConfig.from_preset(a.preset)
    if a.seq > base.max_seq_len:
        base = base.replace(max_seq_len=a.seq)
    r = base.r2mu
    if a.baseline == "matched":
        dense = matched_dense(base, a.seq)
    else:
        dense = ModelConfig(arch="transformer", vocab_size=base.vocab_size, d_model=base.d_model,
                            n_heads=base.n_heads, ffn_hidden=base.ffn_hidden, n_layers=r.n_prelude + r.steps + r.n_coda,
                            max_seq_len=base.max_seq_len, moe={"num_experts": 1})
    chosen = a.rows or list(ABLATIONS)
    rows = [(f"baseline (dense, {dense.n_layers} layers)", dense, 0)] + [
        (n, base.replace(**{k: v for k, v in o.items() if k != "<documents>"}), o.get("<documents>", 0))
        for n, o in ABLATIONS.items() if n in chosen]
    order = "one at a time (x baseline: ratio of minima)" if a.one_at_a_time else "interleaved (x baseline: paired)"
    wrapper = f"inductor wrapper {'C++' if a.cpp_wrapper else 'Python'}, " if a.compile else ""
    print(f"torch {torch.__version__}, {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), "
          f"threads {torch.get_num_threads()}, preset {a.preset}, "
          f"B={a.batch} T={a.seq}, fwd+bwd, {a.repeats} rounds, rows {order}, {wrapper}"
          f"expert_weight_grad {a.expert_weight_grad}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
          + " ".join(f"{k}={os.environ.get(k, 'unset')}" for k in KEEP_FREED_MEMORY))
    runners = []  # (name, cfg, eager Runner, compiled Runner | None)
    profiled = None
    if a.one_at_a_time:  # one model in memory at a time: each is timed, then released
        for name, cfg, docs in rows:
            pair = []
            for compiled in ((False, True) if a.compile else (False,)):
                rn = Runner(cfg, a.batch, a.seq, compiled=compiled, documents=docs, compile_kwargs=ckw)
                for _ in range(a.repeats):
                    rn.step()
                if a.profile and profiled is None and cfg.arch == "ressformer" and compiled == a.compile:
                    profiled = (name, compiled, rn.profile(a.profile))
                rn.model = rn.x = None
                pair.append(rn)
                gc.collect()
            runners.append((name, cfg, pair[0], pair[1] if a.compile else None))
    else:
        for name, cfg, docs in rows:
            runners.append((name, cfg, None if a.compiled_only else Runner(cfg, a.batch, a.seq, documents=docs),
                            Runner(cfg, a.batch, a.seq, compiled=True, documents=docs, compile_kwargs=ckw)
                            if a.compile else None))
        for _ in range(a.repeats):  # round robin: a slow spell of a shared machine hits every row alike
            for _, _, eager, compiled in runners:
                if eager is not None:
                    eager.step()
                if compiled is not None:
                    compiled.step()
    head = f"{'model':32} {'params':>12} {'GFLOP/step':>11} {'ms':>9} {'x baseline':>11} {'iqr':>5} {'x FLOP':>7}"
    if a.compile:
        head += (f" {'compiled ms':>12} {'x baseline':>11} {'iqr':>5} {'x FLOP':>7} {'speedup':>8} {'compile s':>10}"
                 f" {'graphs':>7} {'breaks':>7} {'recompiles/step':>16}")
    print(head)
    _, _, e_base, c_base = runners[0]
    g_base = None

    def ratio(r: Runner, b: Runner, gflop: float) -> str:  # "x baseline  iqr  x FLOP"
        if a.one_at_a_time:
            x, iqr = min(r.times) / min(b.times), f"{'-':>5}"
        else:
            x, spread = paired_ratio(r.times, b.times)
            iqr = f"{spread:>5.2f}"
        return f"{x:>11.2f} {iqr} {x * g_base / gflop:>7.2f}"

    for name, cfg, eager, compiled in runners:
        gflop = flops_per_token(cfg, a.seq, documents=(eager or compiled).docs is not None) * a.batch * a.seq / 1e9
        g_base = g_base or gflop
        line = f"{name:32} {count_params(cfg)['total']:>12,} {gflop:>11.3f}"
        if eager is None:
            line += f" {'-':>9} {'-':>11} {'-':>5} {'-':>7}"
        else:
            line += f" {min(eager.times) * 1e3:>9.1f} {ratio(eager, e_base, gflop)}"
        if compiled is not None:
            c = min(compiled.times)
            speedup = f"{min(eager.times) / c:>8.2f}" if eager is not None else f"{'-':>8}"
            line += (f" {c * 1e3:>12.1f} {ratio(compiled, c_base, gflop)} {speedup}"
                     f" {compiled.first:>10.1f} {compiled.graphs:>7} {compiled.breaks:>7}"
                     f" {compiled.recompiled / a.repeats:>16.2f}")
        print(line, flush=True)
    if a.profile and profiled is None and not a.one_at_a_time:
        name, _, eager, compiled = next(rw for rw in runners if rw[1].arch == "ressformer")
        profiled = (name, compiled is not None, (compiled or eager).profile(a.profile))
    if profiled:
        print(f"\nprofile of one {'compiled ' if profiled[1] else ''}step of {profiled[0]} (self CPU time):")
        print(profiled[2])


if __name__ == "__main__":
    main()
