"""Tokenize a corpus into a megatron-core IndexedDataset: `python -m tokenizer.preprocess --tokenizer DIR --input PATH... --out PREFIX`.

Design choices
- Documents are read through HF `datasets` (tokenizer/io.py: text/json/jsonl/parquet/arrow files and
  save_to_disk folders, local only) and tokenized in parallel with `datasets.map(num_proc=N)`; each worker
  loads the sentencepiece model once. The map never reads the datasets cache (`load_from_cache_file=False`):
  whether work can be skipped is decided by our own sidecar (below), and a benchmark must measure real
  tokenization. With num_proc > 1 each process encodes with one thread (sentencepiece's batch encode
  otherwise starts a thread per core in every process); with num_proc 1 it keeps its thread per core.
- `--streaming` never holds the corpus: each file is streamed (`load_dataset(..., streaming=True)`) in batches of
  `--batch-size` rows, a batch is tokenized (in a pool of `--num-proc` spawned processes, at most 2 batches per
  process in flight, results taken in submission order) and written to the builder before more is read. The
  documents, their order and so the output files are those of the default mode, byte for byte; memory is a few
  batches plus the index megatron's builder keeps until it writes `.idx` (two Python ints per document).
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
- Completion-only training (`--prompt-key K --completion-key K`, rows of any format but text): a document is
  encode(prompt) + encode(completion) + [EOS], the two fields tokenized separately so the boundary is exact, and
  a parallel IndexedDataset `PREFIX.loss_mask.{bin,idx}` (uint8, the same lengths) holds 1 on training targets
  (completion and EOS) and 0 on prompt tokens. pretrain/data.py turns mask 0 into label -100. Rows are kept
  as they are (no stripping, no dropping), so document i is row i of the inputs in order.
- `--pad-to N` pads every document with the pad id (mask 0) to exactly N tokens and refuses longer ones (all of
  them counted, so the error says how many): with seq_len N, megatron's disjoint windows make every sample
  exactly one document. Without a mask file the pads are still never targets (GPTDataset masks labels equal to
  the pad id).
- The mask files are published before the token files (and stale ones removed first), so a reader never sees
  tokens without their mask or with another run's mask.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from .io import (DOC_BOUNDARIES, documents_dataset, effective_split, examples_dataset, input_files, iter_documents,
                 iter_examples, reading, resolve_inputs, source_hash)
from .tokenizer import MODEL_FILE, Tokenizer

PAIR_FIX = "pass --prompt-key / --completion-key with the fields that hold them"


class _Encode:
    """Picklable batched tokenizer: loads the sentencepiece model lazily in each process that calls it.

    A batch is {"text": [...]} (documents) or {"prompt": [...], "completion": [...]} (pairs). As a `datasets.map`
    function it returns {input_ids, num_tokens} (+ prompt_tokens: the mask is 0 there); `chunk` returns the same
    as arrays (flat int32 ids, lengths, prompt lengths or None), which pickle cheaply between processes.
    """

    def __init__(self, model_file: str, eos_id: int, pairs: bool = False, num_threads: int | None = None):
        self.model_file, self.eos_id, self.pairs, self.num_threads = model_file, eos_id, pairs, num_threads
        self._sp = None

    def __getstate__(self):
        return {**self.__dict__, "_sp": None}

    def _ids(self, batch: dict) -> tuple[list[list[int]], list[int] | None]:
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        kw = dict(out_type=int, num_threads=self.num_threads)  # None: sentencepiece's default, a thread per core
        if not self.pairs:
            return [x + [self.eos_id] for x in self._sp.encode(batch["text"], **kw)], None
        prompts = self._sp.encode(batch["prompt"], **kw)
        completions = self._sp.encode(batch["completion"], **kw)
        return [p + c + [self.eos_id] for p, c in zip(prompts, completions)], [len(p) for p in prompts]

    def __call__(self, batch: dict) -> dict:
        ids, prompt = self._ids(batch)
        out = {"input_ids": ids, "num_tokens": [len(x) for x in ids]}
        return out if prompt is None else {**out, "prompt_tokens": prompt}

    def chunk(self, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        ids, prompt = self._ids(batch)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))  # (docs,)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))  # (tokens,)
        return flat, lengths, None if prompt is None else np.asarray(prompt, dtype=np.int64)


_WORKER: _Encode | None = None  # the encoder of a streaming pool process


def _worker_init(enc: _Encode) -> None:
    global _WORKER
    _WORKER = enc


def _worker_chunk(batch: dict):
    return _WORKER.chunk(batch)


def _stream_chunks(batches: Iterator[dict], enc: _Encode, num_proc: int) -> Iterator[tuple]:
    """Encoded chunks of `batches` in their order; with num_proc > 1 a process pool with 2 batches per process in
    flight, so reading stays at most that far ahead of writing. A worker that dies (e.g. killed for memory) ends
    the run with BrokenProcessPool instead of a hang."""
    if num_proc == 1:
        for b in batches:
            yield enc.chunk(b)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(enc,))
    try:
        pending: deque = deque()
        for b in batches:
            pending.append(pool.submit(_worker_chunk, b))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error: at most num_proc running batches to wait for


def _dataset_chunks(encoded, batch_size: int, pairs: bool) -> Iterator[tuple]:
    """The chunks of a `datasets.map` output (Arrow list columns read without Python lists)."""
    import pyarrow.compute as pc

    for tbl in encoded.with_format("arrow").iter(batch_size=batch_size):
        col = tbl.column("input_ids").combine_chunks()
        yield (col.flatten().to_numpy(zero_copy_only=False), pc.list_value_length(col).to_numpy().astype(np.int64),
               tbl.column("prompt_tokens").to_numpy().astype(np.int64) if pairs else None)


def _write(chunks: Iterator[tuple], builder, mask_builder, *, pad_to: int | None, pad_id: int, bar) -> dict:
    """Add every document of `chunks` (+ its loss mask) to the builders; count documents / tokens / targets / pads.

    A document longer than pad_to stops the writing; the rest are still counted, and then it is an error."""
    n_docs = n_tokens = n_targets = n_pad = n_long = 0
    first_long = None  # (document index, tokens)
    for flat, lengths, prompt in chunks:
        if pad_to is not None:
            long = np.flatnonzero(lengths > pad_to)
            if long.size and first_long is None:
                first_long = (n_docs + int(long[0]), int(lengths[long[0]]))
            n_long += long.size
        if first_long is None:
            start = 0
            for j, n in enumerate(lengths.tolist()):
                arr = flat[start:start + n]  # (n,) document + EOS
                start += n
                if pad_to is not None:
                    arr = np.concatenate([arr, np.full(pad_to - n, pad_id, dtype=arr.dtype)])  # (pad_to,)
                m = arr.size
                builder.add_document(arr, [m])
                n_tokens, n_pad = n_tokens + m, n_pad + m - n
                if mask_builder is not None:
                    p = int(prompt[j])
                    mask = np.zeros(m, dtype=np.uint8)  # (m,) 1 = training target: completion and EOS
                    mask[p:n] = 1
                    mask_builder.add_document(mask, [m])
                    n_targets += n - p
        n_docs += len(lengths)
        bar.update(len(lengths))
    if first_long is not None:
        i, n = first_long
        raise ValueError(f"document {i} (0-based, inputs in order) has {n} tokens with EOS, more than "
                         f"pad_to={pad_to} ({n_long} documents in all are longer): raise --pad-to, or "
                         f"shorten or drop those documents")
    return {"documents": n_docs, "tokens": n_tokens, "targets": n_targets, "pads": n_pad}


def sidecar_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".json")


def mask_prefix(prefix: str | Path) -> str:
    """The loss-mask IndexedDataset beside a token prefix: PREFIX.loss_mask.{bin,idx}."""
    return f"{prefix}.loss_mask"


def preprocess(tokenizer_dir: str | Path, inputs: list[str | Path], out_prefix: str | Path, *, text_key: str = "text",
               doc_boundary: str = "blank-line", split: str | None = None, prompt_key: str | None = None,
               completion_key: str | None = None, pad_to: int | None = None, num_proc: int = 1,
               batch_size: int = 1000, streaming: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Write `out_prefix.{bin,idx,json}` (+ `out_prefix.loss_mask.{bin,idx}` with prompt/completion keys); return the
    summary dict (documents, tokens, seconds, tokens_per_s, skipped).

    `split` picks the split of DatasetDict.save_to_disk inputs (default train). `streaming` reads, tokenizes and
    writes batch by batch (same output); `seconds` then includes reading the corpus, which it otherwise does not."""
    from tqdm.auto import tqdm

    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if (prompt_key is None) != (completion_key is None) or (prompt_key is not None and prompt_key == completion_key):
        raise ValueError(f"prompt_key={prompt_key!r}, completion_key={completion_key!r}: give both (two different "
                         f"fields) to train on completions only, or neither")
    if pad_to is not None and pad_to < 1:
        raise ValueError(f"pad_to={pad_to} must be >= 1 (use the training seq_len)")
    if doc_boundary not in DOC_BOUNDARIES:
        raise ValueError(f"doc_boundary={doc_boundary!r} is unknown: use one of {tuple(DOC_BOUNDARIES)}")
    pairs = prompt_key is not None
    tok = Tokenizer(tokenizer_dir)
    out_prefix = Path(out_prefix)
    bin_path, idx_path, meta_path = Path(f"{out_prefix}.bin"), Path(f"{out_prefix}.idx"), sidecar_path(out_prefix)
    mask_bin, mask_idx = Path(f"{mask_prefix(out_prefix)}.bin"), Path(f"{mask_prefix(out_prefix)}.idx")
    outputs = (bin_path, idx_path) + ((mask_bin, mask_idx) if pairs else ())
    units = resolve_inputs(inputs)
    split = effective_split(units, split)
    files = input_files(units, split)
    key = {"tokenizer_sha256": source_hash([tok.path / MODEL_FILE]), "input_sha256": source_hash(files),
           "inputs": [str(f) for f in files], "text_key": text_key, "doc_boundary": doc_boundary, "eos_per_document": True,
           "prompt_key": prompt_key, "completion_key": completion_key, "pad_to": pad_to, "split": split}
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

    enc = _Encode(str(tok.path / MODEL_FILE), tok.eos_id, pairs, num_threads=1 if num_proc > 1 else None)
    with contextlib.ExitStack() as stack:
        if streaming:
            t0 = time.time()  # tokens/s covers reading + tokenizing + writing (interleaved)
            rows = (iter_examples(units, prompt_key, completion_key, split, PAIR_FIX, batch_size) if pairs else
                    ({"text": d} for d in iter_documents(units, text_key=text_key, doc_boundary=doc_boundary,
                                                         split=split, batch_size=batch_size)))
            chunks = stack.enter_context(contextlib.closing(_stream_chunks(rows, enc, num_proc)))
            total = None
        else:
            bars = datasets.is_progress_bar_enabled()
            stack.enter_context(reading(units))  # offline, no bars (restored at the end)
            docs = (examples_dataset(units, prompt_key, completion_key, split, PAIR_FIX) if pairs else
                    documents_dataset(units, text_key, doc_boundary, split))
            t0 = time.time()  # tokens/s covers tokenizing + writing, not reading the corpus or importing megatron
            if progress and bars:  # the tokenize map's bar is the one that matters
                datasets.enable_progress_bars()
            encoded = docs.map(enc, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
                               remove_columns=docs.column_names, load_from_cache_file=False, desc="tokenize")
            datasets.disable_progress_bars()
            chunks, total = _dataset_chunks(encoded, batch_size, pairs), len(encoded)
        dtype = DType.optimal_dtype(tok.vocab_size)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp_prefix = Path(f"{out_prefix}.tmp-{os.getpid()}")
        tmp_bin, tmp_idx = Path(f"{tmp_prefix}.bin"), Path(f"{tmp_prefix}.idx")
        tmp_mask_bin, tmp_mask_idx = Path(f"{mask_prefix(tmp_prefix)}.bin"), Path(f"{mask_prefix(tmp_prefix)}.idx")
        try:
            builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
            mask_builder = IndexedDatasetBuilder(str(tmp_mask_bin), dtype=np.uint8) if pairs else None
            with tqdm(total=total, desc=f"write {out_prefix.name}", unit="doc", disable=not progress) as bar:
                counts = _write(chunks, builder, mask_builder, pad_to=pad_to, pad_id=tok.pad_id, bar=bar)
            builder.finalize(str(tmp_idx))
            if mask_builder is not None:
                mask_builder.finalize(str(tmp_mask_idx))
            seconds = time.time() - t0
            n_tokens = counts["tokens"]
            summary = {**key, "documents": counts["documents"], "tokens": n_tokens, "dtype": np.dtype(dtype).name,
                       "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seconds": round(seconds, 3),
                       "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1), "num_proc": num_proc,
                       "streaming": streaming}
            if pad_to is not None:
                summary.update(pad_id=tok.pad_id, pad_tokens=counts["pads"])
            if pairs:
                summary.update(loss_mask=mask_prefix(out_prefix.name), target_tokens=counts["targets"])
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
    extra = (f", {counts['targets']} training targets" if pairs else "") + (
        f", {counts['pads']} pads" if pad_to is not None else "")
    print(f"{out_prefix}: {summary['documents']} documents, {n_tokens} tokens{extra} in {seconds:.2f}s "
          f"({summary['tokens_per_s']:.0f} tokens/s, num_proc={num_proc}{', streaming' if streaming else ''})",
          file=sys.stderr)
    return {**summary, "skipped": False}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tokenizer.preprocess", description=__doc__.split("\n")[0],
        epilog="Inputs: text (.txt/.text/.md), json/jsonl, parquet and arrow files, folders of them (searched "
               "recursively, sorted), and folders written by datasets' save_to_disk (a DatasetDict's split picked "
               "by --split); local only, nothing is downloaded. Documents of plain-text files: --doc-boundary "
               "blank-line (default; paragraphs separated by an empty line), line (each line) or file (whole file); "
               "rows of the other formats are documents (the column --text-key). One EOS is appended per document. "
               "--streaming reads, tokenizes and writes batch by batch (memory flat in the corpus size, the same "
               "output files).")
    ap.add_argument("--tokenizer", required=True, help="folder written by python -m tokenizer.train")
    ap.add_argument("--input", nargs="+", required=True,
                    help="text/json/jsonl/parquet/arrow files, folders of them, or save_to_disk folders (local only)")
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    ap.add_argument("--text-key", default="text",
                    help="column holding the text in json/parquet/arrow rows and saved datasets (default: text)")
    ap.add_argument("--split", help="split of a DatasetDict.save_to_disk folder (default: train)")
    ap.add_argument("--doc-boundary", choices=tuple(DOC_BOUNDARIES), default="blank-line")
    ap.add_argument("--prompt-key", help="column of the prompt: train on completions only "
                                         "(writes PREFIX.loss_mask.{bin,idx}); needs --completion-key")
    ap.add_argument("--completion-key", help="column of the completion (with --prompt-key)")
    ap.add_argument("--pad-to", type=int, help="pad every document to exactly N tokens (use seq_len: one example "
                                               "per sample); a longer document is an error")
    ap.add_argument("--streaming", action="store_true",
                    help="never hold the corpus: stream each file in batches to the tokenizer processes and the "
                         "output (no Arrow copy of the corpus on disk; same output files)")
    ap.add_argument("--num-proc", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    ap.add_argument("--batch-size", type=int, default=1000, help="rows per tokenizer batch (default 1000)")
    ap.add_argument("--force", action="store_true", help="redo / overwrite existing outputs")
    a = ap.parse_args(argv)
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # local files only
    try:
        preprocess(a.tokenizer, a.input, a.out, text_key=a.text_key, doc_boundary=a.doc_boundary, split=a.split,
                   prompt_key=a.prompt_key, completion_key=a.completion_key, pad_to=a.pad_to,
                   num_proc=a.num_proc, batch_size=a.batch_size, streaming=a.streaming, force=a.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
