"""What the Slurm launcher does after the trainer's srun ends: requeue, exclude a node, or stop. Standard library only
(it runs in the batch shell, before torch).

    eval "$(python -m pretrain.launch_policy --run-dir RUN_DIR --rc RC [--signal SIG] [--srun-log FILE])"
    # sets ACTION=done|requeue|stop, EXCLUDE=<node list or empty>, REASON=<one line>

- FINISHED in the run folder: done.
- A signal (preemption, the time limit) or exit 0 before the last step: requeue (the preemption budget,
  MAX_REQUEUES, is the launcher's).
- Exit 2 (a bad config, the run folder refused, a failed write): stop; a restart would repeat it.
- Any other failure is a crash (a rank killed, the watchdog's exit 4 after a hang, a NaN storm's 3, the
  preflight's 5, a Python error): requeue within MAX_CRASH_RESTARTS crash restarts of this job, counted apart from
  preemptions in RUN_DIR/.launch/crashes.json; stop when the newest checkpoint is the same as at the previous crash
  (the same step failed twice in a row: a deterministic failure must not loop).
- The node to exclude: the ranks that stopped reporting in the watchdog's dumps (RUN_DIR/hang/rank*.json written
  during this job), else the node srun names first in its `srun: error: NODE: task N: ...` lines; it is excluded
  (`scontrol update JobId=.. ExcNodeList=..`) only when the cluster keeps enough other nodes for the job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

CRASHES = Path(".launch") / "crashes.json"
REFUSED = (2,)  # exit statuses that a restart repeats


def newest_complete_tag(run_dir: Path) -> str | None:
    tags = sorted((p for p in run_dir.glob("step_*") if (p / "COMPLETE").is_file()), key=lambda p: p.name)
    return tags[-1].name if tags else None


def blamed_nodes(run_dir: Path, srun_log: Path | None, since: float) -> list[str]:
    """Nodes of the ranks the watchdog's dumps (written after `since`) name as stopped, else srun's first error."""
    nodes = []
    for f in sorted((run_dir / "hang").glob("rank*.json")):
        try:
            if f.stat().st_mtime < since:
                continue
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for p in rec.get("stopped_reporting") or []:
            node = p.get("node") or p.get("host")
            if node and node not in nodes:
                nodes.append(node)
    if nodes or srun_log is None or not srun_log.is_file():
        return nodes
    m = re.search(r"^srun: error: (\S+): tasks? [\d,-]+: ", srun_log.read_text(errors="replace"), re.M)
    return [m.group(1)] if m else []


def _scontrol_job(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _expand(nodelist: str) -> list[str]:
    if not nodelist or nodelist == "(null)":
        return []
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout
    return out.split()


def exclusion(job: str | None, nodes: list[str]) -> tuple[list[str], str]:
    """(the node list to exclude from now on, a note) for `nodes` to blame; [] when the cluster would have too few."""
    if not job or not nodes:
        return [], ""
    info = _scontrol_job(job)
    need = int(info.get("NumNodes", "1").split("-")[0])
    before = _expand(info.get("ExcNodeList", ""))
    everyone = set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split())
    after = sorted(set(before) | set(nodes))
    left = len(everyone - set(after))
    if left < need:
        return [], (f"not excluding {','.join(nodes)}: the cluster would keep {left} node(s) for a job of {need}")
    return after, f"excluding {','.join(nodes)} from the requeued job"


def decide(run_dir: Path, rc: int, signal: str, *, srun_log: Path | None = None, max_crash_restarts: int = 3,
           job: str | None = None, job_start: float = 0.0) -> dict:
    """{"action": done|requeue|stop, "exclude": [...], "reason": str}; a crash is recorded in RUN_DIR/.launch/."""
    if (run_dir / "FINISHED").exists():
        return {"action": "done", "exclude": [], "reason": "the run is finished"}
    if signal or rc == 0:
        return {"action": "requeue", "exclude": [], "reason": f"stopped by {signal or 'the trainer'} before the "
                                                              f"last step, checkpoint saved"}
    if rc in REFUSED:
        return {"action": "stop", "exclude": [], "reason": f"the trainer refused to run (exit {rc}: a config, run "
                                                           f"folder or write error; its message says which): a restart "
                                                           f"would repeat it"}
    path = run_dir / CRASHES
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = []
    tag = newest_complete_tag(run_dir)
    nodes = blamed_nodes(run_dir, srun_log, job_start)
    where = f" on {','.join(nodes)}" if nodes else ""
    restarts = sum(1 for r in records if r.get("job") == job and r.get("action") == "requeue")
    if records and records[-1].get("newest_checkpoint") == tag:
        d = {"action": "stop", "exclude": [], "reason": f"the trainer failed (exit {rc}){where} again before any new "
             f"checkpoint ({tag or 'none'} both times): the same step failed twice in a row, a restart would repeat "
             f"it; see the log above and RUN_DIR/hang/"}
    elif restarts >= max_crash_restarts:
        d = {"action": "stop", "exclude": [], "reason": f"the trainer failed (exit {rc}){where}; this job has been "
             f"restarted after {restarts} crashes already (MAX_CRASH_RESTARTS={max_crash_restarts})"}
    else:
        exclude, note = exclusion(job, nodes)
        d = {"action": "requeue", "exclude": exclude,
             "reason": f"the trainer failed (exit {rc}){where}: crash restart {restarts + 1} of {max_crash_restarts}, "
                       f"resuming from {tag or 'the start'}" + (f"; {note}" if note else "")}
    rec = {"time": time.time(), "job": job, "rc": rc, "newest_checkpoint": tag, "nodes": nodes, "action": d["action"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records + [rec], indent=1))
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.launch_policy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--rc", type=int, required=True, help="srun's exit status")
    ap.add_argument("--signal", default="", help="the signal the batch shell got (USR1, TERM), if any")
    ap.add_argument("--srun-log", default=None, help="srun's output (its `srun: error: NODE: task` lines)")
    ap.add_argument("--max-crash-restarts", type=int, default=int(os.environ.get("MAX_CRASH_RESTARTS", "3")))
    ap.add_argument("--job-start", type=float, default=0.0, help="epoch seconds this job started (hang dumps after)")
    a = ap.parse_args(argv)
    d = decide(Path(a.run_dir), a.rc, a.signal, srun_log=Path(a.srun_log) if a.srun_log else None,
               max_crash_restarts=a.max_crash_restarts, job=os.environ.get("SLURM_JOB_ID"), job_start=a.job_start)
    print(f"ACTION={d['action']}\nEXCLUDE={shlex.quote(','.join(d['exclude']))}\nREASON={shlex.quote(d['reason'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
