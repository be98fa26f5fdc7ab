"""bench/step_time.py at a tiny size (no time is asserted: the bench prints ratios, the test checks that it runs, names
its allocator settings and prints every row)."""

import subprocess
import sys

from tests.helpers.dist import REPO, base_env


def test_step_time_reruns_itself_under_the_malloc_settings_it_names():
    """--keep-freed-memory: the command runs again with glibc's MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_ set
    (read only when a process starts), the header names them, and the baseline and ReSSFormer rows are printed."""
    env = {k: v for k, v in base_env().items() if not k.startswith("MALLOC_")}
    p = subprocess.run([sys.executable, "bench/step_time.py", "--batch", "2", "--seq", "32", "--repeats", "1",
                        "--rows", "ressformer", "--baseline", "matched", "--keep-freed-memory"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    header, _, *rows = p.stdout.strip().splitlines()
    assert "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776" in header, header
    assert [r.split()[0] for r in rows] == ["baseline", "ressformer"], p.stdout
    assert float(rows[1].split()[-2]) > 0  # x baseline
