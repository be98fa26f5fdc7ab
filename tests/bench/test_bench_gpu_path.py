"""bench/attention.py, bench/moe_experts.py and bench/train_throughput.py at their smallest sizes on CPU (quick tier):
the rows, ratios and fits they report have the right structure, and their helpers compute what they claim; what
bench/gpu_check.sh does before it needs a GPU."""

import io
import json
import math
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import attention as attn_bench  # noqa: E402
import moe_experts as moe_bench  # noqa: E402
import train_throughput as tt_bench  # noqa: E402


def test_fit_exponent_recovers_the_power():
    T = [1024, 2048, 4096, 8192, 16384]
    p, c = attn_bench.fit_exponent(T, [3.0 * t ** 1.5 for t in T])
    assert p == pytest.approx(1.5, abs=1e-9) and c == pytest.approx(3.0, rel=1e-9)
    p2, _ = attn_bench.fit_exponent(T, [0.5 * t ** 2 for t in T])
    assert p2 == pytest.approx(2.0, abs=1e-9)
    assert attn_bench.fit_exponent([4096], [1.0]) is None  # one point: no slope


def test_attention_bench_rows(tmp_path):
    out = tmp_path / "att.json"
    res = attn_bench.main(["--device", "cpu", "--seq-lens", "64", "128", "--preset", "debug", "--heads", "2",
                           "--repeats", "1", "--fit-from", "64", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))  # the file holds what was returned
    rows = {(r["T"], r["method"]): r for r in res["rows"]}
    for T in (64, 128):
        for m in ("sdpa", "reference", "chunked", "chunked+gather", "block", "block+gather"):
            r = rows[(T, m)]
            assert r["status"] == "ok", r
            assert r["ms"] > 0 and math.isfinite(r["x_sdpa_ms"]) and r["x_sdpa_ms"] > 0
        assert rows[(T, "sdpa")]["x_sdpa_ms"] == 1.0
        for m in ("flex", "chunked+triton", "block+triton"):  # no backward on CPU / CUDA only: said, not crashed
            assert rows[(T, m)]["status"] == "skipped" and rows[(T, m)]["reason"]
    assert {r["method"] for r in res["rows"]} == set(res["exponents"])
    assert res["exponents"]["sdpa"]["points"] == 2 and res["exponents"]["flex"] is None
    assert "CPU process RSS" in res["config"]["memory"] and res["config"]["heads"] == 2
    res = attn_bench.main(["--device", "cpu", "--seq-lens", "64", "--preset", "debug", "--heads", "2", "--repeats",
                           "1", "--methods", "chunked", "--time-only"])  # times only: no memory column
    assert [(r["method"], r["status"], r["peak_mib"], r["x_sdpa_mib"]) for r in res["rows"]] == [
        ("sdpa", "ok", None, None), ("chunked", "ok", None, None)]
    assert res["config"]["memory"] == "not measured (--time-only)"


def test_attention_bench_budget_and_oom_are_reported(monkeypatch, capsys):
    # a method whose previous T predicts more than the budget is skipped
    args = ["--device", "cpu", "--seq-lens", "64", "128", "256", "--preset", "debug", "--heads", "2", "--repeats", "1"]
    res = attn_bench.main(args + ["--methods", "reference", "--budget-s", "1e-9", "--reference-max", "128"])
    rows = {(r["T"], r["method"]): r for r in res["rows"]}
    assert rows[(64, "reference")]["status"] == "ok"
    assert rows[(128, "reference")]["status"] == "skipped" and "budget" in rows[(128, "reference")]["reason"]
    assert "--reference-max 128" in rows[(256, "reference")]["reason"]  # what cannot run says why first
    assert {r["method"] for r in res["rows"]} == {"sdpa", "reference"}  # sdpa stays: the ratios need it

    # one out of memory during its call is "oom", and is not run at larger T
    def oom_from_128(q, k, v):
        def fn():
            if q.shape[2] >= 128:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return q * k + v
        return fn

    real = attn_bench.method_table
    monkeypatch.setattr(attn_bench, "method_table", lambda *a: [r for r in real(*a) if r[0] == "sdpa"]
                        + [("fake", oom_from_128)])
    res = attn_bench.main(args)
    rows = {(r["T"], r["method"]): r for r in res["rows"]}
    assert rows[(64, "fake")]["status"] == "ok" and rows[(128, "fake")]["status"] == "oom"
    assert rows[(256, "fake")]["status"] == "skipped" and "T=128" in rows[(256, "fake")]["reason"]
    assert rows[(256, "sdpa")]["status"] == "ok"
    assert re.search(r"128 fake +oom", capsys.readouterr().out)


def test_matched_dense_agrees_with_the_describe_cli():
    from ressformer.config import ModelConfig
    from ressformer.describe import main as describe_main

    for name, T in (("debug", 128), ("125m", 2048)):
        buf = io.StringIO()
        with redirect_stdout(buf):
            describe_main([name, "--seq-len", str(T)])
        depth = int(re.search(r"a dense (\d+)-layer Transformer", buf.getvalue()).group(1))
        cfg, t = tt_bench.resolve(f"dense:{name}", T)
        assert t == T and cfg.arch == "transformer" and cfg.n_layers == depth
        assert cfg.d_model == ModelConfig.from_preset(name).d_model
    with pytest.raises(ValueError, match="already a transformer"):
        tt_bench.resolve("dense:debug-transformer", 64)


def test_train_throughput_rows(tmp_path):
    from ressformer.flops import flops_per_token

    out = tmp_path / "tt.json"
    res = tt_bench.main(["--device", "cpu", "--presets", "debug", "debug-transformer", "--seq-len", "32",
                         "--batch", "2", "--steps", "2", "--warmup", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert [r["preset"] for r in res["rows"]] == ["debug", "debug-transformer"]
    for r in res["rows"]:
        assert r["status"] == "ok" and r["steps"] == 2 and r["seq_len"] == 32 and r["compile"] == "eager"
        assert "host_reads" not in r and "dynamo" not in r
        cfg, _ = tt_bench.resolve(r["preset"], 32)
        assert r["flops_per_token"] == flops_per_token(cfg, 32, causal_skip=False)  # CPU: full attention product
        assert 0 < r["tokens_per_s"] <= r["tokens_per_s_best_step"] * (1 + 1e-9) and math.isfinite(r["tflops"])
        assert r["tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert r["mfu"] is None  # no known peak on CPU
        assert math.isfinite(r["loss"])
    assert res["config"]["peak_tflops"] is None and res["config"]["causal_skip"] is False


def test_train_throughput_compile_modes_and_host_reads(monkeypatch):
    """--compile runs every preset per mode, modes in turn, handing the mode to compile_units (Dynamo's eager backend
    stands in for inductor here: the bench's wiring is under test, inductor has tests/ressformer/test_compile.py);
    --sync-check records the host reads of the forward and backward (on CPU the debug model's by design: the experts
    loop's token counts, the tie pass; none for the dense baseline), which make the exit status 1; the ratios to
    eager and to dense:NAME are the rows' own."""
    from ressformer.causal_lm import CausalLM

    handed = []
    real = CausalLM.compile_units

    def compile_units(self, **kw):
        handed.append(kw)
        real(self, backend="eager")

    monkeypatch.setattr(CausalLM, "compile_units", compile_units)
    res = tt_bench.main(["--device", "cpu", "--presets", "debug", "dense:debug", "--seq-len", "32", "--batch", "1",
                         "--steps", "1", "--warmup", "1", "--compile", "eager", "reduce-overhead", "--sync-check",
                         "--param-dtype", "bf16"])  # the weights as the trainer's bf16 mode has them
    assert res["config"]["param_dtype"] == "bf16" and res["config"]["compile"] == ["eager", "reduce-overhead"]
    rows = {(r["preset"], r["compile"]): r for r in res["rows"]}
    assert list(rows) == [("debug", "eager"), ("dense:debug", "eager"), ("debug", "reduce-overhead"),
                          ("dense:debug", "reduce-overhead")]
    assert handed == [{"mode": "reduce-overhead"}] * 2
    assert all(r["status"] == "ok" and r["steps"] == 1 for r in rows.values())
    for preset in ("debug", "dense:debug"):
        d = rows[(preset, "reduce-overhead")]["dynamo"]
        assert d["graphs"] >= 1 and d["graph_breaks"] == 0 and "dynamo" not in rows[(preset, "eager")]
    for mode in ("eager", "reduce-overhead"):
        reads = rows[("debug", mode)]["host_reads"]
        assert {"aten.bincount.default", "Tensor.tolist"} <= set(reads) <= {
            "aten.bincount.default", "Tensor.tolist", "ressformer.redo_tied_rows.default"}, reads
        assert rows[("dense:debug", mode)]["host_reads"] == {}
    assert tt_bench.exit_status(res) == 1
    assert tt_bench.exit_status({"rows": [rows[("dense:debug", "eager")]]}) == 0
    by = {(r["preset"], r["compile"], r["against"]): r for r in res["ratios"]}
    ro, eager = rows[("debug", "reduce-overhead")], rows[("debug", "eager")]
    assert by[("debug", "reduce-overhead", "debug eager")]["x_time"] == ro["step_ms_best"] / eager["step_ms_best"]
    dense = rows[("dense:debug", "eager")]
    r = by[("debug", "eager", "dense:debug eager")]
    assert r["x_time"] == eager["step_ms_best"] / dense["step_ms_best"]
    assert r["x_per_flop"] == pytest.approx(r["x_time"] * dense["flops_per_token"] / eager["flops_per_token"])
    assert len(res["ratios"]) == 4  # debug and dense:debug against eager, debug against dense:debug in each mode


def test_gpu_check_refuses_unknown_steps_and_a_machine_without_cuda(tmp_path):
    """bench/gpu_check.sh: an unknown step name is refused before anything runs (exit 2, the choices named); on a
    machine where torch sees no CUDA device it records env.txt and stops (exit 1) without running a step."""
    import subprocess

    script = str(REPO / "bench" / "gpu_check.sh")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", script, "kernels", "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "no step nope: choose from preflight kernels step moe" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    if torch.cuda.is_available():
        return
    r = subprocess.run(["bash", script, "step"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "torch sees no CUDA device; nothing to check" in r.stdout, r.stdout + r.stderr
    assert "=== " not in r.stdout and "cuda False" in (tmp_path / "out" / "env.txt").read_text()


def test_moe_experts_bench_rows(tmp_path, capsys):
    from ressformer import kernels

    out = tmp_path / "moe.json"
    assert moe_bench.main(["--device", "cpu", "--presets", "debug", "debug-transformer", "--tokens", "256",
                           "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["preset"] for r in rows] == ["debug"]  # the dense preset is skipped, and says so
    assert "dense FFN (moe.num_experts=1): skipped" in capsys.readouterr().out
    r = rows[0]
    assert (r["experts"], r["top_k"], r["d_model"], r["tokens"]) == (4, 2, 64, 256)
    assert r["loop_ms"] > 0 and r["grouped_mm_ms"] > 0
    assert r["speedup"] == pytest.approx(r["loop_ms"] / r["grouped_mm_ms"])
    assert r["max_abs_diff"] < 1e-5  # both implementations computed the same layer
    assert kernels.moe_experts == "auto"  # the bench leaves the mode as it found it


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_memory_check_measures_a_real_run_against_the_estimate(tmp_path, capsys):
    """bench/memory_check.py on CPU, 1 rank, 2 steps: the `deepspeed` launch of pretrain/main.py finishes, the JSON
    holds estimate_memory's terms for the same settings, the run's peak and their ratio; a failing run exits 1 and
    names its log."""
    import shutil
    import subprocess

    import memory_check as mc_bench
    from pretrain.config import load_run_config
    from pretrain.memory_estimate import estimate_memory
    from tests.helpers.dist import base_env

    if not (REPO / "artifacts" / "data" / "shakespeare.idx").is_file():  # the debug config's data
        subprocess.run([sys.executable, "-m", "pretrain.data", "prepare"], cwd=REPO, env=base_env(), check=True,
                       timeout=300)
    sets = ["seq_len=32", "micro_batch=1"]
    out = tmp_path / "mc.json"
    argv = [a for s in sets for a in ("--set", s)] + ["--steps", "2", "--timeout", "150"]
    assert mc_bench.main(argv + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    run_dir = Path(res["run_dir"])
    try:
        run = load_run_config(REPO / "pretrain/configs/debug.yaml", sets)
        est = estimate_memory(run.model_config(), seq_len=32, micro_batch=1, world_size=1, zero_stage=3,
                              ckpt_every=1, max_live_parameters=1e9, ep_size=1)  # zero3.json; kernels off on CPU
        assert res["estimate"]["terms"] == est.terms and res["estimate"]["total"] == est.total
        assert list(res["estimate"]["terms"]) == ["model_states", "zero3_gathered", "checkpoints", "unit_recompute",
                                                  "logits"]
        assert est.table() in printed and res["output"] in printed
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if "loss" in r] == [1, 2] and res["steps"] == 2
        assert res["measured_peak_gib"] == max(r["peak_mem_gib"] for r in recs if "peak_mem_gib" in r) > 0
        assert res["ratio"] == pytest.approx(res["measured_peak_gib"] * 2**30 / est.total, rel=1e-12)
        assert not res["cuda"] and res["precision"] == "fp32" and "not a check of the estimator" in res["note"]
        info = json.loads((run_dir / "run_info.json").read_text())
        assert (info["run_config"]["seq_len"], info["run_config"]["micro_batch"]) == (32, 1)  # the run estimated
        assert (run_dir / "FINISHED").exists() and not list(run_dir.glob("step_*"))  # temporary: checkpoints gone
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    bad = tmp_path / "bad"
    assert mc_bench.main(argv + ["--set", "data.blend=[[1.0, /nonexistent/x]]", "--run-dir", str(bad),
                                 "--json", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    log = bad / "memory_check.log"
    assert f"the training run failed (exit status 2); its log: {log}" in err  # a config error: one line, rc 2
    assert "/nonexistent/x" in log.read_text() and not (tmp_path / "bad.json").exists()
