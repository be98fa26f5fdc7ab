"""Corpora in Hugging Face `datasets` formats and `--streaming` (tokenizer/io.py, preprocess.py, train.py).

Real text: a few hundred tinyshakespeare paragraphs (plus a Unicode one, one wrapped in newlines and a blank one, which
every format must drop), written as jsonl, parquet, arrow, a save_to_disk folder and a DatasetDict. The jsonl of the
same documents is the reference: every other format, and every --streaming run, must give its .bin/.idx byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tokenizer.preprocess import main as preprocess_main
from tokenizer.preprocess import preprocess
from tokenizer.train import main as train_main
from tokenizer.train import train_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare" / "input.txt"
SUFFIXES = (".bin", ".idx")


def _paragraphs() -> list[str]:
    paras = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paras[:300] + ["Ünïcödé — naïve café, 日本語 🎉", "\n\nwrapped in newlines\n", "  \n ", "last"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A tokenizer, the documents (train 240 / validation the rest) and the jsonl reference prefixes."""
    import datasets

    root = tmp_path_factory.mktemp("dsets")
    docs = _paragraphs()
    splits = {"train": docs[:240], "validation": docs[240:]}
    (root / "shakespeare.txt").write_text(CORPUS.read_text(encoding="utf-8")[:150_000])
    tok = train_tokenizer([root / "shakespeare.txt"], root / "tok", vocab_size=400)
    rows = {k: [{"body": d, "id": i} for i, d in enumerate(v)] for k, v in splits.items()}
    ref = {}
    for k, r in rows.items():
        (root / f"{k}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r))
        preprocess(tok.path, [root / f"{k}.jsonl"], root / "ref" / k, text_key="body", progress=False)
        ref[k] = root / "ref" / k
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(r) for k, r in rows.items()})
    dd.save_to_disk(str(root / "dict"), num_shards={"train": 2, "validation": 1})
    dd["train"].save_to_disk(str(root / "saved"), num_shards=2)
    (root / "arrow").mkdir()
    for f in sorted((root / "saved").glob("*.arrow")):  # the Arrow files as datasets writes them
        shutil.copy(f, root / "arrow" / f.name)
    dd["train"].to_parquet(str(root / "train.parquet"), batch_size=64)  # row groups of 64: several batches
    return {"root": root, "tok": tok, "splits": splits, "ref": ref}


def _same(a: Path, b: Path, suffixes=SUFFIXES) -> None:
    for s in suffixes:
        assert Path(f"{a}{s}").read_bytes() == Path(f"{b}{s}").read_bytes(), s


def _inputs(w, fmt: str) -> tuple[list[Path], dict, str]:
    """(inputs, preprocess kwargs, reference split) of one format holding the same documents as a jsonl."""
    r = w["root"]
    return {"parquet": ([r / "train.parquet"], {}, "train"),
            "arrow": (sorted((r / "arrow").glob("*.arrow")), {}, "train"),
            "arrow_folder": ([r / "arrow"], {}, "train"),
            "saved": ([r / "saved"], {}, "train"),
            "dict": ([r / "dict"], {}, "train"),
            "dict_validation": ([r / "dict"], {"split": "validation"}, "validation")}[fmt]


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "arrow_folder", "saved", "dict", "dict_validation"])
def test_each_format_equals_jsonl(tmp_path, w, fmt):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    inputs, kw, split = _inputs(w, fmt)
    s = preprocess(w["tok"].path, inputs, tmp_path / "p", text_key="body", progress=False, **kw)
    _same(tmp_path / "p", w["ref"][split])
    docs = [d.strip("\n") for d in w["splits"][split] if d.strip()]
    assert s["documents"] == len(IndexedDataset(str(tmp_path / "p"))) == len(docs)
    assert s["split"] == (kw.get("split", "train") if fmt.startswith("dict") else None)
    streamed = preprocess(w["tok"].path, inputs, tmp_path / "s", text_key="body", streaming=True, progress=False, **kw)
    _same(tmp_path / "s", w["ref"][split])
    assert streamed["streaming"] and streamed["input_sha256"] == s["input_sha256"]
    if fmt in ("saved", "dict", "dict_validation"):  # the hash covers the split's Arrow files only
        assert all(f.endswith(".arrow") and (split in f or fmt == "saved") for f in s["inputs"])


def test_saved_folder_is_left_as_it_was(tmp_path, w):
    before = sorted(p.name for p in (w["root"] / "saved").iterdir())
    preprocess(w["tok"].path, [w["root"] / "saved"], tmp_path / "p", text_key="body", num_proc=2, progress=False)
    assert sorted(p.name for p in (w["root"] / "saved").iterdir()) == before  # no datasets cache-*.arrow beside it


def test_streaming_equals_default_bit_for_bit(tmp_path, w):
    """A folder mixing a text file, a jsonl, a parquet and a saved dataset (one input at its sorted place)."""
    import pyarrow.parquet as pq

    src = tmp_path / "corpus"
    src.mkdir()
    shutil.copy(w["root"] / "shakespeare.txt", src / "a.txt")
    shutil.copy(w["root"] / "validation.jsonl", src / "b.jsonl")
    shutil.copytree(w["root"] / "saved", src / "c_saved")
    pq.write_table(pq.read_table(w["root"] / "train.parquet"), src / "d.parquet", row_group_size=50)
    tok = w["tok"].path
    ref = preprocess(tok, [src], tmp_path / "ref", text_key="body", progress=False)
    assert ref["inputs"][:2] == [str(src / "a.txt"), str(src / "b.jsonl")]
    assert ref["inputs"][-1] == str(src / "d.parquet")
    for n in (1, 2):
        s = preprocess(tok, [src], tmp_path / f"s{n}", text_key="body", streaming=True, num_proc=n, batch_size=16,
                       progress=False)
        _same(tmp_path / f"s{n}", tmp_path / "ref")
        assert (s["documents"], s["tokens"]) == (ref["documents"], ref["tokens"]) > (1000, 0)
    # the text file alone, one document per line: the text builder's sample_by, streamed the same
    a = preprocess(tok, [src / "a.txt"], tmp_path / "la", doc_boundary="line", progress=False)
    b = preprocess(tok, [src / "a.txt"], tmp_path / "lb", doc_boundary="line", streaming=True, num_proc=2,
                   batch_size=100, progress=False)
    _same(tmp_path / "lb", tmp_path / "la")
    assert a["documents"] == b["documents"] > 3000


def test_streaming_pairs_mask_and_pad_to(tmp_path, w):
    import datasets

    rows = [{"q": d[:40], "a": d[40:80], "n": i} for i, d in enumerate(w["splits"]["train"])]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"), batch_size=32)
    kw = dict(prompt_key="q", completion_key="a", pad_to=64, progress=False)
    ref = preprocess(w["tok"].path, [tmp_path / "qa.parquet"], tmp_path / "ref", **kw)
    s = preprocess(w["tok"].path, [tmp_path / "qa.parquet"], tmp_path / "s", streaming=True, num_proc=2,
                   batch_size=20, **kw)
    _same(tmp_path / "s", tmp_path / "ref", SUFFIXES + (".loss_mask.bin", ".loss_mask.idx"))
    assert (s["target_tokens"], s["pad_tokens"]) == (ref["target_tokens"], ref["pad_tokens"]) and ref["pad_tokens"] > 0
    # too long for pad_to: the same message (first document, how many in all) in both modes, nothing written
    msgs = []
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"document \d+ .*more than pad_to=16 \(\d+ documents in all") as e:
            preprocess(w["tok"].path, [tmp_path / "qa.parquet"], tmp_path / "o", streaming=streaming,
                       **dict(kw, pad_to=16))
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and not list(tmp_path.glob("o*"))


def test_train_streaming_gives_the_same_tokenizer(tmp_path, w):
    kw = dict(vocab_size=350, text_key="body")
    a = train_tokenizer([w["root"] / "train.parquet", w["root"] / "validation.jsonl"], tmp_path / "a", **kw)
    b = train_tokenizer([w["root"] / "train.parquet", w["root"] / "validation.jsonl"], tmp_path / "b", streaming=True,
                        **kw)
    pieces = [[(t.sp.id_to_piece(i), t.sp.get_score(i)) for i in range(t.vocab_size)] for t in (a, b)]
    assert pieces[0] == pieces[1]  # (the model files differ only in the temporary output path they record)
    assert a.meta["num_documents"] == b.meta["num_documents"] == len(_paragraphs()) - 1  # the blank one dropped
    assert a.source_sha256 == b.source_sha256
    # a DatasetDict split through the CLI
    train_main(["--input", str(w["root"] / "dict"), "--split", "validation", "--text-key", "body", "--vocab-size",
                "330", "--out", str(tmp_path / "c"), "--streaming"])
    meta = json.loads((tmp_path / "c" / "ressformer_tokenizer.json").read_text())
    assert meta["split"] == "validation" and meta["num_documents"] == len(w["splits"]["validation"]) - 1


def test_cli_streaming_split_and_help(tmp_path, w, capsys):
    preprocess_main(["--tokenizer", str(w["tok"].path), "--input", str(w["root"] / "dict"), "--split", "validation",
                     "--text-key", "body", "--out", str(tmp_path / "v"), "--streaming", "--num-proc", "2"])
    _same(tmp_path / "v", w["ref"]["validation"])
    for main in (preprocess_main, train_main):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        for word in ("parquet", "arrow", "save_to_disk", "--split", "--streaming", "--text-key",
                     "nothing is downloaded"):
            assert word in out, (main.__module__, word)


def test_reads_offline(tmp_path, w, monkeypatch):
    import datasets

    seen = []
    real = datasets.load_dataset

    def spy(*a, **kw):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return real(*a, **kw)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for streaming in (False, True):
        preprocess(w["tok"].path, [w["root"] / "train.parquet"], tmp_path / f"p{streaming}", text_key="body",
                   streaming=streaming, progress=False)
    assert seen == [True] * len(seen) and len(seen) >= 2
    assert datasets.config.HF_HUB_OFFLINE is False  # restored afterwards


def _bad(tmp_path: Path, case: str) -> tuple[list[Path], dict, str]:
    """(inputs, kwargs, message regex) of one bad input."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if case == "missing_column":
        pq.write_table(pa.table({"content": ["a", "b"], "id": [1, 2]}), tmp_path / "m.parquet")
        return [tmp_path / "m.parquet"], {}, (r"parquet file '.*m\.parquet' has no field 'text' "
                                              r"\(fields: \['content', 'id'\]\).*--text-key")
    if case == "missing_column_saved":
        datasets.Dataset.from_dict({"content": ["a"]}).save_to_disk(str(tmp_path / "sv"))
        return [tmp_path / "sv"], {}, r"saved dataset '.*sv' has no field 'text' \(fields: \['content'\]\).*--text-key"
    if case == "empty_parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "z.parquet")
        return [tmp_path / "z.parquet"], {}, r"parquet file '.*z\.parquet' holds no rows"
    if case == "empty_jsonl":
        (tmp_path / "z.jsonl").write_text("\n\n")
        return [tmp_path / "z.jsonl"], {}, r"json file '.*z\.jsonl' holds no rows"
    if case == "empty_arrow":
        (tmp_path / "z.arrow").write_bytes(b"")
        return [tmp_path / "z.arrow"], {}, r"z\.arrow' is empty"
    if case == "empty_saved":
        datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})
                                   ).save_to_disk(str(tmp_path / "ze"))
        return [tmp_path / "ze"], {}, r"saved dataset '.*ze' holds no rows"
    if case == "not_utf8_line":
        (tmp_path / "l.txt").write_bytes(b"fine\n\nstill fine\ncaf\xe9 au lait\n")
        return [tmp_path / "l.txt"], {}, r"l\.txt' is not valid UTF-8 on line 4 \(byte 20.*iconv"
    if case == "not_utf8_jsonl":
        (tmp_path / "l.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
        return [tmp_path / "l.jsonl"], {}, r"l\.jsonl' is not valid UTF-8 on line 2"
    if case == "null_parquet":
        pq.write_table(pa.table({"text": ["a", "b", None, "d"] * 30}), tmp_path / "n.parquet", row_group_size=50)
        return [tmp_path / "n.parquet"], {}, r"n\.parquet': field 'text' is missing or not a string in row 2 .*null"
    if case == "null_late_parquet":  # in the second row group: the row counts across batches
        pq.write_table(pa.table({"text": ["a"] * 70 + [None]}), tmp_path / "n.parquet", row_group_size=50)
        return [tmp_path / "n.parquet"], {}, r"n\.parquet': field 'text' is missing or not a string in row 70 "
    if case == "int_jsonl":
        (tmp_path / "i.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": 7}\n')
        return [tmp_path / "i.jsonl"], {}, r"i\.jsonl': field 'text' is missing or not a string in row 2 .*int '7'"
    if case == "int_saved":
        datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "si"))
        return [tmp_path / "si"], {}, r"saved dataset '.*si': field 'text' is missing or not a string in row 0 .*int"
    if case == "no_split":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
        return [tmp_path / "dd"], {"split": "test"}, r"'.*dd' has no split 'test' \(splits: \['train'\]\).*--split"
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')  # --split without a DatasetDict
    return [tmp_path / "x.jsonl"], {"split": "test"}, r"--split 'test'.*no input is one"


BAD = ["missing_column", "missing_column_saved", "empty_parquet", "empty_jsonl", "empty_arrow", "empty_saved",
       "not_utf8_line", "not_utf8_jsonl", "null_parquet", "null_late_parquet", "int_jsonl", "int_saved", "no_split",
       "split_without_dict"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_file_and_row(tmp_path, w, case):
    inputs, kw, match = _bad(tmp_path, case)
    before = sorted(tmp_path.rglob("*"))
    msgs = []
    for streaming in (False, True):
        with pytest.raises(ValueError, match=match) as e:
            preprocess(w["tok"].path, inputs, tmp_path / "out", streaming=streaming, progress=False, **kw)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]  # the same message whether streamed or not
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    with pytest.raises(ValueError, match=match):
        train_tokenizer(inputs, tmp_path / "tok", vocab_size=300, streaming=True, **kw)
    assert sorted(tmp_path.rglob("*")) == before


class _DyingEncoder:
    """Stands in for the tokenizer in a pool process: the process ends on the second batch (as if killed)."""

    def chunk(self, batch):
        import os

        if batch["text"][0] == "die":
            os._exit(9)
        return batch["text"]


@pytest.mark.timeout(120)
def test_a_dead_worker_ends_the_stream_not_hangs():
    from concurrent.futures.process import BrokenProcessPool

    from tokenizer.preprocess import _stream_chunks

    batches = [{"text": ["fine"]}, {"text": ["die"]}] + [{"text": ["fine"]}] * 6
    with pytest.raises(BrokenProcessPool):
        list(_stream_chunks(iter(batches), _DyingEncoder(), num_proc=2))
