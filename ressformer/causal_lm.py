"""CausalLM: what ReSSFormerForCausalLM (model.py) and the dense TransformerForCausalLM (baseline.py) share.

    embed_tokens -> [the subclass's units] -> norm -> lm_head

The base owns `model.embed_tokens`, `model.norm` and `lm_head` (tied to the embedding when cfg.tie_embeddings),
the initialisation plan of those and of `model.layers` (output projections scaled by 1/sqrt(2 * depth)),
the activation-checkpointing and torch.compile hooks, parameter counts and the forward's tail: final norm, logits /
LM loss (output.logits_and_loss), MoE aux losses (moe.moe_aux) and loss = LM loss + every weighted aux loss.
A subclass builds `self.model` (with embed_tokens, layers, norm), sets `arch` and `depth`, and implements
`_forward` and `_forward_cached`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ressformer.attention import ASAMAttention
from ressformer.config import ModelConfig
from ressformer.initialization import Plan, layer_rules, normal, ones, run_plan
from ressformer.kernels import use_lm_loss_kernel
from ressformer.moe import moe_aux
from ressformer.output import ModelOutput, lm_loss, logits_and_loss
from ressformer.sequence_parallel import sequence_parallel_error


class CausalLM(nn.Module):
    """A causal LM. forward(input_ids (B, T), labels=None, num_steps=None, cache=None, return_logits=None)
    -> ModelOutput.

    Logits: a training-mode forward with labels returns logits=None when the fused LM-head kernel computed its loss
    (CUDA + liger-kernel by default, ressformer.kernels.lm_loss_kernel); without labels or in eval mode they come
    back. return_logits=True always returns them, False never (ressformer.output.logits_and_loss); a forward with a
    cache always returns them.
    """

    arch: str  # the config.arch this class builds

    def __init__(self, config: ModelConfig, model: nn.Module):
        super().__init__()
        if config.arch != self.arch:
            raise ValueError(f"{type(self).__name__} needs arch={self.arch!r}, got arch={config.arch!r}; "
                             "use ressformer.build_model(cfg) to pick the class from the config")
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._ckpt_fn: Callable | None = None
        self._ckpt_every = 1
        self.sp = None  # ressformer.sequence_parallel.SequenceShards: the forward sees a shard of each sequence

    def set_sequence_parallel(self, shards) -> None:
        """Train on shards of each sequence (ressformer.sequence_parallel): from now on input_ids (B, T/P) are this
        rank's shard and labels the same shard of `shift_labels(labels)` (already shifted: the last token of a shard
        scores the next shard's first); the loss, aux losses and diagnostics are the group's. None: whole
        sequences again."""
        if shards is not None:
            err = sequence_parallel_error(self.config, shards.size)
            if err:
                raise ValueError(err)
        self.sp = shards
        for module in self.modules():
            if isinstance(module, ASAMAttention):
                module.sp = shards

    @property
    def depth(self) -> int:
        """Blocks applied per forward (at the configured number of steps): scales the output projections' init."""
        raise NotImplementedError

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights
        if exclude_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def set_checkpointing(self, fn: Callable | None, every: int = 1) -> None:
        """Run every `every`-th checkpoint unit of the forward through fn(function, *args) (the calling convention
        of torch.utils.checkpoint.checkpoint); fn=None turns checkpointing off. The subclass says what a unit is."""
        if every < 1:
            raise ValueError(f"set_checkpointing: every={every} must be >= 1")
        self._ckpt_fn, self._ckpt_every = fn, every

    def _checkpointed(self, unit: int, fn: Callable, *args):
        """fn(*args), through the checkpointing hook when `unit` is one of the checkpointed ones."""
        if self._ckpt_fn is not None and unit % self._ckpt_every == 0:
            return self._ckpt_fn(fn, *args)
        return fn(*args)

    # --- torch.compile ------------------------------------------------------------------------
    def compile_units(self, **compile_kwargs) -> None:
        """torch.compile, in place, each unit the forward repeats, as torchtitan compiles each transformer block:
        the blocks of `model.layers` that `_compile_targets` names (nn.Module.compile), and `_compile_functions`
        (ReSSFormer: the whole recurrent step, R2MU memory + block, as one function); compile_kwargs go to
        torch.compile (backend, mode, fullgraph, dynamic). The embedding, loss tail and cached (generation) path stay
        eager. State_dict keys are unchanged, so checkpoints are those of the eager model.

        * The K loop calls one compiled step with three variants whatever K is: step 0 (no memory keys, no graph;
          S^(0) pooled when K > 1, not when K = 1) and steps >= 1, so neither a fixed nor a sampled K recompiles
          once they exist (eval / no-grad forwards are variants of their own).
          Identical blocks (the baseline's layers) share their graphs.
        * Activation checkpointing (`set_checkpointing`) wraps the eager unit function around the compiled code; the
          recomputation in backward runs the graphs the forward ran (see the setting below).
        * No graph break in a unit of any ASAM path (chunked; block with block_select query or chunk; reference),
          either SOES graph, routed experts or dense FFN, fp32 or bf16, with or without checkpointing:
          fullgraph=True compiles (tests/ressformer/test_compile.py). Nothing in the forward or backward reads the device
          on the host: top-k ties break on the device (selection.topk_first), block selection pads to a static
          bound (selection.max_kept_blocks), routed experts run torch._grouped_mm or the static-shape tiles
          (`ressformer.kernels.moe_experts`) - except on CPU, where "auto" runs the grouped GEMM as ops of ours
          (the per-expert loop as one op at widths it cannot take) and topk_first redoes its tied rows alone in
          one op (each reads the token counts or the tie flags inside the op: no graph break, and no device to
          stall).
        * Graph breaks left: whatever a caller disables (pretrain: expert-parallel MoE layers, ZeRO-3's gather
          hooks).
          torch.compile of the whole forward + loss instead of the units is one graph too, but specialises on K
          (the step loop is Python): one graph per K. Not checked on a GPU yet: the CUDA-only kernels inside or
          after the step, the Triton ASAM kernel (kernels.asam_triton) and the fused loss (kernels.fused_loss, whose
          host-read freedom is tested on CPU through Triton's interpreter); bench/gpu_check.sh's `step` checks the
          whole CUDA step under torch.cuda.set_sync_debug_mode.
        """
        # The recomputation of a checkpointed unit must run the graph its forward ran. A frame the unit reaches
        # with several shapes (ASAM sees T keys at step 0, T + memory keys after) holds a static and an
        # automatic-dynamic graph that both accept the first shape, and Dynamo's most-recently-used lookup may pick
        # the other one (other saved tensors: torch.utils.checkpoint raises; or other rounding). Insertion order
        # (process-wide; torchtitan does the same).
        torch._C._dynamo.eval_frame._set_lru_cache(False)
        for unit in self._compile_targets():
            unit.compile(**compile_kwargs)
        self._compile_functions(**compile_kwargs)

    def _compile_targets(self) -> list[nn.Module]:
        """The modules `compile_units` compiles: the blocks of `model.layers`."""
        return list(self.model.layers)

    def _compile_functions(self, **compile_kwargs) -> None:
        """Functions `compile_units` compiles besides the modules (none here)."""

    # --- initialisation -----------------------------------------------------------------------
    def init_plan(self) -> Plan:
        """Ordered (parameter name, in-place init) steps covering every parameter (ressformer.initialization):
        embedding, lm_head (untied), final norm, `extra_init_plan`, then the layers by `layer_rules`."""
        cfg = self.config
        std = cfg.init_std
        plan = [("model.embed_tokens.weight", normal(std))]
        if not cfg.tie_embeddings:
            plan.append(("lm_head.weight", normal(std)))
        plan.append(("model.norm.weight", ones))
        plan += self.extra_init_plan(std)
        out_std = std / math.sqrt(2 * self.depth)
        for i, layer in enumerate(self.model.layers):
            plan += layer_rules(f"model.layers.{i}.", layer, std, out_std)
        return plan

    def extra_init_plan(self, std: float) -> Plan:
        """Steps for the parameters outside the layers that the subclass adds (none here)."""
        return []

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.config.tie_embeddings:  # re-tie: `to_empty` after a meta-device build gives each module its own tensor
            self.lm_head.weight = self.model.embed_tokens.weight
        run_plan(self, self.init_plan())

    # --- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, num_steps: int | None = None,
                cache=None, return_logits: bool | None = None, documents: torch.Tensor | None = None) -> ModelOutput:
        """cache: None, or a ressformer.cache.ModelCache holding the earlier tokens of these sequences (empty at
        first): input_ids are then the new tokens only, their logits come back and the cache is updated (the
        training-time aux losses are not computed; `loss` is the LM loss of the new tokens).

        documents: None, or (B, T) the document id of each token of a packed window (`document_ids`): document
        masking, no token reads anything of another document, so each document's logits are those it has alone."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if documents is not None:
            if documents.shape != input_ids.shape or documents.dtype.is_floating_point:
                raise ValueError(f"documents must be integer document ids shaped like input_ids "
                                 f"{tuple(input_ids.shape)}, got {documents.dtype} {tuple(documents.shape)}")
            if not self.config.causal:
                raise ValueError("documents (document masking) needs causal=True: in encoder mode every token reads "
                                 "the whole window; run each document as its own row instead")
            documents = documents.to(input_ids.device)
        if cache is not None:
            if self.sp is not None:
                raise ValueError("a cache (generation) with sequence parallelism: not supported, it is a training "
                                 "layout; call set_sequence_parallel(None) first")
            if not self.config.causal:
                raise ValueError("a cache needs causal=True: in encoder mode every token attends to later ones")
            return self._forward_cached(input_ids, labels=labels, num_steps=num_steps, cache=cache,
                                        documents=documents)
        return self._forward(input_ids, labels=labels, num_steps=num_steps, return_logits=return_logits,
                             documents=documents)

    def _forward(self, input_ids: torch.Tensor, *, labels, num_steps, return_logits, documents) -> ModelOutput:
        raise NotImplementedError

    def _forward_cached(self, input_ids: torch.Tensor, *, labels, num_steps, cache, documents) -> ModelOutput:
        raise NotImplementedError

    def _output(self, h: torch.Tensor, *, labels: torch.Tensor | None, return_logits: bool | None,
                router_logits: list[torch.Tensor], aux_losses: dict | None = None,
                diagnostics: dict | None = None, moe_parts: list[dict | None] | None = None) -> ModelOutput:
        """The forward's tail from the last unit's states h (B, T, D): final norm, logits / LM loss, the MoE aux
        losses of `router_logits` (one entry per MoE call; moe_parts: those a unit computed itself, `moe.moe_aux`),
        loss = LM loss + the MoE losses + `aux_losses`."""
        hn = self.model.norm(h)  # (B, T, D)
        if self.sp is None:
            logits, lm = logits_and_loss(self.lm_head, hn, labels, self.training, return_logits=return_logits)
        else:
            logits, lm = self._sequence_parallel_loss(hn, labels, return_logits)
        moe_losses, moe_diagnostics = moe_aux(self.config.moe, router_logits, self.sp, moe_parts)
        aux_losses = {**moe_losses, **(aux_losses or {})}
        diagnostics = {**(diagnostics or {}), **moe_diagnostics}
        loss = None
        if labels is not None:
            loss = lm + sum(aux_losses.values()) if aux_losses else lm
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm, aux_losses=aux_losses, diagnostics=diagnostics)

    def _sequence_parallel_loss(self, hn: torch.Tensor, labels: torch.Tensor | None, return_logits: bool | None):
        """(logits of the shard | None, the group's LM loss | None): labels are the shard's shifted targets
        (`set_sequence_parallel`); the loss is the sum of the group's token losses over the group's count."""
        if labels is None:
            return self.lm_head(hn), None
        if labels.shape != hn.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} must be the shard's shifted targets shaped like its "
                             f"input_ids {tuple(hn.shape[:2])} (ressformer.sequence_parallel.shift_labels, then shard)")
        logits = None
        if (return_logits is False or (return_logits is None and self.training)) and use_lm_loss_kernel(hn):
            from ressformer.kernels.fused_loss import linear_cross_entropy

            ce = linear_cross_entropy(hn, self.lm_head.weight, labels, bias=self.lm_head.bias, shifted=True,
                                      reduction="sum")
        else:
            logits = self.lm_head(hn)  # (B, T/P, V)
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
        lm = self.sp.sum(ce) / self.sp.sum((labels != -100).sum().float()).clamp(min=1.0)
        return (None if return_logits is False else logits), lm

    def _cached_output(self, h: torch.Tensor, labels: torch.Tensor | None, diagnostics: dict | None = None):
        """The tail of a cached forward: logits (B, n, V) of the new tokens, their LM loss, no aux losses."""
        logits = self.lm_head(self.model.norm(h))  # (B, n, V)
        lm = lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=lm, lm_loss=lm, diagnostics=diagnostics or {})
