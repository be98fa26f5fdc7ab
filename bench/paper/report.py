"""`python -m bench.paper report`: results.json -> RESULTS.md (mean, spread, params, FLOPs, tokens/s) + PNG plots.

The plots mirror the paper's figures: accuracy vs input length (hops), accuracy per structure-sensitive task,
accuracy vs number of distractor passages; one line (or bar group) per variant, mean over seeds with min-max.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

FIG2_TASKS = ("set", "table", "reach", "listops")


def _stats(xs: list[float]) -> tuple[float, float, float, int]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), float("nan"), 0
    return statistics.fmean(xs), min(xs), max(xs), len(xs)


def _fmt(xs: list[float], pct: bool = True) -> str:
    m, lo, hi, n = _stats(xs)
    if n == 0:
        return "-"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3g}")
    return f"{f(m)}" if n == 1 else f"{f(m)} ({f(lo)}-{f(hi)})"


def final_runs(results: dict) -> dict[str, list[dict]]:
    """variant -> its task runs at the chosen learning rate (one per seed)."""
    chosen = {v: c["chosen"] for v, c in results.get("lr_choice", {}).items()}
    paper_lr = chosen.get("paper")
    out: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        if r["kind"] != "tasks":
            continue
        want = chosen.get(r["variant"], paper_lr)
        if want is None or abs(r["lr"] - want) <= 1e-12:
            out.setdefault(r["variant"], []).append(r)
    for v in out:
        out[v].sort(key=lambda r: r["seed"])
    order = list(results["variants"])
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))


def _acc(runs: list[dict], task: str, setting) -> list[float]:
    return [r["acc"][task].get(str(setting)) for r in runs]


def _mean_acc(r: dict, tasks) -> float:
    vals = [v for t in tasks for v in r["acc"][t].values()]
    return statistics.fmean(vals) if vals else float("nan")


def plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = final_runs(results)
    made = []

    def lines(task: str, xlabel: str, fname: str, title: str, logx: bool):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v, rs in runs.items():
            settings = sorted(int(s) for s in rs[0]["acc"][task])
            stats = [_stats(_acc(rs, task, s)) for s in settings]
            means = [100 * m for m, *_ in stats]
            ax.plot(settings, means, marker="o", label=v, linewidth=2.5 if v == "paper" else 1.2,
                    linestyle="-" if results["variants"][v][0] in ("model", "baseline") else ":")
            if len(rs) > 1:
                ax.fill_between(settings, [100 * lo for _, lo, _, _ in stats], [100 * hi for _, _, hi, _ in stats],
                                alpha=0.12)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        made.append(fname)

    tasks = _tasks(results)
    lines("hops", f"prompt length (symbols; trained at {_span(tasks['hops'][0])})", "fig1_accuracy_vs_length.png",
          "Figure 1 (mirror): multi-hop variable tracking vs input length", True)
    lines("noisy", f"distractor passages (trained with {_span(tasks['noisy'][0])})", "fig3_accuracy_vs_distractors.png",
          "Figure 3 (mirror): two-hop QA vs distractors", False)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(runs), 1)
    for i, (v, rs) in enumerate(runs.items()):
        st = [_stats([_mean_acc(r, [t]) for r in rs]) for t in FIG2_TASKS]
        means = [100 * m for m, *_ in st]
        err = [[100 * (m - lo) for m, lo, _, _ in st], [100 * (hi - m) for m, _, hi, _ in st]]  # min-max over seeds
        ax.bar([j + i * width for j in range(len(FIG2_TASKS))], means, width, label=v,
               yerr=err if len(rs) > 1 else None, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(FIG2_TASKS))], FIG2_TASKS)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("Figure 2 (mirror): structure-sensitive tasks")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out_dir / "fig2_structure_tasks.png", dpi=110)
    plt.close(fig)
    made.append("fig2_structure_tasks.png")

    sweeps = {r["variant"]: r["k_sweep"] for r in results["runs"].values() if r.get("k_sweep")}
    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for v, sw in sweeps.items():
            ks = sorted(int(k) for k in sw)
            ax.plot(ks, [100 * sw[str(k)]["acc"] for k in ks], marker="o", label=v)
        ax.set_xlabel("recurrent steps K at inference")
        ax.set_ylabel("accuracy at the training settings (%)")
        ax.set_title("K changed at inference")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "k_sweep.png", dpi=110)
        plt.close(fig)
        made.append("k_sweep.png")
    return made


def _tasks(results: dict) -> dict[str, tuple[list[int], list[int]]]:
    """task -> (training settings, test settings) of the suite that was run."""
    return {name: (train, test) for name, train, test in results["suite"]["tasks"]}


def _span(xs: list[int]) -> str:
    return f"{min(xs)}-{max(xs)}" if len(xs) > 1 else f"{xs[0]}"


def _sweep_table(runs: dict[str, list[dict]], task: str, settings: list[int], label: str) -> list[str]:
    """Markdown rows: one line per variant, one column per setting of `task`."""
    rows = ["| variant | " + " | ".join(f"{label}{x}" for x in settings) + " |", "|---|" + "---:|" * len(settings)]
    rows += [f"| {v} | " + " | ".join(_fmt(_acc(rs, task, x)) for x in settings) + " |" for v, rs in runs.items()]
    return rows + [""]


def markdown(results: dict, pngs: list[str]) -> str:
    tasks = _tasks(results)
    runs = final_runs(results)
    s = results["suite"]
    desc = results["variants"]
    L = []
    L.append("# The paper suite: ReSSFormer vs dense baselines\n")
    L.append(f"Suite `{s['name']}` on {results.get('device', '?')}. Command: `{results.get('command', '?')}`, then "
             "`python -m bench.paper report`.")
    L.append(f"Every model: {s['steps']} steps x micro batch {s['micro_batch']} of {s['seq_len']}-token windows "
             f"(one example each, loss on the answer only), the same {s['n_train']} training examples; test: "
             f"{s['n_test']} fresh examples per task and setting. Seeds: paper model and baselines {list(s['seeds'])}, "
             f"ablations / extensions {list(s['ablation_seeds'])}. Cells: mean accuracy % over seeds (min-max).\n")
    L.append("Tuning budget: the same learning-rate trials for each architecture (seed 0, chosen by validation "
             "loss on answer tokens); ablations and extensions reuse the paper model's learning rate.\n")
    L.append("| architecture | " + " | ".join(f"lr {lr}" for lr in s["lrs"]) + " | chosen |")
    L.append("|---|" + "---|" * (len(s["lrs"]) + 1))
    for v, c in results.get("lr_choice", {}).items():
        L.append(f"| {v} | " + " | ".join(f"{c['trials'].get(str(lr), float('nan')):.3f}" for lr in s["lrs"])
                 + f" | {c['chosen']} |")
    L.append("")
    L.append("## Models\n")
    L.append("FLOPs/token: training (fwd + bwd) at the training length; ReSSFormer as this implementation computes "
             "them (including the no-grad top-k selection over all keys), the dense baselines' causal attention at "
             "(T + 1) / 2 keys per query (FlashAttention-style). tokens/s: CPU training throughput (one rank, one "
             "thread), mean over seeds.\n")
    L.append("| variant | group | what | params | active | GFLOP/token | tokens/s | val loss (answers) |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|")
    for v, rs in runs.items():
        r0 = rs[0]
        L.append(f"| {v} | {desc[v][0]} | {desc[v][1]} | {r0['params']:,} | {r0['active']:,} | "
                 f"{r0['flops_per_token'] / 1e9:.4f} | {_fmt([r['tokens_per_s'] for r in rs], False)} | "
                 f"{_fmt([r['val_loss'] for r in rs], False)} |")
    L.append("")
    L.append(f"## Figure 1 (mirror): accuracy vs input length (`hops`, trained at {_span(tasks['hops'][0])} "
             "symbols)\n")
    L += _sweep_table(runs, "hops", tasks["hops"][1], "L=")
    L.append("## Figure 2 (mirror): structure-sensitive tasks\n")
    L.append("| variant | " + " | ".join(FIG2_TASKS) + " | mean |")
    L.append("|---|" + "---:|" * (len(FIG2_TASKS) + 1))
    for v, rs in runs.items():
        L.append(f"| {v} | " + " | ".join(_fmt(_acc(rs, t, tasks[t][1][0])) for t in FIG2_TASKS)
                 + f" | {_fmt([_mean_acc(r, FIG2_TASKS) for r in rs])} |")
    L.append("")
    L.append(f"## Figure 3 (mirror): accuracy vs distractor passages (`noisy`, trained with "
             f"{_span(tasks['noisy'][0])})\n")
    L += _sweep_table(runs, "noisy", tasks["noisy"][1], "")
    sweeps = {r["variant"]: r["k_sweep"] for r in results["runs"].values() if r.get("k_sweep")}
    if sweeps:
        L.append("## K changed at inference (seed 0; every test set at a training setting)\n")
        ks = sorted({int(k) for sw in sweeps.values() for k in sw})
        L.append("| variant | " + " | ".join(f"K={k}" for k in ks) + " |")
        L.append("|---|" + "---:|" * len(ks))
        for v, sw in sweeps.items():
            L.append(f"| {v} accuracy % | " + " | ".join(f"{100 * sw[str(k)]['acc']:.1f}" for k in ks) + " |")
            L.append(f"| {v} answer ppl | " + " | ".join(f"{sw[str(k)]['answer_ppl']:.3g}" for k in ks) + " |")
        L.append("")
    lm: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        if r["kind"] == "lm":
            lm.setdefault(r["variant"], []).append(r)
    if lm:
        L.append("## Language modelling: validation perplexity on the default corpus (tinyshakespeare)\n")
        L.append(f"{s['lm_steps']} steps, micro batch {s['micro_batch']} x {s['seq_len']} tokens, lr 3e-3 for all (the main job's; not tuned "
                 "for any of them), seeds " + ", ".join(str(x) for x in s["lm_seeds"]) + ".\n")
        L.append("| variant | val ppl mean (min-max) | tokens/s |")
        L.append("|---|---:|---:|")
        for v, rs in lm.items():
            L.append(f"| {v} | {_fmt([r['val_ppl'] for r in rs], False)} | {_fmt([r['tokens_per_s'] for r in rs], False)} |")
        L.append("")
    for p in pngs:
        L.append(f"![{p}]({p})")
    L.append("")
    return "\n".join(L)


def report(results_path: Path, out_dir: Path, extra: str = "") -> Path:
    results = json.loads(results_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(results, out_dir)
    md = markdown(results, pngs)
    if extra:
        md += "\n" + extra
    path = out_dir / "RESULTS.md"
    path.write_text(md)
    return path
