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
