"""pretrain.memory_estimate's per-GPU estimate next to the peak a real training run measures.

    python bench/memory_check.py [--config pretrain/configs/debug.yaml] [--ds-config ds_configs/zero3.json] \
        [--set model=125m --set seq_len=2048 --set micro_batch=1] [--num-gpus 1] [--steps 3] [--json out.json]

Launches the trainer as users do (`deepspeed --num_gpus N pretrain/main.py --ds_config DS --config CFG --set ...`)
for a few steps in a run folder of its own (default: a new temporary folder; its checkpoints are deleted after the
run, metrics.jsonl, run_info.json and the log stay), with logging every step, no evaluation and wandb disabled.
The measured peak is the largest `peak_mem_gib` of the training records in metrics.jsonl (rank 0). The estimate
is `estimate_memory` for the same run config and `--set`s, the DeepSpeed JSON's ZeRO stage / max live parameters /
AutoEP size and world size N, as `python -m pretrain.memory_estimate --config CFG --ds-config DS --world-size N`
computes it; on CUDA the kernels are resolved as that command does (auto), on CPU both are off.

On CUDA the peak is `torch.cuda.max_memory_allocated()` of rank 0: the ratio measured / estimate checks the
estimator (the CUDA context and NCCL buffers are outside both). On CPU (DS_ACCELERATOR=cpu, fp32) the peak is the
rank's peak RSS, which includes the interpreter, torch and DeepSpeed: the CPU ratio is not a check of the estimator,
only of this tool. The number of recurrent steps K the trainer samples is reported next to the estimate's K;
`--set model.r2mu.step_sampling=fixed` makes them equal.

Exit status: 0 when the run finished (whatever the ratio), 1 when it failed or timed out (the message names its
log), 2 for bad arguments or a run config the estimator rejects.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.memory_estimate import (GiB, ds_config_settings, estimate_memory, resolve_kernels,  # noqa: E402
                                      run_config_settings)

# Short and quiet: a record every step, no evaluation, no wandb. The user's --set come after these and win.
QUIET = ["log_every=1", "eval_iters=0", "wandb.mode=disabled"]
OWN_KEYS = {"steps": "--steps", "run_dir": "--run-dir"}


def deepspeed_bin() -> str:
    """The `deepspeed` launcher next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "deepspeed"
    return str(here) if here.is_file() else (shutil.which("deepspeed") or "deepspeed")


def launch(cmd: list[str], env: dict, log: Path, timeout: float | None) -> int | None:
    """Run cmd in the repository root in a process group of its own, output to `log`; None when it timed out
    (the whole group, launcher and ranks, is then killed)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # no rank outlives the launcher
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def training_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in recs if "loss" in r and "peak_mem_gib" in r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/memory_check.py",
                                 description="pretrain.memory_estimate's estimate vs the measured peak of a short run.")
    ap.add_argument("--config", default="pretrain/configs/debug.yaml", help="run config YAML")
    ap.add_argument("--ds-config", default="ds_configs/zero3.json", help="DeepSpeed JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override, as pretrain/main.py --set takes it (repeatable)")
    ap.add_argument("--num-gpus", type=int, default=1, help="ranks (deepspeed --num_gpus); the estimate's world size")
    ap.add_argument("--steps", type=int, default=3, help="training steps")
    ap.add_argument("--run-dir", default=None, help="run folder (default: a new temporary folder)")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds the training run may take")
    args = ap.parse_args(argv)
    if args.num_gpus < 1 or args.steps < 1:
        ap.error(f"--num-gpus {args.num_gpus} and --steps {args.steps} must be >= 1")
    for s in args.set:
        key = s.partition("=")[0].strip()
        if key in OWN_KEYS:
            ap.error(f"--set {s}: give it as {OWN_KEYS[key]}")

    # The trainer runs in the repository root; the estimate reads the same files from here.
    config, ds_config = (str(Path(p).resolve() if Path(p).exists() else REPO / p)
                         for p in (args.config, args.ds_config))

    import torch

    cuda = torch.cuda.is_available()
    temporary = args.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="memory_check_") if temporary else args.run_dir).resolve()
    sets = [*QUIET, f"save_every={args.steps}", *args.set, f"steps={args.steps}", f"run_dir={run_dir}"]

    # The estimate first: a run config the estimator rejects fails before anything is launched.
    try:
        run = run_config_settings(config, sets)
        ds = ds_config_settings(ds_config)
        cfg, seq, mb, every = run["cfg"], run["seq_len"], run["micro_batch"], run["ckpt_every"]
        kernel, fused = resolve_kernels(cfg, "auto", "auto", seq) if cuda else (False, False)
        est = estimate_memory(cfg, seq_len=seq, micro_batch=mb, world_size=args.num_gpus,
                              zero_stage=ds["zero_stage"], ckpt_every=every,
                              max_live_parameters=ds["max_live_parameters"], ep_size=ds["ep_size"],
                              asam_kernel=kernel, fused_loss=fused, documents=run["documents"])
    except (OSError, ValueError) as e:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        ap.error(str(e))

    env = dict(os.environ, WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_gpus)))
    cmd = [deepspeed_bin(), "--num_gpus", str(args.num_gpus), "pretrain/main.py", "--ds_config", ds_config,
           "--config", config]
    for s in sets:
        cmd += ["--set", s]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "memory_check.log"
    rc = launch(cmd, env, log, args.timeout)
    recs = training_records(run_dir)
    finished = (run_dir / "FINISHED").exists()  # exit status 0 also after a signal: saved, not finished
    if rc != 0 or not finished or not recs:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        why = f"timed out after {args.timeout:.0f} s" if rc is None else f"exit status {rc}"
        if rc == 0:
            why = f"no FINISHED marker in {run_dir}" if not finished else f"no training records in {run_dir}"
        sys.stderr.write("\n".join(tail) + f"\nmemory_check: the training run failed ({why}); its log: {log}\n")
        return 1
    if temporary:  # the checkpoints are not needed, and a large model's take GiBs
        for t in run_dir.glob("step_*"):
            shutil.rmtree(t, ignore_errors=True)

    info_path = run_dir / "run_info.json"
    precision = json.loads(info_path.read_text()).get("precision") if info_path.is_file() else None
    peak_gib = max(r["peak_mem_gib"] for r in recs)
    peak = peak_gib * GiB
    if cuda:
        device = f"cuda: {torch.cuda.get_device_name(0)}"  # after the run: no CUDA context of ours during it
        source = "torch.cuda.max_memory_allocated() of rank 0"
        note = "CUDA allocator peak vs the estimate (neither counts the CUDA context, NCCL buffers, fragmentation)"
    else:
        device = "cpu (DS_ACCELERATOR=cpu)"
        source = "peak RSS of rank 0's process"
        note = ("CPU: the peak RSS includes the interpreter, torch and DeepSpeed, and the run is not the bf16 GPU run "
                "the estimate describes: this ratio is not a check of the estimator")
    ks = sorted({int(r["num_steps"]) for r in recs if r.get("num_steps") is not None})
    k_est = cfg.r2mu.steps if cfg.arch == "ressformer" else None
    header = (f"# {args.config} {args.ds_config} {' '.join(args.set)} T={seq} micro_batch={mb} "
              f"world_size={args.num_gpus} ZeRO-{ds['zero_stage']} ep={ds['ep_size']} ckpt_every={every} "
              f"asam_kernel={'on' if kernel else 'off'} fused_loss={'on' if fused else 'off'}")
    lines = [header,
             f"device          {device}, {args.num_gpus} rank(s), precision {precision}",
             est.table(),
             f"{'measured peak':<15} {peak_gib:8.2f} GiB  {source}, max over {len(recs)} steps "
             f"(K sampled: {ks}, estimate K={k_est})",
             f"{'measured / est':<15} {peak / est.total:8.3f}      ({peak_gib * 1024:.1f} / "
             f"{est.total / 2**20:.1f} MiB; / with slack: {peak / est.with_slack:.3f})",
             f"note: {note}",
             f"run folder: {run_dir} (log: {log})"]
    text = "\n".join(lines)
    print(text)
    if args.json:
        res = {"device": device, "cuda": cuda, "precision": precision, "num_gpus": args.num_gpus,
               "config": args.config, "ds_config": args.ds_config, "sets": args.set, "steps": len(recs),
               "settings": {"seq_len": seq, "micro_batch": mb, "ckpt_every": every, **ds,
                            "asam_kernel": kernel, "fused_loss": fused, "num_steps": k_est},
               "num_steps_sampled": ks,
               "estimate": {"terms": est.terms, "notes": est.notes, "total": est.total,
                            "with_slack": est.with_slack, "table": est.table()},
               "measured_peak_gib": peak_gib, "measured_peak_bytes": peak, "measured_source": source,
               "ratio": peak / est.total, "ratio_with_slack": peak / est.with_slack, "note": note,
               "run_dir": str(run_dir), "log": str(log), "command": cmd, "output": text}
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
