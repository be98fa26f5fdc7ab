"""Signals of the job: stop after the current step and save, whoever receives them.

SIGTERM / SIGUSR1 / SIGINT set a flag (`StopSignals.stop`); the loop agrees on it across ranks after each step,
saves and returns (exit 0, no FINISHED). A second SIGINT interrupts at once. Under the `deepspeed` launcher the
launcher's death counts as a signal (its ranks would otherwise keep running).
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path


class StopSignals:
    """SIGTERM / SIGUSR1 / SIGINT ask for a save and a clean exit after the current step (`stop`); a second
    SIGINT interrupts at once (KeyboardInterrupt). Under the `deepspeed` launcher, the death of the launcher
    (SIGTERM to the `deepspeed` process alone kills it and leaves the ranks running) counts as a signal: a
    thread watches the launcher processes this rank descends from."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.stop = False
        self.received: str | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        self._watch_launcher()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.stop = True
        self.received = signal.Signals(signum).name

    def _watch_launcher(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        try:
            ancestors = [p for p in psutil.Process().parents() if _is_deepspeed_launcher(p.cmdline())]
        except (psutil.Error, OSError):
            return
        if not ancestors:
            return
        import threading

        def watch():
            while not self.stop:
                if any(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in ancestors):
                    self.received = self.received or "launcher exit"
                    self.stop = True
                    return
                time.sleep(1.0)

        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()

    @contextlib.contextmanager
    def children_ignore_sigint(self):
        """Children started inside (wandb's service) inherit SIGINT ignored, so Ctrl-C to the process group leaves
        them alive to flush their files (Go programs keep an inherited ignored SIGINT; they do not keep SIGTERM,
        which is why wandb failures are made non-fatal). Only SIGINT: a SIGTERM in this window is not lost."""
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


def _is_deepspeed_launcher(cmdline: list[str]) -> bool:
    """The `deepspeed` runner script or its `python -m deepspeed.launcher.launch` child."""
    head = cmdline[:4]
    return "deepspeed.launcher.launch" in head or any(Path(c).name == "deepspeed" for c in head[:2])


class Interrupted(Exception):
    """A stop signal arrived during a phase that cannot save (resharding a checkpoint before the first step); the
    message names the phase. The job exits 0 with nothing new to save; --resume auto starts the phase again."""
