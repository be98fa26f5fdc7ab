"""The run's checkpoints behind two calls: `load()` once at the start, `save(step, ...)` after every step.

    ckpt = CheckpointManager(run, ds_json, resume="auto", overwrite=False)   # takes the run folder's lock
    restored = ckpt.load()            # the engine: fresh (seed or init_from), resumed, or resharded
    ...
    ckpt.save(step, train_state, final=stopping)   # writes when the policy says so
    ckpt.settle()                                  # when no rank still writes: the tag in flight completes
    ckpt.close()

The manager owns the policy: `save_every`, `save_model_every` (which tags also hold the consolidated model),
`async_save` (the model folder and the manifest's hashes written while training goes on; COMPLETE only once all is on
disk), `keep_last` (a tag a reader holds stays until a later save, or the end of the run, which waits a while for
the reader), the FINISHED marker, the NaN-storm note (RUN_DIR/nan_storm.json: the next --resume auto warns when it
picks the checkpoint the storm started from), and what a resume does to the folder (newer tags set aside,
interrupted saves removed, metrics.jsonl trimmed to the resumed step). What a tag holds and how it is written,
verified, chosen and resharded live in the modules beside this one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain import distributed as D
from pretrain.checkpoint import run_folder as folder
from pretrain.checkpoint.reshard import reshard
from pretrain.checkpoint.resume import ResumePoint, find_resume, load_same_layout
from pretrain.checkpoint.tags import RunFolderError, all_tags, complete_tags, reading, remove_tag, tag_step
from pretrain.checkpoint.writer import PendingTag, begin_tag, finish_tag
from pretrain.config import RunConfig
from pretrain.run_files import RunWriteError


@dataclass
class Restored:
    """What `CheckpointManager.load` built: the engine and the state to continue from."""

    engine: object
    scheduler: object
    ds: dict  # the DeepSpeed config the engine runs with
    state: dict  # run_state.json of the resumed tag ({} for a fresh run)
    layout: dict  # this run's world size, ZeRO stage, expert-parallel backend and size
    point: ResumePoint | None  # the tag resumed from (None: a fresh run)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


class CheckpointManager:
    """Collective: every rank constructs it and calls load / save / close alike."""

    def __init__(self, run: RunConfig, ds_json: dict, *, resume: str = "none", overwrite: bool = False,
                 should_stop=lambda: False) -> None:
        self.run, self.ds_json, self.resume, self.overwrite = run, ds_json, resume, overwrite
        self.should_stop = should_stop  # a stop signal arrived: a long phase (resharding) is abandoned
        self.dir = Path(run.run_dir)
        self.restored: Restored | None = None
        self.storm: dict | None = None  # RUN_DIR/nan_storm.json of an earlier launch (rank 0)
        self.pending: PendingTag | None = None  # a tag whose background writes are not complete
        folder.make_run_dir(self.dir)
        self._lock = folder.acquire_run_folder(self.dir)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- start -----------------------------------------------------------------------------------------
    def load(self) -> Restored:
        """Build the engine and continue from the checkpoint `resume` names (none: a fresh run, refused in a folder
        that holds another run's checkpoints unless `overwrite`)."""
        from pretrain.ds_config import build_ds_config
        from pretrain.engine import build_engine, config_diff, layout, load_init_from

        run = self.run
        if self.resume == "none":
            D.on_rank0(folder.prepare_fresh, self.dir, self.overwrite, errors=(RunFolderError,))
        point = self._resume_point()
        world = D.world_size()
        lay = layout(run, build_ds_config(self.ds_json, run, world), world)
        if point is None:
            engine, _, sched, ds = build_engine(run, self.ds_json, init_state=load_init_from(run))
            state = {}
        else:
            diff = config_diff(_normalised(point.state.get("model_config")), run.model_config().to_dict())
            if diff:
                raise RunFolderError(f"{point.tag} was written for another model config: {diff} (checkpoint value, "
                                     f"this run's value). Resume with the checkpoint's model settings, or start a "
                                     f"new run from its weights with --set init_from={point.tag}")
            # a tag of another run folder (a cool-down branch) is read under its readers' lock, never changed
            foreign = point.tag.parent.resolve() != self.dir.resolve()
            with reading(point.tag) if foreign else contextlib.nullcontext():
                if (point.layout or lay) == lay:
                    engine, _, sched, ds = build_engine(run, self.ds_json)
                    load_same_layout(engine, point.tag)
                else:
                    engine, sched, ds = reshard(run, self.ds_json, point, self.dir, lay, self.should_stop)
            state = point.state
        self.restored = Restored(engine, sched, ds, state, lay, point)
        D.on_rank0(self._after_load, errors=(RunFolderError, RunWriteError))
        return self.restored

    def _resume_point(self) -> ResumePoint | None:
        """Collective: the checkpoint to continue from; rank 0 tidies the folder for it."""
        point = find_resume(self.dir, self.resume)
        if D.rank() == 0:
            for w in (point.skipped if point else []):
                print(f"[checkpoint] warning: {w}", file=sys.stderr, flush=True)
            self.storm = folder.read_nan_storm(self.dir)
            if self.storm and point is not None and point.tag.name == self.storm.get("last_checkpoint"):
                older = [t.name for t in complete_tags(self.dir) if tag_step(t) < tag_step(point.tag)]
                n = self.storm.get("storms", 1)
                print(f"[checkpoint] warning: resuming from {point.tag.name}, the checkpoint the last "
                      f"{'run' if n == 1 else f'{n} runs'} started from before stopping in a NaN storm after step "
                      f"{self.storm.get('step')} ({self.storm.get('message')}). The same data and settings may "
                      f"storm again: change lr / warmup_steps, or resume an older tag by name"
                      + (f" (--resume {older[-1]})" if older else "") + f"; {folder.NAN_STORM} records it",
                      file=sys.stderr, flush=True)
            if point is not None:
                for m in folder.set_aside_newer(self.dir, point.tag):
                    print(f"[checkpoint] {m}", flush=True)
            else:
                for t in all_tags(self.dir):  # only interrupted saves can be left here
                    remove_tag(t)
        D.barrier()
        return point

    def _after_load(self) -> None:
        """Rank 0: say what was resumed, drop metrics after the resumed step and a stale FINISHED."""
        r, run = self.restored, self.run
        gb = run.global_batch(D.world_size())
        if r.point is not None:
            print(f"[pretrain] resumed from {r.point.tag} (step {r.step}, {r.state.get('tokens_seen')} tokens, "
                  f"{r.state.get('consumed_samples')} samples)", flush=True)
            if r.state.get("global_batch", gb) != gb:
                print(f"[pretrain] warning: the checkpoint trained with global batch {r.state['global_batch']}, this "
                      f"run uses {gb} (micro_batch x grad_accum x world size): the data order continues by samples, "
                      f"the schedule by steps", file=sys.stderr, flush=True)
        folder.trim_metrics(self.dir / folder.METRICS, r.step)
        if folder.is_finished(self.dir) and r.step < run.steps:
            folder.clear_finished(self.dir)

    # --- in the loop -----------------------------------------------------------------------------------
    def due(self, step: int, final: bool = False) -> bool:
        """Whether `save(step, final=final)` writes a checkpoint."""
        return final or step % self.run.save_every == 0 or step >= self.run.steps

    def save(self, step: int, train_state: dict, *, final: bool = False) -> dict | None:
        """Collective. Begin tag `step` when it is due (every `save_every` steps, the last step, or `final`: the run
        stops after this step). With `async_save` the model folder and the hashes are written in the background
        and the tag completes at a later `settle` (at the latest before the next save and at the end); the last
        step's and a final save complete here. `train_state`: the loop's counters (tokens_seen,
        skipped_micro_batches, consumed_samples, ...). -> the save's timings when it completed here, else None."""
        if not self.due(step, final):
            return None
        run, r = self.run, self.restored
        done = self.settle()  # one tag in flight at a time
        every = run.save_model_every
        last = step >= run.steps
        world = D.world_size()
        state = {"run_config": run.to_dict(), "model_config": run.model_config().to_dict(), "step": step,
                 "optimizer_steps": int(r.engine.global_steps), "global_batch": run.global_batch(world),
                 "world_size": world, **train_state}
        self.pending = begin_tag(r.engine, run_dir=self.dir, step=step, state=state, layout=r.layout,
                                 model_cfg=run.model_config(), tokenizer_dir=run.data.tokenizer,
                                 write_model=last or (every > 0 and (step // run.save_every) % every == 0),
                                 background=run.async_save and not (final or last))
        if final or last or not run.async_save:
            return self.settle() or done
        return done

    def busy(self) -> bool:
        """Whether this rank still writes the tag in flight (agreed on across ranks before `settle`)."""
        return self.pending is not None and self.pending.busy()

    def settle(self) -> dict | None:
        """Collective. Complete the tag in flight (waiting for the background writes), keep the `keep_last` newest.
        -> its timings {"step", "save/blocked_s", "save/deepspeed_s", "save/gather_s", "save/background_s"}, or None
        when none was in flight."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        finish_tag(pending)
        run = self.run
        if D.rank() == 0:
            held = folder.prune(self.dir, run.keep_last)
            if held:
                print(f"[checkpoint] kept {', '.join(held)} beyond keep_last={run.keep_last}: a reader "
                      f"(pretrain.convert, pretrain.evaluate, an init_from) holds it; a later save removes it",
                      flush=True)
            if self.storm and pending.step > int(self.storm.get("step", 0)):  # past the storm: it is history
                folder.clear_nan_storm(self.dir)
                self.storm = None
        D.barrier()
        return {"step": pending.step, **{f"save/{k}": round(v, 3) for k, v in pending.timings.items()}}

    def record_nan_storm(self, step: int, message: str) -> None:
        """Collective: note the NaN storm this run stopped in (RUN_DIR/nan_storm.json) for the next resume."""
        def record():
            tags = complete_tags(self.dir)
            point = self.restored.point if self.restored else None
            folder.record_nan_storm(self.dir, {"step": step, "message": message,
                                               "last_checkpoint": tags[-1].name if tags else None,
                                               "resumed_from": point.tag.name if point else None})

        D.on_rank0(record, errors=(RunWriteError,))

    def finish(self, step: int, reader_wait_s: float = 60.0) -> None:
        """Collective: mark the run FINISHED (all `steps` done; a wrapper then stops requeueing). No later save will
        remove a tag a reader held at the last prune, so the tags beyond `keep_last` are removed here, waiting up to
        `reader_wait_s` for their readers to let go."""
        D.on_rank0(folder.mark_finished, self.dir, step, errors=(RunWriteError,))
        if D.rank() == 0:
            deadline = time.monotonic() + reader_wait_s
            while (held := folder.prune(self.dir, self.run.keep_last)) and time.monotonic() < deadline:
                time.sleep(0.5)
            if held:
                print(f"[checkpoint] {', '.join(held)} stay beyond keep_last={self.run.keep_last}: a reader still holds "
                      f"them after {reader_wait_s:.0f} s; remove them by hand once it is done", flush=True)
        D.barrier()


def _normalised(model_config: dict | None) -> dict:
    """A checkpoint's model-config dict as this version writes it (fields it leaves out dropped, defaults filled), so
    only real differences count; an unreadable one is compared as it is."""
    from ressformer.config import ModelConfig

    try:
        return ModelConfig.from_dict(model_config).to_dict()
    except (TypeError, ValueError):
        return model_config or {}
