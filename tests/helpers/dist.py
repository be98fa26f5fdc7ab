"""Launch real multi-rank gloo CPU runs from tests: plain subprocesses with the env vars srun/torchrun set
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the launcher-free path of the engine is the one
tested, and `deepspeed --num_gpus N` for the launcher path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from pretrain.distributed import free_port  # noqa: E402  (re-exported for the tests)




def base_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return env


def run_group(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a process group of its own. On timeout every process
    in the group (a launcher's ranks included, which subprocess.run would leave running) gets SIGUSR2 (the trainer
    then prints its Python stacks), then SIGKILL; the AssertionError carries the output."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _dump_then_kill([p], group=True)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))}\nstill running after {timeout:.0f} s, killed; stdout:\n"
                             f"{out[-4000:]}\nstderr:\n{err[-6000:]}") from None
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # nothing of the group outlives the call (orphaned ranks)
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _dump_then_kill(procs: list[subprocess.Popen], group: bool = False) -> None:
    kill = (lambda p, s: os.killpg(p.pid, s)) if group else (lambda p, s: p.send_signal(s))
    for sig, pause in ((signal.SIGUSR2, 3.0), (signal.SIGKILL, 0.0)):
        for p in procs:
            try:
                kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(pause)


def launch_ranks(argv: list[str], world_size: int, timeout: float, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run `python argv...` as `world_size` ranks with srun-style env vars; raise with the logs on failure.

    A rank still running after `timeout` s is killed and the error carries every rank's output so far (a hang
    is then diagnosable from a CI log, not just a TimeoutExpired)."""
    port = free_port()
    procs = []
    for r in range(world_size):
        renv = dict(env or base_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=renv, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs, hung = [], False
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                hung = True
                _dump_then_kill([q for q in procs if q.poll() is None])
                out, _ = p.communicate()
            outs.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if hung:
        raise AssertionError(f"ranks still running after {timeout:.0f} s, killed; output per rank:\n" +
                             "\n----\n".join(f"rank {r}:\n{o.stdout[-3000:]}" for r, o in enumerate(outs)))
    bad = [o for o in outs if o.returncode != 0]
    if bad:
        raise AssertionError("rank failed:\n" + "\n----\n".join(o.stdout[-4000:] for o in bad))
    return outs
