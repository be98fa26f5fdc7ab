"""Preprocessing into megatron IndexedDatasets and the pretraining data pipeline (tokenizer/preprocess.py, pretrain/data.py).

Real text: two halves of the embedded tinyshakespeare corpus (~3,600 paragraphs each), so every split of
"90,5,5" holds hundreds of documents (megatron spins forever on an empty split). Every test
that builds megatron datasets carries a timeout.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer import Tokenizer
from tokenizer.preprocess import main as preprocess_main
from tokenizer.preprocess import preprocess
from tokenizer.train import train_tokenizer

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
CORPUS = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare" / "input.txt"
SEQ = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer and two preprocessed prefixes (first / second half of the corpus)."""
    root = tmp_path_factory.mktemp("data")
    tok = train_tokenizer([CORPUS], root / "tok", vocab_size=512)
    text = CORPUS.read_text(encoding="utf-8")
    cut = text.index("\n\n", len(text) // 2)
    (root / "a.txt").write_text(text[:cut])
    (root / "b.txt").write_text(text[cut + 2:])
    preprocess(tok.path, [root / "a.txt"], root / "bin" / "a", num_proc=1, progress=False)
    preprocess(tok.path, [root / "b.txt"], root / "bin" / "b", num_proc=1, progress=False)
    return {"root": root, "tok": tok, "a": str(root / "bin" / "a"), "b": str(root / "bin" / "b")}


def _cfg(world, blend=None, **kw):
    from pretrain.data import DataConfig

    return DataConfig(blend=blend or [[1.0, world["a"]]], tokenizer=str(world["tok"].path), split="90,5,5",
                      cache_dir=str(world["root"] / "cache"), **kw).check_files()


def _build(world, seed=1234, num_samples=(3000, 64, 64), **kw):
    from pretrain.data import build_datasets

    return build_datasets(_cfg(world, **kw), seq_len=SEQ, seed=seed, num_samples=num_samples)


# --- preprocessing -------------------------------------------------------------------------------------


def test_bin_idx_equal_tokenized_documents_plus_eos(tmp_path, world):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = world["tok"]
    docs = ["First paragraph.\nWith two lines.", "Ünïcödé 🎉 second", "third " * 50]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"t": d, "x": 1}) + "\n" for d in docs))
    s = preprocess(tok.path, [tmp_path / "d.jsonl"], tmp_path / "d", text_key="t", progress=False)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 3 and s["documents"] == 3
    for i, d in enumerate(docs):
        assert ds[i].tolist() == tok.encode(d) + [tok.eos_id]
        assert tok.decode(ds[i][:-1]) == d
    assert s["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs) and ds[0].dtype == np.uint16


def test_real_corpus_num_proc_2_matches_1_and_skip_force(tmp_path, world):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, a_txt = world["tok"], world["root"] / "a.txt"
    s2 = preprocess(tok.path, [a_txt], tmp_path / "a2", num_proc=2, progress=False)
    one, two = IndexedDataset(world["a"]), IndexedDataset(str(tmp_path / "a2"))
    assert len(one) == len(two) == s2["documents"] > 3000
    assert np.array_equal(one.sequence_lengths, two.sequence_lengths)
    assert Path(world["a"] + ".bin").read_bytes() == (tmp_path / "a2.bin").read_bytes()
    # paragraph documents: the first one is the first speech, ending in EOS
    assert tok.decode(one[0][:-1]) == a_txt.read_text().split("\n\n")[0] and one[0][-1] == tok.eos_id
    mtime = (tmp_path / "a2.bin").stat().st_mtime_ns
    again = preprocess(tok.path, [a_txt], tmp_path / "a2", num_proc=2, progress=False)
    assert again["skipped"] and (tmp_path / "a2.bin").stat().st_mtime_ns == mtime
    redo = preprocess(tok.path, [a_txt], tmp_path / "a2", num_proc=1, force=True, progress=False)
    assert not redo["skipped"] and redo["tokens"] == s2["tokens"]
    with pytest.raises(FileExistsError, match="a2.bin.*other inputs.*--force"):
        preprocess(tok.path, [world["root"] / "b.txt"], tmp_path / "a2", progress=False)


def test_failed_write_leaves_nothing(tmp_path, world, monkeypatch):
    from megatron.core.datasets import indexed_dataset

    def boom(self, idx_path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        preprocess(world["tok"].path, [world["root"] / "a.txt"], tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_preprocess_cli_errors(tmp_path, world):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(SystemExit, match=r"bad\.txt.*not valid UTF-8"):
        preprocess_main(["--tokenizer", str(world["tok"].path), "--input", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"missing\.txt.*does not exist"):
        preprocess_main(["--tokenizer", str(world["tok"].path), "--input", str(tmp_path / "missing.txt"),
                         "--out", str(tmp_path / "o")])
    assert not list(tmp_path.glob("o*"))


def test_prepare_default_data_is_idempotent_and_concurrent_prepares_take_turns(tmp_path):
    """Two `python -m pretrain.data prepare` into one empty folder at once (two main jobs, parallel test workers):
    both succeed, one builds and the other finds its output up to date; a third run rebuilds nothing."""
    import subprocess
    import sys

    from pretrain.data import main as data_main
    from pretrain.data import prepare_default_data
    from tests.helpers.dist import REPO, base_env

    cmd = [sys.executable, "-m", "pretrain.data", "prepare", "--out", str(tmp_path / "art")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("up to date" in o for o in outs) == 1, outs
    cfg = prepare_default_data(tmp_path / "art")
    tok = Tokenizer(cfg.tokenizer)
    assert tok.vocab_size == tok.padded_vocab_size == 512 and cfg.blend == [[1.0, str(tmp_path / "art/data/shakespeare")]]
    side = json.loads(Path(cfg.blend[0][1] + ".json").read_text())
    assert side["documents"] == 7222 and side["tokens"] > 500_000
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "art").rglob("*.*"))]
    data_main(["prepare", "--out", str(tmp_path / "art")])  # second time: nothing rebuilt
    assert mtimes == [p.stat().st_mtime_ns for p in sorted((tmp_path / "art").rglob("*.*"))]


# --- data config ---------------------------------------------------------------------------------------


def test_config_validation(tmp_path, world):
    import shutil

    from pretrain.data import DataConfig

    cfg = _cfg(world, blend=[[0.3, world["a"]], [0.7, world["b"]]])
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for w in (0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="weight"):
            _cfg(world, blend=[[w, world["a"]]])
    with pytest.raises(ValueError, match=r"nowhere.*no .*\.bin.*tokenizer.preprocess"):
        _cfg(world, blend=[[1.0, str(tmp_path / "nowhere")]])
    # an .idx that belongs to another .bin
    shutil.copy(world["a"] + ".bin", tmp_path / "m.bin")
    shutil.copy(world["b"] + ".idx", tmp_path / "m.idx")
    with pytest.raises(ValueError, match=r"m\.idx does not match .*m\.bin.*--force"):
        _cfg(world, blend=[[1.0, str(tmp_path / "m")]])
    (tmp_path / "m.idx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"m\.idx is not a megatron"):
        _cfg(world, blend=[[1.0, str(tmp_path / "m")]])
    with pytest.raises(ValueError, match="split"):
        DataConfig(blend=[[1.0, world["a"]]], tokenizer=str(world["tok"].path), split="a,b")
    with pytest.raises(ValueError, match="twice"):
        _cfg(world, blend=[[1.0, world["a"]], [2.0, world["a"]]])
    with pytest.raises(ValueError, match="unknown data config fields"):
        DataConfig.from_dict({"blnd": []})


def test_prefix_from_another_tokenizer_is_refused(tmp_path, world):
    from pretrain.data import DataConfig, build_datasets

    other = train_tokenizer([world["root"] / "a.txt"], tmp_path / "other", vocab_size=400)
    preprocess(other.path, [world["root"] / "b.txt"], tmp_path / "o", progress=False)
    cfg = DataConfig(blend=[[1.0, str(tmp_path / "o")]], tokenizer=str(world["tok"].path), split="90,5,5")
    with pytest.raises(ValueError, match=r"o'.*another tokenizer.*--force"):
        build_datasets(cfg, seq_len=SEQ, seed=0, num_samples=(10, 1, 1))


@pytest.mark.timeout(120)
def test_tiny_split_is_refused_not_spun(tmp_path, world):
    from pretrain.data import DataConfig, build_datasets

    (tmp_path / "t.txt").write_text("\n\n".join(f"document number {i} with a few words" for i in range(10)))
    preprocess(world["tok"].path, [tmp_path / "t.txt"], tmp_path / "t", progress=False)
    cfg = DataConfig(blend=[[1.0, str(tmp_path / "t")]], tokenizer=str(world["tok"].path), split="98,1,1")
    with pytest.raises(ValueError, match=r"10 documents.*valid split 0 documents.*add documents"):
        build_datasets(cfg, seq_len=SEQ, seed=0, num_samples=(10, 1, 1))


# --- datasets and batches ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_samples_are_hf_causal_lm(world):
    train, valid, test = _build(world)
    assert len(train) == 3000 and len(valid) == 64 and len(test) == 64
    s = train[0]
    assert set(s) == {"input_ids", "labels"} and s["input_ids"].shape == (SEQ,) and s["input_ids"].dtype == torch.long
    assert torch.equal(s["labels"], s["input_ids"])  # no padding in a packed corpus: every label kept
    assert int(s["input_ids"].max()) < world["tok"].vocab_size
    assert world["tok"].eos_id in torch.cat([train[i]["input_ids"] for i in range(20)]).tolist()  # doc boundaries


def test_document_mask_adds_document_ids_and_the_trainer_passes_them(world):
    """data.document_mask: every sample carries `documents`, a new document after each EOS, batched with the rest;
    micro_step hands them to the model (the same samples and order as without)."""
    from pretrain.data import TrainBatches
    from pretrain.trainer import NanGuard, micro_step

    plain, _, _ = _build(world)
    train, _, _ = _build(world, document_mask=True)
    eos = world["tok"].eos_id
    bounds = 0
    for i in range(20):
        s = train[i]
        assert set(s) == {"input_ids", "labels", "documents"} and torch.equal(s["input_ids"], plain[i]["input_ids"])
        ids, docs = s["input_ids"], s["documents"]
        new = docs[1:] != docs[:-1]
        assert torch.equal(new, ids[:-1] == eos) and int(docs[0]) == 0
        bounds += int(new.sum())
    assert bounds > 0
    batch = next(iter(TrainBatches(train, micro_batch=2, dp_rank=0, dp_size=1)))
    assert batch["documents"].shape == batch["input_ids"].shape == (2, SEQ)

    seen = {}

    class Engine:  # records what the model would get
        device = torch.device("cpu")

        def __call__(self, ids, labels=None, num_steps=None, documents=None):
            seen["documents"] = documents
            return type("Out", (), {"loss": torch.tensor(float("nan"))})()

    micro_step(Engine(), batch, 4, NanGuard(max_consecutive=10))
    assert torch.equal(seen["documents"], batch["documents"])



def test_loss_mask_becomes_minus_100_on_the_next_label():
    from pretrain.data import HFSamples

    class Fake:  # megatron's sample layout: loss_mask[j] weighs predicting token j+1
        def __getitem__(self, i):
            return {"tokens": torch.arange(10, 16), "loss_mask": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])}

        def __len__(self):
            return 1

    assert HFSamples(Fake())[0]["labels"].tolist() == [10, 11, 12, -100, 14, -100]


@pytest.mark.timeout(120)
def test_blend_proportions_within_5_percent(world):
    from pretrain.data import stream_digest

    train, _, _ = _build(world, blend=[[0.25, world["a"]], [0.75, world["b"]]], num_samples=(4000, 64, 64))
    # the stream of a blend: a larger sample budget keeps its first samples (one pass over the data), another
    # weighting does not
    more, _, _ = _build(world, blend=[[0.25, world["a"]], [0.75, world["b"]]], num_samples=(4500, 64, 64))
    other, _, _ = _build(world, blend=[[0.5, world["a"]], [0.5, world["b"]]], num_samples=(4000, 64, 64))
    assert stream_digest(train, 3000) == stream_digest(more, 3000) != stream_digest(other, 3000)
    ids = np.array([train.megatron[i]["dataset_id"] for i in range(4000)])
    frac_b = float((ids == 1).mean())
    print(f"blend 0.25/0.75 -> fraction of prefix b over 4000 samples: {frac_b:.4f}")
    assert abs(frac_b - 0.75) < 0.05 * 0.75, frac_b
    # and over the first 1,000 samples too: blending is interleaved, not sorted
    assert abs(float((ids[:1000] == 1).mean()) - 0.75) < 0.05 * 0.75


@pytest.mark.timeout(120)
def test_same_seed_same_batches_and_resume(world):
    from pretrain.data import TrainBatches

    def take(ds, n, **kw):
        it = TrainBatches(ds, micro_batch=2, dp_rank=0, dp_size=1, **kw)
        return [next(it) for _ in range(n)], it

    t1, _, _ = _build(world, seed=7)
    t2, _, _ = _build(world, seed=7)
    t3, _, _ = _build(world, seed=8)
    b1, it1 = take(t1, 12)
    b2, _ = take(t2, 12)
    b3, _ = take(t3, 12)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b1, b2))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b1, b3))
    assert it1.consumed_samples == 24 and it1.state_dict() == {"consumed_samples": 24}
    # resume after 2 optimizer steps (8 micro batches = 16 samples) from a fresh build: batches 9.. follow
    resumed, it = take(t2, 4, consumed_samples=16)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
               for x, y in zip(resumed, b1[8:]))
    assert it.consumed_samples == 24
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        TrainBatches(t1, micro_batch=2, dp_rank=0, dp_size=1, consumed_samples=3)
    with pytest.raises(ValueError, match="dp_rank"):
        TrainBatches(t1, micro_batch=2, dp_rank=2, dp_size=2)
    # the stream's identity: the same for the same samples, other for another seed or another position
    from pretrain.data import sample_ids, stream_digest

    assert stream_digest(t1, 100) == stream_digest(t2, 100) != stream_digest(t3, 100)
    assert stream_digest(t1, 100) != stream_digest(t1, 99) and stream_digest(t1, 0) is None
    assert sample_ids(t1, [5, 5, 6]).shape == (3, 5) and (sample_ids(t1, [5])[0] == sample_ids(t2, [5])[0]).all()


@pytest.mark.timeout(120)
def test_data_parallel_slices_and_workers_and_eval(world):
    from pretrain.data import TrainBatches, eval_batches

    train, valid, _ = _build(world)
    whole = TrainBatches(train, micro_batch=4, dp_rank=0, dp_size=1)
    r0 = TrainBatches(train, micro_batch=2, dp_rank=0, dp_size=2, num_workers=1)
    r1 = TrainBatches(train, micro_batch=2, dp_rank=1, dp_size=2)
    for _ in range(5):
        w, a, b = next(whole), next(r0), next(r1)
        assert torch.equal(w["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))
    assert r0.consumed_samples == r1.consumed_samples == whole.consumed_samples == 20
    e0 = list(eval_batches(valid, 2, 0, 2, 3))
    e1 = list(eval_batches(valid, 2, 1, 2, 3))
    assert len(e0) == 3 and e0[0]["input_ids"].shape == (2, SEQ)
    assert torch.equal(e1[1]["input_ids"][0], valid[6]["input_ids"])  # batch 1, rank 1 -> samples 6, 7
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(e0, eval_batches(valid, 2, 0, 2, 3)))
    with pytest.raises(ValueError, match="eval needs 200 samples"):
        list(eval_batches(valid, 10, 0, 2, 10))


@pytest.mark.timeout(120)
def test_rewritten_prefix_does_not_reuse_stale_index_cache(tmp_path, world):
    from pretrain.data import DataConfig, build_datasets

    tok = world["tok"]
    cfg = dict(blend=[[1.0, str(tmp_path / "p")]], tokenizer=str(tok.path), split="90,5,5", cache_dir=str(tmp_path / "c"))
    first = {}
    for name in ("a", "b"):  # same prefix path, same seed, new content
        preprocess(tok.path, [world["root"] / f"{name}.txt"], tmp_path / "p", force=True, progress=False)
        train, _, _ = build_datasets(DataConfig(**cfg), seq_len=SEQ, seed=0, num_samples=(200, 8, 8))
        first[name] = torch.stack([train[i]["input_ids"] for i in range(50)])
    assert not torch.equal(first["a"], first["b"])
    # and they are what a fresh cache gives for b's content
    fresh, _, _ = build_datasets(DataConfig(**{**cfg, "cache_dir": str(tmp_path / "c2")}), seq_len=SEQ, seed=0,
                                 num_samples=(200, 8, 8))
    assert torch.equal(first["b"], torch.stack([fresh[i]["input_ids"] for i in range(50)]))


def _rank(rank, world, cache, q, gloo_file):
    import torch.distributed as dist

    from pretrain.data import DataConfig, build_datasets

    dist.init_process_group("gloo", init_method=f"file://{gloo_file}", rank=rank, world_size=2)
    cfg = DataConfig(blend=[[0.5, world["a"]], [0.5, world["b"]]], tokenizer=str(world["tok"].path),
                     split="90,5,5", cache_dir=cache)
    train, _, _ = build_datasets(cfg, seq_len=SEQ, seed=3, num_samples=(500, 32, 32))
    q.put((rank, train[123]["input_ids"].tolist()))
    q.put((f"seen_by_{rank}", sorted(p.name for p in Path(cache).glob("*.npy"))))
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_rank0_builds_cache_then_others_load(tmp_path, world):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    cache = str(tmp_path / "cache")
    procs = [ctx.Process(target=_rank, args=(r, world, cache, q, str(tmp_path / "pg"))) for r in (1, 0)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=150) for _ in range(4))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(got["seen_by_0"]) >= 7 and got["seen_by_1"] == got["seen_by_0"]  # rank 1 read rank 0's cache
    assert got[0] == got[1]


def test_train_batches_continue_past_the_last_sample():
    from pretrain.data import TrainBatches

    data = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(10)]
    b = TrainBatches(data, micro_batch=2, dp_rank=1, dp_size=2, consumed_samples=8)
    got = [next(b)["input_ids"].flatten().tolist() for _ in range(3)]
    assert got == [[0, 1], [4, 5], [8, 9]]  # samples 8..11 -> 10, 11 wrap to 0, 1 (rank 1 takes the second half)
    assert b.consumed_samples == 20 and b.epochs_completed == 2



