#!/usr/bin/env bash
# Create .venv and install ressformer with its pinned stack (CPU torch first: an open torch range
# would pull a multi-GB CUDA build). Idempotent: re-running is fast.
# It installs the `dev` extra (train + eval + gpu + test tools), what scripts/main.sh and scripts/test.sh
# need; pyproject.toml's extras give lighter installs: `pip install -e .` (model + tokenizer),
# `.[train]`, `.[eval]`, `.[gpu]`.
# On a GPU cluster, install the CUDA torch of the same version first, then run this script with
# RESSFORMER_SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${RESSFORMER_SKIP_TORCH:-}" ] && ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
# Skip pip when this pyproject.toml was already installed into this venv (re-runs of main.sh / test.sh).
STAMP="$VENV/.ressformer-pyproject.sha256"
if ! sha256sum --status -c "$STAMP" 2>/dev/null; then
  # (the grep drops pip's noise about unreachable local index folders; pip's own failure still stops us)
  pip install -q -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  python -c "import ressformer, pretrain, tokenizer" && sha256sum pyproject.toml >"$STAMP"
fi
python -c "import torch, deepspeed, megatron.core, sentencepiece, datasets, transformers, lm_eval; print(f'ressformer env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')"
