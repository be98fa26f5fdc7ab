"""Shared fixtures. The layout mirrors the source: tests/ressformer (the model package), tests/pretrain (the
pipeline; tests/pretrain/checkpoint for pretrain/checkpoint/), tests/tokenizer, tests/bench (the benchmarks and the
paper suite), tests/e2e (whole jobs through the CLI and Slurm, slow tier). tests/helpers holds the rank workers and
launch helpers the multi-rank tests start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.dist import REPO, base_env


@pytest.fixture(scope="session")
def default_data():
    """The default corpus prepared into REPO/artifacts (tokenizer + indexed datasets), as scripts/main.sh does; the
    configs in pretrain/configs read it."""
    if not (REPO / "artifacts" / "data" / "shakespeare.idx").is_file():
        subprocess.run([sys.executable, "-m", "pretrain.data", "prepare"], cwd=REPO, env=base_env(), check=True,
                       timeout=300)
    return REPO / "artifacts"
