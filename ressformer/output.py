"""The output contract shared by both architectures, and their common tail (final-norm states -> logits, LM loss).

`logits_and_loss` is the one place that decides whether the logits exist: a training forward with labels needs only
the loss, which ressformer.kernels.fused_loss computes from the hidden states and the lm_head weight in chunks
(at T = 32k, V = 32k the (B, T, V) logits with their float32 copies and gradient are ~10 GiB per sample). A forward
without labels, or in eval mode (evaluation, generation, conversion), returns logits as before; `return_logits`
overrides the default either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ressformer.kernels import use_lm_loss_kernel


@dataclass
class ModelOutput:
    """`model(input_ids, labels=None)` returns this.

    logits: (B, T, V); None when the forward did not return them (`logits_and_loss`: a training forward with labels
            whose loss the fused kernel computed, or return_logits=False).
    loss:   LM cross-entropy + sum of the weighted auxiliary losses (None without labels).
    lm_loss: the LM cross-entropy alone (None without labels).
    aux_losses: name -> weighted scalar tensor that is part of `loss` (moe_balance, moe_z, soes_smooth).
    diagnostics: name -> detached float tensor for logging (attention sparsity, expert load, gate means per step).
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def aux(self) -> dict[str, torch.Tensor]:
        return {**self.aux_losses, **self.diagnostics}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, HF convention: labels == input_ids (B, T); position t predicts labels[t + 1].

    logits (B, T, V) are shifted here and scored in float32; labels equal to `ignore_index` are skipped.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits (B, T) {tuple(logits.shape[:2])}; "
                         "pass labels=input_ids (the shift happens inside)")
    import torch.nn.functional as F

    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                           ignore_index=ignore_index)


def logits_and_loss(lm_head: torch.nn.Linear, h: torch.Tensor, labels: torch.Tensor | None, training: bool, *,
                    return_logits: bool | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits (B, T, V) | None, lm_loss | None) from the final-norm hidden states h (B, T, D).

    return_logits None: logits unless `training` and labels are given and use_lm_loss_kernel(h)
    (CUDA + liger-kernel by default): then the fused kernel computes the loss and logits is None. True: logits and
    lm_loss(logits, labels) always. False: no logits; the loss fused when the kernel mode allows (needs labels).
    """
    if return_logits is False and labels is None:
        raise ValueError("return_logits=False without labels leaves nothing to compute: pass labels, or "
                         "return_logits=None / True for the logits")
    if labels is not None and (return_logits is False or (return_logits is None and training)):
        if use_lm_loss_kernel(h):
            from ressformer.kernels.fused_loss import linear_cross_entropy

            return None, linear_cross_entropy(h, lm_head.weight, labels, bias=lm_head.bias)
    logits = lm_head(h)  # (B, T, V)
    loss = lm_loss(logits, labels) if labels is not None else None
    return (None if return_logits is False else logits), loss
