"""python -m bench.paper run --suite small|smoke|large [--out runs/paper] [--parallel 2] [--kinds tasks lm]
python -m bench.paper report [--out runs/paper] [--to bench/paper] [--notes FILE]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from bench.paper.suite import SUITES, VARIANTS, run

    ap = argparse.ArgumentParser(prog="python -m bench.paper", description=(
        "The paper suite: train the paper's ReSSFormer, dense baselines (same params, same FLOPs, NoPE) and one "
        "ablation per component on seeded synthetic tasks mirroring the paper's figures, then report."))
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate every model of a suite (resumes: finished runs are kept)")
    r.add_argument("--suite", choices=sorted(SUITES), default="small")
    r.add_argument("--out", default=None, help="default: runs/paper-SUITE")
    r.add_argument("--parallel", type=int, default=2, help="training jobs at once (one CPU rank or GPU each)")
    r.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="a subset (default: the suite's); the paper model is always included")
    r.add_argument("--kinds", nargs="+", choices=["tasks", "lm"], default=["tasks", "lm"],
                   help="which rows: the synthetic tasks (lr trials, seeds, ablations) and / or language modelling "
                        "(default both); the jobs results.json already holds are kept, not re-run")
    p = sub.add_parser("report", help="write RESULTS.md and PNG plots from a run's results.json")
    p.add_argument("--out", default="runs/paper-small", help="the run folder (holds results.json)")
    p.add_argument("--to", default=None, help="where RESULTS.md and the plots go (default: the run folder)")
    p.add_argument("--notes", default=None, help="a markdown file appended to RESULTS.md (the analysis)")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        import dataclasses

        suite = SUITES[a.suite]
        if a.variants:
            suite = dataclasses.replace(suite, variants=tuple(dict.fromkeys(["paper", *a.variants])))
        out = Path(a.out or f"runs/paper-{a.suite}")
        path = run(suite, out, parallel=a.parallel, kinds=tuple(a.kinds))
        print(f"[paper] results: {path}")
        return 0
    from bench.paper.report import report

    out = Path(a.out)
    extra = Path(a.notes).read_text() if a.notes else ""
    path = report(out / "results.json", Path(a.to) if a.to else out, extra)
    print(f"[paper] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
