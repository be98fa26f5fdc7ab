"""A picture of one or more runs from their metrics.jsonl, without wandb.

    python -m pretrain.plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--labels a b ...]

Panels: training loss and validation loss against steps and against tokens, learning rate, tokens/s (and MFU on
GPUs), gradient norm, the auxiliary losses (MoE balance / z, SOES smoothness), the experts' load balance (the most
and least loaded expert's share), the attention density (the share of keys a query's sparse attention keeps) and
the downstream accuracy of `eval_tasks` (every `eval_tasks/<task>/acc`: the trainer's, or `python -m
pretrain.eval_tasks --metrics RUN_DIR/metrics.jsonl`'s).
Several runs are overlaid, one line per run in every panel, labelled by folder name (or --labels): ablations, seeds.
The trainer writes RUN_DIR/metrics.png at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = [  # (title, x key, [y keys], y scale)
    ("training loss", "step", ["loss"], "linear"),
    ("validation loss", "step", ["val_loss"], "linear"),
    ("training loss by tokens", "tokens_seen", ["loss"], "linear"),
    ("learning rate", "step", ["lr"], "linear"),
    ("tokens / s", "step", ["tokens_per_s"], "linear"),
    ("MFU", "step", ["mfu"], "linear"),
    ("gradient norm", "step", ["grad_norm"], "log"),
    ("auxiliary losses", "step", ["moe_balance", "moe_z", "soes_smooth"], "log"),
    ("expert load (max / min share)", "step", ["diag/moe_load_max", "diag/moe_load_min"], "linear"),
    ("attention density", "step", ["diag/attn_density"], "linear"),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (a line cut by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run folder the trainer wrote")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def series(recs: list[dict], x: str, y: str) -> tuple[list, list]:
    """(x values, y values) of the records holding both, by x; the last record of a repeated x wins."""
    pts = {r[x]: r[y] for r in recs if r.get(x) is not None and isinstance(r.get(y), (int, float))}
    xs = sorted(pts)
    return xs, [pts[k] for k in xs]


def plot(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None):
    """Write the panels of `run_dirs` to `out` (PNG); -> the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).resolve().name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [read_metrics(d) for d in run_dirs]
    panels = [p for p in PANELS if any(series(r, p[1], y)[0] for r in runs for y in p[2])]
    tasks = sorted({k for r in runs for rec in r for k in rec if k.startswith("eval_tasks/") and k.endswith("/acc")})
    if tasks:  # downstream accuracy during training (run config eval_tasks), one line style per task
        panels.append(("downstream accuracy (eval_tasks)", "step", tasks, "linear"))
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, x, ys, scale) in zip(axes.flat, panels):
        for i, (recs, label) in enumerate(zip(runs, labels)):
            for j, y in enumerate(ys):
                xs, vs = series(recs, x, y)
                if xs:
                    short = y.split("/")[1] if y.startswith("eval_tasks/") else y.split("/")[-1]
                    name = label if len(ys) == 1 else f"{label}: {short}"
                    ax.plot(xs, vs, color=colors[i % len(colors)], linestyle=("-", "--", ":")[j % 3], label=name)
        ax.set_title(title)
        ax.set_xlabel("tokens" if x == "tokens_seen" else "step")
        if scale == "log" and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    ap.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/metrics.png of the first run)")
    ap.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    a = ap.parse_args(argv)
    out = a.out or str(Path(a.runs[0]) / "metrics.png")
    try:
        plot(a.runs, out, a.labels)
    except (FileNotFoundError, ValueError) as e:
        print(f"[plot] error: {e}", file=sys.stderr)
        return 2
    print(f"[plot] {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
