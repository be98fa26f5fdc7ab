"""Local datasets for the lm-eval tasks in this folder (read from ./data, no download, any working directory)."""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str, **kwargs):
    import datasets

    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_heldout(**kwargs):
    return _load("shakespeare_heldout.jsonl")


def load_next_line(**kwargs):
    return _load("shakespeare_next_line.jsonl")
