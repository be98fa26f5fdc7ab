"""Shared fixtures. The layout mirrors the source: tests/ressformer (the model package), tests/pretrain (the
pipeline; tests/pretrain/checkpoint for pretrain/checkpoint/), tests/tokenizer, tests/bench (the benchmarks and the
paper suite), tests/e2e (whole jobs through the CLI and Slurm, slow tier). tests/helpers holds the rank workers and
launch helpers the multi-rank tests start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.dist import REPO, base_env


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores (torch's default is all of them per process), for
    its own tensors and for the processes its tests start."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(config, items):
    """Files run longest first, the order within a file kept: each xdist worker takes whole files (scripts/test.sh:
    --dist loadfile --no-loadscope-reorder), and the short files left for the end keep both workers busy until the
    last one finishes. The seconds are measured (tests/file_seconds.json, tests/helpers/file_seconds.py). A file not
    in the table goes first if it has slow tests (a long file left for the end would run alone), last otherwise."""
    table = json.loads((REPO / "tests" / "file_seconds.json").read_text())
    seconds: dict = {}
    for item in items:
        known = table.get(item.path.relative_to(REPO).as_posix())
        slow = float("inf") if item.get_closest_marker("slow") else 0.0
        seconds[item.path] = max(seconds.get(item.path, 0.0), slow if known is None else known)
    first: dict = {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (-seconds[item.path], first[item.path]))


@pytest.fixture(scope="session")
def default_data():
    """The default corpus prepared into REPO/artifacts (tokenizer + indexed datasets), as scripts/main.sh does; the
    configs in pretrain/configs read it."""
    if not (REPO / "artifacts" / "data" / "shakespeare.idx").is_file():
        subprocess.run([sys.executable, "-m", "pretrain.data", "prepare"], cwd=REPO, env=base_env(), check=True,
                       timeout=300)
    return REPO / "artifacts"
