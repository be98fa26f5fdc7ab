"""`Tokenizer`: the one tokenizer object the rest of the project uses (trainer, preprocessing, converter).

Design choices
- A tokenizer folder holds `tokenizer.model` (a sentencepiece model) and `ressformer_tokenizer.json`
  (metadata: vocab sizes, special ids, model type, source hash). The metadata is *not* called
  `tokenizer.json`: that name means a Hugging Face fast tokenizer to every other tool.
- Special ids are fixed at training time (pad 0, unk 1, bos 2, eos 3) and read back from the
  sentencepiece model; loading checks that they agree with the metadata, so a folder whose files
  were mixed up fails here and not as a silently wrong model.
- `padded_vocab_size` rounds the sentencepiece size up to a multiple of 64 (tensor-core friendly
  embedding / lm_head shapes); the model's `vocab_size` must be at least this.
- BOS/EOS are added only on request: the pretraining pipeline appends one EOS per document itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

MODEL_FILE = "tokenizer.model"
META_FILE = "ressformer_tokenizer.json"
PAD_MULTIPLE = 64


def pad_vocab(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return ((n + multiple - 1) // multiple) * multiple


class Tokenizer:
    """Sentencepiece tokenizer loaded from a folder written by `python -m tokenizer.train`."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        model, meta = self.path / MODEL_FILE, self.path / META_FILE
        for f in (model, meta):
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer folder {str(self.path)!r} lacks {f.name}: "
                                        f"train one with `python -m tokenizer.train --input ... --out {self.path}`")
        self.meta = json.loads(meta.read_text())
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        got = {"vocab_size": self.sp.get_piece_size(), "pad_id": self.sp.pad_id(), "unk_id": self.sp.unk_id(),
               "bos_id": self.sp.bos_id(), "eos_id": self.sp.eos_id()}
        bad = {k: (v, self.meta.get(k)) for k, v in got.items() if self.meta.get(k) != v}
        if bad:
            raise ValueError(f"tokenizer folder {str(self.path)!r}: {MODEL_FILE} and {META_FILE} disagree on "
                             f"{bad} (model, metadata): the files come from different trainings; retrain the tokenizer")

    # --- special ids and sizes ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Pieces in the sentencepiece model (specials and byte pieces included)."""
        return self.sp.get_piece_size()

    @property
    def padded_vocab_size(self) -> int:
        """`vocab_size` rounded up to a multiple of 64: the smallest valid `ModelConfig.vocab_size`."""
        return pad_vocab(self.vocab_size)

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def source_sha256(self) -> str:
        return self.meta["source_sha256"]

    # --- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.sp.encode(text, out_type=int, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"cannot decode ids {bad[:5]}: outside [0, {self.vocab_size}) of {str(self.path)!r} "
                             f"(ids in the model's padding range {self.vocab_size}..{self.padded_vocab_size - 1} "
                             f"have no piece; mask them out before decoding)")
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, padded={self.padded_vocab_size}, "
                f"pad={self.pad_id}, unk={self.unk_id}, bos={self.bos_id}, eos={self.eos_id})")


class MegatronTokenizerAdapter:
    """The attributes megatron-core's GPTDataset reads from `config.tokenizer` (eod, pad, vocab_size, ...)."""

    def __init__(self, tok: Tokenizer):
        self.vocab_size = tok.vocab_size
        self.eod = tok.eos_id
        self.eos = tok.eos_id
        self.pad = tok.pad_id
        self.bos = tok.bos_id
        self.special_tokens_dict = {"pad_token": tok.pad_id, "eos_token": tok.eos_id, "bos_token": tok.bos_id,
                                    "unk_token": tok.unk_id}
        # part of megatron's cache hash: a different tokenizer gives a different index cache
        self.unique_identifiers = {"class": "ressformer.Tokenizer", "source_sha256": tok.source_sha256,
                                   "vocab_size": tok.vocab_size}
