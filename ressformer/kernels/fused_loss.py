"""The LM head and next-token cross-entropy in one chunked pass (liger-kernel), so the (B, T, V) logits never exist.

linear_cross_entropy(h, weight, labels) equals ressformer.output.lm_loss(h @ weight.T, labels): position t predicts
labels[t + 1], labels equal to ignore_index are skipped, mean over the scored tokens, a float32 loss. Choices:
* liger's fused linear cross-entropy (`liger_fused_linear_cross_entropy`): the tokens go through in chunks whose
  logits hold about as many elements as h; the gradients of h and weight are computed in the forward and kept
  instead of the logits. The matmul runs in h's dtype, softmax and loss in float32, the weight gradient is
  accumulated in float32 (accum_dtype) and cast back.
* The shift moves the labels, not the hidden states: target = labels[:, 1:] with ignore_index appended per row, so h
  enters as a (B*T, D) view (no copy) and each sequence's last position scores nothing.
* A batch with no scored token gives 0 (with a zero gradient); lm_loss gives nan there (an empty mean).
* The weight is read in the model's forward, outside lm_head's: under ZeRO-3 DeepSpeed's engine gathers a parameter
  read there and registers it as an external parameter of the module running.
liger_kernel is imported with this module (ressformer.kernels imports it only when the fused loss is about to run);
on CPU its Triton kernels need the interpreter: TRITON_INTERPRET=1 set before this module is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except ImportError:  # the PyTorch path stays available
    liger_fused_linear_cross_entropy = None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, *, shifted: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy of logits h @ weight.T (+ bias) against labels, without forming the logits.

    h (B, T, D) final-norm hidden states, weight (V, D) the lm_head weight, labels (B, T) == input_ids (HF convention,
    the shift happens here; shifted=True: labels are already each position's target, as a sequence shard's are).
    reduction "sum": the sum over the scored tokens. Returns a float32 scalar.
    """
    if liger_fused_linear_cross_entropy is None:
        raise RuntimeError("the fused LM loss needs liger-kernel: pip install -e '.[gpu]' "
                           "(or ressformer.kernels.set_lm_loss_kernel('torch'))")
    if h.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden states (B, T) {tuple(h.shape[:2])}; "
                         "pass labels=input_ids (the shift happens inside)")
    B, T, D = h.shape
    target = (labels if shifted else F.pad(labels[:, 1:], (0, 1), value=ignore_index)).reshape(B * T)  # position
    #                                                                                    t scores labels[t + 1]
    try:
        loss = liger_fused_linear_cross_entropy(h.reshape(B * T, D), weight, target, bias=bias,
                                                ignore_index=ignore_index, reduction=reduction,
                                                accum_dtype=torch.float32)
    except RuntimeError as e:
        if h.is_cuda:
            raise
        raise RuntimeError(f"liger's fused LM loss on {h.device} tensors runs only in the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before ressformer.kernels.fused_loss is imported, or "
                           f"ressformer.kernels.set_lm_loss_kernel('auto') for the PyTorch path ({e})") from e
    return loss.float()
