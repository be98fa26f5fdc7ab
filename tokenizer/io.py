"""Reading training corpora through Hugging Face `datasets`, with errors that name the file, the row and the fix.

Design choices
- Every input path is a local file or a folder. The format follows the extension: `.txt`/`.text`/`.md` -> `text`,
  `.json`/`.jsonl` -> `json`, `.parquet` -> `parquet`, `.arrow` -> `arrow` (Arrow IPC files as `datasets` writes
  them). A folder written by `Dataset.save_to_disk` (state.json + dataset_info.json) or `DatasetDict.save_to_disk`
  (dataset_dict.json) is one input (`saved`), read with `datasets.load_from_disk`; of a DatasetDict the split
  `split` is read (default `train`). Any other folder is searched recursively and sorted, so the order and the
  source hash are stable; hidden files, tokenizer metadata and preprocess sidecars are skipped, and a saved
  dataset inside it is one input at its sorted place.
- Nothing is fetched from the network: `datasets` reads the local files through its packaged builders
  (`load_dataset("text" | "json" | "parquet" | "arrow", data_files=...)`) and `load_from_disk`, with its offline
  flag set while it does (`reading()`).
- Two ways to read the same documents in the same order. `load_documents` / `documents_dataset` /
  `examples_dataset` return one `datasets.Dataset` (the files converted to the Arrow cache on disk, a saved
  dataset memory-mapped where it is; `datasets.map` runs over it).
  `iter_documents` / `iter_examples` stream: `load_dataset(..., streaming=True)` per file (a saved dataset is
  memory-mapped and read in batches), yielding batches of rows; nothing holds more than a batch and the block
  it was read from (a parquet row group, 10 MB of a text / json file).
- Each file is read on its own (the results concatenated or chained), so a missing column, an empty file, a
  non-UTF-8 line or a null / non-string value is reported with the file (and row or line) it came from.
- A "document" of a plain-text file is chosen by `doc_boundary`: `blank-line` (paragraphs separated by an empty
  line, the default: one speech of tinyshakespeare), `line` (one line) or `file` (the whole file). These map onto
  the `sample_by` option of the `text` builder. Rows of the other formats are documents: the column `text_key`.
  Documents lose their leading / trailing newlines, and empty ones are dropped. Every document ends up in the
  column `text`.
- Text and json files are checked to be UTF-8 before loading (the builders would fail deep inside Arrow with an
  error that names neither the file nor the line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

TEXT_EXTS = (".txt", ".text", ".md")
JSON_EXTS = (".json", ".jsonl")
PARQUET_EXTS = (".parquet",)
ARROW_EXTS = (".arrow",)
FILE_EXTS = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS + ARROW_EXTS
SAVED = "saved"  # the format of a folder written by save_to_disk
DEFAULT_SPLIT = "train"
DOC_BOUNDARIES = {"blank-line": "paragraph", "line": "line", "file": "document"}
TEXT_FIX = "pass --text-key with the column that holds the document text"


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    for fmt, exts in (("text", TEXT_EXTS), ("json", JSON_EXTS), ("parquet", PARQUET_EXTS), ("arrow", ARROW_EXTS)):
        if suffix in exts:
            return fmt
    return None


def saved_kind(folder: Path) -> str | None:
    """'dict' for a DatasetDict.save_to_disk folder, 'dataset' for a Dataset.save_to_disk one, else None."""
    if (folder / "dataset_dict.json").is_file():
        return "dict"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    return None


def _is_ours(f: Path, root: Path) -> bool:
    """Files a folder scan skips: hidden paths, tokenizer metadata, preprocess sidecars (PREFIX.json beside PREFIX.idx)."""
    rel = f.relative_to(root)
    return (any(part.startswith(".") for part in rel.parts) or f.name == "ressformer_tokenizer.json"
            or (f.suffix == ".json" and f.with_suffix(".idx").exists()))


def _scan(folder: Path) -> list[tuple[Path, str]]:
    """Corpus files and saved datasets under `folder`, sorted by path (a saved dataset's own files are not inputs)."""
    saved = sorted(d for d in folder.rglob("*") if d.is_dir() and not _is_ours(d, folder) and saved_kind(d))
    saved = [d for d in saved if not any(s in d.parents for s in saved)]  # a DatasetDict's splits are inside it
    files = [f for f in folder.rglob("*") if f.is_file() and _format_of(f) is not None and not _is_ours(f, folder)
             and not any(s in f.parents for s in saved)]
    return sorted([(f, _format_of(f)) for f in files] + [(d, SAVED) for d in saved])


def resolve_inputs(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Expand files and folders to a sorted list of `(path, format)`; raise on missing/empty inputs."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no input given: pass --input FILE_OR_FOLDER (text, json/jsonl, parquet, arrow, or a "
                         "folder written by save_to_disk)")
    out: list[tuple[Path, str]] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"input {str(p)!r} does not exist: check the path (local files or folders only)")
        if p.is_dir():
            if saved_kind(p):
                out.append((p, SAVED))
                continue
            found = _scan(p)
            if not found:
                raise ValueError(f"input folder {str(p)!r} holds no .txt/.json/.jsonl/.parquet/.arrow file and no "
                                 f"folder written by save_to_disk: point --input at the corpus files")
            out.extend(found)
        else:
            fmt = _format_of(p)
            if fmt is None:
                raise ValueError(f"input {str(p)!r} has an unknown extension {p.suffix!r}: use one of {FILE_EXTS} "
                                 f"or a folder written by save_to_disk")
            out.append((p, fmt))
    for f, fmt in out:
        if fmt != SAVED and f.stat().st_size == 0:
            raise ValueError(f"input file {str(f)!r} is empty: remove it from --input or give it text")
    return out


def effective_split(units: list[tuple[Path, str]], split: str | None) -> str | None:
    """The split read from DatasetDict folders (`split`, default train), or None when no input is one."""
    has_dict = any(fmt == SAVED and saved_kind(p) == "dict" for p, fmt in units)
    if split is not None and not has_dict:
        raise ValueError(f"--split {split!r} picks a split of a folder written by DatasetDict.save_to_disk, and no "
                         f"input is one: drop --split, or pass that folder as --input")
    return (split or DEFAULT_SPLIT) if has_dict else None


def _split_dir(path: Path, split: str | None) -> Path:
    """The folder of the Dataset a saved input contributes (a DatasetDict: its split's folder)."""
    if saved_kind(path) != "dict":
        return path
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if split not in splits:
        raise ValueError(f"saved DatasetDict {str(path)!r} has no split {split!r} (splits: {splits}): "
                         f"pass --split with one of them")
    return path / split


def _data_files(folder: Path) -> list[Path]:
    """The Arrow files of a Dataset.save_to_disk folder, in order (state.json `_data_files`)."""
    files = [folder / d["filename"] for d in json.loads((folder / "state.json").read_text()).get("_data_files", [])]
    for f in files:
        if not f.is_file():
            raise ValueError(f"saved dataset {str(folder)!r} lists {f.name} in state.json but the file is missing: "
                             f"save the dataset again (save_to_disk)")
    return files


def input_files(units: list[tuple[Path, str]], split: str | None) -> list[Path]:
    """The files whose bytes make the documents: file inputs, and the Arrow data files of saved datasets."""
    out: list[Path] = []
    for p, fmt in units:
        out.extend(_data_files(_split_dir(p, split)) if fmt == SAVED else [p])
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
    """Raise a ValueError naming the file, the line (1-based) and the byte offset of the first non-UTF-8 byte."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset, lines = 0, 0  # bytes and newlines before `chunk`
    fix = "re-encode it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`, or fix that line"
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                # e.object is the decoder's held-back bytes (an unfinished character, no newline) + this chunk
                start = offset - (len(e.object) - len(chunk)) + e.start
                line = lines + e.object.count(b"\n", 0, e.start) + 1
                raise ValueError(f"input file {str(path)!r} is not valid UTF-8 on line {line} (byte {start}: "
                                 f"{e.object[e.start:e.start + 4]!r}): {fix}") from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"input file {str(path)!r} ends inside a UTF-8 character (line {lines + 1}): the file is "
                             f"truncated or not UTF-8; re-encode or repair it") from None


def _label(path: Path, fmt: str, split: str | None) -> str:
    if fmt != SAVED:
        return f"{fmt} file {str(path)!r}"
    return f"saved dataset {str(path)!r}" + (f" (split {split!r})" if saved_kind(path) == "dict" else "")


def _no_field(label: str, key: str, columns: list[str], fix: str) -> ValueError:
    return ValueError(f"{label} has no field {key!r} (fields: {columns}): {fix}")


def _bad_value(label: str, key: str, row: int, value) -> ValueError:
    what = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
    return ValueError(f"{label}: field {key!r} is missing or not a string in row {row} (0-based; it is {what}): "
                      f"fix or drop that row")


def _no_rows(label: str) -> ValueError:
    return ValueError(f"{label} holds no rows: remove it from --input or give it rows")


def _is_string(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def check_string_field(ds, label: str, key: str, fix: str) -> None:
    """Refuse a Dataset whose column `key` is absent, or null / not a string in some row; name the input and the row."""
    import pyarrow.compute as pc

    if key not in ds.column_names:
        raise _no_field(label, key, ds.column_names, fix)
    if _is_string(ds.features[key]):  # only nulls can be wrong: find them in Arrow, without Python strings
        row = 0
        for tbl in ds.select_columns([key]).with_format("arrow").iter(batch_size=100_000):
            col = tbl.column(key)
            if col.null_count:
                raise _bad_value(label, key, row + pc.index(pc.is_null(col), True).as_py(), None)
            row += tbl.num_rows
        return
    row = 0  # another type (int, a JSON column of mixed values, ...): the first value that is not a str
    for batch in ds.select_columns([key]).iter(batch_size=10_000):
        for j, v in enumerate(batch[key]):
            if not isinstance(v, str):
                raise _bad_value(label, key, row + j, v)
        row += len(batch[key])


@contextlib.contextmanager
def reading(units: list[tuple[Path, str]] = ()):
    """While reading inputs: `datasets` offline and without progress bars; with a saved dataset among the inputs,
    transforms write their Arrow files to a temporary folder, not beside the data (where `datasets` would)."""
    import datasets

    bars, caching = datasets.is_progress_bar_enabled(), datasets.is_caching_enabled()
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.disable_progress_bars()
    datasets.config.HF_HUB_OFFLINE = True
    if any(fmt == SAVED for _, fmt in units):
        datasets.disable_caching()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
        if bars:
            datasets.enable_progress_bars()
        if caching:
            datasets.enable_caching()


def _open(path: Path, fmt: str, *, streaming: bool, split: str | None, doc_boundary: str = "blank-line",
          columns: list[str] | None = None, batch_size: int = 1000, cache_dir: str | None = None):
    """One input as a `datasets.Dataset` (a saved dataset, or streaming=False) or `IterableDataset`."""
    import datasets

    label = _label(path, fmt, split)
    if fmt == SAVED:
        if not _data_files(_split_dir(path, split)):
            raise _no_rows(label)
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise ValueError(f"could not read {label}: {type(e).__name__}: {e}; save it again with save_to_disk") from e
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    kw: dict = {}
    if fmt in ("text", "json"):
        check_utf8(path)
    if fmt == "text":
        kw = dict(sample_by=DOC_BOUNDARIES[doc_boundary], keep_linebreaks=True)
    elif fmt == "parquet":
        kw = dict(batch_size=batch_size) | (dict(columns=columns) if columns else {})
    try:
        return datasets.load_dataset(fmt, data_files=[str(path)], split="train", streaming=streaming,
                                     cache_dir=cache_dir, **kw)
    except ValueError as e:
        if "corresponds to no data" in str(e):
            raise _no_rows(label) from None
        raise _unreadable(label, fmt, e) from e
    except Exception as e:  # pyarrow / json parse errors: name the file
        raise _unreadable(label, fmt, e) from e


def _unreadable(label: str, fmt: str, e: Exception) -> ValueError:
    hint = " (one JSON object per line)" if fmt == "json" else ""
    return ValueError(f"could not read {label}: {type(e).__name__}: {e}; check that it is valid {fmt}{hint}")


def _load_columns(units: list[tuple[Path, str]], keys: list[str], split: str | None, fix: str,
                  cache_dir: str | None = None) -> list:
    """Each non-text input as a Dataset with its columns `keys` checked to hold strings (the other columns kept)."""
    parts = []
    for path, fmt in units:
        ds = _open(path, fmt, streaming=False, split=split, cache_dir=cache_dir)
        label = _label(path, fmt, split)
        if len(ds) == 0:
            raise _no_rows(label)
        for k in keys:
            check_string_field(ds, label, k, fix)
        parts.append(ds)
    return parts


def load_documents(paths: Iterable[str | Path], *, text_key: str = "text", doc_boundary: str = "blank-line",
                   split: str | None = None, cache_dir: str | None = None):
    """Every document of the inputs as one `datasets.Dataset` with the single column `text`, and the files read."""
    if doc_boundary not in DOC_BOUNDARIES:
        raise ValueError(f"doc_boundary={doc_boundary!r} is unknown: use one of {tuple(DOC_BOUNDARIES)}")
    units = resolve_inputs(paths)
    split = effective_split(units, split)
    with reading(units):
        return documents_dataset(units, text_key, doc_boundary, split, cache_dir), input_files(units, split)


def documents_dataset(units: list[tuple[Path, str]], text_key: str, doc_boundary: str, split: str | None,
                      cache_dir: str | None = None):
    """The documents of `units` (from `resolve_inputs`) as one Dataset with the single column `text` (call inside
    `reading(units)`)."""
    import datasets

    parts = []
    for path, fmt in units:
        if fmt == "text":
            parts.append(_open(path, fmt, streaming=False, split=split, doc_boundary=doc_boundary, cache_dir=cache_dir))
            continue
        ds = _load_columns([(path, fmt)], [text_key], split, TEXT_FIX, cache_dir)[0].select_columns([text_key])
        parts.append(ds.rename_column(text_key, "text") if text_key != "text" else ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    # paragraphs come with their trailing newline(s); strip them so a document is its text only
    ds = ds.map(lambda b: {"text": [t.strip("\n") for t in b["text"]]}, batched=True)
    ds = ds.filter(lambda b: [len(t.strip()) > 0 for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise _no_documents(units)
    return ds


def _no_documents(units) -> ValueError:
    return ValueError(f"inputs {[str(p) for p, _ in units]} hold no non-empty document: give a corpus with text")


def _refuse_text(units, what: str) -> None:
    for path, fmt in units:
        if fmt == "text":
            raise ValueError(f"input {str(path)!r} is a text file: {what} need json/jsonl/parquet/arrow rows or a "
                             f"saved dataset holding both fields")


def examples_dataset(units: list[tuple[Path, str]], prompt_key: str, completion_key: str, split: str | None,
                  fix: str) -> "datasets.Dataset":  # noqa: F821
    """Rows of the (non-text) inputs as one Dataset with the columns `prompt`, `completion` (texts kept verbatim;
    call inside `reading(units)`)."""
    import datasets

    _refuse_text(units, "--prompt-key/--completion-key")
    parts = [ds.map(lambda b: {"prompt": b[prompt_key], "completion": b[completion_key]}, batched=True,
                    remove_columns=ds.column_names)
             for ds in _load_columns(units, [prompt_key, completion_key], split, fix)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _iter_rows(path: Path, fmt: str, keys: list[str], *, split: str | None, doc_boundary: str, batch_size: int,
               fix: str) -> Iterator[dict]:
    """Stream one input in batches {key: [str, ...]} of its columns `keys`, checking columns and values."""
    label = _label(path, fmt, split)
    ds = _open(path, fmt, streaming=True, split=split, doc_boundary=doc_boundary, batch_size=batch_size)
    if fmt != "text":
        cols = list(ds.features) if ds.features is not None else None
        if cols is not None and cols:  # (json without rows has no features: reported below as holding no rows)
            for k in keys:
                if k not in cols:
                    raise _no_field(label, k, cols, fix)
            if fmt == "parquet" and cols != keys:  # read only the columns used
                ds = _open(path, fmt, streaming=True, split=split, columns=keys, batch_size=batch_size)
            elif cols != keys:
                ds = ds.select_columns(keys)
    it = iter(ds.iter(batch_size=batch_size))
    row = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except Exception as e:  # parse errors surface while streaming: name the file
            raise _unreadable(label, fmt, e) from e
        for k in keys:
            if k not in batch:
                raise _no_field(label, k, list(batch), fix)
            for j, v in enumerate(batch[k]):
                if not isinstance(v, str):
                    raise _bad_value(label, k, row + j, v)
        row += len(batch[keys[0]])
        yield batch
    if row == 0 and fmt != "text":
        raise _no_rows(label)


def iter_documents(units: list[tuple[Path, str]], *, text_key: str = "text", doc_boundary: str = "blank-line",
                   split: str | None = None, batch_size: int = 1000) -> Iterator[list[str]]:
    """Stream the documents of `units` (from `resolve_inputs`) in order, in batches of at most `batch_size`: the
    documents `load_documents` returns, without holding more than a batch."""
    if doc_boundary not in DOC_BOUNDARIES:
        raise ValueError(f"doc_boundary={doc_boundary!r} is unknown: use one of {tuple(DOC_BOUNDARIES)}")
    n = 0
    with reading(units):
        for path, fmt in units:
            key = "text" if fmt == "text" else text_key
            for batch in _iter_rows(path, fmt, [key], split=split, doc_boundary=doc_boundary, batch_size=batch_size,
                                    fix=TEXT_FIX):
                docs = [t.strip("\n") for t in batch[key]]
                docs = [t for t in docs if t.strip()]
                if docs:
                    n += len(docs)
                    yield docs
    if n == 0:
        raise _no_documents(units)


def iter_examples(units: list[tuple[Path, str]], prompt_key: str, completion_key: str, split: str | None, fix: str,
                  batch_size: int = 1000) -> Iterator[dict]:
    """Stream the rows of `units` in order as batches {"prompt": [...], "completion": [...]} (texts verbatim)."""
    _refuse_text(units, "--prompt-key/--completion-key")
    with reading(units):
        for path, fmt in units:
            for batch in _iter_rows(path, fmt, [prompt_key, completion_key], split=split, doc_boundary="blank-line",
                                    batch_size=batch_size, fix=fix):
                yield {"prompt": batch[prompt_key], "completion": batch[completion_key]}
