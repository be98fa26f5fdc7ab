"""`pretrain/main.py` with one fault injected, for the run-folder fault tests. FAULT (environment):

    nan:N:R            on rank R, the loss of this process's N-th micro batch (1-based) is NaN
    nanpattern:B:G:R   on rank R, B micro batches with a NaN loss, then G good ones, repeating (a storm with gaps)
    enospc:S:R         on rank R, every torch.save into tag step S fails with ENOSPC (a full disk)
    enospc_metrics:S:R on rank R, every write to metrics.jsonl from step S on fails with ENOSPC
    record:DIR:-       every rank appends, per micro batch, {"rank", "position", "ids"} of each sample it trained on
                       (position = index in the global sample order) to DIR/rank{R}.jsonl
    slow:SECONDS:R     on rank R, every micro batch's data takes SECONDS longer (a slow node's data loading)
    crash:STEP:R       on rank R, the process dies (exit 1) at the start of optimizer step STEP, once per run folder
"""

import errno
import json
import os
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pretrain import main as entry, trainer  # noqa: E402

kind, *args = os.environ["FAULT"].split(":")
fault_rank = args[-1]
rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
mine = fault_rank == "-" or rank == int(fault_rank)


def poison_calls(is_bad) -> None:
    """trainer.micro_step with a NaN loss on the calls for which is_bad(call number, 1-based) holds."""
    original, calls = trainer.micro_step, [0]

    def micro_step(engine, batch, num_steps, guard):
        calls[0] += 1
        if not is_bad(calls[0]):
            return original(engine, batch, num_steps, guard)

        def poison(module, inputs, out):
            out.loss = out.loss * float("nan")

        hook = engine.module.register_forward_hook(poison)
        try:
            return original(engine, batch, num_steps, guard)
        finally:
            hook.remove()

    trainer.micro_step = micro_step


if kind == "nan" and mine:
    poison_calls(lambda n: n == int(args[0]))
elif kind == "nanpattern" and mine:
    bad, good = int(args[0]), int(args[1])
    poison_calls(lambda n: (n - 1) % (bad + good) < bad)
elif kind == "enospc" and mine:
    real_save, tag = torch.save, f"step_{int(args[0]):08d}"

    def save(obj, f, *a, **k):
        if tag in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    torch.save = save
elif kind == "enospc_metrics" and mine:
    from pretrain import metrics

    real_append, first = metrics.MetricsLog._append, int(args[0])

    def append(self, rec):
        if rec.get("step", 0) >= first:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_append(self, rec)

    metrics.MetricsLog._append = append
elif kind == "record":
    from pretrain import data

    out = Path(args[0]) / f"rank{rank}.jsonl"
    real_next = data.TrainBatches.__next__

    def next_(self):
        first = self.consumed_samples + self.dp_rank * self.micro_batch
        batch = real_next(self)
        with open(out, "a") as f:
            for j, row in enumerate(batch["input_ids"]):
                f.write(json.dumps({"rank": rank, "position": first + j,
                                    "ids": zlib.crc32(row.numpy().tobytes())}) + "\n")
        return batch

    data.TrainBatches.__next__ = next_
elif kind == "slow" and mine:
    import time

    from pretrain import data

    real_next, delay = data.TrainBatches.__next__, float(args[0])

    def slow_next(self):
        time.sleep(delay)
        return real_next(self)

    data.TrainBatches.__next__ = slow_next
elif kind == "crash" and mine:
    real_step, at, calls = trainer.optimizer_step, int(args[0]), [0]

    def optimizer_step(engine, batches, *a, **k):
        calls[0] += 1
        run_dir = next(x.split("=", 1)[1] for x in sys.argv if x.startswith("run_dir="))
        marker = Path(run_dir) / "crashed"
        if calls[0] >= at and not marker.exists():
            marker.write_text("1")
            os._exit(1)
        return real_step(engine, batches, *a, **k)

    trainer.optimizer_step = optimizer_step
elif kind not in ("nan", "nanpattern", "enospc", "enospc_metrics", "record", "slow", "crash"):
    raise SystemExit(f"FAULT={os.environ['FAULT']!r}: unknown fault")

sys.argv[0] = str(REPO / "pretrain" / "main.py")
sys.exit(entry.main())
