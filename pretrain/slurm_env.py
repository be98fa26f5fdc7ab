"""Slurm -> torch.distributed environment, in one place for every launch script under slurm/.

Used by `slurm/_launch.sh` (sourced by slurm/pretrain_1b.sh and slurm/pretrain_debug.sh):

    python -m pretrain.slurm_env master             # in the batch shell: prints `export MASTER_ADDR=.. MASTER_PORT=..`
    srun python -m pretrain.slurm_env exec -- CMD   # per task: sets RANK/LOCAL_RANK/WORLD_SIZE, then exec CMD
    python -m pretrain.slurm_env hostfile PATH      # the DeepSpeed-launcher alternative: "host slots=N" lines

Design choices:
- Ranks come from Slurm itself: `srun` starts one task per GPU and each task maps RANK=SLURM_PROCID,
  LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS (LOCAL_WORLD_SIZE from SLURM_NTASKS_PER_NODE or
  SLURM_TASKS_PER_NODE). `deepspeed.init_distributed()` then reads the same variables torchrun would set,
  so no ssh, no pdsh, no hostfile is needed.
- MASTER_ADDR is the *address* of the first node of the allocation. `scontrol show hostnames` gives node
  names, which need not resolve (on the two-node test cluster they are n1/n2 on 127.0.0.1; on real
  clusters names usually resolve but NodeAddr is what slurmd itself listens on), so the name is turned
  into the node's NodeAddr with `scontrol show node -o NAME`. It is resolved once, in the batch shell,
  and exported to the tasks by srun; tasks never hit slurmctld.
- MASTER_PORT is derived from the job id (20000 + id % 20000): jobs sharing a node do not collide and a
  requeued job (same id) reuses its port. An explicit MASTER_ADDR / MASTER_PORT in the environment wins.
- Only the standard library: this runs before torch is imported, in every task.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence

PORT_BASE = 20000
PORT_SPAN = 20000


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as e:
        raise RuntimeError("scontrol is not on PATH: run inside a Slurm allocation, or set MASTER_ADDR yourself") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`scontrol {' '.join(args)}` failed (rc={e.returncode}): {e.stderr.strip()}") from e


def expand_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST`, e.g. 'n[1-2]' -> ['n1', 'n2']."""
    if not nodelist:
        raise ValueError("empty SLURM_JOB_NODELIST: run inside a Slurm allocation (sbatch/salloc)")
    names = _scontrol("show", "hostnames", nodelist).split()
    if not names:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` returned no host names")
    return names


def parse_node_addr(show_node_output: str, name: str) -> str:
    """NodeAddr from `scontrol show node -o NAME` output (falls back to NodeHostName, then the name)."""
    for key in ("NodeAddr", "NodeHostName"):
        m = re.search(rf"\b{key}=(\S+)", show_node_output)
        if m and m.group(1) not in ("(null)", ""):
            return m.group(1)
    return name


def node_addr(name: str) -> str:
    return parse_node_addr(_scontrol("show", "node", "-o", name), name)


def master_port(job_id: str | int) -> int:
    """A port in [PORT_BASE, PORT_BASE + PORT_SPAN) fixed by the job id (stable across requeues)."""
    try:
        jid = int(str(job_id).split("_")[0])
    except ValueError as e:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} is not a job number: set MASTER_PORT yourself") from e
    return PORT_BASE + jid % PORT_SPAN


def master_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for this allocation (explicit values in `env` win)."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR") or node_addr(expand_hostnames(env.get("SLURM_JOB_NODELIST", ""))[0])
    port = env.get("MASTER_PORT") or str(master_port(env.get("SLURM_JOB_ID", "")))
    return {"MASTER_ADDR": addr, "MASTER_PORT": port}


def _tasks_per_node(env: Mapping[str, str]) -> str:
    """LOCAL_WORLD_SIZE: SLURM_NTASKS_PER_NODE, else the first count of SLURM_TASKS_PER_NODE ('8(x4)' -> 8)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return env["SLURM_NTASKS_PER_NODE"]
    m = re.match(r"(\d+)", env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    return m.group(1) if m else "1"


def rank_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE of this srun task."""
    env = os.environ if env is None else env
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS") if k not in env]
    if missing:
        raise RuntimeError(f"{missing} not set: `exec` must run as an srun task (srun python -m pretrain.slurm_env exec -- ...)")
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_WORLD_SIZE": _tasks_per_node(env)}


def hostfile_lines(env: Mapping[str, str] | None = None, slots: int | None = None) -> list[str]:
    """DeepSpeed hostfile for the allocation: one 'HOST slots=N' line per node (N = GPUs per node)."""
    env = os.environ if env is None else env
    n = slots if slots is not None else int(env.get("GPUS_PER_NODE") or _tasks_per_node(env))
    return [f"{h} slots={n}" for h in expand_hostnames(env.get("SLURM_JOB_NODELIST", ""))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.slurm_env", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("master", help="print shell exports of MASTER_ADDR and MASTER_PORT for this allocation")
    ex = sub.add_parser("exec", help="set RANK/LOCAL_RANK/WORLD_SIZE from SLURM_* and exec the command")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    hf = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for the allocation")
    hf.add_argument("path")
    hf.add_argument("--slots", type=int, default=None, help="slots per host (default: GPUS_PER_NODE)")
    args = ap.parse_args(argv)

    if args.cmd == "master":
        for k, v in master_env().items():
            print(f"export {k}={shlex.quote(v)}")
        return 0
    if args.cmd == "hostfile":
        with open(args.path, "w") as f:
            f.write("\n".join(hostfile_lines(slots=args.slots)) + "\n")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("exec needs a command after `--`, e.g. exec -- python pretrain/main.py ...")
    env = dict(os.environ)
    env.update(rank_env(env))
    env.update(master_env(env))
    os.execvpe(command[0], command, env)
    return 0  # unreachable


if __name__ == "__main__":
    raise SystemExit(main())
