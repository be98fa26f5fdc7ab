"""bench/step_time.py at a tiny size (no time is asserted: the bench prints ratios, the test checks that it runs, names
its allocator settings and prints every row), and its paired ratio."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.helpers.dist import REPO, base_env


def test_step_time_reruns_itself_under_the_malloc_settings_it_names():
    """--keep-freed-memory: the command runs again with glibc's MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_ set
    (read only when a process starts), the header names them and the CPU, and the baseline and ReSSFormer rows are
    printed with their paired ratio and its spread."""
    env = {k: v for k, v in base_env().items() if not k.startswith("MALLOC_")}
    p = subprocess.run([sys.executable, "bench/step_time.py", "--batch", "2", "--seq", "32", "--repeats", "3",
                        "--rows", "ressformer", "--baseline", "matched", "--keep-freed-memory"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    header, columns, *rows = p.stdout.strip().splitlines()
    assert "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776" in header, header
    assert "3 rounds, rows interleaved (x baseline: paired)" in header, header
    # the machine: the CPU's model and the vector ISA PyTorch picked (the same ratios differ between CPUs)
    assert f" ({torch.backends.cpu.get_cpu_capability()}), threads " in header, header
    assert columns.split()[4:8] == ["x", "baseline", "iqr", "x"], columns
    assert [r.split()[0] for r in rows] == ["baseline", "ressformer"], p.stdout
    x, iqr, _ = (float(v) for v in rows[1].split()[-3:])  # x baseline, iqr, x FLOP
    assert x > 0 and iqr >= 0
    assert [float(v) for v in rows[0].split()[-3:]] == [1.0, 0.0, 1.0]  # the baseline against itself


def test_paired_ratio_divides_the_steps_of_one_round():
    """The median of step / baseline step round by round, and those ratios' interquartile range: a row twice as slow
    as the baseline in every round is 2.00 with no spread, though the rounds' times differ threefold (a shared
    machine's slow and fast spells); rounds that do not pair are an error."""
    spec = importlib.util.spec_from_file_location("step_time", REPO / "bench" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    base = [1.0, 3.0, 1.0, 3.0]
    assert step_time.paired_ratio([2 * b for b in base], base) == (2.0, 0.0)
    med, iqr = step_time.paired_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
    assert (med, iqr) == (3.0, 2.0)
    assert step_time.paired_ratio([1.5], [1.0]) == (1.5, 0.0)
    with pytest.raises(ValueError):
        step_time.paired_ratio([1.0, 2.0], [1.0])
