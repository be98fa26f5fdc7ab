"""pretrain/checkpoint/writer.py without ranks: an error of DeepSpeed's checkpoint writer is held back, named, and
the writer restored."""

from __future__ import annotations

import os

import pytest

from pretrain.checkpoint.writer import _HeldErrors


def test_held_errors_defer_and_name_every_failure(tmp_path):
    class Writer:
        def save(self, state_dict, path):
            raise RuntimeError("basic_ios::clear: iostream error")

        def makedirs(self, path, exist_ok=False):
            os.makedirs(path, exist_ok=exist_ok)

    class Engine:
        checkpoint_engine = Writer()

    held = _HeldErrors(Engine())
    Engine.checkpoint_engine.makedirs(tmp_path / "x", exist_ok=True)
    assert Engine.checkpoint_engine.save({}, tmp_path / "x" / "f.pt") is None  # recorded, not raised
    assert held.errors and str(tmp_path / "x" / "f.pt") in held.errors[0]
    held.restore()
    with pytest.raises(RuntimeError):
        Engine.checkpoint_engine.save({}, tmp_path / "f.pt")


