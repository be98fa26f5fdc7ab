"""A plain per-token MoE (tests only): the reference ressformer.moe.MoEBlock's dropless batching is checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ressformer.moe import MoEBlock


@torch.no_grad()
def reference_moe(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Route and run every token on its own: x (B, T, D) -> y (B, T, D)."""
    B, T, D = x.shape
    h = x.reshape(B * T, D)
    out = torch.zeros_like(h)
    W = block.experts
    for n in range(h.shape[0]):
        probs = torch.softmax(block.gate.weight.float() @ h[n].float(), dim=-1)  # (E,)
        top = torch.topk(probs, block.top_k).indices.tolist()
        wsum = sum(probs[e].item() for e in top)
        for e in top:
            gu = W.gate_up_proj[e] @ h[n]  # (2F,)
            g, u = gu[:W.hidden], gu[W.hidden:]
            out[n] += (probs[e].item() / wsum) * (W.down_proj[e] @ (F.silu(g) * u))
        if block.shared_experts is not None:
            s = block.shared_experts
            gu = s.gate_up_proj.weight @ h[n]
            g, u = gu[:s.hidden], gu[s.hidden:]
            out[n] += s.down_proj.weight @ (F.silu(g) * u)
    return out.reshape(B, T, D)
