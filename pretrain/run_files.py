"""Writing the run's files: atomic replacement, fsync, and one line naming the cause of a failed write.

Every file the job writes (checkpoint tags, manifests, metrics.jsonl, run_info.json, FINISHED, the lock, its log
lines) goes through these, so a failed write reads the same wherever it happens: "no space left on device writing
PATH ...", one line, every rank stopping together (`RunWriteError`, `WriteGuard`), never a raw traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

LOW_SPACE = 64 * 2**20  # below this many free bytes an opaque write error is taken for a full disk


def describe_os_error(exc: BaseException, path: str | Path) -> str:
    """One line naming the cause of a failed write: ENOSPC / EDQUOT / EROFS / EACCES, or torch's opaque
    stream errors (`basic_ios::clear`, `file write failed`) diagnosed from the free space left."""
    p = Path(path)
    err = exc.errno if isinstance(exc, OSError) else None
    probe = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    free_s = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    if err in (errno.ENOSPC, errno.EDQUOT) or (err is None and free is not None and free < LOW_SPACE):
        quota = ", quota exceeded" if err == errno.EDQUOT else ""
        return (f"no space left on device writing {p} ({free_s} on its filesystem{quota}): "
                f"free space or lower keep_last, then resume with --resume auto")
    if err == errno.EROFS:
        return f"read-only filesystem: cannot write {p}; point run_dir at a writable folder"
    if err in (errno.EACCES, errno.EPERM):
        return f"permission denied writing {p}; fix the folder's permissions or choose another run_dir"
    return f"cannot write {p}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} ({free_s})"


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write `text` under a temporary name, fsync, rename over `path`: a reader sees the old file or the new one.
    `durable=False` skips the fsyncs (still atomic for readers, not across a power loss): for files rewritten every
    few seconds whose loss in a crash means nothing, so that a disk busy with a checkpoint never delays them."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


class RunWriteError(RuntimeError):
    """A write of the run's files failed (no space left, read-only, permission): raised on every rank alike, the
    message names the cause and the file; the checkpoints already written are intact."""


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn an OSError inside into a RunWriteError naming its cause and `path`."""
    try:
        yield
    except OSError as e:
        raise RunWriteError(describe_os_error(e, path)) from None


class WriteGuard:
    """The first failed write of this rank's run files (metrics, logs, wandb's files, dumps), held instead of
    raised: a rank raising alone would leave its peers waiting in the next collective. The training loop agrees
    on `error` across ranks after each step and stops every rank with it (`RunWriteError`)."""

    def __init__(self) -> None:
        self.error: str | None = None

    def record(self, exc: BaseException, path: str | Path) -> None:
        if self.error is None:
            self.error = describe_os_error(exc, path)

    def run(self, fn, path: str | Path):
        """fn() unless a write already failed; an OSError is recorded (-> None)."""
        if self.error is not None:
            return None
        try:
            return fn()
        except OSError as e:
            self.record(e, path)
            return None


class GuardedStream:
    """stdout / stderr whose write errors (the job's log file on a full disk) go to a WriteGuard instead of
    raising from whatever happened to print (a progress bar, a warning)."""

    def __init__(self, stream, guard: WriteGuard, fd: int) -> None:
        self._stream, self._guard, self._fd = stream, guard, fd

    def _where(self) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{self._fd}")
        except OSError:
            return {1: "stdout", 2: "stderr"}.get(self._fd, f"fd {self._fd}")

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            self._guard.record(e, self._where())
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            self._guard.record(e, self._where())

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_std_streams(guard: WriteGuard) -> None:
    """Route sys.stdout / sys.stderr write errors to `guard` (once per process)."""
    import sys

    if not isinstance(sys.stdout, GuardedStream):
        sys.stdout = GuardedStream(sys.stdout, guard, 1)
    if not isinstance(sys.stderr, GuardedStream):
        sys.stderr = GuardedStream(sys.stderr, guard, 2)
