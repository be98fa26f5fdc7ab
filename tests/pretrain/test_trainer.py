"""pretrain/trainer.py: the non-finite loss policy on 2 real gloo ranks (a NaN on one rank skips the micro batch on
all ranks, no backward, no optimizer step; skips are counted; nan_max_consecutive in a row stops), and the spare
samples sized for skipped micro batches."""

import pytest

from tests.helpers.dist import launch_ranks


@pytest.mark.timeout(300)
def test_nan_skips_on_all_ranks_and_stops_after_n_in_a_row():
    outs = launch_ranks(["tests/helpers/nan_worker.py"], 2, timeout=240)
    assert "NAN_OK" in outs[0].stdout, outs[0].stdout[-3000:]


def test_nan_budget_and_the_guard_stop_a_storm_with_gaps():
    from pretrain.config import RunConfig
    from pretrain.trainer import NanGuard, NanStormError, nan_budget

    assert nan_budget(RunConfig(steps=12)) == 5  # at least nan_max_consecutive
    assert nan_budget(RunConfig(steps=1000, grad_accum=4)) == 40 and nan_budget(RunConfig(steps=100,
                                                                                          nan_max_fraction=0.5)) == 50
    g = NanGuard(5, max_skipped=5, budget_note="note")
    for i in range(1, 13):  # four bad, one good, repeating: never five in a row
        bad = i % 5 != 0
        if bad:
            g.skipped += 1
            g.in_a_row += 1
        else:
            g.in_a_row = 0
        if g.skipped > 5:
            with pytest.raises(NanStormError, match="6 micro batches skipped.*budget of 5 \\(note\\)"):
                g.check()
            break
        g.check()
    else:
        raise AssertionError("the budget never stopped the storm")


def test_train_samples_continue_from_the_checkpoint_at_any_global_batch():
    from pretrain.config import RunConfig
    from pretrain.trainer import train_samples

    run = RunConfig(steps=12, micro_batch=2)
    fresh = train_samples(run, 2, {})
    assert fresh == 12 * 4 + 5 * 2 * 2  # the steps at global batch 4 and 5 skipped micro steps of 2 x 2 samples
    state = {"step": 6, "consumed_samples": 24, "skipped_micro_batches": 1, "train_samples": fresh}
    assert train_samples(run, 1, state) == fresh  # smaller global batch: the size the run built, the same order
    bigger = RunConfig(steps=12, micro_batch=2, grad_accum=2)
    assert train_samples(bigger, 2, state) == 24 + 6 * 8 + 4 * 2 * 2  # what the remaining steps consume
