"""DeepSpeed shard recovery (pretrain/checkpoint/ds_recovery.py) on hand-made tags: unreadable files name themselves. The
reconstruction of real ZeRO-1/2/3, AutoEP and native-MoE checkpoints is tested in tests/pretrain/test_convert.py (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint.ds_recovery import CheckpointError, load_ds_file, read_deepspeed_checkpoint

REPO = Path(__file__).resolve().parents[3]


def test_an_empty_or_missing_file_is_named(tmp_path):
    tag = tmp_path / "run" / "step_00000002"
    tag.mkdir(parents=True)
    f = tag / "mp_rank_00_model_states.pt"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: the file is empty \(0 bytes\)"):
        load_ds_file(f)
    (tag / "COMPLETE").write_text("1\n")
    with pytest.raises(CheckpointError, match=r"step_00000002/mp_rank_00_model_states\.pt.*empty"):
        read_deepspeed_checkpoint(tmp_path / "run")
    p = subprocess.run([sys.executable, "-m", "pretrain.convert", "--checkpoint", str(tmp_path / "run"), "--out",
                        str(tmp_path / "hf"), "--no-tokenizer"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "mp_rank_00_model_states.pt: the file is empty" in p.stderr, p.stderr[-3000:]
    assert "holds no model.safetensors" in p.stdout  # the fallback to the shards is announced
    f.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=r"cannot read .*mp_rank_00_model_states\.pt \(\d+ bytes\)"):
        load_ds_file(f)
    f.unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        read_deepspeed_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"missing checkpoint file .*mp_rank_00_model_states\.pt"):
        load_ds_file(f)
