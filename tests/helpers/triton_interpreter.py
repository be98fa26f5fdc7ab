"""Triton kernels of one test module on CPU: the Triton interpreter (numpy underneath, slow: test at small sizes).

TRITON_INTERPRET=1 has to be set before triton (or a library's kernels) is imported, so a module calls
`for_this_module()` before those imports and keeps the fixture it returns at module level.
"""

import os

import pytest
import torch


def for_this_module():
    """Set TRITON_INTERPRET=1 when there is no CUDA and it is not set; return an autouse module fixture that unsets
    it after the module, so processes later tests start (DeepSpeed ranks) do not inherit it."""
    was_set = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
    if was_set:
        os.environ["TRITON_INTERPRET"] = "1"

    @pytest.fixture(scope="module", autouse=True)
    def _interpreter_for_this_module_only():
        yield
        if was_set:
            os.environ.pop("TRITON_INTERPRET", None)

    return _interpreter_for_this_module_only
