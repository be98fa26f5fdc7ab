"""Fused kernels for ressformer's memory-heavy paths; the PyTorch code they replace stays the reference.

asam_triton.topk_attention: ASAM's per-query top-k attention with a sparse activation (attention.py
`_gathered_attend`), reading the selected keys / values by index instead of gathering them.
fused_loss.linear_cross_entropy: the LM head + next-token cross-entropy in chunks (liger-kernel), never forming the
(B, T, V) logits; ressformer.output.logits_and_loss decides when it runs.

Which path runs is a module-level choice, `asam_kernel` (set it with `set_asam_kernel`; the model package reads
no environment variables):
    "auto"   the Triton kernel for CUDA tensors in float32 / bfloat16 / float16 when triton imports, else PyTorch
    "triton" always the Triton kernel (CPU tensors need the Triton interpreter: TRITON_INTERPRET=1 set before
             ressformer.kernels.asam_triton is imported); an error when triton is missing
    "torch"  always the PyTorch path
and likewise `lm_loss_kernel` (`set_lm_loss_kernel`) for the loss of a forward that returns no logits:
    "auto"   liger for CUDA hidden states when liger_kernel imports, else PyTorch (logits, then output.lm_loss)
    "liger"  always liger (CPU tensors need TRITON_INTERPRET=1 set before ressformer.kernels.fused_loss is
             imported); an error when liger-kernel is missing
    "torch"  always the PyTorch path
triton and liger_kernel are imported only when a kernel is about to run, so ressformer imports without them.
"""

from __future__ import annotations

import torch

KERNEL_MODES = ("auto", "triton", "torch")
LM_LOSS_KERNEL_MODES = ("auto", "liger", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

asam_kernel = "auto"
lm_loss_kernel = "auto"


def set_asam_kernel(mode: str) -> None:
    """Choose the implementation of ASAM's top-k gradient pass: auto | triton | torch."""
    global asam_kernel
    if mode not in KERNEL_MODES:
        raise ValueError(f"asam kernel mode {mode!r}: choose one of {KERNEL_MODES}")
    asam_kernel = mode


def triton_available() -> bool:
    """Whether triton imports (the import happens here, once)."""
    from ressformer.kernels import asam_triton

    return asam_triton.triton is not None


def use_asam_kernel(q: torch.Tensor) -> bool:
    """Whether ASAM's top-k attention of q runs the Triton kernel under the current `asam_kernel` mode."""
    if asam_kernel == "torch":
        return False
    if asam_kernel == "triton":
        if not triton_available():
            raise RuntimeError("ressformer.kernels.asam_kernel is 'triton' but triton is not installed: "
                               "pip install -e '.[gpu]' (or set_asam_kernel('auto'))")
        return True
    if asam_kernel == "auto":
        return q.is_cuda and q.dtype in KERNEL_DTYPES and triton_available()
    raise ValueError(f"ressformer.kernels.asam_kernel={asam_kernel!r}: choose one of {KERNEL_MODES}")


def set_lm_loss_kernel(mode: str) -> None:
    """Choose the implementation of the LM loss when no logits are returned: auto | liger | torch."""
    global lm_loss_kernel
    if mode not in LM_LOSS_KERNEL_MODES:
        raise ValueError(f"lm loss kernel mode {mode!r}: choose one of {LM_LOSS_KERNEL_MODES}")
    lm_loss_kernel = mode


def liger_available() -> bool:
    """Whether liger_kernel imports (the import happens here, once)."""
    from ressformer.kernels import fused_loss

    return fused_loss.liger_fused_linear_cross_entropy is not None


def use_lm_loss_kernel(h: torch.Tensor) -> bool:
    """Whether the LM loss of final hidden states h runs liger's fused kernel under the `lm_loss_kernel` mode."""
    if lm_loss_kernel == "torch":
        return False
    if lm_loss_kernel == "liger":
        if not liger_available():
            raise RuntimeError("ressformer.kernels.lm_loss_kernel is 'liger' but liger-kernel is not installed: "
                               "pip install -e '.[gpu]' (or set_lm_loss_kernel('auto'))")
        return True
    if lm_loss_kernel == "auto":
        return h.is_cuda and h.dtype in KERNEL_DTYPES and liger_available()
    raise ValueError(f"ressformer.kernels.lm_loss_kernel={lm_loss_kernel!r}: choose one of {LM_LOSS_KERNEL_MODES}")
