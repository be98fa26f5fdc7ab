"""torch.profiler for a window of training steps, per rank, from the run config's `profile:` section.

    profile: {enabled: true, wait: 5, warmup: 2, active: 3, repeat: 1, ranks: [0], memory: false}

- Traces go to RUN_DIR/profile/ (one Chrome / Perfetto trace per rank and window, `rank<R>_step<S>.pt.trace.json`:
  open it in https://ui.perfetto.dev or TensorBoard's profiler plugin).
- The loop's phases (`pretrain.monitor.phase`: data, forward, backward, optimizer, log, save, eval) appear as
  ranges, and the model's own (`ressformer` marks each recurrent step, ASAM selection and attention, SOES, the
  router, the experts and the loss with torch.profiler.record_function); ranges cost nothing outside a window.
- At the end of each window the rank prints its top operators by self time (CPU, and CUDA on a GPU).
- `memory: true` on CUDA: torch.cuda.memory's allocation history is recorded over the window and dumped to
  RUN_DIR/profile/rank<R>_step<S>.memory.pickle (https://pytorch.org/memory_viz), and again when a step runs out of
  memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain import distributed as D


class Profiler:
    """The profiler of one rank (a no-op on ranks and runs it does not cover): call `step()` after every optimizer
    step and `close()` at the end."""

    def __init__(self, cfg, run_dir: str | Path, start_step: int = 0) -> None:
        self.cfg, self.dir = cfg, Path(run_dir) / "profile"
        self.rank = D.rank()
        self.on = bool(cfg.enabled) and (not cfg.ranks or self.rank in cfg.ranks)
        self.start = self.step_no = start_step
        self.prof, self.memory = None, False
        if not self.on:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.dir.mkdir(parents=True, exist_ok=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.memory = bool(cfg.memory) and torch.cuda.is_available()
        self.prof = profile(activities=acts, schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active,
                                                               repeat=cfg.repeat),
                            on_trace_ready=self._ready, record_shapes=True, with_stack=False)
        self.prof.__enter__()
        self._maybe_record_memory()

    def _window(self) -> bool:
        """Whether the step about to run is in an active window (for the memory history)."""
        c = self.cfg
        cycle = c.wait + c.warmup + c.active
        k = self.step_no - self.start
        return (c.repeat == 0 or k < c.repeat * cycle) and (k % cycle) >= c.wait + c.warmup

    def _maybe_record_memory(self) -> None:
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000 if self._window() else 0)

    def _ready(self, prof) -> None:
        name = f"rank{self.rank}_step{self.step_no}"
        prof.export_chrome_trace(str(self.dir / f"{name}.pt.trace.json"))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(f"[profile] rank {self.rank}, window ending at step {self.step_no}: {self.dir / name}.pt.trace.json\n"
              + prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)
        if self.memory:
            self.dump_memory(name)

    def dump_memory(self, name: str) -> Path | None:
        """CUDA only: the allocation history so far as a pickle for pytorch.org/memory_viz."""
        if not torch.cuda.is_available():
            return None
        path = self.dir / f"{name}.memory.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def step(self) -> None:
        if self.prof is not None:
            self.step_no += 1
            self.prof.step()
            self._maybe_record_memory()

    def out_of_memory(self) -> None:
        """A step ran out of memory: keep the allocation history that led there (CUDA, `memory: true`)."""
        if self.on and self.memory:
            path = self.dump_memory(f"rank{self.rank}_step{self.step_no}_oom")
            print(f"[profile] out of memory at step {self.step_no}: allocation history in {path}", flush=True)

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
        if self.memory:
            torch.cuda.memory._record_memory_history(enabled=None)
