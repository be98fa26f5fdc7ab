"""Fused kernels for ressformer's memory-heavy paths; the PyTorch code they replace stays the reference.

asam_triton.topk_attention: ASAM's per-query top-k attention with a sparse activation (attention.py
`_gathered_attend`), reading the selected keys / values by index instead of gathering them.
fused_loss.linear_cross_entropy: the LM head + next-token cross-entropy in chunks (liger-kernel's cross-entropy
kernel; no host read, unlike liger's own wrapper), never forming the (B, T, V) logits;
ressformer.output.logits_and_loss decides when it runs.

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
and `moe_experts` (`set_moe_experts`) for the routed experts' matmuls (moe.MoEExperts):
    "auto"        CUDA: torch._grouped_mm for bfloat16 on compute capability 9.x / 10.x with 16-byte aligned widths
                  (torch 2.13 runs its CUTLASS grouped GEMM there, offsets on the device; elsewhere torch falls
                  back to a loop that copies the offsets to the host), else "padded". CPU: the loop (a host read
                  costs no device sync there, and the loop is the fastest: "padded" takes 1.4x its time at the
                  debug preset's widths, 2.8x at 125m's, 2048 tokens fp32 fwd+bwd); under torch.compile
                  torch._grouped_mm for aligned float32 and bfloat16 (the CPU kernel gives the loop's results bit
                  for bit; the graph fuses the gather, SwiGLU and weighted sum around it), else the loop as one
                  opaque op (see "loop")
    "grouped_mm"  always torch._grouped_mm (on CPU too: the loop's results bit for bit in torch 2.13, 1-2x its
                  speed, bench/moe_experts.py; on CPU as ops of ours, moe._grouped_linear, which compile in
                  float32 and bfloat16; on CUDA it compiles for bfloat16 only); an error when torch lacks it or
                  the widths are not 16-byte multiples
    "padded"      batched matmuls over tiles of rows sorted by expert, every shape static (moe.MoEExperts.padded):
                  no host read on any device or dtype, at the price of up to 1.5x the rows and a transient copy of
                  the weights per tile
    "loop"        one matmul per expert on the token counts read on the host (the reference); under
                  torch.compile the same loop as one custom op (moe._experts_loop, its backward written out), so
                  the read stays inside the op and the graph neither breaks nor recompiles (on CUDA the read still
                  waits for the device)
and `expert_weight_grad` (`set_expert_weight_grad`) for the weight gradients of routed experts that a recurrent
forward calls K times (the shared block's):
    "auto"      "stacked" where a step's rows hold fewer elements than the weights (R (O + I) < E O I for
                gate_up_proj (E, O, I), R rows a step: 125m at 1024 tokens a step; the debug preset only below 103
                tokens), else "per_step". Stacking copies each step's rows once and saves a weight-sized gradient
                written and summed per step: at 125m (1024 tokens) it made the compiled step 0.932x, forced at the
                debug preset (1024 tokens) 1.048x (bench/RESULTS.md)
    "stacked"   where the calls run moe._grouped_linear (CPU, grouped_mm path) with gradients, their K weight
                gradients sum as one grouped matmul per weight after the K steps' backward (moe.ExpertWeightTaps:
                each expert's K R / E rows at once); each step's output gradients and inputs are held until then
    "per_step"  each step's backward computes its own weight gradient, and autograd sums the K of them
triton and liger_kernel are imported only when a kernel is about to run, so ressformer imports without them.
"""

from __future__ import annotations

import torch

KERNEL_MODES = ("auto", "triton", "torch")
LM_LOSS_KERNEL_MODES = ("auto", "liger", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

asam_kernel = "auto"
lm_loss_kernel = "auto"


def _checked(mode: str, modes: tuple[str, ...], what: str) -> str:
    """mode, when it is one of `modes`; else a ValueError naming `what` and the choices."""
    if mode not in modes:
        raise ValueError(f"{what} mode {mode!r}: choose one of {modes}")
    return mode


def set_asam_kernel(mode: str) -> None:
    """Choose the implementation of ASAM's top-k gradient pass: auto | triton | torch."""
    global asam_kernel
    asam_kernel = _checked(mode, KERNEL_MODES, "asam kernel")


def triton_available() -> bool:
    """Whether triton imports (the import happens here, once)."""
    from ressformer.kernels import asam_triton

    return asam_triton.triton is not None


def _use_kernel(mode: str, modes: tuple[str, ...], name: str, lib: str, available, x: torch.Tensor) -> bool:
    """The decision of a mode switch: "torch" never, the forced mode (modes[1]) always (an error when the library
    is missing), "auto" for CUDA tensors in KERNEL_DTYPES when `available()`."""
    if mode == "torch":
        return False
    if mode == modes[1]:
        if not available():
            raise RuntimeError(f"ressformer.kernels.{name} is {mode!r} but {lib} is not installed: "
                               f"pip install -e '.[gpu]' (or set_{name}('auto'))")
        return True
    if mode == "auto":
        return x.is_cuda and x.dtype in KERNEL_DTYPES and available()
    raise ValueError(f"ressformer.kernels.{name}={mode!r}: choose one of {modes}")


def use_asam_kernel(q: torch.Tensor) -> bool:
    """Whether ASAM's top-k attention of q runs the Triton kernel under the current `asam_kernel` mode."""
    return _use_kernel(asam_kernel, KERNEL_MODES, "asam_kernel", "triton", triton_available, q)


def set_lm_loss_kernel(mode: str) -> None:
    """Choose the implementation of the LM loss when no logits are returned: auto | liger | torch."""
    global lm_loss_kernel
    lm_loss_kernel = _checked(mode, LM_LOSS_KERNEL_MODES, "lm loss kernel")


def liger_available() -> bool:
    """Whether liger_kernel imports (the import happens here, once)."""
    from ressformer.kernels import fused_loss

    return fused_loss.liger_cross_entropy_kernel is not None


def use_lm_loss_kernel(h: torch.Tensor) -> bool:
    """Whether the LM loss of final hidden states h runs liger's fused kernel under the `lm_loss_kernel` mode."""
    return _use_kernel(lm_loss_kernel, LM_LOSS_KERNEL_MODES, "lm_loss_kernel", "liger-kernel", liger_available, h)


def lm_loss_chunk_rows(rows: int, vocab: int, width: int) -> int:
    """Rows per chunk of the fused LM loss (fused_loss.linear_cross_entropy; pretrain.memory_estimate counts one
    chunk's logits): liger's rule, a chunk's logits about as many elements as the hidden states (rows x width),
    next_power_of_2(ceil(rows / ceil(vocab / width))) rows, at most `rows`."""
    per = -(-vocab // width)
    return min(1 << (-(-rows // per) - 1).bit_length(), rows)


MOE_EXPERTS_MODES = ("auto", "grouped_mm", "padded", "loop")
moe_experts = "auto"


def set_moe_experts(mode: str) -> None:
    """Choose how the routed experts' matmuls run: auto | grouped_mm | padded | loop."""
    global moe_experts
    moe_experts = _checked(mode, MOE_EXPERTS_MODES, "moe experts")


EXPERT_WEIGHT_GRAD_MODES = ("auto", "stacked", "per_step")
expert_weight_grad = "auto"


def set_expert_weight_grad(mode: str) -> None:
    """Choose how a recurrent forward's routed experts get their weight gradients: auto | stacked | per_step."""
    global expert_weight_grad
    expert_weight_grad = _checked(mode, EXPERT_WEIGHT_GRAD_MODES, "expert weight grad")


def stack_expert_weight_grads(rows: int, weight_shape: tuple[int, ...]) -> bool:
    """Whether, under the `expert_weight_grad` mode, the weight gradients of routed experts called on `rows` rows
    a call with the first weight of shape (E, O, I) sum over the calls as one grouped matmul ("stacked")."""
    n_groups, n_out, n_in = weight_shape
    return expert_weight_grad == "stacked" or (expert_weight_grad == "auto"
                                               and rows * (n_out + n_in) < n_groups * n_out * n_in)


def _native_grouped_mm(device: torch.device) -> bool:
    """Whether torch._grouped_mm runs its device-offset kernel on this CUDA device: compute capability 9.x or 10.x
    (torch's `_scaled_mm_allowed_device(sm90_only, sm100_only)`). torch.compile folds get_device_properties to a
    constant."""
    return torch.cuda.get_device_properties(device).major in (9, 10)


def experts_path(x: torch.Tensor, widths: tuple[int, ...], compiling: bool | None = None) -> str:
    """How the experts' matmuls of tokens x (n, D) with weight widths `widths` (D, F, ...) run under the
    `moe_experts` mode: "grouped_mm", "padded" or "loop". torch._grouped_mm needs every row stride a multiple of
    16 bytes. compiling: whether the matmuls run under torch.compile (None: whether this call is traced)."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if moe_experts in ("loop", "padded"):
        return moe_experts
    aligned = all(w * x.element_size() % 16 == 0 for w in widths)
    if moe_experts == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError(f"ressformer.kernels.moe_experts is 'grouped_mm' but torch {torch.__version__} has no "
                               "torch._grouped_mm: upgrade torch or set_moe_experts('auto')")
        if not aligned:
            raise ValueError(f"ressformer.kernels.moe_experts is 'grouped_mm' but the expert widths {widths} times "
                             f"{x.element_size()} bytes ({x.dtype}) are not multiples of 16 bytes, which "
                             "torch._grouped_mm requires: choose d_model and ffn_hidden multiples of "
                             f"{16 // x.element_size()}, or set_moe_experts('auto')")
        return "grouped_mm"
    if moe_experts == "auto":
        # traceable dtypes: CPU runs the grouped GEMM as ops of ours (moe._grouped_linear), float32 too; CUDA runs
        # torch's op, whose fake tensors take bfloat16 only
        dtypes = (torch.bfloat16,) if x.is_cuda else (torch.float32, torch.bfloat16)
        grouped = aligned and x.dtype in dtypes and hasattr(torch, "_grouped_mm")
        if not x.is_cuda:
            return "grouped_mm" if grouped and compiling else "loop"
        return "grouped_mm" if grouped and _native_grouped_mm(x.device) else "padded"
    raise ValueError(f"ressformer.kernels.moe_experts={moe_experts!r}: choose one of {MOE_EXPERTS_MODES}")


def custom_op(name: str, module: str, **kwargs):
    """torch.library.custom_op for an op of ressformer named `name`, defined by the module named `module`, under a
    namespace where no op of that name exists yet: "ressformer" for the package's own modules, "ressformer_<i>"
    (the first free i) for a copy of a module loaded under another name (an exported model's remote code,
    `transformers_modules.<folder>.ressformer_attention`) or a module executed again.

    torch replaces an op defined again under the same name: it destroys the first definition's registration, and
    every holder of the first (its CustomOpDef, an OpOverload in a compiled graph, the modules of a model built
    before) keeps a dangling operator handle, so calling the op then reads freed memory (a segmentation fault, or
    by chance the new definition). Defining each copy's ops under a namespace of their own replaces nothing."""
    namespaces = (["ressformer"] if module.split(".")[0] == "ressformer" else []) + [f"ressformer_{i}" for i in
                                                                                    range(1, 1 << 16)]
    ns = next(n for n in namespaces if not hasattr(getattr(torch.ops, n), name))
    return torch.library.custom_op(f"{ns}::{name}", **kwargs)
