"""pretrain/checkpoint/run_folder.py without ranks: the lock, the fresh-run refusal and --overwrite, setting newer
tags aside on resume, trimming metrics.jsonl."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from pretrain.checkpoint import run_folder as rf
from pretrain.checkpoint.tags import RunFolderError, all_tags
from tests.helpers.dist import REPO
from tests.helpers.tags import make_tag


def test_lock_is_exclusive_and_names_the_live_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pretrain.checkpoint.run_folder import RunLock; "
        "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"),
        str(REPO), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError) as e:
            rf.RunLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(e.value) and "another run_dir" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    lock = rf.RunLock(tmp_path).acquire()  # the kernel dropped the dead holder's flock: taken over, with a note
    assert lock.note and str(holder.pid) in lock.note
    assert json.loads((tmp_path / rf.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert json.loads((tmp_path / rf.LOCK).read_text())["released"] is True
    again = rf.RunLock(tmp_path).acquire()
    assert again.note is None  # a released lock is no news
    again.release()


def test_lock_without_flock_decides_from_the_content(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / rf.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunFolderError, match="delete"):
        rf.RunLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rf.LOCK).write_text(json.dumps({"host": rf.socket.gethostname(), "pid": dead.pid}))
    lock = rf.RunLock(tmp_path).acquire()
    assert str(dead.pid) in lock.note
    lock.release()
    (tmp_path / rf.LOCK).write_text(json.dumps({"host": rf.socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(RunFolderError, match="in use by pid"):
        rf.RunLock(tmp_path).acquire()


def test_fresh_run_refused_in_a_used_folder_and_overwrite_clears_only_the_run(tmp_path):
    make_tag(tmp_path, 3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError) as e:
        rf.prepare_fresh(tmp_path, overwrite=False)
    assert all(w in str(e.value) for w in ("--resume auto", "--overwrite", "step_00000003", "run_dir"))
    rf.prepare_fresh(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # a run killed before its first save
    rf.prepare_fresh(tmp_path, overwrite=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_set_aside_newer_moves_complete_and_removes_partial(tmp_path):
    for s in (3, 6, 9):
        make_tag(tmp_path, s)
    make_tag(tmp_path, 12, complete=False)
    msgs = rf.set_aside_newer(tmp_path, tmp_path / "step_00000003")
    assert len(msgs) == 3 and [p.name for p in all_tags(tmp_path)] == ["step_00000003"]
    assert sorted(p.name for p in (tmp_path / rf.SUPERSEDED).glob("*/step_*")) == ["step_00000006",
                                                                                       "step_00000009"]


def test_trim_metrics_keeps_steps_up_to_the_resume_point(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (0, 1, 2, 3, 4)) + '{"step": 5, "lo')
    rf.trim_metrics(m, 2)
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [0, 1, 2]




def test_a_tag_held_by_a_reader_outlives_keep_last_until_it_is_released(tmp_path):
    for s in (3, 6, 9):
        make_tag(tmp_path, s)
    t3 = tmp_path / "step_00000003"
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pretrain.checkpoint.tags import reading\n"
        "with reading(sys.argv[2]):\n    print('reading', flush=True); time.sleep(60)"),
        str(REPO), str(t3)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        assert rf.prune(tmp_path, keep_last=1) == ["step_00000003"]  # step 6 removed, 3 held
        assert [p.name for p in all_tags(tmp_path)] == ["step_00000003", "step_00000009"]
    finally:
        reader.kill()
        reader.wait()
    assert rf.prune(tmp_path, keep_last=1) == [] and [p.name for p in all_tags(tmp_path)] == ["step_00000009"]


def test_reading_a_removed_or_incomplete_tag_says_so(tmp_path):
    from pretrain.checkpoint.tags import TagGone, reading

    t = make_tag(tmp_path, 3, complete=False)
    with pytest.raises(TagGone, match="keep_last"):
        with reading(t):
            pass
    with pytest.raises(TagGone):
        with reading(tmp_path / "step_00000042"):
            pass


def test_nan_storm_note_counts_storms_from_the_same_checkpoint(tmp_path):
    rf.record_nan_storm(tmp_path, {"step": 7, "last_checkpoint": "step_00000006", "message": "m"})
    rf.record_nan_storm(tmp_path, {"step": 8, "last_checkpoint": "step_00000006", "message": "m"})
    assert rf.read_nan_storm(tmp_path)["storms"] == 2 and rf.read_nan_storm(tmp_path)["step"] == 8
    rf.record_nan_storm(tmp_path, {"step": 12, "last_checkpoint": "step_00000009", "message": "m"})
    assert rf.read_nan_storm(tmp_path)["storms"] == 1
    rf.clear_nan_storm(tmp_path)
    assert rf.read_nan_storm(tmp_path) is None
