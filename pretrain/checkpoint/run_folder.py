"""The run folder: one job writes it, and its files other than the checkpoint tags.

    RUN_DIR/LOCK            host and pid of the job writing here (an flock held by global rank 0 for the job's life)
    RUN_DIR/step_XXXXXXXX/  checkpoint tags (pretrain.checkpoint.tags)
    RUN_DIR/latest          name of the newest complete tag (DeepSpeed's convention, for its tools and for people;
                            the resume point is chosen from the tags themselves, never from this file)
    RUN_DIR/superseded/     tags newer than the one a run was resumed from, moved aside
    RUN_DIR/metrics.jsonl   one record per logged step / evaluation (pretrain.metrics); a resume drops the records
                            after its checkpoint, so every step appears once
    RUN_DIR/run_info.json   resolved configs, versions, precision (pretrain.metrics.run_info)
    RUN_DIR/FINISHED        written only when all steps are done
    RUN_DIR/nan_storm.json  the last run stopped in a NaN storm: its step and the checkpoint it started from
    RUN_DIR/wandb/          wandb's files

Rank 0 does the chores here; collective callers go through `pretrain.distributed.on_rank0`, so a refusal reaches
every rank.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from pretrain import distributed as D
from pretrain.checkpoint.tags import (COMPLETE, RunFolderError, all_tags, complete_tags, remove_tag, tag_step,
                                      try_remove_tag)
from pretrain.run_files import describe_os_error, write_atomic, writing

LOCK = "LOCK"
LATEST = "latest"
FINISHED = "FINISHED"
SUPERSEDED = "superseded"
RESHARD_DIR = ".reshard"
METRICS = "metrics.jsonl"
RUN_INFO = "run_info.json"
NAN_STORM = "nan_storm.json"
HANG = "hang"  # the watchdog's heartbeats and dumps (pretrain.monitor)
# Files and folders a run writes in its run folder; --overwrite removes exactly these.
RUN_FILES = (METRICS, RUN_INFO, FINISHED, LATEST, NAN_STORM, HANG, "wandb", SUPERSEDED, RESHARD_DIR)


# --- the lock ---------------------------------------------------------------------------------------------
class RunLock:
    """One writer per run folder: an exclusive flock on RUN_DIR/LOCK held by global rank 0 for the job's life.

    The kernel drops the flock when the process dies (even by SIGKILL), so a lock left by a dead job is taken
    over with a note; the file's content (host, pid, start, Slurm job) names a live holder in the error. Where
    the filesystem has no flock (ENOLCK/ENOSYS/EOPNOTSUPP), the content alone decides: a holder on this host
    that no longer runs is stale; a holder on another host must be removed by hand (the error says how).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.note: str | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict) -> RunFolderError:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
               + (f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else "")) if holder else "another job"
        return RunFolderError(f"run folder {self.path.parent} is in use by {who} (lock {self.path}): two jobs writing "
                              f"one run folder overwrite each other's checkpoints. Wait for that job to end or stop "
                              f"it, or give this run another run_dir")

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self._read()) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            holder = self._read()  # no flock here: decide from the content
            if holder and not holder.get("released"):
                if holder.get("host") != socket.gethostname():
                    os.close(fd)
                    raise RunFolderError(
                        f"{self.path} names pid {holder.get('pid')} on host {holder.get('host')} and this filesystem "
                        f"has no file locks to tell whether it still runs: if that job has ended, delete "
                        f"{self.path}; otherwise give this run another run_dir") from None
                if _pid_alive(int(holder.get("pid", -1))):
                    os.close(fd)
                    raise self._busy(holder) from None
        prev = holder if holder is not None else self._read()
        if prev and not prev.get("released") and prev.get("pid") != os.getpid():
            self.note = (f"[checkpoint] took over the lock of pid {prev.get('pid')} on {prev.get('host')} (started "
                         f"{prev.get('started')}): that job ended without releasing it")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            rec = {**self._read(), "released": True}
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(rec).encode(), 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_run_folder(run_dir: str | Path) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises the same RunFolderError when it is held elsewhere."""
    lock, err = None, None
    if D.rank() == 0:
        try:
            lock = RunLock(run_dir).acquire()
            if lock.note:
                print(lock.note, flush=True)
        except (RunFolderError, OSError) as e:
            err = str(e) if isinstance(e, RunFolderError) else describe_os_error(e, Path(run_dir) / LOCK)
    err = D.broadcast_object(err)
    if err:
        raise RunFolderError(err)
    return lock


def prepare_fresh(run_dir: str | Path, overwrite: bool) -> None:
    """Rank 0, holding the lock, before a run without --resume: refuse a folder that holds checkpoints of
    another run unless `overwrite`, which removes them and the run's own files (other files stay)."""
    d = Path(run_dir)
    tags = all_tags(d)
    finished = (d / FINISHED).exists()
    if not (tags or finished):
        for name in (METRICS, LATEST):  # a run killed before its first save left only these
            (d / name).unlink(missing_ok=True)
        return
    if not overwrite:
        what = f"{len(tags)} checkpoint folder(s) ({tags[-1].name} the newest)" if tags else f"a {FINISHED} marker"
        raise RunFolderError(f"run folder {d} already holds {what} of an earlier run: continue it with --resume auto, "
                             f"or start fresh in a new run_dir, or pass --overwrite to delete that run's checkpoints "
                             f"and logs")
    for t in tags:
        remove_tag(t)
    for name in RUN_FILES:
        p = d / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    print(f"[checkpoint] --overwrite: removed {len(tags)} checkpoint(s) and the logs of the earlier run in {d}",
          flush=True)


def set_aside_newer(run_dir: str | Path, tag: Path) -> list[str]:
    """Rank 0: tags of this run folder newer than the resume point (an abandoned continuation, or incomplete
    saves) are moved to RUN_DIR/superseded/, so saves of the resumed run are never mistaken for older ones."""
    d = Path(run_dir)
    step = tag_step(tag)
    moved = []
    for t in all_tags(d):
        if tag_step(t) > step:
            if not (t / COMPLETE).is_file():
                remove_tag(t)  # nothing loadable: an interrupted save
                moved.append(f"removed the incomplete save {t.name}")
                continue
            dest = d / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S")
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(t, dest / t.name)
            moved.append(f"moved {t.name} to {dest.relative_to(d)}/ (newer than the resume point)")
    return moved


def trim_metrics(path: Path, step: int) -> None:
    """Rank 0: drop metrics.jsonl records after `step` (they belong to the lost part of an interrupted run)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by a kill
    with writing(path):
        write_atomic(path, "".join(k + "\n" for k in keep))


def prune(run_dir: str | Path, keep_last: int) -> list[str]:
    """Rank 0: remove all but the `keep_last` newest complete tags; -> the older tags kept because a reader holds
    them (pretrain.convert, pretrain.evaluate, another run's init_from): a later save removes them."""
    return [old.name for old in complete_tags(run_dir)[:-keep_last] if not try_remove_tag(old)]


def record_nan_storm(run_dir: str | Path, record: dict) -> None:
    """Rank 0: note in RUN_DIR/nan_storm.json that the run stopped in a NaN storm (step, the checkpoint it started
    from, the message), so the next --resume auto says so when it picks that checkpoint again."""
    path = Path(run_dir) / NAN_STORM
    with writing(path):
        old = read_nan_storm(run_dir) or {}
        same = old.get("last_checkpoint") == record.get("last_checkpoint")
        write_atomic(path, json.dumps({**record, "storms": (old.get("storms", 1) + 1) if same else 1}, indent=1))


def read_nan_storm(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / NAN_STORM).read_text())
    except (OSError, ValueError):
        return None


def clear_nan_storm(run_dir: str | Path) -> None:
    (Path(run_dir) / NAN_STORM).unlink(missing_ok=True)


def mark_latest(run_dir: str | Path, tag: Path) -> None:
    write_atomic(Path(run_dir) / LATEST, tag.name)


def mark_finished(run_dir: str | Path, step: int) -> None:
    with writing(Path(run_dir) / FINISHED):
        write_atomic(Path(run_dir) / FINISHED, f"step {step}\n")


def clear_finished(run_dir: str | Path) -> None:
    (Path(run_dir) / FINISHED).unlink(missing_ok=True)


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / FINISHED).exists()


def make_run_dir(run_dir: str | Path) -> None:
    """Collective: rank 0 creates the folder; a failure (read-only, no space) is a RunFolderError on every rank."""
    def mk():
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(describe_os_error(e, run_dir)) from None

    D.on_rank0(mk, errors=(RunFolderError,))
    D.barrier()
