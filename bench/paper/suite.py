"""The paper suite: train the paper's ReSSFormer, dense baselines and one ablation per component, then score them.

Every model is trained by the framework itself (`deepspeed pretrain/main.py`, one CPU rank per job, or a GPU)
on the same examples: a mixture of the six tasks of `bench.paper.tasks` at their training settings, written as
prompt/completion documents (`tokenizer.preprocess --prompt-key --completion-key --pad-to seq_len`), so the
loss is on the answer (and EOS) only and every training window is one example. Accuracy is exact match of the
answer tokens (argmax after the prompt, which is what greedy decoding would emit), on fresh test examples at
every setting of each task's sweep, including lengths the models never saw in training.

Same budget for every architecture: the paper model and each dense baseline get the same learning-rate
trials (seed 0, chosen by validation loss on answer tokens); the ablations and extensions reuse the paper
model's choice. Dense baselines: `dense_params` (as many layers as give the paper model's total parameter
count), `dense_flops` (as many as give its training FLOPs per token, the baseline's causal attention counted
at (T + 1) / 2 keys per query as a FlashAttention kernel computes it: ressformer.flops causal_skip) and
`dense_nope` (dense_params without RoPE). FLOPs of ReSSFormer are counted as this implementation computes them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "tinyshakespeare" / "input.txt"
PAPER_PRESET = "debug"


# task -> (training settings, test settings): the task's knob (bench.paper.tasks), e.g. hops' prompt length
SMALL_TASKS = (("hops", (24, 32, 40, 48), (48, 96, 192, 384)), ("set", (8,), (8,)), ("table", (3,), (3,)),
               ("reach", (6,), (6,)), ("listops", (6,), (6,)), ("noisy", (0, 1, 2), (0, 2, 4, 8, 16)))
LARGE_TASKS = (("hops", (256, 384, 512), (512, 1024, 2048, 4096)), ("set", (24,), (24,)), ("table", (6,), (6,)),
               ("reach", (12,), (12,)), ("listops", (20,), (20,)), ("noisy", (0, 2, 4), (0, 2, 4, 8, 16)))


@dataclass(frozen=True)
class Suite:
    """How much of everything: steps, seeds, learning-rate trials, data, task settings and test sizes."""

    name: str
    steps: int
    micro_batch: int
    seeds: tuple[int, ...]  # seeds of the paper model and the dense baselines
    ablation_seeds: tuple[int, ...]  # seeds of the component ablations and extensions
    lrs: tuple[float, ...]  # learning-rate trials per architecture (seed 0)
    n_train: int  # training examples (a mixture of all tasks)
    n_test: int  # test examples per task and setting
    lm_steps: int  # language-modelling row: steps on the default corpus
    lm_seeds: tuple[int, ...]
    k_sweep: bool = True  # evaluate the paper model and ext_k_sampled at K = 1 .. 2 x training K
    variants: tuple[str, ...] | None = None  # None = all
    seq_len: int = 64  # training window: one padded example
    tasks: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = SMALL_TASKS
    model_overrides: tuple[tuple[str, object], ...] = ()

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


SUITES = {
    "smoke": Suite("smoke", steps=4, micro_batch=4, seeds=(0,), ablation_seeds=(), lrs=(3e-3,), n_train=600,
                   n_test=8, lm_steps=2, lm_seeds=(0,), variants=("paper", "dense_params")),
    "small": Suite("small", steps=1200, micro_batch=32, seeds=(0, 1, 2), ablation_seeds=(0,), lrs=(1e-3, 3e-3),
                   n_train=40000, n_test=200, lm_steps=200, lm_seeds=(0, 1, 2)),
    "large": Suite("large", steps=20000, micro_batch=32, seeds=(0, 1, 2), ablation_seeds=(0, 1, 2),
                   lrs=(3e-4, 1e-3, 3e-3), n_train=1_000_000, n_test=500, lm_steps=20000, lm_seeds=(0, 1, 2),
                   seq_len=1024, tasks=LARGE_TASKS,
                   model_overrides=(("d_model", 512), ("n_heads", 8), ("ffn_hidden", 1408))),
}

# name -> (group, description, run-config overrides on top of the paper model)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "paper": ("model", "ReSSFormer as in the paper (preset debug)", []),
    "dense_params": ("baseline", "dense RoPE Transformer, same total parameters", ["<dense:params>"]),
    "dense_flops": ("baseline", "dense RoPE Transformer, same training FLOPs per token", ["<dense:flops>"]),
    "dense_nope": ("baseline", "dense Transformer without positional encoding, same parameters",
                   ["<dense:params>", "model.position=none"]),
    "no_r2mu": ("ablation", "K distinct blocks, no sharing, no memory", ["model.r2mu.enabled=false"]),
    "no_memory": ("ablation", "no token cache / segment summary", ["model.r2mu.memory=false"]),
    "no_topk": ("ablation", "every visible key (no top-k)", ["model.asam.topk=0"]),
    "softmax": ("ablation", "softmax instead of sparsemax", ["model.asam.activation=softmax"]),
    "no_moe": ("ablation", "dense SwiGLU instead of routed experts", ["model.moe.num_experts=1"]),
    "no_soes": ("ablation", "no latent graph, no smoothness loss", ["model.soes.enabled=false"]),
    "ext_prelude_coda": ("extension", "+1 prelude and +1 coda block",
                         ["model.r2mu.n_prelude=1", "model.r2mu.n_coda=1"]),
    "ext_entmax15": ("extension", "entmax15 instead of sparsemax", ["model.asam.activation=entmax15"]),
    "ext_block_chunk": ("extension", "block pre-selection, chosen per query chunk",
                        ["model.asam.impl=block", "model.asam.block_select=chunk"]),
    "ext_k_sampled": ("extension", "K ~ U[2, 6] per step in training (mean = the paper's K=4)",
                      ["model.r2mu.step_sampling=uniform", "model.r2mu.min_steps=2", "model.r2mu.max_steps=6"]),
    "ext_soes_bilinear": ("extension", "SOES graph from a bilinear scorer instead of the attention pattern",
                          ["model.soes.graph=bilinear"]),
    "ext_document_mask": ("extension", "document masking: no token reads another document of its packed window",
                          ["data.document_mask=true"]),
}
LM_VARIANTS = ("paper", "dense_params", "dense_flops", "ext_document_mask")


# --- data -----------------------------------------------------------------------------------------------------
def train_mixture(suite: Suite, seed: int):
    """suite.n_train training examples, the tasks in equal shares, each share spread over its training settings."""
    import random

    from bench.paper.tasks import generate

    n, out = suite.n_train, []
    for i, (name, settings, _) in enumerate(suite.tasks):
        share = n // len(suite.tasks) + (1 if i < n % len(suite.tasks) else 0)
        for j, s in enumerate(settings):
            k = share // len(settings) + (1 if j < share % len(settings) else 0)
            out += generate(name, k, seed * 1000 + j, s)
    random.Random(seed).shuffle(out)
    return out


def test_sets(suite: Suite) -> dict[str, dict[int, list]]:
    """task -> test setting -> examples; generator seeds disjoint from training's (0..999)."""
    from bench.paper.tasks import generate

    return {name: {s: generate(name, suite.n_test, 10_000 + i, s) for i, s in enumerate(test)}
            for name, _, test in suite.tasks}


def build_data(suite: Suite, out: Path) -> dict:
    """Tokenizer (task symbols as user symbols) and prompt/completion indexed datasets under out/data."""
    from bench.paper.tasks import SYMBOLS, to_text
    from tokenizer.preprocess import preprocess
    from tokenizer.train import train_tokenizer

    d = out / "data"
    stamp = d / "DONE.json"
    spec = {"n_train": suite.n_train, "seq_len": suite.seq_len, "tasks": suite.as_json()["tasks"], "version": 2}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return {"tokenizer": str(d / "tokenizer"), "prefix": str(d / "tasks")}
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    rows = [{"prompt": to_text(e.prompt), "completion": to_text(e.answer)} for e in train_mixture(suite, 0)]
    with open(d / "tasks.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    # the tokenizer learns its few merges from the default corpus; every task symbol is one user-symbol token
    (d / "tok_corpus.txt").write_text("\n\n".join(r["prompt"] + r["completion"] for r in rows[:2000]) + "\n\n"
                                      + CORPUS.read_text(encoding="utf-8")[:300_000])
    tok = train_tokenizer([d / "tok_corpus.txt"], d / "tokenizer", vocab_size=512,
                          user_symbols=tuple(f"<{s}>" for s in SYMBOLS), force=True)
    preprocess(tok.path, [d / "tasks.jsonl"], d / "tasks", prompt_key="prompt", completion_key="completion",
               pad_to=suite.seq_len, num_proc=1, progress=False)
    stamp.write_text(json.dumps(spec))
    return {"tokenizer": str(d / "tokenizer"), "prefix": str(d / "tasks")}


# --- models -------------------------------------------------------------------------------------------------
def paper_config(suite: Suite):
    from ressformer.config import ModelConfig

    return ModelConfig.from_preset(PAPER_PRESET, **{"max_seq_len": suite.seq_len, **dict(suite.model_overrides)})


def dense_layers(suite: Suite, match: str) -> int:
    """Layers of the dense baseline (paper model's width) closest to the paper model in params or FLOPs."""
    from ressformer.config import ModelConfig
    from ressformer.flops import count_params, flops_per_token

    p = paper_config(suite)
    base = ModelConfig.from_preset("debug-transformer", **{"max_seq_len": suite.seq_len, "d_model": p.d_model,
                                                             "n_heads": p.n_heads, "ffn_hidden": p.ffn_hidden})
    if match == "params":
        size, target = (lambda c: count_params(c)["total"]), count_params(p)["total"]
    else:
        size = lambda c: flops_per_token(c, suite.seq_len, causal_skip=True)  # noqa: E731
        target = flops_per_token(p, suite.seq_len, attend="gather")  # the sparse algorithm's (flops.matched_dense)
    return min(range(1, 49), key=lambda n: abs(size(base.replace(n_layers=n)) - target))


def variant_sets(suite: Suite, name: str) -> list[str]:
    """Run-config overrides (`--set`) of one variant."""
    p = paper_config(suite)
    sets = [f"model={PAPER_PRESET}", f"model.max_seq_len={suite.seq_len}"]
    sets += [f"model.{k}={v}" for k, v in suite.model_overrides]
    for s in VARIANTS[name][2]:
        if s.startswith("<dense:"):
            n = dense_layers(suite, s[7:-1])
            sets = ["model=debug-transformer", f"model.max_seq_len={suite.seq_len}", f"model.n_layers={n}",
                    f"model.d_model={p.d_model}", f"model.n_heads={p.n_heads}", f"model.ffn_hidden={p.ffn_hidden}"]
        else:
            sets.append(s)
    return sets


# --- training -----------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str  # run folder name
    variant: str
    seed: int
    lr: float
    kind: str  # tasks | lm
    sets: list[str] = field(default_factory=list)


def _env() -> dict:
    import torch

    env = dict(os.environ, WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def job_command(job: Job, suite: Suite, data: dict, out: Path, slot: int = 0, gpus: int = 0) -> list[str]:
    """The deepspeed command of one job: one CPU rank, or GPU `slot` when there are GPUs."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        raise SystemExit("deepspeed launcher not found: run scripts/setup.sh and use .venv/bin/python")
    if job.kind == "tasks":
        data_sets = [f"data.blend=[[1.0, {data['prefix']}]]", f"data.tokenizer={data['tokenizer']}",
                     "data.split=95,5,0", f"steps={suite.steps}", f"micro_batch={suite.micro_batch}",
                     f"seq_len={suite.seq_len}", f"eval_every={max(1, suite.steps // 4)}", "eval_iters=4"]
    else:  # the default corpus (the main job's data), at the suite's window so the matched sizes hold
        data_sets = ["data.blend=[[1.0, artifacts/data/shakespeare]]", "data.tokenizer=artifacts/tokenizer",
                     f"steps={suite.lm_steps}", f"eval_every={max(1, suite.lm_steps // 3)}",
                     f"micro_batch={suite.micro_batch}", f"seq_len={suite.seq_len}", "eval_iters=8"]
    steps = suite.steps if job.kind == "tasks" else suite.lm_steps
    sets = [f"run_dir={out / 'runs' / job.name}", f"seed={1234 + job.seed}", f"lr={job.lr}", f"min_lr={job.lr / 10}",
            f"warmup_steps={max(1, steps // 15)}", f"save_every={steps}", "log_every=10", "wandb.mode=disabled",
            "activation_checkpointing.enabled=false", "keep_last=1", *data_sets, *job.sets]
    from pretrain.distributed import free_port

    where = ["--include", f"localhost:{slot}"] if gpus else ["--num_gpus", "1"]
    cmd = [launcher, *where, "--master_port", str(free_port()), "pretrain/main.py",
           "--ds_config", "ds_configs/zero1.json", "--config", "pretrain/configs/debug.yaml", "--resume", "auto"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_jobs(jobs: list[Job], suite: Suite, data: dict, out: Path, parallel: int, on_done) -> None:
    """Train the jobs `parallel` at a time (one GPU each where there are GPUs, at most one job per GPU);
    on_done(job) runs in this process as each one finishes."""
    import torch

    env = _env()
    gpus = torch.cuda.device_count()
    if gpus:
        parallel = min(parallel, gpus)
    todo = [j for j in jobs if not (out / "runs" / j.name / "FINISHED").is_file()]
    for j in jobs:
        if j not in todo:
            on_done(j)
    running: list[tuple[Job, subprocess.Popen, float, int]] = []  # job, process, start time, slot
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < parallel:
            j = todo.pop(0)
            slot = min(set(range(parallel)) - {sl for *_, sl in running})
            log = open(logs / f"{j.name}.log", "w")
            p = subprocess.Popen(job_command(j, suite, data, out, slot, gpus), cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
            running.append((j, p, time.time(), slot))
            print(f"[paper] start {j.name}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            j, p, t0, _ = item
            if p.poll() is None:
                continue
            running.remove(item)
            ok = p.returncode == 0 and (out / "runs" / j.name / "FINISHED").is_file()
            print(f"[paper] {'done' if ok else 'FAILED'} {j.name} in {time.time() - t0:.0f}s", flush=True)
            if not ok:
                tail = "\n".join((logs / f"{j.name}.log").read_text().splitlines()[-30:])
                for _, q, _, _ in running:
                    q.terminate()
                raise SystemExit(f"[paper] {j.name} failed (exit {p.returncode}); last lines of its log:\n{tail}")
            on_done(j)


# --- evaluation ---------------------------------------------------------------------------------------------
def load_trained(run_dir: Path):
    """(model in eval mode, ModelConfig) from a finished run folder."""
    from pretrain.convert import read_any
    from ressformer import build_model
    from ressformer.config import ModelConfig

    sd, mcfg, _ = read_any(run_dir)
    cfg = ModelConfig.from_dict(mcfg)
    model = build_model(cfg)
    model.load_state_dict(sd)
    return model.eval(), cfg


def score(model, sp, examples, num_steps: int | None = None, batch: int = 32) -> dict:
    """Exact-match accuracy and mean NLL of the answer tokens (teacher forcing: argmax = greedy decoding)."""
    import torch

    from bench.paper.tasks import to_text

    items = [(sp.encode(to_text(e.prompt)), sp.encode(to_text(e.answer))) for e in examples]
    correct, nll, n_tok = 0, 0.0, 0
    with torch.no_grad():
        for b0 in range(0, len(items), batch):
            part = items[b0:b0 + batch]
            T = max(len(p) + len(a) for p, a in part)
            ids = torch.zeros(len(part), T, dtype=torch.long)  # right padding: causal, so never read
            for i, (p, a) in enumerate(part):
                ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            logp = model(ids, num_steps=num_steps).logits.float().log_softmax(-1)  # (b, T, V)
            for i, (p, a) in enumerate(part):
                rows = logp[i, len(p) - 1:len(p) + len(a) - 1]  # predictions of the answer tokens
                tgt = torch.tensor(a)
                correct += int((rows.argmax(-1) == tgt).all())
                nll -= float(rows.gather(-1, tgt[:, None]).sum())
                n_tok += len(a)
    return {"acc": correct / max(len(items), 1), "nll": nll / max(n_tok, 1), "n": len(items)}


def evaluate_run(run_dir: Path, suite: Suite, tests: dict, tokenizer: str, k_sweep: bool) -> dict:
    import torch

    from ressformer.flops import count_params, flops_per_token
    from tokenizer import Tokenizer

    torch.set_num_threads(1)
    model, cfg = load_trained(run_dir)
    sp = Tokenizer(tokenizer).sp
    res = {"acc": {t: {str(s): score(model, sp, ex)["acc"] for s, ex in by.items()} for t, by in tests.items()}}
    res.update(_train_metrics(run_dir), params=count_params(cfg)["total"], active=count_params(cfg)["active"],
               flops_per_token=flops_per_token(cfg, suite.seq_len, causal_skip=True))
    if k_sweep and cfg.arch == "ressformer":
        K = cfg.r2mu.steps
        valid = [e for name, train, _ in suite.tasks for s, ex in tests[name].items() if s in train for e in ex]
        valid = valid or [e for by in tests.values() for e in next(iter(by.values()))]
        res["k_sweep"] = {}
        for k in range(1, 2 * K + 1):
            s = score(model, sp, valid, num_steps=k)
            res["k_sweep"][str(k)] = {"acc": s["acc"], "answer_ppl": math.exp(min(s["nll"], 50))}
    return res


def _train_metrics(run_dir: Path) -> dict:
    vals, tps = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            vals.append((rec["step"], rec["val_loss"]))
        elif "tokens_per_s" in rec:
            tps.append(rec["tokens_per_s"])
    tps = tps[1:] or tps  # the first interval includes start-up
    return {"val_loss": vals[-1][1] if vals else float("nan"), "val_curve": vals,
            "tokens_per_s": sum(tps) / len(tps) if tps else float("nan")}


# --- the whole suite ----------------------------------------------------------------------------------------
def run(suite: Suite, out: Path, parallel: int = 2, kinds: tuple[str, ...] = ("tasks", "lm")) -> Path:
    """Train and evaluate the suite's jobs of `kinds` (tasks: learning-rate trials, seeds, ablations; lm: the
    language-modelling rows) into out/results.json; jobs it already holds are not run again."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("suite") not in (None, suite.as_json()):
        raise SystemExit(f"[paper] {out} holds results of another suite definition: use another --out or delete it")
    results.update(suite=suite.as_json(), command=" ".join([Path(sys.executable).name, "-m", "bench.paper", *sys.argv[1:]]),
                   variants={k: v[:2] for k, v in VARIANTS.items()}, started=results.get("started", time.time()))
    results.setdefault("runs", {})
    data = build_data(suite, out)
    tests = test_sets(suite)
    subprocess.run([sys.executable, "-m", "pretrain.data", "prepare", "--out", "artifacts"], cwd=REPO, env=_env(),
                   check=True, capture_output=True)
    names = suite.variants or tuple(VARIANTS)

    def save():
        results["device"] = _device()
        results_path.write_text(json.dumps(results, indent=1))

    def done(job: Job):
        if job.name in results["runs"]:
            return
        run_dir = out / "runs" / job.name
        if job.kind == "tasks":
            sweep = suite.k_sweep and job.seed == 0 and job.variant in ("paper", "ext_k_sampled")
            r = evaluate_run(run_dir, suite, tests, data["tokenizer"], sweep)
        else:
            r = _train_metrics(run_dir)
            r["val_ppl"] = math.exp(min(r["val_loss"], 50))
        results["runs"][job.name] = {"variant": job.variant, "seed": job.seed, "lr": job.lr, "kind": job.kind, **r}
        save()

    def job(variant, seed, lr, kind="tasks"):
        return Job(f"{kind}-{variant}-s{seed}-lr{lr:g}", variant, seed, lr, kind, variant_sets(suite, variant))

    def new(jobs: list[Job]) -> list[Job]:  # a job results.json holds is not run again (nor re-evaluated)
        return [j for j in jobs if j.name not in results["runs"]]

    rest = []
    if "tasks" in kinds:
        # 1. learning-rate trials, the same number for each architecture (seed 0)
        archs = [v for v in names if VARIANTS[v][0] in ("model", "baseline")]
        run_jobs(new([job(v, 0, lr) for v in archs for lr in suite.lrs]), suite, data, out, parallel, done)
        best = {}
        for v in archs:
            trials = {lr: results["runs"][job(v, 0, lr).name]["val_loss"] for lr in suite.lrs}
            best[v] = min(trials, key=lambda lr: trials[lr] if math.isfinite(trials[lr]) else float("inf"))
        results["lr_choice"] = {v: {"chosen": best[v], "trials": {
            str(lr): results["runs"][job(v, 0, lr).name]["val_loss"] for lr in suite.lrs}} for v in archs}
        save()
        # 2. the remaining seeds; ablations and extensions at the paper model's learning rate
        lr_paper = best.get("paper", suite.lrs[0])
        rest = [job(v, s, best[v]) for v in archs for s in suite.seeds if s != 0]
        rest += [job(v, s, lr_paper) for v in names if VARIANTS[v][0] in ("ablation", "extension")
                 for s in suite.ablation_seeds]
    if "lm" in kinds:
        # 3. language modelling on the default corpus (the main job's data), one learning rate for all: the main job's
        rest += [job(v, s, 3e-3, "lm") for v in LM_VARIANTS if v in names for s in suite.lm_seeds]
    run_jobs(new(rest), suite, data, out, parallel, done)
    results["finished"] = time.time()
    save()
    return results_path


def _device() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"
