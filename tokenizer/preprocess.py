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
- Completion-only training (`--prompt-key K --completion-key K`, json/jsonl/parquet rows): a document is
  encode(prompt) + encode(completion) + [EOS], the two fields tokenized separately so the boundary is exact, and
  a parallel IndexedDataset `PREFIX.loss_mask.{bin,idx}` (uint8, the same lengths) holds 1 on training targets
  (completion and EOS) and 0 on prompt tokens. pretrain/data.py turns mask 0 into label -100. Rows are kept
  as they are (no stripping, no dropping), so document i is row i of the inputs in order.
- `--pad-to N` pads every document with the pad id (mask 0) to exactly N tokens and refuses longer ones: with
  seq_len N, megatron's disjoint windows make every sample exactly one document. Without a mask file the pads
  are still never targets (GPTDataset masks labels equal to the pad id).
- The mask files are published before the token files (and stale ones removed first), so a reader never sees
  tokens without their mask or with another run's mask.
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

from .io import DOC_BOUNDARIES, check_string_field, load_documents, resolve_inputs, source_hash
from .tokenizer import MODEL_FILE, Tokenizer


class _Encode:
    """Picklable batched map function: loads the sentencepiece model lazily in each worker process.

    Text documents -> {input_ids, num_tokens}; prompt/completion rows also -> prompt_tokens (the mask is 0 there).
    """

    def __init__(self, model_file: str, eos_id: int, pairs: bool = False):
        self.model_file, self.eos_id, self.pairs, self._sp = model_file, eos_id, pairs, None

    def __getstate__(self):
        return {**self.__dict__, "_sp": None}

    def __call__(self, batch: dict) -> dict:
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        if not self.pairs:
            ids = self._sp.encode(batch["text"], out_type=int)
            return {"input_ids": [x + [self.eos_id] for x in ids], "num_tokens": [len(x) + 1 for x in ids]}
        prompts = self._sp.encode(batch["prompt"], out_type=int)
        completions = self._sp.encode(batch["completion"], out_type=int)
        ids = [p + c + [self.eos_id] for p, c in zip(prompts, completions)]
        return {"input_ids": ids, "num_tokens": [len(x) for x in ids], "prompt_tokens": [len(p) for p in prompts]}


def sidecar_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".json")


def mask_prefix(prefix: str | Path) -> str:
    """The loss-mask IndexedDataset beside a token prefix: PREFIX.loss_mask.{bin,idx}."""
    return f"{prefix}.loss_mask"


def _load_examples(inputs: list[str | Path], prompt_key: str, completion_key: str):
    """Rows of json/jsonl/parquet inputs as a Dataset with columns `prompt`, `completion` (texts kept verbatim)."""
    import datasets

    files = resolve_inputs(inputs)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # loading is quick; the tokenize map shows the bar that matters
    try:
        return _read_examples(files, prompt_key, completion_key)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _read_examples(files: list[tuple[Path, str]], prompt_key: str, completion_key: str):
    import datasets

    parts = []
    for f, fmt in files:
        if fmt == "text":
            raise ValueError(f"input {str(f)!r} is a text file: --prompt-key/--completion-key need json/jsonl/parquet "
                             f"rows holding both fields")
        try:
            ds = datasets.load_dataset(fmt, data_files=[str(f)], split="train")
        except Exception as e:  # pyarrow / json parse errors: name the file
            raise ValueError(f"could not read {fmt} file {str(f)!r}: {type(e).__name__}: {e}; "
                             f"check that it is valid {fmt}") from e
        for k in (prompt_key, completion_key):
            check_string_field(ds, fmt, f, k, "pass --prompt-key / --completion-key with the fields that hold them")
        parts.append(ds.map(lambda b: {"prompt": b[prompt_key], "completion": b[completion_key]}, batched=True,
                            remove_columns=ds.column_names))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        raise ValueError(f"inputs {[str(f) for f, _ in files]} hold no row: give prompt/completion examples")
    return ds, [f for f, _ in files]


def preprocess(tokenizer_dir: str | Path, inputs: list[str | Path], out_prefix: str | Path, *, text_key: str = "text",
               doc_boundary: str = "blank-line", prompt_key: str | None = None, completion_key: str | None = None,
               pad_to: int | None = None, num_proc: int = 1, batch_size: int = 1000, force: bool = False,
               progress: bool = True) -> dict:
    """Write `out_prefix.{bin,idx,json}` (+ `out_prefix.loss_mask.{bin,idx}` with prompt/completion keys); return the
    summary dict (documents, tokens, seconds, tokens_per_s, skipped)."""
    from tqdm.auto import tqdm

    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc} must be >= 1")
    if (prompt_key is None) != (completion_key is None) or (prompt_key is not None and prompt_key == completion_key):
        raise ValueError(f"prompt_key={prompt_key!r}, completion_key={completion_key!r}: give both (two different "
                         f"fields) to train on completions only, or neither")
    if pad_to is not None and pad_to < 1:
        raise ValueError(f"pad_to={pad_to} must be >= 1 (use the training seq_len)")
    pairs = prompt_key is not None
    tok = Tokenizer(tokenizer_dir)
    out_prefix = Path(out_prefix)
    bin_path, idx_path, meta_path = Path(f"{out_prefix}.bin"), Path(f"{out_prefix}.idx"), sidecar_path(out_prefix)
    mask_bin, mask_idx = Path(f"{mask_prefix(out_prefix)}.bin"), Path(f"{mask_prefix(out_prefix)}.idx")
    outputs = (bin_path, idx_path) + ((mask_bin, mask_idx) if pairs else ())
    t0 = time.time()
    if pairs:
        docs, files = _load_examples(inputs, prompt_key, completion_key)
    else:
        docs, files = load_documents(inputs, text_key=text_key, doc_boundary=doc_boundary)
    key = {"tokenizer_sha256": source_hash([tok.path / MODEL_FILE]), "input_sha256": source_hash(files),
           "inputs": [str(f) for f in files], "text_key": text_key, "doc_boundary": doc_boundary, "eos_per_document": True,
           "prompt_key": prompt_key, "completion_key": completion_key, "pad_to": pad_to}
    if bin_path.exists() or idx_path.exists():
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        same = (old is not None and all(old.get(k) == v for k, v in key.items() if k != "inputs")  # content, not path spelling
                and all(p.exists() for p in outputs))
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
        encoded = docs.map(_Encode(str(tok.path / MODEL_FILE), tok.eos_id, pairs), batched=True, batch_size=batch_size,
                           num_proc=num_proc if num_proc > 1 else None, remove_columns=docs.column_names,
                           load_from_cache_file=False, desc="tokenize")
    finally:
        if bars:
            datasets.enable_progress_bars()
    if pad_to is not None:
        lengths = np.asarray(encoded["num_tokens"])
        too_long = np.flatnonzero(lengths > pad_to)
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(f"document {i} (0-based, inputs in order) has {lengths[i]} tokens with EOS, more than "
                             f"pad_to={pad_to} ({too_long.size} documents in all are longer): raise --pad-to, or "
                             f"shorten or drop those documents")
    dtype = DType.optimal_dtype(tok.vocab_size)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = Path(f"{out_prefix}.tmp-{os.getpid()}")
    tmp_bin, tmp_idx = Path(f"{tmp_prefix}.bin"), Path(f"{tmp_prefix}.idx")
    tmp_mask_bin, tmp_mask_idx = Path(f"{mask_prefix(tmp_prefix)}.bin"), Path(f"{mask_prefix(tmp_prefix)}.idx")
    n_tokens = n_targets = n_pad = 0
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        mask_builder = IndexedDatasetBuilder(str(tmp_mask_bin), dtype=np.uint8) if pairs else None
        with tqdm(total=len(encoded), desc=f"write {out_prefix.name}", unit="doc", disable=not progress) as bar:
            for batch in encoded.iter(batch_size=batch_size):
                for j, ids in enumerate(batch["input_ids"]):
                    arr = np.asarray(ids, dtype=dtype)  # (len,) document + EOS
                    if pad_to is not None:
                        arr = np.concatenate([arr, np.full(pad_to - arr.size, tok.pad_id, dtype=dtype)])  # (pad_to,)
                    n = arr.size
                    builder.add_document(arr, [n])
                    n_tokens, n_pad = n_tokens + n, n_pad + n - len(ids)
                    if mask_builder is not None:
                        mask = np.zeros(n, dtype=np.uint8)  # (n,) 1 = training target: completion and EOS
                        mask[batch["prompt_tokens"][j]:len(ids)] = 1
                        mask_builder.add_document(mask, [n])
                        n_targets += len(ids) - batch["prompt_tokens"][j]
                bar.update(len(batch["input_ids"]))
        builder.finalize(str(tmp_idx))
        if mask_builder is not None:
            mask_builder.finalize(str(tmp_mask_idx))
        seconds = time.time() - t0
        summary = {**key, "documents": len(encoded), "tokens": n_tokens, "dtype": np.dtype(dtype).name,
                   "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seconds": round(seconds, 3),
                   "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1), "num_proc": num_proc}
        if pad_to is not None:
            summary.update(pad_id=tok.pad_id, pad_tokens=n_pad)
        if pairs:
            summary.update(loss_mask=mask_prefix(out_prefix.name), target_tokens=n_targets)
        # an old index must not pair with the new .bin mid-publish; an old mask must not outlive its tokens
        for p in (idx_path, meta_path, mask_idx) + (() if pairs else (mask_bin,)):
            p.unlink(missing_ok=True)
        if pairs:  # the mask before the tokens: no reader sees tokens without their mask
            os.replace(tmp_mask_bin, mask_bin)
            os.replace(tmp_mask_idx, mask_idx)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        meta_path.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        for p in (tmp_bin, tmp_idx, tmp_mask_bin, tmp_mask_idx):
            p.unlink(missing_ok=True)
    extra = (f", {n_targets} training targets" if pairs else "") + (f", {n_pad} pads" if pad_to is not None else "")
    print(f"{out_prefix}: {summary['documents']} documents, {n_tokens} tokens{extra} in {seconds:.2f}s "
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
    ap.add_argument("--prompt-key", help="json/parquet field of the prompt: train on completions only "
                                         "(writes PREFIX.loss_mask.{bin,idx}); needs --completion-key")
    ap.add_argument("--completion-key", help="json/parquet field of the completion (with --prompt-key)")
    ap.add_argument("--pad-to", type=int, help="pad every document to exactly N tokens (use seq_len: one example "
                                               "per sample); a longer document is an error")
    ap.add_argument("--num-proc", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--force", action="store_true", help="redo / overwrite existing outputs")
    a = ap.parse_args(argv)
    try:
        preprocess(a.tokenizer, a.input, a.out, text_key=a.text_key, doc_boundary=a.doc_boundary,
                   prompt_key=a.prompt_key, completion_key=a.completion_key, pad_to=a.pad_to,
                   num_proc=a.num_proc, batch_size=a.batch_size, force=a.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
