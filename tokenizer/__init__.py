"""Tokenizer training (`python -m tokenizer.train`) and pretraining-data preprocessing (`python -m tokenizer.preprocess`).

`Tokenizer` (tokenizer/tokenizer.py) wraps a trained sentencepiece model and is the tokenizer every other part of
the project uses. Heavy imports (sentencepiece, datasets, megatron-core) happen inside functions.
"""

from .tokenizer import META_FILE, MODEL_FILE, Tokenizer, pad_vocab

__all__ = ["Tokenizer", "META_FILE", "MODEL_FILE", "pad_vocab"]
