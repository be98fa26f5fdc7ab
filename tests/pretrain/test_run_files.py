"""pretrain/run_files.py: a failed write is named by its cause."""

from __future__ import annotations

import errno
import io

import pytest

from pretrain.run_files import GuardedStream, RunWriteError, WriteGuard, describe_os_error, writing


def test_os_errors_are_described_by_cause(tmp_path):
    assert "no space left on device" in describe_os_error(OSError(errno.ENOSPC, "x"), tmp_path / "f")
    assert "quota" in describe_os_error(OSError(errno.EDQUOT, "x"), tmp_path / "f")
    assert "read-only" in describe_os_error(OSError(errno.EROFS, "x"), tmp_path / "f")
    assert "permission denied" in describe_os_error(PermissionError(errno.EACCES, "x"), tmp_path / "f")
    msg = describe_os_error(RuntimeError("basic_ios::clear: iostream error"), tmp_path / "f")
    assert "iostream error" in msg and "MiB free" in msg  # plenty of space here: the message says so




def test_write_guard_keeps_the_first_failure_and_writing_names_the_file(tmp_path):
    guard = WriteGuard()
    assert guard.run(lambda: 7, tmp_path) == 7 and guard.error is None

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    assert guard.run(full, tmp_path / "metrics.jsonl") is None
    assert "no space left on device writing" in guard.error and "metrics.jsonl" in guard.error
    first = guard.error
    guard.record(OSError(errno.EROFS, "ro"), tmp_path / "other")
    assert guard.error == first and guard.run(lambda: 7, tmp_path) is None  # nothing more is written
    with pytest.raises(RunWriteError, match="read-only.*run_info.json"):
        with writing(tmp_path / "run_info.json"):
            raise OSError(errno.EROFS, "ro")


def test_a_full_log_goes_to_the_guard_not_to_the_caller():
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    guard = WriteGuard()
    stream = GuardedStream(Full(), guard, 1)
    assert stream.write("a progress bar") == len("a progress bar")
    stream.flush()
    assert "no space left on device" in guard.error
