"""One rank of tests/pretrain/test_trainer.py: a one-parameter regression under DeepSpeed ZeRO-1 whose loss is NaN on
rank 1 for marked batches; checks that every rank skips the same micro batches and that the weight moves only
on the good ones, then that `max_consecutive` bad ones in a row stop with the documented error."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import distributed, trainer  # noqa: E402
from ressformer.output import ModelOutput  # noqa: E402


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # (1,): DeepSpeed flattens parameters

    def forward(self, input_ids, labels=None, num_steps=None):
        bad = bool(input_ids[0, 0] < 0) and dist.get_rank() == 1  # only rank 1 sees the NaN
        loss = ((self.w - 1.0) ** 2).sum() + (torch.tensor(float("nan")) if bad else 0.0)
        return ModelOutput(logits=self.w.view(1, 1, 1), loss=loss, lm_loss=loss)


def main() -> None:
    import deepspeed

    distributed.setup_distributed()
    model = Scalar()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0})
    guard = trainer.NanGuard(3)
    good, bad = torch.ones(1, 2, dtype=torch.long), -torch.ones(1, 2, dtype=torch.long)
    outs = [trainer.micro_step(engine, {"input_ids": b, "labels": b}, 1, guard) for b in (good, bad, good, bad, bad)]
    assert [o is None for o in outs] == [False, True, False, True, True], outs
    assert guard.skipped == 3 and guard.in_a_row == 2
    w = float(engine.module.w[0])
    ref = Scalar()  # plain torch: the two good steps only
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(2):
        ref_opt.zero_grad()
        ((ref.w - 1.0) ** 2).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
    expected = float(ref.w[0])
    assert abs(expected - 0.2) < 1e-6  # clipped to |g| = 1 twice: two full Adam steps of lr
    assert abs(w - expected) < 1e-6, (w, expected)
    try:
        trainer.micro_step(engine, {"input_ids": bad, "labels": bad}, 1, guard)
    except RuntimeError as e:
        assert "3 consecutive" in str(e) and "nan_max_consecutive=3" in str(e), e
    else:
        raise AssertionError("the third NaN in a row did not stop the run")
    if dist.get_rank() == 0:
        print("NAN_OK")
    dist.barrier()
    dist.destroy_process_group()  # leave together: a rank exiting under a live gloo group can abort


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests.helpers.dist dumps stacks of a hung rank
    main()
