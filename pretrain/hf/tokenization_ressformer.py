"""`RessformerTokenizer`: transformers tokenizer over the project's sentencepiece model (remote code).

Design choices
- Encoding and decoding are sentencepiece's own calls on the same `tokenizer.model` the training data was
  made with, so ids equal `tokenizer.Tokenizer.encode` exactly (a converted `tokenizer.json` BPE would
  have to re-implement sentencepiece's whitespace / digit splitting and could drift).
- `split_special_tokens=True`: text such as "<s>" is encoded as text, as our Tokenizer does, not as the
  special id. BOS/EOS are not added by default (the pretraining pipeline only appends EOS per document).
- Ids in the model's padding range (>= the sentencepiece vocab size, see tokenizer.pad_vocab) have no
  piece: decode skips them.
- Both files of our tokenizer folder are vocabulary files (`tokenizer.model`, `ressformer_tokenizer.json`), so
  `save_pretrained` writes both and `python -m pretrain.convert --to-ressformer` can rebuild the folder from it.
- The export sets `bos_token` to EOS (pretrain/convert.py: pretraining never saw a BOS); it is never added.
"""

from __future__ import annotations

import os
import shutil

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class RessformerTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model", "meta_file": "ressformer_tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, meta_file: str | None = None, **kwargs):
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("add_bos_token", False)
        kwargs.setdefault("add_eos_token", False)
        kwargs.setdefault("legacy", True)
        self.meta_file = meta_file
        super().__init__(vocab_file=vocab_file, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        saved = super().save_vocabulary(save_directory, filename_prefix)
        if not self.meta_file or not os.path.isfile(self.meta_file):
            return saved
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                           + self.vocab_files_names["meta_file"])
        if os.path.abspath(self.meta_file) != os.path.abspath(out):
            shutil.copyfile(self.meta_file, out)
        return (*saved, out)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(list(tokens))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if getattr(self, "add_bos_token", False) else []
        eos = [self.eos_token_id] if getattr(self, "add_eos_token", False) else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        n = self.sp_model.get_piece_size()
        special = set(self.all_special_ids) if skip_special_tokens else set()
        ids = [int(i) for i in token_ids if 0 <= int(i) < n and int(i) not in special]
        return self.sp_model.decode(ids)
