"""Reading training corpora through Hugging Face `datasets`, with errors that name the file and the fix.

Design choices
- Every input path is a local file or a folder (searched recursively, sorted, so the order and the
  source hash are stable; hidden files, tokenizer metadata and preprocess sidecars are skipped). The format follows the extension: `.txt`/`.text`/`.md` -> `text`,
  `.json`/`.jsonl` -> `json` (the document is the field `--text-key`), `.parquet` -> `parquet`.
  Nothing is fetched from the network: `datasets` only reads the local files through its packaged
  builders (`load_dataset("text" | "json" | "parquet", data_files=...)`).
- Each file is loaded as its own dataset and the results are concatenated, so a missing JSON field
  or a non-UTF-8 byte can be reported with the file it came from.
- A "document" of a plain-text file is chosen by `doc_boundary`: `blank-line` (paragraphs separated
  by an empty line, the default: one speech of tinyshakespeare), `line` (one line) or `file` (the
  whole file). These map onto the `sample_by` option of the `text` builder. Empty documents are
  dropped. Every document ends up in the column `text`.
- Text files are checked to be UTF-8 before loading (the `text` builder would fail deep inside an
  Arrow worker with an error that names neither the file nor the offset).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

TEXT_EXTS = (".txt", ".text", ".md")
JSON_EXTS = (".json", ".jsonl")
PARQUET_EXTS = (".parquet",)
DOC_BOUNDARIES = {"blank-line": "paragraph", "line": "line", "file": "document"}


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTS:
        return "text"
    if suffix in JSON_EXTS:
        return "json"
    if suffix in PARQUET_EXTS:
        return "parquet"
    return None


def _is_ours(f: Path, root: Path) -> bool:
    """Files a folder scan skips: hidden paths, tokenizer metadata, preprocess sidecars (PREFIX.json beside PREFIX.idx)."""
    rel = f.relative_to(root)
    return (any(part.startswith(".") for part in rel.parts) or f.name == "ressformer_tokenizer.json"
            or (f.suffix == ".json" and f.with_suffix(".idx").exists()))


def resolve_inputs(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Expand files and folders to a sorted list of `(file, format)`; raise on missing/empty inputs."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no input given: pass --input FILE_OR_FOLDER (text, json/jsonl or parquet)")
    out: list[tuple[Path, str]] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"input {str(p)!r} does not exist: check the path (local files or folders only)")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _format_of(f) is not None and not _is_ours(f, p))
            if not found:
                raise ValueError(f"input folder {str(p)!r} holds no .txt/.json/.jsonl/.parquet file: "
                                 f"point --input at the corpus files")
            out.extend((f, _format_of(f)) for f in found)
        else:
            fmt = _format_of(p)
            if fmt is None:
                raise ValueError(f"input {str(p)!r} has an unknown extension {p.suffix!r}: "
                                 f"use {TEXT_EXTS + JSON_EXTS + PARQUET_EXTS}")
            out.append((p, fmt))
    for f, _ in out:
        if f.stat().st_size == 0:
            raise ValueError(f"input file {str(f)!r} is empty: remove it from --input or give it text")
    return out


def source_hash(files: Iterable[Path]) -> str:
    """sha256 over the files' names and bytes: identifies the corpus a tokenizer / dataset came from."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_utf8(path: Path) -> None:
    """Raise a ValueError naming the file and the byte offset of the first non-UTF-8 byte."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"input file {str(path)!r} is not valid UTF-8 (byte {offset + e.start}: {chunk[e.start:e.start + 4]!r}): "
                    f"re-encode it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`") from None
            offset += len(chunk)
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"input file {str(path)!r} ends inside a UTF-8 character: the file is truncated "
                             f"or not UTF-8; re-encode or repair it") from None


def check_string_field(ds, fmt: str, path: Path, key: str, fix: str) -> None:
    """Refuse a json / parquet dataset whose field `key` is absent or not a string in some row; name file and row."""
    if key not in ds.column_names:
        raise ValueError(f"{fmt} file {str(path)!r} has no field {key!r} (fields: {ds.column_names}): {fix}")
    bad = [i for i, t in enumerate(ds[key]) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{fmt} file {str(path)!r}: field {key!r} is missing or not a string in row {bad[0]} "
                         f"({len(bad)} rows in all): fix those rows or drop them")


def load_documents(paths: Iterable[str | Path], *, text_key: str = "text", doc_boundary: str = "blank-line",
                   cache_dir: str | None = None):
    """Load every document of the inputs as a `datasets.Dataset` with a single column `text`."""
    import datasets

    if doc_boundary not in DOC_BOUNDARIES:
        raise ValueError(f"doc_boundary={doc_boundary!r} is unknown: use one of {tuple(DOC_BOUNDARIES)}")
    files = resolve_inputs(paths)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # loading is quick; the caller's tokenize map shows the bar that matters
    try:
        return _load(files, text_key, doc_boundary, cache_dir)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _load(files: list[tuple[Path, str]], text_key: str, doc_boundary: str, cache_dir: str | None):
    import datasets

    parts = []
    for f, fmt in files:
        if fmt == "text":
            check_utf8(f)
            ds = datasets.load_dataset("text", data_files=[str(f)], split="train", cache_dir=cache_dir,
                                       sample_by=DOC_BOUNDARIES[doc_boundary], keep_linebreaks=True)
        else:
            try:
                ds = datasets.load_dataset(fmt, data_files=[str(f)], split="train", cache_dir=cache_dir)
            except Exception as e:  # pyarrow / json parse errors: name the file
                raise ValueError(f"could not read {fmt} file {str(f)!r}: {type(e).__name__}: {e}; "
                                 f"check that it is valid {fmt}" + (" (one JSON object per line)" if fmt == "json" else "")) from e
            check_string_field(ds, fmt, f, text_key, "pass --text-key with the field that holds the document text")
            ds = ds.select_columns([text_key])
            if text_key != "text":
                ds = ds.rename_column(text_key, "text")
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    # paragraphs come with their trailing newline(s); strip them so a document is its text only
    ds = ds.map(lambda b: {"text": [t.strip("\n") for t in b["text"]]}, batched=True)
    ds = ds.filter(lambda b: [len(t.strip()) > 0 for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise ValueError(f"inputs {[str(f) for f, _ in files]} hold no non-empty document: give a corpus with text")
    return ds, [f for f, _ in files]
