"""bench/ablations.py end to end at a few steps (slow tier): it trains the full model and a variant with the
real trainer on 2 gloo ranks, and reports numbers that differ where the switch changes the model."""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ablations_bench_trains_and_compares(tmp_path, monkeypatch, capsys):
    import ablations

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "abl"
    assert ablations.main(["--steps", "4", "--eval-every", "2", "--variants", "soes_off", "--out", str(out),
                           "--artifacts", str(tmp_path / "art")]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert list(res) == ["full", "soes_off"]  # the baseline of the ratios is always measured
    full, off = res["full"], res["soes_off"]
    for r in (full, off):
        assert [s for s, _ in r["evals"]] == [0, 2, 4]
        assert math.isfinite(r["final_ppl"]) and r["final_ppl"] < r["evals"][0][1]  # it trained
        assert r["tokens_per_s"] > 0
    assert off["params"] < full["params"]  # SOES's projections are gone
    assert off["final_ppl"] != full["final_ppl"]
    table = capsys.readouterr().out
    assert "soes_off" in table and "x full" in table
    # a finished variant is read back, not retrained
    mtime = (out / "full" / "metrics.jsonl").stat().st_mtime
    ablations.main(["--steps", "4", "--eval-every", "2", "--variants", "full", "--out", str(out),
                    "--artifacts", str(tmp_path / "art")])
    assert (out / "full" / "metrics.jsonl").stat().st_mtime == mtime
