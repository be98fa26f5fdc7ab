"""pretrain/preflight.py on CPU: every fused kernel against its PyTorch path (the Triton ones in the interpreter), a
kernel broken on purpose named and switched off, slow ranks named, an untrusted run refused."""

from __future__ import annotations

from tests.helpers.triton_interpreter import for_this_module

_interpreter = for_this_module()  # before triton (and liger) are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from pretrain import preflight as pf  # noqa: E402
from ressformer import kernels  # noqa: E402
from ressformer.kernels import asam_triton, fused_loss  # noqa: E402,F401  (imported here, under the interpreter:
#                    another module's for_this_module may own the variable and unset it before these tests run)


@pytest.fixture(autouse=True)
def _modes():
    saved = (kernels.asam_kernel, kernels.lm_loss_kernel, kernels.moe_experts)
    yield
    kernels.set_asam_kernel(saved[0])
    kernels.set_lm_loss_kernel(saved[1])
    kernels.set_moe_experts(saved[2])


@pytest.mark.timeout(300)
def test_every_kernel_passes_on_cpu_and_a_cpu_run_uses_none():
    got = pf.check_kernels("cpu", torch.float32, all_kernels=True)
    assert got == {"asam_triton": "ok", "fused_loss": "ok", "moe_experts": "ok"}, got
    used = pf.check_kernels("cpu", torch.float32)  # what a CPU run checks: nothing it does not use
    assert all(v.startswith("not used on cpu") for v in used.values()), used


@pytest.mark.timeout(300)
def test_a_broken_kernel_is_named_and_switched_off(monkeypatch, capsys):
    real = asam_triton.topk_attention

    def off_by_a_little(*a, **k):
        out, p = real(*a, **k)
        return out + 1e-3, p  # wrong by more than the tests allow, in a way that only a comparison shows

    monkeypatch.setattr(asam_triton, "topk_attention", off_by_a_little)
    kernels.set_asam_kernel("triton")  # a run that would use it
    result = pf.preflight(None, None, all_kernels=True)
    assert result["kernels_off"] == ["asam_triton"] and kernels.asam_kernel == "torch"
    assert kernels.lm_loss_kernel != "torch"  # the others stay as they were
    err = capsys.readouterr().err
    assert "kernel asam_triton failed its check on rank 0" in err and "out max error" in err
    assert "switched off for this run on every rank" in err


def _rank(rank, host, tflops, gbps, device="NVIDIA H200"):
    return pf.RankReport(rank, host, device, {"asam_triton": "ok"}, tflops, None, gbps, 100.0, 20.0)


def test_slow_ranks_are_named_on_gpus_and_only_reported_on_cpu():
    reports = [_rank(0, "a", 700, 180), _rank(1, "a", 690, 175), _rank(2, "b", 300, 178), _rank(3, "b", 705, 60)]
    pf.judge(reports, 0.7)
    assert [bool(r.problems) for r in reports] == [False, False, True, True]
    assert "matmul TFLOP/s 300" in reports[2].problems[0] and "all-reduce GB/s 60" in reports[3].problems[0]
    text = pf.table(reports)
    assert "node a: ranks 0, 1" in text and "node b: ranks 2, 3" in text and text.count("FAIL") == 2
    cpu = [_rank(0, "a", 0.04, 1.0, "cpu"), _rank(1, "a", 0.01, 0.2, "cpu")]
    pf.judge(cpu, 0.7)
    assert not any(r.problems for r in cpu)


def test_an_untrusted_run_is_refused_with_the_ranks_named(monkeypatch):
    monkeypatch.setattr(pf, "check_rank", lambda *a, **k: pf.RankReport(
        0, "n7", "NVIDIA H200", {}, 700.0, 0.7, None, 10.0, 27.8,
        ["free memory 10.0 GiB < the run's estimate 27.8 GiB"]))
    with pytest.raises(pf.PreflightError, match=r"rank 0 \(n7\): free memory 10.0 GiB < the run's estimate"):
        pf.preflight(None, None)
