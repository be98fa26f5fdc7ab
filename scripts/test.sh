#!/usr/bin/env bash
# Set everything up and run the whole test suite (fast + slow tiers), as CI does.
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -m "not slow"  # the quick tier only
#   TEST_WORKERS=0 bash scripts/test.sh  # in one process (default: 2 pytest-xdist workers)
# In one process the suite kept about one of 2 cores busy (launches, rendezvous, the timeouts fault tests provoke);
# two workers use both. Each worker takes whole files (--dist loadfile): a module's fixtures (the Slurm test
# cluster, the checkpoints of the convert tests) are built once and its tests never run beside each other. Files go
# out longest first (tests/conftest.py, from the measured tests/file_seconds.json; --no-loadscope-reorder keeps
# that order instead of xdist's most-tests-first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
