"""What each rank is doing, and what to do when it stops: phases, a watchdog, stragglers.

- Phases. The loop marks where a rank is (`phase("data")`, "forward", "backward", "optimizer", "log", "save",
  "eval"); a switch adds the host time since the last one to the phase left. Cheap: one clock read, no device sync.
- Watchdog (a thread on every rank). When no step (nor save / evaluation) completes within the limit, the rank
  writes every thread's Python stack and its last phase to RUN_DIR/hang/rank{R}.{stacks.txt,json}, names the ranks
  that stopped reporting, and exits with status 4 so the launcher (deepspeed, torchrun, srun) ends the job and Slurm
  can requeue it. Ranks report through heartbeat files (RUN_DIR/hang/heartbeats/rank{R}.json, rewritten every few
  seconds by the thread), not through collectives: a stopped rank (SIGSTOP, a hung driver) stops writing its file,
  and its peers, waiting in a collective, name it. The limit (`faults.step_timeout_s`): given, or max(10 x the
  median step, 10 min) once three steps are done; 30 min before the first steps complete and during saves and
  evaluations (a first step compiles, a save gathers the model).
- Stragglers. Every `log_every` steps the ranks all-gather their mean time per phase. Delays propagate forward in
  a step: the ranks that wait for a slow one wait in the next collective, in a later phase. So the slow rank is
  the one with the largest time in the *earliest* phase where a rank exceeds `faults.straggler_ratio` x the
  median of that phase (phases under 5 % of the median step ignored). Metrics get it with its host, phase and ratio,
  and a warning names a rank that stays the slow one for `faults.straggler_windows` windows. Host clocks only: a
  rank whose GPU kernels are slow under ZeRO-3 makes its peers wait inside the same phase and is not told apart
  from them; the preflight's per-rank matmul TFLOP/s names a slow GPU before the run.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch

from pretrain import distributed as D
from pretrain.run_files import write_atomic

PHASES = ("data", "forward", "backward", "optimizer", "log", "save", "eval")
STEP_PHASES = PHASES[:4]  # the phases of an optimizer step, in the order they run
LONG_PHASES = ("startup", "save", "eval")  # phases that may take far longer than a step
LONG_LIMIT_S = 1800.0
HANG_EXIT = 4

_active: "Monitor | None" = None


def phase(name: str) -> None:
    """Mark the phase this rank enters (no-op without an active Monitor: tools and tests that call the loop's
    pieces alone)."""
    if _active is not None:
        _active.enter(name)


class Monitor:
    """Phases, the watchdog thread and the straggler windows of one rank (module docstring)."""

    def __init__(self, run_dir: str | Path, *, step_timeout_s: float = 0.0, straggler_ratio: float = 1.3,
                 straggler_windows: int = 3, rank: int | None = None, host: str | None = None) -> None:
        global _active
        self.dir = Path(run_dir) / "hang"
        self.rank = D.rank() if rank is None else rank
        self.host = host or socket.gethostname()
        self.node = os.environ.get("SLURMD_NODENAME") or self.host  # the name Slurm excludes a node by
        self.timeout, self.ratio, self.windows = step_timeout_s, straggler_ratio, straggler_windows
        self.current, self.since, self.step = "startup", time.monotonic(), 0
        self.last_progress = self.since
        self.step_times: deque[float] = deque(maxlen=50)
        self.totals = {p: 0.0 for p in PHASES}
        self.window_steps = 0
        self.suspect: tuple[int | None, int] = (None, 0)  # (rank, consecutive windows)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.ranges, self._range = False, None  # phases as profiler ranges (pretrain.profiling turns them on)
        _active = self

    # --- phases ------------------------------------------------------------------------------------------
    def enter(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self.current in self.totals:
                self.totals[self.current] += now - self.since
            if name in LONG_PHASES or self.current in LONG_PHASES:
                self.last_progress = now  # a long phase starts or ends: its own limit applies from here
            self.current, self.since = name, now
        if self.ranges:  # a profiler records: the phase is a named range of the trace
            if self._range is not None:
                self._range.__exit__(None, None, None)
            self._range = torch.profiler.record_function(f"phase/{name}")
            self._range.__enter__()

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self.step:  # the first step compiles: not a typical step
                self.step_times.append(now - self.last_progress)
            self.step, self.last_progress = step, now
            self.window_steps += 1

    def limit(self) -> float:
        """Seconds without progress after which the watchdog fires, for the current phase."""
        if self.current in LONG_PHASES or len(self.step_times) < 3:
            return max(LONG_LIMIT_S, self.timeout)
        if self.timeout > 0:
            return self.timeout
        return max(10 * statistics.median(self.step_times), 600.0)

    # --- the watchdog ------------------------------------------------------------------------------------
    def start(self) -> "Monitor":
        """Start the watchdog thread (heartbeats every `beat` seconds)."""
        (self.dir / "heartbeats").mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def beat_s(self) -> float:
        return max(0.5, min(5.0, self.limit() / 8))

    def _heartbeat(self) -> None:
        rec = {"rank": self.rank, "host": self.host, "node": self.node, "pid": os.getpid(), "step": self.step,
               "phase": self.current, "time": time.time(), "stalled_s": round(time.monotonic() - self.last_progress, 1)}
        try:
            write_atomic(self.dir / "heartbeats" / f"rank{self.rank}.json", json.dumps(rec), durable=False)
        except OSError:
            pass  # a full disk stops the run through the loop's write guard, not here

    def _watch(self) -> None:
        while not self._stop.wait(self.beat_s()):
            self._heartbeat()
            stalled = time.monotonic() - self.last_progress
            if stalled > self.limit():
                self.fire(stalled)

    def peers(self) -> list[dict]:
        """Every other rank's last heartbeat, with `silent_s`: seconds since it was written."""
        out = []
        for f in sorted((self.dir / "heartbeats").glob("rank*.json")):
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if rec.get("rank") != self.rank:
                out.append({**rec, "silent_s": round(time.time() - rec.get("time", 0), 1)})
        return out

    def fire(self, stalled: float) -> None:
        """Dump this rank's stacks and state to RUN_DIR/hang/, say which ranks stopped reporting, exit 4."""
        silent_after = 3 * self.beat_s()
        peers = self.peers()
        stopped = [p for p in peers if p["silent_s"] > silent_after]
        rec = {"rank": self.rank, "host": self.host, "node": self.node, "pid": os.getpid(), "step": self.step,
               "phase": self.current, "stalled_s": round(stalled, 1), "limit_s": round(self.limit(), 1),
               "time": time.time(),
               "stopped_reporting": [{k: p.get(k) for k in ("rank", "host", "node", "step", "phase", "silent_s")}
                                     for p in stopped],
               "others": [{k: p.get(k) for k in ("rank", "host", "step", "phase")} for p in peers if p not in stopped]}
        stacks = self.dir / f"rank{self.rank}.stacks.txt"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(stacks, "w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
            write_atomic(self.dir / f"rank{self.rank}.json", json.dumps(rec, indent=1))
            where = f"stacks in {stacks}"
        except OSError as e:
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
            where = f"stacks on stderr ({self.dir} not writable: {e})"
        named = ", ".join(f"rank {p['rank']} on {p.get('node') or p.get('host')} (phase {p.get('phase')} after step "
                          f"{p.get('step')}, silent {p['silent_s']:.0f} s)" for p in stopped) or "none"
        try:
            print(f"[watchdog] rank {self.rank} on {self.host}: no progress for {stalled:.0f} s (limit "
                  f"{self.limit():.0f} s) in phase {self.current} after step {self.step}; ranks that stopped "
                  f"reporting: {named}; {where}; exiting {HANG_EXIT}", file=sys.__stderr__, flush=True)
        except OSError:
            pass
        os._exit(HANG_EXIT)

    def close(self) -> None:
        global _active
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if _active is self:
            _active = None

    # --- stragglers --------------------------------------------------------------------------------------
    def window(self) -> dict:
        """Collective (every `log_every` steps): per-rank mean seconds per phase of the steps since the last window,
        all-gathered; -> the metrics of the window (rank 0's are the ones written)."""
        with self._lock:
            n = max(1, self.window_steps)
            mine = {"rank": self.rank, "host": self.host, **{p: self.totals[p] / n for p in PHASES}}
            self.totals = {p: 0.0 for p in PHASES}
            self.window_steps = 0
        ranks = D.all_gather_object(mine)
        return self.judge(ranks)

    def judge(self, ranks: list[dict]) -> dict:
        """The slow rank of a window from every rank's mean phase times (module docstring), and the warning state."""
        steps = [sum(r[p] for p in STEP_PHASES) for r in ranks]
        med_step = statistics.median(steps)
        out = {"step_s_max": max(steps), "step_s_min": min(steps), "slow_rank": None}
        for p in STEP_PHASES:
            times = [r[p] for r in ranks]
            med = statistics.median(times)
            worst = max(range(len(ranks)), key=lambda i: times[i])
            if times[worst] - med < 0.05 * med_step or times[worst] < self.ratio * max(med, 1e-9):
                continue
            best = min(range(len(ranks)), key=lambda i: times[i])
            out.update(slow_rank=ranks[worst]["rank"], slow_host=ranks[worst]["host"], slow_phase=p,
                       slow_ratio=times[worst] / max(med, 1e-9), fast_rank=ranks[best]["rank"],
                       fast_host=ranks[best]["host"])
            break
        rank, n = self.suspect
        self.suspect = (out["slow_rank"], n + 1 if out["slow_rank"] is not None and out["slow_rank"] == rank else
                        int(out["slow_rank"] is not None))
        out["slow_windows"] = self.suspect[1]
        return out

    def straggler_warning(self, rec: dict) -> str | None:
        """The warning for a rank that has been the slow one for `straggler_windows` windows in a row (once per
        multiple of it)."""
        n = rec.get("slow_windows", 0)
        if rec.get("slow_rank") is None or n < self.windows or n % self.windows:
            return None
        return (f"[monitor] warning: rank {rec['slow_rank']} on {rec['slow_host']} has been the slow rank for {n} "
                f"windows: its {rec['slow_phase']} phase takes {rec['slow_ratio']:.2f}x the median of the ranks "
                f"(fastest: rank {rec['fast_rank']} on {rec['fast_host']}); check that node")
