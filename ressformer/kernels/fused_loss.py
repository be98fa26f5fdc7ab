"""The LM head and next-token cross-entropy in one chunked pass (liger-kernel's kernel), so the (B, T, V) logits
never exist, and nothing in it reads the device on the host.

linear_cross_entropy(h, weight, labels) equals ressformer.output.lm_loss(h @ weight.T, labels): position t predicts
labels[t + 1], labels equal to ignore_index are skipped, mean over the scored tokens, a float32 loss. How:
* Liger's scheme: the tokens go through in chunks whose logits hold about as many elements as h; for each chunk the
  logits (h's dtype) go to liger's cross-entropy Triton kernel (`liger_cross_entropy_kernel`: softmax and loss in
  float32), which overwrites them with their gradient; the gradients of h and weight are computed from it in the
  forward and kept instead of the logits (the weight's accumulated in float32, then cast to its dtype).
* The chunk loop is ours, not liger's `LigerFusedLinearCrossEntropyFunction`: liger's forward reads the number of
  scored tokens on the host (`.item()`, for the mean) and its backward compares the upstream gradient with 1 on the
  host (`torch.equal`), two waits of the host on the GPU's stream per step that also fail
  torch.cuda.set_sync_debug_mode("error"). Here the kernel runs with reduction "sum" (the count unused), the mean
  divides by the count on the device, and backward scales the kept gradients by the upstream gradient on the device.
  Same kernel, same chunk size rule, same float32 weight-gradient accumulation.
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

from ressformer.kernels import lm_loss_chunk_rows

try:
    import triton
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    from liger_kernel.ops.fused_linear_cross_entropy import MAX_FUSED_SIZE
except ImportError:  # the PyTorch path stays available
    liger_cross_entropy_kernel = None


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b (a, b of one dtype), accumulated in float32 inside the matmul where the GPU can."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda and torch.cuda.get_device_capability(acc.device)[0] >= 8:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over the rows whose target is not ignore_index of cross_entropy(h @ weight.T + bias, target); h (N, D),
    weight (V, D), bias (V,) | None, target (N,). Gradients are computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index: int):
        N, D = h.shape
        V = weight.shape[0]
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grads = need_h or need_w or need_b
        losses = torch.zeros(N, dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        gb = torch.zeros(V, dtype=torch.float32, device=h.device) if need_b else None
        dev = h.device.type  # the matmuls run in h's dtype, or autocast's where it is on (as lm_head's would)
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        w = weight.to(dtype)  # once, not once per chunk
        rows = lm_loss_chunk_rows(N, V, D) if N else 1
        for s in range(0, N, rows):
            hc = h[s:s + rows].to(dtype)
            logits = hc @ w.t()
            if bias is not None:
                logits = logits + bias.to(dtype)
            logits = logits.contiguous()
            tc = target[s:s + rows].contiguous()
            loss_c = losses[s:s + rows]
            liger_cross_entropy_kernel[(hc.shape[0],)](
                X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=tc, Y_stride=tc.stride(-1), weight_ptr=None,
                loss_ptr=loss_c, z_loss_ptr=None, loss_stride=loss_c.stride(-1), token_accuracy_ptr=None,
                token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=V,
                n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=ignore_index,
                lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False,
                RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
                HAS_GRADIENTS=grads, BLOCK_SIZE=min(MAX_FUSED_SIZE, triton.next_power_of_2(V)),
                num_warps=16 if torch.version.hip else 32)
            # logits now hold d loss / d logits (softmax - one-hot; 0 on ignored rows)
            if need_h:
                gh[s:s + rows] = logits @ w
            if need_w:
                _accumulate(gw, logits.t(), hc)
            if need_b:
                gb += logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(gh, None if gw is None else gw.to(weight.dtype),
                              None if gb is None else gb.to(bias.dtype))
        return losses.sum()

    @staticmethod
    def backward(ctx, grad):
        gh, gw, gb = ctx.saved_tensors
        scaled = [None if g is None else g * grad for g in (gh, gw, gb)]  # g's dtype (grad is 0-dim)
        return *scaled, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, *, shifted: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy of logits h @ weight.T (+ bias) against labels, without forming the logits.

    h (B, T, D) final-norm hidden states, weight (V, D) the lm_head weight, labels (B, T) == input_ids (HF convention,
    the shift happens here; shifted=True: labels are already each position's target, as a sequence shard's are).
    reduction "sum": the sum over the scored tokens. Returns a float32 scalar; reads nothing on the host.
    """
    if liger_cross_entropy_kernel is None:
        raise RuntimeError("the fused LM loss needs liger-kernel: pip install -e '.[gpu]' "
                           "(or ressformer.kernels.set_lm_loss_kernel('torch'))")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: choose 'mean' or 'sum'")
    if h.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden states (B, T) {tuple(h.shape[:2])}; "
                         "pass labels=input_ids (the shift happens inside)")
    B, T, D = h.shape
    target = (labels if shifted else F.pad(labels[:, 1:], (0, 1), value=ignore_index)).reshape(B * T)  # position
    #                                                                                    t scores labels[t + 1]
    try:
        total = _LinearCrossEntropySum.apply(h.reshape(B * T, D), weight, bias, target, ignore_index)
    except RuntimeError as e:
        if h.is_cuda:
            raise
        raise RuntimeError(f"liger's cross-entropy kernel on {h.device} tensors runs only in the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before ressformer.kernels.fused_loss is imported, or "
                           f"ressformer.kernels.set_lm_loss_kernel('auto') for the PyTorch path ({e})") from e
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum().clamp(min=1)  # the count stays on the device
