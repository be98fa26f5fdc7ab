"""The training loop: data -> micro steps -> optimizer step -> log / evaluate -> checkpoint, until `steps`.

The pieces it drives live beside it: the engine (`pretrain.engine`), the checkpoints and run folder
(`pretrain.checkpoint`: `CheckpointManager.load()` at the start, `save()` after every step), the data
(`pretrain.data.TrainBatches`: a deterministic, resumable sample order), metrics and wandb (`pretrain.metrics`),
stop signals (`pretrain.signals`).

- A non-finite loss on any rank skips that micro batch on all ranks (no backward, no optimizer step) and the
  next batch takes its place; `nan_max_consecutive` skips in a row stop the run.
- Stops: SIGTERM / SIGUSR1 / SIGINT or the launcher's death set a flag; after the step every rank agrees, saves
  and returns.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from pretrain import distributed as D
from pretrain.config import RunConfig
from pretrain.distributed import all_mean, any_rank


class NanGuard:
    """Counts skipped non-finite micro batches (`skipped` in all, `in_a_row` since the last good one); `micro_step`
    stops the run when `in_a_row` reaches `max_consecutive`."""

    def __init__(self, max_consecutive: int, skipped: int = 0) -> None:
        self.max_consecutive, self.skipped, self.in_a_row = max_consecutive, skipped, 0


def micro_step(engine, batch: dict, num_steps: int, guard: NanGuard):
    """Forward, then backward + engine.step unless any rank's loss is non-finite (-> None, counted)."""
    out = engine(batch["input_ids"].to(engine.device), labels=batch["labels"].to(engine.device), num_steps=num_steps)
    if any_rank(not bool(torch.isfinite(out.loss).item())):  # every rank takes the same branch
        guard.skipped += 1
        guard.in_a_row += 1
        if guard.in_a_row >= guard.max_consecutive:
            raise RuntimeError(f"non-finite loss in {guard.in_a_row} consecutive micro batches "
                               f"(nan_max_consecutive={guard.max_consecutive}, {guard.skipped} skipped in all): "
                               f"lower lr, raise warmup_steps or resume from an earlier checkpoint")
        return None
    guard.in_a_row = 0
    engine.backward(out.loss)
    engine.step()
    return out


def optimizer_step(engine, batches, num_steps: int, grad_accum: int, guard: NanGuard, sums: dict) -> None:
    """`grad_accum` micro batches (a skipped one is replaced by the next) = one optimizer step; the losses and
    scalar diagnostics of each are added to `sums` (name -> [sum, count])."""
    done = 0
    while done < grad_accum:
        out = micro_step(engine, next(batches), num_steps, guard)
        if out is None:
            continue
        done += 1
        for name, v in [("loss", out.loss), ("lm_loss", out.lm_loss), *out.aux_losses.items(),
                        *[(f"diag/{n}", d) for n, d in out.diagnostics.items() if d.numel() == 1]]:
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] += float(v.detach().float())
            acc[1] += 1


def evaluate(engine, valid, run: RunConfig) -> float:
    """Collective: the mean validation LM loss over the first `eval_iters` micro batches of every rank."""
    from pretrain.data import eval_batches

    engine.eval()
    tot = 0.0
    with torch.no_grad():
        for b in eval_batches(valid, run.micro_batch, D.rank(), D.world_size(), run.eval_iters):
            tot += engine(b["input_ids"].to(engine.device), labels=b["labels"].to(engine.device)).lm_loss.item()
    engine.train()
    return all_mean(tot / run.eval_iters)


def spare_samples(run: RunConfig, global_batch: int) -> int:
    """Training samples beyond steps x global batch, for micro batches skipped as non-finite: 1 % of the run,
    at least one global batch (past them the data wraps to the start of the split)."""
    return global_batch * max(1, math.ceil(run.steps / 100))


def train(run: RunConfig, ds_json: dict, resume: str = "none", overwrite: bool = False) -> dict:
    """Train per `run`; returns {"step", "finished", "interrupted"}. torch.distributed must be initialised.

    `resume`: none (a fresh run; a folder holding checkpoints is refused unless `overwrite`), auto (the newest
    usable checkpoint, else fresh), or a tag name / tag folder."""
    from pretrain.checkpoint.manager import CheckpointManager
    from pretrain.signals import StopSignals

    signals = StopSignals()
    ckpt = CheckpointManager(run, ds_json, resume=resume, overwrite=overwrite)
    try:
        return _train(run, ckpt, signals)
    finally:
        ckpt.close()


def _train(run: RunConfig, ckpt, signals) -> dict:
    from pretrain.data import TrainBatches, build_datasets
    from pretrain.metrics import MetricsLog, announce, run_info
    from ressformer.recurrence import sample_num_steps

    rank, world = D.rank(), D.world_size()
    run.data.check_files()  # fail on a missing data prefix / tokenizer before building anything
    restored = ckpt.load()
    engine, sched, state = restored.engine, restored.scheduler, restored.state
    mcfg = run.model_config()
    info = run_info(run, restored.ds)
    step, tokens = restored.step, int(state.get("tokens_seen", 0))
    gb = run.global_batch(world)
    if rank == 0:
        announce(run, Path(run.run_dir), info, restored.ds)

    train_ds, valid_ds, _ = build_datasets(
        run.data, seq_len=run.seq_len, seed=run.seed,
        num_samples=(run.steps * gb + spare_samples(run, gb), max(1, run.eval_iters) * run.micro_batch * world, 0))
    batches = TrainBatches(train_ds, micro_batch=run.micro_batch, dp_rank=rank, dp_size=world,
                           consumed_samples=int(state.get("consumed_samples", 0)), num_workers=run.data.num_workers)
    guard = NanGuard(run.nan_max_consecutive, skipped=int(state.get("skipped_micro_batches", 0)))
    log = MetricsLog(run, Path(run.run_dir), info, signals, step, tokens)
    evaluating = bool(run.eval_iters and valid_ds is not None)

    if evaluating and step == 0:
        log.validation(0, evaluate(engine, valid_ds, run))
    sums: dict[str, list] = {}
    interrupted, wrapped_warned = False, False
    while step < run.steps:
        k = sample_num_steps(mcfg, step, run.seed)
        optimizer_step(engine, batches, k, run.grad_accum, guard, sums)
        step += 1
        tokens += gb * run.seq_len
        log.advance()
        if batches.epochs_completed and not wrapped_warned and rank == 0:
            wrapped_warned = True
            print("[pretrain] warning: skipped micro batches used up the spare training samples; the data "
                  "continues from the start of the training split", file=sys.stderr, flush=True)
        if step % run.log_every == 0 or step == run.steps:
            log.training(step, sums, engine=engine, sched=sched, num_steps=k, tokens=tokens, skipped=guard.skipped)
            sums = {}
        if evaluating and (step % run.eval_every == 0 or step == run.steps):
            log.validation(step, evaluate(engine, valid_ds, run))
        stop = any_rank(signals.stop)
        ckpt.save(step, {"tokens_seen": tokens, "skipped_micro_batches": guard.skipped, **batches.state_dict()},
                  final=stop)
        if stop and step < run.steps:
            interrupted = True
            if rank == 0:
                print(f"[pretrain] {signals.received or 'signal on another rank'}: saved step {step}, exiting (no "
                      f"FINISHED marker; --resume auto continues)", flush=True)
            break
    finished = step >= run.steps
    log.close()
    if finished:
        ckpt.finish(step)
    D.barrier()
    return {"step": step, "finished": finished, "interrupted": interrupted}
