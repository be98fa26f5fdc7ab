"""Non-finite loss policy of the engine on 2 real gloo ranks: a NaN on one rank skips the micro batch on
all ranks (no backward, no optimizer step), skips are counted, and nan_max_consecutive in a row stops."""

import pytest

from tests.helpers.dist import launch_ranks


@pytest.mark.timeout(300)
def test_nan_skips_on_all_ranks_and_stops_after_n_in_a_row():
    outs = launch_ranks(["tests/helpers/nan_worker.py"], 2, timeout=240)
    assert "NAN_OK" in outs[0].stdout, outs[0].stdout[-3000:]
