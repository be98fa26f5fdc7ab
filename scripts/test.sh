#!/usr/bin/env bash
# Set everything up and run the whole test suite (fast + slow tiers), as CI does.
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -m "not slow"  # the quick tier only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests "$@"
