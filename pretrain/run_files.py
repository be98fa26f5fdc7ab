"""Writing the run's files: atomic replacement, fsync, and one line naming the cause of a failed write.

Every file the job writes (checkpoint tags, manifests, metrics.jsonl, run_info.json, FINISHED, the lock) goes
through these, so a failed write reads the same wherever it happens: "no space left on device writing PATH ...",
never a raw traceback.
"""

from __future__ import annotations

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


def write_atomic(path: Path, text: str) -> None:
    """Write `text` under a temporary name, fsync, rename over `path`: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
