"""Tokenize a corpus into a megatron-core IndexedDataset: `python -m tokenizer.preprocess --tokenizer DIR --input PATH... --out PREFIX`.

Design choices
- Documents are read through HF `datasets` (tokenizer/io.py: text/json/jsonl/parquet, local only) and
  tokenized in parallel with `datasets.map(num_proc=N)`; each worker loads the sentencepiece model once.
  The map never reads the datasets cache (`load_from_cache_file=False`): whether work can be skipped
  is decided by our own sidecar (below), and a benchmark must measure real tokenization.
- One EOS is appended to every document (megatron's GPTDataset packs documents back to back; EOS is
  the boundary the model learns). No BOS.
- Output is megatron-core's `IndexedDatasetBuilder` format: `PREFIX.bin` (tokens, uint16 when the
  vocabulary fits, else int32) and `PREFIX.idx` (one sequence per document), plus `PREFIX.json`, a
  sidecar with the tokenizer / input hashes and counts.
- Nothing half-written can be mistaken for a dataset: everything is written under a temporary prefix
  and renamed at the end, `.bin` before `.idx` and the sidecar last (megatron treats a prefix as present
  only when both `.bin` and `.idx` exist).
- Re-running with the same tokenizer, inputs and options is skipped (the sidecar matches) unless
  `--force`; existing outputs made from something else are refused without `--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .io import DOC_BOUNDARIES, load_documents, source_hash
from .tokenizer import MODEL_FILE, Tokenizer


class _Encode:
    """Picklable batched map function: loads the sentencepiece model lazily in each worker process."""

    def __init__(self, model_file: str, eos_id: int):
        self.model_file, self.eos_id, self._sp = model_file, eos_id, None

    def __getstate__(self):
        return {"model_file": self.model_file, "eos_id": self.eos_id, "_sp": None}

    def __call__(self, batch: dict) -> dict:
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        ids = self._sp.encode(batch["text"], out_type=int)
        return {"input_ids": [x + [self.eos_id] for x in ids], "num_tokens": [len(x) + 1 for x in ids]}


def sidecar_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".json")


def preprocess(tokenizer_dir: str | Path, inputs: list[str | Path], out_prefix: str | Path, *, text_key: str = "text",
               doc_boundary: str = "blank-line", num_proc: int = 1, batch_size: int = 1000, force: bool = False,
               progress: bool = True) -> dict:
    """Write `out_prefix.{bin,idx,json}`; return the summary dict (documents, tokens, seconds, tokens_per_s, skipped)."""
    from tqdm.auto import tqdm

    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc} must be >= 1")
    tok = Tokenizer(tokenizer_dir)
    out_prefix = Path(out_prefix)
    bin_path, idx_path, meta_path = Path(f"{out_prefix}.bin"), Path(f"{out_prefix}.idx"), sidecar_path(out_prefix)
    t0 = time.time()
    docs, files = load_documents(inputs, text_key=text_key, doc_boundary=doc_boundary)
    key = {"tokenizer_sha256": source_hash([tok.path / MODEL_FILE]), "input_sha256": source_hash(files),
           "inputs": [str(f) for f in files], "text_key": text_key, "doc_boundary": doc_boundary, "eos_per_document": True}
    if bin_path.exists() or idx_path.exists():
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        same = (old is not None and all(old.get(k) == v for k, v in key.items() if k != "inputs")  # content, not path spelling
                and bin_path.exists() and idx_path.exists())
        if same and not force:
            print(f"{out_prefix}: up to date ({old['documents']} documents, {old['tokens']} tokens); pass --force to redo",
                  file=sys.stderr)
            return {**old, "skipped": True}
        if not same and not force:
            raise FileExistsError(f"{bin_path} / {idx_path} exist but were made from other inputs, tokenizer or options: "
                                  f"pass --force to overwrite them or choose another --out")

    with warnings.catch_warnings():  # megatron-core warns about absent GPU libraries on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    import datasets

    t0 = time.time()  # tokens/s covers tokenizing + writing, not reading the corpus or importing megatron
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        encoded = docs.map(_Encode(str(tok.path / MODEL_FILE), tok.eos_id), batched=True, batch_size=batch_size,
                           num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"],
                           load_from_cache_file=False, desc="tokenize")
    finally:
        if bars:
            datasets.enable_progress_bars()
    dtype = DType.optimal_dtype(tok.vocab_size)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = Path(f"{out_prefix}.tmp-{os.getpid()}")
    tmp_bin, tmp_idx = Path(f"{tmp_prefix}.bin"), Path(f"{tmp_prefix}.idx")
    n_tokens = 0
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        with tqdm(total=len(encoded), desc=f"write {out_prefix.name}", unit="doc", disable=not progress) as bar:
            for batch in encoded.iter(batch_size=batch_size):
                for ids in batch["input_ids"]:
                    arr = np.asarray(ids, dtype=dtype)
                    builder.add_document(arr, [arr.size])
                    n_tokens += arr.size
                bar.update(len(batch["input_ids"]))
        builder.finalize(str(tmp_idx))
        seconds = time.time() - t0
        summary = {**key, "documents": len(encoded), "tokens": n_tokens, "dtype": np.dtype(dtype).name,
                   "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seconds": round(seconds, 3),
                   "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1), "num_proc": num_proc}
        for p in (idx_path, meta_path):  # an old index must not pair with the new .bin mid-publish
            p.unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        meta_path.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    print(f"{out_prefix}: {summary['documents']} documents, {n_tokens} tokens in {seconds:.2f}s "
          f"({summary['tokens_per_s']:.0f} tokens/s, num_proc={num_proc})", file=sys.stderr)
    return {**summary, "skipped": False}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tokenizer.preprocess", description=__doc__.split("\n")[0],
        epilog="Documents of plain-text files: --doc-boundary blank-line (default; paragraphs separated by an empty "
               "line), line (each line) or file (whole file). json/jsonl/parquet rows are documents. One EOS is "
               "appended per document.")
    ap.add_argument("--tokenizer", required=True, help="folder written by python -m tokenizer.train")
    ap.add_argument("--input", nargs="+", required=True, help="text/json/jsonl/parquet files or folders (local only)")
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    ap.add_argument("--text-key", default="text", help="json/parquet field holding the text (default: text)")
    ap.add_argument("--doc-boundary", choices=tuple(DOC_BOUNDARIES), default="blank-line")
    ap.add_argument("--num-proc", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--force", action="store_true", help="redo / overwrite existing outputs")
    a = ap.parse_args(argv)
    try:
        preprocess(a.tokenizer, a.input, a.out, text_key=a.text_key, doc_boundary=a.doc_boundary,
                   num_proc=a.num_proc, batch_size=a.batch_size, force=a.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
