"""pretrain/run_files.py: a failed write is named by its cause."""

from __future__ import annotations

import errno

from pretrain.run_files import describe_os_error


def test_os_errors_are_described_by_cause(tmp_path):
    assert "no space left on device" in describe_os_error(OSError(errno.ENOSPC, "x"), tmp_path / "f")
    assert "quota" in describe_os_error(OSError(errno.EDQUOT, "x"), tmp_path / "f")
    assert "read-only" in describe_os_error(OSError(errno.EROFS, "x"), tmp_path / "f")
    assert "permission denied" in describe_os_error(PermissionError(errno.EACCES, "x"), tmp_path / "f")
    msg = describe_os_error(RuntimeError("basic_ios::clear: iostream error"), tmp_path / "f")
    assert "iostream error" in msg and "MiB free" in msg  # plenty of space here: the message says so


