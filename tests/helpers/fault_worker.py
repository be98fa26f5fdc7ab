"""`pretrain/main.py` with one fault injected, for the run-folder fault tests. FAULT (environment):

    nan:N:R      on rank R, the loss of this process's N-th micro batch (1-based) is NaN
    enospc:S:R   on rank R, every torch.save into tag step S fails with ENOSPC (a full disk)
"""

import errno
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pretrain import main as entry, trainer  # noqa: E402

kind, arg, fault_rank = os.environ["FAULT"].split(":")
rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))

if kind == "nan" and rank == int(fault_rank):
    original, calls = trainer.micro_step, [0]

    def micro_step(engine, batch, num_steps, guard):
        calls[0] += 1
        if calls[0] != int(arg):
            return original(engine, batch, num_steps, guard)

        def poison(module, inputs, out):
            out.loss = out.loss * float("nan")

        hook = engine.module.register_forward_hook(poison)
        try:
            return original(engine, batch, num_steps, guard)
        finally:
            hook.remove()

    trainer.micro_step = micro_step
elif kind == "enospc" and rank == int(fault_rank):
    real_save, tag = torch.save, f"step_{int(arg):08d}"

    def save(obj, f, *a, **k):
        if tag in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    torch.save = save
elif kind not in ("nan", "enospc"):
    raise SystemExit(f"FAULT={os.environ['FAULT']!r}: unknown fault")

sys.argv[0] = str(REPO / "pretrain" / "main.py")
sys.exit(entry.main())
