"""Pretraining data: blended megatron-core GPT datasets and a deterministic, resumable batch iterator.

Design choices
- Datasets are megatron-core's `BlendedMegatronDatasetBuilder` + `GPTDataset` over the
  `IndexedDataset` prefixes written by `python -m tokenizer.preprocess` (documents + EOS, packed
  back to back). `GPTDatasetConfig(create_attention_mask=False)` (a dense (1, T, T) mask per sample
  is 1 GiB at T = 32k; the model builds its own causal structure) and
  `add_extra_token_to_sequence=False`, so samples are disjoint windows of exactly `seq_len` tokens.
- Samples follow the Hugging Face convention: `{"input_ids": (T,), "labels": (T,)}` with
  labels == input_ids (the model shifts internally) and -100 where GPTDataset's loss mask is 0
  (padding samples, pad tokens). GPTDataset's loss_mask[j] belongs to predicting token j+1, so it
  masks labels[j+1].
- Index cache: megatron-core's builder builds it on rank 0, then a barrier, then the other ranks load it
  (upstream users hit missing-index errors when every rank built at once); outside a launched job a
  one-process group stands in (`pretrain.distributed.local_group`).
- megatron keys its index cache on the prefix path, seed, split and tokenizer; the content fingerprint
  of every prefix (`_fingerprint`) is added to that key, so a prefix re-written in place never reuses a
  stale document / sample index (it would silently give windows that straddle the wrong offsets).
- Loss masks (completion-only training): a prefix written with `--prompt-key/--completion-key` has a parallel
  `PREFIX.loss_mask` IndexedDataset (1 = training target). The same megatron datasets (same config, seed, split,
  sizes) are built over the mask prefixes; megatron's document / sample / shuffle indices depend only on the
  document lengths, which must be identical (checked), so mask sample i lines up with token sample i token for
  token, and labels[j] = -100 where mask[j] == 0. A blend mixes masked and unmasked prefixes only by refusal.
- Before megatron is called, every split of every prefix is checked to hold at least one document and
  `seq_len + 1` tokens: megatron spins forever on an empty split (seen: 45 minutes on a tiny corpus).
- Sampling is deterministic given the seed (GPTDataset shuffles with it). `TrainBatches` walks the
  global sample order like megatron's `MegatronPretrainingSampler`: each micro step consumes
  `micro_batch * dp_size` samples and rank r takes its slice. `consumed_samples` is the whole data
  position: saved in a checkpoint and passed back, the iterator continues with exactly the batches
  an uninterrupted run would see.
- Document masking (`document_mask: true`): each sample also carries `documents` (T,), the id of each token's
  document in the packed window (a new one after every EOS, and where tokens follow a run of pad tokens:
  `ressformer.selection.document_ids`), which the model turns into masks that keep every read inside a document.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pretrain.distributed import local_group

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_ROOT = "artifacts"
DEFAULT_TOKENIZER = f"{DEFAULT_ROOT}/tokenizer"
DEFAULT_PREFIX = f"{DEFAULT_ROOT}/data/shakespeare"
SPLIT_NAMES = ("train", "valid", "test")

def read_index(prefix: str | Path) -> dict:
    """Open PREFIX.idx with megatron-core's IndexedDataset reader and check it against PREFIX.bin; return the
    sequence lengths and document bounds.

    Raises ValueError naming the file and the fix when either file is missing, unreadable or truncated, or the
    pair does not match (a .bin from one run next to the .idx of another).
    """
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    redo = f"re-run `python -m tokenizer.preprocess ... --out {prefix} --force`"
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise ValueError(f"data prefix {str(prefix)!r}: {p} does not exist: {redo} (or fix data.blend)")
    with warnings.catch_warnings():  # megatron-core warns about absent GPU libraries on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    try:
        ds = IndexedDataset(str(prefix), mmap=True)
        # copies: the reader closes its memory map when it is collected, and views into it would then crash
        lengths, doc_idx, item = ds.sequence_lengths.copy(), ds.document_indices.copy(), ds.index.dtype_size
        del ds
    except (AssertionError, ValueError, struct.error, KeyError) as e:
        raise ValueError(f"{idx_path} is not a megatron IndexedDataset index or is truncated ({type(e).__name__}: "
                         f"{e}): {redo}") from None
    expect_bin = int(lengths.astype(np.int64).sum()) * item
    got_bin = bin_path.stat().st_size
    if got_bin != expect_bin:
        raise ValueError(f"{idx_path} does not match {bin_path}: the index describes {expect_bin} bytes of tokens, "
                         f"the .bin holds {got_bin}; the pair comes from different runs or was cut short: {redo}")
    if len(doc_idx) < 2 or doc_idx[0] != 0 or doc_idx[-1] != len(lengths):
        raise ValueError(f"{idx_path}: document index is empty or inconsistent ({len(doc_idx) - 1} documents): {redo}")
    return {"lengths": lengths, "document_indices": doc_idx, "dtype_size": item,
            "documents": len(doc_idx) - 1}


@dataclass
class DataConfig:
    """Where the pretraining tokens come from (the `data:` section of the run config). Constructing one checks
    the values; `check_files()` checks that the files exist."""

    blend: list = field(default_factory=lambda: [[1.0, DEFAULT_PREFIX]])
    """[[weight, prefix], ...]: megatron indexed datasets (PREFIX.bin / .idx) mixed by weight."""
    split: str = "949,50,1"
    """train,valid,test document proportions (a megatron split string)."""
    tokenizer: str = DEFAULT_TOKENIZER
    """Folder written by `python -m tokenizer.train` (tokenizer.model)."""
    cache_dir: str | None = None
    """megatron's index cache; default: <first prefix's folder>/index_cache."""
    num_workers: int = 0
    """DataLoader worker processes reading training batches."""
    document_mask: bool = False
    """Mask across document boundaries in packed windows: no token reads a key, R2MU memory or SOES edge of an earlier
    document (each document's logits are those it has alone). Not with asam.impl=block."""

    def __post_init__(self) -> None:
        if not isinstance(self.blend, (list, tuple)) or not self.blend:
            raise ValueError(f"data.blend={self.blend!r} must be a non-empty list of [weight, prefix] pairs, "
                             f"e.g. [[1.0, {DEFAULT_PREFIX!r}]]")
        blend = []
        for item in self.blend:
            if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], (str, Path)):
                raise ValueError(f"data.blend entry {item!r} must be [weight, prefix] (prefix without .bin/.idx)")
            w, prefix = item
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise ValueError(f"data.blend weight {w!r} for {prefix!r} is not a number: give a positive weight") from None
            if not np.isfinite(w) or w <= 0:
                raise ValueError(f"data.blend weight {w!r} for {prefix!r} must be positive: drop the prefix "
                                 f"from the blend instead of giving it weight <= 0")
            blend.append([w, str(prefix)])
        self.blend = blend
        prefixes = [p for _, p in blend]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"data.blend names a prefix twice ({prefixes}): merge the entries and add their weights")
        parts = self.split.replace("/", ",").split(",") if isinstance(self.split, str) else []
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            vals = []
        if not 1 <= len(vals) <= 3 or any(not 0 <= v < float("inf") for v in vals) or vals[0] <= 0:
            raise ValueError(f"data.split={self.split!r} must be 1-3 comma-separated non-negative numbers "
                             f"(train,valid,test) with train > 0, e.g. '949,50,1'")
        if not isinstance(self.document_mask, bool):
            raise ValueError(f"data.document_mask={self.document_mask!r} must be true or false")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers!r} must be an integer >= 0")
        for name in ("tokenizer", "cache_dir"):
            v = getattr(self, name)
            if not (isinstance(v, str) or (name == "cache_dir" and v is None)):
                raise ValueError(f"data.{name}={v!r} must be a folder path")

    def check_files(self) -> "DataConfig":
        """The tokenizer and every prefix exist and their indexes are readable (ValueError naming the file and
        the command that writes it). Reads every .idx: call once, before building datasets."""
        tok = Path(self.tokenizer)
        if not (tok / "tokenizer.model").is_file():
            raise ValueError(f"data.tokenizer={self.tokenizer!r} holds no tokenizer.model: train one with "
                             f"`python -m tokenizer.train --input ... --out {self.tokenizer}` "
                             f"(or `python -m pretrain.data prepare` for the default corpus)")
        for _, p in self.blend:
            if not (Path(f"{p}.bin").exists() or Path(f"{p}.idx").exists()):
                raise ValueError(f"data.blend prefix {p!r} has no {p}.bin / {p}.idx: write it with "
                                 f"`python -m tokenizer.preprocess --tokenizer {self.tokenizer} --input ... --out {p}` "
                                 f"(or `python -m pretrain.data prepare` for the default corpus)")
            read_index(p)
        return self

    @property
    def split_vector(self) -> list[float]:
        vals = [float(x) for x in self.split.replace("/", ",").split(",")]
        vals += [0.0] * (3 - len(vals))
        return [v / sum(vals) for v in vals]

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or str(Path(self.blend[0][1]).parent / "index_cache")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown data config fields {sorted(unknown)}: allowed {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def _check_splits(data_cfg: DataConfig, seq_len: int) -> None:
    """Refuse blends where a split of some prefix has no document or fewer than seq_len+1 tokens."""
    split = data_cfg.split_vector
    bounds = np.cumsum([0.0] + split)
    for _, prefix in data_cfg.blend:
        idx = read_index(prefix)
        n = idx["documents"]
        doc_tokens = np.add.reduceat(idx["lengths"].astype(np.int64), idx["document_indices"][:-1]) if n else []
        for i, name in enumerate(SPLIT_NAMES):
            if split[i] == 0:
                continue
            beg, end = int(round(bounds[i] * n)), int(round(bounds[i + 1] * n))  # megatron's rounding
            tokens = int(np.sum(doc_tokens[beg:end])) if end > beg else 0
            if end <= beg or tokens < seq_len + 1:
                raise ValueError(
                    f"data prefix {prefix!r} has {n} documents: split {data_cfg.split!r} gives the {name} split "
                    f"{max(end - beg, 0)} documents / {tokens} tokens, fewer than seq_len+1={seq_len + 1} "
                    f"(megatron would loop forever): add documents, or set that split's weight to 0")


def _fingerprint(prefix: str) -> str:
    """Cheap content identity of a prefix: sizes, its preprocess sidecar and the ends of its .idx."""
    h = hashlib.sha256()
    idx, bin_, side = Path(f"{prefix}.idx"), Path(f"{prefix}.bin"), Path(f"{prefix}.json")
    h.update(f"{idx.stat().st_size}:{bin_.stat().st_size}".encode())
    if side.is_file():
        h.update(side.read_bytes())
    with open(idx, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, idx.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()


def _mask_prefixes(data_cfg: DataConfig) -> list[str] | None:
    """The blend's PREFIX.loss_mask prefixes (same order), or None when no prefix has one; refuse a mix or a mismatch."""
    from tokenizer.preprocess import mask_prefix

    masks = [mask_prefix(p) for _, p in data_cfg.blend]
    has = [Path(f"{m}.bin").exists() or Path(f"{m}.idx").exists() for m in masks]
    if not any(has):
        return None
    if not all(has):
        without = [p for (_, p), h in zip(data_cfg.blend, has) if not h]
        raise ValueError(f"data.blend mixes prefixes with a loss mask and prefixes without one ({without} have no "
                         f".loss_mask.{{bin,idx}}): preprocess them with --prompt-key/--completion-key too, or train "
                         f"them in separate runs")
    for (_, prefix), m in zip(data_cfg.blend, masks):
        tokens, mask = read_index(prefix), read_index(m)
        if not (np.array_equal(tokens["lengths"], mask["lengths"])
                and np.array_equal(tokens["document_indices"], mask["document_indices"])):
            raise ValueError(f"{m}.idx does not match {prefix}.idx ({mask['documents']} vs {tokens['documents']} "
                             f"documents, or other document lengths): the mask was written for other data; re-run "
                             f"`python -m tokenizer.preprocess ... --out {prefix} --force` with --prompt-key/--completion-key")
    return masks


class HFSamples(torch.utils.data.Dataset):
    """A megatron GPT/Blended dataset seen as Hugging Face causal-LM samples {input_ids, labels}.

    `mask_dataset`: the same megatron dataset built over the loss-mask prefixes; labels[j] = -100 where its token j is 0.
    `documents`: (eos_id, pad_id) to add `documents` (T,) (document masking; module docstring), None: not added.
    """

    def __init__(self, megatron_dataset, mask_dataset=None, documents: tuple[int, int] | None = None) -> None:
        self.megatron, self.mask, self.documents = megatron_dataset, mask_dataset, documents
        # GPTDataset caches the loss mask of the first sample it serves *after* zeroing that sample's pad positions
        # in place (megatron-core 0.16.1), so every later sample would lose its labels where the first one had pads;
        # recomputing per sample (a ones vector) is cheap
        for d in getattr(megatron_dataset, "datasets", [megatron_dataset]):
            if hasattr(d, "masks_and_position_ids_are_cacheable"):
                d.masks_and_position_ids_are_cacheable = False

    def __len__(self) -> int:
        return len(self.megatron)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.megatron[int(i)]
        input_ids = s["tokens"].long()  # (T,)
        labels = input_ids.clone()  # (T,) HF convention: the model shifts
        # loss_mask[j] (float, (T,)) weighs predicting token j+1 -> it masks labels[j+1]
        labels[1:][s["loss_mask"][:-1] == 0] = -100
        if self.mask is not None:
            # (T,) 1 where token j is a training target; GPTDataset maps values equal to the pad id to 0 (pad is 0)
            labels[self.mask[int(i)]["tokens"] == 0] = -100
        if self.documents is not None:
            from ressformer.selection import document_ids

            eos, pad = self.documents
            return {"input_ids": input_ids, "labels": labels, "documents": document_ids(input_ids, eos, pad)}
        return {"input_ids": input_ids, "labels": labels}


def build_datasets(data_cfg: DataConfig, *, seq_len: int, seed: int,
                   num_samples: tuple[int, int, int]) -> tuple[HFSamples | None, HFSamples | None, HFSamples | None]:
    """Build (train, valid, test) over `data_cfg.blend`; a split with weight 0 or 0 samples is None.

    Every rank of a job calls this: megatron builds the index cache on rank 0, then the other ranks read it.
    """
    from tokenizer.io import source_hash
    from tokenizer.tokenizer import MODEL_FILE, MegatronTokenizerAdapter, Tokenizer

    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise ValueError(f"num_samples={num_samples!r} must be three non-negative counts (train, valid, test)")
    tok = Tokenizer(data_cfg.tokenizer)
    tok_sha = source_hash([tok.path / MODEL_FILE])
    for _, prefix in data_cfg.blend:
        side = Path(f"{prefix}.json")  # written by tokenizer.preprocess; absent for foreign megatron prefixes
        made_with = json.loads(side.read_text()).get("tokenizer_sha256") if side.is_file() else None
        if made_with not in (None, tok_sha):
            raise ValueError(f"data prefix {prefix!r} was tokenized with another tokenizer than data.tokenizer="
                             f"{data_cfg.tokenizer!r} (see {side}): re-run `python -m tokenizer.preprocess --tokenizer "
                             f"{data_cfg.tokenizer} ... --out {prefix} --force` or point data.tokenizer at the right folder")
    split = data_cfg.split_vector
    sizes = [int(n) if split[i] > 0 and int(n) > 0 else 0 for i, n in enumerate(num_samples)]
    split_str = ",".join(f"{v:.12f}" for v in split)  # no exponent (megatron parses [.0-9]+); unchanged by num_samples: documents never move between splits
    if sizes[0] == 0:
        raise ValueError(f"num_samples[0] (train) = {num_samples[0]} must be > 0")
    _check_splits(data_cfg, seq_len)
    masks = _mask_prefixes(data_cfg)
    cache = data_cfg.resolved_cache_dir()
    Path(cache).mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings():  # megatron-core warns about absent GPU libraries on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    mtok = MegatronTokenizerAdapter(tok)
    # megatron keys its cache on the prefix *path*; a prefix rewritten in place (preprocess --force) must not
    # reuse the old document / sample indices, so the data's identity joins the key through the tokenizer's
    prefixes = [p for _, p in data_cfg.blend]
    mtok.unique_identifiers["data"] = {p: _fingerprint(p) for p in prefixes + (masks or [])}

    def build(prefixes: list[str]):
        cfg = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_len, blend=(prefixes, [w for w, _ in data_cfg.blend]),
            split=split_str, path_to_cache=cache, tokenizer=mtok,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, add_extra_token_to_sequence=False, mmap_bin_files=True)
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()

    with local_group():
        tokens = build(prefixes)
        masks_ds = build(masks) if masks else [None] * 3
    docs = (tok.eos_id, tok.pad_id) if data_cfg.document_mask else None
    return tuple(HFSamples(d, m, docs) if d is not None and sizes[i] > 0 else None
                 for i, (d, m) in enumerate(zip(tokens, masks_ds)))


class _PretrainingBatchSampler(torch.utils.data.Sampler):
    """This rank's index lists, in megatron MegatronPretrainingSampler order, from `consumed` on, without end:
    past the last sample the order starts again from the first (sample i is dataset index i mod total)."""

    def __init__(self, total: int, consumed: int, micro_batch: int, dp_rank: int, dp_size: int) -> None:
        self.total, self.consumed, self.mb, self.rank, self.dp = total, consumed, micro_batch, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while True:
            first = start + self.rank * self.mb
            yield [i % self.total for i in range(first, first + self.mb)]
            start += self.mb * self.dp


def _collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}  # (micro_batch, T) each


class TrainBatches:
    """Deterministic, resumable iterator over this data-parallel rank's micro batches.

    Global order: micro step s covers samples [consumed + s*mb*dp, consumed + (s+1)*mb*dp), rank r gets
    the slice [r*mb, (r+1)*mb) of it (an optimizer step takes grad_accum micro steps: the trainer's count).
    `consumed_samples` counts samples consumed by all ranks up to the last batch yielded; save it in the
    checkpoint and pass it back to continue exactly.
    """

    def __init__(self, dataset, *, micro_batch: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 num_workers: int = 0) -> None:
        if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch >= 1 and 0 <= dp_rank < dp_size, got micro_batch={micro_batch}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0 or consumed_samples % (micro_batch * dp_size):
            raise ValueError(f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                             f"micro_batch*dp_size={micro_batch * dp_size} (the checkpoint was written with another "
                             f"batch layout)")
        if len(dataset) < micro_batch * dp_size:
            raise ValueError(f"the training split has {len(dataset)} samples, fewer than one micro batch on every "
                             f"rank ({micro_batch} x {dp_size}): use more data or a smaller micro_batch")
        self.dataset, self.micro_batch = dataset, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        sampler = _PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch, dp_rank, dp_size)
        self._loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate,
                                                   num_workers=num_workers, persistent_workers=False)
        self._it = iter(self._loader)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._it)
        self.consumed_samples += self.micro_batch * self.dp_size
        return batch

    @property
    def epochs_completed(self) -> int:
        """How often the order has gone past the last sample of the split (the trainer sizes the split so that
        this stays 0 up to the last step, skipped micro batches within their budget included)."""
        return self.consumed_samples // len(self.dataset)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}


def sample_ids(dataset: HFSamples, positions) -> np.ndarray:
    """(n, 5) int64 identity of the samples at `positions` of a split's order: blend member, first document and the
    offset in it, last document and the offset in it (megatron's sample index resolved). Equal rows are the same
    tokens; a different data blend, prefix content, split, seed, seq_len or sample budget shows as other rows."""
    m = dataset.megatron
    pos = np.asarray(positions, dtype=np.int64) % len(m)
    if hasattr(m, "dataset_index"):  # a BlendedDataset: member and position in it
        which = np.asarray(m.dataset_index)[pos].astype(np.int64)
        inner = np.asarray(m.dataset_sample_index)[pos].astype(np.int64)
        members = m.datasets
    else:
        which, inner, members = np.zeros_like(pos), pos, [m]
    out = np.zeros((len(pos), 5), dtype=np.int64)
    out[:, 0] = which
    for j, g in enumerate(members):
        sel = which == j
        if not sel.any():
            continue
        if g.shuffle_index is None:
            g._query_document_sample_shuffle_indices(0)  # megatron maps its indices lazily on the first read
        docs = np.asarray(g.document_index)
        s = np.asarray(g.shuffle_index)[inner[sel]]
        beg, end = np.asarray(g.sample_index)[s], np.asarray(g.sample_index)[s + 1]  # (k, 2) doc position, offset
        out[sel, 1], out[sel, 2] = docs[beg[:, 0]], beg[:, 1]
        out[sel, 3], out[sel, 4] = docs[np.minimum(end[:, 0], len(docs) - 1)], end[:, 1]
    return out


def stream_digest(dataset: HFSamples, n: int, probes: int = 4096, tail: int = 64) -> str | None:
    """sha256 of the identities (`sample_ids`) of the first `n` samples of the order: `probes` evenly spaced ones
    and the last `tail`. Saved with every checkpoint (consumed samples) and compared on resume, so a resume whose
    data stream differs from the one the checkpoint trained on is named, not silent."""
    if n <= 0:
        return None
    pos = np.unique(np.concatenate([np.linspace(0, n - 1, min(n, probes)).round().astype(np.int64),
                                    np.arange(max(0, n - tail), n, dtype=np.int64)]))
    return hashlib.sha256(sample_ids(dataset, pos).tobytes()).hexdigest()


def eval_batches(dataset, micro_batch: int, dp_rank: int, dp_size: int, num_batches: int) -> Iterator[dict]:
    """The first `num_batches` micro batches of `dataset` for this rank: the same samples at every evaluation."""
    need = num_batches * micro_batch * dp_size
    if need > len(dataset):
        raise ValueError(f"eval needs {need} samples (num_batches={num_batches} x micro_batch={micro_batch} x "
                         f"dp_size={dp_size}) but the split has {len(dataset)}: build it with more valid/test samples")
    for b in range(num_batches):
        first = (b * dp_size + dp_rank) * micro_batch
        yield _collate([dataset[i] for i in range(first, first + micro_batch)])


def prepare_default_data(root: str | Path = DEFAULT_ROOT, *, vocab_size: int = 512, num_proc: int = 1,
                         force: bool = False) -> DataConfig:
    """Train the default tokenizer and tokenize the embedded tinyshakespeare corpus (skipped when present)."""
    import fcntl

    from tokenizer.preprocess import preprocess
    from tokenizer.train import train_tokenizer

    root = Path(root)
    tok_dir, prefix = root / "tokenizer", root / "data" / "shakespeare"
    root.mkdir(parents=True, exist_ok=True)
    # Two jobs preparing the same folder at once (two `scripts/main.sh`, parallel test workers) take turns: the
    # second finds the first one's output up to date instead of overwriting files the first is still writing.
    with open(root / ".prepare.lock", "a") as lock:  # "a": taking the lock leaves the file untouched
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not (tok_dir / "tokenizer.model").is_file():
            train_tokenizer([DEFAULT_CORPUS], tok_dir, vocab_size=vocab_size, force=True)
        preprocess(tok_dir, [DEFAULT_CORPUS], prefix, num_proc=num_proc, force=force, progress=False)
    return DataConfig(blend=[[1.0, str(prefix)]], tokenizer=str(tok_dir))


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pretrain.data", description="Pretraining data helpers.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train the default tokenizer and tokenize data/tinyshakespeare (no download)")
    p.add_argument("--out", default=DEFAULT_ROOT, help="writes OUT/tokenizer and OUT/data/shakespeare.{bin,idx}")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    cfg = prepare_default_data(a.out, vocab_size=a.vocab_size, num_proc=a.num_proc, force=a.force)
    print(json.dumps(cfg.to_dict()))


if __name__ == "__main__":
    main()
