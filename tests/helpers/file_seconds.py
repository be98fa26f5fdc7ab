"""Seconds per test file, measured, for the order the suite runs its files in (tests/conftest.py: longest first,
so that two xdist workers, each taking whole files, finish together).

    bash scripts/test.sh --durations=0 > LOG; python -m tests.helpers.file_seconds LOG > tests/file_seconds.json

Each file's setup + call + teardown seconds are summed from pytest's `--durations=0` table. Files missing from
the table (new ones) are placed by their slow tests' timeouts (conftest)."""

from __future__ import annotations

import collections
import json
import re
import sys


def file_seconds(log: str) -> dict[str, float]:
    table = log[log.index("slowest durations"):]
    out: collections.Counter = collections.Counter()
    for m in re.finditer(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+?)::", table, re.M):
        out[m.group(2)] += float(m.group(1))
    return {f: round(s, 1) for f, s in sorted(out.items(), key=lambda x: -x[1])}


if __name__ == "__main__":
    json.dump(file_seconds(open(sys.argv[1]).read()), sys.stdout, indent=1)
    print()
