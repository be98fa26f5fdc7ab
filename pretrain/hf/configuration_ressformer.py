"""`RessformerConfig`: the transformers config of an exported ReSSFormer (remote code, see pretrain/convert.py).

Design choices
- The model config of the training run is stored verbatim as the nested dict `ressformer`
  (`ressformer.ModelConfig.to_dict()`), so conversion back to our format is lossless and the config
  validation stays in one place (ModelConfig), run when the model is built.
- `num_steps`: recurrent R2MU steps K used by forward/generate when the call does not pass `num_steps`;
  None means the training value `ressformer["r2mu"]["steps"]` (paper sec. 3.1: K can grow at inference).
- `use_cache` (default True): generation decodes with the model's cache (transformers 5 drops generation keys
  from a config's kwargs, so it is set after the base init).
- The usual transformers fields (vocab_size, hidden_size, num_attention_heads, num_hidden_layers,
  max_position_embeddings, tie_word_embeddings) are derived from `ressformer` for tools that read them
  (lm-eval takes max_length from max_position_embeddings). They are informative only.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class RessformerConfig(PretrainedConfig):
    model_type = "ressformer"

    def __init__(self, ressformer: dict | None = None, num_steps: int | None = None, **kwargs):
        self.ressformer = dict(ressformer or {})
        if num_steps is not None and int(num_steps) < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1 (or None for the training value r2mu.steps)")
        self.num_steps = None if num_steps is None else int(num_steps)
        r = self.ressformer
        self.vocab_size = r.get("vocab_size", kwargs.pop("vocab_size", None))
        self.hidden_size = r.get("d_model", kwargs.pop("hidden_size", None))
        self.num_attention_heads = r.get("n_heads", kwargs.pop("num_attention_heads", None))
        self.max_position_embeddings = r.get("max_seq_len", kwargs.pop("max_position_embeddings", None))
        r2 = r.get("r2mu", {})
        if r.get("arch") == "transformer":
            self.num_hidden_layers = r.get("n_layers")
        else:  # compute depth at the training K
            self.num_hidden_layers = r2.get("n_prelude", 0) + r2.get("steps", 0) + r2.get("n_coda", 0) or None
        kwargs.pop("num_hidden_layers", None)
        kwargs["tie_word_embeddings"] = bool(r.get("tie_embeddings", kwargs.get("tie_word_embeddings", False)))
        use_cache = bool(kwargs.pop("use_cache", True))
        super().__init__(**kwargs)
        self.use_cache = use_cache  # generate() decodes with the model's cache (see the modeling file)
