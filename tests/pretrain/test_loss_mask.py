"""Completion-only training: prompt/completion preprocessing, loss-mask IndexedDatasets, masked labels in build_datasets.

A synthetic task (prompt: a few words, completion: a marker and the prompt's first word), 360 + 300 examples in two
jsonl files, so every split of "90,5,5" holds documents (megatron spins forever on an empty split). Every
test that builds megatron datasets carries a timeout.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer.preprocess import main as preprocess_main
from tokenizer.preprocess import preprocess
from tokenizer.train import train_tokenizer

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
SEQ = 32
MARK = "<ans>"
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "honey", "ocean", "pepper", "violet", "copper", "lantern",
         "meadow", "falcon", "silver", "thunder", "orchid", "pebble", "harbor", "willow")


def _examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 7)))]
        prompt, completion = "first of: " + " ".join(words), f" {MARK} {words[0]}"
        out.append({"q": prompt, "a": completion, "text": prompt + completion})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tokenizer trained on the task text and two prompt/completion prefixes padded to SEQ."""
    root = tmp_path_factory.mktemp("task")
    rows = {"a": _examples(360, 0), "b": _examples(300, 1)}
    files = {k: _write(root / f"{k}.jsonl", v) for k, v in rows.items()}
    tok = train_tokenizer(list(files.values()), root / "tok", vocab_size=400, user_symbols=(MARK,))
    for k, f in files.items():
        preprocess(tok.path, [f], root / "bin" / k, prompt_key="q", completion_key="a", pad_to=SEQ, progress=False)
    return {"root": root, "tok": tok, "rows": rows, "files": files, **{k: str(root / "bin" / k) for k in rows}}


def _expected(tok, row: dict, pad_to: int = SEQ) -> tuple[list[int], list[int]]:
    """(tokens, mask) of one example: encode(prompt) + encode(completion) + [eos] + pads; mask 1 on completion + eos."""
    p, c = tok.encode(row["q"]), tok.encode(row["a"])
    n_pad = pad_to - len(p) - len(c) - 1
    return p + c + [tok.eos_id] + [tok.pad_id] * n_pad, [0] * len(p) + [1] * (len(c) + 1) + [0] * n_pad


def _build(task, blend, seed=0, num_samples=(200, 10, 10), cache="cache"):
    from pretrain.data import DataConfig, build_datasets

    cfg = DataConfig(blend=blend, tokenizer=str(task["tok"].path), split="90,5,5", cache_dir=str(task["root"] / cache))
    return build_datasets(cfg, seq_len=SEQ, seed=seed, num_samples=num_samples)


# --- preprocessing -------------------------------------------------------------------------------------


def test_tokens_and_mask_are_prompt_completion_eos_pads(task):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = task["tok"]
    assert tok.encode(MARK) == [tok.sp.piece_to_id(MARK)]  # the marker is one piece
    for k in ("a", "b"):
        toks, mask = IndexedDataset(task[k]), IndexedDataset(task[k] + ".loss_mask")
        assert len(toks) == len(mask) == len(task["rows"][k])
        assert np.array_equal(toks.sequence_lengths, mask.sequence_lengths) and set(toks.sequence_lengths) == {SEQ}
        assert mask[0].dtype == np.uint8
        for i, row in enumerate(task["rows"][k]):
            want_tokens, want_mask = _expected(tok, row)
            assert toks[i].tolist() == want_tokens and mask[i].tolist() == want_mask, (k, i)
        side = json.loads(Path(task[k] + ".json").read_text())
        assert (side["prompt_key"], side["completion_key"], side["pad_to"]) == ("q", "a", SEQ)
        assert side["target_tokens"] == sum(int(mask[i].sum()) for i in range(len(mask)))
        assert side["pad_tokens"] == sum(_expected(tok, r)[0].count(tok.pad_id) for r in task["rows"][k]) > 0


def test_example_longer_than_pad_to_is_refused(tmp_path, task):
    rows = _examples(5, 2)
    rows[3]["q"] = "first of: " + " ".join(["thunder"] * 40)
    n = len(task["tok"].encode(rows[3]["q"])) + len(task["tok"].encode(rows[3]["a"])) + 1
    with pytest.raises(ValueError, match=rf"document 3 .*has {n} tokens.*pad_to={SEQ}.*1 documents in all"):
        preprocess(task["tok"].path, [_write(tmp_path / "long.jsonl", rows)], tmp_path / "o", prompt_key="q",
                   completion_key="a", pad_to=SEQ, progress=False)
    assert not list(tmp_path.glob("o*"))


def test_rerun_with_other_options_is_not_skipped(tmp_path, task):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, src, out = task["tok"], task["files"]["b"], tmp_path / "p"
    kw = dict(prompt_key="q", completion_key="a", pad_to=SEQ, progress=False)
    preprocess(tok.path, [src], out, **kw)
    assert preprocess(tok.path, [src], out, **kw)["skipped"]
    for other in (dict(kw, pad_to=SEQ + 8), dict(kw, prompt_key="text"), dict(progress=False, text_key="text")):
        with pytest.raises(FileExistsError, match="other inputs, tokenizer or options.*--force"):
            preprocess(tok.path, [src], out, **other)
    wider = preprocess(tok.path, [src], out, **dict(kw, pad_to=SEQ + 8), force=True)
    assert not wider["skipped"] and set(IndexedDataset(str(out) + ".loss_mask").sequence_lengths) == {SEQ + 8}
    # a mask file gone missing: not up to date either
    Path(f"{out}.loss_mask.idx").unlink()
    with pytest.raises(FileExistsError):
        preprocess(tok.path, [src], out, **dict(kw, pad_to=SEQ + 8))
    # plain text over the same prefix: the stale mask goes with the old tokens; --pad-to without keys pads only
    plain = preprocess(tok.path, [src], out, text_key="text", pad_to=SEQ, force=True, progress=False)
    assert not list(tmp_path.glob("p.loss_mask*")) and plain["pad_to"] == SEQ and plain["prompt_key"] is None
    ds = IndexedDataset(str(out))
    assert ds[0].tolist() == tok.encode(task["rows"]["b"][0]["text"]) + [tok.eos_id] + [tok.pad_id] * (
        SEQ - len(tok.encode(task["rows"]["b"][0]["text"])) - 1)


def test_failed_write_leaves_nothing(tmp_path, task, monkeypatch):
    from megatron.core.datasets import indexed_dataset

    real = indexed_dataset.IndexedDatasetBuilder.finalize

    def second_fails(self, idx_path):  # the token index is written, the mask index fails
        if ".loss_mask" in idx_path:
            raise RuntimeError("disk full")
        real(self, idx_path)

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", second_fails)
    with pytest.raises(RuntimeError, match="disk full"):
        preprocess(task["tok"].path, [task["files"]["a"]], tmp_path / "x", prompt_key="q", completion_key="a",
                   progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_num_proc_2_matches_the_fixture(tmp_path, task):
    tok, src = str(task["tok"].path), str(task["files"]["a"])
    preprocess_main(["--tokenizer", tok, "--input", src, "--out", str(tmp_path / "c"), "--prompt-key", "q",
                     "--completion-key", "a", "--pad-to", str(SEQ), "--num-proc", "2"])
    for suffix in (".bin", ".idx", ".loss_mask.bin", ".loss_mask.idx"):
        assert (tmp_path / f"c{suffix}").read_bytes() == Path(task["a"] + suffix).read_bytes(), suffix
    with pytest.raises(SystemExit, match=r"document \d+ .*pad_to=8"):
        preprocess_main(["--tokenizer", tok, "--input", src, "--out", str(tmp_path / "d"), "--prompt-key", "q",
                         "--completion-key", "a", "--pad-to", "8"])
    with pytest.raises(SystemExit, match="give both"):
        preprocess_main(["--tokenizer", tok, "--input", src, "--out", str(tmp_path / "d"), "--prompt-key", "q"])
    with pytest.raises(SystemExit, match=r"no field 'answer'.*--completion-key"):
        preprocess_main(["--tokenizer", tok, "--input", src, "--out", str(tmp_path / "d"), "--prompt-key", "q",
                         "--completion-key", "answer"])
    assert not list(tmp_path.glob("d*"))


# --- datasets ------------------------------------------------------------------------------------------


def _check_samples(task, dataset, n):
    """Every sample is one whole example; labels are its tokens on completion + EOS and -100 elsewhere."""
    tok = task["tok"]
    by_tokens = {}
    for k in ("a", "b"):
        for row in task["rows"][k]:
            t, m = _expected(tok, row)
            by_tokens[tuple(t)] = (row, m)
    for i in range(n):
        s = dataset[i]
        ids, labels = s["input_ids"], s["labels"]
        row, mask = by_tokens[tuple(ids.tolist())]  # KeyError: the window is not exactly one example
        assert ids[:len(tok.encode(row["q"]))].tolist() == tok.encode(row["q"])
        want = torch.where(torch.tensor(mask) == 1, ids, torch.full_like(ids, -100))
        assert torch.equal(labels, want), (i, labels.tolist(), want.tolist())
        assert tok.decode(labels[labels != -100][:-1].tolist()) == row["a"] and labels[labels != -100][-1] == tok.eos_id


@pytest.mark.timeout(120)
def test_samples_train_on_completions_only(task):
    train, valid, test = _build(task, [[1.0, task["a"]]])
    assert len(train) == 200 and len(valid) == len(test) == 10
    _check_samples(task, train, 200)
    _check_samples(task, valid, 10)
    _check_samples(task, test, 10)
    # a blend of two masked prefixes (megatron's BlendedDataset): the masks follow the blend too
    train, valid, _ = _build(task, [[0.5, task["a"]], [0.5, task["b"]]], seed=3, num_samples=(300, 10, 10))
    assert {int(train.megatron[i]["dataset_id"]) for i in range(300)} == {0, 1}
    _check_samples(task, train, 300)
    _check_samples(task, valid, 10)


@pytest.mark.timeout(120)
def test_pad_to_without_mask_keeps_pads_out_of_the_loss(tmp_path, task):
    tok = task["tok"]
    preprocess(tok.path, [task["files"]["a"]], tmp_path / "plain", text_key="text", pad_to=SEQ, progress=False)
    train, _, _ = _build(task, [[1.0, str(tmp_path / "plain")]], cache=str(tmp_path / "c"))
    for i in range(50):
        ids, labels = train[i]["input_ids"], train[i]["labels"]
        n = int((ids != tok.pad_id).sum())  # one text document + EOS, then pads
        assert ids[n - 1] == tok.eos_id and (ids[n:] == tok.pad_id).all()
        assert labels[:n].tolist() == ids[:n].tolist() and (labels[n:] == -100).all()


@pytest.mark.timeout(120)
def test_mismatched_mask_is_refused(tmp_path, task):
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(task["a"] + suffix, tmp_path / f"m{suffix}")
    for suffix in (".bin", ".idx"):  # b's mask (300 documents) next to a's tokens (360)
        shutil.copy(task["b"] + ".loss_mask" + suffix, tmp_path / f"m.loss_mask{suffix}")
    with pytest.raises(ValueError, match=r"m\.loss_mask\.idx does not match .*m\.idx \(300 vs 360 documents.*--force"):
        _build(task, [[1.0, str(tmp_path / "m")]], cache=str(tmp_path / "c"))
    # same document count, other lengths: a's mask padded to SEQ + 8
    preprocess(task["tok"].path, [task["files"]["a"]], tmp_path / "w", prompt_key="q", completion_key="a", pad_to=SEQ + 8,
               progress=False)
    for suffix in (".bin", ".idx"):
        shutil.copy(tmp_path / f"w.loss_mask{suffix}", tmp_path / f"m.loss_mask{suffix}")
    with pytest.raises(ValueError, match=r"m\.loss_mask\.idx does not match .*m\.idx \(360 vs 360 documents, or other"):
        _build(task, [[1.0, str(tmp_path / "m")]], cache=str(tmp_path / "c"))
    (tmp_path / "m.loss_mask.idx").unlink()  # a mask .bin without its .idx
    with pytest.raises(ValueError, match=r"m\.loss_mask.*\.idx does not exist"):
        _build(task, [[1.0, str(tmp_path / "m")]], cache=str(tmp_path / "c"))


@pytest.mark.timeout(120)
def test_mixed_blend_is_refused(tmp_path, task):
    preprocess(task["tok"].path, [task["files"]["b"]], tmp_path / "plain", text_key="text", progress=False)
    plain = str(tmp_path / "plain")
    with pytest.raises(ValueError, match=rf"mixes .*\['{plain}'\] have no .loss_mask.*--prompt-key/--completion-key"):
        _build(task, [[0.5, task["a"]], [0.5, plain]], cache=str(tmp_path / "c"))
