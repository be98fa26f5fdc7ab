"""Train a sentencepiece tokenizer: `python -m tokenizer.train --input PATH... --vocab-size N --out DIR`.

Design choices
- sentencepiece (BPE by default, `--model-type unigram` selectable) with byte fallback, so every
  UTF-8 string round-trips even when a character never occurred in training (it becomes its
  <0xNN> byte pieces). Identity normalisation and no whitespace collapsing: decode(encode(x)) == x.
  No dummy "▁" prefix: training sentences are lines, and a line inside a document follows a newline,
  not a space, so a word at a line start is tokenised the same way in training and in use.
- Fixed special ids: pad 0, unk 1, bos 2, eos 3 (the pipeline appends eos per document; megatron's
  GPTDataset treats pad specially and refuses pad colliding with eos). `--user-symbols` adds pieces
  that are never split (e.g. chat markers).
- Inputs are read through HF `datasets` (tokenizer/io.py: text/json/jsonl/parquet/arrow files and
  save_to_disk folders, local only). sentencepiece trains on sentences, so each document is split into
  its lines; `--max-sentences` caps the number of lines sampled (sentencepiece's `input_sentence_size`
  with shuffling: a reservoir over every line) for large corpora. `--streaming` feeds the lines from
  files streamed batch by batch instead of from an Arrow copy of the corpus: the same lines in the same
  order, so the same tokenizer.
- Output is written to a temporary folder beside `--out` and renamed at the end: a crashed run
  never leaves a folder that looks like a finished tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .io import (DOC_BOUNDARIES, documents_dataset, effective_split, input_files, iter_documents, reading,
                 resolve_inputs, source_hash)
from .tokenizer import META_FILE, MODEL_FILE, PAD_MULTIPLE, Tokenizer, pad_vocab

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")


def train_tokenizer(inputs: list[str | Path], out: str | Path, *, vocab_size: int = 512, model_type: str = "bpe",
                    text_key: str = "text", doc_boundary: str = "blank-line", split: str | None = None,
                    user_symbols: tuple[str, ...] = (), max_sentences: int = 2_000_000,
                    character_coverage: float = 0.9995, seed: int = 0, num_threads: int = 2, streaming: bool = False,
                    force: bool = False) -> Tokenizer:
    """Train and write `out/tokenizer.model` + `out/ressformer_tokenizer.json`; return the loaded Tokenizer.

    `split` picks the split of DatasetDict.save_to_disk inputs (default train); `streaming` reads the inputs batch
    by batch instead of converting them to an Arrow dataset first (the same tokenizer)."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is unknown: use one of {MODEL_TYPES}")
    n_fixed = 4 + 256 + len(user_symbols)  # specials + byte-fallback pieces + user symbols
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces: it must exceed the "
                         f"{n_fixed} fixed pieces (4 specials, 256 bytes, {len(user_symbols)} user symbols)")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"tokenizer output {str(out)!r} exists: pass --force to overwrite it or choose another --out")

    if doc_boundary not in DOC_BOUNDARIES:
        raise ValueError(f"doc_boundary={doc_boundary!r} is unknown: use one of {tuple(DOC_BOUNDARIES)}")

    t0 = time.time()
    units = resolve_inputs(inputs)
    split = effective_split(units, split)
    files = input_files(units, split)
    src = source_hash(files)
    if streaming:
        batches = iter_documents(units, text_key=text_key, doc_boundary=doc_boundary, split=split)
    else:
        with reading(units):
            docs = documents_dataset(units, text_key, doc_boundary, split)
        batches = (b["text"] for b in docs.iter(batch_size=1000))
    num_documents = 0

    def sentences():
        # sentencepiece learns from "sentences": one line of a document each (long lines are cut by it)
        nonlocal num_documents
        for batch in batches:
            num_documents += len(batch)
            for doc in batch:
                for line in doc.split("\n"):
                    if line.strip():
                        yield line

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        spm.set_random_generator_seed(seed)  # sentence sampling / shuffling
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_prefix=str(tmp / "tokenizer"), vocab_size=vocab_size,
                model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                user_defined_symbols=list(user_symbols), normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
                input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
                num_threads=num_threads, minloglevel=2)
        except RuntimeError as e:
            msg = str(e)
            if "required_chars" in msg:
                raise ValueError(f"vocab_size={vocab_size} cannot hold the fixed pieces plus the distinct characters "
                                 f"of {[str(f) for f in files]} (sentencepiece: {msg.strip()}): raise --vocab-size "
                                 f"or lower --character-coverage (rare characters then use byte fallback)") from None
            if "Vocabulary size" in msg or "vocab_size" in msg:
                raise ValueError(f"corpus {[str(f) for f in files]} is too small for vocab_size={vocab_size} "
                                 f"(sentencepiece: {msg.strip()}): lower --vocab-size or add text") from None
            raise
        meta = {
            "format": "ressformer-sentencepiece/1", "model_file": MODEL_FILE, "model_type": model_type,
            "vocab_size": vocab_size, "padded_vocab_size": pad_vocab(vocab_size), "pad_multiple": PAD_MULTIPLE,
            "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
            "user_symbols": list(user_symbols), "byte_fallback": True, "doc_boundary": doc_boundary,
            "text_key": text_key, "split": split, "inputs": [str(f) for f in files], "source_sha256": src,
            "num_documents": num_documents, "max_sentences": max_sentences, "seed": seed,
            "sentencepiece_version": spm.__version__,
        }
        (tmp / "tokenizer.model").rename(tmp / MODEL_FILE)
        (tmp / "tokenizer.vocab").unlink(missing_ok=True)  # human-readable copy; the model file is enough
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        Tokenizer(tmp)  # validates model <-> metadata before anything is published
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    tok = Tokenizer(out)
    print(f"trained {model_type} tokenizer: vocab {tok.vocab_size} (padded {tok.padded_vocab_size}) from "
          f"{num_documents} documents in {time.time() - t0:.1f}s -> {out}", file=sys.stderr)
    return tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tokenizer.train", description=__doc__.split("\n")[0],
        epilog="Inputs: text (.txt/.text/.md), json/jsonl, parquet and arrow files, folders of them (searched "
               "recursively, sorted), and folders written by datasets' save_to_disk (a DatasetDict's split picked "
               "by --split); local only, nothing is downloaded. Documents of plain-text files: --doc-boundary "
               "blank-line (default; paragraphs separated by an empty line), line (each line) or file (whole file); "
               "rows of the other formats are documents (the column --text-key). --streaming reads the inputs "
               "batch by batch (no Arrow copy of the corpus; the same tokenizer).")
    ap.add_argument("--input", nargs="+", required=True,
                    help="text/json/jsonl/parquet/arrow files, folders of them, or save_to_disk folders (local only)")
    ap.add_argument("--out", required=True, help="output folder (tokenizer.model + ressformer_tokenizer.json)")
    ap.add_argument("--vocab-size", type=int, default=512, help="pieces incl. 4 specials and 256 bytes (default 512)")
    ap.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    ap.add_argument("--text-key", default="text",
                    help="column holding the text in json/parquet/arrow rows and saved datasets (default: text)")
    ap.add_argument("--split", help="split of a DatasetDict.save_to_disk folder (default: train)")
    ap.add_argument("--doc-boundary", choices=tuple(DOC_BOUNDARIES), default="blank-line")
    ap.add_argument("--streaming", action="store_true", help="read the inputs batch by batch (the same tokenizer)")
    ap.add_argument("--user-symbols", nargs="*", default=[], help="pieces never split, e.g. <|user|>")
    ap.add_argument("--max-sentences", type=int, default=2_000_000, help="cap on lines sampled for training")
    ap.add_argument("--character-coverage", type=float, default=0.9995)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    a = ap.parse_args(argv)
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # local files only
    try:
        train_tokenizer(a.input, a.out, vocab_size=a.vocab_size, model_type=a.model_type, text_key=a.text_key,
                        doc_boundary=a.doc_boundary, split=a.split, user_symbols=tuple(a.user_symbols),
                        max_sentences=a.max_sentences, character_coverage=a.character_coverage, seed=a.seed,
                        num_threads=a.num_threads, streaming=a.streaming, force=a.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
