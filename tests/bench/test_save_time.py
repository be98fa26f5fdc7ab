"""bench/save_time.py end to end at debug size: both modes train, save after every step and report their timings
(no time is asserted: the bench prints ratios, the tests check it runs and reads what the trainer logs)."""

import json
import subprocess
import sys

import pytest

from tests.helpers.dist import REPO, base_env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_save_time_bench_reports_both_modes(tmp_path, default_data):
    out = tmp_path / "save.json"
    p = subprocess.run([sys.executable, "bench/save_time.py", "--model", "debug", "--steps", "3", "--json", str(out)],
                       cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=560)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "sync / async" in p.stdout and "false" in p.stdout and "true" in p.stdout
    res = json.loads(out.read_text())
    assert res["means"]["True"]["background_s"] > 0 and res["means"]["False"]["blocked_s"] > 0 and res["ratio"] > 0
