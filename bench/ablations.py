"""Component ablations, language modelling on the default corpus: train each variant with the real trainer, compare.

    python bench/ablations.py [--steps 200] [--nproc 2] [--variants full soes_off ...] [--out runs/ablations]
                              [--ds-config ds_configs/zero1.json] [--artifacts artifacts] [--set seq_len=512]

Every variant is the debug run config (pretrain/configs/debug.yaml: embedded corpus, seed, schedule) with one
component switched off or replaced, trained by `deepspeed pretrain/main.py` on CPU ranks (GPUs when present)
for the same steps on the same data. Reported per variant: parameters (total / active per token), analytic
GFLOP per token, validation perplexity at each evaluation, the final one and its ratio to the full
ReSSFormer's (measured in the same invocation), and training tokens/s. OUT/results.json keeps the numbers;
a variant whose run folder already holds FINISHED is read back instead of retrained (--force retrains).
Differences at this scale (0.2 M parameters, 200 steps, 1 MB of text) show that each switch changes
training, not how the paper's model behaves at 1B.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.distributed import free_port  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "full": [],  # the paper's ReSSFormer (preset debug): R2MU K=4 + memory, ASAM top-k sparsemax + MoE, SOES graph
    "r2mu_off": ["model.r2mu.enabled=false"],  # K distinct blocks instead of one shared block
    "memory_off": ["model.r2mu.memory=false"],  # no token cache / segment summary
    "topk_off": ["model.asam.topk=0"],  # every visible key
    "softmax": ["model.asam.activation=softmax"],  # dense attention probabilities over the kept keys
    "entmax15": ["model.asam.activation=entmax15"],  # extension: a sparser-than-softmax, denser-than-sparsemax map
    "soes_bilinear": ["model.soes.graph=bilinear"],  # extension: graph from a bilinear scorer
    "moe_off": ["model.moe.num_experts=1"],  # dense SwiGLU FFN
    "soes_off": ["model.soes.enabled=false"],  # no latent graph, no smoothness loss
    "transformer": ["model=debug-transformer"],  # the dense RoPE baseline
    # long-context attention paths, opt-in (at the default T=128 the kept blocks cover nearly every key):
    #   python bench/ablations.py --variants block block_chunk --set seq_len=512 --set model.max_seq_len=512 \
    #       --set micro_batch=4 --set data.split=949,50,0   (the 0.1 % test split is shorter than 513 tokens)
    "block": ["model.asam.impl=block"],  # key blocks chosen per query, then top-k inside them
    "block_chunk": ["model.asam.impl=block", "model.asam.block_select=chunk"],  # chosen per query chunk
}
DEFAULT = [v for v in VARIANTS if not v.startswith("block")]  # the task suite with baselines: python -m bench.paper


def read_metrics(run_dir: Path) -> dict:
    """Evaluations, mean training tokens/s and the resolved model config of a finished run."""
    from ressformer.config import ModelConfig
    from ressformer.flops import count_params, flops_per_token

    evals, tps = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_ppl" in rec:
            evals.append((rec["step"], rec["val_ppl"]))
        elif "tokens_per_s" in rec:
            tps.append(rec["tokens_per_s"])
    tps = tps[1:] or tps  # the first logged interval includes start-up
    info = json.loads((run_dir / "run_info.json").read_text())
    cfg = ModelConfig.from_dict(info["model_config"])
    counts = count_params(cfg)
    seq_len = info["run_config"]["seq_len"]
    return {"evals": evals, "final_ppl": evals[-1][1] if evals else float("nan"),
            "tokens_per_s": sum(tps) / len(tps) if tps else float("nan"), "params": counts["total"],
            "active": counts["active"], "gflop_per_token": flops_per_token(cfg, seq_len) / 1e9}


def train(name: str, sets: list[str], a: argparse.Namespace, env: dict) -> dict:
    run_dir = Path(a.out) / name
    spec = {"sets": sets, "steps": a.steps, "eval_every": a.eval_every, "nproc": a.nproc, "ds_config": a.ds_config,
            "config": a.config, "artifacts": a.artifacts}
    if a.force and run_dir.exists():
        shutil.rmtree(run_dir)
    if (run_dir / "FINISHED").is_file():
        old = json.loads((run_dir / "ablation.json").read_text()) if (run_dir / "ablation.json").is_file() else None
        if old != spec:
            raise SystemExit(f"[ablations] {run_dir} holds a finished run of other settings ({old}, now {spec}): "
                             "pass --force to retrain it or --out for a new folder")
    else:
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
        if launcher is None:
            raise SystemExit("deepspeed launcher not found: run scripts/setup.sh and use .venv/bin/python")
        cmd = [launcher, "--num_gpus", str(a.nproc), "--master_port", str(free_port()), "pretrain/main.py",
               "--ds_config", a.ds_config, "--config", a.config, "--resume", "auto",
               "--set", f"run_dir={run_dir}", "--set", f"steps={a.steps}", "--set", f"save_every={a.steps}",
               "--set", f"eval_every={a.eval_every}", "--set", "wandb.mode=disabled",
               "--set", f"data.blend=[[1.0, {a.artifacts}/data/shakespeare]]",
               "--set", f"data.tokenizer={a.artifacts}/tokenizer"]
        for s in sets:
            cmd += ["--set", s]
        print(f"[ablations] {name}: {' '.join(sets) or '(full model)'}", flush=True)
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if p.returncode != 0 or not (run_dir / "FINISHED").is_file():
            tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-25:])
            raise SystemExit(f"[ablations] {name} failed (exit {p.returncode}); last lines:\n{tail}")
        (run_dir / "ablation.json").write_text(json.dumps(spec))
    return read_metrics(run_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="variants:\n" + "\n".join(f"  {k:12} {' '.join(v) or '(full model)'}"
                                                                 for k, v in VARIANTS.items()))
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override applied to every variant (seq_len=512, micro_batch=4, ...)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--ds-config", default="ds_configs/zero1.json")
    ap.add_argument("--config", default="pretrain/configs/debug.yaml")
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--artifacts", default="artifacts",
                    help="tokenizer + indexed data (python -m pretrain.data prepare)")
    ap.add_argument("--force", action="store_true", help="retrain variants whose run folder is finished")
    a = ap.parse_args(argv)
    if "full" not in a.variants:
        a.variants = ["full", *a.variants]  # the baseline of the ratios, measured in the same invocation

    import torch

    env = dict(os.environ, WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.nproc)))
    subprocess.run([sys.executable, "-m", "pretrain.data", "prepare", "--out", a.artifacts], cwd=REPO, env=env,
                   check=True, capture_output=True)
    results = {name: train(name, [*a.set, *VARIANTS[name]], a, env) for name in a.variants}

    ref = results["full"]["final_ppl"]
    steps = [s for s, _ in results["full"]["evals"]]
    print(f"\n{a.steps} steps, {a.nproc} ranks, {a.ds_config}, {a.config} {' '.join(a.set)}; "
          f"val ppl at steps {steps}")
    print(f"{'variant':12} {'params':>9} {'active':>9} {'GFLOP/tok':>9} {'final ppl':>9} {'x full':>7} "
          f"{'tok/s':>7}  val ppl by step")
    for name, r in results.items():
        curve = " ".join(f"{p:.1f}" for _, p in r["evals"])
        print(f"{name:12} {r['params']:>9,} {r['active']:>9,} {r['gflop_per_token']:>9.4f} {r['final_ppl']:>9.2f} "
              f"{r['final_ppl'] / ref:>7.3f} {r['tokens_per_s']:>7.0f}  {curve}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"steps": a.steps, "nproc": a.nproc, "ds_config": a.ds_config,
                                                  "set": a.set, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
