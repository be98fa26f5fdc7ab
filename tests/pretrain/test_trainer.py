"""pretrain/trainer.py: the non-finite loss policy on 2 real gloo ranks (a NaN on one rank skips the micro batch on
all ranks, no backward, no optimizer step; skips are counted; nan_max_consecutive in a row stops), and the spare
samples sized for skipped micro batches."""

import pytest

from tests.helpers.dist import launch_ranks


@pytest.mark.timeout(300)
def test_nan_skips_on_all_ranks_and_stops_after_n_in_a_row():
    outs = launch_ranks(["tests/helpers/nan_worker.py"], 2, timeout=240)
    assert "NAN_OK" in outs[0].stdout, outs[0].stdout[-3000:]


def test_spare_samples_cover_skipped_batches():
    from pretrain.config import RunConfig
    from pretrain.trainer import spare_samples

    assert spare_samples(RunConfig(steps=12), 4) == 4 and spare_samples(RunConfig(steps=1000), 8) == 80


