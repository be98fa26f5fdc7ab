"""Held-out perplexity (pretrain/evaluate.py) and lm-eval on the local tasks (eval/tasks), on a tiny exported model.

The data is a megatron IndexedDataset made here from the held-out passages of eval/tasks/data with our
tokenizer (one EOS per document, as the preprocessing writes). Perplexity is checked against a direct
computation with the training model; the lm-eval run is offline (HF_*_OFFLINE=1) with --limit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.convert import export_hf
from pretrain.evaluate import document_range, load_tokens, perplexity, used_num_steps
from ressformer import build_model
from ressformer.config import ModelConfig
from ressformer.selection import document_ids

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "tinyshakespeare" / "input.txt"
HELDOUT = REPO / "eval" / "tasks" / "data" / "shakespeare_heldout.jsonl"


def offline_env(tmp: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_DATASETS_CACHE=str(tmp / "ds_cache"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(exported HF dir, training model, data prefix, tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    tok = train_tokenizer([CORPUS], root / "tok", vocab_size=512, num_threads=2)
    docs = [json.loads(x)["text"] for x in HELDOUT.read_text().splitlines()]
    prefix = str(root / "heldout")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        arr = np.asarray(tok.encode(d) + [tok.eos_id], dtype=np.uint16)
        b.add_document(arr, [arr.size])
    b.finalize(prefix + ".idx")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("debug")).eval()
    hf = export_hf(model.state_dict(), model.config, root / "hf", tokenizer_dir=root / "tok")
    return hf, model, prefix, docs, tok


def test_document_range_follows_megatron_split():
    assert document_range(1000, "949,50,1", "train") == (0, 949)
    assert document_range(1000, "949,50,1", "valid") == (949, 999)
    assert document_range(1000, "949,50,1", "test") == (999, 1000)
    assert document_range(7, "949,50,1", "all") == (0, 7)
    with pytest.raises(ValueError, match="no document"):
        document_range(10, "949,50,1", "test")


def test_perplexity_matches_direct_computation_and_cli(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, model, prefix, docs, tok = setup
    toks = load_tokens(prefix, part="all", max_tokens=700)
    expect = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs])[:700]
    assert np.array_equal(toks, expect)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    res = perplexity(hf, toks, seq_len=128, batch_size=3, num_steps=2)
    # direct: every window separately through the training model, summed NLL
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(toks), 128):
            w = torch.from_numpy(toks[i:i + 128])[None]
            if w.shape[1] < 2:
                continue
            lp = torch.log_softmax(model(w, num_steps=2).logits[0, :-1].double(), -1)
            nll -= lp.gather(-1, w[0, 1:, None]).sum().item()
            n += w.shape[1] - 1
    assert res["tokens"] == n == 700 - math.ceil(700 / 128)
    assert res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert 100 < res["ppl"] < 2000  # random init over 512 pieces: near the vocabulary size

    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--model", str(hf_dir), "--data", prefix,
                        "--max-tokens", "700", "--seq-len", "128", "--num-steps", "2", "--out", str(out)],
                       cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cli = json.loads(out.read_text())
    assert cli["ppl"] == pytest.approx(res["ppl"], rel=1e-6) and cli["tokens"] == n
    assert cli["num_steps"] == 2
    # --document-mask: each window scored with the documents its EOS tokens delimit (the model's `documents`)
    masked = perplexity(hf, toks, seq_len=128, batch_size=3, num_steps=2, eos_id=tok.eos_id)
    nll = 0.0
    with torch.no_grad():
        for i in range(0, len(toks), 128):
            w = torch.from_numpy(toks[i:i + 128])[None]
            if w.shape[1] >= 2:
                docs = document_ids(w, tok.eos_id)
                lp = torch.log_softmax(model(w, num_steps=2, documents=docs).logits[0, :-1].double(), -1)
                nll -= lp.gather(-1, w[0, 1:, None]).sum().item()
    assert masked["tokens"] == n and masked["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert abs(masked["ppl"] - res["ppl"]) > 1e-3 * res["ppl"]  # the windows hold several documents
    p = subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--model", str(hf_dir), "--data", prefix,
                        "--max-tokens", "700", "--seq-len", "128", "--num-steps", "2", "--document-mask"],
                       cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cli = json.loads(p.stdout.strip().splitlines()[-1])
    assert cli["document_mask"] and cli["ppl"] == pytest.approx(masked["ppl"], rel=1e-6)
    assert hf.config.num_steps is None and used_num_steps(hf.config, None) == model.config.r2mu.steps == 4
    assert used_num_steps(hf.config, 6) == 6
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokens(str(tmp_path / "nope"))
    # a checkpoint tag's model folder scores the same, without an export
    from pretrain.model_dir import save_model_dir

    tag = save_model_dir(tmp_path / "run" / "step_00000004", model.state_dict(), model.config)
    (tag / "COMPLETE").write_text("1\n")
    p = subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--model", str(tmp_path / "run"), "--data", prefix,
                        "--max-tokens", "700", "--seq-len", "128", "--num-steps", "2"],
                       cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "step_00000004" in p.stderr, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(res["ppl"], rel=1e-6)


def test_lm_eval_rolling_loglikelihood_starts_after_eos(setup):
    """lm-eval's HFLM, default arguments, on the export: windows are prefixed with EOS (the export's BOS), as
    pretraining documents follow an EOS; the result equals the sum of log-probs computed by hand."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf_dir, model, _, docs, tok = setup
    lm = HFLM(pretrained=str(hf_dir), trust_remote_code=True, device="cpu", batch_size=1)
    assert lm.prefix_token_id == tok.eos_id == lm.tokenizer.bos_token_id == lm.tokenizer.eos_token_id
    text = docs[0][:150]
    ids = tok.encode(text)
    assert lm.tok_encode(text) == ids and 1 < len(ids) < lm.max_length  # one window
    [got] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    x = torch.tensor([[tok.eos_id] + ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
    assert got == pytest.approx(lp.gather(-1, x[0, 1:, None]).sum().item(), rel=1e-5)


def test_eval_tasks_paper_task_on_a_checkpoint_tag_and_bad_names(setup, tmp_path):
    """pretrain.eval_tasks on a run folder's tag: the paper task's accuracy by setting equals bench/paper's scoring
    of the training model on the same examples; the CLI writes the result file and a metrics record; unknown tasks
    and malformed settings are named."""
    from bench.paper.suite import score
    from bench.paper.tasks import generate
    from pretrain.eval_tasks import TEST_SEED, check_tasks, evaluate_tasks, parse_paper
    from pretrain.model_dir import save_model_dir

    _, model, _, _, tok = setup
    run = tmp_path / "run"
    tag = save_model_dir(run / "step_00000004", model.state_dict(), model.config, tokenizer_dir=tok.path)
    (tag / "COMPLETE").write_text("1\n")
    rec = evaluate_tasks(run, ["paper:set@6,8"], limit=6, num_steps=2)
    for i, s in enumerate((6, 8)):
        direct = score(model, tok.sp, generate("set", 6, TEST_SEED + i, s), num_steps=2)["acc"]
        assert rec[f"eval_tasks/paper:set@6,8/acc@{s}"] == direct
    assert rec["step"] == 4 and rec["eval_tasks/seconds"] > 0
    assert rec["eval_tasks/paper:set@6,8/acc"] == pytest.approx(
        (rec["eval_tasks/paper:set@6,8/acc@6"] + rec["eval_tasks/paper:set@6,8/acc@8"]) / 2)
    assert parse_paper("paper:hops") == ("hops", (96, 192, 384, 768))
    with pytest.raises(ValueError, match="no paper task 'nope'.*paper:hops"):
        check_tasks(["paper:nope"])
    with pytest.raises(ValueError, match="integers separated by commas"):
        check_tasks(["paper:hops@x"])
    with pytest.raises(ValueError, match=r"\['no_such_task'\]: not in lm-eval's registry.*ressformer_shakespeare_ppl"):
        check_tasks(["ressformer_shakespeare_next_line", "no_such_task"])

    metrics = run / "metrics.jsonl"
    p = subprocess.run([sys.executable, "-m", "pretrain.eval_tasks", "--model", str(run), "--tasks", "paper:table@3",
                        "--limit", "4", "--out-dir", str(run / "eval_tasks"), "--metrics", str(metrics)],
                       cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = json.loads((run / "eval_tasks" / "step_00000004.json").read_text())
    assert json.loads(metrics.read_text().splitlines()[-1]) == saved and "eval_tasks/paper:table@3/acc" in saved
    p = subprocess.run([sys.executable, "-m", "pretrain.eval_tasks", "--model", str(run), "--tasks", "paper:nope"],
                       cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no paper task 'nope'" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lm_eval_offline_on_local_tasks(setup, tmp_path):
    hf_dir = setup[0]
    lm_eval = Path(sys.executable).parent / "lm-eval"
    cmd = [str(lm_eval), "run", "--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True",
           "--trust_remote_code", "--include_path", str(REPO / "eval" / "tasks"),
           "--tasks", "ressformer_shakespeare_ppl", "ressformer_shakespeare_next_line",
           "--limit", "3", "--batch_size", "1", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert files, p.stdout[-2000:]
    res = json.loads(files[0].read_text())["results"]
    ppl = res["ressformer_shakespeare_ppl"]
    mc = res["ressformer_shakespeare_next_line"]
    assert 1 < ppl["byte_perplexity,none"] < 1e3 and ppl["word_perplexity,none"] > 1
    assert 0 <= mc["acc,none"] <= 1
    # pretrain.eval_tasks (the trainer's eval_tasks) runs the same tasks in memory, with the tokenizer built from the
    # checkpoint's sentencepiece folder instead of the export's files: the same numbers
    from pretrain.eval_tasks import evaluate_tasks

    rec = evaluate_tasks(hf_dir, ["ressformer_shakespeare_ppl", "ressformer_shakespeare_next_line"], limit=3)
    for task, metric in (("ressformer_shakespeare_ppl", "word_perplexity"), ("ressformer_shakespeare_ppl",
                         "byte_perplexity"), ("ressformer_shakespeare_next_line", "acc"),
                         ("ressformer_shakespeare_next_line", "acc_norm")):
        assert rec[f"eval_tasks/{task}/{metric}"] == pytest.approx(res[task][f"{metric},none"], rel=1e-6), metric
