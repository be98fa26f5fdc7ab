"""`RessformerForCausalLM`: transformers PreTrainedModel + GenerationMixin around our training model.

Design choices
- No second implementation of the network: the wrapper builds `ressformer.build_model(ModelConfig)` (the
  training code, copied next to this file at export time with its `ressformer.x` imports rewritten to
  relative ones) and adopts its two top-level children, `model` and `lm_head`. The transformers state_dict
  keys are therefore exactly ours (`model.layers.N.self_attn.q_proj.weight`, ...) and the logits are the
  training model's bit for bit. The built model object is kept outside the module tree (`self._core`, a
  tuple) so its parameters are registered once; it shares the `model` / `lm_head` modules, so
  `from_pretrained`, `.to()` and dtype casts reach it.
- Recurrent steps K (R2MU, paper sec. 3.1): `forward(..., num_steps=K)` / `generate(..., num_steps=K)`,
  else `config.num_steps`, else the training value `r2mu.steps`.
- Cache (`past_key_values`): the model's own `ressformer.cache.ModelCache` (per recurrent step: keys / values,
  segment summaries, graph state; see that module), not a transformers `Cache`: generate() does not make a
  DynamicCache (`_supports_default_dynamic_cache` is False); forward makes a ModelCache when asked
  (`use_cache=True`, which generate passes from generation_config.use_cache, True in the export) and returns it,
  and `prepare_inputs_for_generation` then feeds only the tokens the cache has not seen. Logits equal the full
  forward's (within float rounding), so greedy / sampled generation gives the same tokens with and without it.
  `use_cache=None` (scoring: lm-eval loglikelihood, pretrain.evaluate) and `use_cache=False` run the plain full
  forward, which keeps no state. A cache is filled with one K: a later call with another num_steps raises.
- attention_mask: the network is causal and has no padding mask, so right padding is exact for the real
  tokens (lm-eval's batched loglikelihood) while left padding / holes would change them: rejected with an
  error. With a cache (generation) the mask must be all ones: a batch of prompts of equal length, or batch
  size 1.
- `documents` (B, T): document masking of packed windows, passed to the training model (each document's logits are
  those it has alone), in the full forward and with a cache; generate() does not pass it.
- `loss` is the language-modelling loss (`lm_loss`); the training-only aux losses (MoE balance / z, SOES
  smoothness) are not added.
- `from_pretrained` refuses a folder whose weights do not cover the model exactly: transformers would leave a
  missing tensor as it was allocated (`_init_weights` is a no-op here, the weights come from the folder) and only
  log a report, so the error names the missing, unexpected and misshaped keys instead.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from pretrain.hf.configuration_ressformer import RessformerConfig
from ressformer import build_model
from ressformer.cache import ModelCache
from ressformer.config import ModelConfig


class RessformerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RessformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["ReSSFormerBlock", "TransformerBlock"]

    def __init__(self, config: RessformerConfig):
        super().__init__(config)
        if not config.ressformer:
            raise ValueError("RessformerConfig.ressformer is empty: the export must store ModelConfig.to_dict() there")
        mcfg = ModelConfig.from_dict(config.ressformer)
        core = build_model(mcfg)
        self.model = core.model
        self.lm_head = core.lm_head
        self._core = (core,)  # not a registered submodule: shares model / lm_head
        if mcfg.tie_embeddings:
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        found = {"missing": sorted(info.get("missing_keys") or ()),
                 "unexpected": sorted(info.get("unexpected_keys") or ()),
                 "shape mismatches": sorted(f"{k}: {tuple(a)} in the files, {tuple(b)} in the model"
                                            for k, a, b in info.get("mismatched_keys") or ())}
        if any(found.values()) or info.get("error_msgs"):
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            parts = [f"{len(v)} {what} {v[:12]}" for what, v in found.items() if v]
            parts += [f"errors {info['error_msgs'][:4]}"] if info.get("error_msgs") else []
            raise RuntimeError(f"{where}: the weights do not match the model its config.json describes: "
                               f"{'; '.join(parts)}. The folder is incomplete or damaged: export it again with "
                               f"`python -m pretrain.convert`")
        return (model, info) if want_info else model

    @property
    def ressformer_model(self):
        """The training-code model object (`ReSSFormerForCausalLM` / `TransformerForCausalLM`) inside."""
        return self._core[0]

    def _init_weights(self, module):
        # The training model initialises itself (`init_weights`) when built; weights then come from the
        # checkpoint. transformers must not re-initialise anything with its own scheme.
        return

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor | None) -> None:
        if attention_mask is None:
            return
        m = attention_mask.to(torch.long)
        # right padding only: every row is 1...1 0...0 (non-increasing)
        if (m[:, 1:] > m[:, :-1]).any():
            raise ValueError("RessformerForCausalLM has no padding mask: left padding / holes in attention_mask "
                             "would change the logits of real tokens. Use padding_side='right' or batch size 1.")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own ModelCache (module docstring)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, num_steps: int | None = None, past_key_values=None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                documents: torch.LongTensor | None = None, **kwargs):
        """documents: (B, T) document id of each token of packed windows (document masking: each document's logits
        are those it has alone; ressformer.selection.document_ids makes them from EOS tokens), every call alike."""
        if input_ids is None:
            raise ValueError("RessformerForCausalLM.forward needs input_ids (inputs_embeds is not supported)")
        self._check_mask(attention_mask)
        k = num_steps if num_steps is not None else self.config.num_steps
        if past_key_values is None and not use_cache:  # the full forward, no state kept
            if labels is not None and attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            out = self._core[0](input_ids, labels=labels, num_steps=k, documents=documents)
            return CausalLMOutputWithPast(loss=out.lm_loss, logits=out.logits)
        cache = ModelCache() if past_key_values is None else past_key_values
        if not isinstance(cache, ModelCache):
            raise ValueError(f"past_key_values must be the ModelCache this model returned (or None), got "
                             f"{type(cache).__name__}: the model keeps per-step state a transformers Cache cannot hold")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("RessformerForCausalLM with a cache (generation) has no padding mask: give prompts of "
                             "equal length (no padding) or batch size 1")
        out = self._core[0](input_ids, labels=labels, num_steps=k, cache=cache, documents=documents)
        return CausalLMOutputWithPast(loss=out.lm_loss, logits=out.logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, num_steps=None,
                                      use_cache=None, **kwargs):
        if past_key_values is not None:  # only the tokens the cache has not seen
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "num_steps": num_steps,
                "past_key_values": past_key_values, "use_cache": use_cache}
