"""The ASAM Triton kernels compile for real GPUs without spilling registers (bench/kernel_resources.py).

Slow tier: Triton compiles for the GPU targets on CPU (its passes, LLVM and the wheel's ptxas, 1-8 s per kernel).
The compile runs in a subprocess without TRITON_INTERPRET: kernel test modules switch the interpreter on in this
process (tests/helpers/triton_interpreter.py), and interpreter mode decorates the kernels for the interpreter
instead of the compiler.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _skip_without_nvidia_backend() -> None:
    """Skip when triton is missing or its wheel lacks the NVIDIA backend's cuobjdump (found without importing
    triton, so this process's interpreter setting does not matter)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' or '.[gpu]')")
    tool = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not (tool.is_file() and os.access(tool, os.X_OK)):
        pytest.skip(f"this triton wheel has no NVIDIA backend tools ({tool} missing): the compile check needs the "
                    "Linux x86-64 / aarch64 wheel from PyPI")


def _compile(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run bench/kernel_resources.py for the ASAM kernels with `args`; (the process, its JSON rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(REPO / "bench" / "kernel_resources.py"), "--kernels", "asam", "--jobs", "2",
           "--json", str(out), *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    return res, rows


def _check(res: subprocess.CompletedProcess, rows: list[dict], expected: int) -> None:
    log = f"stdout:\n{res.stdout[-6000:]}\nstderr:\n{res.stderr[-4000:]}"
    assert len(rows) == expected, f"{len(rows)} kernels compiled, expected {expected}\n{log}"
    failed = [f"{r.get('kernel', '?')} {r['arch']} {r['preset']} {r.get('variant', '')}: {r['error']}"
              for r in rows if "error" in r]
    assert not failed, "failed to compile:\n" + "\n".join(failed) + f"\n{log}"
    spills = [f"{r['kernel']} {r['arch']} {r['preset']} {r['variant']} ({r['tiles']}): {r['regs']} registers, "
              f"stack {r['stack']} B, local {r['local']} B, shared {r['shared']} B ({r['status']})"
              for r in rows if r["stack"] != 0 or r["local"] != 0 or r["status"] != "ok"]
    assert not spills, "register spills (or shared memory over the limit):\n" + "\n".join(spills)
    assert res.returncode == 0, f"exit status {res.returncode} with every kernel fine\n{log}"


def test_asam_kernels_of_the_debug_preset_compile_for_sm90_without_spills(tmp_path):
    """Every activation, forward with / without the graph bias, backward with every HAS_DP / HAS_DS: 18 kernels."""
    _skip_without_nvidia_backend()
    res, rows = _compile(tmp_path, "--arch", "sm_90", "--presets", "debug")
    _check(res, rows, expected=3 * (2 + 4))
    assert {r["kernel"] for r in rows} == {"_asam_fwd_kernel", "_asam_bwd_kernel"}


def test_asam_kernels_of_the_125m_preset_compile_for_sm80_and_sm90_without_spills(tmp_path):
    """kk = 128, D = 64, entmax15, the forward / backward variants the preset's R2MU steps call, on both archs (a
    backward that scatters inside its gather loops spilled 800+ bytes per thread on sm_80)."""
    _skip_without_nvidia_backend()
    res, rows = _compile(tmp_path, "--arch", "sm_80", "sm_90", "--presets", "125m", "--activations", "entmax15",
                         "--variants", "preset")
    _check(res, rows, expected=2 * (2 + 2))
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ("_asam_fwd_kernel", "_asam_bwd_kernel")
                                                        for a in ("sm_80", "sm_90")}
