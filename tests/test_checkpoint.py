"""pretrain/checkpoint.py without ranks: the run-folder lock, fresh-run refusal, tag discovery, manifests and
their verification, error descriptions, metrics trimming; and the data order past the last sample."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.data import TrainBatches


def test_lock_is_exclusive_and_names_the_live_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pretrain.checkpoint import RunLock; "
        "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"),
        str(ckpt.Path(ckpt.__file__).resolve().parents[1]), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ckpt.RunFolderError) as e:
            ckpt.RunLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(e.value) and "another run_dir" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    lock = ckpt.RunLock(tmp_path).acquire()  # the kernel dropped the dead holder's flock: taken over, with a note
    assert lock.note and str(holder.pid) in lock.note
    assert json.loads((tmp_path / ckpt.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert json.loads((tmp_path / ckpt.LOCK).read_text())["released"] is True
    again = ckpt.RunLock(tmp_path).acquire()
    assert again.note is None  # a released lock is no news
    again.release()


def test_lock_without_flock_decides_from_the_content(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / ckpt.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ckpt.RunFolderError, match="delete"):
        ckpt.RunLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ckpt.LOCK).write_text(json.dumps({"host": ckpt.socket.gethostname(), "pid": dead.pid}))
    lock = ckpt.RunLock(tmp_path).acquire()
    assert str(dead.pid) in lock.note
    lock.release()
    (tmp_path / ckpt.LOCK).write_text(json.dumps({"host": ckpt.socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(ckpt.RunFolderError, match="in use by pid"):
        ckpt.RunLock(tmp_path).acquire()


def _tag(d, step, complete=True, files=None):
    t = d / ckpt.TAG_FMT.format(step)
    t.mkdir(parents=True)
    for name, data in (files or {"a.pt": b"x" * 10}).items():
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(data)
    if complete:
        man = {"files": {n: ckpt.file_digest(t / n) for n in ckpt._checkpoint_files(t)},
               "layout": {"world_size": 1, "zero_stage": 3, "ep_backend": "none", "ep_size": 1}}
        (t / ckpt.MANIFEST).write_text(json.dumps(man))
        (t / ckpt.COMPLETE).write_text("x")
        (t / ckpt.RUN_STATE).write_text(json.dumps({"step": step}))
    return t


def test_fresh_run_refused_in_a_used_folder_and_overwrite_clears_only_the_run(tmp_path):
    _tag(tmp_path, 3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.RunFolderError) as e:
        ckpt.prepare_fresh(tmp_path, overwrite=False)
    assert all(w in str(e.value) for w in ("--resume auto", "--overwrite", "step_00000003", "run_dir"))
    ckpt.prepare_fresh(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # a run killed before its first save
    ckpt.prepare_fresh(tmp_path, overwrite=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_find_resume_skips_damaged_tags_and_names_the_file(tmp_path):
    _tag(tmp_path, 3)
    _tag(tmp_path, 6)
    _tag(tmp_path, 9, complete=False)  # an interrupted save
    t6 = tmp_path / "step_00000006"
    assert ckpt.find_resume(tmp_path, "auto").tag == t6 and ckpt.verify_tag(t6) is None
    (t6 / "a.pt").write_bytes(b"y" * 10)  # same size, other bytes
    p = ckpt.find_resume(tmp_path, "auto")
    assert p.tag.name == "step_00000003" and "a.pt" in p.skipped[0] and "sha256" in p.skipped[0]
    (t6 / "a.pt").write_bytes(b"y")
    assert "truncated" in ckpt.verify_tag(t6)
    (t6 / "a.pt").unlink()
    assert "missing" in ckpt.verify_tag(t6)
    with pytest.raises(ckpt.RunFolderError, match="a.pt"):
        ckpt.find_resume(tmp_path, "step_00000006")  # a named tag is never replaced
    assert ckpt.find_resume(tmp_path, str(tmp_path / "step_00000003")).tag == tmp_path / "step_00000003"
    with pytest.raises(ckpt.RunFolderError, match="no checkpoint folder"):
        ckpt.find_resume(tmp_path, "step_00000042")
    (tmp_path / "step_00000003" / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(ckpt.RunFolderError, match="no usable checkpoint"):
        ckpt.find_resume(tmp_path, "auto")
    assert ckpt.find_resume(tmp_path / "empty", "auto") is None and ckpt.find_resume(tmp_path, "none") is None


def test_set_aside_newer_moves_complete_and_removes_partial(tmp_path):
    for s in (3, 6, 9):
        _tag(tmp_path, s)
    _tag(tmp_path, 12, complete=False)
    point = ckpt.ResumePoint(tmp_path / "step_00000003", {"step": 3}, None)
    msgs = ckpt.set_aside_newer(tmp_path, point)
    assert len(msgs) == 3 and [p.name for p in ckpt.all_tags(tmp_path)] == ["step_00000003"]
    assert sorted(p.name for p in (tmp_path / ckpt.SUPERSEDED).glob("*/step_*")) == ["step_00000006",
                                                                                       "step_00000009"]


def test_trim_metrics_keeps_steps_up_to_the_resume_point(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (0, 1, 2, 3, 4)) + '{"step": 5, "lo')
    ckpt.trim_metrics(m, 2)
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [0, 1, 2]


def test_os_errors_are_described_by_cause(tmp_path):
    assert "no space left on device" in ckpt.describe_os_error(OSError(errno.ENOSPC, "x"), tmp_path / "f")
    assert "quota" in ckpt.describe_os_error(OSError(errno.EDQUOT, "x"), tmp_path / "f")
    assert "read-only" in ckpt.describe_os_error(OSError(errno.EROFS, "x"), tmp_path / "f")
    assert "permission denied" in ckpt.describe_os_error(PermissionError(errno.EACCES, "x"), tmp_path / "f")
    msg = ckpt.describe_os_error(RuntimeError("basic_ios::clear: iostream error"), tmp_path / "f")
    assert "iostream error" in msg and "MiB free" in msg  # plenty of space here: the message says so


def test_held_errors_defer_and_name_every_failure(tmp_path):
    class Writer:
        def save(self, state_dict, path):
            raise RuntimeError("basic_ios::clear: iostream error")

        def makedirs(self, path, exist_ok=False):
            os.makedirs(path, exist_ok=exist_ok)

    class Engine:
        checkpoint_engine = Writer()

    held = ckpt._HeldErrors(Engine())
    Engine.checkpoint_engine.makedirs(tmp_path / "x", exist_ok=True)
    assert Engine.checkpoint_engine.save({}, tmp_path / "x" / "f.pt") is None  # recorded, not raised
    assert held.errors and str(tmp_path / "x" / "f.pt") in held.errors[0]
    held.restore()
    with pytest.raises(RuntimeError):
        Engine.checkpoint_engine.save({}, tmp_path / "f.pt")


def test_train_batches_continue_past_the_last_sample():
    data = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(10)]
    b = TrainBatches(data, micro_batch=2, global_batch=4, dp_rank=1, dp_size=2, consumed_samples=8)
    got = [next(b)["input_ids"].flatten().tolist() for _ in range(3)]
    assert got == [[0, 1], [4, 5], [8, 9]]  # samples 8..11 -> 10, 11 wrap to 0, 1 (rank 1 takes the second half)
    assert b.consumed_samples == 20 and b.epochs_completed == 2


def test_spare_samples_cover_skipped_batches():
    from pretrain.config import RunConfig
    from pretrain.trainer import spare_samples

    assert spare_samples(RunConfig(steps=12), 4) == 4 and spare_samples(RunConfig(steps=1000), 8) == 80


def test_verify_hashes_are_checked_not_only_sizes(tmp_path):
    t = _tag(tmp_path, 3, files={"big.pt": os.urandom(1 << 20), "sub/x.json": b"{}"})
    assert ckpt.verify_tag(t) is None and ckpt.verify_tag(t, quick=True) is None
    data = bytearray((t / "big.pt").read_bytes())
    data[12345] ^= 1
    (t / "big.pt").write_bytes(bytes(data))
    assert "big.pt" in ckpt.verify_tag(t) and ckpt.verify_tag(t, quick=True) is None  # quick: sizes only
