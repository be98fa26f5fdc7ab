"""Tokenizer training and the `Tokenizer` wrapper (tokenizer/train.py, tokenizer/tokenizer.py, tokenizer/io.py).

Real text: the embedded tinyshakespeare corpus; bad inputs are small files made in tmp_path.
Each bad input must fail with an error naming the file and must leave no output folder behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenizer import META_FILE, MODEL_FILE, Tokenizer, pad_vocab
from tokenizer.train import main as train_main
from tokenizer.train import train_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "shakespeare"
    return train_tokenizer([CORPUS], out, vocab_size=512, user_symbols=("<|sep|>",), num_threads=2)


def test_default_corpus_ships_with_repo():
    assert CORPUS.is_file() and CORPUS.stat().st_size > 1_000_000
    assert CORPUS.read_text(encoding="utf-8").startswith("First Citizen:")


def test_sizes_and_special_ids(tok):
    assert tok.vocab_size == 512 and tok.padded_vocab_size == 512  # the debug preset's vocab_size
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert pad_vocab(513) == 576 and pad_vocab(64) == 64 and pad_vocab(1) == 64
    meta = json.loads((tok.path / META_FILE).read_text())
    assert meta["vocab_size"] == 512 and meta["eos_id"] == 3 and meta["model_type"] == "bpe"
    assert len(meta["source_sha256"]) == 64 and meta["num_documents"] > 7000  # blank-line paragraphs
    assert sorted(p.name for p in tok.path.iterdir()) == sorted([MODEL_FILE, META_FILE])  # no tokenizer.json
    assert not list(tok.path.parent.glob(".*tmp-*"))  # temp folder renamed away


def test_round_trip_real_text_unicode_and_byte_fallback(tok):
    text = CORPUS.read_text(encoding="utf-8")[:20_000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 1.5 < len(text) / len(ids) < 6  # it learned merges: fewer tokens than characters
    assert tok.unk_id not in ids
    odd = "Ünïcödé — naïve café, 日本語, emoji 🎉\n\ttabs  and   spaces\n"
    ids = tok.encode(odd)
    assert tok.decode(ids) == odd and tok.unk_id not in ids
    pieces = [tok.id_to_piece(i) for i in ids]
    # 🎉 is F0 9F 8E 89 in UTF-8 and never occurs in Shakespeare: it must come out as its 4 byte pieces
    assert ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"] == pieces[pieces.index("<0xF0>"):pieces.index("<0xF0>") + 4]
    assert tok.encode("a<|sep|>b").count(tok.sp.piece_to_id("<|sep|>")) == 1  # user symbol never split


def test_bos_eos_and_batch(tok):
    texts = ["To be, or not to be", "", "KING RICHARD III:\nNow is the winter"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    ids = tok.encode(texts[0], add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1:-1] == tok.encode(texts[0])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([600])


def test_json_parquet_inputs_and_unigram(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()][:1500]
    src = tmp_path / "corpus"
    src.mkdir()
    jl = src / "a.jsonl"
    jl.write_text("".join(json.dumps({"body": p, "id": i}) + "\n" for i, p in enumerate(paras[:800])))
    pq.write_table(pa.table({"body": paras[800:]}), src / "b.parquet")
    t = train_tokenizer([jl, src / "b.parquet"], tmp_path / "tok", vocab_size=400, model_type="unigram",
                        text_key="body")
    assert t.vocab_size == 400 and t.padded_vocab_size == 448 and t.meta["model_type"] == "unigram"
    assert t.meta["num_documents"] == 1500
    assert t.decode(t.encode(paras[3])) == paras[3]
    # a folder input finds both files (sorted) and gives the same source hash
    t2 = train_tokenizer([src], tmp_path / "tok2", vocab_size=400, model_type="unigram", text_key="body")
    assert t2.source_sha256 == t.source_sha256
    # a folder that also holds a tokenizer and a preprocessed prefix: only the corpus files are read
    (src / "tok").mkdir()
    for f in t.path.iterdir():
        (src / "tok" / f.name).write_bytes(f.read_bytes())
    (src / "p.idx").write_bytes(b"x")
    (src / "p.json").write_text("{}")
    t3 = train_tokenizer([src], tmp_path / "tok3", vocab_size=400, model_type="unigram", text_key="body")
    assert t3.source_sha256 == t.source_sha256


def _no_output(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("case", ["missing", "empty", "not_utf8", "too_small", "json_key", "json_row", "ext"])
def test_bad_inputs_name_file_and_fix(tmp_path, case):
    out = tmp_path / "out" / "tok"
    out.parent.mkdir()
    if case == "missing":
        path, match = tmp_path / "nope.txt", r"nope\.txt.*does not exist"
    elif case == "empty":
        path, match = tmp_path / "empty.txt", r"empty\.txt.*is empty"
        path.write_text("")
    elif case == "not_utf8":
        path, match = tmp_path / "latin1.txt", r"latin1\.txt.*not valid UTF-8.*byte 6.*iconv"
        path.write_bytes("hello caf\u00e9\n".encode("latin-1")[:6] + b"\xe9 au lait\n" * 50)
    elif case == "too_small":
        path, match = tmp_path / "tiny.txt", r"tiny\.txt.*too small for vocab_size=2000.*lower --vocab-size"
        path.write_text("a tiny corpus with few words\n" * 20)
    elif case == "json_key":
        path, match = tmp_path / "docs.jsonl", r"docs\.jsonl.*no field 'text'.*--text-key"
        path.write_text('{"content": "hello"}\n{"content": "world"}\n')
    elif case == "json_row":
        path, match = tmp_path / "rows.jsonl", r"rows\.jsonl.*missing or not a string in row 1"
        path.write_text('{"text": "hello"}\n{"other": "x"}\n')
    else:
        path, match = tmp_path / "data.csv", r"data\.csv.*unknown extension"
        path.write_text("a,b\n")
    vocab = 2000 if case == "too_small" else 300
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train_tokenizer([path], out, vocab_size=vocab)
    _no_output(out)


def test_cli_and_refuses_overwrite(tmp_path, capsys):
    src = tmp_path / "c.txt"
    src.write_text(CORPUS.read_text(encoding="utf-8")[:200_000])
    out = tmp_path / "tok"
    with pytest.raises(SystemExit, match="c.txt.*raise --vocab-size or lower --character-coverage"):
        train_main(["--input", str(src), "--vocab-size", "300", "--out", str(out)])  # 260 fixed + ~60 chars > 300
    train_main(["--input", str(src), "--vocab-size", "400", "--out", str(out), "--doc-boundary", "line"])
    assert Tokenizer(out).vocab_size == 400 and Tokenizer(out).meta["doc_boundary"] == "line"
    with pytest.raises(SystemExit, match="exists.*--force"):
        train_main(["--input", str(src), "--vocab-size", "400", "--out", str(out)])
    with pytest.raises(SystemExit, match="leaves no room"):
        train_main(["--input", str(src), "--vocab-size", "200", "--out", str(tmp_path / "x"), "--force"])


def test_mismatched_folder_is_refused(tmp_path, tok):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tok.path, bad)
    meta = json.loads((bad / META_FILE).read_text())
    meta["eos_id"] = 7
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="disagree.*eos_id"):
        Tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.model"):
        Tokenizer(tmp_path)
