"""The output contract shared by both architectures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """`model(input_ids, labels=None)` returns this.

    logits: (B, T, V).
    loss:   LM cross-entropy + sum of the weighted auxiliary losses (None without labels).
    lm_loss: the LM cross-entropy alone (None without labels).
    aux_losses: name -> weighted scalar tensor that is part of `loss` (moe_balance, moe_z, soes_smooth).
    diagnostics: name -> detached float tensor for logging (attention sparsity, expert load, gate means per step).
    """

    logits: torch.Tensor
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
