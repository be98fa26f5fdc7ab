"""The training loop: data -> micro steps -> optimizer step -> log / evaluate -> checkpoint, until `steps`.

The pieces it drives live beside it: the engine (`pretrain.engine`), the checkpoints and run folder
(`pretrain.checkpoint`: `CheckpointManager.load()` at the start, `save()` after every step), the data
(`pretrain.data.TrainBatches`: a deterministic, resumable sample order), metrics and wandb (`pretrain.metrics`),
stop signals (`pretrain.signals`).

- A non-finite loss on any rank skips that micro batch on all ranks (no backward, no optimizer step) and the
  next batch takes its place. The run stops (`NanStormError`, exit status 3, RUN_DIR/nan_storm.json) after
  `nan_max_consecutive` skips in a row, or when its skips exceed `nan_budget` (nan_max_fraction of its micro
  batches): a storm with gaps stops too.
- The training split holds the samples the run needs (`train_samples`): what the checkpoint consumed, the
  remaining steps at this run's global batch, and the skip budget left; so the order never wraps to its start.
  Each checkpoint records a digest of the samples it consumed (`pretrain.data.stream_digest`); a resume whose
  data stream differs says so.
- After each step the ranks agree, in one all-reduce, on a stop signal and on a failed write of the run's files
  (`pretrain.run_files.WriteGuard`: metrics, logs, wandb). A signal saves and returns; a failed write stops every
  rank with `RunWriteError` naming the file (exit status 2), the last checkpoint intact.
- `eval_tasks` run on rank 0 when a checkpoint holding the model folder completes (`eval_tasks_due`), the other
  ranks waiting at a barrier; the seconds it adds are in the record (`eval_tasks/seconds`). A failed evaluation is a
  warning and an `eval_tasks/error` record, never the end of the run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from pretrain import distributed as D
from pretrain.config import ConfigError, RunConfig
from pretrain.distributed import all_mean, any_rank
from pretrain.monitor import Monitor, phase
from pretrain.profiling import Profiler
from pretrain.run_files import RunWriteError, WriteGuard, guard_std_streams


class NanStormError(RuntimeError):
    """Too many micro batches skipped for a non-finite loss (raised on every rank alike)."""


def nan_budget(run: RunConfig) -> int:
    """Micro batches a run may skip as non-finite in all: nan_max_fraction of its micro batches (steps x
    grad_accum), at least nan_max_consecutive."""
    return max(run.nan_max_consecutive, math.ceil(run.nan_max_fraction * run.steps * run.grad_accum))


class NanGuard:
    """Counts skipped non-finite micro batches (`skipped` in all, `in_a_row` since the last good one); `micro_step`
    stops the run when `in_a_row` reaches `max_consecutive` or `skipped` exceeds `max_skipped`."""

    def __init__(self, max_consecutive: int, skipped: int = 0, max_skipped: int | None = None,
                 budget_note: str = "") -> None:
        self.max_consecutive, self.skipped, self.in_a_row = max_consecutive, skipped, 0
        self.max_skipped, self.budget_note = max_skipped, budget_note

    def check(self) -> None:
        fix = "lower lr, raise warmup_steps or resume from an earlier checkpoint"
        if self.in_a_row >= self.max_consecutive:
            raise NanStormError(f"non-finite loss in {self.in_a_row} consecutive micro batches "
                                f"(nan_max_consecutive={self.max_consecutive}, {self.skipped} skipped in all): {fix}")
        if self.max_skipped is not None and self.skipped > self.max_skipped:
            raise NanStormError(f"{self.skipped} micro batches skipped for a non-finite loss, more than this run's "
                                f"budget of {self.max_skipped} ({self.budget_note}): {fix}")


def model_inputs(engine, batch: dict) -> dict:
    """The model's input_ids, labels (and `documents`, for a batch that carries them: data.document_mask) on the
    engine's device. A sequence-parallel model (`sequence_parallel_size`) takes its rank's shard of each sequence,
    the labels shifted before they are cut (ressformer.sequence_parallel)."""
    ids, labels = batch["input_ids"], batch["labels"]
    sp = getattr(getattr(engine, "module", None), "sp", None)  # (a DeepSpeed engine holds the model as .module)
    if sp is not None:
        from ressformer.sequence_parallel import shard, shift_labels

        ids, labels = shard(ids, sp.size, sp.rank), shard(shift_labels(labels), sp.size, sp.rank)
    dev = engine.device
    out = {"input_ids": ids.to(dev), "labels": labels.to(dev)}
    if "documents" in batch:
        out["documents"] = batch["documents"].to(dev)
    return out


def data_rank(run: RunConfig) -> tuple[int, int]:
    """(this rank's data-parallel index, the data-parallel size): the ranks of one sequence-parallel group read the
    same samples."""
    return D.rank() // run.sequence_parallel_size, run.data_parallel_size(D.world_size())


def micro_step(engine, batch: dict, num_steps: int, guard: NanGuard):
    """Forward, then backward + engine.step unless any rank's loss is non-finite (-> None, counted).

    The finite check is the loop's one read of the device per micro batch (one scalar, between forward and
    backward): skipping a bad micro batch needs the decision before its backward, on every rank alike. The model's
    forward and backward themselves read nothing on the host."""
    phase("forward")
    inputs = model_inputs(engine, batch)
    out = engine(inputs.pop("input_ids"), **inputs, num_steps=num_steps)
    if any_rank(not bool(torch.isfinite(out.loss).item())):  # every rank takes the same branch
        guard.skipped += 1
        guard.in_a_row += 1
        guard.check()
        return None
    guard.in_a_row = 0
    phase("backward")
    engine.backward(out.loss)
    phase("optimizer")
    engine.step()
    return out


def optimizer_step(engine, batches, num_steps: int, grad_accum: int, guard: NanGuard, sums: dict) -> None:
    """`grad_accum` micro batches (a skipped one is replaced by the next) = one optimizer step; the losses and
    scalar diagnostics of each are added to `sums` (name -> [sum, count]) on the device: they are read on the host
    once per log interval (`MetricsLog.training`), not per micro batch."""
    done = 0
    while done < grad_accum:
        phase("data")
        out = micro_step(engine, next(batches), num_steps, guard)
        if out is None:
            continue
        done += 1
        for name, v in [("loss", out.loss), ("lm_loss", out.lm_loss), *out.aux_losses.items(),
                        *[(f"diag/{n}", d) for n, d in out.diagnostics.items() if d.numel() == 1]]:
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] = acc[0] + v.detach().double()
            acc[1] += 1


def evaluate(engine, valid, run: RunConfig) -> float:
    """Collective: the mean validation LM loss over the first `eval_iters` micro batches of every rank."""
    from pretrain.data import eval_batches

    engine.eval()
    tot = 0.0
    with torch.no_grad():
        for b in eval_batches(valid, run.micro_batch, *data_rank(run), run.eval_iters):
            inputs = model_inputs(engine, b)
            tot = tot + engine(inputs.pop("input_ids"), **inputs).lm_loss.float()
    engine.train()
    return all_mean(float(tot) / run.eval_iters)  # read once


def train_samples(run: RunConfig, world: int, state: dict) -> int:
    """Training samples the split must hold for this run on `world` ranks, continuing `state` (a checkpoint's
    run_state; {} for a fresh run): the samples it consumed, the remaining steps at this run's global batch, and the
    skip budget left (a skipped micro step consumes micro_batch x data-parallel size samples). Never fewer than the
    run's earlier launches built (`train_samples` of the state): the same size keeps megatron's sample order."""
    consumed = int(state.get("consumed_samples", 0))
    steps_left = max(0, run.steps - int(state.get("step", 0)))
    skips_left = max(0, nan_budget(run) - int(state.get("skipped_micro_batches", 0)))
    skip = run.micro_batch * run.data_parallel_size(world)  # samples a skipped micro step consumes
    need = consumed + steps_left * run.global_batch(world) + skips_left * skip
    return max(need, int(state.get("train_samples", 0)))


def train(run: RunConfig, ds_json: dict, resume: str = "none", overwrite: bool = False) -> dict:
    """Train per `run`; returns {"step", "finished", "interrupted"}. torch.distributed must be initialised.

    `resume`: none (a fresh run; a folder holding checkpoints is refused unless `overwrite`), auto (the newest
    usable checkpoint, else fresh), or a tag name / tag folder."""
    from pretrain.checkpoint.manager import CheckpointManager
    from pretrain.signals import Interrupted, StopSignals

    signals = StopSignals()
    guard = WriteGuard()
    guard_std_streams(guard)
    ckpt = CheckpointManager(run, ds_json, resume=resume, overwrite=overwrite, should_stop=lambda: signals.stop)
    monitor = Monitor(run.run_dir, step_timeout_s=run.faults.step_timeout_s, straggler_ratio=run.faults.straggler_ratio,
                      straggler_windows=run.faults.straggler_windows).start()
    try:
        return _train(run, ds_json, ckpt, signals, guard, monitor)
    except Interrupted as e:
        if D.rank() == 0:
            print(f"[pretrain] {signals.received or 'a signal on another rank'} while {e}: nothing new to save; "
                  f"--resume auto starts there again", flush=True)
        return {"step": None, "finished": False, "interrupted": True}
    finally:
        monitor.close()
        ckpt.close()


def _train(run: RunConfig, ds_json: dict, ckpt, signals, guard: WriteGuard, monitor: Monitor) -> dict:
    from pretrain.data import TrainBatches, build_datasets, stream_digest
    from pretrain.metrics import MetricsLog, announce, run_info
    from ressformer.recurrence import sample_num_steps

    rank, world = D.rank(), D.world_size()
    try:
        run.data.check_files()  # fail on a missing data prefix / tokenizer before building anything
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_eval_tasks(run)
    from pretrain.ds_config import build_ds_config
    from pretrain.engine import check_sequence_parallel

    ds = build_ds_config(ds_json, run, world)
    try:
        check_sequence_parallel(run, ds, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    checked = None
    if run.preflight.enabled:  # before the engine: free memory is measured before it is taken
        from pretrain.preflight import preflight

        checked = preflight(run, ds, min_fraction=run.preflight.min_fraction)
    restored = ckpt.load()
    engine, sched, state = restored.engine, restored.scheduler, restored.state
    mcfg = run.model_config()
    info = run_info(run, restored.ds)
    info["preflight"] = checked
    step, tokens = restored.step, int(state.get("tokens_seen", 0))
    gb = run.global_batch(world)
    D.on_rank0(announce, run, Path(run.run_dir), info, restored.ds, errors=(RunWriteError,))

    n_train = train_samples(run, world, state)
    dp_rank, dp = data_rank(run)
    train_ds, valid_ds, _ = build_datasets(run.data, seq_len=run.seq_len, seed=run.seed,
                                           num_samples=(n_train, max(1, run.eval_iters) * run.micro_batch * dp, 0))
    consumed = int(state.get("consumed_samples", 0))
    if rank == 0 and state.get("data_digest") and stream_digest(train_ds, consumed) != state["data_digest"]:
        print(f"[pretrain] warning: the first {consumed} samples of this run's training stream are not the ones "
              f"{restored.point.tag.name} trained on: the data (blend, prefix contents, split, seed, seq_len) or the "
              f"sample budget ({n_train} samples now, {state.get('train_samples')} then) changed; samples may repeat "
              f"or be skipped from here on", file=sys.stderr, flush=True)
    batches = TrainBatches(train_ds, micro_batch=run.micro_batch, dp_rank=dp_rank, dp_size=dp,
                           consumed_samples=consumed, num_workers=run.data.num_workers)
    budget = nan_budget(run)
    nan = NanGuard(run.nan_max_consecutive, skipped=int(state.get("skipped_micro_batches", 0)), max_skipped=budget,
                   budget_note=f"nan_max_fraction={run.nan_max_fraction} of {run.steps * run.grad_accum} micro "
                               f"batches, at least nan_max_consecutive={run.nan_max_consecutive}")
    log = MetricsLog(run, Path(run.run_dir), info, signals, step, tokens, guard)
    if checked is not None:
        log.write(preflight_record(step, checked))
    evaluating = bool(run.eval_iters and valid_ds is not None)

    if evaluating and step == 0:
        phase("eval")
        log.validation(0, evaluate(engine, valid_ds, run))
    prof = Profiler(run.profile, run.run_dir, start_step=step)
    monitor.ranges = prof.on
    sums: dict[str, list] = {}
    interrupted, wrapped_warned = False, False
    try:
        while step < run.steps:
            k = sample_num_steps(mcfg, step, run.seed)
            try:
                optimizer_step(engine, batches, k, run.grad_accum, nan, sums)
            except torch.cuda.OutOfMemoryError:
                prof.out_of_memory()
                raise
            step += 1
            prof.step()
            monitor.step_done(step)
            tokens += gb * run.seq_len
            phase("log")
            log.advance()
            if batches.epochs_completed and not wrapped_warned and rank == 0:
                wrapped_warned = True
                print(f"[pretrain] warning: the training split's {len(train_ds)} samples are used up at step {step} "
                      f"({batches.consumed_samples} consumed, {nan.skipped} micro batches skipped): the data "
                      f"continues from its start", file=sys.stderr, flush=True)
            if step % run.log_every == 0 or step == run.steps:
                ranks = monitor.window()
                log.training(step, sums, engine=engine, sched=sched, num_steps=k, tokens=tokens, skipped=nan.skipped,
                             extra={f"ranks/{n}": v for n, v in ranks.items()})
                sums = {}
                warning = monitor.straggler_warning(ranks)
                if warning and rank == 0:
                    print(warning, file=sys.stderr, flush=True)
            if evaluating and (step % run.eval_every == 0 or step == run.steps):
                phase("eval")
                log.validation(step, evaluate(engine, valid_ds, run))
            stop, failed, writing = D.any_ranks(signals.stop, guard.error is not None, ckpt.busy())
            if failed:  # the run's files cannot be written: stop every rank now, the last checkpoint stays
                _raise_write_error(guard)
            saved = None if writing else ckpt.settle()  # a tag written in the background completes once no rank writes
            if ckpt.due(step, stop):
                phase("save")
            saved = ckpt.save(step, {"tokens_seen": tokens, "skipped_micro_batches": nan.skipped,
                                     "train_samples": n_train, "data_digest": stream_digest(
                                         train_ds, batches.consumed_samples) if rank == 0 else None,
                                     **batches.state_dict()}, final=stop) or saved
            if saved:
                log.write(saved)
                if not stop and eval_tasks_due(run, saved["step"]):
                    run_eval_tasks(run, saved["step"], log)
            if stop and step < run.steps:
                interrupted = True
                if rank == 0:
                    print(f"[pretrain] {signals.received or 'signal on another rank'}: saved step {step}, exiting "
                          f"(no FINISHED marker; --resume auto continues)", flush=True)
                break
    except NanStormError as e:
        ckpt.record_nan_storm(step, str(e))
        raise
    finally:
        prof.close()
        monitor.ranges = False
    finished = step >= run.steps
    saved = ckpt.settle()
    if saved:
        log.write(saved)
    log.close()
    if rank == 0 and run.plot:
        _plot(Path(run.run_dir), guard)
    if D.any_rank(guard.error is not None):
        _raise_write_error(guard)
    if finished:
        ckpt.finish(step)
    D.barrier()
    return {"step": step, "finished": finished, "interrupted": interrupted}


def check_eval_tasks(run: RunConfig) -> None:
    """Collective: a ConfigError on every rank when `eval_tasks` names a task that does not exist (checked on rank 0:
    indexing lm-eval's registry takes seconds) or the run has no tokenizer for them."""
    if not run.eval_tasks:
        return
    err = None
    if not run.data.tokenizer:
        err = "eval_tasks need the run's tokenizer in its checkpoints: set data.tokenizer"
    elif D.rank() == 0:
        from pretrain.eval_tasks import check_tasks

        try:
            check_tasks(run.eval_tasks)
        except ValueError as e:
            err = str(e)
    err = next((e for e in D.all_gather_object(err) if e), None)
    if err:
        raise ConfigError(f"run config eval_tasks={run.eval_tasks}: {err}")


def eval_tasks_due(run: RunConfig, step: int) -> bool:
    """Whether the checkpoint of `step` gets `eval_tasks`: the run's last step, or every eval_tasks_every-th
    checkpoint that holds the model folder (every save_every x save_model_every steps)."""
    if not run.eval_tasks:
        return False
    if step >= run.steps:
        return True
    period = run.save_every * run.save_model_every * run.eval_tasks_every
    return period > 0 and step % period == 0


def run_eval_tasks(run: RunConfig, step: int, log) -> None:
    """Collective: rank 0 runs `eval_tasks` on the complete checkpoint of `step` (its model folder) and writes the
    results to metrics.jsonl and wandb while the other ranks wait at a barrier. A failure is a warning and an
    `eval_tasks/error` record: evaluation never stops training."""
    from pretrain.checkpoint.tags import tag_name

    phase("eval")
    if D.rank() == 0:
        from pretrain.eval_tasks import evaluate_tasks

        tag = Path(run.run_dir) / tag_name(step)
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        try:
            with D.solo():  # code written for every rank must not wait here for the ranks at the barrier
                rec = evaluate_tasks(tag, run.eval_tasks, run.eval_tasks_limit, device=device, trusted=True)
            print(f"[pretrain] eval_tasks at step {step} ({rec['eval_tasks/seconds']:.1f} s): " + ", ".join(
                f"{k.split('/', 1)[1]} {v:.4g}" for k, v in rec.items()
                if k.startswith("eval_tasks/") and k.endswith(("/acc", "/word_perplexity")) and v is not None),
                flush=True)
        except Exception as e:  # noqa: BLE001 - a failed evaluation is reported, training goes on
            rec = {"step": step, "eval_tasks/error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[pretrain] warning: eval_tasks at step {step} failed ({rec['eval_tasks/error']}); training goes "
                  f"on (python -m pretrain.eval_tasks --model {tag} --tasks ... reproduces it)", file=sys.stderr,
                  flush=True)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        log.write(rec)
    D.barrier()


def _plot(run_dir: Path, guard: WriteGuard) -> None:
    """Rank 0: RUN_DIR/metrics.png (pretrain.plot), when matplotlib is installed; a failed write goes to `guard`."""
    try:
        from pretrain.plot import plot
    except ImportError:
        return
    out = run_dir / "metrics.png"
    try:
        plot([run_dir], out)
    except ImportError:
        print("[pretrain] no plot: matplotlib is not installed (pip install matplotlib; python -m pretrain.plot "
              f"{run_dir})", flush=True)
        return
    except OSError as e:
        guard.record(e, out)
        return
    print(f"[pretrain] plot of the run: {out} (python -m pretrain.plot RUN_DIR ... overlays runs)", flush=True)


def _raise_write_error(guard: WriteGuard) -> None:
    """Collective: raise on every rank the failed write some rank recorded."""
    raise RunWriteError(next(e for e in D.all_gather_object(guard.error) if e))


def preflight_record(step: int, checked: dict) -> dict:
    """The preflight's result as one metrics.jsonl record (the kernels switched off, the slowest rank's figures)."""
    ranks = checked["ranks"]

    def low(key):
        vals = [r[key] for r in ranks if r.get(key) is not None]
        return min(vals) if vals else None

    return {"step": step, "preflight/kernels_off": checked["kernels_off"],
            "preflight/matmul_tflops_min": low("matmul_tflops"), "preflight/allreduce_gbps_min": low("allreduce_gbps")}
