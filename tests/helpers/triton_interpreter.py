"""Triton kernels of one test module on CPU: the Triton interpreter (numpy underneath, slow: test at small sizes).

TRITON_INTERPRET=1 has to be set before triton (or a library's kernels) is imported, so a module calls
`for_this_module()` before those imports and keeps the fixture it returns at module level.

Triton decides once, when triton.language is first imported, whether its own language functions (tl.zeros, tl.sum,
tl.max: @triton.jit functions) are interpreted; an interpreted kernel that calls compiled-mode ones fails ("Cannot
call @triton.jit'd outside of the scope of a kernel"). Any module may import triton first (`import torch._dynamo`
or `torch._inductor.config` does), so the test session imports it in interpreter mode before collecting
(`import_language_interpreted`, tests/conftest.py) and the order of the test files does not matter.
"""

import os
import sys

import pytest
import torch


def _interpreter_works_with_this_numpy() -> None:
    """Triton before 3.8 converts a runtime int argument (a 1-element array in the interpreter) with int(), which
    numpy 2.4 refuses: skip the module saying so rather than fail every kernel test."""
    import numpy

    try:
        import triton
    except ImportError:
        return
    tv = tuple(int(x) for x in triton.__version__.split(".")[:2])
    nv = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if tv < (3, 8) and nv >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter converts 1-element arrays with int(), which numpy "
                    f"{numpy.__version__} refuses: pip install 'numpy<2.4' (or triton>=3.8)", allow_module_level=True)


def import_language_interpreted() -> None:
    """On a host without CUDA, import triton (and with it triton.language) with TRITON_INTERPRET=1, then restore the
    variable: every kernel a later `for_this_module()` imports then calls interpreted language functions, and the
    processes tests start do not inherit the variable. Nothing when triton is missing or already imported."""
    if torch.cuda.is_available() or "triton" in sys.modules:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def for_this_module():
    """Set TRITON_INTERPRET=1 when there is no CUDA and it is not set; return an autouse module fixture that unsets
    it after the module, so processes later tests start (DeepSpeed ranks) do not inherit it."""
    was_set = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
    if was_set:
        os.environ["TRITON_INTERPRET"] = "1"
    if not torch.cuda.is_available():
        _interpreter_works_with_this_numpy()

    @pytest.fixture(scope="module", autouse=True)
    def _interpreter_for_this_module_only():
        yield
        if was_set:
            os.environ.pop("TRITON_INTERPRET", None)

    return _interpreter_for_this_module_only
