"""Shared fixtures. The layout mirrors the source: tests/ressformer (the model package), tests/pretrain (the
pipeline; tests/pretrain/checkpoint for pretrain/checkpoint/), tests/tokenizer, tests/bench (the benchmarks and the
paper suite), tests/e2e (whole jobs through the CLI and Slurm, slow tier). tests/helpers holds the rank workers and
launch helpers the multi-rank tests start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.dist import REPO, base_env


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores (torch's default is all of them per process), for
    its own tensors and for the processes its tests start. Before any test module is collected, triton's language
    functions are imported for its interpreter on a host without CUDA (tests/helpers/triton_interpreter.py): the
    kernel tests then pass whichever module imports triton first."""
    from tests.helpers.triton_interpreter import import_language_interpreted

    import_language_interpreted()
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, _worker_signalled)


_fault_file = None


def pytest_sessionstart(session):
    """An xdist worker writes the Python stacks of a fatal error (SIGSEGV, SIGABRT, SIGBUS, SIGFPE) into a file of
    its own, which pytest_handlecrashitem adds to the report (pytest's faulthandler writes them to the worker's
    stderr, which xdist does not show). Set here, after pytest's faulthandler plugin has set its own."""
    global _fault_file
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import faulthandler

        _fault_file = open(_fault_note(os.getpid()), "w")
        faulthandler.enable(file=_fault_file, all_threads=True)


def pytest_unconfigure(config):
    """Stop writing fatal errors to the worker's file before closing it (pytest's faulthandler plugin, after this
    hook, restores the original stderr)."""
    if _fault_file is not None:
        import faulthandler

        faulthandler.disable()
        _fault_file.close()
        Path(_fault_file.name).unlink(missing_ok=True)


def _signal_note(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"pytest-worker-{pid}-signalled.txt"


def _fault_note(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"pytest-worker-{pid}-fault.txt"


def _worker_signalled(signum, frame):
    """A signal that would end an xdist worker without a word (xdist says only that it crashed): write its name and
    every thread's stack where pytest_handlecrashitem reads them (the worker's stderr is pytest's capture file while a
    test runs), then end as the signal would."""
    import faulthandler

    with open(_signal_note(os.getpid()), "w") as f:
        f.write(f"received {signal.Signals(signum).name} from outside; its threads:\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """xdist: a worker died while running `crashitem`. Add how it ended to the report: its exit status (a signal by
    name), the Python stacks of a fatal error (pytest_sessionstart) or of a signal from outside, the kernel's
    out-of-memory line for its pid if there is one, the memory then available and the largest processes at that
    moment.

    A worker ended by a signal from outside (SIGKILL, SIGTERM, SIGHUP, SIGUSR1/2: the kernel's OOM killer, or a
    process that signalled a stale pid: pid_max is 32768 on these 2-core machines, and the suite takes 500 to 1,000
    new pids a minute) runs the test
    again, alone in a fresh `pytest -p no:xdist`, at once; it counts as passed only if that run passes, and the run's
    output says so in a line. A worker that crashed on its own (SIGSEGV, SIGABRT, SIGBUS, an exit status) fails."""
    notes, rc = [], None
    popen = getattr(getattr(getattr(report, "node", None), "gateway", None), "_io", None)
    popen = getattr(popen, "popen", None)
    if popen is not None:
        try:
            rc = popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        how = ("still running 10 s later" if rc is None else f"killed by {_signal_name(-rc)}" if rc < 0
               else f"exit status {rc}")
        notes.append(f"worker pid {popen.pid}: {how}")
        for note in (_signal_note(popen.pid), _fault_note(popen.pid)):
            if note.is_file():
                text = note.read_text().strip()
                if text:
                    notes.append(text)
                note.unlink()
        try:
            kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()
            notes += [line for line in kernel if f"process {popen.pid} " in line or f"pid={popen.pid}," in line]
        except (OSError, subprocess.SubprocessError):
            notes.append("(dmesg could not be read)")
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
        notes.append(f"MemAvailable now: {meminfo['MemAvailable'].strip()}")
        top = subprocess.run(["ps", "-eo", "rss,pid,args", "--sort=-rss"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[:6]
        notes += [line[:200] for line in top]
    except (OSError, KeyError, subprocess.SubprocessError):
        pass
    report.longrepr = f"{report.longrepr}\n" + "\n".join(notes)
    if rc is None or -rc not in OUTSIDE_SIGNALS:
        return
    config = sched.config
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTEST_ADDOPTS"] = ""
    try:
        again = subprocess.run([sys.executable, "-m", "pytest", crashitem, "-p", "no:xdist", "-p", "no:cacheprovider",
                                "-q", "-rA"], cwd=config.rootpath, env=env, capture_output=True, text=True,
                               timeout=1800)
        passed, tail = again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        passed, tail = False, "(the run alone did not end within 1800 s)"
    said = [n.splitlines()[0] for n in notes if n.startswith(("received", "MemAvailable")) or "Killed process" in n]
    line = (f"{crashitem}: the worker running it was {how}; run again alone: {'passed' if passed else 'FAILED'} "
            f"({'; '.join(said)})")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    if passed:
        report.outcome, report.when, report.longrepr = "passed", "call", None
    else:
        report.longrepr = f"{report.longrepr}\nrun again alone:\n{tail}"


OUTSIDE_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def pytest_collection_modifyitems(config, items):
    """Files run longest first, the order within a file kept: each xdist worker takes whole files (scripts/test.sh:
    --dist loadfile --no-loadscope-reorder), and the short files left for the end keep both workers busy until the
    last one finishes. The seconds are measured (tests/file_seconds.json, tests/helpers/file_seconds.py). A file not
    in the table goes first if it has slow tests (a long file left for the end would run alone), last otherwise."""
    table = json.loads((REPO / "tests" / "file_seconds.json").read_text())
    seconds: dict = {}
    for item in items:
        known = table.get(item.path.relative_to(REPO).as_posix())
        slow = float("inf") if item.get_closest_marker("slow") else 0.0
        seconds[item.path] = max(seconds.get(item.path, 0.0), slow if known is None else known)
    first: dict = {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (-seconds[item.path], first[item.path]))


@pytest.fixture(scope="session")
def default_data():
    """The default corpus prepared into REPO/artifacts (tokenizer + indexed datasets), as scripts/main.sh does; the
    configs in pretrain/configs read it."""
    if not (REPO / "artifacts" / "data" / "shakespeare.idx").is_file():
        subprocess.run([sys.executable, "-m", "pretrain.data", "prepare"], cwd=REPO, env=base_env(), check=True,
                       timeout=300)
    return REPO / "artifacts"
