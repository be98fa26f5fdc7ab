"""The fused LM loss (ressformer/kernels/fused_loss.py, liger-kernel) equals the logits + lm_loss path, and the models
return logits exactly when the contract says so (ressformer.output.logits_and_loss).

Without CUDA liger's Triton kernels run in the Triton interpreter (numpy underneath, slow): sizes stay tiny here.
"""

import pytest
import torch

from tests.helpers.triton_interpreter import for_this_module

_interpreter_for_this_module_only = for_this_module()  # before triton (and liger's kernels) are imported


import ressformer.kernels as kernels  # noqa: E402
from ressformer import build_model  # noqa: E402
from ressformer.config import ModelConfig  # noqa: E402
from ressformer.kernels import fused_loss  # noqa: E402  (imports liger now, under the interpreter)
from ressformer.output import lm_loss  # noqa: E402

LIGER = fused_loss.liger_cross_entropy_kernel is not None
needs_liger = pytest.mark.skipif(not LIGER, reason="liger-kernel is not installed: pip install -e '.[dev]' or '.[gpu]'")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TINY = {"vocab_size": 128, "d_model": 32, "n_heads": 2, "ffn_hidden": 64, "max_seq_len": 32}
CONFIGS = {
    "ressformer": dict(preset="debug", **{
        "r2mu.steps": 2, "r2mu.n_prelude": 1, "r2mu.n_coda": 1, "r2mu.cache_window": 4, "r2mu.segment_len": 4,
        "r2mu.summary_slots": 2, "asam.topk": 4, "asam.impl": "chunked", "asam.chunk_size": 4,
        "moe.num_experts": 4, "moe.experts_per_token": 2, "moe.shared_experts": 1, "soes.rank": 4, "soes.degree": 3}),
    "transformer-tied": dict(preset="debug-transformer", n_layers=2, tie_embeddings=True),
}


@pytest.fixture(autouse=True)
def _restore_mode():
    mode = kernels.lm_loss_kernel
    yield
    kernels.set_lm_loss_kernel(mode)


def _problem(dtype=torch.float32, B=2, T=16, D=32, V=128):
    """Hidden states (B, T, D), lm_head weight (V, D), labels (B, T) with ignored tokens: one inside a row, the first
    five of row 1 (a masked prompt), and position 0 (never scored after the shift)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g).to(DEV, dtype).requires_grad_()
    w = (0.2 * torch.randn(V, D, generator=g)).to(DEV, dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = labels[0, 7] = -100
    labels[1, :5] = -100
    return h, w, labels.to(DEV)


def _model(name: str):
    c = dict(CONFIGS[name])
    cfg = ModelConfig.from_preset(c.pop("preset"), **{**TINY, **c})
    torch.manual_seed(0)
    return build_model(cfg).to(DEV).train()


def _tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (2, 16), generator=g)
    labels = x.clone()
    labels[1, :5] = -100
    return x.to(DEV), labels.to(DEV)


def _run(model, x, labels, mode, **kw):
    """(output, {name: grad}) of one forward + backward of the loss under lm_loss_kernel `mode`."""
    kernels.set_lm_loss_kernel(mode)
    model.zero_grad(set_to_none=True)
    out = model(x, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_liger
def test_fused_loss_equals_lm_loss():
    h, w, labels = _problem()
    loss = fused_loss.linear_cross_entropy(h, w, labels)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = lm_loss(h @ w.T, labels)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=0, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-4)
    assert gh[:, -1].abs().max() == 0 and gh[1, :4].abs().max() == 0  # last position and masked prompt score nothing
    # a sequence shard's form (ressformer.sequence_parallel): targets shifted before, the sum over scored tokens
    from ressformer.sequence_parallel import shift_labels

    total = fused_loss.linear_cross_entropy(h, w, shift_labels(labels), shifted=True, reduction="sum")
    torch.testing.assert_close(total, ref * (labels[:, 1:] != -100).sum(), rtol=1e-6, atol=1e-4)


@needs_liger
def test_fused_loss_bfloat16_within_rounding():
    """bf16 h and weight: the same bf16 matmul, float32 softmax and loss as lm_loss(bf16 logits)."""
    h, w, labels = _problem(torch.bfloat16)
    loss = fused_loss.linear_cross_entropy(h, w, labels)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = lm_loss(h @ w.T, labels)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-4)
    for a, b in ((gh, rh), (gw, rw)):  # a few bf16 ulps (2**-8) of the largest gradient; 0.6% seen
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max(), (a - b).abs().max()
    # float32 h and weight under bf16 autocast (training on a GPU): bf16 matmuls as lm_head's under autocast, the
    # gradients in h's and the weight's dtype
    h, w, labels = _problem()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss = fused_loss.linear_cross_entropy(h, w, labels)
        ref = lm_loss(h @ w.T, labels)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-4)
    for a, b in ((gh, rh), (gw, rw)):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max(), (a - b).abs().max()


@needs_liger
def test_fused_loss_reads_nothing_on_the_host():
    """Forward and backward of the fused loss (mean and sum, upstream gradient != 1) run no operator that reads device
    data on the host. Liger's own fused linear cross-entropy reads twice: the count of scored tokens (.item()) in
    forward and the upstream gradient against 1 (torch.equal) in backward; the check sees both, so it is not blind."""
    from ressformer.host_reads import HostReads

    h, w, labels = _problem()
    with HostReads() as reads:
        loss = fused_loss.linear_cross_entropy(h, w, labels)
        total = fused_loss.linear_cross_entropy(h, w, labels, reduction="sum")
        (0.5 * loss + total).backward()
    assert dict(reads.seen) == {}
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    with HostReads() as reads:
        (0.5 * liger_fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, target)).backward()
    assert set(reads.seen) == {"aten._local_scalar_dense.default", "aten.equal.default"}
    with pytest.raises(ValueError, match="reduction 'none'"):
        fused_loss.linear_cross_entropy(h, w, labels, reduction="none")


def test_fused_loss_rejects_unshifted_labels():
    h, w, labels = _problem()
    with pytest.raises(ValueError, match="labels=input_ids"):
        fused_loss.linear_cross_entropy(h, w, labels[:, 1:])


@needs_liger
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_fused_loss_equals_plain(name):
    """Training forward with labels: liger gives no logits and the plain path's loss, aux losses and gradients."""
    model = _model(name)
    x, labels = _tokens()
    fused, g_fused = _run(model, x, labels, "liger")
    plain, g_plain = _run(model, x, labels, "torch")
    assert fused.logits is None and plain.logits.shape == (2, 16, 128)
    torch.testing.assert_close(fused.lm_loss, plain.lm_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=0, atol=1e-5)
    assert fused.aux_losses.keys() == plain.aux_losses.keys()
    for k in plain.aux_losses:
        torch.testing.assert_close(fused.aux_losses[k], plain.aux_losses[k], rtol=0, atol=0)
    assert g_fused.keys() == g_plain.keys()
    for n in g_plain:
        torch.testing.assert_close(g_fused[n], g_plain[n], rtol=0, atol=1e-4, msg=n)


@needs_liger
def test_logits_come_back_when_asked_for_or_not_training():
    """Even under 'liger': return_logits=True, eval mode and a forward without labels all take the plain path."""
    model = _model("transformer-tied")
    x, labels = _tokens()
    plain, _ = _run(model, x, labels, "torch")
    asked, _ = _run(model, x, labels, "liger", return_logits=True)
    assert torch.equal(asked.logits, plain.logits) and torch.equal(asked.loss, plain.loss)
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain.logits)
        model.eval()
        ev = model(x, labels=labels)
        assert torch.equal(ev.logits, plain.logits) and torch.equal(ev.lm_loss, plain.lm_loss)
        no_logits = model(x, labels=labels, return_logits=False)  # eval, fused on request
        assert no_logits.logits is None
        torch.testing.assert_close(no_logits.lm_loss, plain.lm_loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_auto_on_cpu_is_the_plain_path(name):
    """The default mode leaves CPU training as it was: logits returned, loss = lm_loss(logits, labels)."""
    assert kernels.lm_loss_kernel == "auto"
    model = _model(name).cpu()
    x, labels = (t.cpu() for t in _tokens())
    assert not kernels.use_lm_loss_kernel(model.model.embed_tokens(x))
    out = model(x, labels=labels)
    assert out.logits is not None and torch.equal(out.lm_loss, lm_loss(out.logits, labels))
    kernels.set_lm_loss_kernel("torch")
    again = model(x, labels=labels)
    assert torch.equal(again.logits, out.logits) and torch.equal(again.loss, out.loss)


def test_return_logits_false_needs_labels_and_modes_validate(monkeypatch):
    model = _model("transformer-tied").cpu()
    x, labels = (t.cpu() for t in _tokens())
    kernels.set_lm_loss_kernel("torch")
    out = model(x, labels=labels, return_logits=False)  # the plain loss, logits dropped
    assert out.logits is None and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="return_logits=False without labels"):
        model(x, return_logits=False)
    with pytest.raises(ValueError, match="choose one of"):
        kernels.set_lm_loss_kernel("triton")
    monkeypatch.setattr(fused_loss, "liger_cross_entropy_kernel", None)
    kernels.set_lm_loss_kernel("liger")
    with pytest.raises(RuntimeError, match="liger-kernel is not installed"):
        model(x, labels=labels)
    kernels.set_lm_loss_kernel("auto")
    assert not kernels.use_lm_loss_kernel(torch.zeros(1, device=DEV))  # no liger: auto falls back everywhere
