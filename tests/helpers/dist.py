"""Launch real multi-rank gloo CPU runs from tests: plain subprocesses with the env vars srun/torchrun set
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the launcher-free path of the engine is the one
tested, and `deepspeed --num_gpus N` for the launcher path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return env


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
                for q in procs:
                    q.kill()
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
