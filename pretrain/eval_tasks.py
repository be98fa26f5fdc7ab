"""Downstream evaluation of a checkpoint: bench/paper's tasks (accuracy by input length) and lm-eval tasks.

    python -m pretrain.eval_tasks --model RUN_DIR|RUN_DIR/TAG|MODEL_DIR|HF_DIR --tasks paper:hops paper:noisy
        ressformer_shakespeare_next_line [--limit 100] [--num-steps K] [--device cpu|cuda] [--out FILE.json]
        [--out-dir RUN_DIR/eval_tasks] [--metrics RUN_DIR/metrics.jsonl]

Three callers: the trainer (run config `eval_tasks`, every `eval_tasks_every`-th checkpoint that holds the model
folder, on rank 0 while the other ranks wait), `slurm/eval_checkpoint.sh` (a separate job, so evaluation never holds
the training allocation) and a user at the command line.

Tasks
- `paper:NAME` or `paper:NAME@S1,S2`: a synthetic task of `bench.paper.tasks` (hops, set, table, reach, listops,
  noisy) at each setting of its sweep (hops: prompt length; default: the task's figure sweep), `limit` fresh examples
  per setting (generator seed 10,000 + the setting's index, as the paper suite's test sets). Exact match of the
  answer tokens after the prompt (`bench.paper.suite.score`: what greedy decoding would emit). Metrics
  `acc@SETTING` and their mean `acc`. The prompts go through the checkpoint's own tokenizer, so a model trained on
  other text scores near 0: the numbers mean something for runs trained on the paper mixture.
- Any other name: an lm-evaluation-harness task, found in `eval/tasks` (this repository's offline tasks) or in
  lm-eval's own registry (those download their data: offline they fail with lm-eval's message). `limit` documents
  per task (0: all). Metrics as lm-eval names them (`acc`, `acc_norm`, `word_perplexity`, ...; no stderr).
- Results are flat: `eval_tasks/<task>/<metric>`, with `step` (the checkpoint's) and `eval_tasks/seconds`. The
  trainer writes them to metrics.jsonl and wandb; `pretrain.plot` draws every `eval_tasks/*/acc`.

The model is read like `pretrain.evaluate` reads it (the checkpoint held against keep_last while it is read) and run
in eval mode, fp32, under no_grad, on `device`, with the K of `--num-steps` (default: the training K).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INCLUDE = REPO / "eval" / "tasks"
PAPER = "paper:"
TEST_SEED = 10_000  # the paper suite's test generator seeds: 10,000 + the setting's index (training uses 0..999)


def _bench_paper():
    if str(REPO) not in sys.path:  # bench/ lives in the repository, not in the installed packages
        sys.path.append(str(REPO))
    try:
        from bench.paper import suite, tasks
    except ImportError as e:
        raise ValueError(f"paper:* tasks need the repository's bench/paper package next to pretrain/ ({e})") from None
    return suite, tasks


def parse_paper(name: str) -> tuple[str, tuple[int, ...]]:
    """'paper:hops@48,96' -> ('hops', (48, 96)); 'paper:set' -> ('set', the task's figure sweep)."""
    _, tasks = _bench_paper()
    body = name[len(PAPER):]
    task, _, settings = body.partition("@")
    if task not in tasks.TASKS:
        raise ValueError(f"eval task {name!r}: no paper task {task!r}; choose one of "
                         f"{', '.join(PAPER + t for t in tasks.TASKS)}")
    if not settings:
        return task, tuple(tasks.TASKS[task].settings)
    try:
        values = tuple(int(s) for s in settings.split(","))
    except ValueError:
        raise ValueError(f"eval task {name!r}: settings after '@' are integers separated by commas, e.g. "
                         f"{PAPER}{task}@{','.join(str(s) for s in tasks.TASKS[task].settings)}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"eval task {name!r}: settings must be integers >= 0")
    return task, values


def _local_tasks() -> set[str]:
    """The task names of eval/tasks (each YAML's `task:`)."""
    names = set()
    for p in INCLUDE.glob("*.yaml"):
        for line in p.read_text().splitlines():
            if line.startswith("task:"):
                names.add(line.split(":", 1)[1].strip())
    return names


def _task_manager(names: list[str]):
    """lm-eval's TaskManager over eval/tasks, and over lm-eval's own registry only when a name is not local (indexing
    the registry's thousands of YAML files takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(INCLUDE), include_defaults=not set(names) <= _local_tasks())


def check_tasks(names: list[str]) -> None:
    """Raise ValueError naming every task that does not exist (paper tasks and lm-eval's registry + eval/tasks)."""
    lm = [n for n in names if not n.startswith(PAPER)]
    for n in names:
        if n.startswith(PAPER):
            parse_paper(n)
    if lm:
        try:
            known = set(_task_manager(lm).all_tasks)
        except ImportError:
            raise ValueError(f"eval tasks {lm} need lm-evaluation-harness (pip install -e '.[eval]')") from None
        missing = [n for n in lm if n not in known]
        if missing:
            local = sorted(_local_tasks())
            raise ValueError(f"eval tasks {missing}: not in lm-eval's registry nor in {INCLUDE} (local tasks: "
                             f"{', '.join(local)}; paper tasks: paper:NAME)")


def _tokenizer_dir(path: Path) -> Path:
    for d in (path / "tokenizer", path):
        if (d / "tokenizer.model").is_file():
            return d
    raise ValueError(f"{path} has no tokenizer (tokenizer/tokenizer.model): eval tasks need the checkpoint's "
                     f"tokenizer; train with data.tokenizer set, or evaluate an exported folder that has one")


def _hf_tokenizer(tok_dir: Path):
    """The transformers tokenizer an export of this checkpoint carries (pretrain.convert.write_tokenizer), built in
    memory."""
    from pretrain.convert import tokenizer_config
    from pretrain.hf.tokenization_ressformer import RessformerTokenizer

    cfg = tokenizer_config(tok_dir)
    kw = {k: v for k, v in cfg.items() if k not in ("tokenizer_class", "auto_map", "vocab_file")}
    return RessformerTokenizer(vocab_file=str(tok_dir / "tokenizer.model"),
                               meta_file=str(tok_dir / "ressformer_tokenizer.json"), **kw)


def load(path: str | Path, device: str = "cpu", trusted: bool = False):
    """(HF model in eval mode on `device`, transformers tokenizer, sentencepiece processor, the checkpoint's step).
    A run folder or tag is located and verified like `pretrain.convert` does (held against keep_last while it is
    read); `trusted`: `path` is a tag the calling job has just completed and hashed, whose model folder is read as
    it is (still held)."""
    import torch

    from pretrain.checkpoint.tags import reading, tag_step
    from pretrain.convert import _read, hf_model, opened
    from pretrain.evaluate import load_model
    from pretrain.model_dir import load_model_dir
    from ressformer.config import ModelConfig
    from tokenizer import Tokenizer

    p = Path(path)
    if (p / "config.json").is_file():  # an HF export
        tok_dir, step = _tokenizer_dir(p), None
        model = load_model(p, dtype=torch.float32)
    else:
        if trusted:
            with reading(p):
                cfg, sd = load_model_dir(p)
            folder = p
        else:
            with opened(p) as (folder, is_model):
                sd, mcfg, _ = _read(folder, is_model, False)
            cfg = ModelConfig.from_dict(mcfg)
        tok_dir, step = _tokenizer_dir(folder), tag_step(folder)
        model = hf_model(sd, cfg)
    return model.to(device).eval(), _hf_tokenizer(tok_dir), Tokenizer(tok_dir).sp, step


def run_paper(model, sp, name: str, limit: int, num_steps: int | None) -> dict:
    suite, tasks = _bench_paper()
    task, settings = parse_paper(name)
    out, accs = {}, []
    for i, s in enumerate(settings):
        res = suite.score(model, sp, tasks.generate(task, limit, TEST_SEED + i, s), num_steps=num_steps, batch=8)
        out[f"acc@{s}"] = res["acc"]
        accs.append(res["acc"])
    out["acc"] = sum(accs) / len(accs)
    return out


def run_lm_eval(model, tok, names: list[str], limit: int, num_steps: int | None, device: str) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if num_steps is not None:
        model.config.num_steps = num_steps
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=1, device=device)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(names), limit=limit or None, task_manager=_task_manager(names),
                                  log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    out = {}
    for task, metrics in res["results"].items():
        if task not in names:
            continue
        for key, v in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr") or metric in ("alias", "sample_len") or not isinstance(v, (int, float)):
                continue
            out.setdefault(task, {})[metric] = float(v)
    return out


def evaluate_tasks(path: str | Path, names: list[str], limit: int = 100, num_steps: int | None = None,
                   device: str = "cpu", trusted: bool = False) -> dict:
    """Run `names` on the checkpoint at `path` (`load`) -> {"step", "eval_tasks/<task>/<metric>": value, ...,
    "eval_tasks/seconds"}."""
    import torch

    t0 = time.monotonic()
    model, tok, sp, step = load(path, device, trusted)
    rec: dict = {"step": step}
    with torch.no_grad():
        for n in names:
            if n.startswith(PAPER):
                for m, v in run_paper(model, sp, n, limit or 100, num_steps).items():
                    rec[f"eval_tasks/{n}/{m}"] = v
        lm = [n for n in names if not n.startswith(PAPER)]
        if lm:
            for task, metrics in run_lm_eval(model, tok, lm, limit, num_steps, device).items():
                for m, v in metrics.items():
                    rec[f"eval_tasks/{task}/{m}"] = v if math.isfinite(v) else None
    rec["eval_tasks/seconds"] = round(time.monotonic() - t0, 3)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.eval_tasks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="run folder (newest usable tag), checkpoint tag, model folder or "
                                                   "Hugging Face export")
    ap.add_argument("--tasks", nargs="+", required=True, help="paper:NAME[@S1,S2] and lm-eval task names")
    ap.add_argument("--limit", type=int, default=100, help="examples per lm-eval task and per paper-task setting "
                                                          "(0: all of lm-eval's; 100 for paper tasks)")
    ap.add_argument("--num-steps", type=int, default=None, help="recurrent steps K (default: the training K)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    ap.add_argument("--out", default=None, help="write the results (one JSON object) here")
    ap.add_argument("--out-dir", default=None, help="write the results to OUT_DIR/<checkpoint tag>.json")
    ap.add_argument("--metrics", default=None, help="append the results as one record to this metrics.jsonl (the "
                                                    "run's own: pretrain.plot then draws them)")
    a = ap.parse_args(argv)
    import torch

    from pretrain.checkpoint.ds_recovery import CheckpointError
    from pretrain.model_dir import ModelDirError

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if a.limit < 0:
            raise ValueError(f"--limit {a.limit}: must be >= 0")
        check_tasks(a.tasks)
        rec = evaluate_tasks(a.model, a.tasks, a.limit, a.num_steps, device)
    except (ValueError, FileNotFoundError, CheckpointError, ModelDirError) as e:  # each names the file or the fix
        print(f"[eval_tasks] error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(rec)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rec, indent=2) + "\n")
    if a.out_dir:
        from pretrain.checkpoint.tags import tag_name

        name = tag_name(rec["step"]) if rec["step"] is not None else Path(a.model).resolve().name
        out = Path(a.out_dir) / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec, indent=2) + "\n")
        print(f"[eval_tasks] {out}", file=sys.stderr)
    if a.metrics:
        with open(a.metrics, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
